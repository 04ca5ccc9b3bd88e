"""DiT feature-caching policies (kind ``feature``). Importing this package registers the built-in policies."""
