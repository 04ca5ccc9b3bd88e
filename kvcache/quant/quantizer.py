"""Asymmetric min-max quantisation with groups, shared by every codec (KIVI, ZipCache).

For a group g of values x (KIVI, arXiv 2402.02750, eq. 1):

    zero = min(x_g),  scale = (max(x_g) - min(x_g)) / (2**b - 1)
    code = clamp(round((x - zero) / scale), 0, 2**b - 1),  x^ = code * scale + zero

Scales and zero points are stored at reduced precision (``scale_dtype``, float16 by default). They are
rounded *outwards* -- zero down, scale up -- so the stored grid still covers ``[min, max]`` and the
round-trip error stays within half of the *stored* scale: ``|x - x^| <= scale / 2`` (plus fp32
arithmetic rounding). Values already on a grid whose zero and scale are representable in
``scale_dtype`` come back unchanged.

Channel-separable token-wise quantisation (CSTQuant, ZipCache arXiv 2405.14256, sec. 4.2), used for
values: ``c_i = sqrt(max_t |V_{t,i}|)`` per channel; quantise ``V / c`` token-wise; multiply by ``c``
when dequantising. Its error bound is ``c_i * scale_t / 2``.
"""

from __future__ import annotations

import torch

QUANT_BITS: tuple[int, ...] = (2, 4, 8)
SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def check_bits(bits: int, what: str = "bits") -> None:
    if isinstance(bits, bool) or bits not in QUANT_BITS:
        raise ValueError(f"{what} must be one of {', '.join(map(str, QUANT_BITS))}, got {bits!r}")


def _round_outward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Cast fp32 ``x`` to ``dtype`` rounding up (``up``) or down, never towards the other side."""
    rounded = x.to(dtype)
    if dtype == torch.float32:
        return rounded
    wrong = rounded.float() < x if up else rounded.float() > x
    towards = torch.full_like(rounded, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(rounded, towards), rounded)


def check_on_device(ok: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless the one-element bool tensor ``ok`` is True, without a host read:
    ``torch._assert_async`` is a device-side assertion on CUDA (no synchronisation; a failure surfaces at
    the next synchronisation) and checks at once on CPU, where its error is re-raised as ``ValueError``."""
    try:
        torch._assert_async(ok, message)
    except RuntimeError as exc:
        if message in str(exc):
            raise ValueError(message) from None
        raise


def _check_finite(t: torch.Tensor, scale_dtype: torch.dtype) -> None:
    check_on_device(
        torch.isfinite(t).all(),
        f"quantisation parameters overflow {scale_dtype} (inputs too large or not finite); use scale_dtype='float32'",
    )


def minmax_params(
    x: torch.Tensor,
    bits: int,
    dim: int,
    scale_dtype: torch.dtype = torch.float16,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored ``(scale, zero)`` of min-max quantisation reducing over ``dim`` (kept, size 1).

    ``valid`` (broadcastable to ``x``) excludes padding entries from the statistics; a group with no
    valid entry gets ``zero = 0, scale = 1``.
    """
    x = x.float()
    if valid is None:
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    else:
        lo = x.masked_fill(~valid, float("inf")).amin(dim, keepdim=True)
        hi = x.masked_fill(~valid, float("-inf")).amax(dim, keepdim=True)
        empty = torch.isinf(lo)
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    zero = _round_outward(lo, scale_dtype, up=False)
    step = (hi - zero.float()) / float((1 << bits) - 1)
    scale = _round_outward(step, scale_dtype, up=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    _check_finite(zero, scale_dtype)
    _check_finite(scale, scale_dtype)
    return scale, zero


def encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of ``x`` on the grid ``zero + k * scale`` (parameters broadcast against ``x``)."""
    codes = torch.round((x.float() - zero.float()) / scale.float())
    return codes.clamp_(0, (1 << bits) - 1).to(torch.uint8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """fp32 ``codes * scale + zero`` (parameters broadcast against ``codes``)."""
    codes, scale, zero = codes.float(), scale.float(), zero.float()
    if zero.shape == codes.shape:
        return torch.addcmul(zero, codes, scale)
    return torch.addcmul(zero.expand_as(codes), codes, scale)


def _split(x: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """View ``dim`` of size n as ``(n // group, group)``."""
    dim = dim % x.dim()
    n = x.shape[dim]
    if group <= 0 or n % group:
        raise ValueError(f"group size {group} does not divide dimension {dim} of size {n}")
    return x.reshape(*x.shape[:dim], n // group, group, *x.shape[dim + 1 :])


def quantize_groups(
    x: torch.Tensor,
    bits: int,
    dim: int,
    group: int,
    scale_dtype: torch.dtype = torch.float16,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``x`` in groups of ``group`` consecutive entries along ``dim``.

    Returns ``codes`` (uint8, shape of ``x``) and ``scale``, ``zero`` shaped like ``x`` with ``dim``
    replaced by ``n // group``. KIVI keys: ``dim`` = tokens, ``group`` = G; KIVI values: ``dim`` =
    channels, ``group`` = G; a whole axis at once: ``group`` = its size. ``valid`` has ``x``'s shape
    (or broadcasts to it) and masks padding out of the statistics.
    """
    check_bits(bits)
    dim = dim % x.dim()
    grouped = _split(x, dim, group)
    mask = None if valid is None else _split(valid.expand_as(x), dim, group)
    scale, zero = minmax_params(grouped, bits, dim + 1, scale_dtype, mask)
    codes = encode(grouped, scale, zero, bits).reshape(x.shape)
    return codes, scale.squeeze(dim + 1), zero.squeeze(dim + 1)


def dequantize_groups(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dim: int, group: int
) -> torch.Tensor:
    """fp32 inverse of :func:`quantize_groups` (parameters shaped as it returns them)."""
    dim = dim % codes.dim()
    grouped = _split(codes, dim, group)
    return decode(grouped, scale.unsqueeze(dim + 1), zero.unsqueeze(dim + 1)).reshape(codes.shape)


def channel_scales(
    v: torch.Tensor, scale_dtype: torch.dtype = torch.float16, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """CSTQuant channel normalisers ``c_i = sqrt(max_t |V_{t,i}|)`` over the token axis (-2), kept.

    ``valid`` ``[..., T, 1]`` masks padding tokens; a channel that is all zero gets ``c = 1``.
    """
    mag = v.float().abs()
    if valid is not None:
        mag = mag.masked_fill(~valid, 0.0)
    c = mag.amax(-2, keepdim=True).sqrt().to(scale_dtype)
    c = torch.where(c > 0, c, torch.ones_like(c))
    _check_finite(c, scale_dtype)
    return c


def cst_quantize(
    v: torch.Tensor,
    bits: int,
    scale_dtype: torch.dtype = torch.float16,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSTQuant of ``v`` ``[..., T, D]``: returns ``codes``, token-wise ``scale``/``zero`` ``[..., T, 1]``
    and channel normalisers ``c`` ``[..., 1, D]``."""
    c = channel_scales(v, scale_dtype, valid)
    codes, scale, zero = quantize_groups(v.float() / c.float(), bits, -1, v.shape[-1], scale_dtype)
    return codes, scale, zero, c


def cst_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 inverse of :func:`cst_quantize` (``c`` broadcasts against ``codes``)."""
    return dequantize_groups(codes, scale, zero, -1, codes.shape[-1]) * c.float()
