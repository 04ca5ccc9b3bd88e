"""TeaCache: timestep-embedding-aware cache (Liu et al., 2024, arXiv 2411.19108).

The gate is block 0's timestep-modulated input ``m_t`` (supplied by the engine adapter; the block input
when the architecture gives none). Each step adds ``max(0, p(rel_l1(m_t, m_{t-1})))`` to an accumulator,
``p`` being the per-model rescaling polynomial (highest power first, as ``numpy.polyval``). While the
accumulator stays below ``threshold`` every block is skipped and returns its input plus its cached
residual (together: the cached residual of the whole stack); otherwise all blocks are computed and the
accumulator resets. The first step, and the last one when the step count is known, always compute.
``kvcache teacache-calibrate`` fits ``p`` for a new model. Defaults: ``threshold=0.1``,
``coefficients="1;0"`` (the identity: no rescaling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.feature.base import (
    Decider,
    FeaturePolicy,
    ReuseResidual,
    Signal,
    StackDecider,
    Substitute,
    Tensors,
    check_float,
    rel_l1,
)
from kvcache.registry import PolicyConfigError, param, register


def parse_coefficients(value: "str | tuple[float, ...] | list[float]") -> tuple[float, ...]:
    """``"a;b;c"`` / ``"a b c"`` / a sequence -> a tuple of floats (highest power first)."""
    items = value.replace(";", " ").replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        coeffs = tuple(float(c) for c in items)
    except (TypeError, ValueError):
        raise PolicyConfigError(f"teacache coefficients must be numbers separated by ';', got {value!r}") from None
    if not coeffs:
        raise PolicyConfigError("teacache coefficients must hold at least one number, e.g. '1;0'")
    return coeffs


def polyval(coeffs: tuple[float, ...], x: float) -> float:
    out = 0.0
    for c in coeffs:
        out = out * x + c
    return out


class TeaCacheDecider(StackDecider):
    def __init__(self, threshold: float, coeffs: tuple[float, ...]) -> None:
        self.threshold, self.coeffs = threshold, coeffs
        self.previous: torch.Tensor | None = None
        self.accumulated = 0.0

    def gate(self, inputs: Tensors, signal: Signal | None) -> bool:
        modulated = signal() if signal is not None else inputs[0]
        previous, self.previous = self.previous, modulated
        if previous is None or previous.shape != modulated.shape or self.info.step == 0 or self.info.is_last:
            self.accumulated = 0.0
            return False
        self.accumulated += max(0.0, polyval(self.coeffs, rel_l1(modulated, previous)))
        if self.accumulated < self.threshold:
            return True
        self.accumulated = 0.0
        return False


@register("feature", "teacache")
@dataclass
class TeaCache(FeaturePolicy):
    """TeaCache: skip the whole block stack while the rescaled change of the modulated input stays small."""

    threshold: float = param(0.1, "skip while the accumulated rescaled rel-L1 change is below this (0 = never)")
    coefficients: str = param("1;0", "rescaling polynomial, highest power first, ';'-separated (from teacache-calibrate)")

    def __post_init__(self) -> None:
        check_float("teacache threshold", self.threshold, 0.0)
        self._coeffs = parse_coefficients(self.coefficients)

    def make_decider(self) -> Decider:
        return TeaCacheDecider(self.threshold, self._coeffs)

    def make_substitute(self) -> Substitute:
        return ReuseResidual()
