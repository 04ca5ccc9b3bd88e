"""Decode attention over the packed (2/4/8-bit) KV store as a Triton kernel reading the codes directly.

``softmax(Q K^T * scaling + mask) V`` over a :class:`~kvcache.attention.quantized.PackedKV`, as
:func:`kvcache.attention.quantized.attend_packed` (the torch reference), without dequantising the cache
into memory. Each row of a tier is unpacked in registers -- code ``c`` of channel ``d`` is bits
``(d mod 8/b) * b`` of byte ``d // (8/b)`` -- and dequantised there:

    k = code * k_scale[group(row), d] + k_zero[group(row), d]          (KIVI per-channel keys, arXiv 2402.02750)
    v = (code * v_scale[row, d // G_v] + v_zero[row, d // G_v]) * chan  (per-token values; ZipCache's
                                                                          CSTQuant normaliser, arXiv 2405.14256)

ZipCache's two tiers (and KIVI's one) are read one after the other, then the full-precision buffer.
Flash-decoding: each program takes one split of one region's rows for one ``(batch, KV head)`` and a
block of the group's stacked query rows, and keeps an online softmax (running max ``m``, normaliser
``l``, accumulator ``acc``); the splits are merged after by their log-sum-exp,
``out = sum_s e^{m_s - M} acc_s / sum_s e^{m_s - M} l_s``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcache.attention.quantized import PackedKV, _prepare

BLOCK_ROWS_MAX = 64  # stacked query rows per program (G * q rows; more take several row blocks)
BLOCK_KEYS = 32  # cache rows per inner step
TARGET_PROGRAMS = 512  # splits are sized so that a decode step launches about this many programs


@triton.jit
def _packed_decode_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr, v_chan_ptr, group_ptr, slot_ptr,
    mask_ptr, m_out_ptr, l_out_ptr, acc_out_ptr,
    n_rows, n_groups, code_bytes, key_code_bytes, value_groups, value_group, rows_per_split, split_base, total_splits,
    q_rows, q_len, t_len, head_dim, padded_rows,
    BITS: tl.constexpr, KEY_BITS: tl.constexpr, HAS_CHAN: tl.constexpr, MASK_KIND: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One split of one region (``BITS`` = 0: the fp buffer) for one (batch, KV head) and row block.
    ``BITS``/``code_bytes`` are the value codes', ``KEY_BITS``/``key_code_bytes`` the key codes'.
    ``MASK_KIND``: 0 none, 1 per slot ``[BH, T + 1]``, 2 per query and slot ``[BH, q, T + 1]``."""
    row_block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    qrow = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    qrow_ok = qrow < q_rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + (bh * q_rows + qrow)[:, None] * head_dim + dims[None, :],
                mask=qrow_ok[:, None] & dim_ok[None, :], other=0.0)
    per_byte: tl.constexpr = 8 // BITS if BITS > 0 else 1
    code_mask: tl.constexpr = (1 << BITS) - 1 if BITS > 0 else 0
    byte_of_dim = dims // per_byte
    shift_of_dim = (dims % per_byte) * BITS
    key_per_byte: tl.constexpr = 8 // KEY_BITS if KEY_BITS > 0 else 1
    key_code_mask: tl.constexpr = (1 << KEY_BITS) - 1 if KEY_BITS > 0 else 0
    key_byte_of_dim = dims // key_per_byte
    key_shift_of_dim = (dims % key_per_byte) * KEY_BITS

    row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    norm = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, n_rows)
    for row_start in range(start, stop, BLOCK_N):
        rows = row_start + tl.arange(0, BLOCK_N)
        row_ok = rows < stop
        flat_row = bh * n_rows + rows
        tile_ok = row_ok[:, None] & dim_ok[None, :]
        if BITS == 0:
            k = tl.load(k_ptr + flat_row[:, None] * head_dim + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + flat_row[:, None] * head_dim + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        else:
            code_offsets = flat_row[:, None] * code_bytes + byte_of_dim[None, :]
            key_offsets = flat_row[:, None] * key_code_bytes + key_byte_of_dim[None, :]
            k_code = (tl.load(k_ptr + key_offsets, mask=tile_ok, other=0).to(tl.int32) >> key_shift_of_dim[None, :]) & key_code_mask
            v_code = (tl.load(v_ptr + code_offsets, mask=tile_ok, other=0).to(tl.int32) >> shift_of_dim[None, :]) & code_mask
            group = tl.load(group_ptr + flat_row, mask=row_ok, other=0)
            param_offsets = (bh * n_groups + group)[:, None] * head_dim + dims[None, :]
            k_scale = tl.load(k_scale_ptr + param_offsets, mask=tile_ok, other=0.0).to(tl.float32)
            k_zero = tl.load(k_zero_ptr + param_offsets, mask=tile_ok, other=0.0).to(tl.float32)
            k = k_code.to(tl.float32) * k_scale + k_zero
            value_offsets = flat_row[:, None] * value_groups + (dims // value_group)[None, :]
            v_scale = tl.load(v_scale_ptr + value_offsets, mask=tile_ok, other=0.0).to(tl.float32)
            v_zero = tl.load(v_zero_ptr + value_offsets, mask=tile_ok, other=0.0).to(tl.float32)
            v = v_code.to(tl.float32) * v_scale + v_zero
            if HAS_CHAN:
                v = v * tl.load(v_chan_ptr + param_offsets, mask=tile_ok, other=0.0).to(tl.float32)
        slot = tl.load(slot_ptr + flat_row, mask=row_ok, other=t_len)
        if MASK_KIND == 0:
            visible = (row_ok & (slot < t_len))[None, :] & qrow_ok[:, None]
        elif MASK_KIND == 1:
            allowed = tl.load(mask_ptr + bh * (t_len + 1) + slot, mask=row_ok, other=0) != 0
            visible = (row_ok & allowed)[None, :] & qrow_ok[:, None]
        else:
            query = qrow % q_len
            allowed = tl.load(mask_ptr + (bh * q_len + query)[:, None] * (t_len + 1) + slot[None, :],
                              mask=qrow_ok[:, None] & row_ok[None, :], other=0) != 0
            visible = allowed & row_ok[None, :] & qrow_ok[:, None]
        z = tl.where(visible, tl.dot(q, tl.trans(k), input_precision="ieee"), float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(z - safe_max[:, None])
        correction = tl.exp(row_max - safe_max)
        norm = norm * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p, v, input_precision="ieee")
        row_max = new_max
    out_row = (bh * total_splits + split_base + split) * padded_rows + qrow
    tl.store(m_out_ptr + out_row, row_max)
    tl.store(l_out_ptr + out_row, norm)
    tl.store(acc_out_ptr + out_row[:, None] * BLOCK_D + dims[None, :], acc)


def _slot_mask(mask: torch.Tensor | None, store: PackedKV) -> tuple[torch.Tensor | None, int]:
    """``mask`` padded with a False slot ``T`` (padding rows point there) as uint8, and its kind."""
    if mask is None:
        return None, 0
    if mask.dim() not in (3, 4) or (tuple(mask.shape[:2]), mask.shape[-1]) != ((store.batch, store.kv_heads), store.num_tokens):
        raise ValueError(
            f"mask must be [B, H_kv, T] or [B, H_kv, q, T] with B={store.batch}, H_kv={store.kv_heads}, "
            f"T={store.num_tokens}; got {list(mask.shape)}"
        )
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, 1)).contiguous()
    return padded, 1 if mask.dim() == 3 else 2


