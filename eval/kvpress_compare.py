"""kvcache beside NVIDIA's kvpress: same model, same prompts, same keep fractions, for the policies both have.

    python -m kvcache.eval.kvpress_compare --tasks passkey_1k multikey_1k --limit 3 --keep 0.5 --out results/kvpress_smollm2

kvpress (PyPI ``kvpress``) needs transformers < 5.3, so it lives in its own virtual environment; this
script runs kvcache in the current one and re-runs itself there with ``--side kvpress`` (``--kvpress-python``,
default ``.venv-kvpress/bin/python``). Set that environment up once with::

    python -m venv .venv-kvpress
    .venv-kvpress/bin/pip install torch==2.13.0 'transformers<5.3' kvpress      # or reuse the main torch
                                                                                # through a .pth file

Pairs: kvcache ``snapkv`` <-> ``SnapKVPress``, ``streaming`` <-> ``StreamingLLMPress``, ``h2o`` <->
``ObservedAttentionPress`` (eager attention); ``compression_ratio = 1 - keep``. Each library runs with its
own default hyperparameters. Both compress the whole prompt (chat template + gen_prefix, as lm-eval
formats the kvlong tasks) inside ``model.generate``; kvpress compresses at the prefill only.

Measured per pair and task: accuracy (the kvlong score), time to first token and decode tokens/s on the
first sample (``generate`` of 1 vs ``--new-tokens`` tokens), and KV bytes held after generation (tensor
sizes of the cache). Writes ``kvpress.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvcache.eval.tasks.utils import score

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "eval" / "tasks" / "data"
PAIRS = {"snapkv": "SnapKVPress", "streaming": "StreamingLLMPress", "h2o": "ObservedAttentionPress"}
MAX_NEW = {"passkey": 16, "multikey": 16, "multivalue": 48, "vartrack": 40, "freqword": 24, "qa": 12}


def load_rows(task: str, limit: int) -> list[dict]:
    lines = (DATA / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:limit]]


def prompt_ids(tokenizer, row: dict):
    text = tokenizer.apply_chat_template([{"role": "user", "content": row["input"]}], tokenize=False, add_generation_prompt=True)
    return tokenizer([text + row["gen_prefix"]], return_tensors="pt", add_special_tokens=False).input_ids


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


def run_side(side: str, model_path: str, tasks: list[str], limit: int, keep: float, policies: list[str], threads: int | None) -> dict:
    """One library's rows: for every policy and task, accuracy; speed and KV bytes on the first sample."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_path)
    models: dict[str, Any] = {}

    def model_for(attn: str):
        if attn not in models:
            models[attn] = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=attn).eval()
        return models[attn]

    def context(policy: str, model):
        if policy == "full":
            return contextlib.nullcontext(None)
        if side == "kvcache":
            from kvcache.engine_adapters.hf import kv_policy

            return kv_policy(model, policy, budget=keep)
        import kvpress

        press = getattr(kvpress, PAIRS[policy])(compression_ratio=round(1.0 - keep, 6))
        return press(model)

    def gen(model, ids, n):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, return_dict_in_generate=True, pad_token_id=tok.pad_token_id or 0)
        return time.perf_counter() - start, out

    rows = []
    for policy in ["full", *policies]:
        attn = "eager" if (side == "kvpress" and policy == "h2o") else "sdpa"
        model = model_for(attn)
        for task in tasks:
            data = load_rows(task, limit)
            n = MAX_NEW[task.rsplit("_", 1)[0]]
            scores, kv, ttft, decode = [], None, None, None
            with context(policy, model) as session:
                for i, row in enumerate(data):
                    ids = prompt_ids(tok, row)
                    if i == 0:
                        ttft, _ = gen(model, ids, 1)
                        total, out = gen(model, ids, n)
                        decode = (n - 1) / max(total - ttft, 1e-9)
                        kv = session.stats()["kv_bytes"] if (side == "kvcache" and session is not None) else cache_bytes(out.past_key_values)
                    with torch.no_grad():
                        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                             pad_token_id=tok.pad_token_id or 0)
                    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
                    scores.append(score(text, row["outputs"]))
            rows.append({"library": side, "policy": policy, "task": task, "keep": keep if policy != "full" else 1.0,
                         "score": sum(scores) / len(scores), "n": len(scores), "ttft_s": ttft, "decode_tok_s": decode,
                         "kv_bytes": kv, "prompt_tokens": int(prompt_ids(tok, data[0]).shape[1])})
            print(json.dumps(rows[-1]), flush=True)
    return {"side": side, "rows": rows, "torch_threads": torch.get_num_threads()}


