"""Attention over a packed (quantised) KV store, block by block.

``attend_packed`` computes ``softmax(Q K^T * scaling + mask) V`` over a
:class:`PackedKV` (the protocol :class:`kvcache.quant.store.KVStore` implements) with an online
(flash-style) softmax: the store yields dequantised blocks of at most ``block_size`` tokens
(:meth:`PackedKV.blocks`), so the cache is never rebuilt in full
precision. For each block, with running max ``m``, normaliser ``l`` and accumulator ``acc``:

    m' = max(m, max_j s_j),  l = l * exp(m - m') + sum_j exp(s_j - m'),  acc = acc * exp(m - m') + exp(s - m') V

Grouped-query attention views the ``H_q = G * H_kv`` query heads as ``[H_kv, G]``; keys and values are
never repeated per query head. ``packed_probabilities`` gives the softmax probabilities in slot order
(a second pass reusing the log-sum-exp), the statistics eviction policies score with and ZipCache's
saliency is made of. This is the CPU path; on CUDA ``attend_packed`` runs
:mod:`kvcache.attention.triton_packed`, which reads the codes of :meth:`PackedKV.packed_layout` directly.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Protocol

import torch

from kvcache.attention.triton_dispatch import use_triton


class Block(NamedTuple):
    """A dequantised block of rows from :meth:`PackedKV.blocks`."""

    keys: torch.Tensor  # [B, H, n, D] fp32
    values: torch.Tensor  # [B, H, n, D] fp32
    visible: torch.Tensor  # [B, H, n] or [B, H, q, n] bool (False on padding rows)
    slots: torch.Tensor  # [B, H, n] slot of each row (padding rows: num_tokens)


class PackedTier(NamedTuple):
    """One bit width's rows of a packed store as it holds them (layout: ``kvcache.quant.store``), for
    kernels that read the codes directly (:mod:`kvcache.attention.triton_packed`)."""

    bits: int
    value_group: int  # channels per value scale/zero
    k_codes: torch.Tensor  # [B, H, N, D * key_bits / 8] uint8, 8 / key_bits codes per byte, first code in the low bits
    v_codes: torch.Tensor  # [B, H, N, D * bits / 8] uint8
    k_scale: torch.Tensor  # [B, H, P, D] per group of rows: k = code * scale + zero
    k_zero: torch.Tensor  # [B, H, P, D]
    v_scale: torch.Tensor  # [B, H, N, D / value_group] per row
    v_zero: torch.Tensor  # [B, H, N, D / value_group]
    v_chan: torch.Tensor | None  # [B, H, P, D] channel normalisers (v *= chan), or None
    row_group: torch.Tensor  # [B, H, N] parameter group P of each row
    row_slot: torch.Tensor  # [B, H, N] slot of each row (num_tokens on padding rows)
    key_bits: int  # bit width of the key codes (``bits`` is the values'; ZipCache may hold keys wider)


class PackedLayout(NamedTuple):
    """Every tensor of a packed store: its tiers, then the full-precision buffer."""

    tiers: tuple[PackedTier, ...]
    fp_keys: torch.Tensor  # [B, H, F, D]
    fp_values: torch.Tensor  # [B, H, F, D]
    fp_slot: torch.Tensor  # [B, H, F] slot of each buffered row (num_tokens on padding rows)


class PackedKV(Protocol):
    """What attention needs of a packed KV store (``kvcache.quant.store.KVStore`` implements it; this
    floor defines it so that attention never imports the floor above)."""

    head_dim: int
    kv_heads: int
    batch: int
    num_tokens: int

    def blocks(self, block_size: int, mask: torch.Tensor | None = None) -> Iterator[Block]:
        """Dequantised fp32 blocks of at most ``block_size`` slots, each with its visibility and slot ids."""
        ...

    def packed_layout(self) -> PackedLayout:
        """The codes, parameters and full-precision buffer as held, with each row's slot (for kernels)."""
        ...


