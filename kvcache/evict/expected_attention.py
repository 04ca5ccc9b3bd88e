"""Expected Attention (NVIDIA kvpress's ExpectedAttentionPress; Devoto et al., "Expected Attention: KV Cache
Compression by Estimating Attention from Future Queries Distribution", arXiv 2510.00636).

Query-agnostic, prompt only: the queries still to come are modelled as q ~ N(mu, Sigma), with mu and Sigma
the mean and covariance of the last ``query_window`` prompt queries of each query head (sinks and padding
left out). For a Gaussian q, E[exp(s q.k)] = exp(s mu.k + s^2 k^T Sigma k / 2) (s = 1/sqrt(d)), so each slot's
expected attention is

    a_j = softmax_j( mu.k_j / sqrt(d) + k_j^T Sigma k_j / (2 d) )

over the layer's slots after the sinks, averaged over the query heads of a KV group (one selection per KV
head), then weighted by the value norm, s_j = (a_j + epsilon) ||v_j||_2 (``use_vnorm``, as kvpress).
``use_covariance=false`` drops the Sigma term (the mean only). Defaults follow kvpress (covariance and
value norm on, epsilon 0, 4 sinks kept and left out of the statistics and the softmax, no recent window)
except ``query_window``: 32, not every prompt query, chosen by sweep on SmolLM2-135M (kvlong pass key,
multi-key and QA at 1K, 8 samples each, budget 0.5, as a share of the full cache's mean): every prompt
query keeps 5%, the last 32 35%. Statistics over the whole prompt are mostly the context's queries; the
last 32 are those of the question and answer prefix that end each prompt. 32 is also what the vLLM engine
holds of a prompt.

What differs from kvpress: kvpress takes the statistics of the *pre-RoPE* queries (every prompt token after
the sinks) and rotates mu and Sigma by the RoPE rotation averaged over the next ``n_future_positions`` (512)
positions. An :class:`~kvcache.evict.base.Observation` carries post-RoPE queries and keys only, not the
model's rotary frequencies (nor its partial-rotary or scaling variant), so that forward rotation cannot be
done here. The statistics are those of the observed post-RoPE queries instead: their mean already averages
the rotation over the window's positions (high-frequency pairs average out, as they do under kvpress's
averaged rotation, but over the last ``query_window`` positions rather than the next 512), and their
covariance includes the spread the rotation adds (the mixture kvpress describes as an alternative to the
averaged rotation). The ||v|| weighting needs the engine to pass values; the Hugging Face adapter does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.attention.scoring import CHUNK_ELEMENTS
from kvcache.evict.base import EvictionPolicy, Observation
from kvcache.registry import PolicyConfigError, param, register


def first_real_index(obs: Observation) -> torch.Tensor:
    """``[B]`` logical position of each sequence's first real slot (after left padding)."""
    beyond = torch.iinfo(obs.key_index.dtype).max
    return torch.where(obs.key_valid, obs.key_index, beyond).flatten(1).min(dim=-1).values


def real_queries(obs: Observation) -> torch.Tensor:
    """``[B, q]`` True where a query is a real token: a valid slot of the first KV head sits at its position."""
    present = torch.where(obs.key_valid[:, 0], obs.key_index[:, 0], -1).sort(dim=-1).values
    at = torch.searchsorted(present, obs.query_index.contiguous()).clamp_(max=present.shape[-1] - 1)
    return present.gather(-1, at) == obs.query_index


