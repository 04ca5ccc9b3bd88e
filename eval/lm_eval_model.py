"""lm-eval-harness model ``kvcache``: lm-eval's ``hf`` model with a KV policy installed.

    kvcache eval --model kvcache \\
        --model_args pretrained=smollm2-135m,kv_policy=keyformer,kv_budget=0.5,kv_layer_budget=pyramid \\
        --tasks kvlong --batch_size 4 --output_path results/lm_eval

``model_args`` (besides every argument of lm-eval's ``hf`` model):

* ``pretrained``       an embedded model name (``kvcache models``) or a local Hugging Face folder.
* ``kv_policy``        an ``evict`` policy name (``kvcache policies``); default ``full``.
* ``kv_budget``        a float in (0, 1] is a fraction of each prompt, an int a token count; default 1.0.
* ``kv_layer_budget``  a ``budget`` policy name (uniform, pyramid, cake); default ``uniform``.
* ``kv_head_budget``   split of each layer's budget over its KV heads: ``uniform`` (default) or ``adaptive``
                       (Ada-KV; ``adaptive:alpha=0.3`` sets the safeguard share), per-head memory in the HF adapter.
* ``kv_attention``     attention backend of the adapter; default ``sdpa``.
* ``kv_quant``         a ``quant`` codec name or spec (``none``, ``zipcache``, ``kivi``, ``kivi:bits=4``; default
                       ``none``): the kept tokens are stored quantised, composed with the eviction policy.
* ``kv_prefill_chunk`` feed each prompt (generation prompt, loglikelihood context) this many tokens at a time and
                       compress after every chunk: peak KV about budget + chunk per layer (default: one pass).
* ``kv_ll_chunk``      loglikelihood: continuation tokens fed per forward pass after the context (default 1,
                       token by token as in decoding; larger is faster for long continuations).
* ``kv_<param>``       any other ``kv_`` key is a parameter of the eviction policy, e.g. ``kv_window=0.2``
                       (lm-eval splits ``model_args`` on commas, so ``keyformer:window=0.2,...`` cannot be used).

``generate_until`` runs ``model.generate`` inside :func:`kvcache.engine_adapters.hf.kv_policy` (the cache compresses
at the prompt and, for every-step policies, while decoding). ``loglikelihood`` first runs the context
through the model (the cache compresses) and then scores the continuation against the compressed cache,
so the policy changes the score; a single forward over context + continuation would attend over the full
prompt and ignore the policy. Batches of any size are supported (left padding).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

import kvcache
from kvcache.engine_adapters.hf.compat import with_cache
from kvcache.budget import parse_budget
from kvcache.budget.heads import parse_head_budget
from kvcache.registry import PolicyConfigError

KV_KEYS = (
    "kv_policy", "kv_budget", "kv_layer_budget", "kv_head_budget", "kv_attention", "kv_quant", "kv_ll_chunk",
    "kv_prefill_chunk",
)


class KVModelArgsError(PolicyConfigError):
    """Bad ``kv_*`` model_args; the message names the valid choices."""


def _budget(value: Any) -> float | int:
    """``kv_budget`` read by the one budget parser (:func:`kvcache.budget.parse_budget`)."""
    try:
        return parse_budget(value)
    except PolicyConfigError as err:
        raise KVModelArgsError(f"kv_budget: {err}") from None


def split_kv_args(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate and pop the ``kv_*`` keys: (settings for ``kv_policy``, remaining HFLM kwargs)."""
    kwargs = dict(kwargs)
    kv = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("kv_")}
    policy = str(kv.pop("kv_policy", "full"))
    budget = _budget(kv.pop("kv_budget", 1.0))
    layer_budget = str(kv.pop("kv_layer_budget", "uniform"))
    head_budget = str(kv.pop("kv_head_budget", "uniform"))
    attention = str(kv.pop("kv_attention", "sdpa"))
    quant = str(kv.pop("kv_quant", "none"))
    chunk = kv.pop("kv_ll_chunk", 1)
    if not str(chunk).isdigit() or int(chunk) < 1:
        raise KVModelArgsError(f"kv_ll_chunk must be an int >= 1, got {chunk!r}")
    prefill_chunk = kv.pop("kv_prefill_chunk", None)
    if prefill_chunk is not None:
        if not str(prefill_chunk).isdigit() or int(prefill_chunk) < 1:
            raise KVModelArgsError(f"kv_prefill_chunk must be an int >= 1 (tokens per prompt chunk), got {prefill_chunk!r}")
        prefill_chunk = int(prefill_chunk)
    policy_params = {k[3:]: v for k, v in kv.items()}
    if policy not in kvcache.names("evict") and ":" not in policy:
        raise KVModelArgsError(f"unknown kv_policy {policy!r}; valid: {', '.join(kvcache.names('evict'))}")
    if layer_budget not in kvcache.names("budget") and ":" not in layer_budget:
        raise KVModelArgsError(f"unknown kv_layer_budget {layer_budget!r}; valid: {', '.join(kvcache.names('budget'))}")
    if quant.split(":")[0] not in kvcache.names("quant"):
        raise KVModelArgsError(f"unknown kv_quant {quant!r}; valid: {', '.join(kvcache.names('quant'))}")
    if quant != "none":
        policy_params["quant"] = quant
    # fail now, with the registry's message, rather than at the first request
    try:
        evict = kvcache.create("evict", policy, **{k: v for k, v in policy_params.items() if k != "quant"})
        kvcache.create("budget", layer_budget)
        kvcache.create("quant", quant)
        heads = parse_head_budget(head_budget)
        if heads.adaptive and quant != "none":
            raise PolicyConfigError("kv_head_budget adaptive does not combine with kv_quant; use kv_head_budget=uniform")
        if isinstance(budget, int) and evict.compresses:
            evict.check_budget(budget)
        if prefill_chunk is not None:
            from kvcache.engine_adapters.hf.adapter import check_prefill_chunk
            from kvcache.plan import KVPlan

            plan = KVPlan(evict, budget, kvcache.create("budget", layer_budget))
            check_prefill_chunk(plan, prefill_chunk, kvcache.create("quant", quant).registry_name, heads)
    except PolicyConfigError as err:
        raise KVModelArgsError(f"bad kv_* model_args: {err}") from err
    settings = dict(policy=policy, budget=budget, layer_budget=layer_budget, attention=attention, **policy_params)
    if heads.adaptive:
        settings["head_budget"] = heads.spec
    if prefill_chunk is not None:
        settings["prefill_chunk"] = prefill_chunk
    return {"settings": settings, "ll_chunk": int(chunk)}, kwargs


