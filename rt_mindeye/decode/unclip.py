"""MindEye2's SDXL-unCLIP components as diffusers models: configs, the vector condition, builders.

The unCLIP UNet is SDXL's (``UNet2DConditionModel``) with two changes read from MindEyeV2's
``src/generative_models/configs/unclip6.yaml``: cross-attention takes the 256 x 1664 OpenCLIP ViT-bigG image tokens
(``context_dim: 1664`` instead of SDXL's 2048 text features), and the vector condition is only the Fourier features of
``original_size_as_tuple`` and ``crop_coords_top_left`` (``adm_in_channels: 1024`` = 4 scalars x 256, no pooled
text embedding). In diffusers terms that is ``addition_embed_type="text_time"`` with an empty ``text_embeds`` and
four ``time_ids``: the Fourier features (cos first, like sgm's ``timestep_embedding``) go through ``add_embedding``,
the same two-layer MLP as sgm's ``label_emb``. The model predicts noise on the legacy DDPM schedule (1000 steps,
scaled-linear betas 0.00085..0.012), like SDXL.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

# Real size, as the converter infers it from unclip6_epoch0_step110000.ckpt (see rt_mindeye.convert.unclip).
UNCLIP_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 96,  # 768 px / 8
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' name for the number of heads: channels / 64
    "cross_attention_dim": 1664,
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 1024,
}

# SDXL VAE (first_stage_model of the unCLIP checkpoint) and the SD 1.x VAE of MindEye2's blurry head share this shape.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.13025,
}

# The legacy DDPM schedule of LegacyDDPMDiscretization (sgm) = SDXL's scheduler settings.
DDPM_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def tiny_unet_config(**overrides: Any) -> dict[str, Any]:
    """A UNet with the unCLIP layout (attention on the deeper levels, text_time vector condition) that runs on a CPU
    in milliseconds: for tests and the CPU benchmark."""
    config = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (2, 4),
        "cross_attention_dim": 24,
        "use_linear_projection": True,
        "norm_num_groups": 8,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32,
    }
    config.update(overrides)
    return config


def tiny_vae_config(**overrides: Any) -> dict[str, Any]:
    """A 2-level AutoencoderKL (downsampling x2) for tests."""
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 16,
        "scaling_factor": 0.13025,
    }
    config.update(overrides)
    return config


def build_unet(config: Mapping[str, Any], *, seed: int | None = None):
    """A ``UNet2DConditionModel`` from ``config`` (random weights; seeded when ``seed`` is given), in eval mode."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return UNet2DConditionModel(**dict(config)).eval().requires_grad_(False)


def build_vae(config: Mapping[str, Any], *, seed: int | None = None):
    """An ``AutoencoderKL`` from ``config`` (random weights; seeded when ``seed`` is given), in eval mode."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return AutoencoderKL(**dict(config)).eval().requires_grad_(False)


def vector_condition(unet_config: Mapping[str, Any], batch: int, original_size: int = 768,
                     crop_top_left: tuple[int, int] = (0, 0), *, device=None, dtype=torch.float32
                     ) -> dict[str, torch.Tensor]:
    """``added_cond_kwargs`` for the unCLIP vector condition.

    ``time_ids`` = (original height, original width, crop top, crop left), as MindEye2 fills
    ``original_size_as_tuple`` (768, 768) and ``crop_coords_top_left`` (0, 0); ``text_embeds`` is whatever part of
    ``projection_class_embeddings_input_dim`` the scalar conditions do not fill, zero-width for MindEye2's UNet.
    """
    n_scalars = 4
    width = int(unet_config["projection_class_embeddings_input_dim"])
    text_width = width - n_scalars * int(unet_config["addition_time_embed_dim"])
    if text_width < 0:
        raise ValueError(f"projection_class_embeddings_input_dim {width} is smaller than 4 Fourier embeddings")
    time_ids = torch.tensor([[original_size, original_size, crop_top_left[0], crop_top_left[1]]],
                            dtype=torch.float32, device=device).repeat(batch, 1)
    text_embeds = torch.zeros(batch, text_width, dtype=dtype, device=device)
    return {"text_embeds": text_embeds, "time_ids": time_ids}


def vae_downsampling(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell of an AutoencoderKL (8 for the SD/SDXL VAEs)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def write_tiny_unclip_checkpoint(path, *, cross_attention_dim: int, seed: int = 0):
    """Write a tiny SDXL-unCLIP checkpoint in the generative-models layout (random weights, Lightning container)
    that the converter loads with MindEye2's own settings (64-channel heads, 256 Fourier features per vector-condition
    scalar, 32 norm groups), as the decoder service loads ``decoder.unclip_checkpoint``: for tests and CPU smoke runs.

    ``cross_attention_dim`` must be the token width of the model whose prior conditions it. Returns the path.
    """
    from pathlib import Path

    from rt_mindeye.convert.unclip import LDM_UNET_PREFIX, LDM_VAE_PREFIX, unet_to_ldm, vae_to_ldm

    unet_config = tiny_unet_config(block_out_channels=(32, 64), attention_head_dim=(1, 1),
                                   transformer_layers_per_block=(1, 1), norm_num_groups=32,
                                   cross_attention_dim=int(cross_attention_dim), addition_time_embed_dim=256,
                                   projection_class_embeddings_input_dim=4 * 256)
    vae_config = tiny_vae_config(block_out_channels=(32, 64), norm_num_groups=32)
    unet = build_unet(unet_config, seed=seed)
    vae = build_vae(vae_config, seed=seed + 1)
    state_dict = {LDM_UNET_PREFIX + k: v.contiguous() for k, v in unet_to_ldm(unet.state_dict(), unet_config).items()}
    state_dict.update({LDM_VAE_PREFIX + k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), vae_config).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict}, path)
    return path
