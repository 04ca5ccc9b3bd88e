"""Shared machinery of the DiT feature-cache policies (kind ``feature``).

A policy answers two questions separately:

* a :class:`Decider` says, per denoising step and block, whether to compute the block (``True``), to
  substitute its output (``False``), or to compute only some tokens (a 1-D ``LongTensor`` of token
  indices, token dimension 1 of the block's first tensor);
* a :class:`Substitute` says what a skipped block returns: the cached output (:class:`ReuseOutput`),
  the block input plus the cached residual (:class:`ReuseResidual`), or a Taylor forecast
  (:class:`TaylorForecast`).

:class:`FeatureCache` runs one policy over one request and one classifier-free-guidance branch. It is
engine-agnostic: an engine adapter hands it each block's input tensors and a ``compute`` callable and
gets the block's output tensors back. Tensors are tuples in the block's own order (for example
``(hidden_states,)`` or ``(hidden_states, encoder_hidden_states)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from kvcache.registry import PolicyConfigError, check_choice, check_float, check_int  # noqa: F401  (re-exported)

Tensors = tuple[torch.Tensor, ...]
Decision = Union[bool, torch.Tensor]
Compute = Callable[[Tensors, Union[torch.Tensor, None]], Tensors]
Signal = Callable[[], torch.Tensor]


# -------------------------------------------------------------------------------------------- metrics
def mse(a: Tensors, b: Tensors) -> float:
    """Mean squared error over all elements of two tensor tuples."""
    total, count = 0.0, 0
    for x, y in zip(a, b):
        total += float((x.float() - y.float()).pow(2).sum())
        count += x.numel()
    return total / max(count, 1)


def rel_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    """``mean|now - before| / mean|before|`` (0 when ``before`` is all zeros and equal to ``now``)."""
    denom = float(before.float().abs().mean())
    diff = float((now.float() - before.float()).abs().mean())
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


@dataclass
class StepInfo:
    """Where the denoising loop is: ``step`` counts calls of this request and branch from 0."""

    step: int
    num_steps: int | None = None
    timestep: float | None = None

    @property
    def is_last(self) -> bool:
        return self.num_steps is not None and self.step >= self.num_steps - 1


# ------------------------------------------------------------------------------------------ deciders
class Decider:
    """When to recompute. One instance per request and branch (it holds that branch's statistics)."""

    cache: "FeatureCache"

    def bind(self, cache: "FeatureCache") -> None:
        self.cache = cache

    def begin_step(self, info: StepInfo) -> None:
        self.info = info

    def decide(self, index: int, inputs: Tensors, signal: Signal | None) -> Decision:
        raise NotImplementedError

    def observe(self, index: int, inputs: Tensors, outputs: Tensors, previous: Tensors | None) -> None:
        """Called after block ``index`` was fully computed; ``previous`` is its last computed output."""


class IntervalDecider(Decider):
    """Compute every block on the first ``warmup`` steps and then on every ``interval``-th step."""

    def __init__(self, interval: int, warmup: int = 0) -> None:
        self.interval, self.warmup = interval, warmup

    def full_step(self) -> bool:
        step = self.info.step
        return step < self.warmup or (step - self.warmup) % self.interval == 0

    def decide(self, index: int, inputs: Tensors, signal: Signal | None) -> Decision:
        return self.full_step()


class StackDecider(Decider):
    """Base of deciders that skip a whole suffix of the block stack for a step (first-block, TeaCache)."""

    head = 0  # blocks 0..head-1 are always computed

    def begin_step(self, info: StepInfo) -> None:
        super().begin_step(info)
        self.skip = False

    def decide(self, index: int, inputs: Tensors, signal: Signal | None) -> Decision:
        if index < self.head:
            return True
        if index == self.head and self.head == 0:
            self.skip = self.gate(inputs, signal)
        return not self.skip

    def gate(self, inputs: Tensors, signal: Signal | None) -> bool:
        """For ``head == 0``: decide at block 0, before computing it, whether to skip the whole stack."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------- substitutes
class Substitute:
    """What a skipped block returns. One instance per request and branch."""

    cache: "FeatureCache"

    def bind(self, cache: "FeatureCache") -> None:
        self.cache = cache

    def store(self, index: int, inputs: Tensors, outputs: Tensors, step: int) -> None:
        """Called after block ``index`` was (fully or partly) computed at ``step``."""

    def ready(self, index: int) -> bool:
        return self.cache.last_outputs[index] is not None

    def produce(self, index: int, inputs: Tensors, step: int) -> Tensors:
        raise NotImplementedError


class ReuseOutput(Substitute):
    """Return the block's last computed output unchanged (Foresight, FORA-style static reuse)."""

    def produce(self, index: int, inputs: Tensors, step: int) -> Tensors:
        return self.cache.last_outputs[index]  # type: ignore[return-value]


class ReuseResidual(Substitute):
    """Return ``input + (last output - last input)`` per tensor (first-block cache, TeaCache, delta-DiT)."""

    def __init__(self) -> None:
        self.residuals: dict[int, Tensors] = {}

    def store(self, index: int, inputs: Tensors, outputs: Tensors, step: int) -> None:
        if all(o.shape == i.shape for o, i in zip(outputs, inputs)):
            self.residuals[index] = tuple(o - i for o, i in zip(outputs, inputs))
        else:  # a block that changes shapes cannot carry a residual: fall back to its output
            self.residuals.pop(index, None)

    def ready(self, index: int) -> bool:
        return index in self.residuals or super().ready(index)

    def produce(self, index: int, inputs: Tensors, step: int) -> Tensors:
        if index not in self.residuals:
            return self.cache.last_outputs[index]  # type: ignore[return-value]
        return tuple(i + r for i, r in zip(inputs, self.residuals[index]))


class TaylorForecast(Substitute):
    """TaylorSeer: keep finite-difference derivatives up to ``order`` of each block's output and forecast
    ``F(s) = sum_i D_i (s - k)^i / i!`` from the last computed step ``k``."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.derivs: dict[int, list[Tensors]] = {}
        self.steps: dict[int, int] = {}

    def store(self, index: int, inputs: Tensors, outputs: Tensors, step: int) -> None:
        old, last = self.derivs.get(index), self.steps.get(index)
        new: list[Tensors] = [outputs]
        if old is not None and last is not None and step > last:
            gap = float(step - last)
            for i in range(min(self.order, len(old))):
                new.append(tuple((a - b) / gap for a, b in zip(new[i], old[i])))
        self.derivs[index], self.steps[index] = new, step

    def ready(self, index: int) -> bool:
        return index in self.derivs

    def produce(self, index: int, inputs: Tensors, step: int) -> Tensors:
        derivs, dist = self.derivs[index], float(step - self.steps[index])
        out = list(derivs[0])
        for i in range(1, len(derivs)):
            coef = dist**i / math.factorial(i)
            out = [o + coef * d for o, d in zip(out, derivs[i])]
        return tuple(out)


# ---------------------------------------------------------------------------------------- the runner
class FeaturePolicy:
    """Mixin of registered ``feature`` policies: each builds a fresh decider and substitute per branch."""

    token_level = False  # True when the decider may ask for token-level partial computation
    wants_attention = False  # True when the engine should fill FeatureCache.token_scores on full computations

    def make_decider(self) -> Decider:
        raise NotImplementedError

    def make_substitute(self) -> Substitute:
        raise NotImplementedError

    def new_cache(self, block_kinds: Sequence[str], num_steps: int | None = None) -> "FeatureCache":
        return FeatureCache(self, block_kinds, num_steps)


class FeatureCache:
    """State of one policy for one request and one CFG branch: per-block caches, statistics, counters.

    ``block_kinds[i]`` names block ``i``'s kind (``"block"``, or ``"spatial"`` / ``"temporal"`` in video
    DiTs) so policies can keep separate statistics per kind.
    """

    def __init__(self, policy: FeaturePolicy, block_kinds: Sequence[str], num_steps: int | None = None) -> None:
        self.policy = policy
        self.block_kinds = list(block_kinds)
        self.num_steps = num_steps
        self.step = -1
        self.info = StepInfo(-1, num_steps)
        n = len(self.block_kinds)
        self.last_outputs: list[Tensors | None] = [None] * n
        self.last_inputs: list[Tensors | None] = [None] * n
        self.computed = 0.0
        self.skipped = 0.0
        # per block: attention each token received at its last full computation (engines fill it when
        # the policy sets ``wants_attention``), shape [N]
        self.token_scores: dict[int, torch.Tensor] = {}
        self.decider = policy.make_decider()
        self.substitute = policy.make_substitute()
        self.decider.bind(self)
        self.substitute.bind(self)

    @property
    def num_blocks(self) -> int:
        return len(self.block_kinds)

    def begin_step(self, timestep: float | None = None, num_steps: int | None = None) -> StepInfo:
        """Start the next denoising step of this request and branch."""
        if num_steps is not None:
            self.num_steps = num_steps
        self.step += 1
        self.info = StepInfo(self.step, self.num_steps, timestep)
        self.decider.begin_step(self.info)
        return self.info

    def run_block(self, index: int, inputs: Tensors, compute: Compute, signal: Signal | None = None) -> Tensors:
        """Run block ``index``: compute it, substitute it, or compute some tokens and reuse the rest."""
        decision = self.decider.decide(index, inputs, signal)
        if decision is False and not self.substitute.ready(index):
            decision = True
        if decision is False:
            self.skipped += 1
            return self.substitute.produce(index, inputs, self.step)
        if decision is True or self.last_outputs[index] is None:
            outputs = compute(inputs, None)
            self.decider.observe(index, inputs, outputs, self.last_outputs[index])
            self.computed += 1
        else:
            tokens: torch.Tensor = decision
            partial = compute(inputs, tokens)
            outputs = merge_tokens(self.last_outputs[index], partial, tokens)  # type: ignore[arg-type]
            frac = tokens.numel() / max(inputs[0].shape[1], 1)
            self.computed += frac
            self.skipped += 1.0 - frac
        self.substitute.store(index, inputs, outputs, self.step)
        self.last_outputs[index], self.last_inputs[index] = outputs, inputs
        return outputs

    def stats(self) -> dict[str, float]:
        total = self.computed + self.skipped
        return {"computed": self.computed, "skipped": self.skipped, "fraction_skipped": self.skipped / total if total else 0.0}


def merge_tokens(cached: Tensors, partial: Tensors, tokens: torch.Tensor) -> Tensors:
    """Cached first tensor with ``tokens`` (dim 1) replaced by the freshly computed ones; other tensors fresh."""
    first = cached[0].clone()
    first[:, tokens] = partial[0]
    return (first, *partial[1:])