@register_model("kvcache")
class KVCacheLM(HFLM):
    """lm-eval's HFLM with a kvcache policy on the model (see the module docstring for ``model_args``)."""

    def __init__(self, pretrained: Any = "smollm2-135m", **kwargs: Any) -> None:
        kv, kwargs = split_kv_args(kwargs)
        if isinstance(pretrained, str):
            from kvcache.engine_adapters.hf import resolve_model

            try:
                pretrained = str(resolve_model(pretrained))
            except FileNotFoundError as err:
                raise KVModelArgsError(str(err)) from err
        if kwargs.get("device") in (None, "cuda") and not torch.cuda.is_available():
            kwargs["device"] = "cpu"
        if kwargs.get("dtype") in (None, "auto") and kwargs.get("device", "cpu") == "cpu":
            kwargs["dtype"] = "float32"
        super().__init__(pretrained=pretrained, **kwargs)
        self.kv_settings = kv["settings"]
        self.kv_ll_chunk = kv["ll_chunk"]
        from kvcache.engine_adapters.hf import kv_policy

        self._kv_stack = contextlib.ExitStack()
        self.kv_session = self._kv_stack.enter_context(kv_policy(self.model, **self.kv_settings))
        self.kv_stats: list[dict[str, Any]] = []

    def close(self) -> None:
        """Take the policy off the model."""
        self._kv_stack.close()

    # -- generate_until: HFLM pads on the left and calls model.generate, which the policy wraps ----------
    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        self.kv_stats.append(self.kv_session.stats())
        return out

    # -- loglikelihood: context first (compressed), then the continuation against the compressed cache --
    def _batch_size(self, override_bs: int | None) -> int:
        if override_bs:
            return int(override_bs)
        return int(self.batch_size) if str(self.batch_size).isdigit() else 1

    @torch.no_grad()
    def _score_batch(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        device = self.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        n = len(contexts)
        width = max(map(len, contexts))
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, ctx in enumerate(contexts):
            ids[i, width - len(ctx) :] = torch.tensor(ctx)
            mask[i, width - len(ctx) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        max_cont = max(map(len, continuations))
        cache = self.kv_session.new_cache(max_cont)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(**with_cache(self.model, cache, input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True))
        logits = [out.logits[:, -1:, :].float()]
        next_pos = position[:, -1:] + 1
        # feed continuation[:-1] in chunks; rows whose continuation ended feed padding tokens marked real
        # (they come after every token that row still needs, so they cannot change its scores)
        feed = torch.full((n, max(max_cont - 1, 0)), pad, dtype=torch.long)
        for i, cont in enumerate(continuations):
            if len(cont) > 1:
                feed[i, : len(cont) - 1] = torch.tensor(cont[:-1])
        feed = feed.to(device)
        step = self.kv_ll_chunk
        for start in range(0, feed.shape[1], step):
            chunk = feed[:, start : start + step]
            q = chunk.shape[1]
            mask = torch.cat([mask, torch.ones((n, q), dtype=mask.dtype, device=device)], dim=1)
            pos = next_pos + torch.arange(q, device=device)
            out = self.model(**with_cache(self.model, cache, input_ids=chunk, attention_mask=mask, position_ids=pos, use_cache=True))
            logits.append(out.logits.float())
            next_pos = pos[:, -1:] + 1
        self.kv_stats.append(self.kv_session.stats())
        logprobs = F.log_softmax(torch.cat(logits, dim=1), dim=-1)
        results = []
        for i, cont in enumerate(continuations):
            lp = logprobs[i, : len(cont)]
            target = torch.tensor(cont, device=lp.device)
            total = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            results.append((total, greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bs = self._batch_size(override_bs)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="kvcache loglikelihood")
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            contexts, continuations = [], []
            for i in idx:
                (_, _), context_enc, continuation_enc = requests[i]
                if not continuation_enc:
                    raise ValueError("loglikelihood request with an empty continuation")
                if not context_enc:
                    context_enc = [self.prefix_token_id]
                total = context_enc + continuation_enc
                if len(total) > self.max_length:  # keep the most recent max_length tokens, as HFLM does
                    cut = len(total) - self.max_length
                    context_enc = context_enc[cut:] or [self.prefix_token_id]
                contexts.append(context_enc)
                continuations.append(continuation_enc)
            for i, res in zip(idx, self._score_batch(contexts, continuations)):
                results[i] = res
                request = requests[i]
                self.cache_hook.add_partial("loglikelihood", request[0], res)
            bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]
