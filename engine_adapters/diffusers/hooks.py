"""Attach a ``feature`` policy to a diffusers pipeline or DiT transformer with one call.

``enable_cache(pipe, "foresight", warmup=5, interval=2, threshold=0.5)`` wraps the forward of the
transformer and of each of its blocks (instance attributes, nothing copied from the model source);
``disable_cache(pipe)`` restores them. State is kept per request and per classifier-free-guidance
branch:

* a branch is the name given to ``transformer.cache_context(name)`` when the pipeline uses it, and
  otherwise the position of the call among consecutive calls with the same timestep (cond, uncond);
  pipelines that batch both branches into one call keep both in the rows of one state;
* a new request starts when the pipeline calls ``scheduler.set_timesteps`` (which also gives the step
  count), when a branch's timestep goes up, when the latent shape changes, or on ``reset_cache``.
No step count is needed at attach time.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch

import kvcache
from kvcache.engine_adapters.diffusers.contracts import (
    _CONTRACTS,
    ArgAccess,
    BlockContract,
    UnsupportedModelError,
    contract_for,
    ordered_blocks,
)
from kvcache.feature.base import FeatureCache, FeaturePolicy, Tensors

_ATTR = "_kvcache_feature_cache"


def _timestep_value(timestep: Any) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0]) if timestep.numel() else None
    return float(timestep)


def _gather_rows(value: Any, tokens: torch.Tensor, count: int) -> Any:
    """Gather ``tokens`` along dim 0 of a per-token table (or a tuple of them) with ``count`` rows."""
    if isinstance(value, torch.Tensor):
        return value[tokens] if value.ndim and value.shape[0] == count else value
    if isinstance(value, (tuple, list)):
        return type(value)(_gather_rows(v, tokens, count) for v in value)
    return value


class _Controller:
    """Per-transformer hook state: the wrapped forwards and one FeatureCache per CFG branch."""

    def __init__(self, transformer: torch.nn.Module, policy: FeaturePolicy, contract: BlockContract, scheduler: Any):
        self.transformer, self.policy, self.contract, self.scheduler = transformer, policy, contract, scheduler
        self.blocks = ordered_blocks(transformer, contract)
        self.kinds = [kind for _, kind in self.blocks]
        self.caches: dict[str, FeatureCache] = {}
        self.shapes: dict[str, tuple] = {}
        self.last_t: dict[str, float | None] = {}
        self.retired = {"computed": 0.0, "skipped": 0.0}
        self.current: FeatureCache | None = None
        self.context: tuple[str, dict] | None = None
        self.prev_call_t: float | None = None
        self.call_branch = 0
        self.num_steps: int | None = None
        self.full_index: int | None = None  # block being computed in full right now (for attention scores)
        self._installed: list[tuple[Any, str]] = []
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ install / remove
    def _patch(self, owner: Any, name: str, value: Any) -> None:
        setattr(owner, name, value)
        self._installed.append((owner, name))

    def install(self) -> None:
        t = self.transformer
        self._patch(t, "forward", self._wrap_transformer(t.forward))
        for index, (block, _) in enumerate(self.blocks):
            self._patch(block, "forward", self._wrap_block(index, block, block.forward))
        if hasattr(t, "cache_context"):
            self._patch(t, "cache_context", self._wrap_context(t.cache_context))
        if getattr(self.policy, "wants_attention", False):
            for index, (block, _) in enumerate(self.blocks):
                attn = getattr(block, "attn1", None)
                if attn is not None and hasattr(attn, "to_q") and hasattr(attn, "to_k"):
                    self._handles.append(attn.register_forward_pre_hook(self._attention_hook(index), with_kwargs=True))
        if self.scheduler is not None and hasattr(self.scheduler, "set_timesteps"):
            self._patch(self.scheduler, "set_timesteps", self._wrap_set_timesteps(self.scheduler.set_timesteps))

    def _attention_hook(self, index: int) -> Any:
        """Pre-hook on a block's self-attention: on full computations, record the attention each token receives."""

        def hook(attn: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            cache = self.current
            if cache is None or self.full_index != index:
                return
            x = kwargs.get("hidden_states", args[0] if args else None)
            if not isinstance(x, torch.Tensor) or x.ndim != 3:
                return
            heads = getattr(attn, "heads", 1)
            b, n, _ = x.shape
            q = attn.to_q(x).view(b, n, heads, -1).transpose(1, 2)
            k = attn.to_k(x).view(b, n, heads, -1).transpose(1, 2)
            probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
            cache.token_scores[index] = probs.float().mean(dim=(0, 1, 2))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for owner, name in reversed(self._installed):
            try:
                delattr(owner, name)
            except AttributeError:
                pass
        self._installed.clear()

    # ------------------------------------------------------------------ state
    def reset(self, num_steps: int | None = None) -> None:
        self.caches.clear()
        self.shapes.clear()
        self.last_t.clear()
        self.retired = {"computed": 0.0, "skipped": 0.0}
        self.prev_call_t = None
        self.call_branch = 0
        self.num_steps = num_steps

    def stats(self) -> dict[str, float]:
        computed = self.retired["computed"] + sum(c.computed for c in self.caches.values())
        skipped = self.retired["skipped"] + sum(c.skipped for c in self.caches.values())
        total = computed + skipped
        return {"computed": computed, "skipped": skipped, "fraction_skipped": skipped / total if total else 0.0}

    def _branch(self, t: float | None) -> str:
        if self.context is not None:
            return f"ctx:{self.context[0]}"
        if t is not None and t == self.prev_call_t:
            self.call_branch += 1
        else:
            self.call_branch = 0
        self.prev_call_t = t
        return f"call:{self.call_branch}"

    def _cache_for(self, branch: str, shape: tuple, t: float | None) -> FeatureCache:
        last = self.last_t.get(branch)
        if branch in self.caches and t is not None and last is not None and t > last:
            self._retire_all()  # the timestep went up: a new request started
        if branch in self.caches and self.shapes[branch] != shape:
            self._retire(branch)  # new resolution / frame count / batch: fresh state for this branch
        if branch not in self.caches:
            num_steps = self.num_steps
            if self.context is not None and self.context[1].get("num_inference_steps") is not None:
                num_steps = int(self.context[1]["num_inference_steps"])
            self.caches[branch] = self.policy.new_cache(self.kinds, num_steps)
            self.shapes[branch] = shape
        self.last_t[branch] = t
        return self.caches[branch]

    def _retire(self, branch: str) -> None:
        cache = self.caches.pop(branch)
        self.retired["computed"] += cache.computed
        self.retired["skipped"] += cache.skipped
        self.shapes.pop(branch, None)
        self.last_t.pop(branch, None)

    def _retire_all(self) -> None:
        for branch in list(self.caches):
            self._retire(branch)

    # ------------------------------------------------------------------ wrappers
    def _wrap_transformer(self, original: Any) -> Any:
        access = ArgAccess(original)

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = access.get("hidden_states", args, kwargs)
            t = _timestep_value(access.get("timestep", args, kwargs))
            branch = self._branch(t)
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else ()
            cache = self._cache_for(branch, shape, t)
            cache.begin_step(t)
            self.current = cache
            try:
                return original(*args, **kwargs)
            finally:
                self.current = None

        return forward

    def _wrap_block(self, index: int, block: torch.nn.Module, original: Any) -> Any:
        access, contract = ArgAccess(original), self.contract

        def to_tuple(out: Any) -> Tensors:
            return (out,) if contract.returns is None else tuple(out[i] for i in contract.returns)

        def from_tuple(outs: Tensors) -> Any:
            if contract.returns is None:
                return outs[0]
            result: list[Any] = [None] * len(contract.returns)
            for value, pos in zip(outs, contract.returns):
                result[pos] = value
            return tuple(result)

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            cache = self.current
            if cache is None:
                return original(*args, **kwargs)

            def get(name: str) -> Any:
                return access.get(name, args, kwargs)

            inputs = tuple(get(name) for name in contract.inputs)

            def compute(inp: Tensors, tokens: torch.Tensor | None) -> Tensors:
                if tokens is None:
                    self.full_index = index
                    try:
                        return to_tuple(original(*args, **kwargs))
                    finally:
                        self.full_index = None
                if not contract.token_level:
                    raise UnsupportedModelError(
                        f"token-level caching is not supported for {type(self.transformer).__name__}; "
                        "use a block-level policy (foresight, teacache, first-block, taylorseer, static)"
                    )
                count = inp[0].shape[1]
                values = {contract.inputs[0]: inp[0][:, tokens]}
                for name in contract.token_args:
                    values[name] = _gather_rows(get(name), tokens, count)
                new_args, new_kwargs = access.replace(values, args, kwargs)
                return to_tuple(original(*new_args, **new_kwargs))

            signal = None
            if index == 0 and contract.modulated is not None:

                def signal() -> torch.Tensor:
                    value = contract.modulated(block, get)  # type: ignore[misc]
                    return inputs[0] if value is None else value

            return from_tuple(cache.run_block(index, inputs, compute, signal))

        return forward

    def _wrap_context(self, original: Any) -> Any:
        @contextlib.contextmanager
        def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
            previous, self.context = self.context, (name, kwargs)
            try:
                with original(name, **kwargs):
                    yield
            finally:
                self.context = previous

        return cache_context

    def _wrap_set_timesteps(self, original: Any) -> Any:
        @functools.wraps(original)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            timesteps = getattr(self.scheduler, "timesteps", None)
            self.reset(len(timesteps) if timesteps is not None else None)
            return result

        return set_timesteps


def _split(obj: Any) -> tuple[list[torch.nn.Module], Any]:
    """Transformers to hook (``transformer`` and, when present, ``transformer_2``) and the scheduler."""
    if isinstance(obj, torch.nn.Module):
        return [obj], None
    transformers = [t for t in (getattr(obj, "transformer", None), getattr(obj, "transformer_2", None)) if t is not None]
    if not transformers:
        raise TypeError(f"{type(obj).__name__} is neither a diffusers pipeline with a .transformer nor a torch module")
    return transformers, getattr(obj, "scheduler", None)


def enable_cache(obj: Any, policy: str | dict | FeaturePolicy, **params: Any) -> FeaturePolicy:
    """Attach feature policy ``policy`` (a registry name/spec or a created policy) to a pipeline or transformer.

    Replaces any policy attached before. Raises :class:`~kvcache.engine_adapters.diffusers.contracts.UnsupportedModelError`
    for a transformer without a block contract and :class:`kvcache.PolicyConfigError` for bad parameters.
    """
    if isinstance(policy, FeaturePolicy):
        if params:
            raise kvcache.PolicyConfigError("pass parameters either to kvcache.create or to enable_cache, not both")
        created = policy
    else:
        created = kvcache.create("feature", policy, **params)
    transformers, scheduler = _split(obj)
    contracts = [contract_for(t) for t in transformers]  # raise before touching anything
    for transformer, contract in zip(transformers, contracts):
        if created.token_level and not contract.token_level:
            token_ok = [name for name, c in _CONTRACTS.items() if c.token_level]
            raise UnsupportedModelError(
                f"{type(created).registry_name} caches tokens inside blocks, which {type(transformer).__name__} "
                f"does not support; use it with {', '.join(token_ok)}, or pick a block-level policy"
            )
    disable_cache(obj)
    for transformer, contract in zip(transformers, contracts):
        controller = _Controller(transformer, created, contract, scheduler)
        controller.install()
        object.__setattr__(transformer, _ATTR, controller)
    return created


def disable_cache(obj: Any) -> None:
    """Remove the feature cache from a pipeline or transformer (a no-op when none is attached)."""
    for transformer in _split(obj)[0]:
        controller = transformer.__dict__.pop(_ATTR, None)
        if controller is not None:
            controller.remove()


def _controllers(obj: Any) -> list[_Controller]:
    found = [t.__dict__.get(_ATTR) for t in _split(obj)[0]]
    if not any(found):
        raise RuntimeError("no feature cache is attached; call enable_cache(pipe_or_transformer, policy) first")
    return [c for c in found if c is not None]


def reset_cache(obj: Any) -> None:
    """Forget all cached features and statistics, as at the start of a new request."""
    for controller in _controllers(obj):
        controller.reset()


def cache_stats(obj: Any) -> dict[str, float]:
    """Block computations done and skipped (token-level partial blocks count fractionally) since the last reset."""
    computed = skipped = 0.0
    for controller in _controllers(obj):
        s = controller.stats()
        computed, skipped = computed + s["computed"], skipped + s["skipped"]
    total = computed + skipped
    return {"computed": computed, "skipped": skipped, "fraction_skipped": skipped / total if total else 0.0}
