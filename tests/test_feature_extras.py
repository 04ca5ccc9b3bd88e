"""Metrics, TeaCache calibration and the TokenCache predictor (small, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import kvcache
from kvcache.feature.token_predictor import TokenPredictor, load_predictor, token_features
from kvcache.registry import PolicyConfigError

PREDICTOR = Path(__file__).resolve().parents[1] / "eval" / "dit" / "weights" / "token_predictor.safetensors"


def test_metrics_against_hand_computed_values() -> None:
    from kvcache.eval.dit.metrics import psnr, quality, ssim

    a = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert quality(a, a) == {"mse": 0.0, "psnr": math.inf, "ssim": pytest.approx(1.0)}
    b = (a + 0.1).clamp(0, 1)
    err = float(((a - b) ** 2).mean())
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / err))
    noisy = (a + 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert ssim(a, noisy) < ssim(a, (a + 0.05).clamp(0, 1)) < 1.0
    with pytest.raises(ValueError, match="ssim"):
        ssim(a, a[0])


def test_teacache_fit_recovers_a_known_polynomial() -> None:
    pytest.importorskip("diffusers")
    from kvcache.eval.teacache_calibrate import fit

    xs = np.linspace(0.01, 0.5, 40)
    coeffs = fit([(x, 3 * x**2 - 0.5 * x + 0.2) for x in xs], degree=2)
    assert coeffs == pytest.approx((3.0, -0.5, 0.2), abs=1e-6)
    with pytest.raises(ValueError, match="pairs"):
        fit([(0.1, 0.1)], degree=4)


def test_teacache_pairs_recorded_on_a_real_pipeline() -> None:
    pytest.importorskip("diffusers")
    from kvcache.engine_adapters.diffusers import tiny
    from kvcache.eval.teacache_calibrate import record_pairs

    torch.set_num_threads(1)
    pipe, kwargs = tiny.BUILDERS["PixArtTransformer2DModel"]()
    pairs = record_pairs(pipe.transformer, lambda: pipe(num_inference_steps=6, **kwargs))
    assert len(pairs) == 5  # one per step after the first
    assert all(x > 0 and y > 0 for x, y in pairs)


def test_token_predictor_features_and_loading(tmp_path: Path) -> None:
    x0 = torch.randn(2, 6, 8)
    x1 = x0.clone()
    x1[:, 3] += 1.0
    feats = token_features(x1, x0, 500.0, 2, 8)
    assert feats.shape == (6, 4) and int(feats[:, 0].argmax()) == 3
    assert feats[0, 2] == pytest.approx(0.5) and feats[0, 3] == pytest.approx(0.25)
    with pytest.raises(PolicyConfigError, match="does not exist"):
        kvcache.create("feature", "tokencache", importance="predictor", predictor=str(tmp_path / "none.safetensors"))
    safetensors = pytest.importorskip("safetensors.torch")
    model = TokenPredictor(8)
    path = tmp_path / "p.safetensors"
    safetensors.save_file(model.state_dict(), str(path))
    loaded = load_predictor(str(path))
    assert torch.equal(loaded(feats), model(feats))


def test_shipped_predictor_drives_tokencache() -> None:
    policy = kvcache.create("feature", "tokencache", importance="predictor", predictor=str(PREDICTOR), k1=3, k2=3,
                            blocks=1.0)
    cache = policy.new_cache(["block"] * 3, num_steps=6)
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(8, 8, generator=g) / 3 for _ in range(3)]
    x = torch.randn(1, 10, 8, generator=g)
    for step in range(6):
        cache.begin_step(1000.0 - 150 * step)
        h = x + 0.05 * step
        for i in range(3):
            def compute(inp, tokens, i=i):
                src = inp[0] if tokens is None else inp[0][:, tokens]
                return (src + torch.tanh(src @ w[i]),)

            h = cache.run_block(i, (h,), compute)[0]
    assert 0 < cache.stats()["fraction_skipped"] < 1
