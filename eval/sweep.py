"""``kvcache sweep``: accuracy vs KV budget on the kvlong suite, policies x budgets (x layer budgets x codecs).

    kvcache sweep --model smollm2-135m --policies keyformer snapkv h2o streaming \\
        --budgets 0.25 0.5 --tasks kvlong_1k --limit 4 --out results/sweep_smollm2
    kvcache sweep --policies snapkv --budgets 0.5 --quants none zipcache kivi:bits=2 kivi:bits=4
    kvcache sweep --policies snapkv --budgets 0.25 --head-budgets uniform adaptive

With ``--quants`` each codec also runs alone on the full cache, and every policy x budget runs with each
codec; rows record the bytes actually held per stored token (all layers, K and V).

Answers "how much accuracy do I keep at this budget?". The model is loaded once; every configuration is
one lm-eval run of the ``kvcache`` lm-eval model (the full cache is the ``full`` policy in the same run,
and is the reference line of every plot). Writes ``sweep.json`` (a row per configuration and task, plus
each configuration's mean and its ratio to the full cache) after every configuration, so an interrupted
sweep resumes where it stopped, and ``accuracy_vs_budget.png`` (one panel per task and one for the suite
mean; one line per policy x layer budget; the full cache dashed).

Uncertainty: every row keeps its per-sample scores (doc id, score, lm-eval's prompt hash, the output), so
each task score carries a 95% interval -- Wilson's score interval (Wilson 1927) when the scores are 0/1,
``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``, else a percentile bootstrap -- and the suite
mean and its ratio to the full cache carry 95% percentile-bootstrap intervals that resample each task's
samples (stratified by task) and pair every configuration with the full cache on the same draws
(``BOOTSTRAP_ITERS`` draws, seed 0). The suite mean is over the tasks in ``--tasks``: pass only tasks the
full cache can solve (a task where the full cache scores 0 adds nothing but CPU time). Each row records
its wall ``seconds`` and ``cpu_seconds`` (process CPU time, all threads), and the file the total.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from kvcache.eval.harness import machine

DEFAULT_POLICIES = ["keyformer", "snapkv", "h2o", "streaming"]
DEFAULT_BUDGETS = [0.125, 0.25, 0.5, 0.75]
BOOTSTRAP_ITERS = 2000
Z95 = 1.959964


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF folder")
    p.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, help="evict policies (or name:key=value specs)")
    p.add_argument("--budgets", nargs="+", type=float, default=DEFAULT_BUDGETS, help="KV budgets as fractions of the prompt")
    p.add_argument("--layer-budgets", nargs="+", default=["uniform"], help="budget policies (uniform pyramid cake)")
    p.add_argument("--head-budgets", nargs="+", default=["uniform"], help="head budgets (uniform adaptive 'adaptive:alpha=0.3')")
    p.add_argument("--quants", nargs="+", default=["none"], help="quant codecs or specs (none zipcache kivi:bits=2 ...)")
    p.add_argument("--tasks", default="kvlong_1k", help="comma-separated lm-eval tasks or groups (kvlong, kvlong_2k, ...)")
    p.add_argument("--limit", type=int, default=None, help="samples per task (default: all 24)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-chat-template", action="store_true", help="plain prompts instead of the model's chat template")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("results/sweep"), help="folder for sweep.json and the PNG")
    p.add_argument("--fresh", action="store_true", help="ignore an existing sweep.json instead of resuming it")
    p.add_argument("--plot-only", action="store_true", help="only redraw the plot from sweep.json")


def _task_scores(results: dict) -> dict[str, dict[str, Any]]:
    """Per kvlong task: the mean score, the sample count and (with logged samples) each sample's record."""
    scores = {}
    for task, metrics in results["results"].items():
        if "score,none" in metrics and task.startswith("kvlong_") and task.count("_") >= 2:
            n = results.get("n-samples", {}).get(task, {}).get("effective")
            scores[task] = {"score": float(metrics["score,none"]), "n": n}
            logged = (results.get("samples") or {}).get(task)
            if logged:
                scores[task]["samples"] = [
                    {"doc_id": int(s["doc_id"]), "score": float(s["score"]), "prompt_sha256": s["prompt_hash"],
                     "output": s["filtered_resps"][0] if s.get("filtered_resps") else None}
                    for s in sorted(logged, key=lambda s: s["doc_id"])
                ]
    return scores


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion (Wilson 1927):
    ``(p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = successes / n``."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denom = 1 + z * z / n
    return max(0.0, (centre - half) / denom), min(1.0, (centre + half) / denom)


def _sample_scores(c: dict) -> dict[str, dict[int, float]] | None:
    """{task: {doc_id: score}} when every task of the row kept its samples, else None (rows from older sweeps)."""
    out = {}
    for task, v in c["tasks"].items():
        if not v.get("samples"):
            return None
        out[task] = {s["doc_id"]: s["score"] for s in v["samples"]}
    return out


def bootstrap_intervals(config: dict[str, dict[int, float]], full: dict[str, dict[int, float]] | None,
                        iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> dict[str, list[float]]:
    """95% percentile-bootstrap intervals of the suite mean (mean of per-task means) and, when ``full`` has the
    same tasks and samples, of ``mean / full_mean`` with both resampled on the same draws (paired).
    Each task's samples are resampled with replacement on their own (stratified by task)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tasks = sorted(config)
    paired = full is not None and all(t in full and set(full[t]) == set(config[t]) for t in tasks)
    means = np.zeros(iters)
    full_means = np.zeros(iters)
    for t in tasks:
        ids = sorted(config[t])
        draw = rng.integers(0, len(ids), size=(iters, len(ids)))
        means += np.array([config[t][i] for i in ids])[draw].mean(axis=1)
        if paired:
            full_means += np.array([full[t][i] for i in ids])[draw].mean(axis=1)
    means /= len(tasks)
    out = {"mean_ci95": [float(x) for x in np.percentile(means, [2.5, 97.5])]}
    if paired and (full_means > 0).all():
        out["ratio_ci95"] = [float(x) for x in np.percentile(means / (full_means / len(tasks)), [2.5, 97.5])]
    return out


FULL_KEY = ("full", 1.0, "uniform", "none", "uniform")


def config_key(c: dict) -> tuple:
    return c["policy"], c["budget"], c["layer_budget"], c.get("quant", "none"), c.get("head_budget", "uniform")


def bytes_per_stored_token(stats: list[dict]) -> float | None:
    """Bytes held per token a sequence stores in every layer: kv_bytes / (sequences x mean tokens per layer),
    summed over requests. Allocated slots (padding, growth headroom) count as held."""
    held = sum(s["kv_bytes"] for s in stats if s.get("kept_tokens_per_layer"))
    tokens = sum(s["sequences"] * sum(s["kept_tokens_per_layer"]) / len(s["kept_tokens_per_layer"])
                 for s in stats if s.get("kept_tokens_per_layer"))
    return held / tokens if tokens else None


def config_label(c: dict | tuple) -> str:
    policy, budget, layer_budget, quant, head_budget = config_key(c) if isinstance(c, dict) else c
    label = policy if layer_budget == "uniform" else f"{policy}+{layer_budget}"
    label = label if head_budget == "uniform" else f"{label}+heads:{head_budget}"
    return label if quant == "none" else f"{label}+{quant}"


def summarise(data: dict) -> None:
    """Add each configuration's suite mean and its ratio to the full cache's mean, with 95% intervals
    (per task: Wilson for 0/1 scores, else bootstrap; mean and ratio: stratified paired bootstrap)."""
    full = next((c for c in data["configs"] if config_key(c) == FULL_KEY), None)
    full_samples = _sample_scores(full) if full is not None else None
    for c in data["configs"]:
        vals = [v["score"] for v in c["tasks"].values()]
        c["mean"] = sum(vals) / len(vals) if vals else None
        for v in c["tasks"].values():
            scores = [s["score"] for s in v.get("samples") or []]
            if scores and all(x in (0.0, 1.0) for x in scores):
                v["ci95"] = list(wilson_interval(sum(scores), len(scores)))
            elif scores:
                v["ci95"] = bootstrap_intervals({"t": dict(enumerate(scores))}, None)["mean_ci95"]
        samples = _sample_scores(c)
        if samples:
            c.update(bootstrap_intervals(samples, full_samples))
    if full is not None and full["mean"]:
        for c in data["configs"]:
            c["ratio_to_full"] = c["mean"] / full["mean"] if c["mean"] is not None else None
    data["cpu_seconds_total"] = round(sum(c.get("cpu_seconds") or 0.0 for c in data["configs"]), 1)


def run_sweep(args: argparse.Namespace) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from tqdm import tqdm

    from kvcache.engine_adapters.hf import load_model
    from kvcache.budget import parse_budget
    from kvcache.eval.lm_eval_model import KVCacheLM

    out_json = args.out / "sweep.json"
    budgets = [parse_budget(b) for b in args.budgets]
    codecs = [q for q in args.quants if q != "none"]
    configs = [FULL_KEY] + [("full", 1.0, "uniform", q, "uniform") for q in codecs] + [
        (p, b, lb, q, hb) for q in args.quants for lb in args.layer_budgets for hb in args.head_budgets
        for p in args.policies for b in budgets if hb == "uniform" or q == "none"  # adaptive heads store unquantised
    ]
    configs = list(dict.fromkeys(configs))  # `--policies full --budgets 1.0` names the codec-alone rows again
    data: dict[str, Any] = {
        "model": args.model, "tasks": args.tasks, "limit": args.limit, "batch_size": args.batch_size,
        "chat_template": not args.no_chat_template, "device": args.device, "machine": machine(args.device),
        "nice": os.nice(0), "configs": [],
    }
    if out_json.exists() and not args.fresh:
        old = json.loads(out_json.read_text())
        if (old.get("model"), old.get("tasks"), old.get("limit"), old.get("chat_template")) == (
            data["model"], data["tasks"], data["limit"], data["chat_template"]
        ):
            data["configs"] = old["configs"]
    done = {config_key(c) for c in data["configs"]}
    todo = [c for c in configs if c not in done]
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device=args.device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=str(Path(__file__).resolve().parent / "tasks"))
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="sweep", unit="config")
    for policy, budget, layer_budget, quant, head_budget in todo:
        bar.set_postfix_str(f"{policy} {budget} {layer_budget} {quant} {head_budget}")
        lm = KVCacheLM(pretrained=model, tokenizer=tokenizer, device=args.device, batch_size=args.batch_size,
                       kv_policy=policy, kv_budget=budget, kv_layer_budget=layer_budget, kv_quant=quant,
                       kv_head_budget=head_budget)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            res = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                  apply_chat_template=not args.no_chat_template, bootstrap_iters=0, log_samples=True,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, verbosity="WARNING")
        finally:
            lm.close()
        kept = [s["kept_tokens_per_layer"] for s in lm.kv_stats if s.get("kept_tokens_per_layer")]
        data["configs"].append({
            "policy": policy, "budget": budget, "layer_budget": layer_budget, "quant": quant, "head_budget": head_budget,
            "tasks": _task_scores(res),
            "seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "torch_threads": torch.get_num_threads(),
            "mean_kv_bytes": (sum(s["kv_bytes"] for s in lm.kv_stats) / len(lm.kv_stats)) if lm.kv_stats else None,
            "bytes_per_stored_token": bytes_per_stored_token(lm.kv_stats),
            "requests": len(kept),
        })
        summarise(data)
        out_json.write_text(json.dumps(data, indent=1))
        bar.update(1)
    bar.close()
    return data


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = data["configs"]
    tasks = sorted({t for c in configs for t in c["tasks"]})
    panels = tasks + ["suite mean"]
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    full = next((c for c in configs if config_key(c) == FULL_KEY), None)
    lines = sorted({config_label(c) for c in configs if c is not full})
    for ax, panel in zip(axes.flat, panels):
        def value(c):
            return c["mean"] if panel == "suite mean" else c["tasks"].get(panel, {}).get("score")

        def interval(c):
            ci = c.get("mean_ci95") if panel == "suite mean" else c["tasks"].get(panel, {}).get("ci95")
            return (max(0.0, value(c) - ci[0]), max(0.0, ci[1] - value(c))) if ci else (0.0, 0.0)  # rounding: never < 0

        for label in lines:
            pts = sorted((c["budget"], value(c), interval(c)) for c in configs if config_label(c) == label and value(c) is not None)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2][0] for p in pts], [p[2][1] for p in pts]],
                            marker="o", capsize=2, label=label)
        if full is not None and value(full) is not None:
            ax.axhline(value(full), color="black", linestyle="--", label="full cache")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("KV budget (fraction of prompt)")
        ax.set_ylabel("score")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), frameon=False)
    n = data.get("limit")
    fig.suptitle(f"kvlong accuracy vs KV budget - {data['model']} ({data['tasks']}, {n or 'all'} samples/task; bars: 95% CI)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ci(c: dict, key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
    ci = c.get(key)
    return f" [{scale * ci[0]:{fmt}}, {scale * ci[1]:{fmt}}]" if ci else ""


def markdown_table(data: dict) -> str:
    """One row per configuration: per-task scores, the suite mean and its share of the full cache's (95% intervals
    in brackets where the row kept its samples), KV held, CPU seconds."""
    configs = data["configs"]
    tasks = sorted({t for c in configs for t in c["tasks"]})
    short = [t.replace("kvlong_", "") for t in tasks]
    heads = any(c.get("head_budget", "uniform") != "uniform" for c in configs)  # a column only when they vary
    head = ("| policy | layer budget | " + ("heads | " if heads else "") + "quant | budget | " + " | ".join(short)
            + " | mean [95% CI] | vs full [95% CI] | KV MiB | bytes/token | CPU s |")
    sep = "|" + "---|" * (len(tasks) + 9 + heads)
    rows = [head, sep]
    for c in sorted(configs, key=lambda c: (c["policy"] != "full", c["policy"], c["layer_budget"], c.get("head_budget", "uniform"),
                                            c.get("quant", "none"), c["budget"])):
        cells = [f"{c['tasks'][t]['score']:.2f}" if t in c["tasks"] else "" for t in tasks]
        ratio, per_token, held = c.get("ratio_to_full"), c.get("bytes_per_stored_token"), c.get("mean_kv_bytes")
        head_cell = f"{c.get('head_budget', 'uniform')} | " if heads else ""
        ratio_cell = "" if ratio is None else f"{100 * ratio:.0f}%" + _ci(c, "ratio_ci95", 100, ".0f")
        cpu = c.get("cpu_seconds")
        rows.append(f"| {c['policy']} | {c['layer_budget']} | {head_cell}{c.get('quant', 'none')} | {c['budget']} | " + " | ".join(cells)
                    + f" | {c['mean']:.3f}{_ci(c, 'mean_ci95')} | {ratio_cell} | "
                    + f"{'' if held is None else f'{held / 2**20:.1f}'} | {'' if per_token is None else f'{per_token:,.0f}'} | "
                    + f"{'' if cpu is None else f'{cpu:.0f}'} |")
    return "\n".join(rows)


def pivot_table(data: dict) -> str:
    """Policy (x layer budget x heads x codec) by budget: the share of the full cache's suite mean, 95% interval in
    brackets; the full cache's mean and interval in the header."""
    configs = [c for c in data["configs"] if config_key(c) != FULL_KEY and c.get("ratio_to_full") is not None]
    full = next((c for c in data["configs"] if config_key(c) == FULL_KEY), None)
    budgets = sorted({c["budget"] for c in configs})
    labels = sorted({config_label(c) for c in configs},
                    key=lambda lab: -max((c["ratio_to_full"] for c in configs if config_label(c) == lab), default=0))
    title = "" if full is None else f"full cache suite mean {full['mean']:.3f}{_ci(full, 'mean_ci95')}; "
    rows = [f"| policy ({title}share of it, 95% CI) | " + " | ".join(f"budget {b}" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets)]
    for label in labels:
        cells = []
        for b in budgets:
            c = next((c for c in configs if config_label(c) == label and c["budget"] == b), None)
            cells.append("" if c is None else f"{100 * c['ratio_to_full']:.0f}%" + _ci(c, "ratio_ci95", 100, ".0f"))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from kvcache.engine_adapters.hf import resolve_model

    if any(not 0 < b <= 1 for b in args.budgets):
        raise SystemExit("kvcache sweep: --budgets are fractions in (0, 1]")
    try:
        resolve_model(args.model)
    except FileNotFoundError as err:
        raise SystemExit(f"kvcache sweep: {err}") from None
    import kvcache

    for p in args.policies:
        kvcache.create("evict", p)  # clear error for a bad name before any work
    for lb in args.layer_budgets:
        kvcache.create("budget", lb)
    for q in args.quants:
        kvcache.create("quant", q)
    from kvcache.budget.heads import parse_head_budget

    args.head_budgets = [parse_head_budget(hb).spec for hb in args.head_budgets]
    if args.plot_only:
        data = json.loads((args.out / "sweep.json").read_text())
    else:
        data = run_sweep(args)
    plot(data, args.out / "accuracy_vs_budget.png")
    table = markdown_table(data)
    (args.out / "table.md").write_text(table + "\n\n" + pivot_table(data) + "\n")
    print(table)
    print(f"wrote {args.out / 'sweep.json'}, {args.out / 'accuracy_vs_budget.png'}, {args.out / 'table.md'}")
    return 0
