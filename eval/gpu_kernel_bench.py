"""GPU timings of the Triton kernels against the torch paths they replace, at Llama-3-8B attention shapes.

32 query heads, 8 KV heads, head dim 128, bf16, one sequence, cache lengths 4K..32K (``--lengths``):

* column sums (the H2O / Keyformer statistic, :func:`kvcache.attention.scoring.column_sums`): the fused
  kernel (:mod:`kvcache.attention.triton_scoring`) against the torch chunked path, for a decode query
  (q = 1) and a prompt chunk (``--prompt-queries``);
* decode attention over the packed cache (:func:`kvcache.attention.quantized.attend_packed`): the
  Triton kernel reading the codes (:mod:`kvcache.attention.triton_packed`) against the torch block loop,
  and dense ``scaled_dot_product_attention`` over the bf16 cache as the floor, for KIVI 2/4-bit and
  ZipCache.

The torch path is forced with ``KVCACHE_TRITON=0`` and the kernels with ``=1``; the two alternate
(:mod:`kvcache.eval.harness`), ``--repeats`` CUDA-event timings each after one warm-up round (which compiles
the kernel); each figure is the median, with min and max. Every row also records the largest difference
between the kernel's and torch's result. Writes ``gpu_kernel_bench.json`` (machine with the GPU's name,
load, triton version, settings, rows) and ``gpu_kernel_bench.png`` to ``--out``. Needs CUDA and triton;
``--help`` works anywhere.

    kvcache bench kernels --lengths 4096 8192 16384 32768 --repeats 10
    python -m kvcache.eval.gpu_kernel_bench ...      # the same
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from kvcache.eval import harness
from kvcache.registry import UsageError

DEFAULT_SPECS = ["kivi:bits=2", "kivi:bits=4", "zipcache"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384, 32768], help="cache lengths T")
    parser.add_argument("--query-heads", type=int, default=32, help="H_q (Llama-3-8B: 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="H_kv (Llama-3-8B: 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="D (Llama-3-8B: 128)")
    parser.add_argument("--prompt-queries", type=int, default=512, help="queries of the prompt-chunk column-sums rows")
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="quant specs of the packed-decode rows")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cuda",
        help="cuda; cpu only smoke-tests this script (set TRITON_INTERPRET=1; its timings mean nothing)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/gpu_kernel_bench"), help="output folder")


@contextlib.contextmanager
def kernels(on: bool) -> Iterator[None]:
    """Route column_sums / attend_packed to the Triton kernels (``on``) or the torch paths."""
    from kvcache.attention.triton_dispatch import ENV_SWITCH

    previous = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENV_SWITCH]
        else:
            os.environ[ENV_SWITCH] = previous


def timed(calls: dict[str, Callable[[], object]], repeats: int, prefix: str = "") -> dict[str, object]:
    """:func:`kvcache.eval.harness.time_calls` by CUDA events; a call named ``triton``/``torch`` is routed to the
    Triton kernel or the torch path."""
    return harness.time_calls(calls, repeats, timer=harness.cuda_seconds, prefix=prefix,
                              around=lambda name: kernels(name == "triton") if name in ("triton", "torch") else contextlib.nullcontext())


def column_sum_rows(args: argparse.Namespace, gen: torch.Generator) -> list[dict]:
    from kvcache.attention.gumbel import GumbelLogits
    from kvcache.attention.scoring import column_sums

    rows = []
    d, scaling = args.head_dim, args.head_dim**-0.5
    for t in args.lengths:
        keys = torch.randn(1, args.kv_heads, t, d, generator=gen, device=args.device).to(torch.bfloat16)
        key_index = torch.arange(t, device=args.device).expand(1, args.kv_heads, t).contiguous()
        key_valid = torch.ones(1, args.kv_heads, t, dtype=torch.bool, device=args.device)
        for q in (1, args.prompt_queries):
            queries = torch.randn(1, args.query_heads, q, d, generator=gen, device=args.device).to(torch.bfloat16)
            query_index = torch.arange(t - q, t, device=args.device)[None]
            for policy in ("h2o", "keyformer"):
                def run(policy: str = policy) -> torch.Tensor:
                    transform = GumbelLogits(1.0) if policy == "keyformer" else None
                    return column_sums(queries, keys, key_index, key_valid, query_index, scaling, transform)

                row = {"kind": "column_sums", "policy": policy, "T": t, "q": q, **timed({"triton": run, "torch": run}, args.repeats)}
                if policy == "h2o":  # deterministic: the two paths must agree
                    outputs = {}
                    for name in ("triton", "torch"):
                        with kernels(name == "triton"):
                            outputs[name] = run()
                    row["max_abs_diff"] = float((outputs["triton"] - outputs["torch"]).abs().max())
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def packed_decode_rows(args: argparse.Namespace, gen: torch.Generator) -> list[dict]:
    import kvcache
    from kvcache.attention.quantized import attend_packed
    from kvcache.quant.store import KVStore

    rows = []
    d, scaling = args.head_dim, args.head_dim**-0.5
    for t in args.lengths:
        keys = torch.randn(1, args.kv_heads, t, d, generator=gen, device=args.device).to(torch.bfloat16)
        values = torch.randn(1, args.kv_heads, t, d, generator=gen, device=args.device).to(torch.bfloat16)
        query = torch.randn(1, args.query_heads, 1, d, generator=gen, device=args.device).to(torch.bfloat16)
        dense = timed({"dense": lambda: torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, scale=scaling, enable_gqa=True)}, args.repeats, prefix="sdpa_")
        for spec in args.specs:
            store = KVStore(kvcache.create("quant", spec), d, torch.bfloat16, device=args.device)
            saliency = torch.rand(1, args.kv_heads, t, generator=gen, device=args.device)
            store.append(keys, values, saliency)
            call = lambda: attend_packed(query, store, scaling=scaling)  # noqa: E731
            row = {"kind": "packed_decode", "spec": spec, "T": t, **dense, "store_bytes": store.nbytes(),
                   **timed({"triton": call, "torch": call}, args.repeats)}
            outputs = {}
            for name in ("triton", "torch"):
                with kernels(name == "triton"):
                    outputs[name] = attend_packed(query, store, scaling=scaling, return_lse=True)
            row["max_abs_diff"] = float((outputs["triton"][0].float() - outputs["torch"][0].float()).abs().max())
            row["max_abs_diff_lse"] = float((outputs["triton"][1] - outputs["torch"][1]).abs().max())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    plt = harness.pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    sums = [r for r in rows if r["kind"] == "column_sums"]
    for policy in sorted({r["policy"] for r in sums}):
        for q in sorted({r["q"] for r in sums}):
            cell = sorted((r for r in sums if r["policy"] == policy and r["q"] == q), key=lambda r: r["T"])
            for name, style in (("triton", "-o"), ("torch", "--x")):
                left.plot([r["T"] for r in cell], [r[f"{name}_ms"] for r in cell], style, label=f"{policy} q={q} {name}")
    left.set(xscale="log", yscale="log", xlabel="cache length T", ylabel="ms (median)", title="column sums")
    left.legend(fontsize=7)
    decode = [r for r in rows if r["kind"] == "packed_decode"]
    for spec in sorted({r["spec"] for r in decode}):
        cell = sorted((r for r in decode if r["spec"] == spec), key=lambda r: r["T"])
        for name, style in (("triton", "-o"), ("torch", "--x")):
            right.plot([r["T"] for r in cell], [r[f"{name}_ms"] for r in cell], style, label=f"{spec} {name}")
    dense = sorted({(r["T"], r["sdpa_dense_ms"]) for r in decode})
    right.plot([t for t, _ in dense], [ms for _, ms in dense], "k:s", label="dense bf16 SDPA")
    right.set(xscale="log", yscale="log", xlabel="cache length T", ylabel="ms (median)", title="decode attention, q = 1")
    right.legend(fontsize=7)
    fig.suptitle(title)
    harness.save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("needs a CUDA device (the Triton kernels run on GPUs; the CPU keeps the torch paths)")
    try:
        import triton
    except ImportError:
        raise UsageError("needs triton: pip install 'kvcache[dev]' (or pip install triton)") from None

    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    recorder = harness.Recorder(args.device)
    rows = column_sum_rows(args, gen) + packed_decode_rows(args, gen)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {**recorder.finish(), "triton": triton.__version__, "settings": settings, "rows": rows}
    shapes = f"H_q={args.query_heads}, H_kv={args.kv_heads}, D={args.head_dim}, bf16"
    where = result["machine"].get("gpu", args.device)

    def plot_rows(report: dict, path: Path) -> None:
        plot(report["rows"], f"Triton kernels vs torch ({shapes}) on {where}", path)

    written = harness.write_report(result, args.out / "gpu_kernel_bench.json", plot_rows)
    print("wrote " + " and ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    from kvcache.cli import bench_main

    sys.exit(bench_main("kernels"))
