"""Bit packing: pack/unpack are inverse, the byte layout is as documented, bad widths fail clearly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.quant.pack import pack, packed_length, unpack


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 4, 8]),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    groups=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_inverse(bits: int, lead: list[int], groups: int, seed: int) -> None:
    n = groups * (8 // bits)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (*lead, n), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_length(n, bits))
    assert packed.shape[-1] * 8 == n * bits
    assert torch.equal(unpack(packed, bits), codes)
    assert torch.equal(unpack(packed, bits, torch.float32), codes.float())


def test_byte_layout_first_code_in_low_bits() -> None:
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0x81]


def test_bad_bits_and_lengths() -> None:
    with pytest.raises(ValueError, match="valid bit widths: 1, 2, 4, 8"):
        pack(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="valid bit widths"):
        unpack(torch.zeros(2, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack(torch.zeros(6, dtype=torch.uint8), 2)
