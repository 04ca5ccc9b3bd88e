"""KIVI: tuning-free asymmetric 2-bit KV quantisation (Liu et al., arXiv 2402.02750, ICML 2024).

Asymmetric min-max with ``scale = (max - min) / (2**b - 1)``. Keys are quantised per channel over
groups of ``G`` consecutive tokens (key outliers live in fixed channels); values per token over groups
of ``G`` channels. The most recent tokens stay in full precision (the residual window): tokens enter a
full-precision buffer, and once it holds ``R + G`` tokens the oldest ``G`` (a whole key group; more
groups at once for a long prompt) are quantised, so the last ``R`` to ``R + G - 1`` tokens are always in
full precision. Defaults: ``b = 2`` (4 also supported; 8 allowed), ``G = 32``, ``R = 128``.

The flush is decided on the host (no device read per decode step): from the store's lower bound on the
tokens any head buffers, which is exact until decode-time eviction removes tokens from some heads' buffers
and not others'; then a group may be quantised a few steps later than the exact count would allow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.quant.base import QuantCodec, element_bytes, fp_bytes
from kvcache.quant.tiers import TierRows
from kvcache.quant.quantizer import QUANT_BITS, quantize_groups
from kvcache.registry import PolicyConfigError, check_choice, check_int, param, register


@register("quant", "kivi")
@dataclass
class KIVI(QuantCodec):
    """KIVI: keys per channel in groups of G tokens, values per token in groups of G channels, fp residual window."""

    bits: int = param(2, "bit width of the quantised keys and values (2 or 4; 8 allowed)")
    group_size: int = param(32, "G: tokens per key group and channels per value group (must divide head_dim)")
    residual: int = param(128, "R: most recent tokens always kept in full precision")
    scale_dtype: str = param("float16", "dtype of scales and zero points: float16, bfloat16 or float32")

    def __post_init__(self) -> None:
        check_choice("kivi: bits", self.bits, QUANT_BITS)
        check_int("kivi: group_size", self.group_size, 1)
        check_int("kivi: residual", self.residual, 0)
        self._check_scale_dtype()

    @property
    def tier_bits(self) -> tuple[int, ...]:
        return (self.bits,)

    def value_group(self, head_dim: int) -> int:
        return self.group_size

    def check_head_dim(self, head_dim: int) -> None:
        super().check_head_dim(head_dim)
        if head_dim % self.group_size:
            raise PolicyConfigError(
                f"kivi: group_size {self.group_size} does not divide head_dim {head_dim}; "
                f"valid group sizes: {', '.join(str(g) for g in range(1, head_dim + 1) if head_dim % g == 0)}"
            )

    def _quantized_tokens(self, buffered: int) -> int:
        return max(0, (buffered - self.residual) // self.group_size) * self.group_size

    def flush_rows(self, least: int, most: int) -> int:
        # Heads may hold different numbers of buffered tokens after eviction: move the same whole
        # groups for all of them (as many as the head buffering the fewest can give), so every key
        # group has exactly G tokens.
        return self._quantized_tokens(least)

    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, saliency: torch.Tensor | None
    ) -> tuple[list[TierRows | None], torch.Tensor | None]:
        sd = self.torch_scale_dtype
        g = self.group_size
        k_codes, k_scale, k_zero = quantize_groups(keys, self.bits, 2, g, sd)
        v_codes, v_scale, v_zero = quantize_groups(values, self.bits, 3, g, sd)
        group_count = torch.full(k_scale.shape[:3], g, dtype=torch.int32, device=keys.device)
        return [TierRows(k_codes, v_codes, v_scale, v_zero, k_scale, k_zero, None, group_count)], None

    def bytes_formula(self, num_tokens: int, head_dim: int, batch: int, kv_heads: int, dtype: torch.dtype) -> int:
        n = self._quantized_tokens(num_tokens)
        sb = element_bytes(self.torch_scale_dtype)
        groups = n // self.group_size
        quantised = (
            2 * n * head_dim * self.bits // 8  # K and V codes
            + 2 * groups * head_dim * sb  # key scale + zero per channel per token group
            + 2 * n * (head_dim // self.group_size) * sb  # value scale + zero per token per channel group
            + 4 * groups  # rows per key group (int32)
        )
        return batch * kv_heads * (quantised + fp_bytes(num_tokens - n, head_dim, dtype))
