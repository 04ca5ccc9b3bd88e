"""kvcache inside vLLM: token eviction in vLLM's paged KV cache, with the evicted blocks freed.

``vllm serve MODEL --kv-policy snapkv --kv-budget 0.25`` (or ``kvcache serve ...``, or
``LLM(..., additional_config={"kv_policy": "snapkv", "kv_budget": 0.25})``). The plugin is registered
under the ``vllm.general_plugins`` entry point and stays inert unless ``kv_policy`` is configured. The
policies are the registry's (``kvcache.create("evict", name)``), scored with the same
``Observation``/``select_keep`` code the Hugging Face adapter uses.

Modules: ``config`` (settings, version pin), ``plugin`` (entry point, flags, fences), ``plan`` (per-step
eviction rule), ``scheduler`` (``--scheduler-cls`` subclass that frees blocks), ``worker`` (model-runner
and attention-backend seams, compaction), ``layout`` (KV tile layout learned from the kernel),
``launcher`` (``kvcache serve``).
"""


def register() -> None:
    """``vllm.general_plugins`` entry point (imports vLLM lazily)."""
    from kvcache.engine_adapters.vllm.plugin import register as _register

    _register()
