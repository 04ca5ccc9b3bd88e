"""Where a token's key and value live inside a layer's paged KV cache, learned from the backend's own write op.

Every vLLM attention backend stores a layer's cache in its own arrangement:

* CPU (``CPU_ATTN``): ``[num_blocks, H_kv, block_size, 2 * D]``; per (block, head) a key tile of
  ``block_size * D`` elements followed by a value tile, the elements of a tile ordered as the kernel's
  instruction set wants (keys are stored transposed on the ``vec`` ISA).
* GPU backends in vLLM 0.32 (FlashAttention, FlashInfer, Triton): a logical ``[num_blocks, H_kv,
  block_size, 2 * D]`` view (key = the first D channels, value = the last D) whose physical order is the
  engine's ``KVCacheLayout`` (``LBNHC`` = FlashAttention's NHD, ``LBHNC`` = HND, ``BLHNC`` with the
  layers inside each block, ...).
* Earlier vLLM releases: ``(2, num_blocks, block_size, H_kv, D)`` (FlashAttention) and
  ``(num_blocks, 2, block_size, H_kv, D)`` (FlashInfer, Triton).

None of this is assumed. :func:`probe_kv_layout` writes index-valued keys and values through the
backend's own cache-write op (``AttentionImpl.do_kv_cache_update``) into a two-block scratch tensor
laid out like the real cache (same shape but for the block count, same stride order), finds where each
(block, head, token, dim) landed, and expresses it as element offsets of the real tensor:
``offset = base + block * block_stride + head * head_stride + table[token, dim]``. When ``table`` is
affine in (token, dim), as it is for every backend we know, the cache of all layers is addressed with
strided views (:mod:`~kvcache.engine_adapters.vllm.compact`); otherwise element-wise through ``table``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# write(key [n, H_kv, D], value [n, H_kv, D], cache (like the layer's), slot_mapping [n] int64)
CacheWrite = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

# The probe writes small integers (token, dim, head and block indices + 1); bf16 holds them exactly up to 256.
MAX_PROBE_INDEX = 256


@dataclass(frozen=True)
class SideLayout:
    """Element offsets of the keys (or the values) of a layer, relative to the tensor's storage offset."""

    base: int  # offset of the first element of block 0, head 0
    block_stride: int
    head_stride: int
    table: torch.Tensor  # [block_size, D] int64: offset of (token, dim) from its (block, head) origin

    @property
    def affine(self) -> tuple[int, int] | None:
        """``(token_stride, dim_stride)`` when ``table[t, d] == t * token_stride + d * dim_stride``, else None."""
        table = self.table.cpu()
        bs, d = table.shape
        token_stride = int(table[1, 0]) if bs > 1 else 0
        dim_stride = int(table[0, 1]) if d > 1 else 0
        want = torch.arange(bs)[:, None] * token_stride + torch.arange(d)[None, :] * dim_stride
        return (token_stride, dim_stride) if torch.equal(table, want) else None

    def offsets(self, blocks: torch.Tensor, heads: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Offsets ``[..., D]`` of the elements of (block, head, token-in-block), broadcast together."""
        origin = self.base + blocks * self.block_stride + heads * self.head_stride
        return origin[..., None] + self.table.to(tokens.device)[tokens]


@dataclass(frozen=True)
class KVLayout:
    """Where each (block, KV head, token in block, dim) of keys and values sits in one layer's cache tensor."""

    block_size: int
    num_heads: int
    head_size: int
    block_dim: int  # the dimension of the cache tensor that counts blocks
    key: SideLayout
    value: SideLayout

    @property
    def transposed_keys(self) -> bool:
        strides = self.key.affine
        return strides is not None and strides[0] < strides[1]


def _scratch_like(cache: torch.Tensor, block_dim: int, num_blocks: int) -> torch.Tensor:
    """A zeroed tensor shaped like ``cache`` but with ``num_blocks`` blocks, its dimensions in the same memory order."""
    shape = list(cache.shape)
    shape[block_dim] = num_blocks
    order = sorted(range(cache.dim()), key=lambda i: (-cache.stride(i), i))  # outermost first
    buffer = torch.zeros([shape[i] for i in order], dtype=cache.dtype, device=cache.device)
    inverse = [order.index(i) for i in range(cache.dim())]
    return buffer.permute(inverse)


def probe_kv_layout(
    write: CacheWrite, cache: torch.Tensor, block_dim: int, block_size: int, num_heads: int, head_size: int
) -> KVLayout:
    """Learn the layout of ``cache`` (one layer's real cache tensor) from the backend's write op.

    Eight writes into a two-block scratch tensor: keys carry token, dim, head or block index + 1 (values
    zero), then the same for values. A cell is a key cell when the key writes filled it; the four codes
    read back at a cell name its (block, head, token, dim); its offset in the real tensor is its index
    times the real tensor's strides. Raises when the writes are not a one-to-one placement or the offsets
    are not ``base + block * block_stride + head * head_stride + table[token, dim]``."""
    if max(block_size, head_size, num_heads) > MAX_PROBE_INDEX:
        raise ValueError(f"layout probe supports block size, head size and KV heads up to {MAX_PROBE_INDEX}")
    blocks = 2
    n = blocks * block_size
    slots = torch.arange(n, dtype=torch.long, device=cache.device)
    token = (torch.arange(n) % block_size)[:, None, None].expand(n, num_heads, head_size)
    dim = torch.arange(head_size)[None, None, :].expand(n, num_heads, head_size)
    head = torch.arange(num_heads)[None, :, None].expand(n, num_heads, head_size)
    block = (torch.arange(n) // block_size)[:, None, None].expand(n, num_heads, head_size)
    codes = {"token": token, "dim": dim, "head": head, "block": block}
    strides = torch.tensor(cache.stride(), dtype=torch.long)
    sides = {}
    for side in ("key", "value"):
        reads = {}
        for name, index in codes.items():
            scratch = _scratch_like(cache, block_dim, blocks)
            data = (index + 1).to(cache.dtype).to(cache.device).contiguous()
            zeros = torch.zeros_like(data)
            write(data, zeros, scratch, slots) if side == "key" else write(zeros, data, scratch, slots)
            reads[name] = scratch.float().cpu()
        cells = reads["token"] != 0
        problem = None
        if int(cells.sum()) != n * num_heads * head_size:
            problem = f"the {side}s of {n} tokens filled {int(cells.sum())} cells, not {n * num_heads * head_size}"
        elif any(not torch.equal(r != 0, cells) for r in reads.values()):
            problem = f"the {side} writes did not fill the same cells"
        if problem is None:
            where = cells.nonzero()  # [cells, ndim] index in the scratch tensor
            found = {name: r[cells].round().long() - 1 for name, r in reads.items()}
            if not torch.equal(where[:, block_dim], found["block"]):
                problem = f"dimension {block_dim} of the cache does not count blocks"
        if problem is None:
            real = (where * strides).sum(dim=1)  # the same index in the real tensor (block index = block id)
            grid = torch.full((blocks, num_heads, block_size, head_size), -1, dtype=torch.long)
            grid[found["block"], found["head"], found["token"], found["dim"]] = real
            base = int(grid[0, 0].min())  # the tile's first element (not always token 0, dim 0's)
            block_stride = int(grid[1, 0, 0, 0] - grid[0, 0, 0, 0])
            head_stride = int(grid[0, 1, 0, 0] - grid[0, 0, 0, 0]) if num_heads > 1 else 0
            table = grid[0, 0] - base
            want = (
                base + torch.arange(blocks)[:, None, None, None] * block_stride
                + torch.arange(num_heads)[None, :, None, None] * head_stride + table[None, None]
            )
            if bool((grid < 0).any()) or not torch.equal(grid, want):
                problem = f"the {side} offsets are not base + block * stride + head * stride + table[token, dim]"
        if problem is not None:
            raise RuntimeError(
                f"kvcache: could not learn the KV cache layout of the attention backend (cache {tuple(cache.shape)}, "
                f"strides {cache.stride()}, block {block_size}, {num_heads} KV heads, head dim {head_size}): {problem}"
            )
        sides[side] = SideLayout(base, block_stride, head_stride, table)
    return KVLayout(block_size, num_heads, head_size, block_dim, sides["key"], sides["value"])


def learn_kv_layout(
    write: CacheWrite, cache: torch.Tensor, num_blocks: int, block_size: int, num_heads: int, head_size: int
) -> KVLayout:
    """:func:`probe_kv_layout` with the block dimension found: the dimension of ``cache`` whose size is
    ``num_blocks`` (dim 0 of vLLM 0.32's ``[blocks, heads, tokens, 2D]`` views, dim 1 of the older
    ``(2, num_blocks, ...)`` caches); when several sizes match, the one the probe confirms."""
    candidates = sorted((i for i, size in enumerate(cache.shape) if size == num_blocks), key=lambda i: (i != 0, i))
    errors = []
    for block_dim in candidates:
        try:
            return probe_kv_layout(write, cache, block_dim, block_size, num_heads, head_size)
        except RuntimeError as err:
            errors.append(str(err))
    raise RuntimeError(
        "; ".join(errors) or f"kvcache: no dimension of the KV cache {tuple(cache.shape)} counts its {num_blocks} blocks"
    )


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``cache`` as one 1-D tensor (element offsets index it directly)."""
    size = cache.untyped_storage().nbytes() // cache.element_size()
    return cache.as_strided((size,), (1,), 0)


def _slot_offsets(cache: torch.Tensor, side: SideLayout, layout: KVLayout, block_ids: list[int], length: int) -> torch.Tensor:
    """Offsets ``[H_kv, length, D]`` of the first ``length`` physical slots of a request."""
    bs = layout.block_size
    slots = torch.arange(length, device=cache.device)
    blocks = torch.tensor(block_ids[: -(-length // bs)], dtype=torch.long, device=cache.device)[slots // bs]
    heads = torch.arange(layout.num_heads, device=cache.device)[:, None]
    return cache.storage_offset() + side.offsets(blocks[None], heads, (slots % bs)[None])


def gather_tokens(
    kv_cache: torch.Tensor, layout: KVLayout, block_ids: list[int], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[H_kv, length, D]`` of the first ``length`` physical slots of a request (one layer,
    element by element: the reference the batched :class:`~kvcache.engine_adapters.vllm.compact.StackedKV` is tested against)."""
    flat = _flat(kv_cache)
    return tuple(flat[_slot_offsets(kv_cache, side, layout, block_ids, length)] for side in (layout.key, layout.value))


def write_tokens(
    kv_cache: torch.Tensor, layout: KVLayout, block_ids: list[int], keys: torch.Tensor, values: torch.Tensor
) -> None:
    """Write ``keys``/``values`` ``[H_kv, C, D]`` (different tokens per head allowed) into the first C
    physical slots of a request (one layer, element by element)."""
    flat = _flat(kv_cache)
    length = keys.shape[1]
    for side, data in ((layout.key, keys), (layout.value, values)):
        flat[_slot_offsets(kv_cache, side, layout, block_ids, length)] = data.to(kv_cache.dtype)
