"""engine_adapters/vllm"""
