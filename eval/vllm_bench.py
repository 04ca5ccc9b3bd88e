"""Serving benchmark of the vLLM plugin: stock vLLM and each eviction policy, same engine, same KV pool.

In the shape of vLLM's own serving benchmark (``vllm bench serve``): N requests arrive all at once or at
a Poisson rate, the engine serves them with continuous batching, and per configuration it reports
output and total tokens/s, TTFT and TPOT (p50/p99), the running requests, preemptions, and how long the
eviction itself took (compaction seconds and their share of the wall time). The requests are the
kvlong suite's (``eval/tasks/data/<task>_1k.jsonl`` / ``_2k.jsonl``: a long document with a real question
and its answers), chat-templated with the sample's answer prefix, so the accuracy of the answers is
measured too (lm-eval's protocol: the task's first ``max_gen_toks`` greedy tokens, cut at a blank line,
scored by ``kvcache.eval.tasks.utils.score``) and a faster wrong answer shows. With ``--hf-reference``
the same prompts also go through the Hugging Face adapter with the same policy and budget.

One engine serves every configuration (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; settings swapped between
runs by ``kvcache.engine_adapters.vllm.inprocess.reconfigure``; "stock" is the plugin inert, whose
scheduler runs vLLM's own code: the engine tests check it gives stock vLLM's tokens), so the pool, the
weights and the warm-up are the same. Configurations are interleaved within each repeat; medians and the
[min, max] spread over ``--repeats`` are reported (:mod:`kvcache.eval.harness`). The machine, the load
average before and after and the share of the CPU other processes used before and during each run are
recorded; the command warns when that share exceeds 15% (the machine was busy): numbers taken under load
are not evidence, so such a run is left out of the medians when the configuration has a quiet one (it
stays in the JSON).

    kvcache bench serve --policies snapkv,streaming,h2o,keyformer --budget 0.25 --output results/vllm/bench.json
    kvcache vllm-bench ...                     # the same (the older name)
    python -m kvcache.eval.vllm_bench ...      # the same

A long benchmark can be split into short quiet windows (``--repeats 1 --output w1.json``, ``w2.json``, ...)
and merged: ``kvcache bench serve --merge w1.json w2.json w3.json --output bench.json`` pools each
configuration's runs, reports medians and spreads over all of them and keeps every window's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcache.eval import harness
from kvcache.eval.harness import BUSY_SHARE  # share of the CPU used by other processes above which a run is busy
from kvcache.registry import UsageError

DEFAULT_POLICIES = ("snapkv", "streaming", "h2o", "keyformer")
TASKS = ("passkey", "multikey", "qa", "vartrack")
SUITES = {1024: "1k", 2048: "2k"}  # --prompt-tokens -> the kvlong data files
BLOCK_SIZE = 128  # vLLM's CPU default
WORKLOADS = ("kvlong", "shared-prefix")
NO_REUSE = "-no-reuse"  # shared-prefix: a configuration's twin whose requests skip reading the prefix cache


@dataclass
class BenchRequest:
    task: str
    index: int
    prompt: list[int]
    answers: list[str]
    answer_tokens: int  # the task's max_gen_toks: the tokens its answer is scored on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF folder")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="comma-separated eviction policies")
    parser.add_argument("--budget", default="0.25", help="kept tokens: a fraction of the prompt (0.25) or a count (512)")
    parser.add_argument("--workload", default="kvlong", choices=WORKLOADS,
                        help="kvlong: distinct long documents with their questions; shared-prefix: one long system "
                             "prompt (a document of facts) shared by every request, a distinct question each, each "
                             "configuration with vLLM's prefix cache reused and not (skip_reading_prefix_cache)")
    parser.add_argument("--prefix-tokens", type=int, default=1024,
                        help="shared-prefix: tokens of the shared system prompt (about)")
    parser.add_argument("--requests", type=int, default=12, help="requests per run")
    parser.add_argument("--prompt-tokens", type=int, default=1024, choices=sorted(SUITES),
                        help="kvlong suite length: 1024 (*_1k.jsonl) or 2048 (*_2k.jsonl)")
    parser.add_argument("--max-tokens", type=int, default=256, help="output tokens per request, decode-heavy setting")
    parser.add_argument("--prefill-max-tokens", type=int, default=16,
                        help="output tokens per request, prefill-heavy setting (0: skip that setting)")
    parser.add_argument("--arrivals", default="all,poisson", help="request arrival: all (at once), poisson, or both")
    parser.add_argument("--request-rate", type=float, default=0.5, help="Poisson arrival rate, requests per second")
    parser.add_argument("--pool-tokens", type=int, default=None,
                        help="KV pool size in tokens (default: 3 full requests, prompt + max tokens)")
    parser.add_argument("--batched-tokens", type=int, default=2048,
                        help="max tokens per engine step (prefill chunk; 2048 is vllm serve's CPU default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (median and spread)")
    parser.add_argument("--dtype", default="float32", help="model dtype in vLLM (float32, bfloat16)")
    parser.add_argument("--hf-reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also score the prompts through the Hugging Face adapter (same policy and budget)")
    parser.add_argument("--seed", type=int, default=0, help="Poisson arrivals and vLLM seed")
    parser.add_argument("--output", default="results/vllm/bench.json", help="JSON report; the PNG goes beside it")
    parser.add_argument("--merge", nargs="+", metavar="FILE.json", default=None,
                        help="run nothing: merge the runs of earlier reports of the same setup (e.g. one per quiet "
                             "window) into --output, medians and spreads over all their repeats")


# --------------------------------------------------------------------------------------------------
# Inputs


def check_args(args: argparse.Namespace) -> tuple[list[tuple[str, dict[str, Any] | None]], list[tuple[str, int, str]]]:
    """Configurations and scenarios from the arguments; user mistakes raise :class:`UsageError`."""
    from kvcache.budget.base import parse_budget
    from kvcache.engine_adapters.vllm import config as kvconfig

    budget = parse_budget(args.budget)
    for name, value, low in (("--requests", args.requests, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--repeats", args.repeats, 1), ("--batched-tokens", args.batched_tokens, 16),
                             ("--prefill-max-tokens", args.prefill_max_tokens, 0)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    if args.workload == "shared-prefix" and not 256 <= args.prefix_tokens <= 3072:
        raise UsageError(f"--prefix-tokens must be in [256, 3072], got {args.prefix_tokens}")
    if args.workload == "kvlong" and args.requests > 16 * len(TASKS):
        raise UsageError(f"--requests: the kvlong suite has {16 * len(TASKS)} prompts per length; ask for at most that many")
    arrivals = [a.strip() for a in args.arrivals.split(",") if a.strip()]
    if not arrivals or any(a not in ("all", "poisson") for a in arrivals):
        raise UsageError(f"--arrivals {args.arrivals!r}: use all, poisson or all,poisson")
    if "poisson" in arrivals and not args.request_rate > 0:
        raise UsageError(f"--request-rate must be > 0 requests/s for Poisson arrivals, got {args.request_rate}")
    configs: list[tuple[str, dict[str, Any] | None]] = [("stock", None)]
    for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
        settings = {"kv_policy": policy, "kv_budget": budget}
        try:
            kvconfig.parse(settings)
        except kvconfig.KVPluginError as err:
            raise UsageError(f"--policies {policy}: {err}") from None
        configs.append((policy, settings))
    if args.workload == "shared-prefix":
        configs = [c for name, settings in configs for c in ((name, settings), (name + NO_REUSE, settings))]
    scenarios = [("decode-heavy", args.max_tokens, a) for a in arrivals]
    if args.prefill_max_tokens:
        scenarios += [("prefill-heavy", args.prefill_max_tokens, "all")]
    return configs, scenarios


def load_requests(tokenizer: Any, count: int, prompt_tokens: int) -> list[BenchRequest]:
    """``count`` kvlong prompts, tasks in turn (passkey, multikey, qa, vartrack, passkey, ...)."""
    from kvcache.eval.tasks.generate import MAX_GEN_TOKS
    from kvcache.eval.tasks.utils import DATA_DIR

    rows = {}
    for task in TASKS:
        path = DATA_DIR / f"{task}_{SUITES[prompt_tokens]}.jsonl"
        if not path.exists():
            raise UsageError(f"{path} is missing; run `python -m kvcache.eval.tasks.generate` to create the kvlong suite")
        rows[task] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    requests = []
    for i in range(count):
        task = TASKS[i % len(TASKS)]
        row = rows[task][i // len(TASKS)]
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["input"]}], add_generation_prompt=True, tokenize=False
        ) + row["gen_prefix"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        requests.append(BenchRequest(task, int(row["index"]), ids, list(row["outputs"]), MAX_GEN_TOKS[task]))
    return requests


def shared_prefix_requests(tokenizer: Any, count: int, prefix_tokens: int) -> list[BenchRequest]:
    """``count`` requests sharing one system prompt of about ``prefix_tokens`` tokens (facts: the code of each of
    N boxes) and asking each for a different box's code (the answer), chat-templated with an answer prefix."""
    def facts(n: int) -> str:
        return "You answer questions about the boxes in the archive. " + " ".join(
            f"The code of box {i} is {(i * 7919 + 13) % 9973}." for i in range(n))

    n = 8
    while len(tokenizer(facts(n), add_special_tokens=False)["input_ids"]) < prefix_tokens:
        n += 8
    system = facts(n)
    requests = []
    for k in range(count):
        box = (k * 37 + 5) % n
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": f"What is the code of box {box}?"}],
            add_generation_prompt=True, tokenize=False,
        ) + f"The code of box {box} is"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        requests.append(BenchRequest("shared-prefix", box, ids, [str((box * 7919 + 13) % 9973)], 8))
    return requests


