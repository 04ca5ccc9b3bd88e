"""``kvcache fidelity``: long-text perplexity with a compressed cache, and ROUGE-L of compressed generations
against the full-cache generation (the measure Keyformer reports on summarisation, arXiv 2403.09054).

    kvcache fidelity --policies keyformer keyformer:kernel=1 h2o h2o:kernel=1 streaming --budgets 0.5 \
        --texts python-docs licenses docstrings man --docs 3 --out results/fidelity_smollm2

Texts (``--texts``, ``--docs`` documents of each kind, all read from disk, nothing downloaded):
``python-docs`` evenly spaced windows of the kvlong haystack (Python documentation prose, shipped in
``eval/tasks/data``); ``licenses`` distinct licence files installed with this Python's packages
(``site-packages/**/LICENSE*``, ``COPYING*``; Apache, LGPL, PSF, ...); ``docstrings`` the docstrings of
standard-library modules (module, then its public classes and functions); ``man`` manual pages rendered
by ``man`` (needs man-db). A document is the first ``--prefix-tokens + --ppl-tokens`` tokens of its text;
shorter texts are skipped.

Perplexity: each document is split into a prefix of ``--prefix-tokens`` and a continuation of
``--ppl-tokens``. The prefix is the prompt (compressed to ``budget`` x its length); the continuation then
streams through the cache ``--chunk`` tokens per forward pass (every-step policies keep evicting while it
streams) and only its tokens are scored. The full cache runs the same passes.

ROUGE-L: each prefix is followed by an instruction to summarise it (chat template); the full cache and
every policy generate ``--new-tokens`` greedily, and the policy's text is scored against the full cache's
with ``rouge_score``'s ROUGE-L F1 (1.0 = identical).

Policies may be specs (``keyformer:kernel=1``); each runs with ``torch.manual_seed(0)`` first, so
Keyformer's Gumbel noise is the same on every run. ``fidelity.json`` has per-document values, means per
kind of text, and for each pair of policies at a budget the paired per-document differences (mean and
95% t-interval, wins): whether one policy is closer to the full cache than another beyond noise.
Writes ``fidelity.json``, ``fidelity.png`` (perplexity and ROUGE-L vs budget, one line per policy) and
``table.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from kvcache.eval.harness import write_report

TEXT_KINDS = ("python-docs", "licenses", "docstrings", "man")
# standard-library modules with long docstrings, and common manual pages, tried in this order
DOCSTRING_MODULES = ("argparse", "typing", "logging", "collections", "tarfile", "subprocess", "json", "pathlib")
MAN_PAGES = ("find", "grep", "tar", "ssh", "sed", "make", "gzip", "less")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policies", nargs="+", default=["keyformer", "snapkv", "h2o", "streaming"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--layer-budget", default="uniform")
    p.add_argument("--texts", nargs="+", choices=TEXT_KINDS, default=["python-docs", "licenses", "docstrings"],
                   help="kinds of text (man needs man-db)")
    p.add_argument("--docs", type=int, default=3, help="documents of each kind of text")
    p.add_argument("--prefix-tokens", type=int, default=1024)
    p.add_argument("--ppl-tokens", type=int, default=128, help="continuation tokens scored for perplexity")
    p.add_argument("--chunk", type=int, default=16, help="continuation tokens per forward pass")
    p.add_argument("--new-tokens", type=int, default=48, help="generated tokens for ROUGE-L")
    p.add_argument("--skip", choices=["ppl", "rouge"], default=None, help="leave one measure out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("results/fidelity"))
    p.add_argument("--plot-only", action="store_true")


def windows(tokenizer, n: int, tokens: int) -> list[list[int]]:
    """``n`` windows of ``tokens`` consecutive tokens of the haystack, evenly spaced."""
    from kvcache.eval.tasks.generate import load_haystack

    ids = tokenizer("\n".join(load_haystack()), add_special_tokens=False).input_ids
    if len(ids) < tokens:
        raise ValueError(f"the haystack has only {len(ids)} tokens; use --prefix-tokens + --ppl-tokens <= {len(ids)}")
    step = max(1, (len(ids) - tokens) // max(1, n))
    return [ids[i * step : i * step + tokens] for i in range(n)]


def licence_texts() -> Iterator[tuple[str, str]]:
    """``(name, text)`` of each distinct licence file under this Python's site-packages, by path."""
    import site
    import sysconfig

    roots = sorted({*site.getsitepackages(), sysconfig.get_paths()["purelib"]})
    seen: set[str] = set()
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if not path.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")) or not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            key = " ".join(text.split())[:2000]  # the same licence shipped by several packages counts once
            if key not in seen:
                seen.add(key)
                yield str(path.relative_to(root)), text


