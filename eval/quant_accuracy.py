"""Accuracy and measured KV bytes of quantised KV caches (and eviction + quantisation) on SmolLM2-135M.

    python eval/quant_accuracy.py [--samples 4] [--max-new-tokens 10] [--out results/quant_smollm2]

For the first ``--samples`` samples of the shipped ``passkey_1k`` and ``qa_1k`` suites: greedy generation
of ``--max-new-tokens`` tokens after the chat-templated prompt plus the sample's ``gen_prefix``, under

* full (dense cache), zipcache, kivi 2-bit, kivi 4-bit -- budget 1.0 (nothing evicted);
* snapkv at budget 0.5, dense and with zipcache (eviction and quantisation composed).

A sample is correct when every expected answer is contained in the output (case-insensitive).
``kv_bytes`` is ``session.stats()["kv_bytes"]`` after generation: the bytes the cache holds (dense
tensors in the model's dtype, or the quantised stores' packed codes, parameters and full-precision
buffers). Writes ``quant_accuracy.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kvcache.eval.harness import machine

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TASKS = ("passkey_1k", "qa_1k")
# (name, eviction policy, budget, quant)
CONFIGS = (
    ("full", "full", 1.0, None),
    ("zipcache", "full", 1.0, "zipcache"),
    ("kivi-2bit", "full", 1.0, "kivi:bits=2"),
    ("kivi-4bit", "full", 1.0, "kivi:bits=4"),
    ("snapkv@0.5", "snapkv", 0.5, None),
    ("snapkv@0.5+zipcache", "snapkv", 0.5, "zipcache"),
)


def load_samples(task: str, count: int) -> list[dict]:
    path = ROOT / "eval" / "tasks" / "data" / f"{task}.jsonl"
    with path.open() as handle:
        return [json.loads(line) for line, _ in zip(handle, range(count))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=4, help="first N samples of each task")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "quant_smollm2")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from kvcache.engine_adapters.hf import kv_policy, load_model
    from kvcache.engine_adapters.hf.generate_cli import encode

    model, tokenizer = load_model(args.model)
    samples = [(task, s) for task in TASKS for s in load_samples(task, args.samples)]
    runs = []
    bar = tqdm(total=len(samples) * len(CONFIGS), desc="quant accuracy", unit="gen")
    for task, sample in samples:
        inputs = encode(tokenizer, sample["input"], True, " " + sample["gen_prefix"])
        prompt_tokens = int(inputs["input_ids"].shape[1])
        for name, policy, budget, quant in CONFIGS:
            bar.set_postfix_str(f"{task}#{sample['index']} {name}")
            start = time.perf_counter()
            with kv_policy(model, policy, budget, quant=quant) as session, torch.no_grad():
                out = model.generate(
                    **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                stats = session.stats()
            seconds = time.perf_counter() - start
            text = tokenizer.decode(out[0, prompt_tokens:], skip_special_tokens=True)
            runs.append({
                "task": task, "index": sample["index"], "config": name, "prompt_tokens": prompt_tokens,
                "text": text, "expected": sample["outputs"],
                "correct": all(a.lower() in text.lower() for a in sample["outputs"]),
                "kv_bytes": stats["kv_bytes"], "quant": stats["quant"], "seconds": round(seconds, 2),
                "kept_tokens_mean": round(sum(stats["kept_tokens_per_layer"]) / len(stats["kept_tokens_per_layer"]), 1),
            })
            bar.update(1)
    bar.close()

    summary = []
    full_bytes = {(r["task"], r["index"]): r["kv_bytes"] for r in runs if r["config"] == "full"}
    for name, policy, budget, quant in CONFIGS:
        rows = [r for r in runs if r["config"] == name]
        per_task = {t: sum(r["correct"] for r in rows if r["task"] == t) for t in TASKS}
        summary.append({
            "config": name, "policy": policy, "budget": budget, "quant": quant or "none",
            "correct": sum(r["correct"] for r in rows), "samples": len(rows),
            **{f"correct_{t}": per_task[t] for t in TASKS},
            "kv_bytes_mean": round(sum(r["kv_bytes"] for r in rows) / len(rows)),
            "kv_vs_full": round(sum(r["kv_bytes"] / full_bytes[(r["task"], r["index"])] for r in rows) / len(rows), 4),
            "seconds_mean": round(sum(r["seconds"] for r in rows) / len(rows), 2),
        })
    report = {
        "model": args.model,
        "dtype": str(next(model.parameters()).dtype),
        "machine": machine(),
        "setup": f"first {args.samples} samples of {', '.join(TASKS)}; chat template + gen_prefix; greedy, "
        f"{args.max_new_tokens} new tokens; correct = every expected answer in the output",
        "summary": summary,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "quant_accuracy.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\n{'config':<22} {'correct':>8} {'KV MiB':>8} {'vs full':>8} {'s/gen':>6}")
    for row in summary:
        print(
            f"{row['config']:<22} {row['correct']:>4}/{row['samples']:<3} {row['kv_bytes_mean'] / 2**20:>8.2f} "
            f"{row['kv_vs_full']:>8.3f} {row['seconds_mean']:>6.1f}"
        )
    print(f"\nwritten: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