def query_statistics(
    queries: torch.Tensor, used: torch.Tensor, covariance: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean ``[B, H_q, D]`` and covariance ``[B, H_q, D, D]`` (1/n, as kvpress) of the ``used [B, q]``
    queries of ``queries [B, H_q, q, D]``; zeros where a sequence has none."""
    weights = used.float()[:, None, :, None]  # [B, 1, q, 1]
    count = weights.sum(dim=2).clamp(min=1.0)  # [B, 1, 1]
    q = queries.float()
    mean = (q * weights).sum(dim=2) / count
    if not covariance:
        return mean, None
    centred = (q - mean[:, :, None]) * weights
    return mean, centred.transpose(-1, -2) @ centred / count[..., None]


def expected_logits(
    keys: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """s mu.k_j + s^2 k_j^T Sigma k_j / 2 per query head, ``[B, H_kv, G, T]`` fp32, chunked over the slots.

    ``keys [B, H_kv, T, D]``; ``mean [B, H_q, D]`` and ``cov [B, H_q, D, D]`` (None: the mean term only)."""
    b, h_kv, t, d = keys.shape
    group = mean.shape[1] // h_kv
    mu = mean.reshape(b, h_kv, group, d)
    sigma = None if cov is None else cov.reshape(b, h_kv, group, d, d)
    out = torch.empty(b, h_kv, group, t, dtype=torch.float32, device=keys.device)
    step = max(1, CHUNK_ELEMENTS // max(1, b * h_kv * group * d))
    for start in range(0, t, step):
        k = keys[:, :, start : start + step].float()  # [B, H_kv, t', D]
        logits = (mu @ k.transpose(-1, -2)) * scaling  # [B, H_kv, G, t']
        if sigma is not None:
            k_sigma = k[:, :, None] @ sigma  # [B, H_kv, G, t', D]
            logits += (k_sigma * k[:, :, None]).sum(dim=-1) * (scaling * scaling / 2)
        out[..., start : start + step] = logits
    return out


@register("evict", "expected-attention")
@dataclass
class ExpectedAttention(EvictionPolicy):
    """Attention expected from future queries modelled as a Gaussian, times ||v||, at the prompt (kvpress)."""

    query_window: int | None = param(
        32, "last prompt queries whose mean and covariance model future queries (None: every prompt query after the sinks, as kvpress)"
    )
    window: int | float = param(0, "recent tokens kept: int tokens or fraction of the budget")
    sinks: int = param(4, "first tokens always kept, left out of the statistics and the softmax (kvpress n_sink)")
    use_covariance: bool = param(True, "add the k^T Sigma k / 2d term (false: the mean only)")
    use_vnorm: bool = param(True, "weight scores by ||v||: (score + epsilon) * ||v||")
    epsilon: float = param(0.0, "added to the expected attention before the ||v|| weighting")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query_window is not None and (
            isinstance(self.query_window, bool) or not isinstance(self.query_window, int) or self.query_window < 1
        ):
            raise PolicyConfigError(
                f"expected-attention query_window must be an int >= 1 (prompt queries) or None (all), got {self.query_window!r}"
            )
        for flag in ("use_covariance", "use_vnorm"):
            if not isinstance(getattr(self, flag), bool):
                raise PolicyConfigError(f"expected-attention {flag} must be true or false, got {getattr(self, flag)!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or self.epsilon < 0:
            raise PolicyConfigError(f"expected-attention epsilon must be a number >= 0, got {self.epsilon!r}")

    def observed_prompt_queries(self, prompt_len: int) -> int:
        return prompt_len if self.query_window is None else min(self.query_window, prompt_len)

    def score(self, obs: Observation, previous: torch.Tensor | None) -> torch.Tensor:
        if obs.keys is None:
            raise RuntimeError("expected-attention scores the keys; this engine passed attention probabilities only")
        if self.use_vnorm and obs.values is None:
            raise PolicyConfigError(
                "expected-attention: this engine passes no values to the policy, so the ||v|| weighting cannot be "
                "applied; set use_vnorm=false"
            )
        first = first_real_index(obs)  # [B]
        n = obs.queries.shape[2] if self.query_window is None else min(self.query_window, obs.queries.shape[2])
        queries, query_index = obs.queries[:, :, -n:], obs.query_index[:, -n:]
        used = real_queries(obs)[:, -n:] & (query_index >= first[:, None] + self.sinks)
        mean, cov = query_statistics(queries, used, self.use_covariance)
        logits = expected_logits(obs.keys, mean, cov, obs.scaling)  # [B, H_kv, G, T]
        if obs.key_bias is not None:  # a positional bias (ALiBi) as seen from the prompt's end, where queries come next
            logits += obs.key_bias.view(logits.shape)
        counted = obs.key_valid & (obs.key_index >= first[:, None, None] + self.sinks)  # [B, H_kv, T]
        logits = logits.masked_fill(~counted[:, :, None], float("-inf"))
        scores = torch.softmax(logits, dim=-1).nan_to_num_(0.0).mean(dim=2)  # a row with nothing counted: 0
        if self.use_vnorm:
            scores = (scores + self.epsilon) * torch.linalg.vector_norm(obs.values.float(), dim=-1)
        return scores