def docstring_texts() -> Iterator[tuple[str, str]]:
    """``(module, text)``: a standard-library module's docstring, then its public classes' and functions'."""
    import importlib
    import inspect

    for name in DOCSTRING_MODULES:
        module = importlib.import_module(name)
        parts = [inspect.getdoc(module) or ""]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(f"{attr}: {doc}")
        yield name, "\n\n".join(p for p in parts if p)


def man_texts() -> Iterator[tuple[str, str]]:
    """``(page, text)`` of manual pages rendered by ``man`` (plain text, whitespace runs collapsed)."""
    import os
    import subprocess

    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"}
    for page in MAN_PAGES:
        try:
            done = subprocess.run(["man", "-P", "cat", page], capture_output=True, text=True, env=env, timeout=60)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return
        if done.returncode == 0:
            text = re.sub(r".\x08", "", done.stdout).replace("\u2010\n", "")  # overstrikes, hyphenated line ends
            yield page, "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines())


def documents(tokenizer, kind: str, n: int, tokens: int) -> list[dict[str, Any]]:
    """``n`` documents of one kind of text: ``{"kind", "name", "ids"}`` with the first ``tokens`` tokens."""
    if kind == "python-docs":
        return [{"kind": kind, "name": f"haystack window {i}", "ids": ids} for i, ids in enumerate(windows(tokenizer, n, tokens))]
    sources: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
        "licenses": licence_texts, "docstrings": docstring_texts, "man": man_texts,
    }
    docs = []
    for name, text in sources[kind]():
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= tokens:
            docs.append({"kind": kind, "name": name, "ids": ids[:tokens]})
            if len(docs) == n:
                return docs
    raise SystemExit(f"kvcache fidelity: found {len(docs)} {kind} texts of >= {tokens} tokens on this machine, "
                     f"{n} wanted; lower --docs or --prefix-tokens, or leave {kind} out of --texts")


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Paired per-document differences ``a - b``: mean, 95% t-interval, and how often a > b / a < b."""
    from scipy import stats

    diff = [x - y for x, y in zip(a, b)]
    n = len(diff)
    mean = sum(diff) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half], "a_higher": sum(d > 0 for d in diff),
            "b_higher": sum(d < 0 for d in diff), "n": n}


def streamed_nll(model, session, prefix: list[int], cont: list[int], chunk: int, device: str) -> float:
    """Mean NLL of ``cont`` after ``prefix``; the cache is compressed after the prefix and while streaming."""
    import torch
    import torch.nn.functional as F

    from kvcache.engine_adapters.hf.compat import output_cache, with_cache

    ids = torch.tensor([prefix], device=device)
    cache = session.new_cache(len(cont)) if session is not None else None
    with torch.no_grad():
        out = model(**with_cache(model, cache, input_ids=ids, use_cache=True))
        cache = output_cache(out)
        logits = [out.logits[:, -1:].float()]
        feed = torch.tensor([cont[:-1]], device=device)
        for s in range(0, feed.shape[1], chunk):
            out = model(**with_cache(model, cache, input_ids=feed[:, s : s + chunk], use_cache=True))
            cache = output_cache(out)
            logits.append(out.logits.float())
    lp = F.log_softmax(torch.cat(logits, dim=1)[0], dim=-1)
    target = torch.tensor(cont, device=lp.device)
    return float(-lp.gather(-1, target[:, None]).mean())


def generate(model, tokenizer, text: str, new_tokens: int, device: str) -> str:
    import torch

    messages = [{"role": "user", "content": f"{text}\n\nSummarize the text above in a few sentences."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


def run_fidelity(args: argparse.Namespace) -> dict:
    import torch
    from rouge_score import rouge_scorer
    from tqdm import tqdm

    from kvcache.engine_adapters.hf import kv_policy, load_model
    from kvcache.eval.harness import machine

    model, tok = load_model(args.model, dtype=torch.float32, device=args.device)
    total = args.prefix_tokens + args.ppl_tokens
    docs = [doc for kind in args.texts for doc in documents(tok, kind, args.docs, total)]
    configs = [("full", 1.0)] + [(p, b) for p in args.policies for b in args.budgets]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    data: dict[str, Any] = {"model": args.model, "docs": len(docs), "prefix_tokens": args.prefix_tokens,
                            "ppl_tokens": args.ppl_tokens, "chunk": args.chunk, "new_tokens": args.new_tokens,
                            "texts": args.texts, "documents": [{"kind": d["kind"], "name": d["name"]} for d in docs],
                            "machine": machine(args.device), "configs": []}
    reference: list[str] = []
    args.out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(configs) * len(docs), desc="fidelity", unit="doc")
    for policy, budget in configs:
        bar.set_postfix_str(f"{policy} {budget}")
        start = time.perf_counter()
        nll, rouge, texts = [], [], []
        torch.manual_seed(0)  # Keyformer's Gumbel noise (seed=None) draws from the global generator
        with kv_policy(model, policy, budget=budget, layer_budget=args.layer_budget) as session:
            for d, doc in enumerate(d["ids"] for d in docs):
                if args.skip != "ppl":
                    nll.append(streamed_nll(model, session, doc[: args.prefix_tokens], doc[args.prefix_tokens :], args.chunk, args.device))
                if args.skip != "rouge":
                    text = generate(model, tok, tok.decode(doc[: args.prefix_tokens]), args.new_tokens, args.device)
                    texts.append(text)
                    if policy == "full":
                        reference.append(text)
                    # identical outputs are perfectly faithful even when rouge_score's tokenizer finds no words
                    rouge.append(1.0 if text == reference[d] else scorer.score(reference[d], text)["rougeL"].fmeasure)
                bar.update(1)
        row: dict[str, Any] = {"policy": policy, "budget": budget, "seconds": round(time.perf_counter() - start, 1)}
        if nll:
            row["nll"] = sum(nll) / len(nll)
            row["ppl"] = math.exp(row["nll"])
            row["ppl_per_doc"] = [math.exp(x) for x in nll]
        if rouge:
            row["rougeL_vs_full"] = sum(rouge) / len(rouge)
            row["rougeL_per_doc"] = rouge
            row["outputs"] = texts
        row["by_kind"] = by_kind(row, docs)
        data["configs"].append(row)
        data["comparisons"] = comparisons(data["configs"])
        (args.out / "fidelity.json").write_text(json.dumps(data, indent=1))
    bar.close()
    return data


def by_kind(row: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Perplexity (exp of the mean NLL) and mean ROUGE-L over each kind's documents."""
    out: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(d["kind"] for d in docs):
        index = [i for i, d in enumerate(docs) if d["kind"] == kind]
        cell: dict[str, float] = {}
        if "ppl_per_doc" in row:
            cell["ppl"] = math.exp(sum(math.log(row["ppl_per_doc"][i]) for i in index) / len(index))
        if "rougeL_per_doc" in row:
            cell["rougeL_vs_full"] = sum(row["rougeL_per_doc"][i] for i in index) / len(index)
        out[kind] = cell
    return out


