"""``kvcache policies [--kind KIND] [--json]``: every registered policy with its parameters and defaults."""

from __future__ import annotations

import argparse
import json

from kvcache.registry import KIND_DESCRIPTIONS, KINDS, list_policies


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=KINDS, help="only this kind")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    entries = list_policies(args.kind)
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
        return 0
    for kind in [args.kind] if args.kind else KINDS:
        print(f"[{kind}] {KIND_DESCRIPTIONS[kind]}")
        for entry in (e for e in entries if e["kind"] == kind):
            print(f"  {entry['name']:<12} {entry['summary']}")
            for p in entry["parameters"]:
                print(f"      {p['name']}={p['default']!r} ({p['type']}) {p['help']}")
    return 0
