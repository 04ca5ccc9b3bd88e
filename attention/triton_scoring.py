"""Fused attention column sums as a Triton kernel: the statistic every-query policies score with.

For each ``(batch, KV head, query head g of the group)`` and slot ``j``::

    c_j = sum_i softmax(transform(z_i))_j,   z_ij = q_i . k_j * scaling  (visible slots; -inf otherwise)

H2O (Zhang et al., arXiv 2306.14048) uses ``transform = identity``; Keyformer (Adnan et al.,
arXiv 2403.09054) uses ``(z + g) / tau`` with Gumbel noise ``g = -log(-log(U))`` drawn inside the kernel
from Philox (``tl.rand``) at the element's flat index ``[B, H_kv, G, q, T]``, so a seed fixes the noise.
Visibility is :func:`kvcache.attention.scoring.visibility`: slot j is visible to query i when
``valid_j and index_j <= index_i``, or ``index_j == index_i``.

The ``q x T`` matrix is never written: a program takes a block of the group's stacked query rows
(``G * q`` rows, row ``r`` = query head ``r // q``, query ``r % q``; the group shares K) and a split of the
slots (one split for a prompt chunk; several for a decode query, flash-decoding style), and the kernel
runs twice -- first for each split's row max ``m_s`` and normaliser ``l_s`` (online), merged as
``M = max_s m_s``, ``L = sum_s l_s e^(m_s - M)``; then for ``p = exp(z - M) / L``, whose column sums it
adds into the output with atomics. Key blocks that no row may see (all ``index_j`` past the rows'
largest position: the causal upper triangle of a prompt) are skipped.
The torch reference is :func:`kvcache.attention.scoring.column_sums`.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from kvcache.attention.gumbel import GumbelLogits
from kvcache.attention.triton_dispatch import kernel_computes

# Rows of stacked queries per program and slots per key block. 16 is tl.dot's smallest tile.
BLOCK_ROWS = 32
BLOCK_SLOTS = 64
TARGET_PROGRAMS = 512  # decode (few query rows) splits the slots until about this many programs run


@triton.jit
def _logits_block(
    q, k_ptr, kidx_ptr, kvalid_ptr, slot_start, slot_stop, t_len, qpos, row_flat, row_ok,
    stride_kt, stride_kd, head_dim, scale, inv_tau, seed,
    GUMBEL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Transformed, masked logits ``[BLOCK_R, BLOCK_T]`` of the key block at ``slot_start`` (slots up to
    ``slot_stop``), and the block's Gumbel noise (drawn at its flat index in ``[B, H_kv, G, q, T]``)."""
    slots = slot_start + tl.arange(0, BLOCK_T)
    slot_ok = slots < slot_stop
    dims = tl.arange(0, HEAD_DIM)
    k = tl.load(k_ptr + slots[:, None] * stride_kt + dims[None, :] * stride_kd,
                mask=slot_ok[:, None] & (dims < head_dim)[None, :], other=0.0)
    kpos = tl.load(kidx_ptr + slots, mask=slot_ok, other=0)
    kvalid = tl.load(kvalid_ptr + slots, mask=slot_ok, other=0) != 0
    z = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    visible = ((kvalid[None, :] & (kpos[None, :] <= qpos[:, None])) | (kpos[None, :] == qpos[:, None]))
    visible = visible & slot_ok[None, :] & row_ok[:, None]
    noise = tl.zeros_like(z)
    if GUMBEL:
        offsets = row_flat[:, None] * t_len + slots[None, :].to(tl.int64)
        uniform = tl.minimum(tl.maximum(tl.rand(seed, offsets), 1e-20), 1.0 - 1e-7)
        noise = -tl.log(-tl.log(uniform))
        z = (z + noise) * inv_tau
    return tl.where(visible, z, float("-inf")), noise, slots, slot_ok