def arrival_times(count: int, mode: str, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request arrives: 0 for all, else a Poisson process."""
    if mode == "all":
        return [0.0] * count
    import random

    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def answer_score(tokenizer: Any, request: BenchRequest, tokens: list[int]) -> float:
    """lm-eval's protocol on the first ``answer_tokens`` tokens: cut at a blank line, answers found."""
    from kvcache.eval.tasks.utils import score

    text = tokenizer.decode(tokens[: request.answer_tokens], skip_special_tokens=True).split("\n\n")[0]
    return score(text, request.answers)


# --------------------------------------------------------------------------------------------------
# One run


def run_once(
    llm: Any, tokenizer: Any, requests: list[BenchRequest], arrivals: list[float], max_tokens: int,
    settings: dict[str, Any] | None, tag: str, reuse_prefix: bool = True,
) -> dict[str, Any]:
    """Serve ``requests`` (arriving at ``arrivals`` seconds) under ``settings``; per-run metrics. ``reuse_prefix``
    False: the requests skip reading vLLM's prefix cache (``SamplingParams.skip_reading_prefix_cache``)."""
    from vllm import SamplingParams

    from kvcache.engine_adapters.vllm import inprocess

    inprocess.reconfigure(llm, settings)
    llm.reset_prefix_cache()  # every run starts cold: reuse only within the run
    sched = inprocess.scheduler(llm)
    engine = llm.llm_engine
    runner = inprocess.model_runner(llm)
    total_blocks = sched.kv_cache_manager.block_pool.num_gpu_blocks - 1
    initial_free = inprocess.free_blocks(llm)
    before = dict(sched.kv_stats)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                            skip_reading_prefix_cache=not reuse_prefix)
    cached: dict[str, int] = {}
    ids = [f"{tag}-{i}" for i in range(len(requests))]
    first: dict[str, float] = {}
    finish: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    running: list[int] = []
    used: list[int] = []
    pending = 0
    others = harness.OtherCpu()
    start = time.perf_counter()
    while True:
        now = time.perf_counter() - start
        while pending < len(requests) and arrivals[pending] <= now:
            engine.add_request(ids[pending], {"prompt_token_ids": requests[pending].prompt}, params)
            pending += 1
        if not engine.has_unfinished_requests():
            if pending == len(requests):
                break
            time.sleep(max(0.0, arrivals[pending] - now))
            continue
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            produced = out.outputs[0].token_ids
            if produced and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                finish[out.request_id] = now
                tokens[out.request_id] = list(produced)
                cached[out.request_id] = out.num_cached_tokens or 0
        running.append(len(sched.running))
        used.append(total_blocks - inprocess.free_blocks(llm))
    wall = time.perf_counter() - start
    other_share = others.share()
    after = dict(sched.kv_stats)
    worker = getattr(runner, "_kvcache_state", None)
    worker_stats = dict(worker.stats) if worker is not None else {}
    generated = sum(len(t) for t in tokens.values())
    prompt_tokens = sum(len(r.prompt) for r in requests)
    ttft = [first[i] - arrivals[k] for k, i in enumerate(ids)]
    tpot = [(finish[i] - first[i]) / (len(tokens[i]) - 1) for i in ids if len(tokens[i]) > 1]
    compaction = worker_stats.get("compact_s", 0.0) + worker_stats.get("capture_s", 0.0)
    scores = [answer_score(tokenizer, r, tokens[i]) for r, i in zip(requests, ids)]
    return {
        "wall_s": wall,
        "output_tokens": generated,
        "tokens_per_s": generated / wall,
        "total_tokens_per_s": (generated + prompt_tokens) / wall,
        "request_throughput": len(requests) / wall,
        "max_running": max(running),
        "mean_running": sum(running) / len(running),
        "peak_kv_blocks": max(used),
        "pool_blocks": total_blocks,
        "steps": len(running),
        "ttft_p50_s": harness.percentile(ttft, 0.5), "ttft_p99_s": harness.percentile(ttft, 0.99),
        "ttft_mean_s": statistics.fmean(ttft),
        "tpot_p50_s": harness.percentile(tpot, 0.5), "tpot_p99_s": harness.percentile(tpot, 0.99),
        "tpot_mean_s": statistics.fmean(tpot) if tpot else float("nan"),
        "preemptions": after["preemptions"] - before["preemptions"],
        "blocks_freed": after["blocks_freed"] - before["blocks_freed"],
        "tokens_evicted": after["tokens_evicted"] - before["tokens_evicted"],
        "compactions": worker_stats.get("compactions", 0),
        "compaction_s": compaction,
        "compaction_share": compaction / wall,
        "query_capture_s": worker_stats.get("capture_s", 0.0),
        "tokens_moved": worker_stats.get("tokens_moved", 0),
        "other_cpu_share": other_share,
        "leaked_blocks": initial_free - inprocess.free_blocks(llm),
        "prefix_hit_tokens": sum(cached.values()),
        "prefix_hit_share": sum(cached.values()) / prompt_tokens,
        "accuracy": statistics.fmean(scores),
        "scores": scores,
        "running_trace": running,
    }


