"""The identity codec: every token stays in the store's native dtype (16-bit for fp16/bf16 models)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.quant.base import QuantCodec, fp_bytes
from kvcache.quant.tiers import TierRows
from kvcache.registry import register


@register("quant", "none")
@dataclass
class NoQuant(QuantCodec):
    """Native-precision storage (no quantisation); the reference every codec is measured against."""

    @property
    def tier_bits(self) -> tuple[int, ...]:
        return ()

    def value_group(self, head_dim: int) -> int:
        return head_dim

    def flush_rows(self, least: int, most: int) -> int:
        return 0

    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, saliency: torch.Tensor | None
    ) -> tuple[list[TierRows | None], torch.Tensor | None]:
        raise RuntimeError("the 'none' codec never quantises")

    def bytes_formula(self, num_tokens: int, head_dim: int, batch: int, kv_heads: int, dtype: torch.dtype) -> int:
        return batch * kv_heads * fp_bytes(num_tokens, head_dim, dtype)
