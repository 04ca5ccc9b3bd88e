"""``kvcache bench quant``: measured bytes, round-trip error and CPU attention speed of the KV codecs.

Everything is measured on one layer's store filled with synthetic data (no model needed): keys are
Gaussian with a few outlier channels (x8, as real post-RoPE keys have), values Gaussian. ZipCache's
saliency comes from ZipCache's own probe queries (:func:`kvcache.quant.saliency.probe_positions`).
Reported per codec and head dim: bytes held (``KVStore.nbytes``), bytes per token per KV head, the
compression ratio against a 16-bit cache of the same tokens, relative RMS error of K and V, the relative
error of decode attention over the packed cache against fp32 attention over the original K/V, and then
``attend_packed`` time against dense ``scaled_dot_product_attention`` for a few cache lengths (the
functions alternating, ``--repeats`` rounds after one warm-up round; medians with min and max).
Output is JSON (stdout, or ``--output`` with a PNG beside it), with the machine and its load
(:mod:`kvcache.eval.harness`).

With ``--decode-model`` it measures instead what a user sees: decode tokens/s of a real model through the
HF adapter, the dense cache against each codec, alternating runs with median and spread
(:func:`decode_speed`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import kvcache
from kvcache.eval import harness
from kvcache.quant.store import KVStore
from kvcache.attention.quantized import attend_packed
from kvcache.quant.saliency import attention_saliency, probe_positions

DEFAULT_CODECS = ["none", "kivi:bits=2", "kivi:bits=4", "zipcache"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, help="quant specs to measure")
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens stored for the memory/error rows")
    parser.add_argument("--decode-steps", type=int, default=0, help="decode tokens appended after the prompt")
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads (SmolLM2-135M: 3)")
    parser.add_argument("--query-heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    parser.add_argument("--layers", type=int, default=30, help="layers, for bytes per token of a whole model (SmolLM2-135M: 30)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384], help="cache lengths for timing")
    parser.add_argument("--speed-codecs", nargs="+", default=["kivi:bits=2", "zipcache"], help="codecs timed")
    parser.add_argument("--block-size", type=int, default=512, help="attend_packed block size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives stable timings on a shared machine)")
    parser.add_argument("--model", help="also measure errors on a real model's KV (e.g. smollm2-135m; loaded offline)")
    parser.add_argument("--model-tokens", type=int, default=2048, help="prompt tokens for --model")
    parser.add_argument("--output", help="write JSON here instead of stdout")
    parser.add_argument("--decode-model", help="instead: decode tok/s of a real model (e.g. smollm2-135m) through the HF adapter, "
                        "dense cache vs --decode-codecs, alternating runs")
    parser.add_argument("--decode-codecs", nargs="+", default=["zipcache"], help="quant specs for --decode-model")
    parser.add_argument("--decode-prompt", type=int, default=1024, help="prompt tokens for --decode-model")
    parser.add_argument("--decode-batches", nargs="+", type=int, default=[1, 4], help="batch sizes for --decode-model")
    parser.add_argument("--decode-new-tokens", type=int, default=32, help="tokens generated per run (the first is the prompt pass)")


def synthetic_kv(kv_heads: int, tokens: int, head_dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    channel_scale = torch.ones(kv_heads, 1, head_dim)
    outliers = torch.randint(0, head_dim, (kv_heads, 4), generator=gen)
    channel_scale.scatter_(2, outliers[:, None], 8.0)
    keys = torch.randn(1, kv_heads, tokens, head_dim, generator=gen) * channel_scale
    values = torch.randn(1, kv_heads, tokens, head_dim, generator=gen)
    return keys, values


def filled_store(spec: str, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, prompt: int, gen: torch.Generator) -> kvcache.quant.KVStore:
    """A fp16 store of ``keys``/``values``: the first ``prompt`` as one append, the rest one per step."""
    head_dim = keys.shape[-1]
    store = KVStore(kvcache.create("quant", spec), head_dim, torch.float16)
    scaling = 1 / math.sqrt(head_dim)
    probes = probe_positions(prompt, generator=gen)
    sal = None
    if store.will_flush(prompt):
        sal = attention_saliency(queries[:, :, probes], keys[:, :, :prompt], scaling, query_index=probes[None])
    store.append(keys[:, :, :prompt], values[:, :, :prompt], sal)
    for t in range(prompt, keys.shape[2]):
        sal = None
        if store.will_flush(1):
            sal = attention_saliency(queries[:, :, t : t + 1], keys[:, :, : t + 1], scaling)
        store.append(keys[:, :, t : t + 1], values[:, :, t : t + 1], sal)
    return store


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return float(err.float().norm() / ref.float().norm())


def memory_and_error(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    for head_dim in args.head_dims:
        gen = torch.Generator().manual_seed(args.seed)
        total = args.tokens + args.decode_steps
        keys, values = synthetic_kv(args.kv_heads, total, head_dim, gen)
        queries = torch.randn(1, args.query_heads, total, head_dim, generator=gen)
        group = args.query_heads // args.kv_heads
        probe = queries[:, :, -1:]
        exact = torch.nn.functional.scaled_dot_product_attention(
            probe, keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        )
        sixteen_bit = 2 * args.kv_heads * total * head_dim * 2
        for spec in args.codecs:
            store = filled_store(spec, keys, values, queries, args.tokens, torch.Generator().manual_seed(args.seed))
            k_hat, v_hat = store.dequantize()
            out = attend_packed(probe, store, block_size=args.block_size)
            bits = store.bit_widths().float()
            rows.append(
                {
                    "codec": spec,
                    "head_dim": head_dim,
                    "tokens": total,
                    "bytes": store.nbytes(),
                    "bytes_per_token_per_kv_head": store.nbytes() / (args.kv_heads * total),
                    "bytes_per_token_all_layers": store.nbytes() * args.layers / total,
                    "ratio_vs_16bit": sixteen_bit / store.nbytes(),
                    "mean_code_bits": float(bits.mean()),
                    "fp_buffered_tokens": int(store.fp_count.max()),
                    "key_rel_rms_error": _rel(k_hat.float() - keys, keys),
                    "value_rel_rms_error": _rel(v_hat.float() - values, values),
                    "attention_rel_error": _rel(out - exact, exact),
                }
            )
    return rows


def speed(args: argparse.Namespace) -> list[dict[str, object]]:
    """Per cache length: milliseconds of one decode query's attention, dense (fp32 cache; 16-bit cache upcast
    per call) and over each codec's packed store, the functions alternating within every repeat."""
    rows = []
    head_dim = args.head_dims[0]
    for length in args.lengths:
        gen = torch.Generator().manual_seed(args.seed)
        keys, values = synthetic_kv(args.kv_heads, length, head_dim, gen)
        query = torch.randn(1, args.query_heads, 1, head_dim, generator=gen)
        k16, v16 = keys.half(), values.half()
        calls = {
            # the best dense case: an fp32 cache, GQA inside the kernel
            "sdpa_fp32_cache": lambda: torch.nn.functional.scaled_dot_product_attention(query, keys, values, enable_gqa=True),
            # a 16-bit cache, upcast per call as a CPU path must
            "sdpa_fp16_cache": lambda: torch.nn.functional.scaled_dot_product_attention(query, k16.float(), v16.float(), enable_gqa=True),
        }
        for spec in args.speed_codecs:
            sal = torch.rand(1, args.kv_heads, length, generator=gen)
            store = KVStore(kvcache.create("quant", spec), head_dim, torch.float16)
            store.append(keys, values, sal)
            calls[f"attend_packed_{spec}"] = lambda s=store: attend_packed(query, s, block_size=args.block_size)
        rows.append({"length": length, "head_dim": head_dim, **harness.time_calls(calls, args.repeats)})
    return rows


