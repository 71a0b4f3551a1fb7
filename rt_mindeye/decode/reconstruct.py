"""Image reconstruction from diffusion-prior tokens with MindEye2's SDXL-unCLIP, and the blurry low-level image.

:class:`UnclipReconstructor` composes a diffusers ``UNet2DConditionModel`` (unCLIP layout, see
:mod:`rt_mindeye.decode.unclip`), an ``AutoencoderKL`` and any diffusers scheduler, and shows its loop:

1. check inputs;  2. conditioning (prior tokens, unconditional tokens, vector condition);  3. timesteps;
4. initial noise;  5. denoising loop with classifier-free guidance;  6. VAE decode;  7. blend with the blurry image.

MindEye2 (``utils.unclip_recon``) samples 38 Euler steps at CFG 5 with random-normal unconditional tokens and maps
the VAE output with ``0.8 x + 0.2``: the ``mindeye2`` preset of :mod:`rt_mindeye.decode.config`; ``fast`` swaps the
solver for a second-order multistep one with 16 steps. Every random draw of a call (unconditional tokens, initial
noise, offset noise) comes, in that order, from one CPU generator seeded with the call's ``seed``, so a seed gives
the same image on every call on the same device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rt_mindeye.decode import accel
from rt_mindeye.decode.config import DEFAULT_PRESET, ReconstructConfig
from rt_mindeye.decode.schedulers import make_scheduler
from rt_mindeye.decode.unclip import vae_downsampling, vector_condition
from rt_mindeye.errors import ConfigError, RtMindEyeError


class ReconstructionInputError(RtMindEyeError):
    """Prior tokens, blurry images or latents have the wrong shape or contents."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"reconstruction input {field}: {problem}")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, *, gpu_default: torch.dtype) -> torch.dtype:
    if name == "auto":
        return gpu_default if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to device and precision (through ``nn.Module.to``: diffusers' override warns on every dtype cast)."""
    return torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_float_tensor(array, field_name: str) -> torch.Tensor:
    if isinstance(array, np.ndarray):
        array = torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(array, torch.Tensor):
        raise ReconstructionInputError(field_name, f"expected an array or tensor, got {type(array).__name__}")
    if not torch.isfinite(array).all():
        raise ReconstructionInputError(field_name, "contains NaN or infinite values")
    return array.detach().to(torch.float32)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, the form results travel in."""
    array = images.detach().to(torch.float32).clamp(0, 1).mul(255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


class UnclipDenoiser(torch.nn.Module):
    """The UNet call as a module with positional tensor inputs, so it can be compiled (torch or TensorRT)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, tokens, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states=tokens,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                         return_dict=False)[0]


@dataclass
class ReconstructionOutput:
    """Result of :meth:`UnclipReconstructor.reconstruct`.

    ``images``: (B, 3, H, W) float32 in [0, 1] on the CPU, blended with the blurry images when they were given and
    ``config.blend`` asks for it; ``unblended``: the unCLIP images alone; ``blended``: whether ``images`` is a blend; ``latents``: the final (unscaled) latents, float32 on the CPU;
    ``timings_ms``: milliseconds per step of the pipeline.
    """

    images: torch.Tensor
    unblended: torch.Tensor
    latents: torch.Tensor | None = None
    blended: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)


class BlurryDecoder:
    """Decodes the low-level head's SD-VAE latent (B, 4, 28, 28) to a blurry image (B, 3, 224, 224) in [0, 1].

    As MindEye2: ``vae.decode(latent / 0.18215).sample / 2 + 0.5``, clamped.
    """

    def __init__(self, vae: torch.nn.Module, *, scaling_factor: float = 0.18215, device: str = "auto",
                 dtype: str = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, gpu_default=torch.bfloat16)
        self.vae = place(vae, self.device, self.dtype)
        self.scaling_factor = scaling_factor

    def decode(self, latents) -> torch.Tensor:
        latents = _as_float_tensor(latents, "blurry_latent")
        channels = int(self.vae.config.latent_channels)
        if latents.ndim == 3:
            latents = latents.unsqueeze(0)
        if latents.ndim != 4 or latents.shape[1] != channels:
            raise ReconstructionInputError("blurry_latent", f"expected (B, {channels}, h, w), got "
                                                            f"{tuple(latents.shape)}")
        with torch.no_grad():
            decoded = self.vae.decode((latents / self.scaling_factor).to(self.device, self.dtype)).sample
        return (decoded.to(torch.float32) / 2 + 0.5).clamp(0, 1).cpu()


