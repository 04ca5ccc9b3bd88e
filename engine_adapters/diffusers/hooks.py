"""Attach a ``feature`` policy to a diffusers pipeline or DiT transformer through diffusers' own hook registry.

``enable_cache(pipe, "foresight", warmup=5, interval=2, threshold=0.5)`` registers diffusers ``ModelHook``\\ s
(``diffusers.hooks.HookRegistry``, the mechanism behind diffusers' own caches and group offloading), each under
a name so it can be found and removed:

* :data:`FEATURE_DENOISER_HOOK` on the transformer: picks the request/branch state and starts its step;
* :data:`FEATURE_BLOCK_HOOK` on each block: computes the block, substitutes its output, or computes some tokens;
* :data:`FEATURE_ATTENTION_HOOK` on a block's self-attention, for policies that rank tokens by the attention
  they receive (TokenCache ``importance="attention"``).

They compose with diffusers' other hooks on the same modules (group offloading, layerwise casting);
``disable_cache(pipe)`` removes exactly these three. :class:`FeatureCacheConfig` with
:func:`apply_feature_cache` is the same entry point in diffusers' shape (``FirstBlockCacheConfig`` +
``apply_first_block_cache``). State is kept per request and per classifier-free-guidance branch, in a
diffusers ``StateManager``:

* a branch is the name given to ``transformer.cache_context(name)`` when the pipeline uses it (diffusers hands
  the context to the state manager), and otherwise the position of the call among consecutive calls with the
  same timestep (cond, uncond); pipelines that batch both branches into one call keep both in the rows of one
  state;
* a new request starts when the pipeline's scheduler got new timesteps (``scheduler.set_timesteps``, seen at
  the next transformer call; it also gives the step count unless the cache context carries
  ``num_inference_steps``), when a branch's timestep goes up, when the latent shape changes (that branch
  only), or on ``reset_cache``. When a pipeline call ends, diffusers resets stateful hooks
  (``maybe_free_model_hooks``): that frees the cached features, and the call's statistics stay readable in
  ``cache_stats`` until the next request starts.

No step count is needed at attach time.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

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

FEATURE_DENOISER_HOOK = "kvcache_feature_denoiser"
FEATURE_BLOCK_HOOK = "kvcache_feature_block"
FEATURE_ATTENTION_HOOK = "kvcache_feature_attention"
HOOK_NAMES: tuple[str, ...] = (FEATURE_DENOISER_HOOK, FEATURE_BLOCK_HOOK, FEATURE_ATTENTION_HOOK)


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


def _class_forward_access(module: torch.nn.Module) -> ArgAccess:
    """Argument names of the module class's own ``forward`` (hooks may have wrapped the instance's)."""
    return ArgAccess(type(module).forward.__get__(module))


# ------------------------------------------------------------------------------------------------ state
class _BranchState(BaseState):
    """One request's state for one CFG branch: the policy's :class:`FeatureCache`, latent shape, last timestep."""

    def __init__(self, cache: FeatureCache, shape: tuple) -> None:
        self.cache, self.shape = cache, shape
        self.last_t: float | None = None

    def reset(self) -> None:
        self.last_t = None


class BranchStates(StateManager):
    """diffusers' ``StateManager`` keyed by CFG branch, with kvcache's fallback for calls outside ``cache_context``.

    diffusers calls :meth:`set_context` when the pipeline enters or leaves ``transformer.cache_context``
    (a ``CacheContext`` in diffusers >= 0.42, a name before). Finished branches are retired: their cached
    features are dropped and their block counts added to ``retired``.
    """

    def __init__(self, policy: FeaturePolicy, block_kinds: list[str]) -> None:
        super().__init__(_BranchState)
        self.policy, self.block_kinds = policy, list(block_kinds)
        self.branches: dict[str, _BranchState] = {}
        self.retired = {"computed": 0.0, "skipped": 0.0}
        self.context_name: str | None = None
        self.context_steps: int | None = None
        self.num_steps: int | None = None
        self.prev_call_t: float | None = None
        self.call_branch = 0

    def set_context(self, context: Any) -> None:
        if context is None or isinstance(context, str):
            self.context_name, self.context_steps = context, None
        else:
            steps = getattr(context, "num_inference_steps", None)
            self.context_name, self.context_steps = context.name, int(steps) if steps is not None else None

    def branch(self, t: float | None) -> str:
        """The branch of this call: the cache context's name, else its position among same-timestep calls."""
        if self.context_name is not None:
            return f"ctx:{self.context_name}"
        if t is not None and t == self.prev_call_t:
            self.call_branch += 1
        else:
            self.call_branch = 0
        self.prev_call_t = t
        return f"call:{self.call_branch}"

    def cache_for(self, branch: str, shape: tuple, t: float | None) -> FeatureCache:
        state = self.branches.get(branch)
        if state is not None and t is not None and state.last_t is not None and t > state.last_t:
            self.retire_all()  # the timestep went up: a new request started
        elif state is not None and state.shape != shape:
            self.retire(branch)  # new resolution / frame count / batch: fresh state for this branch
        if branch not in self.branches:
            num_steps = self.context_steps if self.context_steps is not None else self.num_steps
            self.branches[branch] = _BranchState(self.policy.new_cache(self.block_kinds, num_steps), shape)
        state = self.branches[branch]
        state.last_t = t
        return state.cache

    def retire(self, branch: str) -> None:
        cache = self.branches.pop(branch).cache
        self.retired["computed"] += cache.computed
        self.retired["skipped"] += cache.skipped

    def retire_all(self) -> None:
        for branch in list(self.branches):
            self.retire(branch)

    def end_request(self) -> None:
        """Drop every branch's cached features (keeping their counts in ``retired``) and the call positions."""
        self.retire_all()
        self.prev_call_t, self.call_branch = None, 0

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.end_request()

    def clear(self, num_steps: int | None = None) -> None:
        """Forget features and statistics, as at the start of a request of ``num_steps`` steps."""
        self.branches.clear()
        self.retired = {"computed": 0.0, "skipped": 0.0}
        self.prev_call_t, self.call_branch = None, 0
        self.num_steps = num_steps

    def live_caches(self) -> list[FeatureCache]:
        return [state.cache for state in self.branches.values()]

    def stats(self) -> dict[str, float]:
        computed = self.retired["computed"] + sum(c.computed for c in self.live_caches())
        skipped = self.retired["skipped"] + sum(c.skipped for c in self.live_caches())
        total = computed + skipped
        return {"computed": computed, "skipped": skipped, "fraction_skipped": skipped / total if total else 0.0}


