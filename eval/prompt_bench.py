"""``kvcache prompt-bench``: what does a policy's prompt pass cost over the full cache's, on the same prompt?

Every policy scores the prompt before it evicts: SnapKV with its last ``w`` queries, H2O and Keyformer with
every query (Keyformer adds Gumbel noise per query-slot pair). In one process, on the same natural-text
prompts of ``--prompt-length`` tokens, the full cache (plain transformers) and each policy at ``--budget``
run the prompt pass (``generate`` of one token; the time to the first token, read by a logits processor),
the caches alternating within each of ``--repeats`` (>= 3) rounds. The JSON keeps every run, the median
(what the ratios use), the spread and the load average before and after; a PNG shows the ratios.

    kvcache prompt-bench --prompt-length 2048 --batch 1 --policies snapkv,h2o,keyformer --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from kvcache.models import DEFAULT_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--policies", default="snapkv,h2o,keyformer")
    parser.add_argument("--prompt-length", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=0.25, help="fraction of the prompt kept")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cache (>= 3), alternating; ratios use the medians")
    parser.add_argument("--out", type=Path, default=Path("results/prompt_bench"))


def prompt_seconds(model: Any, ids: Any) -> float:
    """Seconds from the call to the first token's logits (the prompt pass) of one greedy ``generate``."""
    import torch

    from kvcache.engine_adapters.hf.generate_cli import StepClock

    clock = StepClock()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                       logits_processor=[clock], pad_token_id=0)
    return clock.timings()[0]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvcache.budget import check_budget
    from kvcache.engine_adapters.hf import kv_policy, load_model
    from kvcache.eval.bench import prompts
    from kvcache.eval.machine import load_average, machine
    from kvcache.registry import PolicyConfigError, check_int

    check_budget(args.budget)
    check_int("--prompt-length", args.prompt_length, 1)
    check_int("--batch", args.batch, 1)
    if args.repeats < 3:
        raise PolicyConfigError(f"--repeats must be >= 3 (a median and a spread), got {args.repeats}")
    model, tokenizer = load_model(args.model)
    ids = prompts(tokenizer, args.prompt_length, args.batch)
    names = ["full"] + [p.strip() for p in args.policies.split(",") if p.strip()]
    prompt_seconds(model, ids[:, :64])  # warm-up
    meta = {
        "question": f"prompt pass ({args.prompt_length} tokens x {args.batch}): policy at budget {args.budget} vs the "
        "full cache, same prompts", "model": args.model, "batch": args.batch, "prompt_tokens": args.prompt_length,
        "budget": args.budget, "repeats": args.repeats, "machine": machine("cpu"), "load_before": load_average(),
    }
    rows: dict[str, dict[str, Any]] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for name in tqdm(names, desc="caches", leave=False):
            if name == "full":
                seconds = prompt_seconds(model, ids)
            else:
                with kv_policy(model, name, budget=args.budget):
                    seconds = prompt_seconds(model, ids)
            rows.setdefault(name, {"prompt_s_runs": []})["prompt_s_runs"].append(seconds)
            meta["load_after"] = load_average()
            save(meta, rows, args.out)  # after every run, so an interrupted benchmark keeps what it measured
    print(f"load average before {meta['load_before']}, after {meta['load_after']}")
    for name, row in rows.items():
        print(f"{name:<12} {row['prompt_s']:>8.2f} s  ({row['prompt_s_min']:.2f}-{row['prompt_s_max']:.2f})  "
              f"{row['ratio_vs_full']:.2f}x full")
    return 0


def save(meta: dict[str, Any], rows: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write the JSON (and the PNG): per cache the median prompt pass with its spread, and the ratio of medians
    against the full cache."""
    from kvcache.eval.limit_bench import ratio_bar_plot

    for row in rows.values():
        runs = row["prompt_s_runs"]
        row.update(prompt_s=statistics.median(runs), prompt_s_min=min(runs), prompt_s_max=max(runs))
    full = rows["full"]["prompt_s"]
    for row in rows.values():
        row["ratio_vs_full"] = row["prompt_s"] / full
    report = {**meta, "rows": rows}
    (out / "prompt_bench.json").write_text(json.dumps(report, indent=2))
    names = list(rows)
    ratio_bar_plot(
        names, [rows[n]["ratio_vs_full"] for n in names], [rows[n]["prompt_s_min"] / full for n in names],
        [rows[n]["prompt_s_max"] / full for n in names],
        "prompt pass time / full cache's\n(median of runs; bars: min-max)", report, out / "prompt_bench.png",
    )
    return report
