"""Where kvcache plugs in: ``hf`` (transformers), ``vllm`` (plugin + launcher), ``diffusers`` (DiT hooks)."""
