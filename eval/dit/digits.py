"""The small trained DiT used for caching-quality numbers: class-conditional, 16x16 grayscale digits.

Data: scikit-learn's 8x8 digit images (shipped with the package, no download), upsampled bilinearly to
16x16 and scaled to [-1, 1]. Model: diffusers ``DiTTransformer2DModel`` (patch 4, so 16 tokens), trained
to predict the clean image (``prediction_type="sample"``, which a model this small learns far better
than epsilon at low noise) on a 1000-step cosine DDPM schedule by ``python -m kvcache.eval.dit.train_digits``;
weights ship as ``eval/dit/weights/digits_dit.safetensors`` (float16) beside its config JSON.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS = WEIGHTS_DIR / "digits_dit.safetensors"
CONFIG = WEIGHTS_DIR / "digits_dit.json"
NUM_CLASSES = 10  # the null (unconditional) class is index 10
MODEL_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 1, "out_channels": 1, "num_layers": 8,
    "sample_size": 16, "patch_size": 4, "num_embeds_ada_norm": NUM_CLASSES, "norm_num_groups": 1,
}


SCHEDULE: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}


def load_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as ``[N, 1, size, size]`` floats in [-1, 1] and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images * 2.0 - 1.0, torch.tensor(data.target, dtype=torch.long)


def build_model(config: dict[str, Any] | None = None) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**(config or MODEL_CONFIG))


def load_trained(path: Path = WEIGHTS) -> torch.nn.Module:
    """The shipped trained DiT (float32, eval mode). Raises with the training command when weights are missing."""
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; train it with: python -m kvcache.eval.dit.train_digits")
    config_path = path.with_suffix(".json")
    config = json.loads(config_path.read_text())["model"] if config_path.exists() else MODEL_CONFIG
    model = build_model(config)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.eval()


def make_scheduler(kind: str = "ddim") -> Any:
    """The training schedule (:data:`SCHEDULE`) with a DDIM (default) or DPM-Solver sampler."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[kind]
    return cls(**SCHEDULE)


@contextlib.contextmanager
def denoise_context(model: torch.nn.Module, name: str) -> Iterator[None]:
    """``model.cache_context(name)`` where the model has it; otherwise set the context diffusers' cache
    hooks read (``DiTTransformer2DModel`` is not a ``CacheMixin`` but its blocks take diffusers hooks)."""
    if hasattr(model, "cache_context"):
        with model.cache_context(name):
            yield
        return
    try:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
    except ImportError:  # an older diffusers without cache contexts
        yield
        return
    if not any(hasattr(m, "_diffusers_hook") for m in model.modules()):  # no diffusers hook: nothing reads it
        yield
        return
    _set_cache_context(model, CacheContext(name))
    try:
        yield
    finally:
        _set_cache_context(model, None)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    labels: torch.Tensor,
    steps: int = 50,
    guidance: float = 1.5,
    seed: int = 0,
    scheduler: Any = None,
    size: int = 16,
) -> torch.Tensor:
    """Class-conditional sampling with batched classifier-free guidance; returns ``[B, 1, size, size]`` in [-1, 1].

    The transformer is called inside a ``"cond_uncond"`` cache context so diffusers' own cache hooks work too.
    """
    scheduler = scheduler or make_scheduler()
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(labels.shape[0], 1, size, size, generator=gen)
    null = torch.full_like(labels, NUM_CLASSES)
    class_in = torch.cat([labels, null]) if guidance != 1.0 else labels
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if guidance != 1.0 else x
        with denoise_context(model, "cond_uncond"):
            pred = model(x_in, timestep=t.expand(x_in.shape[0]), class_labels=class_in).sample
        if guidance != 1.0:
            cond, uncond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        x = scheduler.step(pred, t, x).prev_sample
    return x.clamp(-1, 1)
