"""The per-layer quantised KV store shared by every codec.

Slots
    A store holds ``num_tokens`` slots per ``(batch, KV head)``, like the rest of the library: slot order
    is insertion order, and after :meth:`KVStore.keep` different heads may hold different tokens. The
    first slots of a head are quantised, the last ones sit in a full-precision buffer (KIVI's residual
    window, ZipCache's streaming buffer). How many are quantised may differ per head after eviction.

Layout (bytes actually held, reported by :meth:`KVStore.nbytes`)
    * one *tier* per bit width (of the values; a codec may give a tier's keys another width,
      ``codec.tier_key_bits``): K and V codes packed into uint8 along the head dimension; value
      scale/zero per token (and channel group); key scale/zero per group of rows, with
      ``group_count[b, h, p]`` rows per group; CSTQuant channel normalisers per group (ZipCache);
    * with two tiers, one bit per quantised slot says which tier holds it (packed 8 per byte);
    * the full-precision buffer ``[B, H, F, D]`` (in ``codec.fp_buffer_dtype(dtype)``; :attr:`KVStore.fp_k`
      hands it back in ``dtype``) and its per-head length.
    Rows are compacted to the front of each head; heads holding fewer rows than the longest are padded
    (the padding is held, so it is counted).

Host bounds (no device reads while decoding)
    Every size is decided on the host: the rows each tier and the buffer hold are bounds on any head's
    real rows (``Tier.rows``, ``KVStore.fp_rows``), with lower bounds beside them (``Tier.least``,
    ``KVStore.fp_least``); both are equal, and the layout has no padding, until decode-time eviction
    (:meth:`KVStore.remove`) takes a victim from a region some heads and not others. The codec's flush
    rule reads these bounds (:meth:`kvcache.quant.base.QuantCodec.flush_rows`), per-head counts stay on the
    device for masks, and index checks are device-side assertions. Only :meth:`KVStore.keep` (eviction
    at a prompt pass) reads the kept counts back, to hold exactly the longest head's rows again.

Eviction composes without re-quantisation: :meth:`KVStore.keep` gathers the kept rows' codes and
parameters, so every kept token dequantises bit-for-bit as before, and drops parameter groups no head
uses any more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch

from kvcache.attention.quantized import Block, PackedLayout, PackedTier
from kvcache.quant.pack import pack, unpack
from kvcache.quant.quantizer import check_on_device, decode, dequantize_groups
from kvcache.quant.tiers import TierRows

if TYPE_CHECKING:
    from kvcache.quant.base import QuantCodec


def compaction(keep: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row order ``[B, H, rows]`` that moves the kept rows of ``keep`` ``[B, H, N]`` to the front (stable),
    and the kept count per head. ``rows`` is the host's bound on the longest head's kept rows (rows past a
    head's count are padding); None reads the longest head's count from the device (a synchronisation)."""
    counts = keep.sum(-1)
    if rows is None:
        rows = int(counts.max()) if counts.numel() else 0
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :rows]
    return order, counts.to(torch.int32)


