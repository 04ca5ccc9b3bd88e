"""ZipCache: mixed-precision KV quantisation with salient-token identification
(Zhang et al., arXiv 2405.14256, NeurIPS 2024).

* Saliency: normalised attention (see :mod:`kvcache.quant.saliency`), from probe queries at prefill
  and from the current query at each streaming flush.
* Per KV head, the ``floor(r * n)`` least salient of the ``n`` tokens being quantised are *regular*,
  the rest *salient*. Salient tokens: keys and values at ``high_bits`` (4). Regular tokens: values at
  ``low_bits`` (2), keys at ``low_key_bits`` (4 here; the paper stores them at ``low_bits`` too).
* Keys: channel-wise asymmetric quantisation, salient and regular sets quantised separately (one
  scale/zero per channel per set and flush).
* Values: channel-separable token-wise quantisation (CSTQuant): ``c_i = sqrt(max_t |V_{t,i}|)``,
  ``V / c`` quantised token-wise over all channels, times ``c`` on dequantisation.
* Streaming: tokens wait in a full-precision buffer, which is quantised whenever it holds
  ``streaming_gap`` (default 100) tokens -- a prompt of at least that many at once, then every
  ``streaming_gap`` decode steps, with the saliency the caller passes at that step. The buffer is held in
  16 bits as in the paper (``buffer_dtype="auto"``: the model's dtype if it is 16-bit, else float16), so
  an fp32 model's cache holds the bytes a 16-bit model's would. The gap is checked on the host against the
  buffer's rows (exact; after decode-time eviction an upper bound: tokens appended since the last flush),
  so deciding to flush never reads the device.

Defaults (r = 0.95, regular keys at 4 bits) chosen by sweep on SmolLM2-135M (head_dim 64; kvlong pass
key, multi-key and QA at 1K, no eviction, greedy; bytes per stored token over all layers, scales and
buffer included, against 23,040 for a 16-bit cache). Narrowing, 8 samples a task with the answer
teacher-forced, as a share of the full cache: the paper's setting (r = 0.4, regular keys and values at
2 bits) keeps 30%; 2-bit values with 4-bit keys 95%; 2-bit keys with full-precision values 45%; 2-bit
keys in groups of 32 tokens 90%, of 128 65%; saliency from every prompt query instead of the probes
70%; r = 0.2 75%. Regular tokens' 2-bit keys lose the needle: their rounding noise on the logits of
hundreds of tokens outweighs the needle's attention. With 4-bit keys for every token, 4.5x leaves room
for 4-bit values on about 5% of tokens. ``kvcache sweep``, 16 samples a task (full cache 0.854): r = 0.95
keeps 0.812 (95%) at 5,074 bytes/token (4.54x fewer than 16-bit); r = 0.9 0.771 (90%) at 5,136 (4.49x);
r = 1.0 0.771 (90%) at 4,973 (4.63x); the paper's setting 0.438 (51%) at 5,291 (4.35x). Between r = 0.95
and its neighbours the difference is 2 of 48 answers, within noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcache.quant.base import QuantCodec, element_bytes, fp_bytes
from kvcache.quant.tiers import TierRows
from kvcache.quant.quantizer import QUANT_BITS, SCALE_DTYPES, cst_quantize, quantize_groups
from kvcache.quant.store import compaction, gather_rows, rows_below
from kvcache.registry import PolicyConfigError, check_choice, check_float, check_int, param, register


@register("quant", "zipcache")
@dataclass
class ZipCache(QuantCodec):
    """ZipCache: the least-salient fraction r of each head's tokens with low-bit values, the rest at high bits;
    CSTQuant values, channel-wise keys, a 16-bit streaming buffer."""

    needs_saliency = True

    high_bits: int = param(4, "bit width of salient tokens' keys and values (2, 4 or 8)")
    low_bits: int = param(2, "bit width of regular (least salient) tokens' values (2, 4 or 8; <= high_bits)")
    low_key_bits: int = param(4, "bit width of regular tokens' keys (2, 4 or 8; the paper: low_bits)")
    ratio: float = param(0.95, "r: fraction of each head's tokens that are regular (the least salient)")
    streaming_gap: int = param(100, "tokens buffered in full precision before they are quantised")
    scale_dtype: str = param("float16", "dtype of scales, zero points and channel normalisers")
    buffer_dtype: str = param(
        "auto", "dtype of the full-precision buffer: auto (the model's if 16-bit, else float16), float16, bfloat16, float32"
    )

    def __post_init__(self) -> None:
        for what in ("high_bits", "low_bits", "low_key_bits"):
            check_choice(f"zipcache: {what}", getattr(self, what), QUANT_BITS)
        if self.low_bits > self.high_bits:
            raise PolicyConfigError(f"zipcache: low_bits ({self.low_bits}) must not exceed high_bits ({self.high_bits})")
        check_float("zipcache: ratio", self.ratio, 0.0, 1.0)
        check_int("zipcache: streaming_gap", self.streaming_gap, 1)
        self._check_scale_dtype()
        check_choice("zipcache: buffer_dtype", self.buffer_dtype, ("auto", *SCALE_DTYPES))

    @property
    def tier_bits(self) -> tuple[int, ...]:
        return (self.low_bits, self.high_bits)

    @property
    def tier_key_bits(self) -> tuple[int, ...]:
        return (self.low_key_bits, self.high_bits)

    def fp_buffer_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.buffer_dtype == "auto":
            return dtype if element_bytes(dtype) == 2 else torch.float16
        return SCALE_DTYPES[self.buffer_dtype]

    def value_group(self, head_dim: int) -> int:
        return head_dim

    def flush_rows(self, least: int, most: int) -> int:
        # the whole buffer once the longest head's (an upper bound after decode-time eviction) reaches the gap
        return most if most >= self.streaming_gap else 0

    def low_count(self, tokens: torch.Tensor) -> torch.Tensor:
        """Regular (low-bit) tokens among ``tokens`` quantised together: ``floor(r * n)``."""
        return torch.floor(tokens.double() * self.ratio).to(tokens.dtype)

    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, saliency: torch.Tensor | None
    ) -> tuple[list[TierRows | None], torch.Tensor | None]:
        assert saliency is not None
        n_low = self.low_count(valid.sum(-1))
        order = saliency.masked_fill(~valid, float("inf")).argsort(dim=-1, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        low = valid & (rank < n_low[..., None])
        high = valid & ~low
        tiers = [
            self._encode_set(keys, values, members, key_bits, bits, is_high)
            for members, key_bits, bits, is_high in (
                (low, self.low_key_bits, self.low_bits, False), (high, self.high_bits, self.high_bits, True)
            )
        ]
        return tiers, high

    def _encode_set(
        self, keys: torch.Tensor, values: torch.Tensor, members: torch.Tensor, key_bits: int, bits: int, high: bool
    ) -> TierRows | None:
        """One set's rows; its row count is the host bound of the longest head's members (``m`` rows being
        quantised: ``floor(r * m)`` regular, the rest salient; ``floor(r * n)`` is monotone in ``n`` and so is
        ``n - floor(r * n)``, so a head with fewer real rows never holds more)."""
        n = members.shape[-1] - math.floor(members.shape[-1] * self.ratio) if high else math.floor(members.shape[-1] * self.ratio)
        order, count = compaction(members, n)
        if n == 0:
            return None
        valid = rows_below(count, n)[..., None]
        sd = self.torch_scale_dtype
        k_codes, k_scale, k_zero = quantize_groups(gather_rows(keys, order), key_bits, 2, n, sd, valid)
        v_codes, v_scale, v_zero, chan = cst_quantize(gather_rows(values, order), bits, sd, valid)
        return TierRows(k_codes, v_codes, v_scale, v_zero, k_scale, k_zero, chan, count[..., None])

    def bytes_formula(self, num_tokens: int, head_dim: int, batch: int, kv_heads: int, dtype: torch.dtype) -> int:
        if num_tokens < self.streaming_gap:
            return batch * kv_heads * fp_bytes(num_tokens, head_dim, self.fp_buffer_dtype(dtype))
        sb = element_bytes(self.torch_scale_dtype)
        n_low = math.floor(num_tokens * self.ratio)
        per_head = fp_bytes(0, head_dim, dtype) + math.ceil(num_tokens / 8)  # counter + one tier bit per token
        sets = ((n_low, self.low_key_bits, self.low_bits), (num_tokens - n_low, self.high_bits, self.high_bits))
        for n, key_bits, bits in sets:
            if n:
                per_head += (
                    n * head_dim * (key_bits + bits) // 8  # K and V codes
                    + 2 * n * sb  # value scale + zero per token
                    + 3 * head_dim * sb  # key scale + zero per channel, CSTQuant channel normaliser
                    + 4  # rows in the set (int32)
                )
        return batch * kv_heads * per_head
