"""When attention statistics run as Triton kernels instead of torch.

The kernels (:mod:`kvcache.attention.triton_scoring`, :mod:`kvcache.attention.triton_packed`) are chosen
when the tensors are on a CUDA device and ``triton`` imports. ``KVCACHE_TRITON=1`` forces them on any
device (CPU tensors then need ``TRITON_INTERPRET=1``, Triton's interpreter: how the tests run them);
``KVCACHE_TRITON=0`` keeps the torch path everywhere (benchmarks compare the two on one GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os

from typing import Callable

import torch

from kvcache.attention.gumbel import GumbelLogits

ENV_SWITCH = "KVCACHE_TRITON"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package is installed (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether to run the Triton kernel for work on ``tensor``'s device (see the module docstring)."""
    switch = os.environ.get(ENV_SWITCH, "")
    if switch == "0":
        return False
    if switch == "1":
        return triton_available()
    return tensor.is_cuda and triton_available()


def kernel_computes(transform: Callable[[torch.Tensor], torch.Tensor] | None) -> bool:
    """True for the logit transforms the column-sums kernel computes itself: none (H2O) and
    :class:`~kvcache.attention.gumbel.GumbelLogits` (Keyformer); any other runs in torch."""
    return transform is None or isinstance(transform, GumbelLogits)
