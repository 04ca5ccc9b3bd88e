"""DiT feature-caching policies (kind ``feature``). Importing this package registers the built-in policies.

Each policy splits "when to recompute" (a :class:`~kvcache.feature.base.Decider`) from "what to
substitute" (a :class:`~kvcache.feature.base.Substitute`); :class:`~kvcache.feature.base.FeatureCache`
runs one policy for one request and CFG branch. Engine hooks live in ``kvcache.engine_adapters.diffusers``.
"""

from kvcache.feature import first_block, foresight, static, taylorseer, teacache, tokencache  # noqa: F401
from kvcache.feature.base import FeatureCache, FeaturePolicy, StepInfo

# Settings under which each policy computes every block, so it must reproduce the uncached output exactly.
EXACT_SETTINGS: dict[str, dict[str, object]] = {
    "foresight": {"threshold": 0.0},
    "static": {"interval": 1},
    "taylorseer": {"interval": 1},
    "first-block": {"threshold": 0.0},
    "teacache": {"threshold": 0.0},
    "tokencache": {"k1": 1, "k2": 1},
}

__all__ = ["EXACT_SETTINGS", "FeatureCache", "FeaturePolicy", "StepInfo"]
