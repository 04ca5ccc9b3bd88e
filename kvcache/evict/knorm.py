"""KNorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
arXiv 2406.11430).

Keys with a low L2 norm draw high attention, so s_j = -||k_j||_2 per KV head: keep the lowest-norm
keys. Query-free (no attention is computed, no query is observed) and prompt only, like kvpress's
KnormPress: the prompt is compressed once, decode tokens are appended uncompressed. No recent window
and no sinks by default, as in kvpress.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.evict.base import EvictionPolicy, Observation
from kvcache.registry import param, register


def key_norm_scores(keys: torch.Tensor) -> torch.Tensor:
    """s_j = -||k_j||_2 in fp32, ``[B, H_kv, T]`` from keys ``[B, H_kv, T, D]``."""
    return -torch.linalg.vector_norm(keys.float(), dim=-1)


@register("evict", "knorm")
@dataclass
class KNorm(EvictionPolicy):
    """Keep the keys of lowest L2 norm, at the prompt only (arXiv 2406.11430)."""

    window: int | float = param(0, "recent tokens kept: int tokens or fraction of the budget")
    sinks: int = param(0, "first tokens always kept")

    def observed_prompt_queries(self, prompt_len: int) -> int:
        return 0  # keys alone

    def score(self, obs: Observation, previous: torch.Tensor | None) -> torch.Tensor:
        if obs.keys is None:
            raise RuntimeError("knorm scores the keys themselves; this engine passed attention probabilities only")
        return key_norm_scores(obs.keys)
