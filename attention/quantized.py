"""Attention over a packed (quantised) KV store, reading the codes without rebuilding the cache.

``attend_packed`` computes ``softmax(Q K^T * scaling + mask) V`` over a :class:`PackedKV` (the protocol
:class:`kvcache.quant.store.KVStore` implements) from :meth:`PackedKV.packed_layout`: per tier the packed
codes with per-group key parameters and per-token value parameters (KIVI, arXiv 2402.02750; ZipCache,
arXiv 2405.14256), then the full-precision buffer. The dequantisation is folded into the small operands,
so the codes are only unpacked (shifts and masks, ``block_size`` rows at a time), never scaled:

    logits_j = (q * s_p) . c_j + q . z_p                     (keys: per channel, per parameter group p)
    out      = sum_j p_j chan_p (c_j s_j + z_j) = chan_p ((p * s) @ c + p @ z)   (values: per token)

One softmax over every stored row follows the logits (decode holds ``G * q`` rows of logits, a few KB).
Grouped-query attention views the ``H_q = G * H_kv`` query heads as ``[H_kv, G]``; keys and values are
never repeated per query head. ``packed_probabilities`` gives the softmax probabilities in slot order
(a second pass reusing the log-sum-exp), the statistics eviction policies score with and ZipCache's
saliency is made of. This is the CPU path; on CUDA ``attend_packed`` runs
:mod:`kvcache.attention.triton_packed`, which reads the same layout in one kernel.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch

from kvcache.attention.triton_dispatch import use_triton


class Block(NamedTuple):
    """A dequantised block of rows (``KVStore.blocks``: tests and debugging; attention reads the layout)."""

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
    row_group: torch.Tensor | None  # [B, H, N] parameter group P of each row (may be None with one group, no slots)
    row_slot: torch.Tensor | None  # [B, H, N] slot of each row (num_tokens on padding rows); None if not asked for
    key_bits: int  # bit width of the key codes (``bits`` is the values'; ZipCache may hold keys wider)
    group_rows: int = 0  # g when row r of every head uses group r // g (every group full), else 0


class PackedLayout(NamedTuple):
    """Every tensor of a packed store: its tiers, then the full-precision buffer."""

    tiers: tuple[PackedTier, ...]
    fp_keys: torch.Tensor  # [B, H, F, D]
    fp_values: torch.Tensor  # [B, H, F, D]
    fp_slot: torch.Tensor | None  # [B, H, F] slot of each buffered row (num_tokens on padding rows); None if not asked for
    padded: bool = True  # some head holds padding rows (False: every row of every region is a real token)


class PackedKV(Protocol):
    """What attention needs of a packed KV store (``kvcache.quant.store.KVStore`` implements it; this
    floor defines it so that attention never imports the floor above)."""

    head_dim: int
    kv_heads: int
    batch: int
    num_tokens: int

    def packed_layout(self, with_slots: bool = True) -> PackedLayout:
        """The codes, parameters and full-precision buffer as held, with each row's slot (for kernels);
        ``with_slots=False`` may leave the slots out (None) when no region holds padding rows."""
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


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _scratch(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A reused fp32 buffer of ``shape`` (one per device, grown to the largest block seen: at most
    ``block_size x B x H_kv x D`` floats). A fresh allocation of that size per block and layer costs more
    than the unpacking itself on CPU (its pages are faulted in anew each time). Its content is
    overwritten by the next call: hold it no longer than one block."""
    numel = math.prod(shape)
    buffer = _SCRATCH.get(device)
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer[:numel].view(shape)


