"""Configuration of the decoding stage (section ``decode`` of the service YAML)."""

from __future__ import annotations

from dataclasses import dataclass

from rt_mindeye.config import setting

SCHEDULER_NAMES = ("euler", "euler-karras", "dpm++2m", "dpm++2m-karras", "unipc")
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ReconstructConfig:
    """How the SDXL-unCLIP reconstruction runs: solver, steps, guidance, precision and output mapping."""

    scheduler: str = setting("dpm++2m-karras", "sampler; 'euler' reproduces MindEye2's EulerEDMSampler on the "
                             "legacy DDPM sigmas", choices=SCHEDULER_NAMES)
    steps: int = setting(16, "denoising steps (MindEye2: 38 Euler steps)", min=1, max=1000)
    guidance: float = setting(5.0, "classifier-free guidance scale; 1 turns CFG off (one UNet pass per step)",
                              min=0.0, max=50.0)
    unconditional: str = setting("zeros", "unconditional tokens for CFG: 'zeros' or 'noise' (standard normal, as "
                                 "MindEye2's utils.unclip_recon draws them)", choices=("zeros", "noise"))
    image_size: int = setting(768, "output side in pixels (latent side = image_size / 8)", min=16, max=2048)
    original_size: int = setting(768, "the 'original_size_as_tuple' vector condition (pixels)", min=1)
    crop_top_left: tuple[int, int] = setting((0, 0), "the 'crop_coords_top_left' vector condition (pixels)")
    offset_noise: float = setting(0.04, "per-sample constant added to the initial noise (MindEye2: 0.04)", min=0.0)
    output_mapping: str = setting("mindeye2", "VAE output -> [0, 1]: 'mindeye2' = 0.8*x + 0.2, 'standard' = "
                                  "(x + 1) / 2", choices=("mindeye2", "standard"))
    blurry_weight: float = setting(0.25, "weight of the blurry image in the final blend (MindEye2: 0.25)",
                                   min=0.0, max=1.0)
    blurry_scaling_factor: float = setting(0.18215, "SD-VAE latent scale of the low-level head's 4x28x28 latent")
    device: str = setting("auto", "'auto' (cuda when present), 'cpu', 'cuda' or 'cuda:N'")
    unet_dtype: str = setting("auto", "UNet precision; auto = float16 on GPU, float32 on CPU", choices=DTYPE_NAMES)
    vae_dtype: str = setting("auto", "VAE precision; auto = bfloat16 on GPU (the SDXL VAE overflows in float16), "
                             "float32 on CPU", choices=DTYPE_NAMES)
    compile: str = setting("none", "UNet acceleration: 'none', 'torch' (torch.compile) or 'tensorrt' "
                           "(torch-tensorrt, optional)", choices=("none", "torch", "tensorrt"))


@dataclass(frozen=True)
class DecodeConfig:
    """The decoding stage: retrieval, optional reconstruction and blurry image."""

    top_k: int = setting(5, "number of retrieved candidates returned per trial", min=1)
    reconstruct: bool = setting(True, "run the unCLIP reconstruction when a reconstructor is configured")
    blurry: bool = setting(True, "decode the low-level head's latent when the model provides one")
    seed: int = setting(0, "seed of the reconstruction noise; trial i uses seed + i", min=0)
    reconstruction: ReconstructConfig = setting(default_factory=ReconstructConfig,
                                                doc="reconstruction settings")
