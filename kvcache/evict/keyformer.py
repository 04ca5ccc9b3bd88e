"""Keyformer (Adnan et al., "Keyformer: KV Cache Reduction through Key Tokens Selection", MLSys 2024,
arXiv 2403.09054).

At every forward pass t (prompt t=0, then one per generated token) each slot scores
s_t = sum over the pass's queries of softmax((z + g) / tau_t), with z the masked logits, g ~ Gumbel(0, 1)
drawn fresh per element, and tau_t = tau_init + t * (tau_end - tau_init) / max_new_tokens. Scores
accumulate, S <- [S_prev, 0] + s_t; evicted tokens' scores go with them. The budget k is fixed from
the prompt; the last ``window`` (default 30% of k) tokens are kept and the other k - w are the top
key tokens by S. The layer's output still uses the plain softmax; the Gumbel softmax only scores.
GQA: mean over the query heads of a KV group (the official code supports MHA only).

``kernel`` max-pools the prompt pass's scores along the sequence before they accumulate (SnapKV's
clustering; 1 is the paper). Default 31, chosen by sweep on SmolLM2-135M (kvlong pass key, multi-key and
QA at 1K, 8 samples each, budget 0.5, seed 0, as a share of the full cache's mean): kernel 1 keeps 20%,
15 40%, 31 55%; a recent window of 0.1 instead of 0.3 keeps 10%. Even so Keyformer stays well below
SnapKV on exact retrieval there: scores summed over every prompt query rarely single out a needle that
only the question attends to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kvcache.attention.gumbel import GumbelLogits, gumbel_noise, numpy_noise_generator  # noqa: F401 (gumbel_noise: re-exported)
from kvcache.evict.base import EvictionPolicy, Observation, accumulate, check_pooling, pool_scores
from kvcache.registry import check_float, param, register


@register("evict", "keyformer")
@dataclass
class Keyformer(EvictionPolicy):
    """Gumbel-regularised accumulated attention, key tokens + recent window (arXiv 2403.09054)."""

    window: int | float = param(0.3, "recent tokens kept: int tokens or fraction of the budget")
    sinks: int = param(0, "first tokens always kept")
    kernel: int = param(31, "max-pool the prompt pass's scores along the sequence (odd; 1: the paper, no pooling)")
    tau_init: float = param(1.0, "Gumbel softmax temperature at the prompt")
    tau_end: float = param(2.0, "temperature after max_new_tokens decode steps")
    seed: int | None = param(None, "seed of the Gumbel noise (None: drawn from torch's global generator at first use)")
    every_step = True
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)
    _numpy_generator: np.random.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("keyformer temperatures: tau_init", self.tau_init, 0.0, above=True)
        check_float("keyformer temperatures: tau_end", self.tau_end, 0.0, above=True)
        check_pooling("keyformer", self.kernel)

    def temperature(self, step: int, max_new_tokens: int | None) -> float:
        """tau_t = tau_init + t * (tau_end - tau_init) / max_new_tokens (tau_init when the length is unknown)."""
        if not max_new_tokens:
            return self.tau_init
        return self.tau_init + min(step, max_new_tokens) * (self.tau_end - self.tau_init) / max_new_tokens

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def numpy_generator(self) -> np.random.Generator:
        """The CPU noise stream (:mod:`kvcache.attention.gumbel`), seeded from ``seed`` at first use."""
        if self._numpy_generator is None:
            self._numpy_generator = numpy_noise_generator(self.seed)
        return self._numpy_generator

    def score(self, obs: Observation, previous: torch.Tensor | None) -> torch.Tensor:
        tau = self.temperature(obs.step, obs.max_new_tokens)
        device = obs.queries.device
        cpu_stream = self.numpy_generator() if device.type == "cpu" else None
        # a class, not a closure: column_sums recognises it and draws the noise inside its CUDA kernel
        attn = obs.column_sums(GumbelLogits(tau, self.generator(device), cpu_stream)).mean(dim=2)
        if previous is None:  # the prompt pass
            attn = pool_scores(attn, obs.key_index, self.kernel)
        return accumulate(previous, attn)
