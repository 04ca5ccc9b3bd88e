"""Image quality of a cached output against the uncached output from the same seed: MSE, PSNR, SSIM.

Images are ``[B, C, H, W]`` tensors in [0, 1]. SSIM uses an 11x11 Gaussian window (sigma 1.5) with
the standard constants (Wang et al., 2004), averaged over images and channels; windows are cropped to
the image for images smaller than 11 pixels.
"""

from __future__ import annotations

import math

import torch


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images)."""
    err = mse(a, b)
    return math.inf if err == 0.0 else 10.0 * math.log10(data_range**2 / err)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (1.0 for identical images)."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two [B, C, H, W] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    size = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, size, size).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, kernel, groups=a.shape[1])

    x, y = a.double(), b.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


def quality(cached: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """MSE, PSNR and SSIM of ``cached`` against ``reference`` (both in [0, 1])."""
    return {"mse": mse(cached, reference), "psnr": psnr(cached, reference), "ssim": ssim(cached, reference)}