# ------------------------------------------------------------------------------------------------ hooks
class FeatureDenoiserHook(ModelHook):
    """On the transformer: choose the request/branch :class:`FeatureCache`, start its step, and hold it as
    ``current`` for the block hooks while the transformer runs."""

    _is_stateful = True

    def __init__(self, policy: FeaturePolicy, block_kinds: list[str], scheduler: Callable[[], Any]) -> None:
        super().__init__()
        self.policy = policy
        self.states = BranchStates(policy, block_kinds)
        self.scheduler = scheduler
        self.seen_timesteps = getattr(scheduler(), "timesteps", None)
        self.current: FeatureCache | None = None
        self.full_index: int | None = None  # block being computed in full right now (for attention scores)

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.access = _class_forward_access(module)
        return module

    def _check_new_timesteps(self) -> None:
        timesteps = getattr(self.scheduler(), "timesteps", None)
        if timesteps is not None and timesteps is not self.seen_timesteps:
            self.seen_timesteps = timesteps
            self.states.clear(len(timesteps))

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        self._check_new_timesteps()
        hidden = self.access.get("hidden_states", args, kwargs)
        t = _timestep_value(self.access.get("timestep", args, kwargs))
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else ()
        cache = self.states.cache_for(self.states.branch(t), shape, t)
        cache.begin_step(t)
        self.current = cache
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.current = None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.states.end_request()
        return module


