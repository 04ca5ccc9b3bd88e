"""GPU timings of the Triton kernels against the torch paths they replace, at Llama-3-8B attention shapes.

32 query heads, 8 KV heads, head dim 128, bf16, one sequence, cache lengths 4K..32K (``--lengths``):

* column sums (the H2O / Keyformer statistic, :func:`kvcache.attention.scoring.column_sums`): the fused
  kernel (:mod:`kvcache.attention.triton_scoring`) against the torch chunked path, for a decode query
  (q = 1) and a prompt chunk (``--prompt-queries``);
* decode attention over the packed cache (:func:`kvcache.attention.quantized.attend_packed`): the
  Triton kernel reading the codes (:mod:`kvcache.attention.triton_packed`) against the torch block loop,
  and dense ``scaled_dot_product_attention`` over the bf16 cache as the floor, for KIVI 2/4-bit and
  ZipCache.

The torch path is forced with ``KVCACHE_TRITON=0`` and the kernels with ``=1``; each timing is the median
of ``--repeats`` CUDA-event timings after one warm-up call (which compiles the kernel). Every row also
records the largest difference between the kernel's and torch's result. Writes
``gpu_kernel_bench.json`` (machine with the GPU's name, triton version, settings, rows) and
``gpu_kernel_bench.png`` to ``--out``. Needs CUDA and triton; ``--help`` works anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

DEFAULT_SPECS = ["kivi:bits=2", "kivi:bits=4", "zipcache"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return parser.parse_args(argv)


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


def cuda_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn`` by CUDA events, after one warm-up call (wall clock off CUDA)."""
    fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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

                row = {"kind": "column_sums", "policy": policy, "T": t, "q": q}
                for name, on in (("triton", True), ("torch", False)):
                    with kernels(on):
                        row[f"{name}_ms"] = cuda_ms(run, args.repeats)
                        if policy == "h2o":
                            row[f"_{name}_out"] = run()
                if policy == "h2o":  # deterministic: the two paths must agree
                    row["max_abs_diff"] = float((row.pop("_triton_out") - row.pop("_torch_out")).abs().max())
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
        dense_ms = cuda_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=True),
            args.repeats,
        )
        for spec in args.specs:
            store = KVStore(kvcache.create("quant", spec), d, torch.bfloat16, device=args.device)
            saliency = torch.rand(1, args.kv_heads, t, generator=gen, device=args.device)
            store.append(keys, values, saliency)
            row = {"kind": "packed_decode", "spec": spec, "T": t, "sdpa_dense_ms": dense_ms, "store_bytes": store.nbytes()}
            outputs = {}
            for name, on in (("triton", True), ("torch", False)):
                with kernels(on):
                    row[f"{name}_ms"] = cuda_ms(lambda: attend_packed(query, store, scaling=scaling), args.repeats)
                    outputs[name] = attend_packed(query, store, scaling=scaling, return_lse=True)
            row["max_abs_diff"] = float((outputs["triton"][0].float() - outputs["torch"][0].float()).abs().max())
            row["max_abs_diff_lse"] = float((outputs["triton"][1] - outputs["torch"][1]).abs().max())
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_kernel_bench needs a CUDA device (the Triton kernels run on GPUs; the CPU keeps the torch paths)", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("gpu_kernel_bench needs triton: pip install 'kvcache[dev]' (or pip install triton)", file=sys.stderr)
        return 2
    from kvcache.eval.machine import load_average, machine

    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    info = machine(args.device)
    rows = column_sum_rows(args, gen) + packed_decode_rows(args, gen)
    info["loadavg_at_end"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"machine": info, "triton": triton.__version__, "settings": settings, "rows": rows}
    (args.out / "gpu_kernel_bench.json").write_text(json.dumps(result, indent=1))
    shapes = f"H_q={args.query_heads}, H_kv={args.kv_heads}, D={args.head_dim}, bf16"
    plot(rows, f"Triton kernels vs torch ({shapes}) on {info.get('gpu', args.device)}", args.out / "gpu_kernel_bench.png")
    print(f"wrote {args.out / 'gpu_kernel_bench.json'} and {args.out / 'gpu_kernel_bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
