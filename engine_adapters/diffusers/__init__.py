"""DiT feature caching for diffusers: ``enable_cache(pipe, "foresight", warmup=5)`` / ``disable_cache(pipe)``.

Built on diffusers' hook registry: ``FeatureCacheConfig`` + ``apply_feature_cache(transformer, config)`` is the
same in diffusers' config + apply shape; the registered hooks are named in ``HOOK_NAMES``.
"""

from kvcache.engine_adapters.diffusers.contracts import SUPPORTED_MODELS, UnsupportedModelError, contract_for
from kvcache.engine_adapters.diffusers import tiny
from kvcache.engine_adapters.diffusers.hooks import (
    HOOK_NAMES,
    FeatureCacheConfig,
    apply_feature_cache,
    cache_stats,
    disable_cache,
    enable_cache,
    remove_feature_cache,
    reset_cache,
)

__all__ = [
    "HOOK_NAMES",
    "SUPPORTED_MODELS",
    "FeatureCacheConfig",
    "UnsupportedModelError",
    "apply_feature_cache",
    "cache_stats",
    "contract_for",
    "disable_cache",
    "enable_cache",
    "remove_feature_cache",
    "reset_cache",
    "tiny",
]
