"""engine_adapters/hf"""
