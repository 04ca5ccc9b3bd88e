"""Per-architecture block contracts: which ModuleLists hold a transformer's blocks, which forward
arguments a block transforms (and in which order it returns them), which arguments carry one entry per
token (gathered along with the tokens for token-level caching), and how to compute block 0's
timestep-modulated input (TeaCache's gate). Nothing here copies model source: the blocks run unchanged.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch


class UnsupportedModelError(TypeError):
    """The model has no block contract; the message names the supported transformer classes."""


class ArgAccess:
    """Read and replace a block's forward arguments by name, whether passed positionally or by keyword."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        params = list(inspect.signature(forward).parameters)
        self.position = {name: i for i, name in enumerate(params)}

    def get(self, name: str, args: tuple, kwargs: dict) -> Any:
        pos = self.position.get(name)
        if name in kwargs:
            return kwargs[name]
        if pos is not None and pos < len(args):
            return args[pos]
        return None

    def replace(self, values: dict[str, Any], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        for name, value in values.items():
            pos = self.position.get(name)
            if name not in kwargs and pos is not None and pos < len(args):
                args[pos] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs


# -------------------------------------------------------------------------- modulated inputs (TeaCache)
def _basic_block_modulated(block: torch.nn.Module, get: Callable[[str], Any]) -> torch.Tensor | None:
    """BasicTransformerBlock (DiT: ada_norm_zero, PixArt/Latte: ada_norm_single)."""
    hidden, timestep = get("hidden_states"), get("timestep")
    norm_type = getattr(block, "norm_type", None)
    if norm_type == "ada_norm_zero":
        return block.norm1(hidden, timestep, get("class_labels"), hidden_dtype=hidden.dtype)[0]
    if norm_type == "ada_norm_single":
        shift, scale = (block.scale_shift_table[None] + timestep.reshape(hidden.shape[0], 6, -1)).chunk(6, dim=1)[:2]
        return block.norm1(hidden) * (1 + scale) + shift
    return None


def _cogvideox_modulated(block: torch.nn.Module, get: Callable[[str], Any]) -> torch.Tensor:
    return block.norm1(get("hidden_states"), get("encoder_hidden_states"), get("temb"))[0]


def _flux_modulated(block: torch.nn.Module, get: Callable[[str], Any]) -> torch.Tensor:
    return block.norm1(get("hidden_states"), emb=get("temb"))[0]


def _wan_modulated(block: torch.nn.Module, get: Callable[[str], Any]) -> torch.Tensor:
    hidden, temb = get("hidden_states"), get("temb")
    table = block.scale_shift_table.unsqueeze(0) if temb.ndim == 4 else block.scale_shift_table
    shift, scale = (table + temb.float()).chunk(6, dim=2 if temb.ndim == 4 else 1)[:2]
    if temb.ndim == 4:
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    return block.norm1(hidden.float()) * (1 + scale) + shift


@dataclass(frozen=True)
class BlockContract:
    """How one architecture's blocks are called.

    ``lists``: (ModuleList attribute, block kind) in call order (interleaved lists are zipped, as Latte's
    forward does). ``inputs``: forward arguments the block transforms, in the order used by the cache.
    ``returns``: for each of ``inputs``, its index in the block's returned tuple (``None``: the block
    returns a single tensor). ``token_args``: arguments with one row per image token along dim 0
    (rotary tables); ``token_level``: whether token-level caching (TokenCache) is supported.
    """

    lists: tuple[tuple[str, str], ...]
    inputs: tuple[str, ...] = ("hidden_states",)
    returns: tuple[int, ...] | None = None
    interleave: bool = False
    token_args: tuple[str, ...] = ()
    token_level: bool = True
    modulated: Callable[[torch.nn.Module, Callable[[str], Any]], torch.Tensor | None] | None = None


_CONTRACTS: dict[str, BlockContract] = {
    "DiTTransformer2DModel": BlockContract(lists=(("transformer_blocks", "block"),), modulated=_basic_block_modulated),
    "PixArtTransformer2DModel": BlockContract(lists=(("transformer_blocks", "block"),), modulated=_basic_block_modulated),
    "LatteTransformer3DModel": BlockContract(
        lists=(("transformer_blocks", "spatial"), ("temporal_transformer_blocks", "temporal")),
        interleave=True,
        modulated=_basic_block_modulated,
    ),
    "CogVideoXTransformer3DModel": BlockContract(
        lists=(("transformer_blocks", "block"),),
        inputs=("hidden_states", "encoder_hidden_states"),
        returns=(0, 1),
        token_args=("image_rotary_emb",),
        modulated=_cogvideox_modulated,
    ),
    "FluxTransformer2DModel": BlockContract(
        lists=(("transformer_blocks", "double"), ("single_transformer_blocks", "single")),
        inputs=("hidden_states", "encoder_hidden_states"),
        returns=(1, 0),
        token_level=False,  # rotary tables cover text + image tokens jointly
        modulated=_flux_modulated,
    ),
    "WanTransformer3DModel": BlockContract(
        lists=(("blocks", "block"),), token_level=False, modulated=_wan_modulated
    ),
}

SUPPORTED_MODELS: tuple[str, ...] = tuple(_CONTRACTS)


def contract_for(transformer: torch.nn.Module) -> BlockContract:
    """The block contract of ``transformer``'s class (or a base class); raise naming the supported ones."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in _CONTRACTS:
            return _CONTRACTS[cls.__name__]
    raise UnsupportedModelError(
        f"feature caching does not support {type(transformer).__name__}; supported transformers: "
        f"{', '.join(SUPPORTED_MODELS)} (pass a pipeline whose .transformer is one of them)"
    )


def ordered_blocks(transformer: torch.nn.Module, contract: BlockContract) -> list[tuple[torch.nn.Module, str]]:
    """The transformer's blocks in the order its forward calls them, with their kinds."""
    lists = [(list(getattr(transformer, name, None) or []), kind) for name, kind in contract.lists]
    if contract.interleave:
        out: list[tuple[torch.nn.Module, str]] = []
        for row in zip(*(blocks for blocks, _ in lists)):
            out.extend((block, kind) for block, (_, kind) in zip(row, lists))
        return out
    return [(block, kind) for blocks, kind in lists for block in blocks]
