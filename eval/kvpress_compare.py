"""kvcache beside NVIDIA's kvpress: same model, same prompts, same samples, same keep fractions, for the policies both have.

    python -m kvcache.eval.kvpress_compare --tasks passkey_1k multikey_1k qa_1k --limit 24 --keep 0.25 0.5 \\
        --policies snapkv streaming h2o tova knorm expected-attention snapkv+adakv --out results/kvpress_smollm2
    # kvcache's side taken from a kvcache sweep on the same samples (checked by prompt hash) instead of rerun:
    python -m kvcache.eval.kvpress_compare ... --kvcache-from results/sweep_kvlong_1k/sweep.json --no-timing

kvpress (PyPI ``kvpress``) needs transformers < 5.3, so it lives in its own virtual environment; this
script runs kvcache in the current one and re-runs itself there with ``--side kvpress`` (``--kvpress-python``,
default ``.venv-kvpress/bin/python``). Set that environment up once with::

    python -m venv .venv-kvpress
    .venv-kvpress/bin/pip install torch==2.13.0 kvpress==0.5.5   # pulls transformers 5.2
    .venv-kvpress/bin/pip install --no-deps -e .                  # kvcache's task data and scoring

Pairs (``PAIRS``): kvcache ``snapkv`` <-> ``SnapKVPress``, ``streaming`` <-> ``StreamingLLMPress``, ``h2o`` <->
``ObservedAttentionPress`` (eager attention), ``tova`` <-> ``TOVAPress``, ``knorm`` <-> ``KnormPress``,
``expected-attention`` <-> ``ExpectedAttentionPress``, ``snapkv+adakv`` (snapkv with ``head_budget="adaptive"``)
<-> ``AdaKVPress(SnapKVPress)``; ``compression_ratio = 1 - keep``. Each library runs with its own default
hyperparameters. Both compress the whole prompt (chat template + gen_prefix, as lm-eval formats the kvlong
tasks) inside ``model.generate``; kvpress compresses at the prefill only. Generation is greedy, at most the
task's ``max_gen_toks`` tokens, cut at the first blank line as lm-eval's ``until`` does, so a sample scores
the same here as in ``kvcache sweep --batch-size 1``.

Measured per pair, keep and task: accuracy (the kvlong score) with every sample's score, output and prompt
hash; unless ``--no-timing``, time to first token and decode tokens/s on the first sample (``generate`` of 1 vs
``--new-tokens`` tokens); KV bytes held after the first sample's generation (tensor sizes of the cache; for
AdaKVPress the dense cache, as kvpress masks rather than drops). Summary: per pair and keep, each library's
suite mean (mean of task scores), the paired difference kvcache - kvpress with a 95% bootstrap interval over
the same samples, and kvpress's best press at each keep. Rows are appended to ``rows_<side>.jsonl`` in
``--out`` as they finish, so a stopped run resumes. Writes ``kvpress.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvcache.eval.tasks.utils import score

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "eval" / "tasks" / "data"
PAIRS = {"snapkv": "SnapKVPress", "streaming": "StreamingLLMPress", "h2o": "ObservedAttentionPress", "tova": "TOVAPress",
         "knorm": "KnormPress", "expected-attention": "ExpectedAttentionPress", "snapkv+adakv": "AdaKVPress(SnapKVPress)"}
MAX_NEW = {"passkey": 16, "multikey": 16, "multivalue": 48, "vartrack": 40, "freqword": 24, "qa": 12}
STOP = "\n\n"  # the kvlong tasks' ``until``
BOOTSTRAP_ITERS = 2000


def load_rows(task: str, limit: int) -> list[dict]:
    lines = (DATA / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:limit]]


def prompt_text(tokenizer, row: dict) -> str:
    """The prompt as lm-eval renders a kvlong doc with the chat template: the gen_prefix continues the assistant turn."""
    return tokenizer.apply_chat_template([{"role": "user", "content": row["input"]}, {"role": "assistant", "content": row["gen_prefix"]}],
                                         tokenize=False, continue_final_message=True)


def prompt_ids(tokenizer, row: dict):
    return tokenizer([prompt_text(tokenizer, row)], return_tensors="pt", add_special_tokens=False).input_ids


def cache_bytes(cache) -> int:
    import torch

    tensors = []
    for layer in getattr(cache, "layers", None) or []:
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    tensors += list(getattr(cache, "key_cache", []) or []) + list(getattr(cache, "value_cache", []) or [])
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _press(policy: str, keep: float):
    import kvpress

    ratio = round(1.0 - keep, 6)
    if policy == "snapkv+adakv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    return getattr(kvpress, PAIRS[policy])(compression_ratio=ratio)


def policy_context(side: str, policy: str, keep: float, model):
    """``side``'s compression of ``model`` for ``policy`` at ``keep`` (a ``with`` context; a no-op for ``full``):
    kvcache's ``kv_policy`` (``snapkv+adakv``: snapkv with adaptive head budgets) or kvpress's press."""
    import contextlib

    if policy == "full":
        return contextlib.nullcontext(None)
    if side == "kvcache":
        from kvcache.engine_adapters.hf import kv_policy

        name, heads = ("snapkv", "adaptive") if policy == "snapkv+adakv" else (policy, "uniform")
        return kv_policy(model, name, budget=keep, head_budget=heads)
    return _press(policy, keep)(model)


def model_loader(model_path: str, side: str):
    """``load(policy)``: the model in the attention implementation ``side``'s ``policy`` needs (kvpress's
    ObservedAttentionPress reads eager attention weights; everything else SDPA), each loaded once."""
    import torch
    from transformers import AutoModelForCausalLM

    models: dict[str, Any] = {}

    def load(policy: str):
        attn = "eager" if (side == "kvpress" and policy == "h2o") else "sdpa"
        if attn not in models:
            models[attn] = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=attn).eval()
        return models[attn]

    return load


def _row_key(r: dict) -> tuple:
    return r["policy"], float(r["keep"]), r["task"]


def _read_rows(path: Path, limit: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("n") == limit]


def run_side(side: str, model_path: str, tasks: list[str], limit: int, keeps: list[float], policies: list[str],
             threads: int | None, timing: bool, rows_file: Path | None = None) -> dict:
    """One library's rows: for every policy, keep and task, accuracy per sample; speed and KV bytes on the first sample."""
    import torch
    from transformers import AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_path)
    model_for = model_loader(model_path, side)
    rows = _read_rows(rows_file, limit) if rows_file else []
    done = {_row_key(r) for r in rows}

    def gen(model, ids, n, exact: bool):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n if exact else None,
                                 do_sample=False, return_dict_in_generate=True, pad_token_id=tok.pad_token_id or 0)
        return time.perf_counter() - start, out

    plan = [("full", 1.0)] + [(p, k) for k in keeps for p in policies]
    for policy, keep in plan:
        for task in tasks:
            if (policy, keep, task) in done:
                continue
            model = model_for(policy)
            data = load_rows(task, limit)
            n = MAX_NEW[task.rsplit("_", 1)[0]]
            samples, kv, ttft, decode = [], None, None, None
            cpu_start = time.process_time()
            with policy_context(side, policy, keep, model) as session:
                for i, row in enumerate(data):
                    text_in = prompt_text(tok, row)
                    ids = prompt_ids(tok, row)
                    if i == 0 and timing:
                        ttft, _ = gen(model, ids, 1, exact=True)
                        total, _ = gen(model, ids, n, exact=True)
                        decode = (n - 1) / max(total - ttft, 1e-9)
                    _, out = gen(model, ids, n, exact=False)
                    if i == 0:
                        kv = session.stats()["kv_bytes"] if (side == "kvcache" and session is not None) else cache_bytes(out.past_key_values)
                    text = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).split(STOP)[0]
                    samples.append({"doc_id": i, "score": score(text, row["outputs"]), "output": text,
                                    "prompt_sha256": hashlib.sha256(text_in.encode("utf-8")).hexdigest()})
            row_out = {"library": side, "policy": policy, "task": task, "keep": keep, "n": len(samples),
                       "score": sum(s["score"] for s in samples) / len(samples), "samples": samples,
                       "ttft_s": ttft, "decode_tok_s": decode, "kv_bytes": kv, "prompt_tokens": int(prompt_ids(tok, data[0]).shape[1]),
                       "cpu_seconds": round(time.process_time() - cpu_start, 1)}
            rows.append(row_out)
            if rows_file:
                with rows_file.open("a") as f:
                    f.write(json.dumps(row_out) + "\n")
            print(json.dumps({k: v for k, v in row_out.items() if k != "samples"}), flush=True)
    import importlib.metadata as md

    versions = {name: md.version(name) for name in ("torch", "transformers", *(["kvpress"] if side == "kvpress" else []))}
    return {"side": side, "rows": rows, "torch_threads": torch.get_num_threads(), "versions": versions}