def unpack_fields(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 codes of ``packed`` ``[..., M]`` uint8 as ``[8 / bits, ..., M]``: field ``f`` of byte ``i`` (channel
    ``i * 8 / bits + f``) at ``[f, ..., i]``. Each field is a shift and a mask of the bytes written to its own
    contiguous block (no per-code gather, no strided writes) of a reused buffer (:func:`_scratch`: valid until
    the next call); :func:`to_fields` / :func:`from_fields` move the small operands (queries, outputs) into
    and out of this channel order."""
    if bits == 8:
        return packed.float()[None]
    per_byte = 8 // bits
    out = _scratch((per_byte, *packed.shape), packed.device)
    mask = (1 << bits) - 1
    if packed.shape[-1] % 4 == 0 and packed.stride(-1) == 1 and all(st % 4 == 0 for st in packed.stride()[:-1]):
        # four bytes per int32 lane: shift and mask a quarter of the elements (the mask keeps each byte's
        # own field, so bits shifted in from the next byte, or the sign, never reach a code)
        words, mask = packed.view(torch.int32), int.from_bytes(bytes([mask]) * 4, "little")
        for field in range(per_byte):
            shifted = words if field == 0 else torch.bitwise_right_shift(words, field * bits)
            out[field].copy_(torch.bitwise_and(shifted, mask).view(torch.uint8))
        return out
    for field in range(per_byte):
        codes = packed if field == 0 else torch.bitwise_right_shift(packed, field * bits)
        if field < per_byte - 1:
            codes = torch.bitwise_and(codes, mask)
        out[field].copy_(codes)
    return out


def to_fields(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` ``[..., D]`` (channels in order) as ``[8 / bits, ..., D * bits / 8]`` in :func:`unpack_fields`' order."""
    per_byte = 8 // bits if bits < 8 else 1
    return x.unflatten(-1, (x.shape[-1] // per_byte, per_byte)).movedim(-1, 0)


def from_fields(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_fields`: ``[8 / bits, ..., M]`` -> ``[..., M * 8 / bits]`` with channels in order."""
    return y.movedim(0, -1).flatten(-2)


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``[B, H, N, ...]`` (the tensor itself when that is all of them)."""
    return x if start == 0 and stop == x.shape[2] else x[:, :, start:stop]


def _tier_logits(grouped: torch.Tensor, tier: PackedTier, start: int, stop: int) -> torch.Tensor:
    """Logits ``[B, H, R, n]`` of the stacked queries ``grouped`` ``[B, H, R, D]`` against tier rows ``start:stop``,
    with the key dequantisation folded into the queries (KIVI per-channel keys, ZipCache's channel-wise keys):

        q . (c * s_p + z_p) = (q * s_p) . c + q . z_p      for a row with codes c in parameter group p,

    so the codes are only unpacked, never scaled: one matmul per block (groups of ``group_rows`` rows
    batched; a few groups as one matmul against every group's scaled query; else scales gathered per row)."""
    b, h, r, d = grouped.shape
    bits = tier.key_bits
    codes = unpack_fields(_rows(tier.k_codes, start, stop), bits)  # [F, B, H, n, M]
    n = codes.shape[3]
    scale, zero = tier.k_scale, tier.k_zero
    groups = scale.shape[2]
    g = tier.group_rows
    if groups == 1:  # one scale/zero per channel for every row: (q * s) against the codes, plus q . z
        q_zero = torch.matmul(grouped, zero[:, :, 0, :, None].float())  # [B, H, R, 1]
        q_scaled = to_fields(grouped * scale[:, :, 0:1].float(), bits)
        return torch.matmul(q_scaled, codes.transpose(-1, -2)).sum(0).add_(q_zero)
    if g and start % g == 0 and n % g == 0:
        first, last = start // g, start // g + n // g
        q_scaled = grouped[:, :, None] * scale[:, :, first:last, None].float()  # [B, H, P, R, D]
        q_zero = (grouped[:, :, None] * zero[:, :, first:last, None].float()).sum(-1, keepdim=True)  # [B, H, P, R, 1]
        per_group = codes.unflatten(3, (last - first, g)).transpose(-1, -2)  # [F, B, H, P, M, g]
        per_group = torch.matmul(to_fields(q_scaled, bits), per_group).sum(0) + q_zero  # [B, H, P, R, g]
        return per_group.transpose(2, 3).reshape(b, h, r, n)
    assert tier.row_group is not None
    pid = tier.row_group[:, :, start:stop]
    if groups * r <= FOLD_GROUPS_MAX:  # every group's scaled query against every row, then each row's own group
        q_scaled = (grouped[:, :, None] * scale[:, :, :, None].float()).reshape(b, h, groups * r, d)
        q_zero = (grouped[:, :, None] * zero[:, :, :, None].float()).sum(-1)  # [B, H, P, R]
        every = torch.matmul(codes, to_fields(q_scaled, bits).transpose(-1, -2)).sum(0)  # [B, H, n, P * R]
        every += q_zero.reshape(b, h, 1, groups * r)
        column = pid[..., None] * r + torch.arange(r, device=grouped.device)
        return every.gather(3, column).transpose(-1, -2)
    index = pid[..., None].expand(-1, -1, -1, d)
    keys = torch.addcmul(to_fields(zero.gather(2, index).float(), bits), codes, to_fields(scale.gather(2, index).float(), bits))
    return torch.matmul(to_fields(grouped, bits), keys.transpose(-1, -2)).sum(0)


def _tier_values(probs: torch.Tensor, tier: PackedTier, start: int, stop: int) -> torch.Tensor:
    """``probs @ V`` ``[B, H, R, D]`` for tier rows ``start:stop`` (``probs`` ``[B, H, R, n]``), with the value
    dequantisation folded in (per-token scale ``s``/zero ``z`` per channel group, ZipCache's CSTQuant channel
    normaliser ``chan_p``): ``sum_j p_j chan_p (c_j s_j + z_j) = chan_p ((p * s) @ c + p @ z)``."""
    b, h, r, n = probs.shape
    bits = tier.bits
    codes = unpack_fields(_rows(tier.v_codes, start, stop), bits)  # [F, B, H, n, M]
    d = codes.shape[0] * codes.shape[-1]
    v_scale, v_zero = _rows(tier.v_scale, start, stop).float(), _rows(tier.v_zero, start, stop).float()
    chan = tier.v_chan
    groups = 1 if chan is None else chan.shape[2]
    if v_scale.shape[-1] > 1 or groups * r > FOLD_GROUPS_MAX:
        # several channel groups per token (KIVI), or many query rows: dequantise, then one matmul
        per_channel = (v_scale.shape[-1], d // v_scale.shape[-1])
        scale = to_fields(v_scale[..., None].expand(-1, -1, -1, *per_channel).flatten(-2), bits)
        values = torch.addcmul(to_fields(v_zero[..., None].expand(-1, -1, -1, *per_channel).flatten(-2), bits), codes, scale)
        if chan is not None and groups == 1:
            values = values * to_fields(chan.float(), bits)
        elif chan is not None:
            assert tier.row_group is not None
            index = tier.row_group[:, :, start:stop, None].expand(-1, -1, -1, d)
            values = values * to_fields(chan.gather(2, index).float(), bits)
        return from_fields(torch.matmul(probs, values))
    weighted = probs * v_scale[..., 0][:, :, None]  # [B, H, R, n]
    if groups == 1:
        out = from_fields(torch.matmul(weighted, codes)) + torch.matmul(probs, v_zero)
        return out if chan is None else out * chan[:, :, 0:1].float()
    assert chan is not None and tier.row_group is not None
    # several CSTQuant groups (one per flush): each row's probability goes to its own group's column
    member = (tier.row_group[:, :, None, start:stop] == torch.arange(groups, device=probs.device)[:, None]).float()
    w = (weighted[:, :, :, None, :] * member[:, :, None]).reshape(b, h, r * groups, n)  # [B, H, R * P, n]
    per_group = from_fields(torch.matmul(w, codes)).reshape(b, h, r, groups, d)
    zw = torch.matmul(probs * v_zero[..., 0][:, :, None], member.transpose(-1, -2))  # [B, H, R, P]
    return ((per_group + zw[..., None]) * chan[:, :, None].float()).sum(3)


FOLD_GROUPS_MAX = 64  # fold key scales into the queries for every group at once while groups x query rows <= this


def _regions(layout: PackedLayout) -> list[tuple[PackedTier | None, int]]:
    """The layout's regions that hold rows: ``(tier, rows)``, ``None`` for the full-precision buffer."""
    regions: list[tuple[PackedTier | None, int]] = [(tier, tier.k_codes.shape[2]) for tier in layout.tiers]
    regions.append((None, layout.fp_keys.shape[2]))
    return [(tier, n) for tier, n in regions if n]


def _row_blocks(tier: PackedTier | None, n: int, block_size: int) -> list[tuple[int, int]]:
    """Row ranges of at most ``block_size`` rows (whole parameter groups when they are uniform)."""
    if tier is not None and tier.group_rows and block_size >= tier.group_rows:
        block_size -= block_size % tier.group_rows
    return [(start, min(start + block_size, n)) for start in range(0, n, block_size)]


def _slots(layout: PackedLayout) -> torch.Tensor:
    """The slot of every stored row ``[B, H, N]`` in storage order (the tiers, then the buffer)."""
    slots = [tier.row_slot for tier in layout.tiers] + [layout.fp_slot]
    assert all(s is not None for s in slots), "packed_layout(with_slots=True) needed"
    return torch.cat(slots, 2)  # type: ignore[arg-type]


def _visible_rows(layout: PackedLayout, mask: torch.Tensor | None, num_tokens: int, q_rows: int) -> torch.Tensor | None:
    """Which stacked query row may attend to which stored row ``[B, H, 1 or R, N]`` (storage order: the tiers,
    then the buffer; padding rows never), None when every row is visible. ``mask`` in slot order as
    :func:`attend_packed` takes it."""
    if mask is None and not layout.padded:
        return None
    slots = _slots(layout)
    if mask is None:
        return (slots < num_tokens)[:, :, None]
    padded = torch.nn.functional.pad(mask.to(torch.bool), (0, 1))  # slot T: padding rows
    if padded.dim() == 3:
        return padded.gather(2, slots)[:, :, None]
    b, h, q, _ = padded.shape
    visible = padded.gather(3, slots[:, :, None].expand(-1, -1, q, -1))  # [B, H, q, N]
    return visible[:, :, None].expand(b, h, q_rows // q, q, -1).reshape(b, h, q_rows, -1)


def _check_mask(mask: torch.Tensor | None, store: PackedKV, q: int) -> None:
    if mask is None:
        return
    if mask.dim() not in (3, 4) or (tuple(mask.shape[:2]), mask.shape[-1]) != ((store.batch, store.kv_heads), store.num_tokens):
        raise ValueError(
            f"mask must be [B, H_kv, T] or [B, H_kv, q, T] with B={store.batch}, H_kv={store.kv_heads}, "
            f"T={store.num_tokens}; got {list(mask.shape)}"
        )
    if mask.dim() == 4 and mask.shape[2] != q:
        raise ValueError(f"a per-query mask must have q={q} rows, got {mask.shape[2]}")


def _packed_logits(grouped: torch.Tensor, layout: PackedLayout, block_size: int) -> torch.Tensor:
    """Unmasked logits ``[B, H, R, N]`` over every stored row (storage order), block by block."""
    parts = []
    for tier, n in _regions(layout):
        for start, stop in _row_blocks(tier, n, block_size):
            if tier is None:
                parts.append(torch.matmul(grouped, layout.fp_keys[:, :, start:stop].float().transpose(-1, -2)))
            else:
                parts.append(_tier_logits(grouped, tier, start, stop))
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


QUERY_ROWS_X_SLOTS_MAX = 1 << 22  # logits held at once (query rows x stored rows); more queries go in chunks


def attend_packed(
    query: torch.Tensor,
    store: PackedKV,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    block_size: int = 1024,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``[B, H_q, q, D]`` of ``query`` ``[B, H_q, q, D]`` over every slot of ``store``.

    ``mask`` (True = may attend, slot order) is ``[B, H_kv, T]`` (key validity, e.g. padding) or
    ``[B, H_kv, q, T]`` (per query, e.g. causal); None attends to every slot. ``scaling`` defaults to
    ``1 / sqrt(D)``. A query that may attend to no slot gets a zero output. Computed in fp32, returned
    in ``query.dtype``. With ``return_lse`` also returns the fp32 log-sum-exp of the logits
    ``[B, H_q, q]`` (-inf where nothing is visible), which :func:`packed_probabilities` reuses.

    CPU path: the logits of every stored row (the codes unpacked ``block_size`` rows at a time, the
    dequantisation folded into the queries, :func:`_tier_logits`), one softmax, then ``P V`` with the value
    dequantisation folded into the probabilities (:func:`_tier_values`). Query rows go in chunks so that
    at most ``QUERY_ROWS_X_SLOTS_MAX`` logits are held.
    """
    if use_triton(query):  # CUDA: one kernel reading the packed codes (attention/triton_packed.py)
        from kvcache.attention import triton_packed

        return triton_packed.attend_packed(query, store, mask, scaling, return_lse)
    if store.num_tokens == 0:
        empty = torch.full(query.shape[:3], float("-inf"), device=query.device)
        return (torch.zeros_like(query), empty) if return_lse else torch.zeros_like(query)
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    grouped = _prepare(query, store, scaling)
    _check_mask(mask, store, query.shape[2])
    layout = store.packed_layout(with_slots=mask is not None)
    visible = _visible_rows(layout, mask, store.num_tokens, grouped.shape[2])
    regions = _regions(layout)
    total = sum(n for _, n in regions)
    chunk = _query_chunk(grouped.shape[2], total, query.shape[2])
    outs, lses = [], []
    for first in range(0, grouped.shape[2], chunk):
        rows = grouped[:, :, first : first + chunk]
        logits = _packed_logits(rows, layout, block_size)
        if visible is not None:
            logits.masked_fill_(~(visible if visible.shape[2] == 1 else visible[:, :, first : first + chunk]), float("-inf"))
        # a query that sees nothing has top = -inf: the finite floor keeps exp(-inf - floor) = 0, so its
        # normaliser is 0, its output 0 / tiny = 0 and its log-sum-exp -inf
        top = logits.amax(-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).min)
        probs = torch.exp(logits.sub_(top))
        norm = probs.sum(-1, keepdim=True)
        acc: torch.Tensor | None = None
        offset = 0
        for tier, n in regions:
            for start, stop in _row_blocks(tier, n, block_size):
                block = probs[..., offset + start : offset + stop]
                if tier is None:
                    part = torch.matmul(block, layout.fp_values[:, :, start:stop].float())
                else:
                    part = _tier_values(block, tier, start, stop)
                acc = part if acc is None else acc.add_(part)
            offset += n
        assert acc is not None
        outs.append(acc.div_(norm.clamp(min=torch.finfo(torch.float32).tiny)))
        lses.append(top + torch.log(norm))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, 2)).reshape(query.shape).to(query.dtype)
    if not return_lse:
        return out
    lse = (lses[0] if len(lses) == 1 else torch.cat(lses, 2)).reshape(query.shape[:3])
    return out, lse


def _query_chunk(q_rows: int, total: int, q: int) -> int:
    """Stacked query rows per chunk, so that a chunk's logits over ``total`` stored rows stay within
    ``QUERY_ROWS_X_SLOTS_MAX``."""
    return max(1, min(q_rows, QUERY_ROWS_X_SLOTS_MAX // max(1, total)))


def packed_probabilities(
    query: torch.Tensor,
    store: PackedKV,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    block_size: int = 1024,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities ``[B, H_q, q, T]`` in slot order over the packed cache.

    These are the statistics eviction policies score with and ZipCache's saliency is made of
    (:func:`kvcache.quant.saliency.normalized_attention`), so an adapter computes them once per step.
    Pass ``lse`` from ``attend_packed(..., return_lse=True)`` to skip the first pass.
    """
    b, h_q, q, _ = query.shape
    t = store.num_tokens
    if lse is None:
        _, lse = attend_packed(query, store, mask, scaling, block_size, return_lse=True)  # type: ignore[misc]
    grouped = _prepare(query, store, scaling)
    _check_mask(mask, store, q)
    layout = store.packed_layout()
    visible = _visible_rows(layout, mask, t, grouped.shape[2])
    slots = _slots(layout)
    lse_g = lse.reshape(grouped.shape[:3] + (1,)).float().clamp(min=torch.finfo(torch.float32).min)
    out = torch.zeros(*grouped.shape[:3], t + 1, device=query.device)
    chunk = _query_chunk(grouped.shape[2], slots.shape[-1], q)
    for first in range(0, grouped.shape[2], chunk):
        rows = slice(first, first + chunk)
        logits = _packed_logits(grouped[:, :, rows], layout, block_size)
        if visible is not None:
            logits.masked_fill_(~(visible if visible.shape[2] == 1 else visible[:, :, rows]), float("-inf"))
        probs = torch.exp(logits.sub_(lse_g[:, :, rows]))
        out[:, :, rows].scatter_(-1, slots[:, :, None].expand_as(probs), probs)
    return out[..., :t].reshape(b, h_q, q, t)
