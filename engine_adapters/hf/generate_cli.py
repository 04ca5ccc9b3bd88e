"""``kvcache generate``: one prompt through a Hugging Face model with a KV policy, figures measured.

    kvcache generate --model smollm2-135m --kv-policy keyformer --kv-budget 0.5 --prompt-file doc.txt \
        --max-new-tokens 64 --chat --json [--kv-quant zipcache]

With ``--json`` it prints one object: text, token counts, ``kv_bytes`` summed from the cache tensors
after generation, ``kv_bytes_full`` from a full-cache run of the same prompt in the same process
(skip it with ``--no-full``), kept tokens per layer, prefill seconds and decode tokens/s. ``--kv-quant``
stores the kept tokens quantised (``zipcache``, ``kivi``, ``kivi:bits=4``; JSON ``kv_quant``).
``--kv-head-budget adaptive`` splits each layer's budget over its KV heads (Ada-KV; JSON ``kv_head_budget``).
``--kv-prefill-chunk N`` feeds the prompt N tokens at a time and compresses after each chunk (JSON
``kv_prefill_chunk``); ``kv_peak_bytes`` is the most the policy cache held at once (``kv_bytes_full`` is the
full cache's, whose peak is its final size).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvcache.budget import parse_budget
from kvcache.models import DEFAULT_MODEL


class StepClock:
    """A logits processor that only records when each decoding step's logits are ready."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(time.perf_counter())
        return scores

    def timings(self) -> tuple[float, float | None]:
        """(prefill seconds, decode tokens per second over the steps after the first)."""
        prefill = self.marks[0] - self.start
        if len(self.marks) < 2:
            return prefill, None
        return prefill, (len(self.marks) - 1) / (self.marks[-1] - self.marks[0])


