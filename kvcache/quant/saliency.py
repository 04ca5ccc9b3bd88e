"""ZipCache token saliency from attention statistics (Zhang et al., arXiv 2405.14256, sec. 4.3).

Normalised attention: ``s~_j = (sum_i A_{i,j}) / nnz_j``, where the sum runs over the queries ``i``
that can see slot ``j`` and ``nnz_j`` counts them, so early tokens are not favoured just because more
queries see them. Under GQA the numerator also sums over the query heads of a KV group. It is computed
from *probe* queries -- the last ~5% of positions plus ~5% random earlier ones
(:func:`probe_positions`) -- so prefill can keep a fused attention kernel. During decoding the
current query's attention is the saliency of the buffered tokens.

The inputs are the same attention statistics the eviction policies score with (probabilities, or
queries + keys with positions), so an adapter computes them once and feeds both.
"""

from __future__ import annotations

import math

import torch

from kvcache.attention.scoring import grouped_logits, query_chunk, visibility


def normalized_attention(
    probs: torch.Tensor, kv_heads: int | None = None, visible: torch.Tensor | None = None
) -> torch.Tensor:
    """Saliency ``[B, H_kv, T]`` from attention probabilities.

    ``probs`` is ``[B, H_q, q, T]`` (then give ``kv_heads``, or ``visible``) or grouped
    ``[B, H_kv, G, q, T]``; ``visible`` ``[B, H_kv, q, T]`` says which query sees which slot (None: every
    query sees every slot). Slots no query sees get saliency 0.
    """
    if probs.dim() == 4:
        if kv_heads is None:
            if visible is None:
                raise ValueError("give kv_heads (or visible) with [B, H_q, q, T] probabilities")
            kv_heads = visible.shape[1]
        b, h_q, q, t = probs.shape
        if h_q % kv_heads:
            raise ValueError(f"{h_q} query heads are not a multiple of {kv_heads} KV heads")
        probs = probs.reshape(b, kv_heads, h_q // kv_heads, q, t)
    elif probs.dim() != 5:
        raise ValueError(f"probs must be [B, H_q, q, T] or [B, H_kv, G, q, T], got {list(probs.shape)}")
    total = probs.float().sum((2, 3))
    if visible is None:
        return total / probs.shape[3]
    probs = probs.float().masked_fill(~visible[:, :, None], 0.0)
    count = visible.sum(2)
    return torch.where(count > 0, probs.sum((2, 3)) / count.clamp(min=1), torch.zeros_like(total))


def attention_saliency(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_index: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised-attention saliency ``[B, H_kv, T]`` of ``keys`` ``[B, H_kv, T, D]`` seen by ``queries``
    ``[B, H_q, q, D]`` (post-RoPE), computed in query chunks without repeating keys per query head.

    Query ``i`` sees slot ``j`` when ``key_valid[j]`` and ``key_index[j] <= query_index[i]`` (the
    convention of :class:`kvcache.evict.base.Observation`; a query always sees its own position).
    ``key_index`` defaults to ``0..T-1``; without ``query_index`` every query sees every valid slot
    (decoding).
    """
    b, h_q, q, _ = queries.shape
    _, h_kv, t, _ = keys.shape
    if key_index is None:
        key_index = torch.arange(t, device=keys.device).expand(b, h_kv, t)
    if key_valid is None:
        key_valid = torch.ones(b, h_kv, t, dtype=torch.bool, device=keys.device)
    if query_index is None:  # decoding: each query sits after every slot
        query_index = key_index.amax(dim=(1, 2))[:, None].expand(b, q)
    total = torch.zeros(b, h_kv, t, device=keys.device)
    count = torch.zeros(b, h_kv, t, device=keys.device)
    step = query_chunk(q, b * h_q * t)
    for start in range(0, q, step):
        stop = min(q, start + step)
        visible = visibility(key_index, key_valid, query_index[:, start:stop])
        logits = grouped_logits(queries[:, :, start:stop], keys, scaling)
        probs = torch.softmax(logits.masked_fill(~visible[:, :, None], float("-inf")), dim=-1)
        total += probs.sum((2, 3))
        count += visible.sum(2)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def probe_positions(
    length: int, recent: float = 0.05, random: float = 0.05, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sorted positions of ZipCache's probe queries: the last ``ceil(recent * length)`` (at least one)
    plus ``ceil(random * length)`` drawn without replacement from the earlier positions."""
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if not (0.0 <= recent <= 1.0 and 0.0 <= random <= 1.0):
        raise ValueError(f"recent and random must be fractions in [0, 1], got {recent}, {random}")
    n_recent = min(length, max(1, math.ceil(recent * length)))
    earlier = length - n_recent
    n_random = min(earlier, math.ceil(random * length))
    picked = torch.randperm(earlier, generator=generator)[:n_random]
    return torch.cat([picked, torch.arange(earlier, length)]).sort().values
