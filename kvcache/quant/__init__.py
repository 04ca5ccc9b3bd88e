"""Quantised KV storage (kind ``quant``). Importing this package registers the built-in codecs.

``codec = kvcache.create("quant", "zipcache")``; ``store = KVStore(codec, head_dim, dtype, device)``
is one layer's packed store (:class:`kvcache.quant.store.KVStore`); attention over it lives in
``kvcache.attention.quantized``.
"""

from kvcache.quant import kivi, none, zipcache  # noqa: F401  (registers the codecs)
from kvcache.quant.base import QuantCodec
from kvcache.quant.tiers import TierRows
from kvcache.quant.saliency import attention_saliency, normalized_attention, probe_positions
from kvcache.quant.store import KVStore

__all__ = [
    "KVStore",
    "QuantCodec",
    "TierRows",
    "attention_saliency",
    "normalized_attention",
    "probe_positions",
]
