"""Chunked-prefill eviction on the embedded model: memory held while a long prompt is read, and accuracy.

    python -m kvcache.eval.chunked_prefill memory --out results/chunked_prefill/memory.json
    python -m kvcache.eval.chunked_prefill accuracy --limit 8 --out results/chunked_prefill/accuracy.json

``memory``: one kvlong 4K pass-key prompt (chat template), each configuration in a fresh process: the full
cache, SnapKV at ``--budget`` in one pass, and SnapKV at ``--budget`` fed ``--chunks`` tokens at a time. Per run:
``peak_kv_bytes`` (the policy cache's own counter of the K/V tensors it held, after every append and
eviction; the full cache's peak is its size after the prompt), ``kv_bytes_after_prompt``, the process's
peak RSS growth over the request (``/proc/self/statm`` sampled every 2 ms, so activations count too),
prefill seconds, the answer and whether it holds the pass key. ``--cap-mib`` states a KV memory cap and
each row says whether its peak fits.

``accuracy``: lm-eval ``kvcache`` model on kvlong 1K pass key, multi-key and QA (chat template, greedy),
``--limit`` samples per task: the full cache, SnapKV at ``--budget`` in one pass, and chunked at each of
``--chunks``. Rows keep per-sample scores; the JSON is rewritten after every configuration (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ACCURACY_TASKS = "kvlong_passkey_1k,kvlong_multikey_1k,kvlong_qa_1k"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples this process's resident set every ``interval`` seconds in a thread; ``peak - start`` is the growth."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def memory_prompt(tokenizer: Any, data_file: str) -> tuple[dict, str, list[str]]:
    """The first document of a kvlong data file as chat input (with its answer prefix), and its answers."""
    path = Path(__file__).resolve().parent / "tasks" / "data" / data_file
    doc = json.loads(path.read_text().splitlines()[0])
    messages = [{"role": "user", "content": doc["input"]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + doc["gen_prefix"]
    return tokenizer(text, return_tensors="pt", add_special_tokens=False), doc["gen_prefix"], list(doc["outputs"])


def run_memory_config(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this process (``--one policy:budget:chunk``)."""
    import torch

    from kvcache.budget import parse_budget
    from kvcache.engine_adapters.hf import kv_policy, load_model
    from kvcache.engine_adapters.hf.compat import output_cache
    from kvcache.engine_adapters.hf.generate_cli import StepClock, cache_bytes

    torch.set_num_threads(args.threads)
    policy, budget, chunk = args.one.split(":")
    chunk_tokens = int(chunk) if chunk != "none" else None
    model, tokenizer = load_model(args.model)
    inputs, _, answers = memory_prompt(tokenizer, args.data_file)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    with torch.no_grad():  # warm-up on a short prompt: allocator and kernels ready before the measured run
        model.generate(**{k: v[:, -64:] for k, v in inputs.items()}, max_new_tokens=2, do_sample=False)
    context = (
        kv_policy(model, policy, parse_budget(budget), prefill_chunk=chunk_tokens)
        if policy != "full-cache" else None
    )
    session = context.__enter__() if context is not None else None
    clock = StepClock()
    try:
        with torch.no_grad(), PeakRSS() as rss:
            out = model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, logits_processor=[clock],
                return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
            )
    finally:
        if context is not None:
            context.__exit__(None, None, None)
    cache = output_cache(out)
    answer = tokenizer.decode(out.sequences[0, prompt_tokens:], skip_special_tokens=True)
    generated = int(out.sequences.shape[1] - prompt_tokens)
    per_token = 2 * model.config.num_key_value_heads * model.config.head_dim * 4 * model.config.num_hidden_layers
    if session is not None:
        stats = session.stats()
        peak, final = stats["peak_kv_bytes"], stats["kv_bytes"]
    else:  # the full cache only grows: its peak is its final size; after the prompt it held the prompt
        final = cache_bytes(cache)
        peak = final
    prefill_s, decode_tps = clock.timings()
    return {
        "config": args.one, "policy": policy, "budget": parse_budget(budget), "prefill_chunk": chunk_tokens,
        "prompt_tokens": prompt_tokens, "generated_tokens": generated,
        "peak_kv_bytes": peak, "kv_bytes_final": final,
        "full_prompt_kv_bytes": prompt_tokens * per_token,
        "rss_growth_bytes": rss.peak - rss.start,
        "prefill_s": round(prefill_s, 3), "decode_tokens_per_s": round(decode_tps, 2) if decode_tps else None,
        "answer": answer, "correct": any(a in answer for a in answers), "answers": answers,
        "torch_threads": torch.get_num_threads(),
    }


