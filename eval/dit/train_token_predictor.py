"""Train TokenCache's cache predictor on the digits DiT (kept frozen) against full-compute outputs.

    python -m kvcache.eval.dit.train_token_predictor

Uncached sampling runs record every block's input and output at every step; for a reuse distance
``k`` (1..3 steps) each token gives features (:func:`kvcache.feature.token_predictor.token_features`)
and the target ``log mean_c (y_t(s) - y_t(s-k))^2``. An MLP is fitted by MSE; the held-out Spearman
correlation between predicted and true reuse error is reported beside the training-free baseline
(input change alone). Writes ``eval/dit/weights/token_predictor.safetensors`` (a few KB).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvcache.eval.dit import digits
from kvcache.feature.token_predictor import TokenPredictor, token_features

OUTPUT = digits.WEIGHTS_DIR / "token_predictor.safetensors"


def collect(runs: int, steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = digits.load_trained()
    blocks = list(model.transformer_blocks)
    trace: dict[int, list[tuple[torch.Tensor, torch.Tensor, float]]] = {i: [] for i in range(len(blocks))}
    current_t = [0.0]
    handles = []
    for i, block in enumerate(blocks):
        def hook(module, args, kwargs, output, i=i):  # noqa: ANN001
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            trace[i].append((hidden.detach(), output.detach(), current_t[0]))

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    model.register_forward_pre_hook(
        lambda m, a, kw: current_t.__setitem__(0, float(kw["timestep"].flatten()[0])), with_kwargs=True)
    feats, targets = [], []
    for run in range(runs):
        for v in trace.values():
            v.clear()
        labels = (torch.arange(batch) + run) % digits.NUM_CLASSES
        digits.sample(model, labels, steps=steps, seed=1000 + run)
        for i, rows in trace.items():
            for s in range(1, len(rows)):
                for k in (1, 2, 3):
                    if s - k < 0:
                        continue
                    x, y, t = rows[s]
                    x0, y0, _ = rows[s - k]
                    feats.append(token_features(x, x0, t, i, len(blocks)))
                    targets.append(torch.log((y.float() - y0.float()).pow(2).mean(dim=(0, 2)) + 1e-10))
    for h in handles:
        h.remove()
    return torch.cat(feats), torch.cat(targets)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--output", default=str(OUTPUT))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = collect(args.runs, args.steps, args.batch)
    perm = torch.randperm(x.shape[0])
    split = int(0.8 * x.shape[0])
    train, test = perm[:split], perm[split:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    model = TokenPredictor()
    # fold the feature normalisation into the first layer so the saved network takes raw features
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(args.epochs):
        loss = torch.nn.functional.mse_loss(model((x[train] - mean) / std), y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        first = model.net[0]
        first.weight.div_(std)
        first.bias.sub_((first.weight * mean).sum(1))
        pred = model(x[test])
    result = {"samples": int(x.shape[0]), "test_mse": float(torch.nn.functional.mse_loss(pred, y[test])),
              "spearman_predictor": spearman(pred, y[test]), "spearman_input_change": spearman(x[test, 0], y[test])}
    from safetensors.torch import save_file

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output)
    Path(args.output).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