def blend(recon: torch.Tensor, blurry: torch.Tensor, blurry_weight: float) -> torch.Tensor:
    """``(1 - w) * recon + w * blurry`` with the blurry image resized (bilinear) to the reconstruction's size."""
    if blurry.ndim != 4 or blurry.shape[0] != recon.shape[0] or blurry.shape[1] != recon.shape[1]:
        raise ReconstructionInputError("blurry", f"expected ({recon.shape[0]}, {recon.shape[1]}, h, w), got "
                                                 f"{tuple(blurry.shape)}")
    if blurry.shape[-2:] != recon.shape[-2:]:
        blurry = F.interpolate(blurry, size=recon.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    return ((1.0 - blurry_weight) * recon + blurry_weight * blurry).clamp(0, 1)


class UnclipReconstructor:
    """Prior tokens (B, 256, 1664) -> images, with MindEye2's SDXL-unCLIP.

    Parameters
    ----------
    unet, vae:
        diffusers ``UNet2DConditionModel`` (unCLIP layout) and ``AutoencoderKL``; moved to the configured device and
        precision here.
    scheduler:
        any diffusers scheduler; ``None`` builds ``config.scheduler`` by name. A fresh copy is made per call
        (schedulers keep per-run state), so one reconstructor can serve calls one after another safely.
    config:
        :class:`~rt_mindeye.decode.config.ReconstructConfig`; sampling settings left null take the default preset's.
    """

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module, scheduler: Any = None,
                 config: ReconstructConfig | None = None):
        self.config = (config if config is not None else ReconstructConfig()).with_preset(DEFAULT_PRESET)
        self.device = resolve_device(self.config.device)
        self.unet_dtype = resolve_dtype(self.config.unet_dtype, self.device, gpu_default=torch.float16)
        self.vae_dtype = resolve_dtype(self.config.vae_dtype, self.device, gpu_default=torch.bfloat16)
        self.unet = place(unet, self.device, self.unet_dtype)
        self.vae = place(vae, self.device, self.vae_dtype)
        if self.device.type == "cuda":
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.scheduler = scheduler if scheduler is not None else make_scheduler(self.config.scheduler)
        self.latent_factor = vae_downsampling(self.vae.config)
        if self.config.image_size % self.latent_factor:
            raise ConfigError(None, "decode.reconstruction.image_size",
                              f"must be a multiple of the VAE's {self.latent_factor} px per latent cell, "
                              f"got {self.config.image_size}")
        self._denoiser: torch.nn.Module = UnclipDenoiser(self.unet)
        self._compiled_for: tuple | None = None
        if self.config.compile == "torch":
            self._denoiser = accel.compile_torch(self._denoiser)
        elif self.config.compile == "tensorrt" and not accel.available():
            raise accel.AccelerationUnavailable("tensorrt", accel.why_unavailable())

    @property
    def token_shape(self) -> tuple[int | None, int]:
        return (None, int(self.unet.config.cross_attention_dim))

    # 1. Check inputs -----------------------------------------------------------------------------------------------
    def check_inputs(self, prior_tokens, blurry, steps: int, guidance: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = _as_float_tensor(prior_tokens, "prior_tokens")
        if tokens.ndim == 2:
            tokens = tokens.unsqueeze(0)
        dim = int(self.unet.config.cross_attention_dim)
        if tokens.ndim != 3 or tokens.shape[-1] != dim or tokens.shape[0] == 0:
            raise ReconstructionInputError("prior_tokens", f"expected (B, seq, {dim}), got {tuple(tokens.shape)}")
        if steps < 1:
            raise ReconstructionInputError("steps", f"must be >= 1, got {steps}")
        if guidance < 0:
            raise ReconstructionInputError("guidance", f"must be >= 0, got {guidance}")
        blurry_images = None
        if blurry is not None:
            blurry_images = _as_float_tensor(blurry, "blurry")
            if blurry_images.ndim == 3:
                blurry_images = blurry_images.unsqueeze(0)
            if blurry_images.ndim != 4 or blurry_images.shape[:2] != (tokens.shape[0], 3):
                raise ReconstructionInputError("blurry", f"expected ({tokens.shape[0]}, 3, h, w) images in [0, 1], "
                                                         f"got {tuple(blurry_images.shape)}")
        return tokens, blurry_images

    def _maybe_compile_trt(self, example: tuple[torch.Tensor, ...]) -> None:
        shapes = tuple(tuple(t.shape) for t in example)
        if self.config.compile != "tensorrt" or self._compiled_for == shapes:
            return
        self._denoiser = accel.compile_trt(UnclipDenoiser(self.unet), example, dtype=self.unet_dtype)
        self._compiled_for = shapes

    def reconstruct(self, prior_tokens, blurry=None, *, steps: int | None = None, guidance: float | None = None,
                    seed: int | None = None, scheduler: Any = None, refined: bool = False) -> ReconstructionOutput:
        """Reconstruct B images from prior tokens (B, seq, dim).

        ``blurry`` (B, 3, h, w) in [0, 1] is blended in with ``config.blurry_weight`` when ``config.blend`` is
        ``always``, or ``refined`` and the images are refined ones (``refined``; MindEye2's evaluation blends only
        those). ``seed`` seeds the one CPU generator every random draw comes from, so the noise is the same on every
        device.
        """
        cfg = self.config
        steps = cfg.steps if steps is None else int(steps)
        guidance = cfg.guidance if guidance is None else float(guidance)
        timings: dict[str, float] = {}
        started = time.perf_counter()

        # 1. Check inputs
        tokens, blurry_images = self.check_inputs(prior_tokens, blurry, steps, guidance)
        batch = tokens.shape[0]
        use_cfg = guidance != 1.0
        generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))

        # 2. Conditioning: tokens, unconditional tokens for CFG, the constant vector condition
        cond = tokens.to(self.device, self.unet_dtype)
        if use_cfg:
            if cfg.unconditional == "zeros":
                uncond = torch.zeros_like(cond)
            else:
                uncond = torch.randn(tokens.shape, generator=generator).to(self.device, self.unet_dtype)
            cond = torch.cat([uncond, cond])
        added = vector_condition(self.unet.config, cond.shape[0], cfg.original_size, cfg.crop_top_left,
                                 device=self.device, dtype=self.unet_dtype)

        # 3. Timesteps (a fresh scheduler: they carry per-run state)
        template = scheduler if scheduler is not None else self.scheduler
        sched = type(template).from_config(template.config)
        sched.set_timesteps(steps, device=self.device)

        # 4. Initial noise, drawn on the CPU so a seed gives the same image on any device
        side = cfg.image_size // self.latent_factor
        shape = (batch, int(self.unet.config.in_channels), side, side)
        noise = torch.randn(shape, generator=generator)
        if cfg.offset_noise > 0:
            noise = noise + cfg.offset_noise * torch.randn((batch, 1, 1, 1), generator=generator)
        latents = (noise * sched.init_noise_sigma).to(self.device)

        # 5. Denoising loop with classifier-free guidance (sgm VanillaCFG: u + g (c - u))
        _synchronize(self.device)
        loop_start = time.perf_counter()
        with torch.no_grad():
            for t in sched.timesteps:
                latents = self.denoise_step(sched, latents, t, cond, added, guidance)
            _synchronize(self.device)
            timings["denoise_ms"] = (time.perf_counter() - loop_start) * 1e3

            # 6. VAE decode and map to [0, 1]
            vae_start = time.perf_counter()
            scaling = float(self.vae.config.scaling_factor)
            decoded = self.vae.decode((latents / scaling).to(self.vae_dtype)).sample.to(torch.float32)
            if cfg.output_mapping == "mindeye2":
                images = (decoded * 0.8 + 0.2).clamp(0, 1)
            else:
                images = ((decoded + 1) / 2).clamp(0, 1)
            images = images.cpu()
            timings["vae_ms"] = (time.perf_counter() - vae_start) * 1e3

        # 7. Blend with the blurry reconstruction (MindEye2's evaluation: refined images only, 0.75 / 0.25)
        do_blend = blurry_images is not None and (cfg.blend == "always" or (cfg.blend == "refined" and refined))
        result = blend(images, blurry_images, cfg.blurry_weight) if do_blend else images
        timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return ReconstructionOutput(images=result, unblended=images, latents=latents.to(torch.float32).cpu(),
                                    blended=do_blend, timings_ms=timings)

    def denoise_step(self, sched, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                     added: dict[str, torch.Tensor], guidance: float) -> torch.Tensor:
        """One solver step at timestep ``t``: the UNet on the scaled latents (unconditional and conditional halves
        in one batch when ``guidance != 1``, ``cond`` = [uncond; cond]), guidance ``u + g (c - u)`` as sgm's
        ``VanillaCFG``, then the scheduler's update."""
        use_cfg = guidance != 1.0
        model_input = torch.cat([latents, latents]) if use_cfg else latents
        model_input = sched.scale_model_input(model_input, t).to(self.unet_dtype)
        timestep = t.reshape(1).expand(model_input.shape[0]).to(self.device)
        example = (model_input, timestep, cond, added["text_embeds"], added["time_ids"])
        self._maybe_compile_trt(example)
        eps = self._denoiser(*example).to(torch.float32)
        if use_cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        return sched.step(eps, t, latents, return_dict=False)[0]

    def with_config(self, **changes: Any) -> "UnclipReconstructor":
        """A reconstructor sharing these modules with some settings changed (device and precision stay)."""
        new = object.__new__(UnclipReconstructor)
        new.__dict__.update(self.__dict__)
        new.config = replace(self.config, **changes).with_preset(DEFAULT_PRESET)
        if "scheduler" in changes:
            new.scheduler = make_scheduler(new.config.scheduler)
        return new
