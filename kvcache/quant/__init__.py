"""Quantised KV storage (kind ``quant``). Importing this package registers the built-in codecs.

``codec = kvcache.create("quant", "zipcache")``; ``store = codec.new_store(head_dim, dtype, device)``
gives one layer's packed store (:class:`kvcache.quant.store.KVStore`); attention over it lives in
``attention.quantized``.
"""

from kvcache.quant import kivi, none, zipcache  # noqa: F401  (registers the codecs)
from kvcache.quant.base import QuantCodec, TierRows
from kvcache.quant.saliency import attention_saliency, normalized_attention, probe_positions, saliency_from_observation
from kvcache.quant.store import KVStore

__all__ = [
    "KVStore",
    "QuantCodec",
    "TierRows",
    "attention_saliency",
    "normalized_attention",
    "probe_positions",
    "saliency_from_observation",
]
