"""The shape every eviction policy shares: tensors in, per-slot scores out.

A policy never sees an engine object. Each forward pass, for one layer, it receives an
:class:`Observation` (the queries of this pass and every slot the layer holds now) and the scores it
returned for those slots last time, and returns new scores ``[B, H_kv, T]``. Higher means keep. The
shared selector (:mod:`kvcache.selector`) turns scores, the budget and the protected positions (sinks
and the recent window) into the slots to keep.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from kvcache.attention.scoring import column_sums
from kvcache.registry import PolicyConfigError, check_choice, check_int

POOLINGS = ("max", "avg")


@dataclass
class Observation:
    """What a policy may look at for one layer at one forward pass.

    Slots are the layer's physical cache entries (kept tokens plus the tokens of this pass). Their
    order is arbitrary; ``key_index`` gives each slot's logical position (its index in the sequence,
    padding included), which is what causality and recency are judged by.
    """

    queries: torch.Tensor  # [B, H_q, q, D], post-RoPE queries of this pass
    keys: torch.Tensor | None  # [B, H_kv, T, D], every slot the layer holds now (post-RoPE); None only with probabilities
    key_index: torch.Tensor  # [B, H_kv, T] logical position of each slot
    key_valid: torch.Tensor  # [B, H_kv, T] False for padding and empty slots
    query_index: torch.Tensor  # [B, q] logical position of each query
    scaling: float  # softmax scale, usually 1/sqrt(D)
    step: int  # 0 for the prompt pass(es), t for the t-th generated token
    max_new_tokens: int | None = None  # the request's generation length, if known
    # [B, H_q, q, T] softmax of this pass's queries over the slots, when the engine already computed it
    # (attention over a quantised cache): scoring then reuses it instead of reading the keys again
    probabilities: torch.Tensor | None = None
    # [B, H_kv, T, D_v] every slot's values, when the engine passes them (Expected Attention's ||v|| weighting)
    values: torch.Tensor | None = None
    # every KV head holds the same token in each slot (a layer-wide selection keeps them so, or no eviction yet):
    # per-head statistics can then be combined slot by slot, without lining slots up by position
    heads_share_slots: bool = False
    # [B, H_q, T] fp32 logit bias of each slot, the same for every query of the pass, when the model adds a
    # positional bias to its attention logits (MPT's ALiBi: kvcache.attention.scoring.alibi_key_bias); every
    # statistic made from the keys adds it, as the model's attention does
    key_bias: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.queries.shape[1] // self.key_index.shape[1]

    def column_sums(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``[B, H_kv, G, T]``: sum over this pass's queries of softmax(transform(z)) per slot, z the masked
        logits (:func:`kvcache.attention.scoring.column_sums`). From ``probabilities`` when given: log p = z - lse
        per row, and the shift-invariant softmax of ``transform(log p)`` (Keyformer's ``(z + g) / tau``) is the
        same as from z."""
        if self.probabilities is None:
            return column_sums(
                self.queries, self.keys, self.key_index, self.key_valid, self.query_index, self.scaling, transform,
                self.key_bias,
            )
        b, h_q, q, t = self.probabilities.shape
        probs = self.probabilities.float().reshape(b, h_q // self.group_size, self.group_size, q, t)
        if transform is None:
            return probs.sum(dim=-2)
        return torch.softmax(transform(probs.log()), dim=-1).sum(dim=-2)


class EvictionPolicy(abc.ABC):
    """Base of every ``evict`` policy (a dataclass subclass adds its own parameters).

    ``window`` is the recent window that is always kept: an ``int`` counts tokens, a ``float`` in
    (0, 1) is a fraction of the layer's budget, ``None`` everything after the sinks. ``sinks`` first tokens are always kept too.
    ``every_step`` policies run whenever the cache exceeds its budget (prompt and each decode step);
    the others compress once, at the prompt, and append decode tokens uncompressed.
    """

    every_step: ClassVar[bool] = False
    # scores depend on positions alone (StreamingLLM): an engine may evict by position without scoring
    position_only: ClassVar[bool] = False
    compresses: ClassVar[bool] = True
    registry_name: ClassVar[str]  # set by ``@register("evict", name)``
    window: int | float | None
    sinks: int

    def __post_init__(self) -> None:
        if self.window is not None:
            check_window(self.window)
        check_int("sinks", self.sinks, 0)

    def recent_tokens(self, budget: int) -> int:
        """Tokens of the recent window protected under a layer budget of ``budget`` tokens
        (``window=None``: the whole budget after the sinks)."""
        if self.window is None:
            return max(0, budget - self.sinks)
        if isinstance(self.window, float):
            return int(math.floor(self.window * budget))
        return int(self.window)

    def observed_prompt_queries(self, prompt_len: int) -> int:
        """How many of the prompt's last queries this policy scores with: ``prompt_len`` (the default) when
        every prompt query votes (H2O, Keyformer), ``w`` for an observation window (SnapKV), 0 when it scores
        from keys or positions alone (StreamingLLM, KNorm). Engines ask this instead of guessing; one that
        cannot keep that many queries (vLLM holds the last ``max_captured`` of a prompt) says so. Decode
        queries are observed at every step exactly when ``every_step`` is set."""
        return prompt_len

    @property
    def shares_layer_selection(self) -> bool:
        """True when every KV head of a layer must keep the same tokens (one selection per layer, e.g. TOVA
        as its paper), which head-adaptive budgets would split."""
        return False

    def protected_tokens(self, budget: int) -> int:
        return self.recent_tokens(budget) + self.sinks

    def check_budget(self, budget: int) -> None:
        """Raise if the protected tokens do not fit in ``budget``."""
        if self.protected_tokens(budget) > budget:
            raise PolicyConfigError(
                f"{self.registry_name}: window ({self.recent_tokens(budget)}) + sinks ({self.sinks}) tokens are "
                f"more than the budget of {budget} tokens; raise the budget or lower window/sinks"
            )

    @abc.abstractmethod
    def score(self, obs: Observation, previous: torch.Tensor | None) -> torch.Tensor:
        """Scores ``[B, H_kv, T]`` for every slot of ``obs``; ``previous`` holds last pass's scores of the
        first ``T - q`` slots (None at the first pass)."""


def check_window(window: int | float) -> None:
    if isinstance(window, bool) or not isinstance(window, (int, float)):
        raise PolicyConfigError(f"window must be an int (tokens) or a float fraction in (0, 1), got {window!r}")
    if isinstance(window, float) and not 0.0 <= window < 1.0:
        raise PolicyConfigError(f"window as a fraction of the budget must be in [0, 1), got {window}")
    if isinstance(window, int) and window < 0:
        raise PolicyConfigError(f"window must be >= 0 tokens, got {window}")


def accumulate(previous: torch.Tensor | None, new_scores: torch.Tensor) -> torch.Tensor:
    """S <- [S_prev, 0] + s_t: carry last pass's per-slot scores and add this pass's (into ``new_scores``,
    which the caller owns)."""
    if previous is None:
        return new_scores
    new_scores[..., : previous.shape[-1]] += previous
    return new_scores


def check_pooling(policy: str, kernel: int, pooling: str = "max") -> None:
    check_int(f"{policy} kernel", kernel, 1)
    if kernel % 2 == 0:
        raise PolicyConfigError(f"{policy} kernel must be odd (1: no pooling), got {kernel!r}")
    check_choice(f"{policy} pooling", pooling, POOLINGS)


def pool_scores(scores: torch.Tensor, key_index: torch.Tensor, kernel: int, pooling: str = "max") -> torch.Tensor:
    """SnapKV's clustering: 1-D pooling of ``[B, H, T]`` scores along logical position (stride 1, same
    padding), whatever order the slots are in, so a kept token keeps its neighbours. ``kernel`` 1: unchanged."""
    if kernel == 1:
        return scores
    b, h, t = scores.shape
    order = key_index.argsort(dim=-1)
    flat = scores.gather(-1, order).reshape(b * h, 1, t)
    pad = kernel // 2
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(flat, kernel, stride=1, padding=pad)[..., :t].reshape(b, h, t)
    return torch.empty_like(scores).scatter_(-1, order, pooled)
