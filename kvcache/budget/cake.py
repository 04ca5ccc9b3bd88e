"""CAKE (Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences",
ICLR 2025, arXiv 2503.12491).

Per layer, from the prompt's window attention P = softmax(Q[-w:] K^T / sqrt(d)) restricted to the
prefix columns: entropy H_l = -sum P log(P + 1e-10) and variance V_l = sum over heads and keys of the
variance over window queries of P. Preference p_l = H_l^(1/tau1) * V_l^(1/tau2). With the total
T = N * (C - w), layer l gets B_l = p_l / sum(p) * T, capped at L - w with the excess spread evenly
over the uncapped layers, plus the w recent tokens.

Cascading: after layer m of the prompt pass the total T is split over layers 0..m only, and earlier
layers are re-evicted to their new (smaller) budgets with their stored scores, so the cache never
holds more than T + w * N tokens during the prompt pass. The final split equals the one-shot split.
The tokens each layer keeps are chosen by the configured eviction policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.budget.base import LayerBudget
from kvcache.registry import PolicyConfigError, check_float, check_int, param, register


def spread_with_cap(shares: torch.Tensor, total: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Split ``total [B]`` over layers by ``shares [M, B]`` (summing to 1), each at most ``cap [B]``;
    what the capped layers cannot take is spread evenly over the others."""
    budgets = shares * total
    capped = torch.zeros_like(budgets, dtype=torch.bool)
    for _ in range(shares.shape[0]):
        over = budgets > cap
        if not over.any():
            break
        capped |= over
        excess = (budgets - cap).clamp(min=0).sum(dim=0)
        budgets = torch.minimum(budgets, cap.expand_as(budgets))
        free = (~capped).sum(dim=0).clamp(min=1)
        budgets = torch.where(capped, budgets, budgets + excess / free)
    return budgets


def layer_preference(window_probs: torch.Tensor, prefix: torch.Tensor, tau1: float, tau2: float) -> torch.Tensor:
    """p_l = H^(1/tau1) * V^(1/tau2) per sequence ``[B]`` from window probabilities ``[B, H_kv, G, w, T]``
    and the prefix columns ``prefix [B, H_kv, T]`` (slots older than the window)."""
    probs = window_probs * prefix[:, :, None, None, :]
    entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=(1, 2, 3, 4))
    variance = probs.var(dim=3, unbiased=False).sum(dim=(1, 2, 3))
    return entropy.clamp(min=0) ** (1.0 / tau1) * variance.clamp(min=0) ** (1.0 / tau2)


@register("budget", "cake")
@dataclass
class Cake(LayerBudget):
    """Budgets proportional to each layer's attention entropy and variance, cascading (arXiv 2503.12491)."""

    tau1: float = param(1.0, "entropy temperature")
    tau2: float = param(1.0, "variance temperature")
    window: int = param(32, "window of prompt queries whose attention gives the preference")
    cascading = True

    def __post_init__(self) -> None:
        check_float("cake tau1", self.tau1, 0.0, above=True)
        check_float("cake tau2", self.tau2, 0.0, above=True)
        check_int("cake window", self.window, 1)

    def preference(self, window_probs: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return layer_preference(window_probs, prefix, self.tau1, self.tau2)

    def allocate(
        self,
        capacity: torch.Tensor,
        recent: torch.Tensor,
        prompt_len: torch.Tensor,
        num_layers: int,
        preferences: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if preferences is None:
            raise PolicyConfigError("cake allocates from per-layer preferences; none were given")
        total = (num_layers * (capacity - recent)).clamp(min=0).to(torch.float64)
        prefs = preferences.to(torch.float64).clamp(min=1e-12)
        shares = prefs / prefs.sum(dim=0, keepdim=True)
        budgets = spread_with_cap(shares, total, (prompt_len - recent).to(torch.float64))
        budgets = budgets.floor().long() + recent.reshape(1, -1)
        no_compression = (prompt_len <= capacity).reshape(1, -1)
        return torch.where(no_compression, prompt_len.reshape(1, -1), budgets)
