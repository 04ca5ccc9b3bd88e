"""Gumbel-perturbed logits, Keyformer's scoring transform (Adnan et al., arXiv 2403.09054, sec. 3.3).

``GumbelLogits(tau, generator)(z) = (z + g) / tau`` with ``g = -log(-log(U))``, ``U ~ Uniform(0, 1)`` drawn
fresh per element. It is a class rather than a closure so that
:func:`kvcache.attention.scoring.column_sums` can recognise it and draw the noise inside the Triton
kernel instead (:mod:`kvcache.attention.triton_scoring`, seeded from the same generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gumbel_noise(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """g = -log(-log(U)), U ~ Uniform(0, 1): standard Gumbel noise."""
    uniform = torch.rand(shape, device=device, generator=generator).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(uniform))


@dataclass
class GumbelLogits:
    """(z + g) / tau with fresh standard Gumbel noise g per element; keeps -inf at -inf."""

    tau: float
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits + gumbel_noise(logits.shape, logits.device, self.generator)) / self.tau

    def kernel_seed(self) -> int:
        """A 62-bit Philox seed for one kernel launch, drawn from ``generator`` (torch's default one when
        None), so a seeded policy is deterministic and every pass still gets fresh noise."""
        where = self.generator.device if self.generator is not None else torch.device("cpu")
        return int(torch.randint(0, 1 << 62, (), generator=self.generator, device=where))
