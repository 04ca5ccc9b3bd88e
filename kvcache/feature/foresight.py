"""Foresight: adaptive layer reuse for DiTs (Adnan et al., 2025, arXiv 2506.00329).

Warmup steps ``0..W-1`` compute every block. At step ``W-2`` each block's output ``C_l`` is cached; at
step ``W-1`` ``delta_l = MSE(out_l, C_l)`` and the threshold ``tau_l = lambda * delta_l`` are set and
``C_l`` is refreshed. After warmup, steps ``k`` with ``k % R == 0`` compute every block and refresh
``delta_l`` and ``C_l``; on other steps a block whose latest ``delta_l <= tau_l`` reuses ``C_l`` and any
other block is recomputed (refreshing ``delta_l`` and ``C_l``). Thresholds come from the request's own
warmup, so they adapt to resolution, frame count and schedule. Every block has its own statistics, so
the spatial and temporal blocks of a video DiT never share them; ``mode="prefix"`` (the released
code's variant) reuses only the longest reusable prefix of the blocks of each kind.

Defaults: ``warmup=8``, ``interval=2``, ``threshold`` (lambda) ``=1.0`` (the paper uses 0.5 for Latte and
CogVideoX), ``mode="block"``. Substitute: the cached output (``reuse="output"``, the paper) or the block
input plus its cached residual (``reuse="residual"``).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcache.feature.base import (
    Decider,
    FeaturePolicy,
    ReuseOutput,
    ReuseResidual,
    Signal,
    StepInfo,
    Substitute,
    Tensors,
    check_choice,
    check_float,
    check_int,
    mse,
)
from kvcache.registry import param, register


class ForesightDecider(Decider):
    def __init__(self, warmup: int, interval: int, lam: float, prefix: bool) -> None:
        self.warmup, self.interval, self.lam, self.prefix = warmup, interval, lam, prefix
        self.delta: dict[int, float] = {}
        self.tau: dict[int, float] = {}

    def begin_step(self, info: StepInfo) -> None:
        super().begin_step(info)
        self.broken: set[str] = set()  # kinds whose reusable prefix ended this step

    def decide(self, index: int, inputs: Tensors, signal: Signal | None) -> bool:
        step = self.info.step
        if step < self.warmup or step % self.interval == 0 or index not in self.tau:
            return True
        kind = self.cache.block_kinds[index]
        reuse = self.delta[index] <= self.tau[index] and kind not in self.broken
        if not reuse and self.prefix:
            self.broken.add(kind)
        return not reuse

    def observe(self, index: int, inputs: Tensors, outputs: Tensors, previous: Tensors | None) -> None:
        step = self.info.step
        if previous is None or step < self.warmup - 1:
            return
        self.delta[index] = mse(outputs, previous)
        if step == self.warmup - 1:
            self.tau[index] = self.lam * self.delta[index]


@register("feature", "foresight")
@dataclass
class Foresight(FeaturePolicy):
    """Foresight: per-block reuse gated by warmup-calibrated MSE thresholds, full recompute every R steps."""

    warmup: int = param(8, "warmup steps W computing every block; thresholds are measured at steps W-2, W-1")
    interval: int = param(2, "R: after warmup, steps k with k % R == 0 recompute every block")
    threshold: float = param(1.0, "lambda: tau_l = lambda * warmup MSE of block l (0 = never reuse)")
    mode: str = param("block", "'block': per-block decision (paper); 'prefix': longest reusable prefix (released code)")
    reuse: str = param("output", "'output': reuse the cached output C_l (paper); 'residual': input + cached out-in")

    def __post_init__(self) -> None:
        check_int("foresight warmup", self.warmup, 2)
        check_int("foresight interval", self.interval, 1)
        check_float("foresight threshold", self.threshold, 0.0)
        check_choice("foresight mode", self.mode, ("block", "prefix"))
        check_choice("foresight reuse", self.reuse, ("output", "residual"))

    def make_decider(self) -> Decider:
        return ForesightDecider(self.warmup, self.interval, self.threshold, self.mode == "prefix")

    def make_substitute(self) -> Substitute:
        return ReuseOutput() if self.reuse == "output" else ReuseResidual()
