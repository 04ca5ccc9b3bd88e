"""The full cache: keep every token. The reference every other policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.evict.base import EvictionPolicy, Observation
from kvcache.registry import register


@register("evict", "full")
@dataclass
class FullCache(EvictionPolicy):
    """Keep every token (no compression; the budget is ignored)."""

    window: int = 0
    sinks: int = 0
    compresses = False  # the adapters never select; budget and window are ignored

    def observed_prompt_queries(self, prompt_len: int) -> int:
        return 0

    def score(self, obs: Observation, previous: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros(obs.key_index.shape, dtype=torch.float32, device=obs.key_index.device)