def attend_packed(
    query: torch.Tensor,
    store: PackedKV,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    return_lse: bool = False,
    rows_per_split: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvcache.attention.quantized.attend_packed` in Triton: output ``[B, H_q, q, D]`` in
    ``query.dtype`` (and the fp32 log-sum-exp ``[B, H_q, q]`` with ``return_lse``).

    ``rows_per_split`` (a multiple of ``BLOCK_KEYS``) fixes the rows each program reads; by default the
    splits are sized for about ``TARGET_PROGRAMS`` programs.
    """
    b, h_q, q_len, d = query.shape
    if store.num_tokens == 0:
        empty = torch.full(query.shape[:3], float("-inf"), device=query.device)
        return (torch.zeros_like(query), empty) if return_lse else torch.zeros_like(query)
    grouped = _prepare(query, store, scaling).contiguous()  # [B, H_kv, G * q, D] fp32, scaled
    h_kv = store.kv_heads
    q_rows = grouped.shape[2]
    mask_u8, mask_kind = _slot_mask(mask, store)
    if mask_kind == 2 and mask_u8 is not None and mask_u8.shape[2] != q_len:
        raise ValueError(f"a per-query mask must have q={q_len} rows, got {mask_u8.shape[2]}")
    layout = store.packed_layout()
    regions = [(tier.bits, tier) for tier in layout.tiers]
    if layout.fp_keys.shape[2]:
        regions.append((0, None))
    block_r = min(BLOCK_ROWS_MAX, max(16, triton.next_power_of_2(q_rows)))
    row_blocks = triton.cdiv(q_rows, block_r)
    block_d = max(16, triton.next_power_of_2(d))
    if rows_per_split is None:
        splits_wanted = max(1, TARGET_PROGRAMS // (b * h_kv * row_blocks * max(1, len(regions))))
        most_rows = max([layout.fp_keys.shape[2], *(tier.k_codes.shape[2] for tier in layout.tiers)])
        rows_per_split = BLOCK_KEYS * max(1, triton.cdiv(triton.cdiv(most_rows, splits_wanted), BLOCK_KEYS))
    elif rows_per_split <= 0 or rows_per_split % BLOCK_KEYS:
        raise ValueError(f"rows_per_split must be a positive multiple of {BLOCK_KEYS}, got {rows_per_split}")
    region_rows = [(tier.k_codes.shape[2] if tier is not None else layout.fp_keys.shape[2]) for _, tier in regions]
    region_splits = [triton.cdiv(n, rows_per_split) for n in region_rows]
    total_splits = sum(region_splits)
    padded_rows = row_blocks * block_r
    stats = torch.full((b * h_kv, total_splits, padded_rows), float("-inf"), device=query.device)
    norms = torch.zeros_like(stats)
    accs = torch.zeros(b * h_kv, total_splits, padded_rows, block_d, device=query.device)
    dummy = grouped  # stands in for pointers a region does not read
    split_base = 0
    for (bits, tier), n_rows, splits in zip(regions, region_rows, region_splits):
        if tier is None:
            tensors = [layout.fp_keys.contiguous(), layout.fp_values.contiguous(), dummy, dummy, dummy, dummy, dummy,
                       dummy, layout.fp_slot.contiguous()]
            n_groups, code_bytes, key_code_bytes, value_groups, value_group, has_chan = 1, d, d, 1, d, False
            key_bits = 0
        else:
            tensors = [t.contiguous() for t in (tier.k_codes, tier.v_codes, tier.k_scale, tier.k_zero, tier.v_scale,
                                                tier.v_zero)]
            tensors += [tier.v_chan.contiguous() if tier.v_chan is not None else dummy, tier.row_group.contiguous(),
                        tier.row_slot.contiguous()]
            n_groups, code_bytes, key_code_bytes = tier.k_scale.shape[2], tier.v_codes.shape[3], tier.k_codes.shape[3]
            key_bits = tier.key_bits
            value_groups, value_group, has_chan = tier.v_scale.shape[3], tier.value_group, tier.v_chan is not None
        if splits:
            _packed_decode_kernel[(row_blocks, b * h_kv, splits)](
                grouped, *tensors, mask_u8 if mask_u8 is not None else dummy, stats, norms, accs,
                n_rows, n_groups, code_bytes, key_code_bytes, value_groups, value_group, rows_per_split, split_base,
                total_splits, q_rows, q_len, store.num_tokens, d, padded_rows,
                BITS=bits, KEY_BITS=key_bits, HAS_CHAN=has_chan, MASK_KIND=mask_kind,
                BLOCK_R=block_r, BLOCK_N=BLOCK_KEYS, BLOCK_D=block_d,
            )
        split_base += splits
    # merge the splits by their log-sum-exp
    top = stats.amax(1, keepdim=True)
    safe_top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weight = torch.exp(stats - safe_top)
    norm = (weight * norms).sum(1)[:, :q_rows]
    acc = (weight[..., None] * accs).sum(1)[:, :q_rows, :d]
    out = torch.where(norm[..., None] > 0, acc / norm[..., None].clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(acc))
    out = out.reshape(query.shape).to(query.dtype)
    if not return_lse:
        return out
    lse = (safe_top[:, 0, :q_rows] + torch.log(norm)).reshape(query.shape[:3])
    return out, lse