def comparisons(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each pair of policies at the same budget: paired differences per document of ROUGE-L vs full
    (positive: the first is closer to the full cache) and of NLL (negative: the first predicts better)."""
    out = []
    rows = [c for c in configs if c["policy"] != "full"]
    for a, b in itertools.combinations(rows, 2):
        if a["budget"] != b["budget"]:
            continue
        pair: dict[str, Any] = {"a": a["policy"], "b": b["policy"], "budget": a["budget"]}
        if "rougeL_per_doc" in a and "rougeL_per_doc" in b:
            pair["rougeL_a_minus_b"] = paired(a["rougeL_per_doc"], b["rougeL_per_doc"])
        if "ppl_per_doc" in a and "ppl_per_doc" in b:
            pair["nll_a_minus_b"] = paired([math.log(x) for x in a["ppl_per_doc"]], [math.log(x) for x in b["ppl_per_doc"]])
        out.append(pair)
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(c for c in data["configs"] if c["policy"] == "full")
    keys = [k for k in ("ppl", "rougeL_vs_full") if k in full]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for policy in sorted({c["policy"] for c in data["configs"]} - {"full"}):
            pts = sorted((c["budget"], c[key]) for c in data["configs"] if c["policy"] == policy and key in c)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.axhline(full[key], color="black", linestyle="--", label="full cache")
        ax.set_xlabel("KV budget (fraction of prompt)")
        ax.set_title("perplexity of the continuation (lower is better)" if key == "ppl" else "ROUGE-L F1 vs full-cache output")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    kinds = ", ".join(data.get("texts", ["python-docs"]))
    fig.suptitle(f"{data['model']}: {data['docs']} documents ({kinds}), prefix {data['prefix_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(data: dict) -> str:
    kinds = list(data["configs"][0].get("by_kind", {})) if data["configs"] else []
    head = "| policy | budget | perplexity | ROUGE-L vs full |" + "".join(f" {k} ppl / ROUGE-L |" for k in kinds)
    lines = [head, "|---|---|---|---|" + "---|" * len(kinds)]
    for c in data["configs"]:
        ppl = f"{c['ppl']:.2f}" if "ppl" in c else ""
        rl = f"{c['rougeL_vs_full']:.3f}" if "rougeL_vs_full" in c else ""
        cells = "".join(
            f" {c['by_kind'][k].get('ppl', float('nan')):.2f} / {c['by_kind'][k].get('rougeL_vs_full', float('nan')):.3f} |"
            for k in kinds
        )
        lines.append(f"| {c['policy']} | {c['budget']} | {ppl} | {rl} |" + cells)
    pairs = data.get("comparisons", [])
    if pairs:
        lines += ["", "| a | b | budget | ROUGE-L a - b [95% CI] | docs a > b / a < b | NLL a - b [95% CI] |", "|---|---|---|---|---|---|"]
        for p in pairs:
            r, n = p.get("rougeL_a_minus_b"), p.get("nll_a_minus_b")
            rl = f"{r['mean']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r else ""
            wins = f"{r['a_higher']} / {r['b_higher']}" if r else ""
            nl = f"{n['mean']:+.4f} [{n['ci95'][0]:+.4f}, {n['ci95'][1]:+.4f}]" if n else ""
            lines.append(f"| {p['a']} | {p['b']} | {p['budget']} | {rl} | {wins} | {nl} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import kvcache

    for p in args.policies:
        kvcache.create("evict", p)
    if any(not 0 < b <= 1 for b in args.budgets):
        raise SystemExit("kvcache fidelity: --budgets are fractions in (0, 1]")
    if args.chunk < 1 or args.ppl_tokens < 2 or args.docs < 1:
        raise SystemExit("kvcache fidelity: --chunk >= 1, --ppl-tokens >= 2 and --docs >= 1")
    data = json.loads((args.out / "fidelity.json").read_text()) if args.plot_only else run_fidelity(args)
    written = write_report(data, args.out / "fidelity.json", plot, markdown_table)
    print("wrote " + ", ".join(map(str, written)))
    return 0
