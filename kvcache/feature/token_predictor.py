"""TokenCache's cache predictor (arXiv 2409.18523, section 3.2): a small network that scores each token
of a block by how much reusing its cached value would hurt, trained with the DiT frozen against the
full-compute outputs (``python -m kvcache.eval.dit.train_token_predictor``).

Per token ``t`` of block ``l`` at a cache step, with ``x`` the block input now and ``x'`` at the block's
last computation, the features are ``log mean_c (x_t - x'_t)^2``, ``log mean_c x_t^2``, the timestep
(/1000) and ``l / L``; an MLP (4 -> hidden -> 1) predicts ``log mean_c (y_t - y'_t)^2``, the error of
reusing the cached output ``y'``. Higher score = recompute first.
"""

from __future__ import annotations

import torch

from kvcache.feature.base import StepInfo

FEATURES = 4


def token_features(x_now: torch.Tensor, x_before: torch.Tensor, timestep: float | None, index: int, blocks: int) -> torch.Tensor:
    """``[N, 4]`` features of the ``N`` tokens (dim 1) of a ``[B, N, C]`` block input, averaged over the batch."""
    change = (x_now.float() - x_before.float()).pow(2).mean(dim=(0, 2))
    energy = x_now.float().pow(2).mean(dim=(0, 2))
    n = change.shape[0]
    t = torch.full((n,), (timestep or 0.0) / 1000.0)
    depth = torch.full((n,), index / max(blocks, 1))
    return torch.stack([torch.log(change + 1e-10), torch.log(energy + 1e-10), t, depth], dim=1)


class TokenPredictor(torch.nn.Module):
    """MLP over :func:`token_features`; :meth:`score` returns one score per token."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)

    @torch.no_grad()
    def score(self, x_now: torch.Tensor, x_before: torch.Tensor, info: StepInfo, index: int, blocks: int) -> torch.Tensor:
        return self(token_features(x_now, x_before, info.timestep, index, blocks))


def load_predictor(path: str) -> TokenPredictor:
    """Load a predictor written by ``kvcache.eval.dit.train_token_predictor`` (safetensors)."""
    from pathlib import Path

    from kvcache.registry import PolicyConfigError

    if not Path(path).exists():
        raise PolicyConfigError(f"tokencache predictor {path!r} does not exist; train one with "
                                "python -m kvcache.eval.dit.train_token_predictor")
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise PolicyConfigError("loading a tokencache predictor needs safetensors (pip install safetensors)") from err
    state = load_file(path)
    hidden = state["net.0.weight"].shape[0]
    model = TokenPredictor(hidden)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()
