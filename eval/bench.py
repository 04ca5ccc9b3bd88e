"""``kvcache bench decode`` (also plain ``kvcache bench``): decode tokens/s, time to first token, KV bytes and
peak process memory of a policy beside the full cache, in the same process, over prompt lengths and batch sizes.

    kvcache bench decode --policy snapkv --budget 0.5 --prompt-lengths 512 1024 2048 --batch-sizes 1 4 \\
        --out results/bench_smollm2                                   # CPU, the embedded model
    kvcache bench decode --policy full --quant zipcache ...           # a codec alone (or composed: --policy snapkv)
    kvcache bench decode --device cuda --model llama3-8b-random ...   # GPU, Llama-3-8B shape, random weights

Answers "how much memory and speed do I win?". For every (prompt length, batch size) cell the full cache
(plain transformers ``DynamicCache``, no adapter) and the policy run on the same prompts
``--repeats`` times (default 3), the two caches alternating (:mod:`kvcache.eval.harness`); each figure is the
median of the repeats, with its min and max, and every run's TTFT and decode tokens/s kept in ``runs``.
Measured, never computed from a formula:

* ``ttft_s``: wall time of the prefill forward pass that yields the first token.
* ``decode_tok_s``: ``batch * (N - 1) / decode seconds``: the N - 1 following greedy steps, timed in the same
  run (a hand-written greedy loop, so EOS never stops it early and the two phases are timed apart).
* ``kv_bytes``: bytes of the cache tensors after generating N tokens (the policy's compacted store, packed
  codes with their scales under ``--quant``, or the DynamicCache's key/value tensors); ``kv_bytes_per_token``
  divides by the batch's prompt tokens.
* ``peak_rss_bytes`` (CPU): the process's RSS high-water mark during the N-token run, reset before it
  (``/proc/self/clear_refs``), so each run has its own peak; ``peak_gpu_bytes`` (CUDA):
  ``torch.cuda.max_memory_allocated`` reset before the run.

Writes ``bench.json`` (machine, load before and after, busy warnings, settings, one row per cell and cache),
``bench.png`` (decode tokens/s, TTFT, KV bytes and peak memory against prompt length, one line per cache and
batch size) and ``table.md``. Times depend on the machine and its load; they are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from kvcache.budget import parse_budget
from kvcache.eval import harness

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
)
RANDOM_MODELS = {"llama3-8b-random": LLAMA3_8B}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help=f"embedded model, local HF folder, or one of {', '.join(RANDOM_MODELS)}")
    p.add_argument("--policy", default="snapkv", help="evict policy (name or name:key=value)")
    p.add_argument("--budget", type=parse_budget, default=0.5, help="KV budget: fraction of the prompt (0.5) or tokens per layer (512)")
    p.add_argument("--layer-budget", default="uniform")
    p.add_argument("--quant", default="none", help="quant codec or spec stored under the policy (zipcache, kivi:bits=2, ...)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per cache (medians reported, every run kept)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--out", type=Path, default=Path("results/bench"))
    p.add_argument("--plot-only", action="store_true")


def load(args: argparse.Namespace):
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    if args.model in RANDOM_MODELS:
        import transformers as tf

        from kvcache.engine_adapters.hf import resolve_model

        tok = tf.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))  # token ids only pick text; the vocab is larger
        config = tf.LlamaConfig(**RANDOM_MODELS[args.model], bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = tf.LlamaForCausalLM(config).to(dtype).eval()
        return model, tok
    from kvcache.engine_adapters.hf import load_model

    return load_model(args.model, dtype=dtype, device=args.device)


def prompts(tokenizer, length: int, batch: int):
    """``batch`` different natural-text prompts of exactly ``length`` tokens (kvlong haystack paragraphs)."""
    import torch

    from kvcache.eval.tasks.generate import load_haystack

    hay = load_haystack()
    ids = tokenizer("\n".join(hay), add_special_tokens=False).input_ids
    rows = []
    for b in range(batch):
        start = (b * 7919) % max(1, len(ids) - length)
        row = (ids[start:] + ids)[:length]
        rows.append(row)
    return torch.tensor(rows)


def cache_bytes(cache) -> int:
    """Bytes of the key/value tensors a transformers cache holds."""
    import torch

    total = 0
    seen: set[int] = set()
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def read_peak(device: str) -> dict[str, int]:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return {"peak_gpu_bytes": int(torch.cuda.max_memory_allocated())}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return {"peak_rss_bytes": int(line.split()[1]) * 1024}
    import resource

    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def greedy_run(model, ids, new_tokens: int, device: str, cache) -> tuple[float, float, Any]:
    """Prefill + ``new_tokens`` greedy tokens by hand: (time to first token, decode seconds, cache)."""
    import torch

    from kvcache.engine_adapters.hf.compat import with_cache

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    batch, length = ids.shape
    mask = torch.ones_like(ids)
    positions = torch.arange(length, device=ids.device).expand(batch, length)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = model(**with_cache(model, cache, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True))
        token = out.logits[:, -1:].argmax(-1)
        sync()
        first = time.perf_counter()
        for step in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            pos = torch.full_like(token, length + step)
            out = model(**with_cache(model, cache, input_ids=token, attention_mask=mask, position_ids=pos, use_cache=True))
            token = out.logits[:, -1:].argmax(-1)
        sync()
        end = time.perf_counter()
    return first - start, end - first, cache


def run_once(model, ids, args, policy: bool) -> dict[str, Any]:
    """One timed greedy run of the full cache (stock ``DynamicCache``, no adapter) or of the policy."""
    import contextlib

    from transformers import DynamicCache

    from kvcache.engine_adapters.hf import kv_policy

    ctx = (kv_policy(model, args.policy, budget=args.budget, layer_budget=args.layer_budget, quant=args.quant)
           if policy else contextlib.nullcontext())
    with ctx as session:
        cache = session.new_cache(args.new_tokens) if policy else DynamicCache(config=model.config)
        reset_peak(args.device)
        ttft, decode_s, cache = greedy_run(model, ids, args.new_tokens, args.device, cache)
        peak = read_peak(args.device)
        run = {"ttft_s": ttft, "decode_s": decode_s, "kv_bytes": int(session.stats()["kv_bytes"] if policy else cache_bytes(cache)),
               **peak}
        if policy:
            run["kept_tokens_per_layer"] = session.stats().get("kept_tokens_per_layer")
    return run


def summarise_runs(runs: list[dict[str, Any]], ids, new_tokens: int) -> dict[str, Any]:
    """Medians (with min and max) of TTFT and decode time over the repeats (peak memory: the largest), every
    run's TTFT and decode tokens/s kept in ``runs``."""
    tokens = ids.shape[0] * (new_tokens - 1)
    rates = [tokens / r["decode_s"] for r in runs]
    decode_s = harness.stats([r["decode_s"] for r in runs])["median"]
    row = {**harness.spread("ttft_s", [r["ttft_s"] for r in runs]), "decode_s": decode_s, "decode_tok_s": tokens / decode_s,
           "decode_tok_s_min": min(rates), "decode_tok_s_max": max(rates),
           "kv_bytes": runs[-1]["kv_bytes"], "kv_bytes_per_token": runs[-1]["kv_bytes"] / ids.numel(),
           **{k: max(r[k] for r in runs) for k in runs[-1] if k.startswith("peak_")},
           "runs": [{"ttft_s": r["ttft_s"], "decode_tok_s": rate} for r, rate in zip(runs, rates)]}
    if "kept_tokens_per_layer" in runs[-1]:
        row["kept_tokens_per_layer"] = runs[-1]["kept_tokens_per_layer"]
    return row


