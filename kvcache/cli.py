"""The ``kvcache`` command line. Each subcommand lives in its own module, imported only when used, so
``kvcache policies`` works with nothing but torch installed.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvcache.registry import UsageError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "policies": ("kvcache.policies_cli", "list registered policies with their parameters and defaults"),
    "models": ("kvcache.engine_adapters.hf.models_cli", "list the embedded models, or print a converted model folder"),
    "generate": ("kvcache.engine_adapters.hf.generate_cli", "generate with a KV policy on a Hugging Face model"),
    "demo": ("kvcache.eval.demo", "full cache beside compressed ones on a long built-in document"),
    "dit-bench": ("kvcache.eval.dit_bench", "DiT feature-cache policies: speedup, blocks skipped and PSNR/SSIM on the trained digits DiT"),
    "teacache-calibrate": ("kvcache.eval.teacache_calibrate", "fit TeaCache's rescaling polynomial for a DiT from a few uncached runs"),
    "serve": ("kvcache.engine_adapters.vllm.launcher", "vLLM's OpenAI-compatible server with --kv-policy/--kv-budget (needs kvcache[vllm])"),
    "eval": ("kvcache.eval.lm_eval_cli", "lm-eval-harness with --model kvcache and the kvlong tasks (every lm-eval option)"),
    "sweep": ("kvcache.eval.sweep", "accuracy vs KV budget on the kvlong suite: policies x budgets, JSON table + PNG plots"),
    "fidelity": ("kvcache.eval.fidelity", "long-text perplexity and ROUGE-L vs the full cache's output, per policy and budget"),
    "limit-bench": ("kvcache.eval.limit_bench", "decode speed of a compressed cache of C tokens vs a full cache of C tokens"),
    "prompt-bench": ("kvcache.eval.prompt_bench", "prompt pass time of each policy vs the full cache on the same prompts"),
    "bench": ("kvcache.eval.bench", "decode tokens/s, TTFT, KV bytes and peak memory of a policy vs the full cache"),
    "quant-bench": ("kvcache.eval.quant_bench", "bytes, round-trip error and CPU attention speed of the KV quantisation codecs"),
    "vllm-bench": ("kvcache.eval.vllm_bench", "vLLM serving benchmark: stock vs eviction policies on one engine and KV pool (needs kvcache[vllm])"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        build_parser().parse_args(argv)  # prints usage or the "invalid choice" error
        return 2
    module_name, help_text = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"kvcache {argv[0]}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UsageError as err:  # a bad policy, budget, codec, file or model: the message names the fix
        parser.exit(2, f"kvcache {argv[0]}: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
