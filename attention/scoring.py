"""Attention statistics the policies score with, computed without a full ``[T, T]`` matrix.

Slots may be in any order and may differ per KV head, so visibility is judged from each slot's logical
position: query i sees slot j when j is a real token and ``index_j <= index_i``. A token always sees
itself, so a padding query has one finite logit and never produces NaNs.

Grouped-query attention is handled by viewing the ``H_q = G * H_kv`` query heads as ``[H_kv, G]``;
keys are never repeated per query head.
"""

from __future__ import annotations

from typing import Callable

import torch

from kvcache.attention.triton_dispatch import kernel_computes, use_triton

# Upper bound on the elements of one chunk of logits (fp32): 2**20 elements = 4 MiB, small enough to stay
# in cache across the mask, softmax and sum (3x faster than 64 MiB chunks on a 2-core x86 CPU).
CHUNK_ELEMENTS = 1 << 20


def visibility(key_index: torch.Tensor, key_valid: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """``[B, H_kv, q, T]`` bool: query ``i`` may attend slot ``j``."""
    k_idx = key_index[:, :, None, :]
    q_idx = query_index[:, None, :, None]
    return (key_valid[:, :, None, :] & (k_idx <= q_idx)) | (k_idx == q_idx)


def grouped_logits(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """z = Q K^T * scaling in fp32, shaped ``[B, H_kv, G, q, T]``."""
    b, h_q, q, d = queries.shape
    h_kv, t = keys.shape[1], keys.shape[2]
    stacked = queries.reshape(b, h_kv, h_q // h_kv * q, d).float()  # the group's queries stacked: no broadcast copy of K
    return torch.matmul(stacked, keys.float().transpose(-1, -2)).mul_(scaling).view(b, h_kv, h_q // h_kv, q, t)


def masked_logits(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    query_index: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Grouped logits ``[B, H_kv, G, q, T]`` with invisible slots at ``-inf``."""
    logits = grouped_logits(queries, keys, scaling)
    visible = visibility(key_index, key_valid, query_index)[:, :, None]
    return logits.masked_fill(~visible, float("-inf"))


def query_chunk(num_queries: int, row_elements: int) -> int:
    """Queries per chunk so that one chunk of logits stays under ``CHUNK_ELEMENTS``."""
    return max(1, min(num_queries, CHUNK_ELEMENTS // max(1, row_elements)))


def column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    query_index: torch.Tensor,
    scaling: float,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """sum_i softmax(transform(z_i))_j over the given queries: ``[B, H_kv, G, T]`` fp32, chunked over queries.

    ``transform`` maps masked logits to the logits actually normalised (Keyformer's ``(z + g) / tau``);
    it must keep ``-inf`` at ``-inf``.
    """
    if use_triton(keys) and kernel_computes(transform):  # CUDA: the fused kernel (attention/triton_scoring.py)
        from kvcache.attention import triton_scoring

        return triton_scoring.column_sums(queries, keys, key_index, key_valid, query_index, scaling, transform)
    b, h_q, q, _ = queries.shape
    h_kv, t = keys.shape[1], keys.shape[2]
    total = torch.zeros(b, h_kv, h_q // h_kv, t, dtype=torch.float32, device=keys.device)
    step = query_chunk(q, b * h_q * t)
    for start in range(0, q, step):
        stop = min(q, start + step)
        seen = visible_prefix(key_index, query_index[:, start:stop]) if stop - start > 1 else t
        z = masked_logits(
            queries[:, :, start:stop], keys[:, :, :seen], key_index[..., :seen], key_valid[..., :seen],
            query_index[:, start:stop], scaling,
        )
        if transform is not None:
            z = transform(z)
        total[..., :seen] += torch.softmax(z, dim=-1).sum(dim=-2)
    return total


def visible_prefix(key_index: torch.Tensor, query_index: torch.Tensor) -> int:
    """Slots up to the last one any of these queries may see; the slots after it get no attention, so
    causal prompt chunks skip them (half the work of a prompt pass)."""
    could_see = (key_index <= query_index.max()).flatten(0, 1).any(0)
    return int(could_see.nonzero().max()) + 1 if bool(could_see.any()) else 1


def window_probabilities(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    query_index: torch.Tensor,
    scaling: float,
    window: int,
) -> torch.Tensor:
    """softmax(Q[-w:] K^T * scaling) over visible slots, fp32 ``[B, H_kv, G, w, T]`` (causal inside the window)."""
    w = min(window, queries.shape[2])
    z = masked_logits(queries[:, :, -w:], keys, key_index, key_valid, query_index[:, -w:], scaling)
    return torch.softmax(z, dim=-1)
