"""``kvcache eval``: lm-eval-harness's own CLI with the ``kvcache`` model registered and the kvlong tasks on
the task path. Every option is lm-eval's (``kvcache eval --help`` prints lm-eval's help); the results JSON
is lm-eval's own (``--output_path``).

    kvcache eval --model kvcache \\
        --model_args pretrained=smollm2-135m,kv_policy=snapkv,kv_budget=0.5 \\
        --tasks kvlong_1k --batch_size 4 --limit 8 --output_path results/lm_eval

lm-eval finds models only through its built-in table (no entry points), so the stock ``lm_eval`` command
cannot see ``--model kvcache``; ``python -m kvcache.eval.lm_eval_cli`` is the same as ``kvcache eval``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kvcache.registry import UsageError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Everything after ``kvcache eval`` belongs to lm-eval: skip argparse (and its -h) entirely.
    def forward_all(args=None, namespace=None):
        return argparse.Namespace(lm_eval_args=list(sys.argv[2:] if args is None else args))

    parser.parse_args = forward_all  # type: ignore[method-assign]


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval ``run`` arguments as the user gave them (``run`` optional)."""
    args = list(args)
    if args and args[0] == "run":
        args = args[1:]
    if any(a in ("-h", "--help") for a in args):
        return ["run", "--help"]
    return ["run", *args]


def include_paths(user_path: str | list[str] | None) -> list[str]:
    """The task folders lm-eval should scan: the user's ``--include_path`` (one folder, or several joined
    with ``os.pathsep`` as lm-eval's docs write them) and then the shipped kvlong folder. lm-eval's
    ``TaskManager`` takes a list; its ``run`` command passes the string through whole, so a joined string
    would name one folder that does not exist."""
    if user_path is None:
        paths: list[str] = []
    elif isinstance(user_path, (list, tuple)):
        paths = [str(p) for p in user_path]
    else:
        paths = [p for p in str(user_path).split(os.pathsep) if p]
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise UsageError(f"--include_path {os.pathsep.join(missing)}: no such folder; give a folder of lm-eval task YAML files")
    return [*paths, str(TASKS_DIR)]


def run(args: argparse.Namespace) -> int:
    import kvcache.eval.lm_eval_model  # noqa: F401  registers --model kvcache
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    harness = HarnessCLI()
    argv = lm_eval_argv(args.lm_eval_args)
    saved = sys.argv
    sys.argv = ["kvcache eval", *argv]
    try:
        parsed = harness.parse_args()
        if hasattr(parsed, "include_path"):
            parsed.include_path = include_paths(parsed.include_path)
        harness.execute(parsed)
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(argparse.Namespace(lm_eval_args=list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