def cache_bytes(cache: Any) -> int:
    """Bytes of the key/value tensors a cache holds (our PolicyCache or a stock transformers cache)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def encode(tokenizer: Any, prompt: str, chat: bool, assistant_prefix: str = "") -> dict[str, torch.Tensor]:
    if chat:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + assistant_prefix
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return tokenizer(prompt + assistant_prefix, return_tensors="pt")


def timed_generate(model: Any, tokenizer: Any, inputs: dict, max_new_tokens: int, sample: bool, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    clock = StepClock()
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        logits_processor=[clock],
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    from kvcache.engine_adapters.hf.compat import output_cache

    prompt_tokens = inputs["input_ids"].shape[1]
    new_tokens = out.sequences[0, prompt_tokens:]
    prefill_s, decode_tps = clock.timings()
    return {
        "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": int(new_tokens.numel()),
        "kv_bytes": cache_bytes(output_cache(out)),
        "prefill_s": round(prefill_s, 4),
        "decode_tokens_per_s": round(decode_tps, 3) if decode_tps else None,
    }


def run_generation(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    policy: str,
    budget: float | int,
    layer_budget: str = "uniform",
    max_new_tokens: int = 64,
    chat: bool = False,
    assistant_prefix: str = "",
    sample: bool = False,
    seed: int = 0,
    with_full: bool = True,
    quant: str | None = None,
    head_budget: str = "uniform",
    prefill_chunk: int | None = None,
) -> dict[str, Any]:
    """Generate under the policy (and, if ``with_full``, with the unmodified model); measured figures."""
    from kvcache.engine_adapters.hf import kv_policy

    inputs = encode(tokenizer, prompt, chat, assistant_prefix)
    with kv_policy(
        model, policy, budget, layer_budget=layer_budget, quant=quant, head_budget=head_budget, prefill_chunk=prefill_chunk
    ) as session:
        result = timed_generate(model, tokenizer, inputs, max_new_tokens, sample, seed)
        stats = session.stats()
    result.update(
        policy=policy,
        budget=budget,
        layer_budget=layer_budget,
        kv_quant=quant or "none",
        kv_head_budget=stats["head_budget"],
        kv_prefill_chunk=prefill_chunk,
        kv_peak_bytes=stats["peak_kv_bytes"],
        kept_tokens_per_layer=[round(t, 2) for t in stats["kept_tokens_per_layer"]],
        bookkeeping_bytes=stats["bookkeeping_bytes"],
        compressed=not stats["uncompressed_sequences"],
        notes=stats["notes"],
        kv_bytes_full=None,
    )
    if with_full:
        full = timed_generate(model, tokenizer, inputs, max_new_tokens, sample, seed)
        result.update(
            kv_bytes_full=full["kv_bytes"],
            full_text=full["text"],
            full_prefill_s=full["prefill_s"],
            full_decode_tokens_per_s=full["decode_tokens_per_s"],
        )
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt text (or use --prompt-file)")
    parser.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name or local HF folder")
    parser.add_argument("--kv-policy", default="snapkv", help="eviction policy, e.g. keyformer or 'snapkv:window=16'")
    parser.add_argument("--kv-budget", default="0.5", help="fraction of the prompt (0.5) or tokens per layer (512)")
    parser.add_argument("--kv-layer-budget", default="uniform", help="uniform, pyramid or cake")
    parser.add_argument(
        "--kv-head-budget", default="uniform", help="split of a layer's budget over KV heads: uniform, adaptive (Ada-KV), 'adaptive:alpha=0.2'"
    )
    parser.add_argument(
        "--kv-prefill-chunk", type=int, default=None, metavar="N",
        help="feed the prompt N tokens at a time and compress after each chunk (peak KV ~ budget + N)",
    )
    parser.add_argument("--kv-quant", default="none", help="store kept tokens quantised: none, zipcache, kivi, 'kivi:bits=4'")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-full", action="store_true", help="skip the full-cache reference run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from kvcache.engine_adapters.hf import load_model

    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            print(f"kvcache generate: --prompt-file {args.prompt_file}: no such file; give an existing text file", file=sys.stderr)
            return 2
        prompt = args.prompt_file.read_text()
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        print("kvcache generate: give a PROMPT or --prompt-file FILE", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1:
        print("kvcache generate: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    budget = parse_budget(args.kv_budget)
    import kvcache

    kvcache.create("evict", args.kv_policy)  # a bad spec fails here, before the model loads
    kvcache.create("budget", args.kv_layer_budget)
    kvcache.create("quant", args.kv_quant)
    from kvcache.budget.heads import parse_head_budget

    parse_head_budget(args.kv_head_budget)
    if args.kv_prefill_chunk is not None:  # a bad chunk fails here too, before the model loads
        from kvcache.engine_adapters.hf.adapter import check_prefill_chunk
        from kvcache.plan import KVPlan

        check_prefill_chunk(
            KVPlan(kvcache.create("evict", args.kv_policy), budget, kvcache.create("budget", args.kv_layer_budget)),
            args.kv_prefill_chunk, kvcache.create("quant", args.kv_quant).registry_name, parse_head_budget(args.kv_head_budget),
        )
    model, tokenizer = load_model(args.model)
    result = run_generation(
        model, tokenizer, prompt, policy=args.kv_policy, budget=budget, layer_budget=args.kv_layer_budget,
        max_new_tokens=args.max_new_tokens, chat=args.chat, sample=args.sample, seed=args.seed,
        with_full=not args.no_full, quant=args.kv_quant, head_budget=args.kv_head_budget,
        prefill_chunk=args.kv_prefill_chunk,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(result["text"])
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    full = f" (full cache: {result['kv_bytes_full'] / 2**20:.1f} MiB)" if result["kv_bytes_full"] else ""
    print(
        f"\n[{args.kv_policy} @ {budget}{'' if args.kv_quant == 'none' else ' + ' + args.kv_quant}"
        f"{'' if result['kv_head_budget'] == 'uniform' else ', heads ' + result['kv_head_budget']}"
        f"{'' if args.kv_prefill_chunk is None else f', prefill chunk {args.kv_prefill_chunk}'}] prompt {result['prompt_tokens']} tokens, "
        f"KV {result['kv_bytes'] / 2**20:.1f} MiB (peak {result['kv_peak_bytes'] / 2**20:.1f} MiB)"
        f"{full}, prefill {result['prefill_s']:.2f}s, decode {result['decode_tokens_per_s']} tok/s",
        file=sys.stderr,
    )
    return 0
