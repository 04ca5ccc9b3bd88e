"""kvcache: which KV-cache tokens to keep, how many per layer, and how compactly to store them.

Engine-agnostic: this package imports only torch and numpy. Engines plug in through
``engine_adapters`` (Hugging Face transformers, vLLM, diffusers).
"""

from kvcache.registry import (
    KINDS,
    PolicyConfigError,
    UsageError,
    create,
    get_entry,
    list_policies,
    names,
    parse_spec,
    register,
)

__all__ = [
    "KINDS",
    "PolicyConfigError",
    "UsageError",
    "create",
    "get_entry",
    "list_policies",
    "names",
    "parse_spec",
    "register",
]
__version__ = "0.1.0"
