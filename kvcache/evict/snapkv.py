"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469).

Prompt only, and only when the prompt exceeds the budget C; decode tokens are appended uncompressed.
A = softmax(Q[-w:] K^T / sqrt(d)) in fp32, causal inside the window; s_j = sum over the w window
queries of A_{i,j}; s is pooled along the sequence with a 1-D kernel (stride 1, same padding); keep the
top (C - w) per KV head plus the last w. Defaults w=32, kernel 7, max-pool (the paper's LongBench
setting). GQA: scores are the mean over the query heads of a KV group, so only KV heads are stored
(the official code expands to query heads instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attention.scoring import window_probabilities
from kvcache.evict.base import EvictionPolicy, Observation
from kvcache.registry import PolicyConfigError, param, register

POOLINGS = ("max", "avg")


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling of ``[B, H, T]`` scores along T, stride 1, same padding."""
    b, h, t = scores.shape
    flat = scores.reshape(b * h, 1, t)
    pad = kernel // 2
    pooled = (
        F.max_pool1d(flat, kernel, stride=1, padding=pad)
        if pooling == "max"
        else F.avg_pool1d(flat, kernel, stride=1, padding=pad)
    )
    return pooled[..., :t].reshape(b, h, t)


@register("evict", "snapkv")
@dataclass
class SnapKV(EvictionPolicy):
    """Observation-window attention, pooled, at the prompt only (arXiv 2404.14469)."""

    window: int = param(32, "observation window: the last w prompt queries score, and those w tokens are kept")
    kernel: int = param(7, "pooling kernel size (odd)")
    pooling: str = param("max", "pooling: max or avg")
    sinks: int = param(0, "first tokens always kept")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.window, int) or self.window < 1:
            raise PolicyConfigError(f"snapkv window must be an int >= 1 (observation queries), got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise PolicyConfigError(f"snapkv kernel must be an odd int >= 1, got {self.kernel!r}")
        if self.pooling not in POOLINGS:
            raise PolicyConfigError(f"snapkv pooling {self.pooling!r} unknown; valid: {', '.join(POOLINGS)}")

    def score(self, obs: Observation, previous: torch.Tensor | None) -> torch.Tensor:
        probs = window_probabilities(
            obs.queries, obs.keys, obs.key_index, obs.key_valid, obs.query_index, obs.scaling, self.window
        )
        votes = probs.sum(dim=3).mean(dim=2)  # sum over window queries, mean over the KV group
        return pool_scores(votes, self.kernel, self.pooling) if self.kernel > 1 else votes
