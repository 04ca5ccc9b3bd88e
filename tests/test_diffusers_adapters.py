"""The diffusers hooks on tiny random-config pipelines of every supported architecture (CPU, no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import kvcache  # noqa: E402
from kvcache.feature import EXACT_SETTINGS  # noqa: E402
from kvcache.engine_adapters.diffusers import (  # noqa: E402
    HOOK_NAMES,
    SUPPORTED_MODELS,
    FeatureCacheConfig,
    UnsupportedModelError,
    apply_feature_cache,
    cache_stats,
    disable_cache,
    enable_cache,
    reset_cache,
    tiny,
)
from kvcache.engine_adapters.diffusers.hooks import FEATURE_ATTENTION_HOOK, FEATURE_DENOISER_HOOK  # noqa: E402

@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny models run many times faster that way on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


OFF = {**EXACT_SETTINGS, "foresight": {"warmup": 2, "interval": 2, "threshold": 0.0}}
ON = {
    "foresight": {"warmup": 2, "interval": 3, "threshold": 100.0},
    "static": {"interval": 2},
    "taylorseer": {"interval": 2, "warmup": 1},
    "first-block": {"threshold": 10.0},
    "teacache": {"threshold": 10.0},
    "tokencache": {"k1": 2, "k2": 2, "ratio": 0.5, "blocks": 1.0},
}
STEPS = 5
_PIPES: dict[str, tuple] = {}


def _pipe(arch: str) -> tuple:
    if arch not in _PIPES:
        _PIPES[arch] = tiny.BUILDERS[arch]()
    pipe, kwargs = _PIPES[arch]
    disable_cache(pipe)
    return pipe, kwargs


def _run(pipe, kwargs: dict, steps: int = STEPS, **extra) -> np.ndarray:
    out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **{**kwargs, **extra})
    result = out.images if hasattr(out, "images") else out.frames
    return np.asarray(result.float() if isinstance(result, torch.Tensor) else result)


def _hook_names(module: torch.nn.Module) -> set[str]:
    """Names of the diffusers hooks registered on ``module`` and its submodules."""
    return {name for m in module.modules() if hasattr(m, "_diffusers_hook") for name in m._diffusers_hook.hooks}


def _our_hook_names(module: torch.nn.Module) -> set[str]:
    return _hook_names(module) & set(HOOK_NAMES)


def _token_ok(arch: str) -> bool:
    return arch not in ("FluxTransformer2DModel", "WanTransformer3DModel")


@pytest.mark.parametrize("arch", SUPPORTED_MODELS)
def test_every_policy_off_is_exact_and_on_skips(arch: str) -> None:
    pipe, kwargs = _pipe(arch)
    ref = _run(pipe, kwargs)
    for name in OFF:
        if name == "tokencache" and not _token_ok(arch):
            with pytest.raises(UnsupportedModelError, match="block-level policy"):
                enable_cache(pipe, name, **ON[name])
            continue
        enable_cache(pipe, name, **OFF[name])
        assert np.array_equal(_run(pipe, kwargs), ref), f"{name} off differs on {arch}"
        assert cache_stats(pipe)["skipped"] == 0
        enable_cache(pipe, name, **ON[name])
        out = _run(pipe, kwargs)
        stats = cache_stats(pipe)
        assert out.shape == ref.shape and np.isfinite(out).all()
        assert stats["skipped"] > 0, f"{name} skipped nothing on {arch}"
    disable_cache(pipe)
    assert np.array_equal(_run(pipe, kwargs), ref)
    assert all("forward" not in block.__dict__ for block in pipe.transformer.modules())
    assert not _our_hook_names(pipe.transformer)


@pytest.mark.parametrize("arch", ["DiTTransformer2DModel", "CogVideoXTransformer3DModel"])
def test_tokencache_attention_importance(arch: str) -> None:
    pipe, kwargs = _pipe(arch)
    ref = _run(pipe, kwargs)
    enable_cache(pipe, "tokencache", importance="attention", k1=1, k2=1)
    assert np.array_equal(_run(pipe, kwargs), ref)
    enable_cache(pipe, "tokencache", importance="attention", **ON["tokencache"])
    denoiser = pipe.transformer._diffusers_hook.get_hook(FEATURE_DENOISER_HOOK)
    scores: list[torch.Tensor] = []  # read after each transformer call: a CacheMixin pipeline frees them at its end

    def collect(*_: object) -> None:
        scores.extend(s for c in denoiser.states.live_caches() for s in c.token_scores.values())

    handle = pipe.transformer.register_forward_hook(collect)
    out = _run(pipe, kwargs)
    handle.remove()
    assert scores and all(torch.isclose(s.sum(), torch.tensor(1.0), atol=1e-4) for s in scores)
    assert cache_stats(pipe)["skipped"] > 0 and np.isfinite(out).all() and not np.array_equal(out, ref)
    disable_cache(pipe)
    assert all(not block.attn1._forward_pre_hooks for block in pipe.transformer.transformer_blocks)


def test_state_resets_between_calls_with_different_step_counts() -> None:
    pipe, kwargs = _pipe("PixArtTransformer2DModel")
    enable_cache(pipe, "foresight", warmup=2, interval=3, threshold=1.0)
    _run(pipe, kwargs, steps=7)
    second = _run(pipe, kwargs, steps=4)
    stats_second = cache_stats(pipe)
    enable_cache(pipe, "foresight", warmup=2, interval=3, threshold=1.0)  # fresh state
    fresh = _run(pipe, kwargs, steps=4)
    assert np.array_equal(second, fresh)
    assert stats_second == cache_stats(pipe)


def test_state_resets_when_resolution_changes() -> None:
    pipe, kwargs = _pipe("PixArtTransformer2DModel")
    enable_cache(pipe, "teacache", threshold=0.3)
    _run(pipe, kwargs)
    big = _run(pipe, kwargs, height=24, width=24)
    enable_cache(pipe, "teacache", threshold=0.3)
    assert np.array_equal(big, _run(pipe, kwargs, height=24, width=24))


@pytest.mark.parametrize("use_context", [False, True])
def test_cfg_branches_do_not_share_state(use_context: bool) -> None:
    """Interleaved cond/uncond calls (named by cache_context, or told apart by the repeated timestep)
    give exactly what each branch gives when run alone."""
    pipe, _ = _pipe("WanTransformer3DModel")
    transformer = pipe.transformer
    g = torch.Generator().manual_seed(3)
    x = {"cond": torch.randn(1, 16, 1, 4, 4, generator=g), "uncond": torch.randn(1, 16, 1, 4, 4, generator=g)}
    text = {"cond": torch.randn(1, 5, 16, generator=g), "uncond": torch.zeros(1, 5, 16)}
    timesteps = [900, 700, 500, 300, 100, 50]

    def call(branch: str, t: int) -> torch.Tensor:
        kwargs = {"timestep": torch.tensor([t]), "encoder_hidden_states": text[branch]}
        if use_context:
            with transformer.cache_context(branch):
                return transformer(x[branch], **kwargs).sample
        return transformer(x[branch], **kwargs).sample

    def trajectory(branches: list[str]) -> dict[str, list[torch.Tensor]]:
        enable_cache(transformer, "foresight", warmup=2, interval=4, threshold=5.0)
        out: dict[str, list[torch.Tensor]] = {b: [] for b in branches}
        with torch.no_grad():
            for t in timesteps:
                for b in branches:
                    out[b].append(call(b, t))
        assert cache_stats(transformer)["skipped"] > 0
        disable_cache(transformer)
        return out

    both = trajectory(["cond", "uncond"])
    for branch in ("cond", "uncond"):
        alone = trajectory([branch])
        assert all(torch.equal(a, b) for a, b in zip(both[branch], alone[branch])), branch


def test_new_request_detected_without_pipeline_and_reset_cache() -> None:
    pipe, _ = _pipe("DiTTransformer2DModel")
    transformer = pipe.transformer
    x, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2])
    enable_cache(transformer, "static", interval=3)

    def request() -> list[torch.Tensor]:
        with torch.no_grad():
            return [transformer(x, timestep=torch.tensor([t, t]), class_labels=labels).sample for t in (900, 600, 300, 10)]

    first, second = request(), request()  # the timestep going back up starts a new request
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    reset_cache(transformer)
    assert cache_stats(transformer)["computed"] == 0
    disable_cache(transformer)


def test_unsupported_model_and_bad_parameters() -> None:
    with pytest.raises(UnsupportedModelError, match="DiTTransformer2DModel.*PixArtTransformer2DModel"):
        enable_cache(torch.nn.Linear(2, 2), "foresight")
    pipe, _ = _pipe("DiTTransformer2DModel")
    with pytest.raises(kvcache.PolicyConfigError, match="interval"):
        enable_cache(pipe, "foresight", interval=0)
    with pytest.raises(kvcache.PolicyConfigError, match="valid feature policies"):
        enable_cache(pipe, "magic")
    with pytest.raises(RuntimeError, match="enable_cache"):
        cache_stats(pipe)


def test_pipeline_end_frees_features_and_context_gives_step_count() -> None:
    """Wan calls the transformer inside cache_context("cond"/"uncond", num_inference_steps=...) and resets
    stateful hooks when the call ends: each branch gets the step count, features are freed, counts stay."""
    pipe, kwargs = _pipe("WanTransformer3DModel")
    enable_cache(pipe, "foresight", **ON["foresight"])
    denoiser = pipe.transformer._diffusers_hook.get_hook(FEATURE_DENOISER_HOOK)
    seen: list[tuple[str, int | None]] = []

    def record(*_: object) -> None:
        seen.extend((name, state.cache.num_steps) for name, state in denoiser.states.branches.items())

    handle = pipe.transformer.register_forward_hook(record)
    _run(pipe, kwargs, steps=4)
    handle.remove()
    assert {name for name, _ in seen} == {"ctx:cond", "ctx:uncond"}
    assert {steps for _, steps in seen} == {4}
    assert denoiser.states.live_caches() == []
    stats = cache_stats(pipe)
    assert stats["skipped"] > 0 and stats["computed"] + stats["skipped"] == 2 * 4 * 3  # branches x steps x blocks
    reset_cache(pipe)
    assert cache_stats(pipe)["computed"] == 0
    disable_cache(pipe)


@pytest.mark.parametrize("offload_first", [True, False])
def test_composes_with_diffusers_group_offloading(offload_first: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our hooks and diffusers' block-level group offloading (onload to the CPU) on the same DiT blocks, in
    either registration order: the output and counts equal our cache alone; whichever hook is registered last
    runs first, so with offloading registered first a skipped block is never onloaded. disable_cache removes
    only our hooks: offloading keeps running and the output equals the uncached one."""
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks.group_offloading import GroupOffloadingHook

    params = {"warmup": 2, "interval": 3, "threshold": 100.0}
    pipe, kwargs = _pipe("DiTTransformer2DModel")
    uncached = _run(pipe, kwargs)
    enable_cache(pipe, "foresight", **params)
    reference, reference_stats = _run(pipe, kwargs), cache_stats(pipe)
    disable_cache(pipe)

    pipe, kwargs = tiny.BUILDERS["DiTTransformer2DModel"]()  # a fresh pipeline: the offloading stays on it
    transformer = pipe.transformer
    blocks = set(transformer.transformer_blocks)
    block_onloads = []
    pre_forward = GroupOffloadingHook.pre_forward

    def counting_pre_forward(self, module, *args, **kwargs):
        block_onloads.extend([module] if module in blocks else [])
        return pre_forward(self, module, *args, **kwargs)

    monkeypatch.setattr(GroupOffloadingHook, "pre_forward", counting_pre_forward)

    def offload() -> None:
        apply_group_offloading(transformer, onload_device="cpu", offload_type="block_level", num_blocks_per_group=1)

    config = FeatureCacheConfig("foresight", params, scheduler=pipe.scheduler)
    if offload_first:
        offload()
        apply_feature_cache(transformer, config)
    else:
        apply_feature_cache(transformer, config)
        offload()
    assert _hook_names(transformer) == {"group_offloading", *HOOK_NAMES} - {FEATURE_ATTENTION_HOOK}
    assert np.array_equal(_run(pipe, kwargs), reference)
    stats = cache_stats(transformer)
    assert stats == reference_stats and stats["skipped"] > 0
    calls = stats["computed"] + stats["skipped"]
    assert len(block_onloads) == (stats["computed"] if offload_first else calls)

    disable_cache(transformer)
    assert _hook_names(transformer) == {"group_offloading"}
    block_onloads.clear()
    assert np.array_equal(_run(pipe, kwargs), uncached)
    assert len(block_onloads) == calls
