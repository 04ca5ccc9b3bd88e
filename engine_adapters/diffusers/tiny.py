"""Tiny random-weight diffusers pipelines of every supported architecture, built offline (no download).

Used by the adapter tests: each builder returns ``(pipeline, call_kwargs)``; the pipeline runs a few
steps on the CPU in well under a second and returns latents (no VAE decode) except DiT. Text encoders are replaced by fixed random prompt embeddings.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def _vae_2d(channels: int = 4) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4,
        layers_per_block=1,
    )


def _embeds(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dit() -> tuple[Any, dict]:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1,
    )
    pipe = DiTPipeline(transformer=transformer, vae=_vae_2d(), scheduler=DDIMScheduler())
    return pipe, {"class_labels": [1, 2], "guidance_scale": 2.0, "output_type": "np"}


def pixart() -> tuple[Any, dict]:
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=32, norm_num_groups=1,
    )
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae_2d(), transformer=transformer,
                               scheduler=DDIMScheduler())
    kwargs = {"prompt_embeds": _embeds(1, 5, 32), "prompt_attention_mask": torch.ones(1, 5, dtype=torch.long),
              "negative_prompt": None, "negative_prompt_embeds": _embeds(1, 5, 32, seed=8),
              "negative_prompt_attention_mask": torch.ones(1, 5, dtype=torch.long),
              "height": 16, "width": 16, "guidance_scale": 2.0, "output_type": "latent", "use_resolution_binning": False}
    return pipe, kwargs


def latte() -> tuple[Any, dict]:
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    torch.manual_seed(0)
    transformer = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=32, video_length=2,
    )
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=_vae_2d(), transformer=transformer,
                         scheduler=DDIMScheduler())
    kwargs = {"prompt_embeds": _embeds(1, 5, 32), "negative_prompt": None, "negative_prompt_embeds": _embeds(1, 5, 32, seed=8),
              "height": 16, "width": 16, "video_length": 2, "guidance_scale": 2.0, "output_type": "latent",
              "mask_feature": False, "clean_caption": False}
    return pipe, kwargs


def cogvideox() -> tuple[Any, dict]:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=3, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    kwargs = {"prompt_embeds": _embeds(1, 6, 16), "negative_prompt_embeds": _embeds(1, 6, 16, seed=8),
              "height": 16, "width": 16, "num_frames": 5, "guidance_scale": 2.0, "output_type": "latent",
              "max_sequence_length": 6}
    return pipe, kwargs


def flux() -> tuple[Any, dict]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )
    vae = _vae_2d(1)
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    kwargs = {"prompt_embeds": _embeds(1, 5, 16), "pooled_prompt_embeds": _embeds(1, 16, seed=9),
              "negative_prompt_embeds": _embeds(1, 5, 16, seed=8), "negative_pooled_prompt_embeds": _embeds(1, 16, seed=10),
              "true_cfg_scale": 2.0, "height": 16, "width": 16, "output_type": "latent", "max_sequence_length": 5}
    return pipe, kwargs


def wan() -> tuple[Any, dict]:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    kwargs = {"prompt_embeds": _embeds(1, 5, 16), "negative_prompt_embeds": _embeds(1, 5, 16, seed=8),
              "height": 16, "width": 16, "num_frames": 5, "guidance_scale": 2.0, "output_type": "latent",
              "max_sequence_length": 5}
    return pipe, kwargs


def _eval(builder: Callable[[], tuple[Any, dict]]) -> Callable[[], tuple[Any, dict]]:
    """Constructors leave modules in training mode (class-label dropout is random there): switch to eval."""

    def build() -> tuple[Any, dict]:
        pipe, kwargs = builder()
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()
        pipe.set_progress_bar_config(disable=True)
        return pipe, kwargs

    build.__name__ = builder.__name__
    return build


BUILDERS: dict[str, Callable[[], tuple[Any, dict]]] = {
    "DiTTransformer2DModel": _eval(dit),
    "PixArtTransformer2DModel": _eval(pixart),
    "LatteTransformer3DModel": _eval(latte),
    "CogVideoXTransformer3DModel": _eval(cogvideox),
    "FluxTransformer2DModel": _eval(flux),
    "WanTransformer3DModel": _eval(wan),
}
