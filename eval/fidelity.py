"""``kvcache fidelity``: long-text perplexity with a compressed cache, and ROUGE-L of compressed generations
against the full-cache generation (the measure Keyformer reports on summarisation, arXiv 2403.09054).

    kvcache fidelity --policies keyformer h2o streaming snapkv --budgets 0.25 0.5 --out results/fidelity_smollm2

Perplexity: each of ``--docs`` windows of natural text (consecutive paragraphs of the kvlong haystack,
Python documentation prose) is split into a prefix of ``--prefix-tokens`` and a continuation of
``--ppl-tokens``. The prefix is the prompt (compressed to ``budget`` x its length); the continuation then
streams through the cache ``--chunk`` tokens per forward pass (every-step policies keep evicting while it
streams) and only its tokens are scored. The full cache runs the same passes.

ROUGE-L: each window (``--prefix-tokens`` of text) is followed by an instruction to summarise it (chat
template); the full cache and every policy generate ``--new-tokens`` greedily, and the policy's text is
scored against the full cache's with ``rouge_score``'s ROUGE-L F1 (1.0 = identical).

Writes ``fidelity.json`` and ``fidelity.png`` (perplexity and ROUGE-L vs budget, one line per policy).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policies", nargs="+", default=["keyformer", "snapkv", "h2o", "streaming"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--layer-budget", default="uniform")
    p.add_argument("--docs", type=int, default=3, help="text windows")
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
    from kvcache.eval.machine import machine

    model, tok = load_model(args.model, dtype=torch.float32, device=args.device)
    total = args.prefix_tokens + args.ppl_tokens
    docs = windows(tok, args.docs, total)
    configs = [("full", 1.0)] + [(p, b) for p in args.policies for b in args.budgets]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    data: dict[str, Any] = {"model": args.model, "docs": args.docs, "prefix_tokens": args.prefix_tokens,
                            "ppl_tokens": args.ppl_tokens, "chunk": args.chunk, "new_tokens": args.new_tokens,
                            "text": "kvlong haystack (Python documentation prose, PSF licence)",
                            "machine": machine(args.device), "configs": []}
    reference: list[str] = []
    args.out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(configs) * len(docs), desc="fidelity", unit="doc")
    for policy, budget in configs:
        bar.set_postfix_str(f"{policy} {budget}")
        start = time.perf_counter()
        nll, rouge, texts = [], [], []
        with kv_policy(model, policy, budget=budget, layer_budget=args.layer_budget) as session:
            for d, doc in enumerate(docs):
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
        data["configs"].append(row)
        (args.out / "fidelity.json").write_text(json.dumps(data, indent=1))
    bar.close()
    return data


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
    fig.suptitle(f"{data['model']}: {data['docs']} windows of {data['prefix_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(data: dict) -> str:
    lines = ["| policy | budget | perplexity | ROUGE-L vs full |", "|---|---|---|---|"]
    for c in data["configs"]:
        ppl = f"{c['ppl']:.2f}" if "ppl" in c else ""
        rl = f"{c['rougeL_vs_full']:.3f}" if "rougeL_vs_full" in c else ""
        lines.append(f"| {c['policy']} | {c['budget']} | {ppl} | {rl} |")
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
    plot(data, args.out / "fidelity.png")
    table = markdown_table(data)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    print(f"wrote {args.out / 'fidelity.json'}, {args.out / 'fidelity.png'}, {args.out / 'table.md'}")
    return 0
