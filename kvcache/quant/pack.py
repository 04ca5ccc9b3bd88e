"""Pack low-bit integer codes into bytes and back (vectorised torch, no Python loops over elements).

Codes of ``bits`` in {1, 2, 4, 8} are packed along the last dimension, ``8 // bits`` codes per byte,
the first code in the lowest bits. The last dimension must be a multiple of ``8 // bits``.
"""

from __future__ import annotations

import torch

PACK_BITS: tuple[int, ...] = (1, 2, 4, 8)


def _check(bits: int, length: int) -> int:
    if bits not in PACK_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; valid bit widths: {', '.join(map(str, PACK_BITS))}")
    per_byte = 8 // bits
    if length % per_byte:
        raise ValueError(f"{bits}-bit packing needs the last dimension to be a multiple of {per_byte}, got {length}")
    return per_byte


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., N]`` codes in ``[0, 2**bits)`` -> ``[..., N * bits // 8]`` uint8."""
    per_byte = _check(bits, codes.shape[-1])
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifted = torch.bitwise_left_shift(grouped & ((1 << bits) - 1), _shifts(bits, codes.device))
    # Fields do not overlap, so a sum is an OR; summing in int32 avoids uint8 overflow checks.
    return shifted.to(torch.int32).sum(-1).to(torch.uint8)


_TABLES: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _table(bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[256, 8 // bits]``: the codes held by each byte value (a lookup beats shifting every byte)."""
    key = (bits, dtype, device)
    if key not in _TABLES:
        byte = torch.arange(256, dtype=torch.int32, device=device)[:, None]
        fields = torch.bitwise_right_shift(byte, _shifts(bits, device).to(torch.int32)) & ((1 << bits) - 1)
        _TABLES[key] = fields.to(dtype)
    return _TABLES[key]


def unpack(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., M]`` uint8 -> ``[..., M * 8 // bits]`` codes as ``dtype``."""
    _check(bits, 8 // bits if bits in PACK_BITS else 1)
    if bits == 8:
        return packed.to(dtype)
    table = _table(bits, dtype, packed.device)
    codes = table.index_select(0, packed.reshape(-1).to(torch.int32))
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def packed_length(length: int, bits: int) -> int:
    """Bytes that ``length`` codes of ``bits`` occupy."""
    return length // _check(bits, length)