def markdown_table(result: dict) -> str:
    lines = ["| policy (kvcache / kvpress) | keep | task | acc kvcache | acc kvpress | decode tok/s kvcache | decode tok/s kvpress | KV KiB kvcache | KV KiB kvpress |",
             "|---|---|---|---|---|---|---|---|---|"]
    ours = {(r["policy"], r["task"]): r for r in result["kvcache"]["rows"]}
    theirs = {(r["policy"], r["task"]): r for r in result["kvpress"]["rows"]}
    for key in ours:
        if key not in theirs:
            continue
        a, b = ours[key], theirs[key]
        name = "full" if key[0] == "full" else f"{key[0]} / {PAIRS[key[0]]}"
        lines.append(f"| {name} | {a['keep']} | {key[1]} | {a['score']:.2f} | {b['score']:.2f} | {a['decode_tok_s']:.1f} | "
                     f"{b['decode_tok_s']:.1f} | {a['kv_bytes'] / 1024:.0f} | {b['kv_bytes'] / 1024:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=["both", "kvcache", "kvpress"], default="both")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF folder")
    p.add_argument("--model-path", default=None, help="(internal) resolved model folder")
    p.add_argument("--tasks", nargs="+", default=["passkey_1k", "multikey_1k"], help="kvlong data files, e.g. passkey_1k")
    p.add_argument("--limit", type=int, default=3)
    p.add_argument("--keep", type=float, default=0.5, help="fraction of the prompt's KV kept")
    p.add_argument("--policies", nargs="+", default=["snapkv", "streaming"], choices=sorted(PAIRS))
    p.add_argument("--threads", type=int, default=None, help="torch threads on both sides")
    p.add_argument("--kvpress-python", default=str(ROOT / ".venv-kvpress" / "bin" / "python"))
    p.add_argument("--out", type=Path, default=Path("results/kvpress"))
    a = p.parse_args(argv)
    if not 0 < a.keep <= 1:
        p.error("--keep must be in (0, 1]")
    for t in a.tasks:
        if not (DATA / f"{t}.jsonl").exists():
            p.error(f"unknown task data {t!r}; files are in {DATA}")
    if a.side != "both":
        result = run_side(a.side, a.model_path, a.tasks, a.limit, a.keep, a.policies, a.threads)
        print("RESULT " + json.dumps(result))
        return 0
    from kvcache.engine_adapters.hf import resolve_model
    from kvcache.eval.machine import machine

    path = str(resolve_model(a.model))
    if not Path(a.kvpress_python).exists():
        raise SystemExit(f"{a.kvpress_python} not found: create the kvpress environment (see this script's docstring)")
    common = ["--model-path", path, "--tasks", *a.tasks, "--limit", str(a.limit), "--keep", str(a.keep), "--policies", *a.policies]
    if a.threads:
        common += ["--threads", str(a.threads)]
    result: dict[str, Any] = {"model": a.model, "keep": a.keep, "tasks": a.tasks, "limit": a.limit, "machine": machine("cpu")}
    result["kvcache"] = run_side("kvcache", path, a.tasks, a.limit, a.keep, a.policies, a.threads)
    proc = subprocess.run([a.kvpress_python, "-m", "kvcache.eval.kvpress_compare", "--side", "kvpress", *common], cwd=ROOT,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"kvpress side failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result["kvpress"] = json.loads(lines[-1][7:])
    import importlib.metadata as md

    result["versions"] = {"kvcache_transformers": md.version("transformers")}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "kvpress.json").write_text(json.dumps(result, indent=1))
    table = markdown_table(result)
    (a.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
