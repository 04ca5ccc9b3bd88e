"""DiT feature caching for diffusers: ``enable_cache(pipe, "foresight", warmup=5)`` / ``disable_cache(pipe)``."""

from kvcache.engine_adapters.diffusers.contracts import SUPPORTED_MODELS, UnsupportedModelError, contract_for
from kvcache.engine_adapters.diffusers import tiny
from kvcache.engine_adapters.diffusers.hooks import cache_stats, disable_cache, enable_cache, reset_cache

__all__ = [
    "SUPPORTED_MODELS",
    "UnsupportedModelError",
    "cache_stats",
    "contract_for",
    "disable_cache",
    "enable_cache",
    "reset_cache",
    "tiny",
]
