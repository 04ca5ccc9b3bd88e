"""The one selector: scores + budget + protected positions -> the slots to keep.

Every eviction policy and every engine adapter goes through here, so protection (sinks and the recent
window), padding and per-sequence budgets are handled in one place.
"""

from __future__ import annotations

import torch


def protected_slots(
    key_index: torch.Tensor,
    first_index: torch.Tensor,
    next_index: torch.Tensor,
    sinks: int,
    recent: torch.Tensor | int,
) -> torch.Tensor:
    """``[B, H, T]`` bool: the first ``sinks`` real tokens and the last ``recent`` tokens of each sequence.

    ``first_index [B]`` is the logical position of a sequence's first real token (after left padding),
    ``next_index [B]`` its logical length; ``recent`` may differ per layer (an int) or per sequence.
    """
    recent_t = torch.as_tensor(recent, device=key_index.device).reshape(-1, 1, 1)
    is_sink = (key_index - first_index[:, None, None]) < sinks
    is_recent = key_index >= (next_index[:, None, None] - recent_t)
    return is_sink | is_recent


def effective_scores(scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Scores with protected slots at +inf and padding/empty slots at -inf (Python scalars: no host
    tensor is made and copied to the device)."""
    return torch.where(protected & valid, float("inf"), torch.where(valid, scores, float("-inf")))


def select_keep(
    scores: torch.Tensor,
    valid: torch.Tensor,
    protected: torch.Tensor,
    budget: torch.Tensor,
    capacity: int,
    key_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the protected slots plus the top-scoring rest, ``budget[b]`` slots for sequence ``b``.

    Equal scores (common after max-pooling) go to the more recent token when ``key_index`` is given, so
    the choice does not depend on where a slot happens to sit (padding, batch position).
    Returns ``keep [B, H, capacity]`` slot indices in ascending slot order and ``keep_valid`` (False
    where a sequence's budget is below ``capacity``, the rectangular size of the batch, or where it
    has fewer real tokens than its budget).
    """
    ranked = effective_scores(scores, valid, protected)
    if key_index is None:
        top_scores, top_slots = ranked.topk(capacity, dim=-1, sorted=True)
    else:
        newest_first = key_index.argsort(dim=-1, descending=True, stable=True)
        by_score = ranked.gather(-1, newest_first).sort(dim=-1, descending=True, stable=True)
        top_scores = by_score.values[..., :capacity]
        top_slots = newest_first.gather(-1, by_score.indices[..., :capacity])
    rank = torch.arange(capacity, device=scores.device)
    keep_valid = (rank < budget.reshape(-1, 1, 1)) & (top_scores > float("-inf"))
    order = top_slots.argsort(dim=-1)
    return top_slots.gather(-1, order), keep_valid.gather(-1, order)


def replacement_slot(
    scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor, over_budget: torch.Tensor | bool
) -> torch.Tensor:
    """``[B, H]`` the slot one new token takes, without moving the others (decode-time eviction).

    Where the sequence is ``over_budget`` (``[B, 1]`` or ``[B, H]``, or ``True`` for every sequence, as
    an engine knows from its host-side counts) it is the lowest-scoring unprotected real token; otherwise
    an empty slot.
    """
    evictable = torch.where(valid & ~protected, scores, float("inf")).argmin(dim=-1)
    if over_budget is True:
        return evictable
    empty = (~valid).to(torch.uint8).argmax(dim=-1)
    return torch.where(over_budget, evictable, empty)


def select_keep_per_head(
    scores: torch.Tensor,
    valid: torch.Tensor,
    protected: torch.Tensor,
    head_counts: torch.Tensor,
    capacity: int,
    key_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_keep` with a count per KV head: keep the protected slots plus the top-scoring rest,
    ``head_counts[b, h]`` slots for head ``h`` of sequence ``b`` (head-adaptive budgets, e.g.
    :func:`kvcache.budget.heads.adaptive_head_budgets`). ``capacity`` is at least the largest count.

    Returns ``keep [B, H, capacity]`` slot indices in ascending slot order and ``keep_valid`` (False past a
    head's count, or where it has fewer real tokens); equal scores go to the more recent token when
    ``key_index`` is given.
    """
    ranked = effective_scores(scores, valid, protected)
    if key_index is None:
        top_scores, top_slots = ranked.topk(capacity, dim=-1, sorted=True)
    else:
        newest_first = key_index.argsort(dim=-1, descending=True, stable=True)
        by_score = ranked.gather(-1, newest_first).sort(dim=-1, descending=True, stable=True)
        top_scores = by_score.values[..., :capacity]
        top_slots = newest_first.gather(-1, by_score.indices[..., :capacity])
    rank = torch.arange(capacity, device=scores.device)
    keep_valid = (rank < head_counts[..., None]) & (top_scores > float("-inf"))
    order = top_slots.argsort(dim=-1)
    return top_slots.gather(-1, order), keep_valid.gather(-1, order)
