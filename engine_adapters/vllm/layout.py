"""Where a token's key and value live inside a paged KV block, learned from the real kernel.

vLLM's CPU backend stores a layer's cache as ``[num_blocks, H_kv, 2 * block_size, D]``: per (block,
head), a key tile of ``block_size * D`` elements followed by a value tile. How elements are arranged
inside a tile depends on the instruction set the kernel was built for (some store K transposed). We do
not assume it: :func:`probe_tile_layout` writes index-valued keys and values through the backend's own
``reshape_and_cache`` into a scratch block and reads back the permutation. Gathers and compactions then
index the tiles with it, so they stay correct whatever the kernel does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

WriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class TileLayout:
    """``perm_k[t * D + d]`` is the flat offset of token t, dim d inside a key tile (same for values)."""

    block_size: int
    head_size: int
    perm_k: torch.Tensor  # [block_size * D] int64
    perm_v: torch.Tensor

    @property
    def transposed_keys(self) -> bool:
        identity = torch.arange(self.block_size * self.head_size)
        return not torch.equal(self.perm_k, identity)


def _permutation(token: torch.Tensor, dim: torch.Tensor, block_size: int, head_size: int, what: str) -> torch.Tensor:
    token = token.round().long() - 1
    dim = dim.round().long() - 1
    logical = token * head_size + dim
    n = block_size * head_size
    ok = (token >= 0).all() and (dim >= 0).all() and torch.equal(torch.sort(logical).values, torch.arange(n))
    if not ok:
        raise RuntimeError(
            f"kvcache: could not learn the {what} tile layout of the attention kernel (block {block_size}, "
            f"head dim {head_size}); the kernel's cache format is not a permutation of [block, dim]"
        )
    perm = torch.empty(n, dtype=torch.long)
    perm[logical] = torch.arange(n)
    return perm


def probe_tile_layout(write: WriteFn, dtype: torch.dtype, block_size: int, head_size: int) -> TileLayout:
    """Learn the tile layout by writing known values through ``write(key, value, key_cache, value_cache,
    slot_mapping)`` (the backend's ``reshape_and_cache``). Index values stay <= 256 so bf16 holds them exactly."""
    if block_size > 256 or head_size > 256:
        raise ValueError("layout probe supports block_size and head_size up to 256")
    cache = torch.zeros(1, 1, 2 * block_size, head_size, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    slots = torch.arange(block_size, dtype=torch.long)
    token_ids = (torch.arange(block_size, dtype=torch.float32) + 1)[:, None, None].expand(block_size, 1, head_size)
    dim_ids = (torch.arange(head_size, dtype=torch.float32) + 1)[None, None, :].expand(block_size, 1, head_size)
    reads = []
    for values in (token_ids, dim_ids):
        cache.zero_()
        v = values.to(dtype).contiguous()
        write(v, v.clone(), key_cache, value_cache, slots)
        reads.append((cache[0, 0, :block_size].flatten().float().clone(), cache[0, 0, block_size:].flatten().float().clone()))
    (tok_k, tok_v), (dim_k, dim_v) = reads
    return TileLayout(
        block_size,
        head_size,
        _permutation(tok_k, dim_k, block_size, head_size, "key"),
        _permutation(tok_v, dim_v, block_size, head_size, "value"),
    )


def _tiles(kv_cache: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    view = kv_cache.view(kv_cache.shape[0], kv_cache.shape[1], 2 * block_size, -1)
    return view[:, :, :block_size], view[:, :, block_size:]


def gather_tokens(
    kv_cache: torch.Tensor, layout: TileLayout, block_ids: list[int], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[H_kv, length, D]`` of the first ``length`` physical slots of a request."""
    bs, d = layout.block_size, layout.head_size
    n_blocks = -(-length // bs)
    ids = torch.tensor(block_ids[:n_blocks], dtype=torch.long)
    key_tiles, value_tiles = _tiles(kv_cache, bs)
    out = []
    for tiles, perm in ((key_tiles, layout.perm_k), (value_tiles, layout.perm_v)):
        flat = tiles.index_select(0, ids).reshape(n_blocks, tiles.shape[1], bs * d)
        logical = flat[:, :, perm].reshape(n_blocks, tiles.shape[1], bs, d)
        out.append(logical.permute(1, 0, 2, 3).reshape(tiles.shape[1], n_blocks * bs, d)[:, :length])
    return out[0], out[1]


def write_tokens(
    kv_cache: torch.Tensor, layout: TileLayout, block_ids: list[int], keys: torch.Tensor, values: torch.Tensor
) -> None:
    """Write ``keys``/``values`` ``[H_kv, C, D]`` (different tokens per head allowed) into the first C
    physical slots of a request. Slots after C in the last block are zeroed."""
    bs, d = layout.block_size, layout.head_size
    h, c, _ = keys.shape
    n_blocks = -(-c // bs)
    ids = torch.tensor(block_ids[:n_blocks], dtype=torch.long)
    key_tiles, value_tiles = _tiles(kv_cache, bs)
    for tiles, perm, data in ((key_tiles, layout.perm_k, keys), (value_tiles, layout.perm_v, values)):
        padded = torch.zeros(h, n_blocks * bs, d, dtype=tiles.dtype)
        padded[:, :c] = data.to(tiles.dtype)
        logical = padded.reshape(h, n_blocks, bs * d).permute(1, 0, 2)
        flat = torch.empty_like(logical)
        flat[:, :, perm] = logical
        tiles[ids] = flat.reshape(n_blocks, h, bs, d)