SUMMARISED = (
    "wall_s", "tokens_per_s", "total_tokens_per_s", "request_throughput", "max_running", "mean_running",
    "peak_kv_blocks", "steps", "ttft_p50_s", "ttft_p99_s", "ttft_mean_s", "tpot_p50_s", "tpot_p99_s", "tpot_mean_s",
    "preemptions", "blocks_freed", "tokens_evicted", "compactions", "compaction_s", "compaction_share",
    "query_capture_s", "tokens_moved", "accuracy", "leaked_blocks", "other_cpu_share", "prefix_hit_share",
)


def summarise(name: str, settings: dict[str, Any] | None, runs: list[dict[str, Any]],
              running_trace: list[int] | None = None) -> dict[str, Any]:
    """Median of every metric over the repeats, ``<metric>_spread`` = [min, max]. A run during which other
    processes used more than ``BUSY_SHARE`` of the CPU is left out of the medians when a quiet run of the
    same configuration exists (it stays in ``runs``, counted in ``busy_runs_left_out``)."""
    quiet = [r for r in runs if r["other_cpu_share"] <= BUSY_SHARE] or runs
    row: dict[str, Any] = {"name": name, "settings": settings or {"kv_policy": None}, "repeats": len(quiet),
                           "busy_runs_left_out": len(runs) - len(quiet)}
    for key in SUMMARISED:
        spread = harness.stats([r[key] for r in quiet])
        row[key] = spread["median"]
        row[f"{key}_spread"] = [spread["min"], spread["max"]]
    if running_trace is None:
        median_run = sorted(quiet, key=lambda r: r["wall_s"])[len(quiet) // 2]
        running_trace = median_run["running_trace"]
    row["running_trace"] = running_trace
    row["runs"] = [{k: v for k, v in r.items() if k not in ("running_trace",)} for r in runs]
    return row


def compare_with_stock(rows: list[dict[str, Any]]) -> None:
    """Ratios of each configuration's medians to stock's (the first row)."""
    stock = rows[0]
    for row in rows:
        row["throughput_vs_stock"] = row["tokens_per_s"] / stock["tokens_per_s"]
        row["total_throughput_vs_stock"] = row["total_tokens_per_s"] / stock["total_tokens_per_s"]
        row["concurrency_vs_stock"] = row["max_running"] / stock["max_running"]
        row["mean_concurrency_vs_stock"] = row["mean_running"] / stock["mean_running"]


SAME_SETUP = ("model", "dtype", "budget", "requests", "workload", "suite", "prompt_tokens", "pool_tokens", "block_size",
              "batched_tokens", "seed", "vllm")


def merge_reports(paths: list[str], output: Path) -> dict[str, Any]:
    """One report from several of the same setup (e.g. one repeat per quiet window): each configuration's
    runs are pooled and summarised again; the load of every window is kept (``meta.windows``)."""
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise UsageError(f"--merge {path}: cannot read a kvcache bench serve report ({err})") from None
    first = reports[0]["meta"]
    for path, report in zip(paths[1:], reports[1:]):
        differ = [k for k in SAME_SETUP if report["meta"].get(k) != first.get(k)]
        if differ:
            raise UsageError(f"--merge {path}: a different setup ({', '.join(differ)}); merge runs of one setup only")
    scenarios: dict[tuple, dict[str, Any]] = {}
    for report in reports:
        for scenario in report["scenarios"]:
            key = (scenario["setting"], scenario["arrival"], scenario["max_tokens"])
            merged = scenarios.setdefault(key, {**scenario, "configs": {}, "loads": []})
            merged["loads"] += scenario["load_1min_during"]
            for row in scenario["configs"]:
                entry = merged["configs"].setdefault(row["name"], {"settings": row["settings"], "runs": [],
                                                                   "trace": row["running_trace"]})
                entry["runs"] += row["runs"]
    accuracy_hf: dict[str, float] = {}
    for report in reports:
        accuracy_hf.update(report["meta"].get("accuracy_hf") or {})
    results = []
    for merged in scenarios.values():
        rows = [summarise(name, entry["settings"], entry["runs"], entry["trace"]) for name, entry in merged["configs"].items()]
        compare_with_stock(rows)
        for row in rows:
            if row["name"] in accuracy_hf:
                row["accuracy_hf"] = accuracy_hf[row["name"]]
        loads = merged.pop("loads")
        results.append({**merged, "configs": rows, "load_1min_during": [min(loads), max(loads)]})
    windows = [{"file": str(path), **{k: r["meta"].get(k) for k in ("load_before", "load_after", "other_cpu_share_before",
                                                                    "busy", "repeats")}}
               for path, r in zip(paths, reports)]
    meta = {
        **first, "repeats": sum(w["repeats"] for w in windows), "windows": windows,
        "load_before": first["load_before"], "load_after": reports[-1]["meta"]["load_after"],
        "busy": any(w["busy"] for w in windows), "warnings": [w for r in reports for w in r["meta"]["warnings"]],
        "accuracy_hf": accuracy_hf or None,
    }
    return {"meta": meta, "scenarios": results}


# --------------------------------------------------------------------------------------------------
# The Hugging Face reference


def hf_accuracy(model_path: str, dtype: str, tokenizer: Any, requests: list[BenchRequest],
                configs: list[tuple[str, dict[str, Any] | None]]) -> dict[str, float]:
    """Accuracy of the same prompts through the HF adapter (stock: the full cache), greedy."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvcache.engine_adapters.hf.adapter import kv_policy

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    model.eval()
    result = {}
    for name, settings in configs:
        scores = []
        for request in requests:
            ids = torch.tensor([request.prompt])
            kwargs = dict(max_new_tokens=request.answer_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            with torch.no_grad():
                if settings is None:
                    out = model.generate(ids, **kwargs)
                else:
                    with kv_policy(model, settings["kv_policy"], budget=settings["kv_budget"]):
                        out = model.generate(ids, **kwargs)
            scores.append(answer_score(tokenizer, request, out[0, ids.shape[1]:].tolist()))
        result[name] = statistics.fmean(scores)
        print(f"  HF adapter {name:10s} accuracy {result[name]:.3f}", flush=True)
    return result


# --------------------------------------------------------------------------------------------------
# Report


def plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    scenarios = report["scenarios"]
    fig, axes = plt.subplots(1, len(scenarios) + 1, figsize=(5 * (len(scenarios) + 1), 4.2))
    for ax, scenario in zip(axes, scenarios):
        rows = scenario["configs"]
        names = [r["name"] for r in rows]
        medians = [r["tokens_per_s"] for r in rows]
        low = [m - r["tokens_per_s_spread"][0] for m, r in zip(medians, rows)]
        high = [r["tokens_per_s_spread"][1] - m for m, r in zip(medians, rows)]
        colors = ["tab:gray"] + ["tab:green"] * (len(rows) - 1)
        ax.bar(names, medians, yerr=[low, high], color=colors, capsize=3)
        for i, r in enumerate(rows):
            ax.text(i, medians[i], f"{r['throughput_vs_stock']:.2f}x\nacc {r['accuracy']:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{scenario['setting']}, {scenario['arrival']} ({scenario['max_tokens']} out)", fontsize=9)
        ax.set_ylabel("output tokens/s (median, min-max)")
        ax.tick_params(axis="x", rotation=30)
    first = scenarios[0]["configs"]
    for r in first:
        axes[-1].plot(r["running_trace"], label=r["name"])
    axes[-1].set_title(f"running requests per step ({scenarios[0]['setting']}, {scenarios[0]['arrival']})", fontsize=9)
    axes[-1].set_xlabel("engine step")
    axes[-1].legend(fontsize=7)
    meta = report["meta"]
    fig.suptitle(
        f"vLLM plugin, {meta['model']} {meta['dtype']}, {meta['requests']} requests ({meta['suite']}), pool "
        f"{meta['pool_tokens']} tokens (~{meta['full_requests_in_pool']:.1f} full requests), budget {meta['budget']}, "
        f"load {meta['load_before'][0]}->{meta['load_after'][0]}", fontsize=9,
    )
    harness.save_figure(fig, path, dpi=110)


def print_table(scenario: dict[str, Any]) -> None:
    print(f"\n{scenario['setting']}, arrival {scenario['arrival']}, {scenario['max_tokens']} output tokens")
    print(f"{'config':10s} {'out tok/s':>9s} {'vs stock':>8s} {'total':>7s} {'run max/mean':>12s} {'TTFT p50/p99 s':>15s} "
          f"{'TPOT p50/p99 ms':>16s} {'preempt':>7s} {'freed':>5s} {'compact s':>9s} {'share':>6s} {'acc':>5s} {'acc HF':>6s}")
    for r in scenario["configs"]:
        hf = r.get("accuracy_hf")
        print(
            f"{r['name']:10s} {r['tokens_per_s']:9.1f} {r['throughput_vs_stock']:7.2f}x {r['total_tokens_per_s']:7.1f} "
            f"{r['max_running']:5.0f}/{r['mean_running']:5.2f} {r['ttft_p50_s']:7.2f}/{r['ttft_p99_s']:6.2f} "
            f"{1000 * r['tpot_p50_s']:7.1f}/{1000 * r['tpot_p99_s']:7.1f} {r['preemptions']:7.0f} {r['blocks_freed']:5.0f} "
            f"{r['compaction_s']:9.2f} {100 * r['compaction_share']:5.1f}% {r['accuracy']:5.2f} "
            f"{'' if hf is None else f'{hf:6.2f}'} hit {100 * r.get('prefix_hit_share', 0):3.0f}%"
        )


def write_report(report: dict[str, Any], output: Path) -> None:
    harness.write_report(report, output, plot)
    for scenario in report["scenarios"]:
        print_table(scenario)


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix != ".json":
        raise UsageError(f"--output {args.output}: name a .json file (the PNG is written beside it)")
    if args.merge:
        report = merge_reports(args.merge, output)
        write_report(report, output)
        print(f"\nmerged {len(args.merge)} reports ({report['meta']['repeats']} repeats) into {output} and "
              f"{output.with_suffix('.png')}")
        return 0
    configs, scenarios = check_args(args)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
        from vllm import LLM
    except ImportError:
        raise UsageError(
            "kvcache bench serve needs vLLM: in a checkout run `make setup-vllm` and use .venv-vllm/bin/kvcache"
        ) from None
    import torch
    from transformers import AutoTokenizer

    from kvcache.engine_adapters.hf.models import resolve_model

    recorder = harness.Recorder("cpu", sample_s=2.0)
    model = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model)
    if args.workload == "shared-prefix":
        requests = shared_prefix_requests(tokenizer, args.requests, args.prefix_tokens)
    else:
        requests = load_requests(tokenizer, args.requests, args.prompt_tokens)
    longest = max(len(r.prompt) for r in requests) + max(args.max_tokens, args.prefill_max_tokens)
    pool_tokens = args.pool_tokens or 3 * longest
    pool_blocks = -(-pool_tokens // BLOCK_SIZE)
    max_len = min(pool_blocks * BLOCK_SIZE, -(-longest // BLOCK_SIZE) * BLOCK_SIZE)
    if pool_blocks * BLOCK_SIZE < longest:
        raise UsageError(f"--pool-tokens {pool_tokens}: stock vLLM needs the pool to hold one request ({longest} tokens)")
    llm = LLM(
        model, dtype=args.dtype, enforce_eager=True, seed=args.seed, block_size=BLOCK_SIZE, max_model_len=max_len,
        num_gpu_blocks_override=pool_blocks + 1, max_num_seqs=max(args.requests, 8),
        max_num_batched_tokens=args.batched_tokens, gpu_memory_utilization=0.5,
        additional_config={"kv_policy": "full"},  # the plugin's scheduler, inert until reconfigured
    )
    # warm-up: every configuration once on one short request (layout probe, allocator, first-call costs)
    for name, settings in configs:
        run_once(llm, tokenizer, requests[:1], [0.0], 4, settings, f"warm-{name}")
    results = []
    for setting, max_tokens, arrival in scenarios:
        arrivals = arrival_times(len(requests), arrival, args.request_rate, args.seed)
        loads: list[float] = []
        settings_of = dict(configs)

        def measure(name: str) -> dict[str, Any]:
            load = harness.load_average() or [float("nan")] * 3
            tag = f"{setting}-{arrival}-{len(loads)}-{name}"  # request ids unique within the engine
            result = run_once(llm, tokenizer, requests, arrivals, max_tokens, settings_of[name], tag,
                              reuse_prefix=not name.endswith(NO_REUSE))
            result["load_before"] = load
            loads.append(load[0])
            return result

        def report_run(name: str, repeat: int, result: dict[str, Any]) -> None:
            if result["other_cpu_share"] > BUSY_SHARE:
                recorder.warn(f"machine busy during {setting}/{arrival} {name} repeat {repeat}: other processes used "
                              f"{100 * result['other_cpu_share']:.0f}% of the CPU")
            print(
                f"{setting:13s} {arrival:7s} #{repeat} {name:10s} wall {result['wall_s']:6.1f}s "
                f"out {result['tokens_per_s']:6.1f} tok/s running max {result['max_running']} "
                f"compaction {100 * result['compaction_share']:4.1f}% acc {result['accuracy']:.2f} "
                f"preempt {result['preemptions']} leaked {result['leaked_blocks']} load {result['load_before'][0]} "
                f"others {100 * result['other_cpu_share']:.0f}%",
                flush=True,
            )

        runs = harness.alternate(list(settings_of), args.repeats, measure, after_each=report_run)
        rows = [summarise(name, settings, runs[name]) for name, settings in configs]
        compare_with_stock(rows)
        results.append({
            "setting": setting, "arrival": arrival, "max_tokens": max_tokens,
            "request_rate": args.request_rate if arrival == "poisson" else None,
            "arrival_times_s": arrivals, "load_1min_during": [min(loads), max(loads)], "configs": rows,
        })
    accuracy_hf = None
    if args.hf_reference:
        print("HF adapter reference (same prompts, policy and budget):", flush=True)
        accuracy_hf = hf_accuracy(model, args.dtype, tokenizer, requests,
                                  [c for c in configs if not c[0].endswith(NO_REUSE)])
        accuracy_hf.update({name: accuracy_hf[name[: -len(NO_REUSE)]] for name, _ in configs if name.endswith(NO_REUSE)})
        for scenario in results:
            for row in scenario["configs"]:
                row["accuracy_hf"] = accuracy_hf[row["name"]]
    meta = {
        "model": args.model, "dtype": args.dtype, "budget": args.budget, "requests": args.requests,
        "workload": args.workload,
        "suite": (f"kvlong {'/'.join(TASKS)} {SUITES[args.prompt_tokens]}" if args.workload == "kvlong" else
                  f"one ~{args.prefix_tokens}-token system prompt shared by every request, one question each"),
        "prompt_tokens": [len(r.prompt) for r in requests], "request_tasks": [f"{r.task}#{r.index}" for r in requests],
        "max_tokens": args.max_tokens, "prefill_max_tokens": args.prefill_max_tokens,
        "pool_tokens": pool_blocks * BLOCK_SIZE, "pool_blocks": pool_blocks, "block_size": BLOCK_SIZE,
        "full_requests_in_pool": pool_blocks * BLOCK_SIZE / longest, "batched_tokens": args.batched_tokens,
        "repeats": args.repeats, "seed": args.seed, "vllm": vllm.__version__, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "busy_share": BUSY_SHARE, **recorder.finish(),
        "accuracy_hf": accuracy_hf,
    }
    report = {"meta": meta, "scenarios": results}
    write_report(report, output)
    if meta["warnings"]:
        recorder.warn(f"the machine was busy during this run ({len(meta['warnings'])} warnings in the JSON); "
                      "figures taken under load are not evidence")
    print(f"\nwrote {output} and {output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    from kvcache.cli import bench_main

    raise SystemExit(bench_main("serve"))
