"""DiT feature-caching policies (kind ``feature``). Importing this package registers the built-in policies.

Each policy splits "when to recompute" (a :class:`~kvcache.feature.base.Decider`) from "what to
substitute" (a :class:`~kvcache.feature.base.Substitute`); :class:`~kvcache.feature.base.FeatureCache`
runs one policy for one request and CFG branch. Engine hooks live in ``engine_adapters.diffusers``.
"""

from kvcache.feature import first_block, foresight, static, taylorseer, teacache, tokencache  # noqa: F401
from kvcache.feature.base import FeatureCache, FeaturePolicy, StepInfo

__all__ = ["FeatureCache", "FeaturePolicy", "StepInfo"]
