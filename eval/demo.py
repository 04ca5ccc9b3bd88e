"""``kvcache demo``: the full cache beside compressed ones on a long built-in document.

The document is the first 2K-token pass-key sample of the shipped ``kvlong`` suite (a 7-digit key
hidden in prose from the Python Language Reference). Each policy answers the same question with the
same greedy decoding; the table shows whether the key survived, the KV bytes measured from the cache
tensors, and prefill/decode speed, all from this one process. Results also land in a JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvcache.eval.harness import machine
from kvcache.models import DEFAULT_MODEL

TASK_FILE = Path(__file__).resolve().parent / "tasks" / "data" / "passkey_2k.jsonl"


def load_sample(path: Path, index: int) -> dict:
    with path.open() as f:
        for i, line in enumerate(f):
            if i == index:
                return json.loads(line)
    raise IndexError(f"{path} has no sample {index}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--policies", default="snapkv,keyformer,h2o,streaming", help="comma-separated policies")
    parser.add_argument("--kv-budget", default="0.5")
    parser.add_argument("--kv-quant", default="none", help="store kept tokens quantised: none, zipcache, kivi, 'kivi:bits=4'")
    parser.add_argument("--task-file", type=Path, default=TASK_FILE, help="a kvlong JSONL file")
    parser.add_argument("--sample", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path("results/demo.json"))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvcache.engine_adapters.hf import load_model
    from kvcache.engine_adapters.hf.generate_cli import run_generation
    from kvcache.budget import parse_budget

    budget = parse_budget(args.kv_budget)
    sample = load_sample(args.task_file, args.sample)
    answers = sample["outputs"]
    model, tokenizer = load_model(args.model)
    rows = []
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for i, policy in enumerate(tqdm(policies, desc="kvcache demo", unit="policy")):
        result = run_generation(
            model, tokenizer, sample["input"], policy=policy, budget=budget, max_new_tokens=args.max_new_tokens,
            chat=True, assistant_prefix=" " + sample.get("gen_prefix", ""), with_full=(i == 0), quant=args.kv_quant,
        )
        if i == 0:
            rows.append({
                "policy": "full", "budget": 1.0, "text": result["full_text"], "kv_bytes": result["kv_bytes_full"],
                "prefill_s": result["full_prefill_s"], "decode_tokens_per_s": result["full_decode_tokens_per_s"],
                "prompt_tokens": result["prompt_tokens"], "kv_quant": "none",
            })
        rows.append({k: result[k] for k in ("policy", "budget", "kv_quant", "text", "kv_bytes", "prefill_s", "decode_tokens_per_s", "prompt_tokens", "kept_tokens_per_layer")})
    full_bytes = rows[0]["kv_bytes"]
    for row in rows:
        row["correct"] = all(a.lower() in row["text"].lower() for a in answers)
        row["kv_vs_full"] = round(row["kv_bytes"] / full_bytes, 3)
    report = {
        "machine": machine(),
        "model": args.model,
        "document": f"{args.task_file.name} sample {args.sample}, {rows[0]['prompt_tokens']} prompt tokens",
        "expected": answers,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\n{report['document']}; expected answer: {', '.join(answers)}\n")
    print(f"{'policy':<10} {'budget':>6} {'correct':>7} {'KV MiB':>8} {'vs full':>8} {'prefill s':>9} {'decode tok/s':>12}  answer")
    for row in rows:
        print(
            f"{row['policy']:<10} {row['budget']:>6} {str(row['correct']):>7} {row['kv_bytes'] / 2**20:>8.1f} "
            f"{row['kv_vs_full']:>8.2f} {row['prefill_s']:>9.2f} {row['decode_tokens_per_s'] or 0:>12.1f}  "
            f"{row['text'].strip()[:40]!r}"
        )
    print(f"\nwritten: {args.output}", file=sys.stderr)
    return 0