def cache_label(args: argparse.Namespace) -> str:
    return args.policy if args.quant == "none" else f"{args.policy}+{args.quant}"


def run_bench(args: argparse.Namespace) -> dict:
    import torch
    from tqdm import tqdm

    model, tok = load(args)
    from kvcache.engine_adapters.hf import kv_policy

    with kv_policy(model, args.policy, budget=args.budget, layer_budget=args.layer_budget, quant=args.quant):
        pass  # settings that depend on the model (a codec's group size vs head_dim) fail here, before any timing
    recorder = harness.Recorder(args.device)
    data: dict[str, Any] = {"model": args.model, "policy": cache_label(args), "budget": args.budget, "layer_budget": args.layer_budget,
                            "new_tokens": args.new_tokens, "repeats": args.repeats, "dtype": str(next(model.parameters()).dtype),
                            **recorder.record(), "rows": []}
    cells = [(n, b) for n in args.prompt_lengths for b in args.batch_sizes]
    warm = prompts(tok, 64, 1).to(args.device)
    from transformers import DynamicCache

    greedy_run(model, warm, 2, args.device, DynamicCache(config=model.config))  # warm-up (allocator, kernels)
    for length, batch in tqdm(cells, desc="bench", unit="cell"):
        ids = prompts(tok, length, batch).to(args.device)
        runs = harness.alternate(["full", "policy"], args.repeats, lambda name: run_once(model, ids, args, policy=name == "policy"))
        full, pol = (summarise_runs(runs[name], ids, args.new_tokens) for name in ("full", "policy"))
        for name, row in (("full", full), (cache_label(args), pol)):
            data["rows"].append({"cache": name, "prompt_len": length, "batch": batch, **row})
        data["rows"].append({
            "cache": "ratio", "prompt_len": length, "batch": batch,
            "decode_speedup": pol["decode_tok_s"] / full["decode_tok_s"],
            "ttft_ratio": pol["ttft_s"] / full["ttft_s"],
            "kv_bytes_ratio": pol["kv_bytes"] / full["kv_bytes"],
        })
        mem_key = "peak_gpu_bytes" if "peak_gpu_bytes" in full else "peak_rss_bytes"
        data["rows"][-1]["peak_mem_ratio"] = pol[mem_key] / full[mem_key]
        data.update(recorder.record())
        harness.write_report(data, args.out / "bench.json")  # after every cell: an interrupted run keeps its cells
        del ids
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    data.update(recorder.finish())
    return data


