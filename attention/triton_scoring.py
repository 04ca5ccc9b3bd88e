"""Fused attention column sums as a Triton kernel: the statistic every-query policies score with.

For each ``(batch, KV head, query head g of the group)`` and slot ``j``::

    c_j = sum_i softmax(transform(z_i))_j,   z_ij = q_i . k_j * scaling  (visible slots; -inf otherwise)

H2O (Zhang et al., arXiv 2306.14048) uses ``transform = identity``; Keyformer (Adnan et al.,
arXiv 2403.09054) uses ``(z + g) / tau`` with Gumbel noise ``g = -log(-log(U))`` drawn inside the kernel
from Philox (``tl.rand``) at the element's flat index ``[B, H_kv, G, q, T]``, so a seed fixes the noise.
Visibility is :func:`kvcache.attention.scoring.visibility`: slot j is visible to query i when
``valid_j and index_j <= index_i``, or ``index_j == index_i``.

The ``q x T`` matrix is never written: one program takes a block of the group's stacked query rows
(``G * q`` rows, row ``r`` = query head ``r // q``, query ``r % q``; the group shares K) and walks the key
blocks twice -- first for the row max ``m`` and normaliser ``l`` (online), then for ``p = exp(z - m) / l``,
whose column sums it adds into the output with atomics. Key blocks that no row may see (all
``index_j`` past the rows' largest position: the causal upper triangle of a prompt) are skipped.
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


@triton.jit
def _logits_block(
    q, k_ptr, kidx_ptr, kvalid_ptr, slot_start, t_len, qpos, row_flat, row_ok,
    stride_kt, stride_kd, head_dim, scale, inv_tau, seed,
    GUMBEL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Transformed, masked logits ``[BLOCK_R, BLOCK_T]`` of one key block, and the block's Gumbel noise."""
    slots = slot_start + tl.arange(0, BLOCK_T)
    slot_ok = slots < t_len
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
    q_ptr, k_ptr, kidx_ptr, kvalid_ptr, qidx_ptr, out_ptr, noise_ptr,
    q_len, t_len, group, h_kv, head_dim,
    stride_qb, stride_qh, stride_qi, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_ib, stride_ih, stride_qib,
    stride_ob, stride_oh, stride_og,
    scale, inv_tau, seed,
    GUMBEL: tl.constexpr, RETURN_NOISE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    row_block = tl.program_id(0)
    bh = tl.program_id(1)
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

    # pass 1: row max and normaliser, online
    row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    norm = tl.zeros([BLOCK_R], tl.float32)
    for slot_start in range(0, t_len, BLOCK_T):
        first_pos = tl.min(tl.load(kidx_base + slot_start + tl.arange(0, BLOCK_T),
                                   mask=slot_start + tl.arange(0, BLOCK_T) < t_len, other=last_pos + 1), axis=0)
        if first_pos <= last_pos:
            z, noise, slots, slot_ok = _logits_block(
                q, k_base, kidx_base, kvalid_base, slot_start, t_len, qpos, row_flat, row_ok,
                stride_kt, stride_kd, head_dim, scale, inv_tau, seed, GUMBEL, HEAD_DIM, BLOCK_T, DOT_PRECISION)
            new_max = tl.maximum(row_max, tl.max(z, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            norm = norm * tl.exp(row_max - safe_max) + tl.sum(tl.exp(z - safe_max[:, None]), axis=1)
            row_max = new_max

    # pass 2: p = exp(z - m) / l, summed over the rows of each query head into the output
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    inv_norm = tl.where(norm > 0, 1.0 / tl.maximum(norm, 1e-30), 0.0)
    g_first = (row_block * BLOCK_R) // q_len
    g_last = (tl.minimum(row_block * BLOCK_R + BLOCK_R, rows) - 1) // q_len
    out_base = out_ptr + b * stride_ob + h * stride_oh
    for slot_start in range(0, t_len, BLOCK_T):
        first_pos = tl.min(tl.load(kidx_base + slot_start + tl.arange(0, BLOCK_T),
                                   mask=slot_start + tl.arange(0, BLOCK_T) < t_len, other=last_pos + 1), axis=0)
        if RETURN_NOISE or first_pos <= last_pos:
            z, noise, slots, slot_ok = _logits_block(
                q, k_base, kidx_base, kvalid_base, slot_start, t_len, qpos, row_flat, row_ok,
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
        grid = (triton.cdiv(group * q_len, BLOCK_ROWS), b * h_kv)
        _column_sums_kernel[grid](
            queries, keys, key_index, key_valid, query_index, out, noise,
            q_len, t_len, group, h_kv, d,
            *queries.stride(), *keys.stride(),
            key_index.stride(0), key_index.stride(1), query_index.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            float(scaling), 1.0 / transform.tau if gumbel else 1.0, seed if gumbel else 0,
            GUMBEL=gumbel, RETURN_NOISE=return_noise and gumbel,
            BLOCK_R=BLOCK_ROWS, BLOCK_T=BLOCK_SLOTS, HEAD_DIM=max(16, triton.next_power_of_2(d)), DOT_PRECISION=precision,
        )
    return (out, noise) if return_noise else out