class FeatureBlockHook(ModelHook):
    """On block ``index``: let the current :class:`FeatureCache` compute, substitute or partly compute it."""

    def __init__(self, denoiser: FeatureDenoiserHook, index: int, contract: BlockContract) -> None:
        super().__init__()
        self.denoiser, self.index, self.contract = denoiser, index, contract

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.access = _class_forward_access(module)
        return module

    def _to_tuple(self, out: Any) -> Tensors:
        returns = self.contract.returns
        return (out,) if returns is None else tuple(out[i] for i in returns)

    def _from_tuple(self, outs: Tensors) -> Any:
        returns = self.contract.returns
        if returns is None:
            return outs[0]
        result: list[Any] = [None] * len(returns)
        for value, pos in zip(outs, returns):
            result[pos] = value
        return tuple(result)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        original, denoiser, contract, access = self.fn_ref.original_forward, self.denoiser, self.contract, self.access
        cache = denoiser.current
        if cache is None:
            return original(*args, **kwargs)

        def get(name: str) -> Any:
            return access.get(name, args, kwargs)

        inputs = tuple(get(name) for name in contract.inputs)

        def compute(inp: Tensors, tokens: torch.Tensor | None) -> Tensors:
            if tokens is None:
                denoiser.full_index = self.index
                try:
                    return self._to_tuple(original(*args, **kwargs))
                finally:
                    denoiser.full_index = None
            if not contract.token_level:
                raise UnsupportedModelError(
                    f"token-level caching is not supported for {type(module).__name__}'s blocks; "
                    "use a block-level policy (foresight, teacache, first-block, taylorseer, static)"
                )
            count = inp[0].shape[1]
            values = {contract.inputs[0]: inp[0][:, tokens]}
            for name in contract.token_args:
                values[name] = _gather_rows(get(name), tokens, count)
            new_args, new_kwargs = access.replace(values, args, kwargs)
            return self._to_tuple(original(*new_args, **new_kwargs))

        signal = None
        if self.index == 0 and contract.modulated is not None:

            def signal() -> torch.Tensor:
                value = contract.modulated(module, get)  # type: ignore[misc]
                return inputs[0] if value is None else value

        return self._from_tuple(cache.run_block(self.index, inputs, compute, signal))


class AttentionScoreHook(ModelHook):
    """On block ``index``'s self-attention: on a full computation, record the mean attention each token receives
    (``softmax(q k^T / sqrt(d))`` averaged over batch, heads and queries) in ``FeatureCache.token_scores``."""

    def __init__(self, denoiser: FeatureDenoiserHook, index: int) -> None:
        super().__init__()
        self.denoiser, self.index = denoiser, index

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        cache = self.denoiser.current
        if cache is None or self.denoiser.full_index != self.index:
            return args, kwargs
        x = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            return args, kwargs
        heads = getattr(module, "heads", 1)
        b, n, _ = x.shape
        q = module.to_q(x).view(b, n, heads, -1).transpose(1, 2)
        k = module.to_k(x).view(b, n, heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        cache.token_scores[self.index] = probs.float().mean(dim=(0, 1, 2))
        return args, kwargs


# ------------------------------------------------------------------------------------------ config + apply
@dataclass
class FeatureCacheConfig:
    """kvcache feature caching in diffusers' config shape, for :func:`apply_feature_cache`.

    ``policy``: a registered ``feature`` policy name (``"foresight"``, ``"tokencache"``, ``"teacache"``,
    ``"first-block"``, ``"taylorseer"``, ``"static"``), a spec dict, or a policy from ``kvcache.create``;
    ``params``: its parameters when ``policy`` is a name or spec; ``scheduler``: the pipeline's scheduler, or a
    zero-argument callable returning it (new timesteps there start a new request and give the step count).
    """

    policy: str | dict | FeaturePolicy
    params: dict[str, Any] = field(default_factory=dict)
    scheduler: Any = None

    def create_policy(self) -> FeaturePolicy:
        if isinstance(self.policy, FeaturePolicy):
            if self.params:
                raise kvcache.PolicyConfigError("pass parameters either to kvcache.create or to enable_cache, not both")
            return self.policy
        return kvcache.create("feature", self.policy, **self.params)

    def scheduler_getter(self) -> Callable[[], Any]:
        source = self.scheduler
        return source if callable(source) else lambda: source


def _check_supported(transformer: torch.nn.Module, policy: FeaturePolicy) -> BlockContract:
    contract = contract_for(transformer)
    if policy.token_level and not contract.token_level:
        token_ok = [name for name, c in _CONTRACTS.items() if c.token_level]
        raise UnsupportedModelError(
            f"{type(policy).registry_name} caches tokens inside blocks, which {type(transformer).__name__} "
            f"does not support; use it with {', '.join(token_ok)}, or pick a block-level policy"
        )
    return contract


def _invalidate_context_cache(module: torch.nn.Module) -> None:
    """diffusers >= 0.42 caches which child modules carry hooks (for ``cache_context``); hooks changed."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def apply_feature_cache(module: torch.nn.Module, config: FeatureCacheConfig) -> None:
    """Register kvcache's feature-cache hooks on transformer ``module`` (replacing ours attached before).

    Raises :class:`~kvcache.engine_adapters.diffusers.contracts.UnsupportedModelError` for a transformer without
    a block contract and :class:`kvcache.PolicyConfigError` for bad parameters, before touching the module.
    """
    policy = config.create_policy()
    contract = _check_supported(module, policy)
    remove_feature_cache(module)
    blocks = ordered_blocks(module, contract)
    denoiser = FeatureDenoiserHook(policy, [kind for _, kind in blocks], config.scheduler_getter())
    for index, (block, _) in enumerate(blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            FeatureBlockHook(denoiser, index, contract), FEATURE_BLOCK_HOOK
        )
        attn = getattr(block, "attn1", None)
        if policy.wants_attention and attn is not None and hasattr(attn, "to_q") and hasattr(attn, "to_k"):
            HookRegistry.check_if_exists_or_initialize(attn).register_hook(
                AttentionScoreHook(denoiser, index), FEATURE_ATTENTION_HOOK
            )
    HookRegistry.check_if_exists_or_initialize(module).register_hook(denoiser, FEATURE_DENOISER_HOOK)
    _invalidate_context_cache(module)


def _restore_class_forward(module: torch.nn.Module) -> None:
    """Once no hook is left on ``module``, drop the bound-method ``forward`` diffusers' registry leaves behind."""
    registry = module.__dict__.get("_diffusers_hook")
    forward = module.__dict__.get("forward")
    if registry is None or registry.hooks or forward is None:
        return
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]