def plot(data: dict, path: Path) -> None:
    plt = harness.pyplot()
    rows = [r for r in data["rows"] if r["cache"] != "ratio"]
    mem_key = "peak_gpu_bytes" if any("peak_gpu_bytes" in r for r in rows) else "peak_rss_bytes"
    metrics = [("decode_tok_s", "decode tokens/s"), ("ttft_s", "time to first token (s)"),
               ("kv_bytes", "KV cache (MiB)"), (mem_key, "peak process memory (MiB)" if mem_key == "peak_rss_bytes" else "peak GPU memory (MiB)")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, title) in zip(axes, metrics):
        for cache in sorted({r["cache"] for r in rows}, key=lambda c: c != "full"):
            for batch in sorted({r["batch"] for r in rows}):
                pts = sorted((r["prompt_len"], r[key]) for r in rows if r["cache"] == cache and r["batch"] == batch and key in r)
                if not pts:
                    continue
                scale = 1 / 2**20 if "bytes" in key else 1
                ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], marker="o",
                        linestyle="--" if cache == "full" else "-", label=f"{cache} (batch {batch})")
        ax.set_title(title)
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    m = data["machine"]
    where = m.get("gpu") or f"CPU, {m.get('cpus')} cores, {m.get('torch_threads')} torch threads"
    fig.suptitle(f"{data['policy']} @ budget {data['budget']} vs full cache - {data['model']} ({data['dtype']}), {where}, "
                 f"load {data.get('load_before')} -> {data.get('load_after')}")
    harness.save_figure(fig, path, dpi=110)


def markdown_table(data: dict) -> str:
    lines = ["| prompt | batch | cache | TTFT s | decode tok/s | KV MiB | peak mem MiB |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r["cache"] == "ratio":
            lines.append(f"| {r['prompt_len']} | {r['batch']} | **ratio** | {r['ttft_ratio']:.2f}x | {r['decode_speedup']:.2f}x | "
                         f"{r['kv_bytes_ratio']:.2f}x | {r['peak_mem_ratio']:.2f}x |")
            continue
        mem = r.get("peak_rss_bytes", r.get("peak_gpu_bytes", 0))
        lines.append(f"| {r['prompt_len']} | {r['batch']} | {r['cache']} | {r['ttft_s']:.2f} | {r['decode_tok_s']:.1f} | "
                     f"{r['kv_bytes'] / 2**20:.1f} | {mem / 2**20:.0f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import kvcache

    if args.new_tokens < 2:
        raise SystemExit("kvcache bench: --new-tokens must be >= 2 (decode speed needs more than the first token)")
    if any(n < 2 for n in args.prompt_lengths) or any(b < 1 for b in args.batch_sizes):
        raise SystemExit("kvcache bench: --prompt-lengths must be >= 2 and --batch-sizes >= 1")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("kvcache bench: --device cuda but torch sees no GPU")
    if args.budget > 1:
        args.budget = int(args.budget)
    kvcache.create("evict", args.policy)
    kvcache.create("budget", args.layer_budget)
    kvcache.create("quant", args.quant)
    data = json.loads((args.out / "bench.json").read_text()) if args.plot_only else run_bench(args)
    written = harness.write_report(data, args.out / "bench.json", plot, markdown_table)
    print("wrote " + ", ".join(map(str, written)))
    return 0
