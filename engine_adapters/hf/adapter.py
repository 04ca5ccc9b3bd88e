"""``kv_policy``: run any Hugging Face causal LM with a KV policy, ``model.generate`` unchanged.

Inside the context the model's attention goes through :func:`policy_attention`, which attends over the
layer's compacted slots and then lets the cache score and evict; ``generate`` and plain forward calls
get a :class:`~kvcache.engine_adapters.hf.cache.PolicyCache`. Leaving the context restores the model.

With ``prefill_chunk=N`` the model's decoder (``model.base_model``) feeds a prompt longer than N tokens N at a
time into the policy cache, which scores and evicts after every chunk, so the cache holds at most every layer's
budget plus one chunk (:func:`chunked_prompt_forward`); the hidden states of all chunks are joined, so
``generate`` and plain forward calls see the output of one pass.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from typing import Any, Iterator, Sequence

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import kvcache
from kvcache.attention.backends import BACKENDS, attend, attention_with_probabilities
from kvcache.attention.quantized import attend_packed, packed_probabilities
from kvcache.attention.scoring import alibi_key_bias
from kvcache.engine_adapters.hf.cache import CompressionPlan, PolicyCache, PolicyLayer, QuantPolicyLayer
from kvcache.engine_adapters.hf.compat import cache_arg, take_cache
from kvcache.engine_adapters.hf.ragged import RaggedPolicyCache
from kvcache.budget import check_budgets
from kvcache.budget.heads import HeadBudget, parse_head_budget
from kvcache.plan import KVPlan
from kvcache.registry import PolicyConfigError

ATTENTION_NAME = "kvcache"
# model_type -> how attention is reached: through transformers' AttentionInterface, GPT-J's _attn method
# (transformers < 5.24; from 5.24 GPT-J also goes through the interface), or MPT's whole MptAttention.forward
# (MPT adds its ALiBi bias inline, over the physical key positions, so kvcache takes the attention over and
# gives each kept token the bias of its logical position: PolicyLayer.alibi_bias).
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "interface",
    "mistral": "interface",
    "qwen2": "interface",
    "qwen3": "interface",
    "gpt2": "interface",
    "gptj": "gptj",
    "mpt": "mpt",
}
UNSUPPORTED_REASONS: dict[str, str] = {}


def check_model(model: torch.nn.Module) -> str:
    """The model's family, or a clear error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in SUPPORTED_FAMILIES:
        return model_type
    supported = ", ".join(sorted(SUPPORTED_FAMILIES))
    reason = UNSUPPORTED_REASONS.get(model_type or "", "")
    raise PolicyConfigError(
        f"model type {model_type!r} is not supported by kvcache's Hugging Face adapter"
        + (f": {reason}" if reason else "")
        + f". Supported families: {supported} (SmolLM2 is llama)."
    )


def new_token_validity(mask: torch.Tensor | None, q: int) -> torch.Tensor | None:
    """``[B, q]`` which of this pass's tokens are real (not padding), read from HF's 4-D mask: the last
    query row sees every real token. Bool masks are True where allowed, float masks 0 where allowed."""
    if mask is None or mask.dim() != 4:
        return None
    row = mask[:, 0, -1, -q:]
    return row if row.dtype == torch.bool else row == 0


def hf_visibility(mask: torch.Tensor | None, q: int, t: int) -> torch.Tensor | str | None:
    """Visibility from HF's own mask, for passes without a policy cache."""
    if mask is None:
        return "causal" if q == t and q > 1 else None
    return mask if mask.dtype == torch.bool else mask == 0


