"""Gumbel-perturbed logits, Keyformer's scoring transform (Adnan et al., arXiv 2403.09054, sec. 3.3).

``GumbelLogits(tau, generator)(z) = (z + g) / tau`` with ``g = -log(-log(U))``, ``U ~ Uniform(0, 1)`` drawn
fresh per element. It is a class rather than a closure so that
:func:`kvcache.attention.scoring.column_sums` can recognise it and draw the noise inside the Triton
kernel instead (:mod:`kvcache.attention.triton_scoring`, seeded from the same generator).

On the CPU the uniforms come from numpy's PCG64 (``numpy_generator``) when one is given: torch's CPU
Mersenne Twister draws about 4x slower and was most of the cost of Keyformer's prompt pass, which draws one
value per (query, slot) pair. The noise is the same distribution, from another stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# U is clamped into [TINY, 1 - EPS] so that both logs of -log(-log U) stay finite
TINY, EPS = 1e-20, 1e-7


def numpy_noise_generator(seed: int | None) -> np.random.Generator:
    """A CPU noise stream: PCG64 seeded with ``seed``, or, when None, from torch's global generator (one draw,
    so ``torch.manual_seed`` still fixes it)."""
    if seed is None:
        seed = int(torch.randint(0, 1 << 62, ()))
    return np.random.Generator(np.random.PCG64(seed))


def uniform(
    shape: torch.Size,
    device: torch.device,
    generator: torch.Generator | None = None,
    numpy_generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """U ~ Uniform(0, 1) fp32, clamped to [1e-20, 1 - 1e-7]: from ``numpy_generator`` on the CPU when given,
    otherwise ``torch.rand`` with ``generator``."""
    if numpy_generator is not None and torch.device(device).type == "cpu":
        values = torch.empty(shape, dtype=torch.float32)  # filled through numpy's view of its memory
        numpy_generator.random(out=values.numpy().reshape(-1), dtype=np.float32)
    else:
        values = torch.rand(shape, device=device, generator=generator)
    return values.clamp_(TINY, 1.0 - EPS)


def gumbel_noise(
    shape: torch.Size,
    device: torch.device,
    generator: torch.Generator | None,
    numpy_generator: np.random.Generator | None = None,
) -> torch.Tensor:
    """g = -log(-log(U)), U ~ Uniform(0, 1): standard Gumbel noise."""
    return uniform(shape, device, generator, numpy_generator).log_().neg_().log_().neg_()


@dataclass
class GumbelLogits:
    """(z + g) / tau with fresh standard Gumbel noise g per element; keeps -inf at -inf."""

    tau: float
    generator: torch.Generator | None = None
    numpy_generator: np.random.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        noise = gumbel_noise(logits.shape, logits.device, self.generator, self.numpy_generator)
        return (logits + noise) / self.tau

    def softmax_(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax((z + g) / tau) over the last dimension, computed in ``logits``' storage. At tau = 1 (the
        prompt pass) exp(z + g) = exp(z) / E with E = -log U ~ Exp(1), so one log per element instead of two:
        w = exp(z - max z) / log U, normalised by its row sum (numerator and sum are both negative). A row
        always has a finite logit (a query sees itself)."""
        u = uniform(logits.shape, logits.device, self.generator, self.numpy_generator).log_()
        if self.tau == 1.0:
            logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_().div_(u)
            return logits.div_(logits.sum(dim=-1, keepdim=True))
        return torch.softmax(logits.sub_(u.neg_().log_()).div_(self.tau), dim=-1)

    def kernel_seed(self) -> int:
        """A 62-bit Philox seed for one kernel launch, drawn from ``generator`` (torch's default one when
        None), so a seeded policy is deterministic and every pass still gets fresh noise."""
        where = self.generator.device if self.generator is not None else torch.device("cpu")
        return int(torch.randint(0, 1 << 62, (), generator=self.generator, device=where))
