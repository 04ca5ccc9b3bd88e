"""Quantised KV storage (kind ``quant``). Importing this package registers the built-in codecs."""
