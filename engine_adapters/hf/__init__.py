"""Hugging Face transformers adapter: ``with kv_policy(model, "keyformer", budget=0.5): model.generate(...)``.

Needs the ``hf`` extra (transformers, accelerate, gguf).
"""

from kvcache.engine_adapters.hf.adapter import SUPPORTED_FAMILIES, KVSession, kv_policy
from kvcache.engine_adapters.hf.cache import PolicyCache, PolicyLayer
from kvcache.engine_adapters.hf.models import load_model, resolve_model

__all__ = ["SUPPORTED_FAMILIES", "KVSession", "PolicyCache", "PolicyLayer", "kv_policy", "load_model", "resolve_model"]
