"""What every codec (kind ``quant``) provides to the shared per-layer store.

A codec decides *when* buffered full-precision tokens are quantised (:meth:`QuantCodec.flush_count`)
and *how* (:meth:`QuantCodec.encode`); :class:`kvcache.quant.store.KVStore` does the bookkeeping
(packing, per-head slots, eviction, byte accounting) identically for all of them.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from kvcache.quant.quantizer import SCALE_DTYPES
from kvcache.quant.tiers import TierRows
from kvcache.registry import PolicyConfigError



class QuantCodec(abc.ABC):
    """Base of every ``quant`` codec config (the registered dataclasses subclass it)."""

    #: whether :meth:`encode` ranks tokens by saliency (ZipCache); the store then needs saliency at flushes
    needs_saliency: ClassVar[bool] = False
    registry_name: ClassVar[str]  # set by ``@register("quant", name)``
    scale_dtype: str

    def _check_scale_dtype(self) -> None:
        if self.scale_dtype not in SCALE_DTYPES:
            raise PolicyConfigError(
                f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {self.scale_dtype!r}"
            )

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    @property
    @abc.abstractmethod
    def tier_bits(self) -> tuple[int, ...]:
        """Bit width of each storage tier (empty: nothing is ever quantised). At most two tiers; with two,
        tier 0 is the low-bit (regular) one and tier 1 the high-bit (salient) one."""

    @property
    def tier_key_bits(self) -> tuple[int, ...]:
        """Bit width of each tier's keys (default: the tier's own, :attr:`tier_bits`)."""
        return self.tier_bits

    def fp_buffer_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """dtype the store holds its full-precision buffer in, for a model whose K/V come in ``dtype``
        (default: ``dtype`` itself)."""
        return dtype

    @abc.abstractmethod
    def value_group(self, head_dim: int) -> int:
        """Channels that share one value scale/zero pair."""

    def check_head_dim(self, head_dim: int) -> None:
        """Raise :class:`PolicyConfigError` if this codec cannot store heads of ``head_dim`` channels."""
        if head_dim <= 0:
            raise PolicyConfigError(f"head_dim must be positive, got {head_dim}")
        for bits in sorted(set(self.tier_bits) | set(self.tier_key_bits)):
            if (head_dim * bits) % 8:
                raise PolicyConfigError(
                    f"{self.registry_name}: {bits}-bit codes of a {head_dim}-channel head do not fill whole bytes; "
                    f"head_dim must be a multiple of {8 // bits}"
                )

    @abc.abstractmethod
    def flush_rows(self, least: int, most: int) -> int:
        """How many of the oldest buffered full-precision tokens to quantise now, per head, decided on the
        host from bounds the store keeps without reading the device: every head buffers between ``least``
        and ``most`` tokens (equal when the store knows the count exactly). Each head quantises
        ``min(returned, its buffered tokens)``; 0 quantises nothing."""

    @abc.abstractmethod
    def encode(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor,
        saliency: torch.Tensor | None,
    ) -> tuple[list[TierRows | None], torch.Tensor | None]:
        """Quantise ``keys``/``values`` ``[B, H, m, D]`` (rows with ``valid`` False are padding).

        Returns one :class:`TierRows` (or None when it gets no token) per tier, and, with two tiers, the
        tier of each input row ``[B, H, m]`` (True = high-bit tier); None with one tier.
        """

    @abc.abstractmethod
    def bytes_formula(self, num_tokens: int, head_dim: int, batch: int, kv_heads: int, dtype: torch.dtype) -> int:
        """Bytes a store holds after one :meth:`KVStore.append` of ``num_tokens`` tokens (no eviction)."""


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def fp_bytes(num_fp: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes per (batch, head) of ``num_fp`` full-precision tokens (K and V) plus the per-head counter."""
    return 2 * num_fp * head_dim * element_bytes(dtype) + 4
