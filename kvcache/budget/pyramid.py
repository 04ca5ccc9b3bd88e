"""PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv 2406.02069).

With B = C - w per layer on average and beta = 20: min = floor(B / beta), max = 2B - min; if
max >= L - w then max = L - w and min = 2B - max; step = floor((max - min) / (N - 1)); layer l keeps
max - l * step tokens plus the w recent ones (lower layers keep more). No compression when L <= C.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.budget.base import LayerBudget
from kvcache.registry import check_float, param, register


@register("budget", "pyramid")
@dataclass
class Pyramid(LayerBudget):
    """Linearly decreasing budgets from the first layer to the last (arXiv 2406.02069)."""

    beta: float = param(20.0, "ratio of the mean budget to the last layer's budget")

    def __post_init__(self) -> None:
        check_float("pyramid beta", self.beta, 1.0)

    def allocate(
        self,
        capacity: torch.Tensor,
        recent: torch.Tensor,
        prompt_len: torch.Tensor,
        num_layers: int,
        preferences: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mean = (capacity - recent).clamp(min=0)
        low = torch.div(mean, self.beta, rounding_mode="floor").long()
        high = 2 * mean - low
        capped = high >= prompt_len - recent
        high = torch.where(capped, prompt_len - recent, high)
        low = torch.where(capped, 2 * mean - high, low)
        step = torch.div(high - low, max(1, num_layers - 1), rounding_mode="floor")
        layers = torch.arange(num_layers, device=capacity.device).reshape(-1, 1)
        budgets = high.reshape(1, -1) - layers * step.reshape(1, -1) + recent.reshape(1, -1)
        no_compression = (prompt_len <= capacity).reshape(1, -1)
        return torch.where(no_compression, prompt_len.reshape(1, -1), budgets)
