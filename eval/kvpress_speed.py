"""Decode speed of kvcache beside NVIDIA's kvpress: same model, same prompt, same keep fraction, same threads.

kvpress needs transformers < 5.3, so the two libraries cannot share a process; instead each repeat runs one
process per library, the libraries alternating (kvcache, kvpress, kvcache, ...; :mod:`kvcache.eval.harness`),
each process timing the full cache and every policy on the same prompt in turn. Decode tokens/s is read from
a logits processor that stamps every step, over the ``--new-tokens`` steps after the first (the prompt pass
is reported apart). The ratio kvcache / kvpress of the medians is what matters; each library's full cache is
measured in the same process as a check that the two environments run the model at the same speed.

    kvcache bench kvpress --task qa_1k --keep 0.5 --policies snapkv streaming h2o tova \\
        --new-tokens 64 --repeats 3 --threads 2 --out results/kvpress_smollm2
    python -m kvcache.eval.kvpress_speed ...      # the same

kvpress compresses once, at the prompt (its cache grows during decode); kvcache's every-step policies
(streaming, h2o, tova) evict at every step, as their papers do. Writes ``speed.json`` and ``speed.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvcache.eval import harness
from kvcache.eval.kvpress_compare import DATA, PAIRS, ROOT, load_rows, model_loader, policy_context, prompt_ids
from kvcache.registry import UsageError

SIDES = ("kvcache", "kvpress")


def time_side(side: str, model_path: str, task: str, keep: float, policies: list[str], new_tokens: int, threads: int) -> dict:
    """One process of one library: prompt seconds and decode tokens/s of the full cache and each policy."""
    import torch
    from transformers import AutoTokenizer

    from kvcache.engine_adapters.hf.generate_cli import StepClock

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_path)
    ids = prompt_ids(tok, load_rows(task, 1)[0])
    model_for = model_loader(model_path, side)

    def timed(model, n: int) -> tuple[float, float | None]:
        clock = StepClock()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, logits_processor=[clock], pad_token_id=tok.pad_token_id or 0)
        return clock.timings()

    timed(model_for("full"), 2)  # warm-up
    rows = {}
    for policy in ["full", *policies]:
        model = model_for(policy)
        with policy_context(side, policy, keep, model):
            prompt_s, decode_tok_s = timed(model, new_tokens + 1)
        rows[policy] = {"prompt_s": prompt_s, "decode_tok_s": decode_tok_s}
    return {"side": side, "rows": rows, "prompt_tokens": int(ids.shape[1]), "torch_threads": torch.get_num_threads()}


def summarise(runs: list[dict], policies: list[str]) -> dict:
    """Per library and cache: median and spread of decode tok/s over the repeats; per policy the ratio of
    medians kvcache / kvpress (and each library's policy / its own full cache)."""
    out: dict[str, Any] = {}
    for policy in ["full", *policies]:
        entry: dict[str, Any] = {}
        for side in SIDES:
            values = [r["rows"][policy]["decode_tok_s"] for r in runs if r["side"] == side]
            prompts = [r["rows"][policy]["prompt_s"] for r in runs if r["side"] == side]
            if values:
                rate = harness.stats(values)
                entry[side] = {"decode_tok_s": rate["median"], "min": rate["min"], "max": rate["max"],
                               "iqr": [rate["q1"], rate["q3"]], "runs": values, "prompt_s": harness.stats(prompts)["median"]}
        if all(side in entry for side in SIDES):
            entry["kvcache_vs_kvpress"] = entry["kvcache"]["decode_tok_s"] / entry["kvpress"]["decode_tok_s"]
        out[policy] = entry
    for policy in policies:
        for side in SIDES:
            if side in out[policy] and side in out["full"]:
                out[policy][side]["vs_own_full"] = out[policy][side]["decode_tok_s"] / out["full"][side]["decode_tok_s"]
    return out


def plot(report: dict, path: Path) -> None:
    plt = harness.pyplot()

    names = list(report["summary"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.38
    for i, side in enumerate(SIDES):
        med = [report["summary"][n][side]["decode_tok_s"] for n in names]
        err = [[m - report["summary"][n][side]["min"] for n, m in zip(names, med)],
               [report["summary"][n][side]["max"] - m for n, m in zip(names, med)]]
        ax.bar([x + (i - 0.5) * width for x in range(len(names))], med, width, yerr=err, capsize=3, label=side)
    ax.set_xticks(range(len(names)), [n if n == "full" else f"{n}\n/{PAIRS[n]}" for n in names], fontsize=7)
    ax.set_ylabel("decode tokens/s (median; bars: min-max)", fontsize=8)
    ax.set_title(f"{report['question']}\nload before {report['load_before']}, after {report['load_after']}", fontsize=7)
    ax.legend(fontsize=8)
    harness.save_figure(fig, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--side", choices=["both", *SIDES], default="both", help=argparse.SUPPRESS)  # internal: one library's process
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF folder")
    p.add_argument("--model-path", default=None, help=argparse.SUPPRESS)  # internal: the resolved model folder
    p.add_argument("--task", default="qa_1k", help="kvlong data file whose first sample is the prompt")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--policies", nargs="+", default=["snapkv", "streaming", "h2o", "tova"], choices=list(PAIRS))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kvpress-python", default=str(ROOT / ".venv-kvpress" / "bin" / "python"))
    p.add_argument("--out", type=Path, default=Path("results/kvpress_smollm2"))


def run(a: argparse.Namespace) -> int:
    if not 0 < a.keep <= 1:
        raise UsageError("--keep must be in (0, 1]")
    harness.check_repeats(a.repeats)
    if a.new_tokens < 1 or a.threads < 1:
        raise UsageError("--new-tokens and --threads must be >= 1")
    if not (DATA / f"{a.task}.jsonl").exists():
        raise UsageError(f"unknown task data {a.task!r}; files are in {DATA}")
    if a.side != "both":
        print("RESULT " + json.dumps(time_side(a.side, a.model_path, a.task, a.keep, a.policies, a.new_tokens, a.threads)))
        return 0
    from kvcache.engine_adapters.hf import resolve_model

    if not Path(a.kvpress_python).exists():
        raise UsageError(f"{a.kvpress_python} not found: create the kvpress environment (see kvcache/eval/kvpress_compare.py)")
    common = ["--model-path", str(resolve_model(a.model)), "--task", a.task, "--keep", str(a.keep), "--policies", *a.policies,
              "--new-tokens", str(a.new_tokens), "--threads", str(a.threads)]
    recorder = harness.Recorder("cpu")
    report: dict[str, Any] = {
        "question": f"decode tok/s, {a.task} sample 0, keep {a.keep}, {a.new_tokens} tokens, batch 1, {a.threads} threads",
        "model": a.model, "runs": [],
    }

    def measure(side: str) -> dict[str, Any]:
        python = sys.executable if side == "kvcache" else a.kvpress_python
        proc = subprocess.run([python, "-m", "kvcache.eval.kvpress_speed", "--side", side, *common], cwd=ROOT,
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{side} side failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(lines[-1][7:])

    def keep(side: str, repeat: int, result: dict[str, Any]) -> None:
        report["runs"].append({**result, "repeat": repeat})
        print(f"repeat {repeat + 1}/{a.repeats} {side}: " + ", ".join(
            f"{k} {v['decode_tok_s']:.1f}" for k, v in result["rows"].items()), flush=True)

    harness.alternate(SIDES, a.repeats, measure, after_each=keep)
    report.update(recorder.finish())
    report["summary"] = summarise(report["runs"], a.policies)
    harness.write_report(report, a.out / "speed.json", plot)
    for name, entry in report["summary"].items():
        ratio = entry.get("kvcache_vs_kvpress")
        print(f"{name:<10} kvcache {entry['kvcache']['decode_tok_s']:6.1f}  kvpress {entry['kvpress']['decode_tok_s']:6.1f}  "
              f"ratio {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    from kvcache.cli import bench_main

    sys.exit(bench_main("kvpress"))