def rows_from_sweep(sweep_json: Path, tasks: list[str], limit: int, keeps: list[float], policies: list[str]) -> dict:
    """kvcache's rows taken from a ``kvcache sweep --batch-size 1`` on the same samples (its per-sample records)."""
    data = json.loads(sweep_json.read_text())
    by_key = {(c["policy"], float(c["budget"]), c["layer_budget"], c.get("quant", "none"), c.get("head_budget", "uniform")): c
              for c in data["configs"]}
    rows = []
    for policy, keep in [("full", 1.0)] + [(p, k) for k in keeps for p in policies]:
        name, heads = ("snapkv", "adaptive") if policy == "snapkv+adakv" else (policy, "uniform")
        c = by_key.get((name, float(keep), "uniform", "none", heads))
        if c is None:
            continue
        for task in tasks:
            t = c["tasks"].get(f"kvlong_{task}")
            if not t or not t.get("samples") or len(t["samples"]) < limit:
                continue
            samples = [s for s in t["samples"] if s["doc_id"] < limit]
            rows.append({"library": "kvcache", "policy": policy, "task": task, "keep": keep, "n": len(samples),
                         "score": sum(s["score"] for s in samples) / len(samples), "samples": samples, "ttft_s": None,
                         "decode_tok_s": None, "kv_bytes": None, "from_sweep": str(sweep_json)})
    return {"side": "kvcache", "rows": rows, "from_sweep": str(sweep_json), "sweep_machine": data.get("machine")}


