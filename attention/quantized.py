"""Attention over a packed (quantised) KV store, block by block.

``attend_packed`` computes ``softmax(Q K^T * scaling + mask) V`` over a
:class:`kvcache.quant.store.KVStore` with an online (flash-style) softmax: the store yields dequantised
blocks of at most ``block_size`` tokens (:meth:`KVStore.blocks`), so the cache is never rebuilt in full
precision. For each block, with running max ``m``, normaliser ``l`` and accumulator ``acc``:

    m' = max(m, max_j s_j),  l = l * exp(m - m') + sum_j exp(s_j - m'),  acc = acc * exp(m - m') + exp(s - m') V

Grouped-query attention views the ``H_q = G * H_kv`` query heads as ``[H_kv, G]``; keys and values are
never repeated per query head. This is the CPU path; a GPU kernel reading the packed codes directly
would take the same store.
"""

from __future__ import annotations

import math

import torch

from kvcache.quant.store import KVStore


def attend_packed(
    query: torch.Tensor,
    store: KVStore,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    block_size: int = 512,
) -> torch.Tensor:
    """Attention output ``[B, H_q, q, D]`` of ``query`` ``[B, H_q, q, D]`` over every slot of ``store``.

    ``mask`` (True = may attend, slot order) is ``[B, H_kv, T]`` (key validity, e.g. padding) or
    ``[B, H_kv, q, T]`` (per query, e.g. causal); None attends to every slot. ``scaling`` defaults to
    ``1 / sqrt(D)``. A query that may attend to no slot gets a zero output. Computed in fp32, returned
    in ``query.dtype``.
    """
    b, h_q, q, d = query.shape
    if d != store.head_dim:
        raise ValueError(f"query head dim {d} does not match the store's {store.head_dim}")
    if store.num_tokens == 0:
        return torch.zeros_like(query)
    h_kv = store.kv_heads
    if b != store.batch or h_q % h_kv:
        raise ValueError(f"query [B={b}, H_q={h_q}] does not fit a store of [B={store.batch}, H_kv={h_kv}]")
    g = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if scaling is None else scaling
    grouped = query.reshape(b, h_kv, g, q, d).float() * scale
    running_max = torch.full((b, h_kv, g, q, 1), float("-inf"), device=query.device)
    norm = torch.zeros((b, h_kv, g, q, 1), device=query.device)
    acc = torch.zeros((b, h_kv, g, q, d), device=query.device)
    for keys, values, visible in store.blocks(block_size, mask):
        logits = torch.matmul(grouped, keys[:, :, None].transpose(-1, -2))  # [B, H_kv, G, q, n]
        if visible.dim() == 3:
            visible = visible[:, :, None, None, :]
        else:
            visible = visible[:, :, None]
        logits = logits.masked_fill(~visible, float("-inf"))
        new_max = torch.maximum(running_max, logits.amax(-1, keepdim=True))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        probs = torch.exp(logits - safe_max)
        correction = torch.exp(running_max - safe_max)
        norm = norm * correction + probs.sum(-1, keepdim=True)
        acc = acc * correction + torch.matmul(probs, values[:, :, None])
        running_max = new_max
    out = torch.where(norm > 0, acc / norm.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(acc))
    return out.reshape(b, h_q, q, d).to(query.dtype)
