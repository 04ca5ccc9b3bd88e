"""Every layer's paged KV cache addressed as one tensor, so a request is compacted in a handful of ops.

vLLM allocates the KV cache of a cache group as one buffer and hands each layer a view into it. The
learned :class:`~kvcache.engine_adapters.vllm.layout.KVLayout` says where (block, KV head, token, dim)
of keys and values sit in a layer's view, whatever the backend (CPU tiles, FlashAttention's NHD,
FlashInfer's HND, layers inside blocks, the older ``(2, num_blocks, ...)`` caches). When the layer views
sit at a constant distance in the same storage, as they do in vLLM 0.32, :class:`StackedKV` views the
whole group as ``[L, num_blocks, H_kv, block_size, D]`` for keys and for values (``as_strided``, no copy)
and every read or move is one indexing op over all layers and heads. Layouts that are no affine map of
(token, dim) inside a (block, head) are indexed element-wise through the learned table; layers that do
not share a storage are handled one view each.

A compaction is then, for the whole request: read the keys of its first T physical slots
(:meth:`StackedKV.read_keys`, ``[L, H_kv, T, D]``; the values too for a policy that weights by them),
score all layers in one ``policy.score`` call with the layers as the batch dimension, one ``select_keep``,
and one :meth:`StackedKV.move` that copies the kept tokens' keys and values into the first C slots.
:func:`compact_order` keeps the kept tokens in ascending slot order (prompt compactions, as the Hugging
Face adapter does); :func:`fill_holes` moves only the kept tokens that sit past C into the slots of
evicted ones (decode re-compactions: at most k tokens per layer and head move, the others stay where
they are, as the HF adapter's in-place replacement does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.engine_adapters.vllm.layout import KVLayout, SideLayout


@dataclass
class _Part:
    """Consecutive layers ``[first, first + count)`` that one strided view covers."""

    first: int
    count: int
    keys: torch.Tensor  # [count, num_blocks, H, block_size, D] view, or [count, num_blocks, H, span] for a table layout
    values: torch.Tensor


class StackedKV:
    """Keys and values of every layer of a KV cache group, addressed by (layer, KV head, physical slot)."""

    def __init__(self, caches: list[torch.Tensor], layout: KVLayout) -> None:
        first = caches[0]
        self.block_size, self.head_size = layout.block_size, layout.head_size
        self.num_layers, self.num_heads = len(caches), layout.num_heads
        self.device = first.device
        num_blocks = first.shape[layout.block_dim]
        for cache in caches:
            if cache.shape != first.shape or cache.stride() != first.stride() or cache.dtype != first.dtype:
                raise RuntimeError(
                    f"kvcache: the layers' KV cache views differ ({tuple(first.shape)} {first.stride()} {first.dtype} vs "
                    f"{tuple(cache.shape)} {cache.stride()} {cache.dtype}); the plugin needs one layout for all layers"
                )
        # element offsets of (token, dim) inside a (block, head), for layouts that are no affine map
        self._key_table = None if layout.key.affine else layout.key.table.to(self.device)
        self._value_table = None if layout.value.affine else layout.value.table.to(self.device)
        self.parts = []
        for start, count, step in _runs(caches):
            offset = caches[start].storage_offset()
            views = [self._view(caches[start], side, count, step, num_blocks, offset) for side in (layout.key, layout.value)]
            self.parts.append(_Part(start, count, views[0], views[1]))

    def _view(self, base: torch.Tensor, side: SideLayout, count: int, step: int, num_blocks: int, offset: int) -> torch.Tensor:
        outer = (count, num_blocks, self.num_heads)
        outer_strides = (step, side.block_stride, side.head_stride)
        strides = side.affine
        if strides is None:
            span = int(side.table.max()) + 1
            return base.as_strided(outer + (span,), outer_strides + (1,), offset + side.base)
        return base.as_strided(outer + (self.block_size, self.head_size), outer_strides + strides, offset + side.base)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _get(view: torch.Tensor, table: torch.Tensor | None, layer, block, head, offset) -> torch.Tensor:
        if table is None:
            return view[layer, block, head, offset]
        return view[layer[..., None], block[..., None], head[..., None], table[offset]]

    @staticmethod
    def _put(view: torch.Tensor, table: torch.Tensor | None, layer, block, head, offset, data: torch.Tensor) -> None:
        if table is None:
            view.index_put_((layer, block, head, offset), data)
        else:
            view.index_put_((layer[..., None], block[..., None], head[..., None], table[offset]), data)

    def read_keys(self, blocks: torch.Tensor, length: int) -> torch.Tensor:
        """Keys ``[L, H_kv, length, D]`` of the first ``length`` physical slots of a request whose block
        table is ``blocks`` (int64)."""
        return self._read_prefix(blocks, length, values=False)

    def read_values(self, blocks: torch.Tensor, length: int) -> torch.Tensor:
        """Values ``[L, H_kv, length, D]`` of the first ``length`` physical slots (same layout as
        :meth:`read_keys`; for policies that weight by ||v||, e.g. Expected Attention)."""
        return self._read_prefix(blocks, length, values=True)

    def _read_prefix(self, blocks: torch.Tensor, length: int, values: bool) -> torch.Tensor:
        slots = torch.arange(length, device=self.device)
        block = blocks[slots // self.block_size][None, None]
        offset = (slots % self.block_size)[None, None]
        head = torch.arange(self.num_heads, device=self.device)[None, :, None]
        table = self._value_table if values else self._key_table
        out = []
        for part in self.parts:
            layer = torch.arange(part.count, device=self.device)[:, None, None]
            out.append(self._get(part.values if values else part.keys, table, layer, block, head, offset))
        return out[0] if len(out) == 1 else torch.cat(out)

    def read(self, blocks: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[L, H_kv, n, D]`` of the slots ``slots [L, H_kv, n]`` (different per layer and head)."""
        keys, values = [], []
        head = torch.arange(self.num_heads, device=self.device)[None, :, None]
        for part in self.parts:
            mine = slots[part.first : part.first + part.count]
            layer = torch.arange(part.count, device=self.device)[:, None, None]
            block, offset = blocks[mine // self.block_size], mine % self.block_size
            keys.append(self._get(part.keys, self._key_table, layer, block, head, offset))
            values.append(self._get(part.values, self._value_table, layer, block, head, offset))
        if len(self.parts) == 1:
            return keys[0], values[0]
        return torch.cat(keys), torch.cat(values)

    def move(self, blocks: torch.Tensor, source: torch.Tensor, dest_blocks: torch.Tensor | None = None) -> int:
        """Slot j of layer l, head h receives the key and value of slot ``source[l, h, j]`` (``[L, H_kv, C]``);
        slots are read through ``blocks`` and written through ``dest_blocks`` (default: ``blocks``; with prefix
        caching, private blocks replace shared ones). Only the slots whose source or block differs are copied.
        Every source is read before any slot is written, so sources may be destinations of others. Returns the
        tokens moved (per layer and head, summed)."""
        capacity = source.shape[-1]
        position = torch.arange(capacity, device=source.device)
        changed = source != position
        if dest_blocks is None:
            dest_blocks = blocks
        else:
            changed |= dest_blocks[position // self.block_size] != blocks[position // self.block_size]
        layer, head, dest = changed.nonzero(as_tuple=True)
        if dest.numel() == 0:
            return 0
        src = source[layer, head, dest]
        bs = self.block_size
        for part in self.parts:
            if len(self.parts) == 1:
                mine = slice(None)
            else:
                mine = (layer >= part.first) & (layer < part.first + part.count)
            lay = layer[mine] - part.first
            h, s, t = head[mine], src[mine], dest[mine]
            keys = self._get(part.keys, self._key_table, lay, blocks[s // bs], h, s % bs)
            values = self._get(part.values, self._value_table, lay, blocks[s // bs], h, s % bs)
            self._put(part.keys, self._key_table, lay, dest_blocks[t // bs], h, t % bs, keys)
            self._put(part.values, self._value_table, lay, dest_blocks[t // bs], h, t % bs, values)
        return int(dest.numel())


def _runs(caches: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    """Split the layers into runs ``(first, count, layer_stride)`` that one strided view can cover: same
    storage, shape, strides and dtype, storage offsets in arithmetic progression."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    while start < len(caches):
        base = caches[start]
        count, step = 1, 0
        while start + count < len(caches):
            nxt = caches[start + count]
            same = (
                nxt.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
                and nxt.shape == base.shape and nxt.stride() == base.stride() and nxt.dtype == base.dtype
            )
            gap = nxt.storage_offset() - caches[start + count - 1].storage_offset()
            if not same or gap <= 0 or (count > 1 and gap != step):
                break
            step = gap
            count += 1
        runs.append((start, count, step))
        start += count
    return runs


def compact_order(keep: torch.Tensor) -> torch.Tensor:
    """Sources for a compaction in slot order: slot j receives the j-th kept slot (``keep`` ascending)."""
    return keep


def fill_holes(keep: torch.Tensor, capacity: int) -> torch.Tensor:
    """Sources ``[L, H, C]`` that leave every kept slot below C where it is and move the kept slots at or
    past C into the evicted slots below C, the i-th hole (ascending) taking the i-th such slot."""
    layers, heads, _ = keep.shape
    length = int(keep.max()) + 1 if keep.numel() else capacity
    kept = torch.zeros(layers, heads, max(length, capacity), dtype=torch.bool, device=keep.device)
    kept.scatter_(-1, keep, True)
    holes = ~kept[..., :capacity]
    tail = kept[..., capacity:]
    positions = torch.arange(tail.shape[-1], device=keep.device)
    # kept tail slots first, in ascending order (evicted ones sorted after them)
    movers = torch.where(tail, positions, tail.shape[-1] + positions).sort(dim=-1).values + capacity
    rank = (holes.cumsum(dim=-1) - 1).clamp_(min=0)
    filled = movers.gather(-1, rank.clamp(max=max(0, movers.shape[-1] - 1))) if movers.shape[-1] else rank
    return torch.where(holes, filled, torch.arange(capacity, device=keep.device))
