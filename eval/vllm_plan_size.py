"""What the plugin adds to each vLLM step at scale: the eviction plan's size on the wire and its planning time.

``python -m kvcache.eval.vllm_plan_size [--requests 1000] [--prompt-tokens 1000] [--repeats 5] [--out FILE]``

The scheduler plans every scheduled request each step (:meth:`Planner.plan_request`) and the plan rides to the
workers inside vLLM's own ``SchedulerOutput`` (pickled with it: vLLM's message queue, over the network when the
workers sit on other nodes). This drives the real :class:`~kvcache.engine_adapters.vllm.plan.Planner` with a
simulated scheduler load: N requests in one step at their prompt's end (every one is compacted: the largest
plan), then decode steps of all N (a one-shot policy plans nothing but the shifts; an every-step policy also
asks each request's decode query and, every k steps, a compaction). It reports the pickled bytes of each step's
plan (what the plugin adds to vLLM's message; nothing else crosses between processes) and the planning time,
the median of ``--repeats`` runs, with the machine and its load. Needs no vLLM and no model.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from kvcache.engine_adapters.vllm import config as kvconfig
from kvcache.engine_adapters.vllm.plan import Planner, StepPlan
from kvcache.eval import harness

POLICIES = ({"kv_policy": "snapkv", "kv_budget": 0.25}, {"kv_policy": "h2o", "kv_budget": 0.25})
BLOCK_SIZE = 128


def one_policy(settings: dict[str, Any], requests: int, prompt_tokens: int, decode_steps: int) -> dict[str, Any]:
    """One simulated run: the prompt step of all requests, then ``decode_steps`` decode steps of all of them."""
    cfg = kvconfig.parse(settings)
    planner = Planner(cfg, pool_tokens=requests * prompt_tokens, block_size=BLOCK_SIZE)
    ids = [f"cmpl-{i:05d}-{i * 2654435761 % 2**32:08x}" for i in range(requests)]  # vLLM-like request ids
    steps = []
    for step in range(decode_steps + 1):
        plan = StepPlan()
        start = time.perf_counter()
        for req_id in ids:
            logical = prompt_tokens + step
            planner.plan_request(plan, req_id, prompt_tokens if step == 0 else 1, logical, logical, prompt_tokens,
                                 max_new_tokens=decode_steps + 1)
        planning = time.perf_counter() - start
        steps.append({"phase": "prompt" if step == 0 else "decode", "bytes": len(pickle.dumps(plan)),
                      "planning_s": planning, "compactions": len(plan.compact), "captures": len(plan.capture)})
    decode = steps[1:]
    return {
        "prompt_step": steps[0],
        "decode_bytes_max": max(s["bytes"] for s in decode),
        "decode_bytes_median": statistics.median(s["bytes"] for s in decode),
        "decode_planning_s_median": statistics.median(s["planning_s"] for s in decode),
        "decode_compaction_steps": sum(1 for s in decode if s["compactions"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcache.eval.vllm_plan_size", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests scheduled in every step (default 1000)")
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="prompt length of each (default 1000)")
    parser.add_argument("--decode-steps", type=int, default=64, help="decode steps simulated (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per policy; medians reported (default 5)")
    parser.add_argument("--out", default="results/vllm/plan_size.json", help="JSON report")
    args = parser.parse_args(argv)
    for name in ("requests", "prompt_tokens", "decode_steps", "repeats"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    recorder = harness.Recorder("cpu")
    report: dict[str, Any] = {
        "command": " ".join(["python -m kvcache.eval.vllm_plan_size", *(argv if argv is not None else sys.argv[1:])]),
        "requests": args.requests, "prompt_tokens": args.prompt_tokens,
        "decode_steps": args.decode_steps, "block_size": BLOCK_SIZE, "policies": {},
    }
    names = [s["kv_policy"] for s in POLICIES]
    all_runs = harness.alternate(names, args.repeats, lambda name: one_policy(
        POLICIES[names.index(name)], args.requests, args.prompt_tokens, args.decode_steps))
    for settings in POLICIES:
        runs = all_runs[settings["kv_policy"]]
        prompt = runs[0]["prompt_step"]
        summary = {
            "prompt_step_bytes": prompt["bytes"],
            "prompt_step_bytes_per_request": round(prompt["bytes"] / args.requests, 1),
            "prompt_step_planning_ms": round(1e3 * statistics.median(r["prompt_step"]["planning_s"] for r in runs), 2),
            "decode_step_bytes_median": runs[0]["decode_bytes_median"],
            "decode_step_bytes_max": runs[0]["decode_bytes_max"],
            "decode_step_bytes_per_request": round(runs[0]["decode_bytes_median"] / args.requests, 1),
            "decode_step_planning_ms": round(1e3 * statistics.median(r["decode_planning_s_median"] for r in runs), 2),
            "decode_steps_with_compactions": runs[0]["decode_compaction_steps"],
        }
        report["policies"][settings["kv_policy"]] = summary
        print(f"{settings['kv_policy']}: {json.dumps(summary)}")
    report.update(recorder.finish())
    harness.write_report(report, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
