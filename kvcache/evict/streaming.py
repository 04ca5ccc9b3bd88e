"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453).

Keep the first ``sinks`` tokens (attention sinks, default 4) and the most recent ``budget - sinks``
tokens; evict the middle. No attention statistics: every unprotected token scores 0. Runs whenever
the cache exceeds its budget (prompt and every decode step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.evict.base import EvictionPolicy, Observation
from kvcache.registry import param, register


@register("evict", "streaming")
@dataclass
class StreamingLLM(EvictionPolicy):
    """Attention sinks + a sliding window of recent tokens (arXiv 2309.17453)."""

    sinks: int = param(4, "first tokens always kept (attention sinks)")
    window: int | float | None = param(None, "recent tokens kept; None = the whole budget after the sinks")
    every_step = True
    position_only = True

    def observed_prompt_queries(self, prompt_len: int) -> int:
        return 0  # positions alone

    def score(self, obs: Observation, previous: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros(obs.key_index.shape, dtype=torch.float32, device=obs.key_index.device)
