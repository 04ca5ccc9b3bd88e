"""Attention statistics the policies score with, computed without a full ``[T, T]`` matrix.

Slots may be in any order and may differ per KV head, so visibility is judged from each slot's logical
position: query i sees slot j when j is a real token and ``index_j <= index_i``. A token always sees
itself, so a padding query has one finite logit and never produces NaNs.

Grouped-query attention is handled by viewing the ``H_q = G * H_kv`` query heads as ``[H_kv, G]``;
keys are never repeated per query head.

Positions or validity shared by every sequence or head may be passed expanded (stride 0 over those
dimensions, e.g. ``torch.arange(T).expand(B, H, T)`` for a prompt whose slots are its positions): the
mask is then computed once for them, ``[q, T]`` instead of ``[B, H_kv, q, T]``.

A positional bias that depends on the key alone (``key_bias [B, H_q, T]``, added to every query's logits
over the slots) rides along everywhere logits are made: ALiBi (:func:`alibi_key_bias`) is one, since the part
of its bias that depends on the query is the same for every slot of a row and cancels in the softmax.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from kvcache.attention.gumbel import GumbelLogits
from kvcache.attention.triton_dispatch import kernel_computes, use_triton

# Upper bound on the elements of one chunk of logits (fp32): 2**20 elements = 4 MiB, small enough to stay
# in cache across the mask, softmax and sum (3x faster than 64 MiB chunks on a 2-core x86 CPU).
CHUNK_ELEMENTS = 1 << 20


def visibility(key_index: torch.Tensor, key_valid: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """``[B, H_kv, q, T]`` bool: query ``i`` may attend slot ``j``."""
    k_idx = key_index[:, :, None, :]
    q_idx = query_index[:, None, :, None]
    return (key_valid[:, :, None, :] & (k_idx <= q_idx)) | (k_idx == q_idx)


def _shared(tensor: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` with each of ``dims`` that is an expanded broadcast (stride 0) narrowed to size 1."""
    for dim in dims:
        if tensor.stride(dim) == 0 and tensor.shape[dim] > 1:
            tensor = tensor.narrow(dim, 0, 1)
    return tensor