@triton.jit
def _column_sums_kernel(
    q_ptr, k_ptr, kidx_ptr, kvalid_ptr, qidx_ptr, out_ptr, noise_ptr, max_ptr, norm_ptr,
    q_len, t_len, group, h_kv, head_dim, slots_per_split, n_splits, padded_rows,
    stride_qb, stride_qh, stride_qi, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_ib, stride_ih, stride_qib,
    stride_ob, stride_oh, stride_og,
    scale, inv_tau, seed,
    SUMS: tl.constexpr, GUMBEL: tl.constexpr, RETURN_NOISE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One row block x one split of the slots for one (batch, KV head). ``SUMS`` False: the split's row
    max and normaliser into ``max_ptr``/``norm_ptr`` ``[BH, splits, rows]``; True: with the merged ones
    (``[BH, rows]``: max, 1 / normaliser), add the split's column sums of p into ``out_ptr``."""
    row_block = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // h_kv
    h = bh % h_kv
    rows = group * q_len
    row = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    g_of_row = row // q_len
    i_of_row = row % q_len
    row_flat = (bh * rows + row).to(tl.int64)  # flat row of [B, H_kv, G, q]: the noise's offset base
    dims = tl.arange(0, HEAD_DIM)
    q_ptrs = (q_ptr + b * stride_qb + (h * group + g_of_row)[:, None] * stride_qh
              + i_of_row[:, None] * stride_qi + dims[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (dims < head_dim)[None, :], other=0.0)
    qpos = tl.load(qidx_ptr + b * stride_qib + i_of_row, mask=row_ok, other=0)
    last_pos = tl.max(tl.where(row_ok, qpos, tl.min(qpos)), axis=0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    kidx_base = kidx_ptr + b * stride_ib + h * stride_ih
    kvalid_base = kvalid_ptr + b * stride_ib + h * stride_ih
    slot_lo = split * slots_per_split
    slot_hi = tl.minimum(slot_lo + slots_per_split, t_len)

    if not SUMS:  # row max and normaliser over this split, online
        row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        norm = tl.zeros([BLOCK_R], tl.float32)
        for slot_start in range(slot_lo, slot_hi, BLOCK_T):
            block = slot_start + tl.arange(0, BLOCK_T)
            first_pos = tl.min(tl.load(kidx_base + block, mask=block < slot_hi, other=last_pos + 1), axis=0)
            if first_pos <= last_pos:  # else no row may see any slot of the block (causal upper triangle)
                z, noise, slots, slot_ok = _logits_block(
                    q, k_base, kidx_base, kvalid_base, slot_start, slot_hi, t_len, qpos, row_flat, row_ok,
                    stride_kt, stride_kd, head_dim, scale, inv_tau, seed, GUMBEL, HEAD_DIM, BLOCK_T, DOT_PRECISION)
                new_max = tl.maximum(row_max, tl.max(z, axis=1))
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
                norm = norm * tl.exp(row_max - safe_max) + tl.sum(tl.exp(z - safe_max[:, None]), axis=1)
                row_max = new_max
        stats = (bh * n_splits + split) * padded_rows + row
        tl.store(max_ptr + stats, row_max)
        tl.store(norm_ptr + stats, norm)
    else:  # p = exp(z - m) / l, summed over the rows of each query head of the block
        safe_max = tl.load(max_ptr + bh * padded_rows + row)
        inv_norm = tl.load(norm_ptr + bh * padded_rows + row)
        g_first = (row_block * BLOCK_R) // q_len
        g_last = (tl.minimum(row_block * BLOCK_R + BLOCK_R, rows) - 1) // q_len
        out_base = out_ptr + b * stride_ob + h * stride_oh
        for slot_start in range(slot_lo, slot_hi, BLOCK_T):
            block = slot_start + tl.arange(0, BLOCK_T)
            first_pos = tl.min(tl.load(kidx_base + block, mask=block < slot_hi, other=last_pos + 1), axis=0)
            if (first_pos <= last_pos) | RETURN_NOISE:
                z, noise, slots, slot_ok = _logits_block(
                    q, k_base, kidx_base, kvalid_base, slot_start, slot_hi, t_len, qpos, row_flat, row_ok,
                    stride_kt, stride_kd, head_dim, scale, inv_tau, seed, GUMBEL, HEAD_DIM, BLOCK_T, DOT_PRECISION)
                if RETURN_NOISE:
                    offsets = row_flat[:, None] * t_len + slots[None, :].to(tl.int64)
                    tl.store(noise_ptr + offsets, noise, mask=row_ok[:, None] & slot_ok[None, :])
                p = tl.exp(z - safe_max[:, None]) * inv_norm[:, None]
                for g in range(g_first, g_last + 1):
                    part = tl.sum(tl.where((g_of_row == g)[:, None], p, 0.0), axis=0)
                    tl.atomic_add(out_base + g * stride_og + slots, part, mask=slot_ok)


def column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_index: torch.Tensor,
    key_valid: torch.Tensor,
    query_index: torch.Tensor,
    scaling: float,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int | None = None,
    return_noise: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``[B, H_kv, G, T]`` fp32 column sums of softmax(transform(z)), as
    :func:`kvcache.attention.scoring.column_sums`, in one Triton kernel.

    ``transform`` is None (plain softmax) or a :class:`GumbelLogits`; its noise comes from Philox seeded
    with ``seed`` (default: ``transform.kernel_seed()``). ``return_noise`` (debugging and tests) also
    returns the Gumbel noise ``[B, H_kv, G, q, T]`` the kernel drew, written to memory only then.
    """
    if not kernel_computes(transform):
        raise TypeError(f"the Triton column sums compute no transform {transform!r}; use the torch path")
    b, h_q, q_len, d = queries.shape
    h_kv, t_len = keys.shape[1], keys.shape[2]
    if keys.shape[0] != b or keys.shape[3] != d or h_q % h_kv:
        raise ValueError(f"queries {list(queries.shape)} do not fit keys {list(keys.shape)}")
    group = h_q // h_kv
    gumbel = isinstance(transform, GumbelLogits)
    if gumbel and seed is None:
        seed = transform.kernel_seed()
    half = keys.dtype == torch.float16 or (keys.dtype == torch.bfloat16 and keys.is_cuda)
    if queries.dtype != keys.dtype or not half:  # (Triton 3.9's CPU interpreter multiplies bf16 tiles wrongly)
        queries, keys = queries.float(), keys.float()
    precision = "ieee" if keys.dtype == torch.float32 else "tf32"
    key_index = key_index.contiguous()
    key_valid = key_valid.to(torch.uint8).contiguous()
    query_index = query_index.to(key_index.dtype).contiguous()
    out = torch.zeros(b, h_kv, group, t_len, dtype=torch.float32, device=keys.device)
    noise = torch.zeros(b, h_kv, group, q_len, t_len, dtype=torch.float32, device=keys.device) if return_noise else out
    if t_len and q_len:
        rows = group * q_len
        row_blocks = triton.cdiv(rows, BLOCK_ROWS)
        padded_rows = row_blocks * BLOCK_ROWS
        # split the slots too when few (batch, head, row block) programs would run (decode): flash-decoding
        key_blocks = triton.cdiv(t_len, BLOCK_SLOTS)
        splits = min(key_blocks, max(1, TARGET_PROGRAMS // (b * h_kv * row_blocks)))
        slots_per_split = BLOCK_SLOTS * triton.cdiv(key_blocks, splits)
        splits = triton.cdiv(t_len, slots_per_split)
        row_max = torch.empty(b * h_kv, splits, padded_rows, dtype=torch.float32, device=keys.device)
        norm = torch.empty_like(row_max)
        common = (
            q_len, t_len, group, h_kv, d, slots_per_split, splits, padded_rows,
            *queries.stride(), *keys.stride(),
            key_index.stride(0), key_index.stride(1), query_index.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            float(scaling), 1.0 / transform.tau if gumbel else 1.0, seed if gumbel else 0,
        )
        meta = dict(GUMBEL=gumbel, RETURN_NOISE=return_noise and gumbel, BLOCK_R=BLOCK_ROWS, BLOCK_T=BLOCK_SLOTS,
                    HEAD_DIM=max(16, triton.next_power_of_2(d)), DOT_PRECISION=precision)
        grid = (row_blocks, b * h_kv, splits)
        args = (queries, keys, key_index, key_valid, query_index, out, noise)
        _column_sums_kernel[grid](*args, row_max, norm, *common, SUMS=False, **meta)
        # merge the splits: M = max_s m_s, L = sum_s l_s e^(m_s - M); the second pass takes M and 1 / L
        top = row_max.amax(1)
        top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
        total = (norm * torch.exp(row_max - top[:, None])).sum(1)
        inverse = torch.where(total > 0, 1.0 / total.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(total))
        _column_sums_kernel[grid](*args, top.contiguous(), inverse.contiguous(), *common, SUMS=True, **meta)
    return (out, noise) if return_noise else out
