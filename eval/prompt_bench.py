"""``kvcache bench prompt``: what does a policy's prompt pass cost over the full cache's, on the same prompt?

Every policy scores the prompt before it evicts: SnapKV with its last ``w`` queries, H2O and Keyformer with
every query (Keyformer adds Gumbel noise per query-slot pair). In one process, on the same natural-text
prompts of ``--prompt-length`` tokens, the full cache (plain transformers) and each policy at ``--budget``
run the prompt pass (``generate`` of one token; the time to the first token, read by a logits processor),
the caches alternating within each of ``--repeats`` (>= 3) rounds (:mod:`kvcache.eval.harness`). The JSON
keeps every run, the median (what the ratios use), the spread and the load before and after; a PNG shows
the ratios.

    kvcache bench prompt --prompt-length 2048 --batch 1 --policies snapkv,h2o,keyformer --repeats 3
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvcache.eval import harness
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
    from kvcache.budget import check_budget
    from kvcache.engine_adapters.hf import kv_policy, load_model
    from kvcache.eval.bench import prompts
    from kvcache.registry import check_int

    check_budget(args.budget)
    check_int("--prompt-length", args.prompt_length, 1)
    check_int("--batch", args.batch, 1)
    harness.check_repeats(args.repeats)
    model, tokenizer = load_model(args.model)
    ids = prompts(tokenizer, args.prompt_length, args.batch)
    names = ["full"] + [p.strip() for p in args.policies.split(",") if p.strip()]
    prompt_seconds(model, ids[:, :64])  # warm-up
    recorder = harness.Recorder("cpu")
    meta = {
        "question": f"prompt pass ({args.prompt_length} tokens x {args.batch}): policy at budget {args.budget} vs the "
        "full cache, same prompts", "model": args.model, "batch": args.batch, "prompt_tokens": args.prompt_length,
        "budget": args.budget, "repeats": args.repeats,
    }
    rows: dict[str, dict[str, Any]] = {}

    def measure(name: str) -> float:
        if name == "full":
            return prompt_seconds(model, ids)
        with kv_policy(model, name, budget=args.budget):
            return prompt_seconds(model, ids)

    def keep(name: str, _repeat: int, seconds: float) -> None:
        rows.setdefault(name, {"prompt_s_runs": []})["prompt_s_runs"].append(seconds)
        save({**meta, **recorder.record()}, rows, args.out)  # after every run: an interrupted benchmark keeps its runs

    harness.alternate(names, args.repeats, measure, after_each=keep, desc="prompt bench")
    report = save({**meta, **recorder.finish()}, rows, args.out)
    print(f"load average before {report['load_before']}, after {report['load_after']}")
    for name, row in rows.items():
        print(f"{name:<12} {row['prompt_s']:>8.2f} s  ({row['prompt_s_min']:.2f}-{row['prompt_s_max']:.2f})  "
              f"{row['ratio_vs_full']:.2f}x full")
    return 0


def save(meta: dict[str, Any], rows: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write the JSON (and the PNG once the full cache is measured): per cache the median prompt pass with its
    spread, and the ratio of medians against the full cache."""
    return harness.ratio_report(meta, rows, out / "prompt_bench.json", "prompt_s", "ratio_vs_full",
                                "prompt pass time / full cache's\n(median of runs; bars: min-max)")
