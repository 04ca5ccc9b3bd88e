"""Fit TeaCache's rescaling polynomial for a model (arXiv 2411.19108, section 3.3).

During uncached runs, record per step ``x`` = rel-L1 change of block 0's timestep-modulated input and
``y`` = rel-L1 change of the last block's output (the quantity caching must keep small); fit
``y ~ p(x)`` by least squares. The coefficients (highest power first, ``;``-separated) go to
``enable_cache(pipe, "teacache", coefficients=...)``.

    kvcache teacache-calibrate --runs 4 --steps 50          # on the trained digits DiT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kvcache.engine_adapters.diffusers.contracts import ArgAccess, contract_for, ordered_blocks
from kvcache.feature.base import rel_l1


def record_pairs(transformer: torch.nn.Module, run: Callable[[], Any]) -> list[tuple[float, float]]:
    """Run ``run()`` (one or more uncached generations) and return the ``(x, y)`` pairs of every step."""
    contract = contract_for(transformer)
    blocks = ordered_blocks(transformer, contract)
    first, last = blocks[0][0], blocks[-1][0]
    access = ArgAccess(first.forward)
    state: dict[str, Any] = {"m": None, "o": None, "shape": None}
    pairs: list[tuple[float, float]] = []
    pending: list[float] = []

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        def get(name: str) -> Any:
            return access.get(name, args, kwargs)

        m = contract.modulated(module, get) if contract.modulated is not None else None
        m = get("hidden_states") if m is None else m
        if state["m"] is not None and state["m"].shape == m.shape:
            pending.append(rel_l1(m, state["m"]))
        else:
            state["o"] = None  # a new run or resolution: no pair for this step
        state["m"] = m.detach()

    def post_hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        out = output if isinstance(output, torch.Tensor) else output[contract.returns[0] if contract.returns else 0]
        if state["o"] is not None and state["o"].shape == out.shape and pending:
            pairs.append((pending.pop(), rel_l1(out, state["o"])))
        pending.clear()
        state["o"] = out.detach()

    t_access = ArgAccess(transformer.forward)
    last_t: list[float | None] = [None]

    def new_request_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = t_access.get("timestep", args, kwargs)
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else (float(t) if t is not None else None)
        if t is not None and last_t[0] is not None and t > last_t[0]:  # the timestep went up: a new run
            state["m"] = state["o"] = None
        last_t[0] = t

    handles = [
        transformer.register_forward_pre_hook(new_request_hook, with_kwargs=True),
        first.register_forward_pre_hook(pre_hook, with_kwargs=True),
        last.register_forward_hook(post_hook),
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return pairs


def fit(pairs: list[tuple[float, float]], degree: int = 4) -> tuple[float, ...]:
    """Least-squares polynomial ``y ~ p(x)``, highest power first."""
    if len(pairs) <= degree:
        raise ValueError(f"need more than {degree} (x, y) pairs to fit a degree-{degree} polynomial, got {len(pairs)}")
    x, y = np.array(pairs, dtype=np.float64).T
    return tuple(float(c) for c in np.polyfit(x, y, degree))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=4, help="uncached generations (different seeds and classes)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--degree", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--output", default="eval/dit/weights/digits_teacache.json", help="where to write the fit")


def run(args: argparse.Namespace) -> int:
    from kvcache.eval.dit import digits

    torch.set_num_threads(1)
    model = digits.load_trained()

    def generate() -> None:
        for seed in range(args.runs):
            labels = (torch.arange(args.batch) + seed) % digits.NUM_CLASSES
            digits.sample(model, labels, steps=args.steps, guidance=args.guidance, seed=100 + seed)

    pairs = record_pairs(model, generate)
    coeffs = fit(pairs, args.degree)
    x, y = np.array(pairs).T
    residual = float(np.sqrt(np.mean((np.polyval(coeffs, x) - y) ** 2)))
    spec = ";".join(f"{c:.6g}" for c in coeffs)
    result = {"model": "digits DiT", "pairs": len(pairs), "degree": args.degree, "coefficients": spec,
              "rms_residual": residual, "steps": args.steps, "runs": args.runs}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f'use: enable_cache(pipe, "teacache", threshold=0.1, coefficients="{spec}")')
    return 0
