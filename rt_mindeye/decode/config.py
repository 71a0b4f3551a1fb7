"""Configuration of the decoding stage (section ``decode`` of the service YAML).

Sampling settings come in presets (:data:`PRESETS`): ``mindeye2`` is the reference, MindEye2's own reconstruction
(``recon_inference.ipynb`` + ``utils.unclip_recon``: Euler 38 steps, CFG 5, random-normal unconditional tokens,
prior DDIM 20 steps); ``fast`` is DPM-Solver++ 2M with Karras sigmas at 16 steps and otherwise the same. A
``reconstruction`` key set explicitly (not null) overrides its preset value. Which preset is the default, and why, is
in ``docs/decode.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rt_mindeye.config import setting

SCHEDULER_NAMES = ("euler", "euler-karras", "dpm++2m", "dpm++2m-karras", "unipc")
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
BLEND_MODES = ("refined", "always", "never")

# The sampling settings each preset fixes (keys of ReconstructConfig, plus the prior's DDIM steps).
PRESETS: dict[str, dict] = {
    "mindeye2": {"scheduler": "euler", "steps": 38, "guidance": 5.0, "unconditional": "noise", "prior_steps": 20},
    "fast": {"scheduler": "dpm++2m-karras", "steps": 16, "guidance": 5.0, "unconditional": "noise",
             "prior_steps": 20},
}
PRESET_NAMES = tuple(PRESETS)
DEFAULT_PRESET = "fast"
PRESET_FIELDS = ("scheduler", "steps", "guidance", "unconditional")


@dataclass(frozen=True)
class ReconstructConfig:
    """How the SDXL-unCLIP reconstruction runs: solver, steps, guidance, precision and output mapping."""

    scheduler: str | None = setting(None, "sampler; null = the preset's. 'euler' reproduces MindEye2's "
                                    "EulerEDMSampler on the legacy DDPM sigmas", choices=SCHEDULER_NAMES)
    steps: int | None = setting(None, "denoising steps; null = the preset's (mindeye2: 38, fast: 16)", min=1,
                                max=1000)
    guidance: float | None = setting(None, "classifier-free guidance scale; null = the preset's (5); 1 turns CFG "
                                     "off (one UNet pass per step)", min=0.0, max=50.0)
    unconditional: str | None = setting(None, "unconditional tokens for CFG; null = the preset's ('noise': "
                                        "standard normal from the trial's generator, as MindEye2's "
                                        "utils.unclip_recon draws them; 'zeros' is not what the model was used "
                                        "with)", choices=("zeros", "noise"))
    image_size: int = setting(768, "output side in pixels (latent side = image_size / 8)", min=16, max=2048)
    original_size: int = setting(768, "the 'original_size_as_tuple' vector condition (pixels)", min=1)
    crop_top_left: tuple[int, int] = setting((0, 0), "the 'crop_coords_top_left' vector condition (pixels)")
    offset_noise: float = setting(0.04, "per-sample constant added to the initial noise (MindEye2: 0.04)", min=0.0)
    output_mapping: str = setting("mindeye2", "VAE output -> [0, 1]: 'mindeye2' = 0.8*x + 0.2, 'standard' = "
                                  "(x + 1) / 2", choices=("mindeye2", "standard"))
    blurry_weight: float = setting(0.25, "weight of the blurry image in the final blend (MindEye2: 0.25)",
                                   min=0.0, max=1.0)
    blend: str = setting("refined", "when the blurry image is blended in: 'refined' (MindEye2's evaluation: only "
                         "refined reconstructions are blended, unrefined ones are shown as sampled), 'always' or "
                         "'never'", choices=BLEND_MODES)
    blurry_scaling_factor: float = setting(0.18215, "SD-VAE latent scale of the low-level head's 4x28x28 latent")
    device: str = setting("auto", "'auto' (cuda when present), 'cpu', 'cuda' or 'cuda:N'")
    unet_dtype: str = setting("auto", "UNet precision; auto = float16 on GPU, float32 on CPU", choices=DTYPE_NAMES)
    vae_dtype: str = setting("auto", "VAE precision; auto = bfloat16 on GPU (the SDXL VAE overflows in float16), "
                             "float32 on CPU", choices=DTYPE_NAMES)
    compile: str = setting("none", "UNet acceleration: 'none', 'torch' (torch.compile) or 'tensorrt' "
                           "(torch-tensorrt, optional)", choices=("none", "torch", "tensorrt"))

    def with_preset(self, name: str) -> "ReconstructConfig":
        """This config with every null sampling setting taken from preset ``name``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESET_NAMES)}")
        values = {key: PRESETS[name][key] for key in PRESET_FIELDS if getattr(self, key) is None}
        return dataclasses.replace(self, **values) if values else self

    @property
    def resolved(self) -> bool:
        return all(getattr(self, key) is not None for key in PRESET_FIELDS)


@dataclass(frozen=True)
class DecodeConfig:
    """The decoding stage: retrieval, optional reconstruction and blurry image."""

    top_k: int = setting(5, "number of retrieved candidates returned per trial", min=1)
    reconstruct: bool = setting(True, "run the unCLIP reconstruction when a reconstructor is configured")
    blurry: bool = setting(True, "decode the low-level head's latent when the model provides one")
    seed: int = setting(0, "base seed: each trial's prior and unCLIP noise come from generators seeded by "
                           "(seed, run, trial), so a replay reproduces its reconstructions", min=0)
    preset: str = setting(DEFAULT_PRESET, "sampling preset: 'mindeye2' (the reference: Euler 38 steps, CFG 5, "
                          "random-normal unconditional tokens, prior 20 steps) or 'fast' (DPM-Solver++ 2M Karras "
                          "16 steps, otherwise the same); explicit reconstruction keys override it",
                          choices=PRESET_NAMES)
    prior_steps: int | None = setting(None, "DDIM steps of the diffusion prior; null = the preset's (20)", min=1)
    reconstruction: ReconstructConfig = setting(default_factory=ReconstructConfig,
                                                doc="reconstruction settings")

    def __post_init__(self):
        # Frozen dataclass: fill the reconstruction's null sampling settings from the preset once, here.
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESET_NAMES)}, got {self.preset!r}")
        object.__setattr__(self, "reconstruction", self.reconstruction.with_preset(self.preset))
        if self.prior_steps is None:
            object.__setattr__(self, "prior_steps", int(PRESETS[self.preset]["prior_steps"]))
