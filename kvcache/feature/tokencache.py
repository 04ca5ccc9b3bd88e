"""TokenCache: token-level feature caching for DiTs (Lou et al., 2024, arXiv 2409.18523).

Two-Phase Round-Robin schedule: a full step every ``k1`` steps during the first ``split`` fraction of
the steps (phase 1) and every ``k2`` steps after (phase 2; with the step count unknown everything is
phase 1). Full steps compute every block and measure each block's impact, the relative MSE of its
output against the previous full step. On cache steps the ``blocks`` fraction of blocks with the least
impact are pruned: only their ``1 - ratio`` most important tokens are recomputed (a shorter sequence
through the unchanged block) and the other tokens reuse the cached output; the other blocks are
computed in full. Temporal blocks of video DiTs are never pruned.

Token importance (training-free): ``importance="attention"`` scores token ``t`` by the attention it
received (mean over batch, heads and queries of the block's self-attention) at the block's last full
computation, filled in by the engine adapter; ``"change"`` by how much the block's input moved since the
block was last computed, ``mean_{b,c} (x_t - x'_t)^2``. Trained: ``"predictor"`` uses the cache
predictor loaded from ``predictor`` (see :mod:`kvcache.feature.token_predictor`).
Defaults: ``k1=2``, ``k2=3``, ``split=0.5``, ``ratio=0.5``, ``blocks=0.5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcache.feature.base import (
    Decider,
    Decision,
    FeaturePolicy,
    ReuseOutput,
    Signal,
    StepInfo,
    Substitute,
    Tensors,
    check_choice,
    check_float,
    check_int,
    mse,
)
from kvcache.registry import PolicyConfigError, param, register


class TokenCacheDecider(Decider):
    def __init__(self, policy: "TokenCache", scorer: "torch.nn.Module | None") -> None:
        self.p = policy
        self.scorer = scorer
        self.impact: dict[int, float] = {}

    def begin_step(self, info: StepInfo) -> None:
        super().begin_step(info)
        p, step = self.p, info.step
        boundary = round(p.split * info.num_steps) if info.num_steps else math.inf
        self.full = step % p.k1 == 0 if step < boundary else (step - boundary) % p.k2 == 0  # type: ignore[operator]
        self.pruned: set[int] | None = None

    def _pruned(self) -> set[int]:
        if self.pruned is None:
            kinds = self.cache.block_kinds
            ranked = sorted((v, i) for i, v in self.impact.items() if kinds[i] != "temporal")
            self.pruned = {i for _, i in ranked[: int(round(self.p.blocks * len(ranked)))]}
        return self.pruned

    def decide(self, index: int, inputs: Tensors, signal: Signal | None) -> Decision:
        if self.full or index not in self._pruned() or self.p.ratio == 0.0:
            return True
        before = self.cache.last_inputs[index]
        if before is None or before[0].shape != inputs[0].shape:
            return True
        tokens = inputs[0].shape[1]
        keep = max(1, math.ceil((1.0 - self.p.ratio) * tokens))
        attention = self.cache.token_scores.get(index) if self.p.importance == "attention" else None
        if self.scorer is not None:
            score = self.scorer.score(inputs[0], before[0], self.info, index, self.cache.num_blocks)
        elif attention is not None and attention.shape[0] == tokens:
            score = attention
        else:
            score = (inputs[0].float() - before[0].float()).pow(2).mean(dim=(0, 2))
        return torch.topk(score, keep).indices.sort().values

    def observe(self, index: int, inputs: Tensors, outputs: Tensors, previous: Tensors | None) -> None:
        if self.full and previous is not None and previous[0].shape == outputs[0].shape:
            scale = float(outputs[0].float().pow(2).mean()) + 1e-12
            self.impact[index] = mse(outputs[:1], previous[:1]) / scale


@register("feature", "tokencache")
@dataclass
class TokenCache(FeaturePolicy):
    """TokenCache: recompute only the important tokens of the least important blocks between full steps."""

    token_level = True

    k1: int = param(2, "phase 1: a full step every k1 steps (1 = never cache in phase 1)")
    k2: int = param(3, "phase 2: a full step every k2 steps (1 = never cache in phase 2)")
    split: float = param(0.5, "fraction of the steps in phase 1")
    ratio: float = param(0.5, "fraction of tokens reused (not recomputed) in a pruned block (0 = none)")
    blocks: float = param(0.5, "fraction of blocks pruned on cache steps, least impact first")
    importance: str = param("change", "token importance: 'change' or 'attention' (training-free), 'predictor' (trained)")
    predictor: str = param("", "path of the trained cache predictor (.safetensors) for importance='predictor'")

    def __post_init__(self) -> None:
        check_int("tokencache k1", self.k1, 1)
        check_int("tokencache k2", self.k2, 1)
        check_float("tokencache split", self.split, 0.0, 1.0)
        check_float("tokencache ratio", self.ratio, 0.0, 0.99)
        check_float("tokencache blocks", self.blocks, 0.0, 1.0)
        check_choice("tokencache importance", self.importance, ("change", "attention", "predictor"))
        self.wants_attention = self.importance == "attention"
        self._scorer = None
        if self.importance == "predictor":
            if not self.predictor:
                raise PolicyConfigError("tokencache importance='predictor' needs predictor=PATH of a trained predictor")
            from kvcache.feature.token_predictor import load_predictor

            self._scorer = load_predictor(self.predictor)

    def make_decider(self) -> Decider:
        return TokenCacheDecider(self, self._scorer)

    def make_substitute(self) -> Substitute:
        return ReuseOutput()
