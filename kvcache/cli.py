"""The ``kvcache`` command line. Each subcommand lives in its own module, imported only when used, so
``kvcache policies`` works with nothing but torch installed.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``. The benchmarks are one family,
``kvcache bench NAME`` (:data:`BENCHMARKS`), measured the same way (``kvcache.eval.harness``); plain
``kvcache bench --policy ...`` is ``kvcache bench decode``, and the older names (``limit-bench``, ...) stay.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

from kvcache.registry import UsageError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "policies": ("kvcache.policies_cli", "list registered policies with their parameters and defaults"),
    "models": ("kvcache.engine_adapters.hf.models_cli", "list the embedded models, or print a converted model folder"),
    "generate": ("kvcache.engine_adapters.hf.generate_cli", "generate with a KV policy on a Hugging Face model"),
    "demo": ("kvcache.eval.demo", "full cache beside compressed ones on a long built-in document"),
    "teacache-calibrate": ("kvcache.eval.teacache_calibrate", "fit TeaCache's rescaling polynomial for a DiT from a few uncached runs"),
    "serve": ("kvcache.engine_adapters.vllm.launcher", "vLLM's OpenAI-compatible server with --kv-policy/--kv-budget (needs kvcache[vllm])"),
    "eval": ("kvcache.eval.lm_eval_cli", "lm-eval-harness with --model kvcache and the kvlong tasks (every lm-eval option)"),
    "sweep": ("kvcache.eval.sweep", "accuracy vs KV budget on the kvlong suite: policies x budgets, JSON table + PNG plots"),
    "fidelity": ("kvcache.eval.fidelity", "long-text perplexity and ROUGE-L vs the full cache's output, per policy and budget"),
}

# kvcache bench NAME -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "decode": ("kvcache.eval.bench", "decode tokens/s, TTFT, KV bytes and peak memory of a policy vs the full cache"),
    "prompt": ("kvcache.eval.prompt_bench", "prompt pass time of each policy vs the full cache on the same prompts"),
    "limit": ("kvcache.eval.limit_bench", "decode speed of a compressed cache of C tokens vs a full cache of C tokens"),
    "quant": ("kvcache.eval.quant_bench", "bytes, round-trip error and CPU attention speed of the KV quantisation codecs"),
    "serve": ("kvcache.eval.vllm_bench", "vLLM serving: stock vs eviction policies on one engine and KV pool (needs kvcache[vllm])"),
    "dit": ("kvcache.eval.dit_bench", "DiT feature-cache policies: speedup, blocks skipped and PSNR/SSIM on the trained digits DiT"),
    "kvpress": ("kvcache.eval.kvpress_speed", "decode speed beside NVIDIA's kvpress, the two libraries' processes alternating"),
    "kernels": ("kvcache.eval.gpu_kernel_bench", "GPU: Triton kernels vs the torch paths at Llama-3-8B shapes (needs CUDA and triton)"),
}

# older command names -> the benchmark they run
BENCH_ALIASES = {"limit-bench": "limit", "prompt-bench": "prompt", "quant-bench": "quant", "vllm-bench": "serve",
                 "dit-bench": "dit"}

BENCH_HELP = "benchmarks: " + "|".join(BENCHMARKS) + " (kvcache bench --help lists them)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    sub.add_parser("bench", help=BENCH_HELP, add_help=False)
    return parser


def bench_usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: kvcache bench NAME [options]   (kvcache bench NAME --help: the options of one)", "",
             "One family of benchmarks, measured alike: configurations alternating within every repeat, medians",
             "with min/max and quartiles, ratios of medians, the machine and its load before and after, a warning",
             "when the machine is busy, JSON + PNG.", "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in BENCHMARKS.items()]
    lines += ["", "kvcache bench --policy ... (options, no NAME) is kvcache bench decode.",
              *textwrap.wrap("Older names still work: " + ", ".join(
                  f"kvcache {old} (= bench {new})" for old, new in BENCH_ALIASES.items()) + ".", 100)]
    return "\n".join(lines) + "\n"


def run_command(prog: str, module_name: str, help_text: str, argv: list[str]) -> int:
    """Parse ``argv`` with the module's options under ``prog`` and run it; a UsageError exits 2 with one line."""
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog, description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except UsageError as err:  # a bad policy, budget, codec, file or model: the message names the fix
        parser.exit(2, f"{prog}: {err}\n")


def bench(argv: list[str]) -> int:
    """``kvcache bench [NAME] ...``: NAME picks the benchmark; options without a NAME go to ``decode``."""
    if argv and argv[0] in BENCHMARKS:
        module_name, help_text = BENCHMARKS[argv[0]]
        return run_command(f"kvcache bench {argv[0]}", module_name, help_text, argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(bench_usage())
        return 0
    if argv and not argv[0].startswith("-"):
        sys.stderr.write(f"kvcache bench: unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHMARKS)} "
                         "(kvcache bench --help)\n")
        return 2
    module_name, help_text = BENCHMARKS["decode"]
    return run_command("kvcache bench", module_name, help_text, argv)


def bench_main(name: str, argv: list[str] | None = None) -> int:
    """``python -m kvcache.eval.<module>``: the same as ``kvcache bench NAME``."""
    return main(["bench", name, *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    if argv and argv[0] in BENCH_ALIASES:
        module_name, help_text = BENCHMARKS[BENCH_ALIASES[argv[0]]]
        return run_command(f"kvcache {argv[0]}", module_name, help_text, argv[1:])
    if not argv or argv[0] not in SUBCOMMANDS:
        build_parser().parse_args(argv)  # prints usage or the "invalid choice" error
        return 2
    module_name, help_text = SUBCOMMANDS[argv[0]]
    return run_command(f"kvcache {argv[0]}", module_name, help_text, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
