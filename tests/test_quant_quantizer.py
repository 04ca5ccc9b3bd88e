"""The shared min-max quantiser and CSTQuant: error bounds, exact grids, outward-rounded parameters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.quant.quantizer import (
    SCALE_DTYPES,
    cst_dequantize,
    cst_quantize,
    dequantize_groups,
    quantize_groups,
)


def _expand(param: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    return param.repeat_interleave(group, dim=dim)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    dim=st.sampled_from([2, 3]),
    group=st.sampled_from([1, 4, 8]),
    scale_dtype=st.sampled_from(sorted(SCALE_DTYPES)),
    magnitude=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_within_half_a_step(
    bits: int, dim: int, group: int, scale_dtype: str, magnitude: float, seed: int
) -> None:
    x = torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(seed)) * magnitude
    codes, scale, zero = quantize_groups(x, bits, dim, group, SCALE_DTYPES[scale_dtype])
    assert codes.dtype == torch.uint8 and int(codes.max()) < (1 << bits)
    assert scale.dtype == SCALE_DTYPES[scale_dtype]
    back = dequantize_groups(codes, scale, zero, dim, group)
    step = _expand(scale.float(), dim, group)
    assert ((x - back).abs() <= step / 2 + 1e-6 * magnitude).all()
    # the stored grid covers each group's [min, max] although it is stored at reduced precision
    lo = _expand(zero.float(), dim, group)
    assert (lo <= x).all() and (lo + step * ((1 << bits) - 1) >= x - 1e-6 * magnitude).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scale_dtype", sorted(SCALE_DTYPES))
def test_values_on_a_representable_grid_survive_unchanged(bits: int, scale_dtype: str) -> None:
    top = (1 << bits) - 1
    codes = torch.randint(0, top + 1, (1, 2, 8, 16), generator=torch.Generator().manual_seed(bits))
    codes[..., 0::8], codes[..., 1::8] = 0, top  # every group of 8 channels spans the whole grid
    x = -1.5 + codes.float() * 0.25
    q_codes, scale, zero = quantize_groups(x, bits, 3, 8, SCALE_DTYPES[scale_dtype])
    assert torch.equal(dequantize_groups(q_codes, scale, zero, 3, 8), x)
    assert torch.equal(q_codes, codes.to(torch.uint8))


def test_constant_group_and_masked_statistics() -> None:
    x = torch.full((1, 1, 4, 4), 0.75)
    codes, scale, zero = quantize_groups(x, 2, 2, 4)
    assert torch.equal(dequantize_groups(codes, scale, zero, 2, 4), x)
    # a padding row with a huge value does not widen the grid of the real rows
    y = torch.randn(1, 1, 5, 4)
    y[:, :, 4] = 1e4
    valid = torch.tensor([True] * 4 + [False]).reshape(1, 1, 5, 1)
    _, scale_masked, _ = quantize_groups(y, 4, 2, 5, valid=valid)
    _, scale_real, _ = quantize_groups(y[:, :, :4], 4, 2, 4)
    assert torch.equal(scale_masked, scale_real)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**16))
def test_cst_round_trip_bound(bits: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(2, 2, 12, 16, generator=gen) * torch.linspace(0.01, 30.0, 16)  # very uneven channels
    codes, scale, zero, c = cst_quantize(v, bits)
    assert c.shape == (2, 2, 1, 16) and scale.shape == (2, 2, 12, 1)
    back = cst_dequantize(codes, scale, zero, c)
    bound = c.float() * scale.float() / 2
    assert ((v - back).abs() <= bound * (1 + 1e-5) + 1e-6).all()
    assert torch.allclose(c.float(), v.abs().amax(-2, keepdim=True).sqrt(), rtol=1e-3)


def test_bad_parameters() -> None:
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="bits must be one of 2, 4, 8"):
        quantize_groups(x, 3, 2, 4)
    with pytest.raises(ValueError, match="group size 3 does not divide"):
        quantize_groups(x, 2, 2, 3)
    with pytest.raises(ValueError, match="scale_dtype='float32'"):
        quantize_groups(x * 1e6, 2, 2, 4)
    quantize_groups(x * 1e6, 2, 2, 4, torch.float32)
