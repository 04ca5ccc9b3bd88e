"""TaylorSeer: from reusing to forecasting features (Liu et al., 2025, arXiv 2503.06923).

Full steps (the first ``warmup`` steps, then every ``interval``-th) compute every block and store
finite-difference derivatives of its output up to order ``m``:
``D_0 = F(k)``, ``D_i = (D_{i-1}(k) - D_{i-1}(k')) / (k - k')`` with ``k'`` the previous full step. Skipped
steps ``s`` forecast ``F(s) = sum_{i<=m} D_i (s - k)^i / i!``. Order 0 is plain reuse.
Defaults: ``interval=4``, ``order=1``, ``warmup=3`` (the paper uses N = 4-6, order 1-2).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcache.feature.base import Decider, FeaturePolicy, IntervalDecider, Substitute, TaylorForecast, check_int
from kvcache.registry import param, register


@register("feature", "taylorseer")
@dataclass
class TaylorSeer(FeaturePolicy):
    """TaylorSeer: full steps every N, Taylor-series forecast of each block's output in between."""

    interval: int = param(4, "N: a full step every N steps after warmup (1 = never forecast)")
    order: int = param(1, "m: highest derivative order of the Taylor forecast (0 = reuse)")
    warmup: int = param(3, "leading steps that always compute every block")

    def __post_init__(self) -> None:
        check_int("taylorseer interval", self.interval, 1)
        check_int("taylorseer order", self.order, 0, 4)
        check_int("taylorseer warmup", self.warmup, 0)

    def make_decider(self) -> Decider:
        return IntervalDecider(self.interval, self.warmup)

    def make_substitute(self) -> Substitute:
        return TaylorForecast(self.order)