def remove_feature_cache(module: torch.nn.Module) -> None:
    """Remove kvcache's feature-cache hooks from ``module`` and its submodules; other hooks stay."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    for name in HOOK_NAMES:
        registry.remove_hook(name, recurse=True)
    for submodule in module.modules():
        _restore_class_forward(submodule)
    _invalidate_context_cache(module)


def _denoiser_hook(transformer: torch.nn.Module) -> FeatureDenoiserHook | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry.get_hook(FEATURE_DENOISER_HOOK) if registry is not None else None


# ------------------------------------------------------------------------------------------- public API
def _split(obj: Any) -> tuple[list[torch.nn.Module], Callable[[], Any]]:
    """Transformers to hook (``transformer`` and, when present, ``transformer_2``) and a getter of the scheduler."""
    if isinstance(obj, torch.nn.Module):
        return [obj], lambda: None
    transformers = [t for t in (getattr(obj, "transformer", None), getattr(obj, "transformer_2", None)) if t is not None]
    if not transformers:
        raise TypeError(f"{type(obj).__name__} is neither a diffusers pipeline with a .transformer nor a torch module")
    pipeline = weakref.ref(obj)  # read at each call: the user may swap pipe.scheduler after enable_cache
    return transformers, lambda: getattr(pipeline(), "scheduler", None)


def enable_cache(obj: Any, policy: str | dict | FeaturePolicy, **params: Any) -> FeaturePolicy:
    """Attach feature policy ``policy`` (a registry name/spec or a created policy) to a pipeline or transformer.

    Replaces any policy attached before. Raises :class:`~kvcache.engine_adapters.diffusers.contracts.UnsupportedModelError`
    for a transformer without a block contract and :class:`kvcache.PolicyConfigError` for bad parameters.
    """
    transformers, scheduler = _split(obj)
    config = FeatureCacheConfig(policy, params, scheduler)
    created = config.create_policy()
    for transformer in transformers:  # raise before touching anything
        _check_supported(transformer, created)
    disable_cache(obj)
    for transformer in transformers:
        apply_feature_cache(transformer, FeatureCacheConfig(created, scheduler=scheduler))
    return created


def disable_cache(obj: Any) -> None:
    """Remove the feature cache from a pipeline or transformer (a no-op when none is attached)."""
    for transformer in _split(obj)[0]:
        remove_feature_cache(transformer)


def _hooks(obj: Any) -> list[FeatureDenoiserHook]:
    found = [hook for hook in map(_denoiser_hook, _split(obj)[0]) if hook is not None]
    if not found:
        raise RuntimeError("no feature cache is attached; call enable_cache(pipe_or_transformer, policy) first")
    return found


def reset_cache(obj: Any) -> None:
    """Forget all cached features and statistics, as at the start of a new request."""
    for hook in _hooks(obj):
        hook.states.clear()


def cache_stats(obj: Any) -> dict[str, float]:
    """Block computations done and skipped (token-level partial blocks count fractionally) since the last reset."""
    computed = skipped = 0.0
    for hook in _hooks(obj):
        s = hook.states.stats()
        computed, skipped = computed + s["computed"], skipped + s["skipped"]
    total = computed + skipped
    return {"computed": computed, "skipped": skipped, "fraction_skipped": skipped / total if total else 0.0}
