"""Attention over a compacted cache: ``reference`` (HF eager math) and ``sdpa`` (torch's fused kernel).

Both take queries ``[B, H_q, q, D]`` and the layer's slots ``[B, H_kv, T, D]`` (never repeated per query
head on the fast paths) plus a visibility mask from :func:`kvcache.attention.scoring.visibility`, and return
``[B, H_q, q, D]``. ``visible`` may be ``None`` (every slot visible), ``"causal"`` (slots are the
queries themselves, in order) or a bool tensor ``[B, 1 or H_kv, q, T]``. ``key_bias [B, H_q, T]`` (fp32; ALiBi,
:func:`kvcache.attention.scoring.alibi_key_bias`) is added to every query's logits over the slots.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from kvcache.attention.scoring import grouped_logits

Visibility = Union[torch.Tensor, str, None]
BACKENDS = ("sdpa", "reference")


def _dense_mask(visible: Visibility, q: int, t: int, device: torch.device) -> torch.Tensor | None:
    if isinstance(visible, str):
        return torch.ones(q, t, dtype=torch.bool, device=device).tril(t - q)
    return visible


def reference_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: Visibility,
    scaling: float,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF eager math: softmax(Q K^T * scaling + bias + mask) V, softmax in fp32, K/V repeated per query head
    (a bias promotes the logits to fp32, as MPT's fp32 ALiBi tensor does in HF)."""
    group = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    logits = torch.matmul(queries, keys.transpose(-1, -2)) * scaling
    if key_bias is not None:
        logits = logits + key_bias[:, :, None, :]
    mask = _dense_mask(visible, queries.shape[2], keys.shape[2], queries.device)
    if mask is not None:
        if mask.dim() == 4 and mask.shape[1] not in (1, queries.shape[1]):
            mask = mask.repeat_interleave(group, dim=1)
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype)
    return torch.matmul(probs, values)


def sdpa_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: Visibility,
    scaling: float,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch SDPA without repeating K/V: GQA natively when the mask is shared by a group's heads,
    otherwise the group's query heads are stacked on the query axis of their KV head. A ``key_bias`` goes in
    as a float mask (in the queries' dtype) with hidden slots at the dtype's lowest value."""
    if key_bias is not None:
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=_biased_mask(key_bias, visible, queries, keys.shape[2]), scale=scaling,
            enable_gqa=True,
        )
    if isinstance(visible, str):
        return F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scaling, enable_gqa=True)
    if visible is None or visible.shape[1] == 1:
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=visible, scale=scaling, enable_gqa=True
        )
    b, h_q, q, d = queries.shape
    h_kv, t = keys.shape[1], keys.shape[2]
    group = h_q // h_kv
    stacked = queries.reshape(b, h_kv, group * q, d)
    mask = visible[:, :, None].expand(b, h_kv, group, q, t).reshape(b, h_kv, group * q, t)
    out = F.scaled_dot_product_attention(stacked, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(b, h_q, q, d)


def _biased_mask(key_bias: torch.Tensor, visible: Visibility, queries: torch.Tensor, t: int) -> torch.Tensor:
    """Float mask ``[B, H_q, q or 1, T]``: ``key_bias`` where visible, the lowest value where hidden."""
    bias = key_bias[:, :, None, :].to(queries.dtype)
    mask = _dense_mask(visible, queries.shape[2], t, queries.device)
    if mask is None:
        return bias
    if mask.dim() == 4 and mask.shape[1] not in (1, queries.shape[1]):  # per KV head: one row per query head
        mask = mask.repeat_interleave(queries.shape[1] // mask.shape[1], dim=1)
    return bias.masked_fill(~mask, torch.finfo(bias.dtype).min)


def attention_with_probabilities(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries that see every slot (a decode step over a cache of real tokens), returning the
    probabilities too: ``(softmax(Q K^T * scaling + key_bias) V [B, H_q, q, D], p [B, H_q, q, T] fp32)``, softmax in fp32
    as HF eager, K/V never repeated per query head. A policy that scores with this step's attention (H2O,
    Keyformer, TOVA) reuses ``p`` instead of computing Q K^T a second time."""
    b, h_q, q, _ = queries.shape
    h_kv, t = keys.shape[1], keys.shape[2]
    probs = torch.softmax(grouped_logits(queries, keys, scaling, key_bias), dim=-1)  # [B, H_kv, G, q, T]
    out = torch.matmul(probs.view(b, h_kv, h_q // h_kv * q, t).to(values.dtype), values)
    return out.view(b, h_q, q, values.shape[-1]), probs.view(b, h_q, q, t)


def attend(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: Visibility,
    scaling: float,
    backend: str = "sdpa",
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output ``[B, H_q, q, D]`` with the chosen backend."""
    if backend == "sdpa":
        return sdpa_attention(queries, keys, values, visible, scaling, key_bias)
    if backend == "reference":
        return reference_attention(queries, keys, values, visible, scaling, key_bias)
    raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
