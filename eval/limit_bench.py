"""``kvcache bench limit``: does a compressed cache of C tokens decode as fast as a full cache of C tokens?

That is the limit for any eviction policy. In one process, on the same natural-text prompts:

* the full cache (plain transformers ``DynamicCache``) on prompts of ``C = budget * L`` tokens, and
* each policy on prompts of ``L`` tokens compressed to ``budget`` (so it also holds C tokens per layer),

each generating exactly ``--new-tokens`` tokens. Decode time per token is read from a logits processor
that stamps every step (the prefill is excluded): ``(t_last - t_first) / (N - 1)``. The ratio
policy / full is what matters; absolute times depend on the machine and its load. Every cache runs
``--repeats`` times (at least 3), the caches alternating within each repeat (:mod:`kvcache.eval.harness`);
the JSON keeps every run, the median (what the ratios use) and the spread, and the load before and after.
Writes JSON + PNG.

    kvcache bench limit --prompt-length 4096 --budget 0.25 --batch 4 --new-tokens 64
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvcache.eval import harness
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
    from kvcache.engine_adapters.hf import kv_policy, load_model
    from kvcache.eval.bench import prompts
    from kvcache.budget import check_budget, tokens_for
    from kvcache.registry import check_int

    check_budget(args.budget)
    check_int("--prompt-length", args.prompt_length, 1)
    check_int("--batch", args.batch, 1)
    check_int("--new-tokens (decode steps timed after the first)", args.new_tokens, 2)
    harness.check_repeats(args.repeats)
    model, tokenizer = load_model(args.model)
    kept = tokens_for(args.budget, args.prompt_length)
    long_ids = prompts(tokenizer, args.prompt_length, args.batch)
    short_ids = prompts(tokenizer, kept, args.batch)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    prompt_ids = {"full": short_ids, **{p: long_ids for p in policies}}
    rows: dict[str, dict[str, Any]] = {}
    decode_seconds_per_step(model, short_ids[:, :64], 2)  # warm-up
    recorder = harness.Recorder("cpu")
    meta = {
        "question": f"decode step time: policy on {args.prompt_length}-token prompts kept to {kept} tokens vs the "
        f"full cache on {kept}-token prompts",
        "model": args.model, "batch": args.batch, "new_tokens": args.new_tokens, "budget": args.budget,
        "repeats": args.repeats,
    }

    def measure(name: str) -> tuple[float, float, list[int] | None]:
        if name == "full":
            return (*decode_seconds_per_step(model, short_ids, args.new_tokens), None)
        with kv_policy(model, name, budget=args.budget) as session:
            step, prefill = decode_seconds_per_step(model, long_ids, args.new_tokens)
            return step, prefill, session.stats()["kept_tokens_per_layer"]

    def keep(name: str, _repeat: int, result: tuple[float, float, list[int] | None]) -> None:
        step, prefill, kept_per_layer = result
        row = rows.setdefault(name, {"prompt_tokens": prompt_ids[name].shape[1], "decode_s_per_step_runs": [],
                                     "prefill_s_runs": []})
        row["decode_s_per_step_runs"].append(step)
        row["prefill_s_runs"].append(prefill)
        if kept_per_layer is not None:
            row["kept_tokens_per_layer_mean"] = sum(kept_per_layer) / len(kept_per_layer)
        save({**meta, **recorder.record()}, rows, args.out)  # after every run: an interrupted benchmark keeps its runs

    harness.alternate(list(prompt_ids), args.repeats, measure, after_each=keep, desc="limit bench")
    report = save({**meta, **recorder.finish()}, rows, args.out)
    print(f"load average before {report['load_before']}, after {report['load_after']}")
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
        row.update(harness.spread("prefill_s", row["prefill_s_runs"]))
    return harness.ratio_report(meta, rows, out / "limit_bench.json", "decode_s_per_step", "decode_ratio_vs_full_at_C",
                                "decode time per step / full cache of C tokens\n(median of runs; bars: min-max)")
