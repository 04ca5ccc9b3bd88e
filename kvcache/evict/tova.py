"""TOVA, token omission via attention (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104).

At every pass where the cache exceeds its budget (the prompt, then each generated token) the slots are
scored by the attention of the *current* query only, the last query of the pass:
s_j = softmax(q_t K^T / sqrt(d))_j, averaged over the query heads of a KV group; the lowest is evicted.
Nothing accumulates: a token's past attention does not count, only what the newest query pays it now.
Heads (``heads``): ``"layer"`` (default) averages s_j over every query head of the layer and keeps one selection
for all of its KV heads, as the paper (Sec. 3.3: per-head selection did worse) and kvpress do; ``"kv"`` keeps
one selection per KV head (the mean over its GQA group's query heads), like the other policies here.
``window`` 1 protects the newest token, as kvpress does (the paper protects nothing; a query's attention
to itself is usually high, so this rarely changes a choice); no sinks, as in the paper.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kvcache.evict.base import EvictionPolicy, Observation
from kvcache.registry import check_choice, param, register

HEAD_MODES = ("layer", "kv")


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
    heads: str = param("layer", "'layer': one selection per layer, scores averaged over all heads (paper, kvpress); 'kv': one per KV head")
    every_step = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("tova heads", self.heads, HEAD_MODES)

    @property
    def shares_layer_selection(self) -> bool:
        """True when every KV head of a layer must hold the same tokens (``heads="layer"``)."""
        return self.heads == "layer"

    def observed_prompt_queries(self, prompt_len: int) -> int:
        return min(1, prompt_len)

    def score(self, obs: Observation, previous: torch.Tensor | None) -> torch.Tensor:
        scores = last_query(obs).column_sums().mean(dim=2)
        if self.heads == "kv":
            return scores
        return layer_mean(scores, obs.key_index, obs.heads_share_slots)


def layer_mean(scores: torch.Tensor, key_index: torch.Tensor, heads_share_slots: bool = False) -> torch.Tensor:
    """``[B, H, T]`` scores replaced by their mean over the H heads of the same logical position. The heads hold
    the same tokens (a shared selection keeps them so); unless the engine says they hold them in the same slots
    (``heads_share_slots``), the scores are lined up by sorting each head's slots by position, averaged, and
    written back to each head's own slots."""
    if scores.shape[1] == 1:
        return scores
    if heads_share_slots:
        return scores.mean(dim=1, keepdim=True).expand_as(scores)
    order = key_index.argsort(dim=-1)
    mean = scores.gather(-1, order).mean(dim=1, keepdim=True).expand_as(scores)
    return torch.empty_like(scores).scatter_(-1, order, mean)