def _prepare(query: torch.Tensor, store: PackedKV, scaling: float | None) -> torch.Tensor:
    """Scaled fp32 queries as ``[B, H_kv, G * q, D]`` (query heads of a KV group stacked; checks they fit)."""
    b, h_q, q, d = query.shape
    if d != store.head_dim:
        raise ValueError(f"query head dim {d} does not match the store's {store.head_dim}")
    h_kv = store.kv_heads
    if b != store.batch or h_kv == 0 or h_q % h_kv:
        raise ValueError(f"query [B={b}, H_q={h_q}] does not fit a store of [B={store.batch}, H_kv={h_kv}]")
    scale = 1.0 / math.sqrt(d) if scaling is None else scaling
    return query.reshape(b, h_kv, (h_q // h_kv) * q, d).float() * scale


def _block_logits(grouped: torch.Tensor, block: Block) -> torch.Tensor:
    """Masked logits ``[B, H_kv, G * q, n]`` of one block (invisible rows at -inf)."""
    logits = torch.matmul(grouped, block.keys.transpose(-1, -2))
    visible = block.visible
    if visible.dim() == 3:
        visible = visible[:, :, None, :]
    else:  # [B, H_kv, q, n] -> the same rows for every query head of the group
        b, h, q, n = visible.shape
        visible = visible[:, :, None].expand(b, h, logits.shape[2] // q, q, n).reshape(b, h, -1, n)
    return logits.masked_fill(~visible, float("-inf"))


def attend_packed(
    query: torch.Tensor,
    store: PackedKV,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    block_size: int = 512,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``[B, H_q, q, D]`` of ``query`` ``[B, H_q, q, D]`` over every slot of ``store``.

    ``mask`` (True = may attend, slot order) is ``[B, H_kv, T]`` (key validity, e.g. padding) or
    ``[B, H_kv, q, T]`` (per query, e.g. causal); None attends to every slot. ``scaling`` defaults to
    ``1 / sqrt(D)``. A query that may attend to no slot gets a zero output. Computed in fp32, returned
    in ``query.dtype``. With ``return_lse`` also returns the fp32 log-sum-exp of the logits
    ``[B, H_q, q]`` (-inf where nothing is visible), which :func:`packed_probabilities` reuses.
    """
    if use_triton(query):  # CUDA: one kernel reading the packed codes (attention/triton_packed.py)
        from kvcache.attention import triton_packed

        return triton_packed.attend_packed(query, store, mask, scaling, return_lse)
    if store.num_tokens == 0:
        empty = torch.full(query.shape[:3], float("-inf"), device=query.device)
        return (torch.zeros_like(query), empty) if return_lse else torch.zeros_like(query)
    grouped = _prepare(query, store, scaling)
    stats = grouped.shape[:3] + (1,)
    running_max = torch.full(stats, float("-inf"), device=query.device)
    norm = torch.zeros(stats, device=query.device)
    acc = torch.zeros_like(grouped)
    for block in store.blocks(block_size, mask):
        logits = _block_logits(grouped, block)
        new_max = torch.maximum(running_max, logits.amax(-1, keepdim=True))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        probs = torch.exp(logits - safe_max)
        correction = torch.exp(running_max - safe_max)
        norm = norm * correction + probs.sum(-1, keepdim=True)
        acc = acc * correction + torch.matmul(probs, block.values)
        running_max = new_max
    out = torch.where(norm > 0, acc / norm.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(acc))
    out = out.reshape(query.shape).to(query.dtype)
    if not return_lse:
        return out
    lse = (running_max + torch.log(norm)).reshape(query.shape[:3])
    return out, lse


def packed_probabilities(
    query: torch.Tensor,
    store: PackedKV,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    block_size: int = 512,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities ``[B, H_q, q, T]`` in slot order over the packed cache, block by block.

    These are the statistics eviction policies score with and ZipCache's saliency is made of
    (:func:`kvcache.quant.saliency.normalized_attention`), so an adapter computes them once per step.
    Pass ``lse`` from ``attend_packed(..., return_lse=True)`` to skip the first pass.
    """
    b, h_q, q, _ = query.shape
    t = store.num_tokens
    if lse is None:
        _, lse = attend_packed(query, store, mask, scaling, block_size, return_lse=True)  # type: ignore[misc]
    grouped = _prepare(query, store, scaling)
    lse_g = lse.reshape(grouped.shape[:3] + (1,)).float()
    lse_g = torch.where(torch.isinf(lse_g), torch.zeros_like(lse_g), lse_g)
    out = torch.zeros(*grouped.shape[:3], t + 1, device=query.device)
    for block in store.blocks(block_size, mask):
        probs = torch.exp(_block_logits(grouped, block) - lse_g)
        out.scatter_(-1, block.slots[:, :, None].expand_as(probs), probs)
    return out[..., :t].reshape(b, h_q, q, t)
