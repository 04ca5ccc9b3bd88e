"""Token budgets: what a user asks for, and how a ``budget`` policy splits it across layers."""

from __future__ import annotations

import abc
import math
from typing import ClassVar, Sequence

import torch

from kvcache.registry import PolicyConfigError


def check_budget(budget: float | int) -> None:
    """A budget is a fraction of the prompt (float, 0 < b <= 1) or a token count (int >= 1)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise PolicyConfigError(f"budget must be a float fraction in (0, 1] or an int token count >= 1, got {budget!r}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise PolicyConfigError(
            f"budget {budget} as a fraction of the prompt must be in (0, 1]; pass an int for a token count"
        )
    if isinstance(budget, int) and budget < 1:
        raise PolicyConfigError(f"budget {budget} as a token count must be >= 1")


def check_budgets(budget: float | int | Sequence[float | int]) -> tuple[float | int, ...] | None:
    """Check one budget, or a list with one budget per batch row; returns the rows (None for one budget)."""
    if not isinstance(budget, (list, tuple)):
        check_budget(budget)
        return None
    if not budget:
        raise PolicyConfigError("budget: a per-row list needs one budget per batch row, got an empty list")
    for value in budget:
        check_budget(value)
    return tuple(budget)


def parse_budget(text: str | float | int) -> float | int:
    """Read a budget from a CLI or ``model_args`` string: ``"0.5"`` is a fraction, ``"512"`` a token count."""
    if isinstance(text, (int, float)):
        check_budget(text)
        return text
    value: float | int
    try:
        value = int(text) if str(text).strip().isdigit() else float(text)
    except ValueError:
        raise PolicyConfigError(f"budget {text!r} is neither a fraction like 0.5 nor a token count like 512") from None
    check_budget(value)
    return value


def tokens_for(budget: float | int, prompt_tokens: int) -> int:
    """Tokens a layer keeps on average for a prompt of ``prompt_tokens`` tokens (never more than the prompt)."""
    if isinstance(budget, float):
        return min(prompt_tokens, max(1, math.ceil(budget * prompt_tokens)))
    return min(prompt_tokens, budget)


class LayerBudget(abc.ABC):
    """Base of every ``budget`` policy: split an average per-layer budget across layers.

    ``allocate`` receives per-sequence tensors ``[B]``: ``capacity`` C (tokens per layer on average,
    recent window included), ``recent`` w and ``prompt_len`` L, and returns ``[num_layers, B]`` tokens
    per layer. ``cascading`` policies (CAKE) also take per-layer preferences and are re-run after every
    layer of the prompt pass.
    """

    cascading: ClassVar[bool] = False
    registry_name: ClassVar[str]  # set by ``@register("budget", name)``
    #: cascading policies: how many of the prompt's last queries give a layer's preference (0: none needed)
    window: int = 0

    def preference(self, window_probs: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Cascading policies: a layer's preference per sequence ``[B]`` from the attention of its last
        ``window`` prompt queries ``[B, H_kv, G, w, T]`` over the ``prefix`` slots ``[B, H_kv, T]`` (slots older
        than the window). Engines call it only when ``cascading`` is set."""
        raise NotImplementedError(f"{self.registry_name} is not a cascading layer budget; it has no preference")

    @abc.abstractmethod
    def allocate(
        self,
        capacity: torch.Tensor,
        recent: torch.Tensor,
        prompt_len: torch.Tensor,
        num_layers: int,
        preferences: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens per layer ``[num_layers, B]`` (``[len(preferences), B]`` for cascading policies)."""
