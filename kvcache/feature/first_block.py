"""First-block cache (FBCache, ParaAttention; DBCache in cache-dit).

Always compute the first ``head`` blocks. With ``r`` the residual ``out - in`` of block ``head-1`` and
``r'`` its value at the last step that computed every block, skip the remaining blocks when
``mean|r - r'| / mean|r'| < threshold``; a skipped block returns its input plus its cached residual (the
sum of these is the cached residual of the remaining stack). Defaults: ``threshold=0.05``, ``head=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcache.feature.base import (
    Decider,
    FeaturePolicy,
    ReuseResidual,
    StackDecider,
    Substitute,
    Tensors,
    check_float,
    check_int,
    rel_l1,
)
from kvcache.registry import param, register


class FirstBlockDecider(StackDecider):
    def __init__(self, threshold: float, head: int) -> None:
        self.threshold, self.head = threshold, head
        self.reference = None  # head residual at the last full step

    def observe(self, index: int, inputs: Tensors, outputs: Tensors, previous: Tensors | None) -> None:
        if index != self.head - 1:
            return
        residual = outputs[0] - inputs[0] if outputs[0].shape == inputs[0].shape else outputs[0]
        ref = self.reference
        self.skip = ref is not None and ref.shape == residual.shape and rel_l1(residual, ref) < self.threshold
        if not self.skip:
            self.reference = residual


@register("feature", "first-block")
@dataclass
class FirstBlock(FeaturePolicy):
    """First-block cache: skip the other blocks while the first block's residual barely changes."""

    threshold: float = param(0.05, "skip when the relative L1 change of the head residual is below this (0 = never)")
    head: int = param(1, "number of leading blocks always computed")

    def __post_init__(self) -> None:
        check_float("first-block threshold", self.threshold, 0.0)
        check_int("first-block head", self.head, 1)

    def make_decider(self) -> Decider:
        return FirstBlockDecider(self.threshold, self.head)

    def make_substitute(self) -> Substitute:
        return ReuseResidual()