def capture_model_kv(name: str, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Post-RoPE ``(queries, keys, values)`` of every layer of ``name`` on ``tokens`` tokens of the
    shipped Python-docs haystack text (offline: the embedded model and text only)."""
    from pathlib import Path

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kvcache.engine_adapters.hf.models import load_model

    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def capture(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *rest: object, **kw: object) -> object:
        captured[module.layer_idx] = (query.detach(), key.detach(), value.detach())  # type: ignore[index]
        return sdpa_attention_forward(module, query, key, value, *rest, **kw)  # type: ignore[arg-type]

    AttentionInterface.register("quant_bench_capture", capture)
    model, tokenizer = load_model(name)
    model.set_attn_implementation("quant_bench_capture")
    text = (Path(__file__).parent / "tasks" / "data" / "haystack_python_docs.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return [captured[i] for i in sorted(captured)]


def model_errors(args: argparse.Namespace) -> dict[str, object]:
    layers = capture_model_kv(args.model, args.model_tokens)
    q0, k0, _ = layers[0]
    kv_heads, tokens, head_dim = k0.shape[1], k0.shape[2], k0.shape[3]
    scaling = 1 / math.sqrt(head_dim)
    out: dict[str, object] = {"model": args.model, "layers": len(layers), "tokens": tokens, "kv_heads": kv_heads, "head_dim": head_dim}
    rows = []
    for spec in args.codecs:
        k_err, v_err, a_err, held = [], [], [], 0
        for queries, keys, values in layers:
            store = filled_store(spec, keys, values, queries, tokens, torch.Generator().manual_seed(args.seed))
            k_hat, v_hat = store.dequantize()
            last = queries[:, :, -1:]
            exact = torch.nn.functional.scaled_dot_product_attention(last, keys, values, scale=scaling, enable_gqa=True)
            got = attend_packed(last, store, scaling=scaling, block_size=args.block_size)
            k_err.append(_rel(k_hat.float() - keys, keys))
            v_err.append(_rel(v_hat.float() - values, values))
            a_err.append(_rel(got - exact, exact))
            held += store.nbytes()
        sixteen_bit = len(layers) * 2 * kv_heads * tokens * head_dim * 2
        rows.append(
            {
                "codec": spec,
                "bytes_all_layers": held,
                "bytes_per_token_all_layers": held / tokens,
                "ratio_vs_16bit": sixteen_bit / held,
                "key_rel_rms_error_mean": statistics.fmean(k_err),
                "value_rel_rms_error_mean": statistics.fmean(v_err),
                "last_query_attention_rel_error_mean": statistics.fmean(a_err),
                "last_query_attention_rel_error_max": max(a_err),
            }
        )
    out["codecs"] = rows
    return out


def _greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, cache: object) -> tuple[float, float, torch.Tensor]:
    """Prompt pass + ``new_tokens - 1`` greedy steps: (prompt seconds, decode seconds, the generated ids)."""
    from kvcache.engine_adapters.hf.compat import with_cache

    mask = torch.ones_like(ids)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(**with_cache(model, cache, input_ids=ids, attention_mask=mask, use_cache=True))
        token = out.logits[:, -1:].argmax(-1)
        first = time.perf_counter()
        generated = [token]
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(**with_cache(model, cache, input_ids=token, attention_mask=mask, use_cache=True))
            token = out.logits[:, -1:].argmax(-1)
            generated.append(token)
        end = time.perf_counter()
    return first - start, end - first, torch.cat(generated, 1)


def decode_speed(args: argparse.Namespace, recorder: harness.Recorder) -> dict[str, object]:
    """Decode tokens/s of the dense cache and of each codec (policy ``full``: every token kept, stored by the
    codec) on a real model, through the HF adapter. Per batch size the caches alternate, ``--repeats``
    rounds, in one process (so every ratio compares runs minutes apart on the same machine state); reported
    per cache: every run, the median and the min-max, the ratio of medians against the dense cache, the
    bytes held and the greedy tokens of the first run. Load averages are recorded before and after."""
    import contextlib
    from types import SimpleNamespace

    from transformers import DynamicCache

    from kvcache.engine_adapters.hf import kv_policy
    from kvcache.eval.bench import load, prompts

    model, tokenizer = load(SimpleNamespace(model=args.decode_model, dtype=None, device="cpu"))
    caches = ["full", *args.decode_codecs]
    result: dict[str, object] = {"model": args.decode_model, "prompt_tokens": args.decode_prompt,
                                 "new_tokens": args.decode_new_tokens, "repeats": args.repeats,
                                 "loadavg_before": recorder.load_before}
    cells = []
    for batch in args.decode_batches:
        ids = prompts(tokenizer, args.decode_prompt, batch)
        held: dict[str, int] = {}
        tokens: dict[str, list[list[int]]] = {}

        def measure(spec: str) -> tuple[float, float]:
            context = contextlib.nullcontext() if spec == "full" else kv_policy(model, "full", quant=spec)
            with context as session:
                cache = DynamicCache(config=model.config) if session is None else session.new_cache(args.decode_new_tokens)
                prompt_s, decode_s, generated = _greedy(model, ids, args.decode_new_tokens, cache)
                if session is not None:
                    held[spec] = int(session.stats()["kv_bytes"])
            tokens.setdefault(spec, generated.tolist())
            return prompt_s, batch * (args.decode_new_tokens - 1) / decode_s

        runs = harness.alternate(caches, args.repeats, measure, desc=f"decode batch {batch}")
        medians = {spec: harness.stats([rate for _, rate in runs[spec]])["median"] for spec in caches}
        for spec, ratio in harness.ratios(medians, "full").items():
            rates = [rate for _, rate in runs[spec]]
            cells.append({"batch": batch, "cache": spec, "decode_tok_s": rates, "decode_tok_s_median": medians[spec],
                          "decode_tok_s_min": min(rates), "decode_tok_s_max": max(rates), "ratio_vs_full": ratio,
                          "prompt_s_median": harness.stats([p for p, _ in runs[spec]])["median"],
                          "kv_bytes": held.get(spec), "tokens": tokens[spec]})
    result["cells"] = cells
    result["loadavg_after"] = harness.load_average()
    return result


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    recorder = harness.Recorder("cpu")
    result: dict[str, object] = {}
    if args.decode_model:
        result["decode"] = decode_speed(args, recorder)
    else:
        result.update({
            "kv_heads": args.kv_heads,
            "query_heads": args.query_heads,
            "memory_and_error": memory_and_error(args),
            "speed_decode_one_query": speed(args),
        })
        if args.model:
            result["real_model"] = model_errors(args)
    result = {**recorder.finish(), **result}
    if args.output:
        harness.write_report(result, Path(args.output), plot)
        print(f"wrote {args.output} and {Path(args.output).with_suffix('.png')}")
    else:
        print(json.dumps(result, indent=2))
    return 0


def plot(result: dict[str, object], path: Path) -> None:
    """Decode tokens/s per cache and batch (``--decode-model``), else attention milliseconds against cache
    length per function; medians with min-max bars."""
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if "decode" in result:
        cells = result["decode"]["cells"]  # type: ignore[index]
        labels = [f"{c['cache']}\nbatch {c['batch']}" for c in cells]
        med = [c["decode_tok_s_median"] for c in cells]
        err = [[m - c["decode_tok_s_min"] for m, c in zip(med, cells)], [c["decode_tok_s_max"] - m for m, c in zip(med, cells)]]
        ax.bar(labels, med, yerr=err, capsize=3, color=["grey" if c["cache"] == "full" else "tab:blue" for c in cells])
        ax.set_ylabel("decode tokens/s (median; bars: min-max)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    else:
        rows = result["speed_decode_one_query"]  # type: ignore[index]
        names = [k[:-3] for k in rows[0] if k.endswith("_ms")]
        lengths = [r["length"] for r in rows]
        for name in names:
            med = [r[f"{name}_ms"] for r in rows]
            err = [[m - r[f"{name}_ms_min"] for m, r in zip(med, rows)], [r[f"{name}_ms_max"] - m for m, r in zip(med, rows)]]
            ax.errorbar(lengths, med, yerr=err, marker="o", capsize=3, label=name)
        ax.set(xscale="log", yscale="log", xlabel="cache length (tokens)", ylabel="ms per decode query (median; bars: min-max)")
        ax.legend(fontsize=7)
    ax.set_title(f"KV codecs, load average before {result.get('load_before')}, after {result.get('load_after')}", fontsize=8)
    harness.save_figure(fig, path)


if __name__ == "__main__":
    from kvcache.cli import bench_main

    raise SystemExit(bench_main("quant"))
