"""``kvcache eval``: lm-eval-harness's own CLI with the ``kvcache`` model registered and the kvlong tasks on
the task path. Every option is lm-eval's (``kvcache eval --help`` prints lm-eval's help); the results JSON
is lm-eval's own (``--output_path``).

    kvcache eval --model kvcache \\
        --model_args pretrained=smollm2-135m,kv_policy=snapkv,kv_budget=0.5 \\
        --tasks kvlong_1k --batch_size 4 --limit 8 --output_path results/lm_eval

lm-eval finds models only through its built-in table (no entry points), so the stock ``lm_eval`` command
cannot see ``--model kvcache``; ``python -m eval.lm_eval_cli`` is the same as ``kvcache eval``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Everything after ``kvcache eval`` belongs to lm-eval: skip argparse (and its -h) entirely.
    def forward_all(args=None, namespace=None):
        return argparse.Namespace(lm_eval_args=list(sys.argv[2:] if args is None else args))

    parser.parse_args = forward_all  # type: ignore[method-assign]


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval ``run`` arguments: add our task folder to ``--include_path``."""
    args = list(args)
    if args and args[0] == "run":
        args = args[1:]
    if any(a in ("-h", "--help") for a in args):
        return ["run", "--help"]
    for i, a in enumerate(args):
        if a == "--include_path" and i + 1 < len(args):
            args[i + 1] = f"{args[i + 1]}:{TASKS_DIR}"
            break
        if a.startswith("--include_path="):
            args[i] = f"{a}:{TASKS_DIR}"
            break
    else:
        args += ["--include_path", str(TASKS_DIR)]
    return ["run", *args]


def run(args: argparse.Namespace) -> int:
    import eval.lm_eval_model  # noqa: F401  registers --model kvcache
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    harness = HarnessCLI()
    argv = lm_eval_argv(args.lm_eval_args)
    saved = sys.argv
    sys.argv = ["kvcache eval", *argv]
    try:
        parsed = harness.parse_args()
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
