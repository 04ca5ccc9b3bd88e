"""Head budgets: how a layer's budget splits over its KV heads.

``uniform`` (the default): every KV head of a layer keeps the layer's budget C.

``adaptive`` -- Ada-KV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference", arXiv 2407.11550). With C tokens per head on average (H KV heads, a total
of C * H), the layer keeps the top C * H slots by the policy's scores over *all its heads jointly*, so
head h keeps C_h slots with sum_h C_h = C * H: heads whose attention is concentrated give their budget
to heads whose attention is spread. Safeguard (Ada-KV's, as in kvpress's ``AdaKVPress``): before the
joint selection each head's top floor(alpha * C) slots are guaranteed (default alpha = 0.2), so no head is
starved. Scores are compared as the scorer defines them (SnapKV's attention sums, KNorm's -||k||, ...);
the protected slots (sinks, recent window) are kept in every head, as in the uniform split.

Specs: ``"uniform"``, ``"adaptive"``, ``"adaptive:alpha=0.5"`` (one string on every surface). This is a
validated parameter of the engine adapters rather than a registry kind: it has two members, one number,
and only the Hugging Face adapter can store per-head counts (vLLM keeps one block table for all heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.registry import PolicyConfigError, check_float, coerce, parse_spec
from kvcache.selector import effective_scores

HEAD_BUDGETS = ("uniform", "adaptive")
DEFAULT_ALPHA = 0.2  # Ada-KV's safeguard share (kvpress AdaKVPress.alpha_safeguard)


@dataclass(frozen=True)
class HeadBudget:
    """A parsed head-budget setting: ``name`` in :data:`HEAD_BUDGETS`, ``alpha`` the safeguard share."""

    name: str = "uniform"
    alpha: float = DEFAULT_ALPHA

    @property
    def adaptive(self) -> bool:
        return self.name == "adaptive"

    @property
    def spec(self) -> str:
        """The string that parses back to this setting."""
        if not self.adaptive or self.alpha == DEFAULT_ALPHA:
            return self.name
        return f"{self.name}:alpha={self.alpha:g}"


def parse_head_budget(spec: str | dict | HeadBudget | None) -> HeadBudget:
    """Read ``"uniform"``, ``"adaptive"`` or ``"adaptive:alpha=0.3"`` (``None``: uniform); a bad name or
    parameter raises :class:`~kvcache.registry.PolicyConfigError` naming the choices."""
    if spec is None:
        return HeadBudget()
    if isinstance(spec, HeadBudget):
        return spec
    name, params = parse_spec(spec)
    if name not in HEAD_BUDGETS:
        raise PolicyConfigError(f"unknown head budget {name!r}; valid head budgets: {', '.join(HEAD_BUDGETS)}")
    allowed = {"alpha"} if name == "adaptive" else set()
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise PolicyConfigError(
            f"head budget {name!r} has no parameter(s) {', '.join(unknown)}; "
            f"valid parameters: {', '.join(sorted(allowed)) or '(none)'}"
        )
    alpha = coerce(params.get("alpha", DEFAULT_ALPHA), float, "head budget 'adaptive' parameter 'alpha'")
    if isinstance(alpha, int) and not isinstance(alpha, bool):
        alpha = float(alpha)
    check_float("head budget adaptive alpha (the safeguard share of a head's mean budget)", alpha, 0.0, 1.0)
    return HeadBudget(name, alpha)


def within_head_rank(ranked: torch.Tensor, key_index: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, T]`` each slot's rank within its head by ``ranked`` score (0 = best); equal scores go to the
    more recent token when ``key_index`` is given (the selector's tie rule)."""
    t = ranked.shape[-1]
    if key_index is None:
        order = ranked.sort(dim=-1, descending=True, stable=True).indices
    else:
        newest_first = key_index.argsort(dim=-1, descending=True, stable=True)
        order = newest_first.gather(-1, ranked.gather(-1, newest_first).sort(dim=-1, descending=True, stable=True).indices)
    arange = torch.arange(t, device=ranked.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, arange)


def adaptive_head_budgets(
    scores: torch.Tensor,
    valid: torch.Tensor,
    protected: torch.Tensor,
    layer_budget: torch.Tensor | int,
    alpha: float = DEFAULT_ALPHA,
    key_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ada-KV's split of a layer budget over KV heads: ``[B, H]`` slots each head keeps.

    ``scores``, ``valid``, ``protected`` are ``[B, H, T]`` (the selector's inputs); ``layer_budget`` is C,
    the tokens per head on average, per sequence ``[B]`` or one int. Each head's top floor(alpha * C)
    slots and its protected slots are guaranteed; the rest of the C * H total goes to the best-scoring
    slots over all heads jointly. A head never keeps more slots than it has real tokens, so the counts sum
    to min(C * H, real tokens). No host read: the counts stay on the device.
    """
    b, h, t = scores.shape
    ranked = effective_scores(scores, valid, protected)  # protected +inf, padding/empty -inf
    per_head = torch.as_tensor(layer_budget, device=scores.device).reshape(-1).expand(b).clamp(max=t)
    safe = (per_head.double() * alpha).floor().long()  # floor(alpha * C), as kvpress's int(n_kept * alpha)
    guaranteed = (within_head_rank(ranked, key_index) < safe[:, None, None]) & valid
    joint = torch.where(guaranteed, float("inf"), ranked)
    if key_index is not None:  # equal scores: the more recent token first (a chosen slot's head is unchanged)
        joint = joint.gather(-1, key_index.argsort(dim=-1, descending=True, stable=True))
    by_score = joint.reshape(b, h * t).sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(h * t, device=scores.device)
    chosen = (rank < (per_head * h)[:, None]) & (by_score.values > float("-inf"))
    head_of = torch.div(by_score.indices, t, rounding_mode="floor")
    return torch.zeros(b, h, dtype=torch.long, device=scores.device).scatter_add_(1, head_of, chosen.long())


def uniform_head_budgets(valid: torch.Tensor, layer_budget: torch.Tensor | int) -> torch.Tensor:
    """The uniform split: every head keeps min(C, its real tokens), ``[B, H]``."""
    b = valid.shape[0]
    per_head = torch.as_tensor(layer_budget, device=valid.device).reshape(-1).expand(b)
    return torch.minimum(valid.sum(dim=-1), per_head[:, None])

