"""Uniform layer budget: every layer keeps the same number of tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.budget.base import LayerBudget
from kvcache.registry import register


@register("budget", "uniform")
@dataclass
class Uniform(LayerBudget):
    """Every layer keeps the same budget C."""

    def allocate(
        self,
        capacity: torch.Tensor,
        recent: torch.Tensor,
        prompt_len: torch.Tensor,
        num_layers: int,
        preferences: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return capacity.reshape(1, -1).expand(num_layers, -1).clone()
