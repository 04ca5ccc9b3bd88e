"""engine_adapters/diffusers"""