def hidden_slots(key_index: torch.Tensor, key_valid: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """``~visibility``: True where query ``i`` may not attend slot ``j``, ``(not valid_j or index_j > index_i)
    and index_j != index_i``, broadcastable to ``[B, H_kv, q, T]`` (size 1 where the inputs are shared)."""
    k_idx = _shared(key_index, (0, 1))[:, :, None, :]
    q_idx = _shared(query_index, (0,))[:, None, :, None]
    invalid = ~_shared(key_valid, (0, 1))[:, :, None, :]
    return (invalid | (k_idx > q_idx)) & (k_idx != q_idx)


def alibi_key_bias(slopes: torch.Tensor, key_index: torch.Tensor, reference: int | torch.Tensor) -> torch.Tensor:
    """ALiBi (Press et al., arXiv 2108.12409) as a per-key logit bias ``[B, H_q, T]`` fp32.

    A query at logical position i adds ``-slope_h * (i - p_j)`` to its logit of the token at logical position
    ``p_j`` (``key_index [B, H_kv, T]``; ``slopes [H_q]``). Minus the row constant ``slope_h * (i - reference)``,
    that is ``slope_h * (p_j - reference)``: the same for every query, so one bias serves a whole pass (MPT's own
    trick). Slots keep their tokens' original positions through eviction, so a kept token keeps its true
    distance; ``reference`` (the pass's last position) only keeps the values near zero for recent tokens."""
    b, h_kv, t = key_index.shape
    distance = (key_index - reference).float()[:, :, None, :]  # [B, H_kv, 1, T]
    return (slopes.float().view(1, h_kv, -1, 1) * distance).reshape(b, -1, t)


def _grouped_bias(key_bias: torch.Tensor, h_kv: int) -> torch.Tensor:
    """``key_bias [B, H_q, T]`` as ``[B, H_kv, G, 1, T]``, to add to grouped logits."""
    b, h_q, t = key_bias.shape
    return key_bias.view(b, h_kv, h_q // h_kv, 1, t)


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def grouped_logits(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, key_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """z = Q K^T * scaling (+ ``key_bias``) in fp32, shaped ``[B, H_kv, G, q, T]``. A power-of-two ``scaling``
    (1/8 for 64-channel heads) is exact either way, so it scales the ``q x D`` queries instead of the ``q x T``
    logits (the same bits, a smaller pass)."""
    b, h_q, q, d = queries.shape
    h_kv, t = keys.shape[1], keys.shape[2]
    stacked = queries.reshape(b, h_kv, h_q // h_kv * q, d).float()  # the group's queries stacked: no broadcast copy of K
    if _is_power_of_two(scaling):
        z = torch.matmul(stacked * scaling, keys.float().transpose(-1, -2)).view(b, h_kv, h_q // h_kv, q, t)
    else:
        z = torch.matmul(stacked, keys.float().transpose(-1, -2)).mul_(scaling).view(b, h_kv, h_q // h_kv, q, t)
    return z if key_bias is None else z.add_(_grouped_bias(key_bias, h_kv))


def masked_logits(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    query_index: torch.Tensor,
    scaling: float,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped logits ``[B, H_kv, G, q, T]`` with invisible slots at ``-inf`` (masked in place)."""
    logits = grouped_logits(queries, keys, scaling, key_bias)
    return logits.masked_fill_(hidden_slots(key_index, key_valid, query_index)[:, :, None], float("-inf"))


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
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_i softmax(transform(z_i))_j over the given queries: ``[B, H_kv, G, T]`` fp32, chunked over queries.

    ``transform`` maps masked logits to the logits actually normalised (Keyformer's ``(z + g) / tau``);
    it must keep ``-inf`` at ``-inf``. ``key_bias [B, H_q, T]`` is added to every query's logits (ALiBi).
    """
    # the Triton kernel adds no bias: a biased model (ALiBi) scores in torch
    if use_triton(keys) and kernel_computes(transform) and key_bias is None:  # CUDA: the fused kernel (attention/triton_scoring.py)
        from kvcache.attention import triton_scoring

        return triton_scoring.column_sums(queries, keys, key_index, key_valid, query_index, scaling, transform)
    b, h_q, q, _ = queries.shape
    h_kv, t = keys.shape[1], keys.shape[2]
    total = torch.zeros(b, h_kv, h_q // h_kv, t, dtype=torch.float32, device=keys.device)
    step = query_chunk(q, b * h_q * t)
    chunks = [(start, min(q, start + step)) for start in range(0, q, step)]
    for (start, stop), (masked_from, seen) in zip(chunks, chunk_columns(key_index, key_valid, query_index, chunks)):
        bias = None if key_bias is None else key_bias[..., :seen]
        z = grouped_logits(queries[:, :, start:stop], keys[:, :, :seen], scaling, bias)
        if masked_from < seen:  # slots before ``masked_from`` are visible to every query of the chunk
            hidden = hidden_slots(
                key_index[..., masked_from:seen], key_valid[..., masked_from:seen], query_index[:, start:stop]
            )
            z[..., masked_from:].masked_fill_(hidden[:, :, None], float("-inf"))
        if isinstance(transform, GumbelLogits):  # drawn and normalised in place: no q x T temporaries
            probs = transform.softmax_(z)
        else:
            probs = torch.softmax(z if transform is None else transform(z), dim=-1)
        total[..., :seen] += probs.sum(dim=-2)
    return total


def chunk_columns(
    key_index: torch.Tensor, key_valid: torch.Tensor, query_index: torch.Tensor, chunks: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """For each chunk ``(start, stop)`` of the queries, the slot range ``[masked_from, seen)`` that needs a
    mask. Slots from ``seen`` on are hidden from every query of the chunk (a causal prompt chunk skips
    them: half the work of a prompt pass); slots before ``masked_from`` are real tokens no later than the
    chunk's first query, so every query sees them (a causal chunk masks only its triangle). One host read
    for all chunks; a single-query chunk (a decode step) needs none and masks every slot."""
    t = key_index.shape[-1]
    if all(stop - start == 1 for start, stop in chunks):
        return [(0, t)] * len(chunks)
    first_query = torch.stack([query_index[:, start:stop].min() for start, stop in chunks])  # [n]
    last_query = torch.stack([query_index[:, start:stop].max() for start, stop in chunks])
    slots = _shared(key_index, (0, 1)).flatten(0, 1)[None]  # [1, B * H_kv or 1, T]
    position = torch.arange(1, t + 1, device=slots.device)
    seen = (slots <= last_query[:, None, None]).any(1).mul(position).amax(-1).clamp_(min=1)
    invalid = (~_shared(key_valid, (0, 1))).flatten(0, 1).any(0)  # [T]
    may_hide = (slots > first_query[:, None, None]).any(1) | invalid  # [n, T]
    masked_from = torch.where(may_hide, position - 1, t).amin(-1)
    columns = torch.stack([masked_from, seen], -1).tolist()
    return [(min(lo, hi), hi) if stop - start > 1 else (0, t) for (lo, hi), (start, stop) in zip(columns, chunks)]


def window_probabilities(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    query_index: torch.Tensor,
    scaling: float,
    window: int,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(Q[-w:] K^T * scaling (+ ``key_bias``)) over visible slots, fp32 ``[B, H_kv, G, w, T]`` (causal
    inside the window)."""
    w = min(window, queries.shape[2])
    z = masked_logits(queries[:, :, -w:], keys, key_index, key_valid, query_index[:, -w:], scaling, key_bias)
    return torch.softmax(z, dim=-1)