def summarise(result: dict) -> dict:
    """Per (policy, keep): each library's suite mean over the tasks both ran, the paired difference kvcache - kvpress
    with a 95% percentile-bootstrap interval (each task's samples resampled, the same draws for both libraries),
    and whether every prompt hash matched; per keep, kvpress's best press and kvcache's best policy."""
    import numpy as np

    ours = {_row_key(r): r for r in result["kvcache"]["rows"]}
    theirs = {_row_key(r): r for r in result["kvpress"]["rows"]}
    pairs = sorted({(p, k) for p, k, _ in ours} & {(p, k) for p, k, _ in theirs}, key=lambda x: (-x[1], x[0]))
    out = []
    for policy, keep in pairs:
        tasks = [t for t in result["tasks"] if (policy, keep, t) in ours and (policy, keep, t) in theirs]
        if not tasks:
            continue
        rng = np.random.default_rng(0)
        diffs = np.zeros(BOOTSTRAP_ITERS)
        same_prompts = True
        for t in tasks:
            a = {s["doc_id"]: s for s in ours[(policy, keep, t)]["samples"]}
            b = {s["doc_id"]: s for s in theirs[(policy, keep, t)]["samples"]}
            ids = sorted(set(a) & set(b))
            same_prompts &= all(a[i].get("prompt_sha256") == b[i].get("prompt_sha256") for i in ids)
            d = np.array([a[i]["score"] - b[i]["score"] for i in ids])
            diffs += d[rng.integers(0, len(ids), size=(BOOTSTRAP_ITERS, len(ids)))].mean(axis=1)
        diffs /= len(tasks)
        mean_a = sum(ours[(policy, keep, t)]["score"] for t in tasks) / len(tasks)
        mean_b = sum(theirs[(policy, keep, t)]["score"] for t in tasks) / len(tasks)
        out.append({"policy": policy, "keep": keep, "tasks": tasks, "kvcache_mean": mean_a, "kvpress_mean": mean_b,
                    "diff": mean_a - mean_b, "diff_ci95": [float(x) for x in np.percentile(diffs, [2.5, 97.5])],
                    "same_prompts": same_prompts})
    best = {}
    for keep in sorted({s["keep"] for s in out if s["policy"] != "full"}):
        at = [s for s in out if s["keep"] == keep and s["policy"] != "full"]
        bp = max(at, key=lambda s: s["kvpress_mean"])
        bc = max(at, key=lambda s: s["kvcache_mean"])
        best[str(keep)] = {"kvpress_best": PAIRS[bp["policy"]], "kvpress_best_mean": bp["kvpress_mean"],
                           "kvcache_best": bc["policy"], "kvcache_best_mean": bc["kvcache_mean"]}
    return {"pairs": out, "best_at_keep": best}