def gather_rows(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[b, h, order[b, h, i], ...]`` for a tensor ``[B, H, N, ...]``."""
    index = order.reshape(*order.shape, *([1] * (x.dim() - 3))).expand(*order.shape, *x.shape[3:])
    return x.gather(2, index)


def append_rows(
    old: torch.Tensor | None, old_count: torch.Tensor, new: torch.Tensor, new_count: torch.Tensor, exact: bool = False
) -> torch.Tensor:
    """Put the first ``new_count`` rows of ``new`` right after the first ``old_count`` rows of ``old`` per head.

    ``exact``: the host knows every head holds all ``old.shape[2]`` old and ``new.shape[2]`` new rows (a
    concatenation). Otherwise the result keeps ``old.shape[2] + new.shape[2]`` rows, padding last."""
    if old is None or old.shape[2] == 0:
        return new
    n_old, n_new = old.shape[2], new.shape[2]
    both = torch.cat([old, new], 2)
    if exact:
        return both
    rows = torch.arange(n_old + n_new, device=old.device)
    keep = (rows < old_count[..., None]) | ((rows >= n_old) & (rows < n_old + new_count[..., None]))
    return gather_rows(both, compaction(keep, n_old + n_new)[0])


def rows_below(count: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, H, n]`` bool: row < count[b, h]."""
    return torch.arange(n, device=count.device) < count[..., None]


class Tier:
    """All tokens a store holds at one bit width (see the module docstring for the layout).

    Host-side bounds (never read from the device): :attr:`rows` (held rows, >= every head's real rows),
    :attr:`least` (<= every head's real rows; equal to ``rows`` when every head holds exactly ``rows``)
    and :attr:`group_rows` (``g`` when every group of every head holds exactly ``g`` rows, else 0)."""

    ROW_FIELDS = ("k_codes", "v_codes", "v_scale", "v_zero")
    GROUP_FIELDS = ("k_scale", "k_zero", "v_chan", "group_count")

    def __init__(self, bits: int, value_group: int, key_bits: int | None = None) -> None:
        self.bits = bits  # values' bit width (and the keys', unless key_bits says otherwise)
        self.key_bits = bits if key_bits is None else key_bits
        self.value_group = value_group
        self.k_codes: torch.Tensor | None = None  # [B, H, N, D * key_bits / 8] uint8
        self.v_codes: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None  # [B, H, N, D / value_group]
        self.v_zero: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None  # [B, H, P, D]
        self.k_zero: torch.Tensor | None = None
        self.v_chan: torch.Tensor | None = None  # [B, H, P, D] or None
        self.group_count: torch.Tensor | None = None  # [B, H, P] int32
        self.least = 0
        self.group_rows = 0

    @property
    def rows(self) -> int:
        return 0 if self.k_codes is None else self.k_codes.shape[2]

    @property
    def exact(self) -> bool:
        """Every head holds exactly :attr:`rows` real rows (known on the host)."""
        return self.least == self.rows

    def count(self, batch: int, heads: int, device: torch.device) -> torch.Tensor:
        """Real rows per head ``[B, H]``."""
        if self.group_count is None:
            return torch.zeros(batch, heads, dtype=torch.int32, device=device)
        return self.group_count.sum(-1, dtype=torch.int32)

    def tensors(self) -> list[torch.Tensor]:
        fields = self.ROW_FIELDS + self.GROUP_FIELDS
        return [t for t in (getattr(self, f) for f in fields) if t is not None]

    def clear(self) -> None:
        for field in self.ROW_FIELDS + self.GROUP_FIELDS:
            setattr(self, field, None)
        self.least = self.group_rows = 0

    def append(self, new: TierRows, new_exact: bool) -> None:
        """Add freshly quantised rows; ``new_exact``: every head got all of ``new``'s rows (then every group
        of them holds the same number of rows, as :class:`TierRows` promises)."""
        n_new, p_new = new.k_codes.shape[2], new.group_count.shape[2]
        exact = self.exact and new_exact
        old_count = self.count(*new.group_count.shape[:2], new.group_count.device)
        new_count = new.group_count.sum(-1, dtype=torch.int32)
        packed = {"k_codes": pack(new.k_codes, self.key_bits), "v_codes": pack(new.v_codes, self.bits)}
        was_empty = self.group_count is None
        for field in self.ROW_FIELDS:
            value = packed.get(field, getattr(new, field))
            setattr(self, field, append_rows(getattr(self, field), old_count, value, new_count, exact))
        for field in self.GROUP_FIELDS:
            old, value = getattr(self, field), getattr(new, field)
            setattr(self, field, value if old is None or value is None else torch.cat([old, value], 2))
        g_new = n_new // p_new if new_exact and p_new and n_new % p_new == 0 else 0
        self.group_rows = g_new if (was_empty or (exact and self.group_rows == g_new)) else 0
        self.least = self.least + n_new if new_exact else self.least

    def truncate(self, rows: int) -> None:
        """Hold at most ``rows`` rows (the caller knows no head has more real ones)."""
        if self.rows > rows:
            for field in self.ROW_FIELDS:
                setattr(self, field, getattr(self, field)[:, :, :rows])
            self.least = min(self.least, rows)

    def pids(self) -> torch.Tensor:
        """Parameter group of each row ``[B, H, N]`` (padding rows get the last group)."""
        assert self.group_count is not None and self.k_codes is not None
        if self.group_rows:
            rows = torch.arange(self.rows, device=self.group_count.device) // self.group_rows
            return rows.expand(*self.group_count.shape[:2], self.rows)
        ends = self.group_count.cumsum(-1)
        rows = torch.arange(self.rows, device=ends.device).expand(*ends.shape[:2], self.rows).contiguous()
        pid = torch.searchsorted(ends, rows, right=True)
        return pid.clamp_(max=self.group_count.shape[-1] - 1)

    def compact(self, keep: torch.Tensor, rows: int | None, least: int) -> None:
        """Keep the rows where ``keep`` ``[B, H, N]`` is True.

        ``rows`` is the host's bound on any head's kept rows (``least`` a lower one); None reads the kept
        counts from the device instead, holds exactly the longest head's rows and drops parameter groups
        no head uses any more (eviction at a prompt pass; decode-time removal passes bounds: no read)."""
        assert self.group_count is not None
        pid = self.pids()
        kept_per_group = torch.zeros_like(self.group_count).scatter_add_(2, pid, keep.to(torch.int32))
        if rows is None:
            used = kept_per_group.sum((0, 1)) > 0
            counts = kept_per_group.sum(-1)
            rows, least = int(counts.max()), int(counts.min())  # host reads: only when asked to tighten
            if rows == 0:
                self.clear()
                return
            for field in ("k_scale", "k_zero", "v_chan"):
                value = getattr(self, field)
                if value is not None:
                    setattr(self, field, value[:, :, used])
            kept_per_group = kept_per_group[:, :, used]
            self.group_rows = 0
        else:
            self.group_rows = 0
        order, _ = compaction(keep, rows)
        for field in self.ROW_FIELDS:
            setattr(self, field, gather_rows(getattr(self, field), order))
        self.group_count = kept_per_group
        self.least = least

    def dequantize_rows(
        self, pid: torch.Tensor, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(K, V)`` ``[B, H, stop - start, D]`` of rows ``start:stop``; ``pid`` from :meth:`pids`."""
        assert self.k_codes is not None and self.v_codes is not None
        assert self.k_scale is not None and self.k_zero is not None
        assert self.v_scale is not None and self.v_zero is not None

        def params(table: torch.Tensor) -> torch.Tensor:
            if table.shape[2] == 1:
                return table.float()
            index = pid[:, :, start:stop, None].expand(-1, -1, -1, table.shape[-1])
            return table.gather(2, index).float()

        k = decode(unpack(self.k_codes[:, :, start:stop], self.key_bits, torch.float32), params(self.k_scale), params(self.k_zero))
        v = dequantize_groups(
            unpack(self.v_codes[:, :, start:stop], self.bits, torch.float32),
            self.v_scale[:, :, start:stop],
            self.v_zero[:, :, start:stop],
            -1,
            self.value_group,
        )
        if self.v_chan is not None:
            v = v * params(self.v_chan)
        return k, v


class KVStore:
    """One layer's KV cache under a codec: ``KVStore(codec, head_dim, dtype, device)``.

    The API the engine adapters use:

    * :meth:`append` -- add this pass's tokens (they enter the full-precision buffer; the codec's rule
      then quantises the oldest buffered tokens);
    * :meth:`will_flush` -- whether the next :meth:`append` quantises (so needs saliency, for ZipCache);
      :meth:`flush` -- quantise what is due, after ``append(..., flush=False)``;
    * :meth:`keep` -- eviction: keep exactly the given slots per head (:meth:`remove`: drop some);
    * :meth:`blocks` -- dequantised blocks for attention (``kvcache.attention.quantized.attend_packed`` and
      ``packed_probabilities``, the attention statistics eviction and ZipCache saliency share);
    * :meth:`dequantize` -- the whole cache in full precision (tests and debugging only);
    * :meth:`bit_widths`, :meth:`quantized_count`, :attr:`num_tokens`, :meth:`nbytes`.

    Per-slot metadata an adapter keeps (logical positions, eviction scores) follows the store with the
    same two operations: ``keep`` -> ``meta.gather(-1, indices.sort(-1).values)``; ``append`` -> concatenate.
    """

    def __init__(
        self, codec: QuantCodec, head_dim: int, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu"
    ) -> None:
        codec.check_head_dim(head_dim)
        device = torch.device(device)
        self.codec = codec
        self.head_dim = head_dim
        self.dtype = dtype  # what the store hands back (the model's dtype)
        self.buffer_dtype = codec.fp_buffer_dtype(dtype)  # what the full-precision buffer is held in
        self.device = device
        self.tiers = [
            Tier(bits, codec.value_group(head_dim), key_bits) for bits, key_bits in zip(codec.tier_bits, codec.tier_key_bits)
        ]
        self.num_tokens = 0
        self.batch = 0
        self.kv_heads = 0
        self._fp_k: torch.Tensor | None = None  # [B, H, F, D] in ``buffer_dtype``
        self._fp_v: torch.Tensor | None = None
        self.fp_count: torch.Tensor | None = None  # [B, H] int32
        self.fp_least = 0  # host bound: every head buffers at least this many (F, the rows held, is the most)
        self._flags: torch.Tensor | None = None  # [B, H, ceil(Q / 8)] packed: True = high-bit tier
        self._flag_rows = 0

    # ----------------------------------------------------------------------------------------- state
    @property
    def fp_k(self) -> torch.Tensor | None:
        """Keys of the full-precision buffer ``[B, H, F, D]`` in the store's ``dtype`` (a cast copy when the
        codec holds the buffer in another ``buffer_dtype``)."""
        return None if self._fp_k is None else self._fp_k.to(self.dtype)

    @property
    def fp_v(self) -> torch.Tensor | None:
        """Values of the full-precision buffer, as :attr:`fp_k`."""
        return None if self._fp_v is None else self._fp_v.to(self.dtype)

    @property
    def fp_rows(self) -> int:
        """Rows the full-precision buffer holds: the host's bound on any head's buffered tokens."""
        return 0 if self._fp_k is None else self._fp_k.shape[2]

    @property
    def exact(self) -> bool:
        """The host knows every head's counts: each tier and the buffer hold the same real rows in every head."""
        return self.fp_least == self.fp_rows and all(tier.exact for tier in self.tiers)

    def _zeros_count(self) -> torch.Tensor:
        return torch.zeros(self.batch, self.kv_heads, dtype=torch.int32, device=self.device)

    def quantized_count(self) -> torch.Tensor:
        """Quantised slots per head ``[B, H]`` (the first slots of each head)."""
        total = self._zeros_count()
        for tier in self.tiers:
            total = total + tier.count(self.batch, self.kv_heads, self.device)
        return total

    def _get_flags(self) -> torch.Tensor:
        if self._flags is None:
            return torch.zeros(self.batch, self.kv_heads, 0, dtype=torch.bool, device=self.device)
        return unpack(self._flags, 1)[..., : self._flag_rows].bool()

    def _set_flags(self, flags: torch.Tensor) -> None:
        self._flag_rows = flags.shape[-1]
        padded = torch.nn.functional.pad(flags.to(torch.uint8), (0, (-flags.shape[-1]) % 8))
        self._flags = pack(padded, 1)

    def nbytes(self) -> int:
        """Bytes the store holds now: packed codes, scales/zeros, group counts, tier bits, fp buffer."""
        held = [self._fp_k, self._fp_v, self.fp_count, self._flags]
        held += [t for tier in self.tiers for t in tier.tensors()]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    # ---------------------------------------------------------------------------------------- append
    def _flush_rows(self, num_new: int = 0) -> int:
        """The codec's flush size with ``num_new`` more tokens, from the host's bounds (no device read)."""
        if not self.tiers:
            return 0
        return self.codec.flush_rows(self.fp_least + num_new, self.fp_rows + num_new)

    def will_flush(self, num_new: int) -> bool:
        """True when appending ``num_new`` more tokens will quantise buffered ones (decided on the host)."""
        return self._flush_rows(num_new) > 0

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, saliency: torch.Tensor | None = None, flush: bool = True
    ) -> None:
        """Add ``keys``/``values`` ``[B, H_kv, t, D]`` as the newest ``t`` slots of every head.

        ``saliency`` ``[B, H_kv, num_tokens + t]`` scores every slot the store holds after this append
        (the same slot order as eviction scores; see :mod:`kvcache.quant.saliency`). Codecs that rank
        tokens (ZipCache) need it whenever :meth:`will_flush` is True and ignore it otherwise.
        ``flush=False`` only buffers the tokens; call :meth:`flush` later (e.g. after attending with the
        current query, whose attention is ZipCache's saliency for the buffered tokens).
        """
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(f"keys and values must both be [B, H_kv, t, D], got {tuple(keys.shape)} and {tuple(values.shape)}")
        b, h, t, d = keys.shape
        if d != self.head_dim:
            raise ValueError(f"store was made for head_dim {self.head_dim}, got {d}")
        if self.fp_count is None:
            self.batch, self.kv_heads = b, h
            self.fp_count = self._zeros_count()
        elif (b, h) != (self.batch, self.kv_heads):
            raise ValueError(f"store holds [B={self.batch}, H_kv={self.kv_heads}], got [B={b}, H_kv={h}]")
        if saliency is not None and tuple(saliency.shape) != (b, h, self.num_tokens + t):
            raise ValueError(
                f"saliency must be [B, H_kv, num_tokens + t] = {[b, h, self.num_tokens + t]}, got {list(saliency.shape)}"
            )
        keys = keys.to(device=self.device, dtype=self.buffer_dtype)
        values = values.to(device=self.device, dtype=self.buffer_dtype)
        if self._fp_k is None or self._fp_v is None or self.fp_least == self.fp_rows:  # no padding: concatenate
            self._fp_k = keys if self._fp_k is None else torch.cat([self._fp_k, keys], 2)
            self._fp_v = values if self._fp_v is None else torch.cat([self._fp_v, values], 2)
        else:
            new_count = torch.full_like(self.fp_count, t)
            self._fp_k = append_rows(self._fp_k, self.fp_count, keys, new_count)
            self._fp_v = append_rows(self._fp_v, self.fp_count, values, new_count)
        self.fp_count = self.fp_count + t
        self.fp_least += t
        self.num_tokens += t
        if flush:
            self.flush(saliency)

    def flush(self, saliency: torch.Tensor | None = None) -> None:
        """Quantise what the codec's rule says is due now (nothing if :meth:`will_flush` ``(0)`` is False).

        ``saliency`` ``[B, H_kv, num_tokens]`` as for :meth:`append`. Sizes come from the host's bounds:
        nothing is read from the device.
        """
        if not self.tiers or self.fp_count is None:
            return
        if saliency is not None and tuple(saliency.shape) != (self.batch, self.kv_heads, self.num_tokens):
            raise ValueError(
                f"saliency must be [B, H_kv, num_tokens] = {[self.batch, self.kv_heads, self.num_tokens]}, got {list(saliency.shape)}"
            )
        assert self._fp_k is not None and self._fp_v is not None
        n = min(self._flush_rows(), self.fp_rows)
        if n == 0:
            return
        exact = n <= self.fp_least  # every head quantises exactly n tokens
        m = self.fp_count.clamp(max=n)  # per head
        q_count = self.quantized_count()
        fp_sal = None
        if self.codec.needs_saliency:
            if saliency is None:
                raise ValueError(
                    f"{self.codec.registry_name} quantises buffered tokens now and needs their saliency: "
                    "pass saliency [B, H_kv, num_tokens] to append (check store.will_flush(t) first)"
                )
            slots = q_count[..., None].long() + torch.arange(n, device=self.device)
            fp_sal = saliency.to(self.device).float().gather(2, slots.clamp(max=saliency.shape[-1] - 1))
        valid = rows_below(m, n)
        tier_rows, high = self.codec.encode(self._fp_k[:, :, :n], self._fp_v[:, :, :n], valid, fp_sal)
        if len(self.tiers) > 1:
            assert high is not None
            flags_exact = exact and all(tier.exact for tier in self.tiers)
            self._set_flags(append_rows(self._get_flags(), q_count, high, m, flags_exact))
        for tier, rows in zip(self.tiers, tier_rows):
            if rows is not None:
                tier.append(rows, exact)
                tier.truncate(self.num_tokens)  # no head holds more rows than slots (bounds after eviction)
        if self._flag_rows > self.num_tokens:
            self._set_flags(self._get_flags()[..., : self.num_tokens])
        if exact:  # every head moves its n oldest buffered tokens: drop the first n rows
            self._fp_k, self._fp_v = self._fp_k[:, :, n:].contiguous(), self._fp_v[:, :, n:].contiguous()
        else:
            fp_rows = torch.arange(self._fp_k.shape[2], device=self.device)
            remaining = (fp_rows >= m[..., None]) & (fp_rows < self.fp_count[..., None])
            order, _ = compaction(remaining, self.fp_rows - n)
            self._fp_k, self._fp_v = gather_rows(self._fp_k, order), gather_rows(self._fp_v, order)
        self.fp_count = self.fp_count - m
        self.fp_least = max(0, self.fp_least - n)

    # ------------------------------------------------------------------------------------ slot maps
    def _tier_maps(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]]:
        """Per tier: the slot of every row ``[B, H, N]`` (``num_tokens`` on padding rows), whether the row
        is real, its parameter group (:meth:`Tier.pids`) and :attr:`Tier.group_rows`. Recomputed per call
        from the tier bits (a cache would hold several bytes per token); no host read."""
        q_count = self.quantized_count()
        maps = []
        t = self.num_tokens
        if len(self.tiers) == 1:
            tier = self.tiers[0]
            rows = torch.arange(tier.rows, device=self.device).expand(self.batch, self.kv_heads, tier.rows)
            real = rows_below(q_count, tier.rows)
            maps.append((rows.masked_fill(~real, t), real))
        elif len(self.tiers) == 2:
            flags = self._get_flags()
            q_rows = flags.shape[-1]
            in_q = rows_below(q_count, q_rows)
            slot_ids = torch.arange(q_rows, device=self.device).expand(self.batch, self.kv_heads, q_rows)
            for tier, member in zip(self.tiers, (~flags, flags)):
                member = member & in_q
                rank = member.cumsum(-1) - 1  # row of each member slot within its tier
                target = torch.where(member, rank, tier.rows)  # non-members go to a spill column
                slots = torch.full((self.batch, self.kv_heads, tier.rows + 1), t, dtype=torch.long, device=self.device)
                slots = slots.scatter_(2, target, slot_ids)[..., : tier.rows]
                maps.append((slots, rows_below(tier.count(self.batch, self.kv_heads, self.device), tier.rows)))
        return [
            (slots, real, tier.pids() if tier.rows else None, tier.group_rows)
            for tier, (slots, real) in zip(self.tiers, maps)
        ]

    def _regions(
        self, maps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each tier and then the fp buffer: the slot of every row ``[B, H, N]`` (``num_tokens`` on
        padding rows) and whether the row is real."""
        regions = [(slots, real) for slots, real, _, _ in (self._tier_maps() if maps is None else maps)]
        assert self.fp_count is not None and self._fp_k is not None
        fp_n = self._fp_k.shape[2]
        q_count = self.num_tokens - self.fp_count
        real = rows_below(self.fp_count, fp_n)
        slots = q_count[..., None].long() + torch.arange(fp_n, device=self.device)
        regions.append((slots.masked_fill(~real, self.num_tokens), real))
        return regions

    # ----------------------------------------------------------------------------------------- keep
    def keep(self, indices: torch.Tensor) -> None:
        """Keep exactly the slots ``indices`` ``[B, H_kv, C]`` of each head (any order, no repeats).

        Kept slots stay in their relative order and become slots ``0..C-1``. Nothing is re-quantised:
        kept tokens keep their codes, parameters and tier, and the full-precision buffer keeps its kept
        tokens in full precision. Memory shrinks to the longest head's kept rows per tier (a few host
        reads; eviction at a prompt pass). Index checks run on the device (no synchronisation).
        """
        self._keep(indices, tighten=True)

    def _keep(self, indices: torch.Tensor, tighten: bool) -> None:
        if self.fp_count is None:
            raise ValueError("keep() on an empty store")
        if indices.dim() != 3 or tuple(indices.shape[:2]) != (self.batch, self.kv_heads):
            raise ValueError(f"indices must be [B={self.batch}, H_kv={self.kv_heads}, C], got {list(indices.shape)}")
        indices = indices.to(self.device).long()
        c, t = indices.shape[-1], self.num_tokens
        if c:
            check_on_device(
                ((indices >= 0) & (indices < t)).all(), f"keep indices must lie in [0, {t}); got an index outside"
            )
        slot_keep = torch.zeros(self.batch, self.kv_heads, t + 1, dtype=torch.bool, device=self.device)
        slot_keep.scatter_(2, indices.clamp(0, t), True)
        check_on_device((slot_keep[..., :t].sum(-1) == c).all(), "keep indices repeat a slot within a head")
        slot_keep[..., t].zero_()  # padding rows' slot
        if all(tier.rows == 0 for tier in self.tiers):
            # everything is buffered, in slot order: the kept slots are the kept rows (exact, no read)
            order = indices.sort(-1).values
            self._fp_k, self._fp_v = gather_rows(self._fp_k, order), gather_rows(self._fp_v, order)
            self.fp_count = torch.full_like(self.fp_count, c)
            self.fp_least = c
            self.num_tokens = c
            return
        regions = self._regions()
        dropped = t - c  # each head loses exactly this many slots, from any region
        if len(self.tiers) > 1:
            flags = self._get_flags()
            q_keep = slot_keep[..., : flags.shape[-1]] & rows_below(self.quantized_count(), flags.shape[-1])
            self._set_flags(gather_rows(flags, compaction(q_keep, None if tighten else min(flags.shape[-1], c))[0]))
        for tier, (slots, real) in zip(self.tiers, regions):
            if tier.rows:
                tier_keep = slot_keep.gather(2, slots) & real
                if tighten:
                    tier.compact(tier_keep, None, 0)
                else:
                    tier.compact(tier_keep, min(tier.rows, c), max(0, tier.least - dropped))
        slots, real = regions[-1]
        fp_keep = slot_keep.gather(2, slots) & real
        fp_rows = None if tighten else min(self.fp_rows, c)
        order, self.fp_count = compaction(fp_keep, fp_rows)
        assert self._fp_k is not None and self._fp_v is not None
        self._fp_k, self._fp_v = gather_rows(self._fp_k, order), gather_rows(self._fp_v, order)
        self.fp_least = int(self.fp_count.min()) if tighten else max(0, self.fp_least - dropped)
        self.num_tokens = c

    def remove(self, slots: torch.Tensor) -> None:
        """Drop the slots ``[B, H_kv, k]`` of each head (decode-time eviction of ``k`` victims per head):
        ``keep`` of the complement, so the other slots keep their relative order. Decided on the host from
        the store's bounds (no device read): a region may keep a padding row where a head lost a token."""
        if slots.dim() == 2:
            slots = slots[..., None]
        if self.fp_count is None:
            raise ValueError("remove() on an empty store")
        drop = torch.zeros(self.batch, self.kv_heads, self.num_tokens, dtype=torch.bool, device=self.device)
        drop.scatter_(2, slots.to(self.device).long(), True)
        remaining = self.num_tokens - slots.shape[-1]
        check_on_device(
            ((~drop).sum(-1) == remaining).all(), "remove() must drop the same number of distinct slots from every head"
        )
        self._keep(compaction(~drop, remaining)[0], tighten=False)

    # ----------------------------------------------------------------------------------- read back
    def _row_blocks(
        self, block_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(slots, real, K, V)`` for blocks of at most ``block_size`` rows: tiers, then the fp buffer."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if self.fp_count is None:
            return
        assert self._fp_k is not None and self._fp_v is not None
        maps = self._tier_maps()
        regions = self._regions(maps)
        for index, (slots, real) in enumerate(regions):
            tier = self.tiers[index] if index < len(self.tiers) else None
            n = slots.shape[-1] if tier is None else tier.rows
            for start in range(0, n, block_size):
                stop = min(start + block_size, n)
                if tier is None:
                    k, v = self._fp_k[:, :, start:stop].float(), self._fp_v[:, :, start:stop].float()
                else:
                    pid = maps[index][2]
                    assert pid is not None
                    k, v = tier.dequantize_rows(pid, start, stop)
                yield slots[:, :, start:stop].clamp(max=self.num_tokens), real[:, :, start:stop], k, v

    def blocks(self, block_size: int = 256, mask: torch.Tensor | None = None) -> Iterator[Block]:
        """Yield fp32 :class:`Block` ``(keys, values, visible, slots)`` of at most ``block_size`` rows, never
        the whole cache.

        ``K``/``V`` are ``[B, H_kv, n, D]``. ``mask`` (slot order, True = may attend) is ``[B, H_kv, T]`` or
        ``[B, H_kv, q, T]``; ``visible`` is it mapped to the block's rows, ``[B, H_kv, n]`` or
        ``[B, H_kv, q, n]``, and False on padding rows. Rows come in storage order (tier by tier, then
        the fp buffer), which is not slot order: ``slots`` maps each row to its slot (``num_tokens`` for
        padding rows).
        """
        if mask is not None:
            if mask.dim() not in (3, 4) or (tuple(mask.shape[:2]), mask.shape[-1]) != (
                (self.batch, self.kv_heads),
                self.num_tokens,
            ):
                raise ValueError(
                    f"mask must be [B, H_kv, T] or [B, H_kv, q, T] with B={self.batch}, H_kv={self.kv_heads}, "
                    f"T={self.num_tokens}; got {list(mask.shape)}"
                )
            mask = torch.nn.functional.pad(mask.to(self.device, torch.bool), (0, 1))  # slot T: padding rows
        for slots, real, k, v in self._row_blocks(block_size):
            visible = real
            if mask is not None and mask.dim() == 4:
                index = slots[:, :, None].expand(-1, -1, mask.shape[2], -1)
                visible = real[:, :, None] & mask.gather(3, index)
            elif mask is not None:
                visible = real & mask.gather(2, slots)
            yield Block(k, v, visible, slots.masked_fill(~real, self.num_tokens))

    def packed_layout(self, with_slots: bool = True) -> PackedLayout:
        """The tiers' codes and parameters and the fp buffer as held, each row with its slot
        (``num_tokens`` on padding rows): what a kernel reading the codes directly needs.
        ``with_slots=False`` leaves the slots out (None) when the host knows there is no padding row
        (:attr:`exact`): attention without a mask then needs no slot map at all."""
        if self.fp_count is None or self._fp_k is None or self._fp_v is None:
            raise ValueError("packed_layout() on an empty store")
        padded = not self.exact
        if not (with_slots or padded):
            tiers = tuple(
                PackedTier(tier.bits, tier.value_group, tier.k_codes, tier.v_codes, tier.k_scale, tier.k_zero,
                           tier.v_scale, tier.v_zero, tier.v_chan, tier.pids() if tier.k_scale.shape[2] > 1 else None, None,
                           tier.key_bits, tier.group_rows)
                for tier in self.tiers
                if tier.rows
            )
            return PackedLayout(tiers, self._fp_k, self._fp_v, None, False)  # type: ignore[arg-type]
        maps = self._tier_maps()
        fp_slots, _ = self._regions(maps)[-1]
        tiers = tuple(
            PackedTier(tier.bits, tier.value_group, tier.k_codes, tier.v_codes, tier.k_scale, tier.k_zero,
                       tier.v_scale, tier.v_zero, tier.v_chan, pid, slots, tier.key_bits, group_rows)
            for tier, (slots, _, pid, group_rows) in zip(self.tiers, maps)
            if tier.rows
        )
        return PackedLayout(tiers, self._fp_k, self._fp_v, fp_slots, padded)  # type: ignore[arg-type]

    def bit_widths(self) -> torch.Tensor:
        """Bits each slot's value is stored at ``[B, H_kv, num_tokens]`` (its tier's ``bits``; full-precision
        slots: the buffer dtype's width)."""
        out = torch.zeros(self.batch, self.kv_heads, self.num_tokens + 1, dtype=torch.int64, device=self.device)
        if self.fp_count is None:
            return out[..., :-1]
        widths = [tier.bits for tier in self.tiers] + [torch.finfo(self.buffer_dtype).bits]
        for bits, (slots, real) in zip(widths, self._regions()):
            out.scatter_(2, slots.clamp(max=self.num_tokens).masked_fill(~real, self.num_tokens), bits)
        return out[..., :-1]

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache ``(K, V)`` ``[B, H_kv, num_tokens, D]`` in slot order and the store's dtype."""
        shape = (self.batch, self.kv_heads, self.num_tokens + 1, self.head_dim)
        k_out = torch.zeros(shape, dtype=torch.float32, device=self.device)
        v_out = torch.zeros(shape, dtype=torch.float32, device=self.device)
        for slots, real, k, v in self._row_blocks(1 << 30):
            index = slots.masked_fill(~real, self.num_tokens)[..., None].expand(-1, -1, -1, self.head_dim)
            k_out.scatter_(2, index, k)
            v_out.scatter_(2, index, v)
        return k_out[:, :, :-1].to(self.dtype), v_out[:, :, :-1].to(self.dtype)
