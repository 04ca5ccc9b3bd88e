"""TOVA, token omission via attention (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104).

At every pass where the cache exceeds its budget (the prompt, then each generated token) the slots are
scored by the attention of the *current* query only, the last query of the pass:
s_j = softmax(q_t K^T / sqrt(d))_j, averaged over the query heads of a KV group; the lowest is evicted.
Nothing accumulates: a token's past attention does not count, only what the newest query pays it now.
GQA: one selection per KV head (the mean over its group's query heads), like the other policies here; the
paper and kvpress average over every head of the layer and keep one selection per layer.
``window`` 1 protects the newest token, as kvpress does (the paper protects nothing; a query's attention
to itself is usually high, so this rarely changes a choice); no sinks, as in the paper.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvcache.evict.base import EvictionPolicy, Observation
from kvcache.registry import param, register


def last_query(obs: Observation) -> Observation:
    """``obs`` restricted to its last query (and that query's row of ``probabilities`` when given)."""
    probabilities = None if obs.probabilities is None else obs.probabilities[:, :, -1:]
    return dataclasses.replace(
        obs, queries=obs.queries[:, :, -1:], query_index=obs.query_index[:, -1:], probabilities=probabilities
    )


@register("evict", "tova")
@dataclass
class TOVA(EvictionPolicy):
    """Attention of the current query only, evict the lowest at every step (arXiv 2401.06104)."""

    window: int | float = param(1, "recent tokens kept: int tokens or fraction of the budget (1: the newest, as kvpress)")
    sinks: int = param(0, "first tokens always kept (the paper keeps none)")
    every_step = True

    def observed_prompt_queries(self, prompt_len: int) -> int:
        return min(1, prompt_len)

    def score(self, obs: Observation, previous: torch.Tensor | None) -> torch.Tensor:
        return last_query(obs).column_sums().mean(dim=2)