def markdown_table(result: dict) -> str:
    summary = result.get("summary") or summarise(result)
    lines = ["| policy (kvcache / kvpress) | keep | suite mean kvcache | suite mean kvpress | kvcache - kvpress [95% CI] | same prompts |",
             "|---|---|---|---|---|---|"]
    for s in summary["pairs"]:
        name = "full" if s["policy"] == "full" else f"{s['policy']} / {PAIRS[s['policy']]}"
        lo, hi = s["diff_ci95"]
        lines.append(f"| {name} | {s['keep']} | {s['kvcache_mean']:.3f} | {s['kvpress_mean']:.3f} | {s['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                     f"{'yes' if s['same_prompts'] else 'NO'} |")
    lines += ["", "| policy (kvcache / kvpress) | keep | task | acc kvcache | acc kvpress | decode tok/s kvcache | decode tok/s kvpress | "
              "KV KiB kvcache | KV KiB kvpress |", "|---|---|---|---|---|---|---|---|---|"]
    ours = {_row_key(r): r for r in result["kvcache"]["rows"]}
    theirs = {_row_key(r): r for r in result["kvpress"]["rows"]}

    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    for key in sorted(ours, key=lambda k: (-k[1], k[0], k[2])):
        if key not in theirs:
            continue
        a, b = ours[key], theirs[key]
        name = "full" if key[0] == "full" else f"{key[0]} / {PAIRS[key[0]]}"
        lines.append(f"| {name} | {a['keep']} | {key[2]} | {a['score']:.2f} | {b['score']:.2f} | {cell(a['decode_tok_s'], '.1f')} | "
                     f"{cell(b['decode_tok_s'], '.1f')} | {cell(a['kv_bytes'] and a['kv_bytes'] / 1024, '.0f')} | "
                     f"{cell(b['kv_bytes'] and b['kv_bytes'] / 1024, '.0f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=["both", "kvcache", "kvpress"], default="both")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF folder")
    p.add_argument("--model-path", default=None, help="(internal) resolved model folder")
    p.add_argument("--tasks", nargs="+", default=["passkey_1k", "multikey_1k"], help="kvlong data files, e.g. passkey_1k")
    p.add_argument("--limit", type=int, default=3)
    p.add_argument("--keep", nargs="+", type=float, default=[0.5], help="fractions of the prompt's KV kept")
    p.add_argument("--policies", nargs="+", default=["snapkv", "streaming"], choices=list(PAIRS))
    p.add_argument("--threads", type=int, default=None, help="torch threads on both sides")
    p.add_argument("--no-timing", action="store_true", help="skip the first-sample speed runs (accuracy only)")
    p.add_argument("--kvcache-from", type=Path, default=None,
                   help="take kvcache's rows from this sweep.json (kvcache sweep --batch-size 1, same tasks and samples)")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: summarise the rows already in --out (rows_kvpress.jsonl, rows_kvcache.jsonl or --kvcache-from)")
    p.add_argument("--kvpress-python", default=str(ROOT / ".venv-kvpress" / "bin" / "python"))
    p.add_argument("--out", type=Path, default=Path("results/kvpress"))
    a = p.parse_args(argv)
    if any(not 0 < k <= 1 for k in a.keep):
        p.error("--keep must be in (0, 1]")
    for t in a.tasks:
        if not (DATA / f"{t}.jsonl").exists():
            p.error(f"unknown task data {t!r}; files are in {DATA}")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.side != "both":
        result = run_side(a.side, a.model_path, a.tasks, a.limit, a.keep, a.policies, a.threads, not a.no_timing,
                          a.out / f"rows_{a.side}.jsonl")
        print("RESULT " + json.dumps(result))
        return 0
    from kvcache.engine_adapters.hf import resolve_model
    from kvcache.eval.harness import machine

    path = str(resolve_model(a.model))
    if not Path(a.kvpress_python).exists():
        raise SystemExit(f"{a.kvpress_python} not found: create the kvpress environment (see this script's docstring)")
    common = ["--model-path", path, "--tasks", *a.tasks, "--limit", str(a.limit), "--keep", *map(str, a.keep),
              "--policies", *a.policies, "--out", str(a.out.resolve())]
    if a.threads:
        common += ["--threads", str(a.threads)]
    if a.no_timing:
        common.append("--no-timing")
    result: dict[str, Any] = {"model": a.model, "keep": a.keep, "tasks": a.tasks, "limit": a.limit, "machine": machine("cpu")}
    if a.kvcache_from:
        result["kvcache"] = rows_from_sweep(a.kvcache_from, a.tasks, a.limit, a.keep, a.policies)
    elif a.collect:
        result["kvcache"] = {"side": "kvcache", "rows": _read_rows(a.out / "rows_kvcache.jsonl", a.limit)}
    else:
        result["kvcache"] = run_side("kvcache", path, a.tasks, a.limit, a.keep, a.policies, a.threads, not a.no_timing,
                                     a.out / "rows_kvcache.jsonl")
    if a.collect:
        code = "import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in ('torch', 'transformers', 'kvpress')}))"
        versions = json.loads(subprocess.run([a.kvpress_python, "-c", code], capture_output=True, text=True, check=True).stdout)
        result["kvpress"] = {"side": "kvpress", "rows": _read_rows(a.out / "rows_kvpress.jsonl", a.limit), "versions": versions}
    else:
        proc = subprocess.run([a.kvpress_python, "-m", "kvcache.eval.kvpress_compare", "--side", "kvpress", *common], cwd=ROOT,
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"kvpress side failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result["kvpress"] = json.loads(lines[-1][7:])
    result["summary"] = summarise(result)
    result["cpu_seconds_total"] = round(sum(r.get("cpu_seconds") or 0.0 for side in ("kvcache", "kvpress") for r in result[side]["rows"]), 1)
    (a.out / "kvpress.json").write_text(json.dumps(result, indent=1))
    table = markdown_table(result)
    (a.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
