"""Concurrency benchmark of the vLLM plugin: a deliberately small KV pool, many long requests.

For stock vLLM and each eviction policy, on the same engine and the same pool (one engine, settings
swapped between runs with ``kvcache.engine_adapters.vllm.inprocess.reconfigure``; "stock" is the plugin inert,
whose scheduler calls vLLM's own code unchanged — the engine tests check it reproduces stock vLLM token
for token), it submits N requests at once and steps the engine, recording after every step the number
of running requests and the KV blocks in use. Reports max and mean concurrent running requests, peak
KV blocks, wall time, decode and total throughput, as JSON plus a PNG.

    python -m kvcache.eval.vllm_bench --out results/vllm          # needs kvcache[vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

DEFAULT_POLICIES = ("snapkv", "keyformer", "h2o", "streaming")


def long_prompt(tokenizer: Any, n_tokens: int, seed: int) -> list[int]:
    """A deterministic long document of about ``n_tokens`` tokens with a question at the end."""
    facts, i = [], 0
    while True:
        facts.append(f"Record {seed}-{i}: the value of key {i * 31 % 977} is {(i * 7919 + seed) % 9973}.")
        i += 1
        ids = tokenizer(" ".join(facts) + " Question: what is the value of key 31? Answer:")["input_ids"]
        if len(ids) >= n_tokens:
            return ids[-n_tokens:]


def run_config(llm: Any, prompts: list[list[int]], max_tokens: int, settings: dict[str, Any] | None) -> dict[str, Any]:
    from vllm import SamplingParams

    from kvcache.engine_adapters.vllm import inprocess

    inprocess.reconfigure(llm, settings)
    sched = inprocess.scheduler(llm)
    engine = llm.llm_engine
    total_blocks = sched.kv_cache_manager.block_pool.num_gpu_blocks - 1
    initial_free = inprocess.free_blocks(llm)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    before = dict(sched.kv_stats) if hasattr(sched, "kv_stats") else {}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": prompt}, params)
    running, used, generated, steps = [], [], 0, 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        running.append(len(sched.running))
        used.append(total_blocks - inprocess.free_blocks(llm))
        generated += sum(len(o.outputs[0].token_ids) for o in outputs if o.finished)
    wall = time.perf_counter() - start
    after = dict(sched.kv_stats) if hasattr(sched, "kv_stats") else {}
    worker = getattr(inprocess.model_runner(llm), "_kvcache_state", None)
    worker_stats = dict(worker.stats) if worker is not None else {}
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "settings": settings or {"kv_policy": None},
        "requests": len(prompts),
        "max_running": max(running),
        "mean_running": sum(running) / len(running),
        "peak_kv_blocks": max(used),
        "pool_blocks": total_blocks,
        "steps": steps,
        "wall_s": wall,
        "generated_tokens": generated,
        "decode_tokens_per_s": generated / wall,
        "total_tokens_per_s": (generated + prompt_tokens) / wall,
        "preemptions": after.get("preemptions", 0) - before.get("preemptions", 0),
        "blocks_freed_by_eviction": after.get("blocks_freed", 0) - before.get("blocks_freed", 0),
        "leaked_blocks": initial_free - inprocess.free_blocks(llm),
        "eviction_capture_s": worker_stats.get("capture_s", 0.0),  # copying queries out of the backend
        "eviction_compact_s": worker_stats.get("compact_s", 0.0),  # scoring + gathering the kept tokens
        "running_trace": running,
    }


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(names, [r["max_running"] for r in results], color="tab:blue")
    axes[0].set_title("max concurrent running requests")
    axes[1].bar(names, [r["total_tokens_per_s"] for r in results], color="tab:green")
    axes[1].set_title("throughput (prompt + generated tokens / s)")
    for r in results:
        axes[2].plot(r["running_trace"], label=r["name"])
    axes[2].set_title("running requests per engine step")
    axes[2].set_xlabel("step")
    axes[2].legend()
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF folder")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    parser.add_argument("--budget", default="0.25")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=384)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--pool-blocks", type=int, default=13, help="KV pool size in blocks of 128 tokens (one is vLLM's null block)")
    parser.add_argument("--batched-tokens", type=int, default=256, help="max tokens per step (prefill chunk)")
    parser.add_argument("--out", default="results/vllm")
    args = parser.parse_args(argv)

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import LLM

    from kvcache.engine_adapters.hf.models import resolve_model

    model = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [long_prompt(tokenizer, args.prompt_tokens, seed) for seed in range(args.requests)]
    policies = [p for p in args.policies.split(",") if p]
    llm = LLM(
        model, enforce_eager=True, dtype="float32", seed=0, max_model_len=min(2048, (args.pool_blocks - 1) * 128), gpu_memory_utilization=0.5,
        num_gpu_blocks_override=args.pool_blocks, max_num_seqs=max(args.requests, 8),
        max_num_batched_tokens=args.batched_tokens, additional_config={"kv_policy": "full"},
    )
    configs: list[tuple[str, dict[str, Any] | None]] = [("stock", None)]
    configs += [(p, {"kv_policy": p, "kv_budget": args.budget}) for p in policies]
    results = []
    for name, settings in configs:
        result = run_config(llm, prompts, args.max_tokens, settings)
        result["name"] = name
        results.append(result)
        print(
            f"{name:10s} max_running={result['max_running']:3d} mean_running={result['mean_running']:.2f} "
            f"peak_blocks={result['peak_kv_blocks']} preempt={result['preemptions']} wall={result['wall_s']:.1f}s "
            f"total_tok/s={result['total_tokens_per_s']:.1f} leaked={result['leaked_blocks']}",
            flush=True,
        )
    stock = results[0]
    for r in results:
        r["concurrency_vs_stock"] = r["max_running"] / stock["max_running"]
        r["throughput_vs_stock"] = r["total_tokens_per_s"] / stock["total_tokens_per_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model, "budget": args.budget, "requests": args.requests, "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "pool_blocks": args.pool_blocks, "block_size": 128,
        "batched_tokens": args.batched_tokens, "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch_threads": __import__("torch").get_num_threads(),
    }
    (out / "bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, out / "bench.png", f"vLLM plugin, {args.requests} x {args.prompt_tokens}-token prompts, "
         f"pool {args.pool_blocks} x 128 tokens, budget {args.budget}")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