def memory(args: argparse.Namespace) -> dict[str, Any]:
    from kvcache.eval.harness import Recorder

    configs = ["full-cache:1.0:none", f"{args.policy}:{args.budget}:none"] + [
        f"{args.policy}:{args.budget}:{c}" for c in args.chunks
    ]
    recorder = Recorder("cpu")
    rows = []
    for config in configs:
        cmd = [sys.executable, "-m", "kvcache.eval.chunked_prefill", "memory", "--one", config, "--model", args.model,
               "--data-file", args.data_file, "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["fits_cap"] = row["peak_kv_bytes"] <= args.cap_mib * 2**20
        rows.append(row)
        print(f"{config}: peak KV {row['peak_kv_bytes'] / 2**20:.1f} MiB, RSS +{row['rss_growth_bytes'] / 2**20:.0f} MiB, "
              f"prefill {row['prefill_s']} s, answer {row['answer']!r} ({'right' if row['correct'] else 'wrong'})", file=sys.stderr)
    return {"model": args.model, "data_file": args.data_file, "cap_mib": args.cap_mib, "rows": rows, **recorder.finish()}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from kvcache.engine_adapters.hf import load_model
    from kvcache.eval.lm_eval_model import KVCacheLM
    from kvcache.eval.harness import machine

    from kvcache.budget import parse_budget

    torch.set_num_threads(args.threads)
    budget = parse_budget(args.budget)
    configs = [("full", 1.0, None), (args.policy, budget, None)] + [(args.policy, budget, c) for c in args.chunks]
    data: dict[str, Any] = {"model": args.model, "tasks": args.tasks, "limit": args.limit, "rows": [],
                            "machine": machine("cpu"), "nice": os.nice(0)}
    if args.out.exists():
        old = json.loads(args.out.read_text())
        if (old.get("model"), old.get("tasks"), old.get("limit")) == (args.model, args.tasks, args.limit):
            data["rows"] = old["rows"]
    done = {(r["policy"], r["budget"], r["prefill_chunk"]) for r in data["rows"]}
    model, tokenizer = load_model(args.model)
    manager = TaskManager(include_path=str(Path(__file__).resolve().parent / "tasks"))
    for policy, budget, chunk in configs:
        if (policy, budget, chunk) in done:
            continue
        extra = {} if chunk is None else {"kv_prefill_chunk": chunk}
        lm = KVCacheLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=args.batch_size,
                       kv_policy=policy, kv_budget=budget, **extra)
        start = time.perf_counter()
        try:
            res = simple_evaluate(model=lm, tasks=args.tasks.split(","), task_manager=manager, limit=args.limit,
                                  apply_chat_template=True, bootstrap_iters=0, log_samples=True, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, verbosity="WARNING")
        finally:
            lm.close()
        tasks = {}
        for task, metrics in res["results"].items():
            if "score,none" in metrics and task.startswith("kvlong_") and task.count("_") >= 2:
                samples = sorted(res.get("samples", {}).get(task, []), key=lambda s: s["doc_id"])
                tasks[task] = {"score": float(metrics["score,none"]), "n": len(samples),
                               "samples": [{"doc_id": int(s["doc_id"]), "score": float(s["score"]),
                                            "output": s["filtered_resps"][0]} for s in samples]}
        stats = [s for s in lm.kv_stats if s]
        data["rows"].append({
            "policy": policy, "budget": budget, "prefill_chunk": chunk, "tasks": tasks,
            "mean": sum(t["score"] for t in tasks.values()) / max(1, len(tasks)),
            "mean_peak_kv_bytes": _mean([s["peak_kv_bytes"] for s in stats]),
            "mean_prompt_tokens": _mean([sum(s["prompt_tokens"]) / len(s["prompt_tokens"]) for s in stats if s.get("prompt_tokens")]),
            "seconds": round(time.perf_counter() - start, 1),
        })
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))
        print(f"{policy} {budget} chunk {chunk}: mean {data['rows'][-1]['mean']:.3f} "
              f"{ {t: v['score'] for t, v in tasks.items()} }", file=sys.stderr)
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["memory", "accuracy"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policy", default="snapkv")
    p.add_argument("--budget", default="0.25", help="fraction of the prompt (0.25) or tokens per layer (256)")
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 512])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    # memory
    p.add_argument("--data-file", default="passkey_4k.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--cap-mib", type=float, default=96.0, help="KV memory cap the rows are checked against")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one memory configuration in this process
    # accuracy
    p.add_argument("--tasks", default=ACCURACY_TASKS)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args(argv)
    if args.mode == "memory" and args.one:
        print(json.dumps(run_memory_config(args)))
        return 0
    data = memory(args) if args.mode == "memory" else accuracy(args)
    if args.out is not None and args.mode == "memory":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