class KVSession:
    """A model with a KV policy installed. Made by :func:`kv_policy`; ``stats()`` describes the last cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        policy: Any,
        layer_budget: Any,
        budget: float | int | Sequence[float | int],
        backend: str,
        quant: Any = None,
        quant_name: str = "none",
        head_budget: HeadBudget | None = None,
        prefill_chunk: int | None = None,
    ) -> None:
        self.model = model
        self.prefill_chunk = prefill_chunk  # feed prompts this many tokens at a time (None: in one pass)
        self.head_budget = head_budget or HeadBudget()  # how a layer's budget splits over KV heads
        self.quant = quant  # a QuantCodec, or None for the dense cache
        self.quant_name = quant_name
        self.family = check_model(model)
        self.policy = policy
        self.layer_budget = layer_budget
        self.budget = budget
        self.backend = backend
        self.num_layers = model.config.num_hidden_layers
        self.active_cache: PolicyCache | None = None
        self.last_cache: PolicyCache | None = None
        self._undo: list[Any] = []
        # the policy scores every decode step with that step's attention (H2O, Keyformer, TOVA): the decode
        # attention then returns its probabilities, and scoring reuses them instead of a second Q K^T
        self.scores_with_decode_attention = (
            policy.compresses and policy.every_step and policy.observed_prompt_queries(1) > 0
        )

    # -- install / uninstall -------------------------------------------------------------------------
    def install(self) -> None:
        model = self.model
        attention_modules = [
            m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")
        ]
        for module in attention_modules:
            module._kvcache_session = self
            self._undo.append(lambda m=module: delattr(m, "_kvcache_session"))
        if SUPPORTED_FAMILIES[self.family] == "gptj" and all(hasattr(type(m), "_attn") for m in attention_modules):
            # GPT-J before transformers 5.24 computes attention in its own ``_attn``; later it uses the interface
            for module in attention_modules:
                module._attn = types.MethodType(_gptj_attn, module)
                self._undo.append(lambda m=module: delattr(m, "_attn"))
        elif SUPPORTED_FAMILIES[self.family] == "mpt":  # attention inline in MptAttention.forward, no interface
            for module in attention_modules:
                module.forward = types.MethodType(_mpt_attention_forward, module)
                self._undo.append(lambda m=module: delattr(m, "forward"))
        else:
            AttentionInterface.register(ATTENTION_NAME, policy_attention)
            AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
            previous = model.config._attn_implementation
            model.set_attn_implementation(ATTENTION_NAME)
            self._undo.append(lambda: model.set_attn_implementation(previous))
        if self.prefill_chunk is not None:
            decoder = model.base_model
            decoder.forward = chunked_prompt_forward(self, decoder, decoder.forward)
            self._undo.append(lambda: delattr(decoder, "forward"))
        handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._undo.append(handle.remove)
        model.generate = types.MethodType(_generate_with_policy, model)
        self._undo.append(lambda: delattr(model, "generate"))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    # -- caches --------------------------------------------------------------------------------------
    def new_cache(self, max_new_tokens: int | None = None) -> PolicyCache:
        plan = CompressionPlan(KVPlan(self.policy, self.budget, self.layer_budget), self.num_layers, max_new_tokens)
        if self.head_budget.adaptive and self.policy.compresses:  # per-head counts: the ragged layout
            return RaggedPolicyCache(plan, self.head_budget)
        return PolicyCache(plan, self.quant)

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cache = take_cache(kwargs, module)
        if kwargs.get("use_cache") is None:  # a KV policy implies a KV cache, whatever the config says (MPT: false)
            kwargs["use_cache"] = True
        use_cache = kwargs["use_cache"]
        if cache is None and use_cache:
            cache = kwargs[cache_arg(module)] = self.new_cache()
        self.active_cache = cache if isinstance(cache, PolicyCache) else None
        if self.active_cache is not None:
            self.last_cache = self.active_cache
        return args, kwargs

    # -- attention -----------------------------------------------------------------------------------
    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        alibi_slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output ``[B, H_q, q, D]`` for one layer; compresses the layer afterwards. ``alibi_slopes
        [H_q]``: the model adds ALiBi biases (MPT), taken from each slot's logical position."""
        q = query.shape[2]
        cache = self.active_cache
        if cache is None:  # no policy cache: the keys are the sequence itself, slot j at position j
            t = key.shape[2]
            key_bias = None
            if alibi_slopes is not None:
                key_bias = alibi_key_bias(alibi_slopes, torch.arange(t, device=key.device).expand(key.shape[:3]), t - 1)
            return attend(query, key, value, hf_visibility(mask, q, t), scaling, self.backend, key_bias)
        layer: PolicyLayer = cache.layers[layer_idx]
        new_valid = new_token_validity(mask, q)
        if new_valid is not None:  # HF made a mask: padding somewhere (read once per pass, not per layer)
            layer.mark_padding(new_valid, cache.pass_real_tokens(layer, new_valid))
        if isinstance(layer, QuantPolicyLayer):
            return self._attend_quantized(cache, layer, layer_idx, query, scaling)
        key_bias = None if alibi_slopes is None else layer.alibi_bias(alibi_slopes)
        visible = self._visibility(layer, q)
        if visible is None and q == 1 and self.scores_with_decode_attention and layer.budget is not None:
            out, probs = attention_with_probabilities(query, key, value, scaling, key_bias)
            cache.observe(layer_idx, query, scaling, probs, key_bias)
            return out
        out = attend(query, key, value, visible, scaling, self.backend, key_bias)
        if self.policy.compresses:
            cache.observe(layer_idx, query, scaling, key_bias=key_bias)
        return out

    def _attend_quantized(
        self, cache: PolicyCache, layer: QuantPolicyLayer, layer_idx: int, query: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Attention over the layer's quantised store, then eviction, then the store's flush."""
        q = query.shape[2]
        lse = None
        if layer.all_full_precision():  # nothing quantised yet (a prompt pass): the dense kernel on the buffer
            out = attend(query, layer.store.fp_k, layer.store.fp_v, self._visibility(layer, q), scaling, self.backend)
        else:  # block by block over the packed codes, never the whole cache dequantised
            visible = None if q == 1 and layer.all_valid else layer.visible(q)  # a decode query sees every slot
            out, lse = attend_packed(query, layer.store, visible, scaling, return_lse=True)
        evictions = layer.evictions
        probs = None  # this step's probabilities over the packed cache, shared by eviction scoring and saliency
        if lse is not None and self.policy.every_step and layer.budget is not None:
            probs = packed_probabilities(query, layer.store, visible, scaling, lse=lse)
        if self.policy.compresses:
            cache.observe(layer_idx, query, scaling, probs)
        fresh = layer.evictions == evictions  # statistics still match the slots
        layer.settle(query, scaling, lse if fresh else None, probs if fresh else None)
        return out

    @staticmethod
    def _visibility(layer: PolicyLayer, q: int) -> torch.Tensor | str | None:
        """How this pass's queries see the layer's slots, decided from the host mirror of their validity."""
        all_valid = layer.all_valid
        if layer.heads_aligned and layer.length == q and q > 1 and all_valid:
            return "causal"
        if q == 1 and all_valid:  # a decode query sees every stored token
            return None
        visible = layer.visible(q)
        return visible[:, :1] if layer.heads_aligned else visible

    # -- reporting -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Measured figures of the most recent cache: bytes held, tokens kept, lengths."""
        cache = self.last_cache
        if cache is None:
            return {}
        plan = cache.plan
        return {
            "kv_bytes": cache.nbytes(),
            "peak_kv_bytes": cache.peak_nbytes,
            "prefill_chunk": self.prefill_chunk,
            "quant": self.quant_name,
            "head_budget": self.head_budget.spec,
            "bookkeeping_bytes": cache.bookkeeping_nbytes(),
            "kept_tokens_per_layer": cache.kept_tokens_per_layer(),
            "sequences": len(cache.layers[0].kept_tokens()),
            "prompt_tokens": list(plan.prompt_len) if plan.prompt_len is not None else None,
            "logical_tokens": cache.get_seq_length(),
            "uncompressed_sequences": list(plan.uncompressed),
            "notes": list(plan.notes),
        }


def policy_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers AttentionInterface entry: ``[B, q, H_q, D]`` output, no attention weights."""
    session: KVSession = module._kvcache_session
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = session.attend(module.layer_idx, query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def _gptj_attn(self: torch.nn.Module, query, key, value, attention_mask=None):
    """GPT-J's ``_attn`` replacement (GPT-J does not use the AttentionInterface)."""
    out = self._kvcache_session.attend(self.layer_idx, query, key, value, attention_mask, 1.0 / self.scale_attn)
    return out, None


def _mpt_attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_bias: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``MptAttention.forward`` replacement: MPT's projections as in transformers, attention by the session.

    MPT adds ``position_bias`` (ALiBi, ``[H, 1, max_seq_len]``, linear in the key position) to its logits for the
    last ``T`` key positions, ``T`` the keys held: after eviction those would be compacted positions. The
    session adds the bias of each slot's logical position instead, with the per-head slopes read off the
    model's own tensor (the step between two neighbouring keys). MPT's mask is True where hidden."""
    cache = take_cache(kwargs, self)  # ``cache`` from transformers 5.24 on, ``past_key_values`` before
    batch, length = hidden_states.shape[:2]
    mixed = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed = mixed.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (
        part.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2) for part in mixed.chunk(3, dim=2)
    )
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    slopes = None if position_bias is None else position_bias[:, 0, -1] - position_bias[:, 0, -2]
    mask = None if attention_mask is None else ~attention_mask
    out = self._kvcache_session.attend(self.layer_idx, query, key, value, mask, self.softmax_scale, slopes)
    return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1)), None


CHUNKED_KWARGS = ("attention_mask", "position_ids", "cache_position", "token_type_ids")


def chunked_prompt_forward(session: KVSession, decoder: torch.nn.Module, forward: Any) -> Any:
    """``decoder.forward`` feeding a prompt ``session.prefill_chunk`` tokens at a time into a policy cache.

    A pass is chunked when its cache is a :class:`PolicyCache` holding nothing yet and it brings more than
    one chunk; other passes (decode steps, continuations of a filled cache, passes without a policy cache)
    run unchanged. Before the first chunk the cache fixes every sequence's budget from the whole prompt
    (:meth:`PolicyCache.begin_prompt`). Chunk ``[a, b)`` gets ``input_ids``/``inputs_embeds``, ``position_ids``,
    ``cache_position`` and ``token_type_ids`` sliced to ``[a, b)`` and the 2-D ``attention_mask`` to ``[:b]``
    (every position so far, left padding included), exactly what ``generate``'s own chunked prefill passes. The
    output is the last chunk's, with ``last_hidden_state`` (and ``hidden_states``, when asked) joined over the
    chunks, so the LM head sees the same shapes as after one pass."""
    signature = inspect.signature(forward)
    cache_name = cache_arg(decoder)

    @functools.wraps(forward)
    def chunked(*args: Any, **kwargs: Any) -> Any:
        if args:  # bind positional arguments to their names
            bound = signature.bind_partial(*args, **kwargs)
            kwargs = {}
            for name, value in bound.arguments.items():
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    kwargs.update(value)
                else:
                    kwargs[name] = value
        chunk = session.prefill_chunk
        cache = take_cache(kwargs, decoder)
        tokens = kwargs.get("input_ids")
        source = "input_ids" if tokens is not None else "inputs_embeds"
        tokens = kwargs.get(source)
        if (
            chunk is None
            or tokens is None
            or not isinstance(cache, PolicyCache)
            or cache.get_seq_length() != 0
            or tokens.shape[1] <= chunk
        ):
            return forward(**kwargs)
        batch, length = tokens.shape[0], tokens.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or mask.shape[1] != length):
            raise PolicyConfigError(
                f"prefill_chunk needs a 2-D attention_mask [batch, prompt length] on the prompt pass, got shape "
                f"{tuple(mask.shape)}; pass the tokenizer's attention_mask, or drop prefill_chunk for custom masks"
            )
        if kwargs.get("output_attentions"):
            raise PolicyConfigError("output_attentions is not available with prefill_chunk; drop one of them")
        cache.begin_prompt(mask, batch, length, tokens.device)
        hidden, layers_hidden, out = [], [], None
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            part = dict(kwargs)
            part[source] = tokens[:, start:stop]
            for name in CHUNKED_KWARGS:
                value = kwargs.get(name)
                if value is None:
                    continue
                if name == "attention_mask":
                    part[name] = value[:, :stop]
                elif name == "cache_position":
                    part[name] = value[start:stop]
                else:
                    part[name] = value[..., start:stop]
            out = forward(**part)
            hidden.append(out[0])
            states = out.hidden_states if hasattr(out, "hidden_states") else None
            if states is not None:
                layers_hidden.append(states)
        joined = torch.cat(hidden, dim=1)
        if isinstance(out, tuple):
            return (joined, *out[1:])
        out.last_hidden_state = joined
        if layers_hidden:
            out.hidden_states = tuple(torch.cat(per_layer, dim=1) for per_layer in zip(*layers_hidden))
        return out

    return chunked


def _generate_with_policy(self: torch.nn.Module, *args: Any, **kwargs: Any):
    """``model.generate`` with a fresh policy cache per call (the request's own state). It always decodes with
    the cache (``use_cache=True``), whatever the model's generation config says (MPT checkpoints ship
    ``use_cache: false``; generate would then feed the whole sequence at every step into the cache)."""
    session: KVSession = self._kvcache_session_root
    config = kwargs.get("generation_config") or self.generation_config
    if kwargs.get("num_beams", config.num_beams or 1) > 1:
        raise PolicyConfigError("beam search (num_beams > 1) is not supported with a KV policy; use greedy or sampling")
    if kwargs.get("use_cache", True) is False:
        raise PolicyConfigError("use_cache=False runs generate without a KV cache, so a KV policy has nothing to act on")
    kwargs["use_cache"] = True
    if take_cache(kwargs, self) is None:
        max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
        kwargs[cache_arg(self)] = session.new_cache(max_new)
    return type(self).generate(self, *args, **kwargs)


def check_prefill_chunk(plan: KVPlan, chunk: int, quant_name: str = "none", heads: HeadBudget | None = None) -> None:
    """Raise :class:`PolicyConfigError` for a ``prefill_chunk`` this adapter cannot run (see :func:`kv_policy`)."""
    plan.check_prefill_chunk(chunk)
    if quant_name != "none":
        raise PolicyConfigError(
            f"prefill_chunk with quant {quant_name!r} is not supported yet (later chunks would attend over and "
            "re-score the quantised store); use quant=None with prefill_chunk, or drop prefill_chunk"
        )
    if heads is not None and heads.adaptive and plan.policy.compresses:
        raise PolicyConfigError(
            f"prefill_chunk with head_budget {heads.spec!r} is not supported yet (Ada-KV splits a layer's budget "
            "once, at the prompt); use head_budget='uniform' with prefill_chunk, or drop prefill_chunk"
        )
    if plan.layer_budget is not None and plan.layer_budget.cascading and plan.policy.compresses:
        raise PolicyConfigError(
            f"prefill_chunk with layer_budget {plan.layer_budget.registry_name!r} is not supported (it sets layer "
            "budgets from the whole prompt's attention, which chunks never see at once); use uniform or pyramid"
        )


@contextlib.contextmanager
def kv_policy(
    model: torch.nn.Module,
    policy: str | dict = "snapkv",
    budget: float | int | Sequence[float | int] = 0.5,
    *,
    layer_budget: str | dict = "uniform",
    attention: str = "sdpa",
    quant: str | dict | None = None,
    head_budget: str | dict | HeadBudget = "uniform",
    prefill_chunk: int | None = None,
    **policy_params: Any,
) -> Iterator[KVSession]:
    """Install a KV policy on ``model`` for the duration of the ``with`` block.

    ``policy`` and ``layer_budget`` are registry names (``kvcache.names("evict")``,
    ``kvcache.names("budget")``) or ``"name:key=value"`` specs; ``budget`` is a fraction of each prompt
    (float in (0, 1]) or a token count (int >= 1), or a list of those with one budget per batch row (each
    row keeps its own count; ``1.0`` keeps a row whole); ``policy_params`` go to the eviction policy.
    ``quant`` stores the kept tokens quantised: a ``quant`` codec name or spec (``kvcache.names("quant")``,
    e.g. ``"zipcache"``, ``"kivi:bits=4"``); ``None``/``"none"`` keeps today's dense full-precision cache.
    Eviction and quantisation compose: the store holds exactly the slots eviction keeps.
    ``head_budget`` splits each layer's budget over its KV heads: ``"uniform"`` (every head keeps C) or
    ``"adaptive"`` / ``"adaptive:alpha=0.2"`` (Ada-KV, :mod:`kvcache.budget.heads`; each head holds only its
    own kept tokens, :mod:`kvcache.engine_adapters.hf.ragged`).
    ``prefill_chunk`` (tokens) feeds each prompt in chunks of that many tokens and compresses the cache after
    every chunk, so the cache peaks at every layer's budget plus one chunk (a one-pass prompt: plus the whole
    prompt in the layer being fed, and activations that scale with the prompt); budgets are still fractions of
    the whole prompt. Scores differ from one pass: SnapKV observes each chunk's last w queries
    (not the question at the prompt's end); H2O and Keyformer add every chunk's votes, cast over the slots still
    held. ``None`` (default) runs the prompt in one pass.

    >>> with kv_policy(model, "keyformer", budget=0.5) as session:
    ...     out = model.generate(**inputs, max_new_tokens=64)
    ...     session.stats()["kv_bytes"]
    """
    budgets = check_budgets(budget) or (budget,)
    if attention not in BACKENDS:
        raise PolicyConfigError(f"unknown attention backend {attention!r}; valid: {', '.join(BACKENDS)}")
    evict = kvcache.create("evict", policy, **policy_params)
    for value in budgets:
        if isinstance(value, int) and evict.compresses:
            evict.check_budget(value)
    codec, quant_name = None, "none"
    if quant is not None and quant != "none":
        codec = kvcache.create("quant", quant)
        quant_name = codec.registry_name
        if quant_name == "none":
            codec = None
        elif SUPPORTED_FAMILIES.get(getattr(model.config, "model_type", None)) == "mpt":
            raise PolicyConfigError(
                f"quant {quant_name!r} with MPT is not supported yet: attention over the quantised store adds no "
                "ALiBi bias; use quant=None with MPT"
            )
        else:
            config = model.config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            codec.check_head_dim(head_dim)
    heads = parse_head_budget(head_budget)
    if heads.adaptive and codec is not None:
        raise PolicyConfigError(
            f"head_budget {heads.spec!r} with quant {quant_name!r} is not supported: the quantised store keeps one "
            "slot count for all KV heads; use head_budget='uniform' with quant, or quant=None with adaptive heads"
        )
    if heads.adaptive and evict.compresses and evict.shares_layer_selection:
        raise PolicyConfigError(
            f"{evict.registry_name} keeps one selection for all KV heads of a layer, which head_budget {heads.spec!r} "
            f"splits per head; use '{evict.registry_name}:heads=kv' with adaptive head budgets, or head_budget='uniform'"
        )
    layer_budget_policy = kvcache.create("budget", layer_budget)
    if prefill_chunk is not None:
        check_prefill_chunk(KVPlan(evict, budget, layer_budget_policy), prefill_chunk, quant_name, heads)
    session = KVSession(
        model, evict, layer_budget_policy, budget, attention, codec, quant_name, heads, prefill_chunk
    )
    if getattr(model, "_kvcache_session_root", None) is not None:
        raise PolicyConfigError("this model already has a KV policy installed; nest kv_policy contexts one model at a time")
    model._kvcache_session_root = session
    session.install()
    try:
        yield session
    finally:
        session.uninstall()
        del model._kvcache_session_root
