"""Engine-agnostic tests of the DiT feature policies on a toy block stack (torch only, no diffusers)."""

from __future__ import annotations

import math

import pytest
import torch

import kvcache
from kvcache.feature import EXACT_SETTINGS
from kvcache.feature.base import FeatureCache, TaylorForecast
from kvcache.registry import PolicyConfigError

@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny models run many times faster that way on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


OFF_SETTINGS = {**EXACT_SETTINGS, "foresight": {"warmup": 3, "interval": 2, "threshold": 0.0},
                "taylorseer": {"interval": 1, "order": 2}}
ON_SETTINGS = {
    "foresight": {"warmup": 3, "interval": 3, "threshold": 2.0},
    "static": {"interval": 3},
    "taylorseer": {"interval": 3, "order": 1, "warmup": 2},
    "first-block": {"threshold": 0.5},
    "teacache": {"threshold": 0.5},
    "tokencache": {"k1": 3, "k2": 3, "ratio": 0.5, "blocks": 0.5},
}


class ToyStack:
    """A denoising loop over residual blocks whose update depends smoothly on the timestep."""

    def __init__(self, blocks: int = 6, tokens: int = 8, dim: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weights = [torch.randn(dim, dim, generator=g) / dim**0.5 for _ in range(blocks)]
        self.x0 = torch.randn(2, tokens, dim, generator=g)

    def block(self, i: int, x: torch.Tensor, t: float) -> torch.Tensor:
        return x + 0.3 * torch.tanh(x @ self.weights[i] * (1.0 + 0.5 * t))

    def run(self, policy: object | None, steps: int = 12) -> tuple[torch.Tensor, FeatureCache | None]:
        cache = policy.new_cache(["block"] * len(self.weights), steps) if policy is not None else None
        x = self.x0.clone()
        for s in range(steps):
            t = 1.0 - s / steps
            h = x
            if cache is not None:
                cache.begin_step(t)
            for i in range(len(self.weights)):
                if cache is None:
                    h = self.block(i, h, t)
                else:
                    def compute(inp, tokens, i=i):
                        src = inp[0] if tokens is None else inp[0][:, tokens]
                        return (self.block(i, src, t),)

                    h = cache.run_block(i, (h,), compute, signal=lambda h=h: h * (1.0 + t))[0]
            x = x - 0.1 * h
        return x, cache


@pytest.mark.parametrize("name", sorted(OFF_SETTINGS))
def test_off_settings_reproduce_uncached_exactly(name: str) -> None:
    toy = ToyStack()
    ref, _ = toy.run(None)
    out, cache = toy.run(kvcache.create("feature", name, **OFF_SETTINGS[name]))
    assert torch.equal(ref, out)
    assert cache.skipped == 0


@pytest.mark.parametrize("name", sorted(ON_SETTINGS))
def test_on_settings_skip_and_stay_close(name: str) -> None:
    toy = ToyStack()
    ref, _ = toy.run(None)
    out, cache = toy.run(kvcache.create("feature", name, **ON_SETTINGS[name]))
    assert cache.skipped > 0
    assert not torch.equal(ref, out)
    assert float((ref - out).abs().max()) < 0.5 * float(ref.abs().max())


@pytest.mark.parametrize(
    "name,key,values",
    [
        ("foresight", "threshold", [0.0, 0.5, 1.0, 2.0, 4.0, 16.0]),
        ("first-block", "threshold", [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]),
        ("teacache", "threshold", [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]),
    ],
)
def test_fraction_skipped_grows_with_threshold(name: str, key: str, values: list[float]) -> None:
    toy = ToyStack()
    fractions = [toy.run(kvcache.create("feature", name, **{key: v}), steps=20)[1].stats()["fraction_skipped"] for v in values]
    assert fractions[0] == 0.0
    assert fractions[-1] > 0.0
    assert all(a <= b for a, b in zip(fractions, fractions[1:])), fractions


def test_foresight_thresholds_are_lambda_times_warmup_mse() -> None:
    toy, warmup, lam = ToyStack(), 4, 0.7
    # uncached block outputs at steps W-2 and W-1
    outputs: dict[int, list[torch.Tensor]] = {}
    x = toy.x0.clone()
    for s in range(warmup):
        t = 1.0 - s / warmup
        h = x
        for i in range(len(toy.weights)):
            h = toy.block(i, h, t)
            outputs.setdefault(s, []).append(h)
        x = x - 0.1 * h
    _, cache = toy.run(kvcache.create("feature", "foresight", warmup=warmup, threshold=lam), steps=warmup)
    for i in range(len(toy.weights)):
        measured = float((outputs[warmup - 1][i] - outputs[warmup - 2][i]).pow(2).mean())
        assert cache.decider.tau[i] == pytest.approx(lam * measured, rel=1e-6)


def _forecast_errors(f, order: int, full_steps: list[int], probe: list[int]) -> float:
    sub = TaylorForecast(order)
    for s in full_steps:
        sub.store(0, (torch.zeros(3),), (f(s),), s)
    return max(float((sub.produce(0, (torch.zeros(3),), s)[0] - f(s)).abs().max()) for s in probe)


def test_taylorseer_order1_is_exact_on_a_linear_trajectory() -> None:
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.25, 0.5, -1.0])
    err = _forecast_errors(lambda s: a + b * s, order=1, full_steps=[0, 1, 2, 6], probe=[7, 8, 9])
    assert err < 1e-5


def test_taylorseer_error_shrinks_with_order_on_a_smooth_trajectory() -> None:
    f = lambda s: torch.tensor([math.sin(0.1 * s), math.cos(0.07 * s), math.exp(-0.05 * s)])  # noqa: E731
    errors = [_forecast_errors(f, order, full_steps=[0, 1, 2, 3, 4], probe=[5, 6, 7]) for order in (0, 1, 2, 3)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize(
    "name,params,needle",
    [
        ("foresight", {"warmup": 1}, "warmup"),
        ("foresight", {"interval": 0}, "interval"),
        ("foresight", {"threshold": -1.0}, "threshold"),
        ("foresight", {"mode": "zigzag"}, "mode"),
        ("static", {"interval": 0}, "interval"),
        ("static", {"reuse": "nothing"}, "reuse"),
        ("taylorseer", {"order": 9}, "order"),
        ("first-block", {"threshold": float("nan")}, "threshold"),
        ("first-block", {"head": 0}, "head"),
        ("teacache", {"coefficients": "a;b"}, "coefficients"),
        ("tokencache", {"ratio": 1.0}, "ratio"),
        ("tokencache", {"importance": "predictor"}, "predictor"),
    ],
)
def test_bad_parameters_give_clear_errors(name: str, params: dict, needle: str) -> None:
    with pytest.raises(PolicyConfigError, match=needle):
        kvcache.create("feature", name, **params)


def test_unknown_parameter_and_spec_strings() -> None:
    with pytest.raises(PolicyConfigError, match="valid parameters"):
        kvcache.create("feature", "foresight", lambda_=1.0)
    policy = kvcache.create("feature", "teacache:threshold=0.2,coefficients=2;0.5")
    assert policy.threshold == 0.2 and policy._coeffs == (2.0, 0.5)
    assert set(kvcache.names("feature")) == {"foresight", "tokencache", "teacache", "first-block", "taylorseer", "static"}
