"""Static reuse (FORA, Selvaraju et al., 2024, arXiv 2407.01425; delta-DiT, Chen et al., 2024, arXiv 2406.01125).

Recompute every block on steps ``k`` with ``k < warmup`` or ``(k - warmup) % N == 0``; in between every
block returns its cached output (``reuse="output"``, FORA) or its input plus the cached residual
``out - in`` (``reuse="residual"``, delta-DiT). Defaults: ``interval=2``, ``warmup=0``, ``reuse="output"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcache.feature.base import (
    Decider,
    FeaturePolicy,
    IntervalDecider,
    ReuseOutput,
    ReuseResidual,
    Substitute,
    check_choice,
    check_int,
)
from kvcache.registry import param, register


@register("feature", "static")
@dataclass
class Static(FeaturePolicy):
    """Static reuse (FORA / delta-DiT): recompute every N steps, reuse block outputs or residuals between."""

    interval: int = param(2, "N: recompute every block every N steps (1 = never reuse)")
    warmup: int = param(0, "leading steps that always compute every block")
    reuse: str = param("output", "'output' (FORA) or 'residual' (delta-DiT: input + cached out-in)")

    def __post_init__(self) -> None:
        check_int("static interval", self.interval, 1)
        check_int("static warmup", self.warmup, 0)
        check_choice("static reuse", self.reuse, ("output", "residual"))

    def make_decider(self) -> Decider:
        return IntervalDecider(self.interval, self.warmup)

    def make_substitute(self) -> Substitute:
        return ReuseOutput() if self.reuse == "output" else ReuseResidual()
