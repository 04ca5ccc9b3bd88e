"""Eviction policies (kind ``evict``). Importing this package registers the built-in policies."""

from kvcache.evict import expected_attention, full, h2o, keyformer, knorm, snapkv, streaming, tova  # noqa: F401  (registration)
from kvcache.evict.base import EvictionPolicy, Observation

__all__ = ["EvictionPolicy", "Observation"]
