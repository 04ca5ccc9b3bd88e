"""``kvcache limit-bench``: does a compressed cache of C tokens decode as fast as a full cache of C tokens?

That is the limit for any eviction policy. In one process, on the same natural-text prompts:

* the full cache (plain transformers ``DynamicCache``) on prompts of ``C = budget * L`` tokens, and
* each policy on prompts of ``L`` tokens compressed to ``budget`` (so it also holds C tokens per layer),

each generating exactly ``--new-tokens`` tokens. Decode time per token is read from a logits processor
that stamps every step (the prefill is excluded): ``(t_last - t_first) / (N - 1)``. The ratio
policy / full is what matters; absolute times depend on the machine and its load. Every cache runs
``--repeats`` times (at least 3), the caches alternating within each repeat; the JSON keeps every run,
the median (what the ratios use) and the spread, and the load average before and after. Writes JSON + PNG.

    kvcache limit-bench --prompt-length 4096 --budget 0.25 --batch 4 --new-tokens 64
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
    parser.add_argument("--policies", default="snapkv,keyformer,h2o,streaming")
    parser.add_argument("--prompt-length", type=int, default=4096)
    parser.add_argument("--budget", type=float, default=0.25, help="fraction of the prompt kept")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cache (>= 3), alternating; ratios use the medians")
    parser.add_argument("--out", type=Path, default=Path("results/limit_bench"))


def decode_seconds_per_step(model: Any, ids: Any, new_tokens: int) -> tuple[float, float]:
    """(seconds per decode step after the first, prefill seconds) of one greedy generate call (a step
    decodes one token of every sequence of the batch)."""
    import torch

    from kvcache.engine_adapters.hf.generate_cli import StepClock

    clock = StepClock()
    with torch.no_grad():
        model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, logits_processor=[clock], pad_token_id=0,
        )
    prefill, steps_per_s = clock.timings()
    return 1.0 / steps_per_s, prefill


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvcache.engine_adapters.hf import kv_policy, load_model
    from kvcache.eval.bench import prompts
    from kvcache.eval.machine import load_average, machine
    from kvcache.budget import check_budget, tokens_for
    from kvcache.registry import PolicyConfigError, check_int

    check_budget(args.budget)
    check_int("--prompt-length", args.prompt_length, 1)
    check_int("--batch", args.batch, 1)
    check_int("--new-tokens (decode steps timed after the first)", args.new_tokens, 2)
    if args.repeats < 3:
        raise PolicyConfigError(f"--repeats must be >= 3 (a median and a spread), got {args.repeats}")
    model, tokenizer = load_model(args.model)
    kept = tokens_for(args.budget, args.prompt_length)
    long_ids = prompts(tokenizer, args.prompt_length, args.batch)
    short_ids = prompts(tokenizer, kept, args.batch)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    runs: list[tuple[str, Any]] = [("full", short_ids)] + [(p, long_ids) for p in policies]
    rows: dict[str, dict[str, Any]] = {}
    decode_seconds_per_step(model, short_ids[:, :64], 2)  # warm-up
    meta = {
        "question": f"decode step time: policy on {args.prompt_length}-token prompts kept to {kept} tokens vs the "
        f"full cache on {kept}-token prompts",
        "model": args.model, "batch": args.batch, "new_tokens": args.new_tokens, "budget": args.budget,
        "repeats": args.repeats, "machine": machine("cpu"), "load_before": load_average(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for name, ids in tqdm(runs, desc="caches", leave=False):
            if name == "full":
                step, prefill = decode_seconds_per_step(model, ids, args.new_tokens)
            else:
                with kv_policy(model, name, budget=args.budget) as session:
                    step, prefill = decode_seconds_per_step(model, ids, args.new_tokens)
                    kept_per_layer = session.stats()["kept_tokens_per_layer"]
            row = rows.setdefault(name, {"prompt_tokens": ids.shape[1], "decode_s_per_step_runs": [], "prefill_s_runs": []})
            row["decode_s_per_step_runs"].append(step)
            row["prefill_s_runs"].append(prefill)
            if name != "full":
                row["kept_tokens_per_layer_mean"] = sum(kept_per_layer) / len(kept_per_layer)
            meta["load_after"] = load_average()
            save(meta, rows, args.out)  # after every run, so an interrupted benchmark keeps what it measured
    print(f"load average before {meta['load_before']}, after {meta['load_after']}")
    print(f"{'cache':<12} {'prompt':>7} {'ms/step':>9} {'spread':>15} {'vs full@C':>10}")
    for name, row in rows.items():
        spread = f"{1000 * row['decode_s_per_step_min']:.1f}-{1000 * row['decode_s_per_step_max']:.1f}"
        print(f"{name:<12} {row['prompt_tokens']:>7} {1000 * row['decode_s_per_step']:>9.1f} {spread:>15} "
              f"{row['decode_ratio_vs_full_at_C']:>10.2f}")
    return 0


def save(meta: dict[str, Any], rows: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write the JSON (and PNG once the full cache is measured): per cache the median decode step and
    prefill with their spread, and the ratio of medians against the full cache at C."""
    for row in rows.values():
        runs = row["decode_s_per_step_runs"]
        row.update(
            decode_s_per_step=statistics.median(runs), decode_s_per_step_min=min(runs),
            decode_s_per_step_max=max(runs), prefill_s=statistics.median(row["prefill_s_runs"]),
        )
    if "full" in rows:
        for row in rows.values():
            row["decode_ratio_vs_full_at_C"] = row["decode_s_per_step"] / rows["full"]["decode_s_per_step"]
    report = {**meta, "rows": rows}
    (out / "limit_bench.json").write_text(json.dumps(report, indent=2))
    if "full" in rows:
        plot(report, out / "limit_bench.png")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    rows = report["rows"]
    full = rows["full"]["decode_s_per_step"]
    names = list(rows)
    ratio_bar_plot(
        names, [rows[n]["decode_ratio_vs_full_at_C"] for n in names],
        [rows[n]["decode_s_per_step_min"] / full for n in names], [rows[n]["decode_s_per_step_max"] / full for n in names],
        "decode time per step / full cache of C tokens\n(median of runs; bars: min-max)", report, path,
    )


def ratio_bar_plot(
    names: list[str], ratios: list[float], lows: list[float], highs: list[float], ylabel: str, report: dict[str, Any], path: Path
) -> None:
    """Bars of ratios against the full cache (the first name, grey) with min-max whiskers, titled with the
    report's question and load averages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spread = [[r - lo for r, lo in zip(ratios, lows)], [hi - r for r, hi in zip(ratios, highs)]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, ratios, yerr=spread, capsize=3, color=["grey"] + ["tab:blue"] * (len(names) - 1))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel(ylabel, fontsize=8)
    load = report.get("load_before"), report.get("load_after")
    ax.set_title(f"{report['question']}\nload average before {load[0]}, after {load[1]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
