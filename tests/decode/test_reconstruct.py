from __future__ import annotations

import numpy as np
import pytest
import torch

from rt_mindeye.config import from_mapping
from rt_mindeye.decode import accel
from rt_mindeye.decode.config import DecodeConfig, ReconstructConfig
from rt_mindeye.decode.reconstruct import (BlurryDecoder, ReconstructionInputError, UnclipReconstructor, blend,
                                           to_uint8_images)
from rt_mindeye.decode.unclip import vector_condition
from rt_mindeye.errors import ConfigError

IMAGE = 16  # tiny VAE: 2 px per latent cell -> 8x8 latents


def _config(**changes) -> ReconstructConfig:
    return ReconstructConfig(**{"image_size": IMAGE, "steps": 4, "device": "cpu", **changes})


def _tokens(seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 5, 24, generator=torch.Generator().manual_seed(seed))


def test_euler_matches_a_hand_written_sgm_style_euler_sampler(tiny_unet, tiny_vae):
    """Euler on the discrete DDPM sigmas, c_in = 1/sqrt(sigma^2+1), eps model, CFG u + g(c - u) with random-normal
    unconditional tokens, offset noise: what MindEye2's EulerEDMSampler does, written out independently of diffusers'
    schedulers."""
    steps, guidance, seed = 5, 3.0, 11
    recon = UnclipReconstructor(tiny_unet, tiny_vae, config=_config(scheduler="euler", steps=steps,
                                                                    guidance=guidance))
    tokens = _tokens(0)
    got = recon.reconstruct(tokens, seed=seed).unblended

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    all_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    timesteps = np.round(np.arange(1000, 0, -1000 / steps)).astype(np.int64) - 1
    sigmas = torch.cat([all_sigmas[timesteps], torch.zeros(1, dtype=torch.float64)])
    generator = torch.Generator().manual_seed(seed)
    uncond = torch.randn(tokens.shape, generator=generator)  # utils.unclip_recon: torch.randn_like(tokens)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    noise = noise + 0.04 * torch.randn(2, 1, 1, 1, generator=generator)
    # sgm starts from sqrt(sigma_0^2 + 1) * noise; diffusers' Euler (trailing spacing) from sigma_0 * noise, 0.2 %
    # less at sigma_0 = 14.6. The reconstructor keeps the scheduler's convention, so the reference does too.
    x = noise.double() * sigmas[0]
    cond = torch.cat([uncond, tokens])
    added = vector_condition(tiny_unet.config, 4, 768, (0, 0))
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            model_in = (x / (sigmas[i] ** 2 + 1) ** 0.5).float()
            eps = tiny_unet(torch.cat([model_in, model_in]), torch.full((4,), float(t)),
                            encoder_hidden_states=cond, added_cond_kwargs=added).sample.double()
            eps_u, eps_c = eps.chunk(2)
            x = x + (eps_u + guidance * (eps_c - eps_u)) * (sigmas[i + 1] - sigmas[i])
        decoded = tiny_vae.decode((x / 0.13025).float()).sample
    expected = (decoded * 0.8 + 0.2).clamp(0, 1)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("scheduler", ["euler-karras", "dpm++2m", "dpm++2m-karras", "unipc"])
def test_every_scheduler_gives_deterministic_images_in_range(tiny_unet, tiny_vae, scheduler):
    recon = UnclipReconstructor(tiny_unet, tiny_vae, config=_config(scheduler=scheduler, steps=3))
    first = recon.reconstruct(_tokens(1), seed=5)
    again = recon.reconstruct(_tokens(1), seed=5)
    assert first.images.shape == (2, 3, IMAGE, IMAGE) and first.images.dtype == torch.float32
    assert float(first.images.min()) >= 0.0 and float(first.images.max()) <= 1.0
    assert torch.equal(first.images, again.images)
    assert {"denoise_ms", "vae_ms", "total_ms"} <= set(first.timings_ms)


def test_seed_tokens_and_guidance_change_the_image(tiny_unet, tiny_vae):
    recon = UnclipReconstructor(tiny_unet, tiny_vae, config=_config(output_mapping="standard"))
    base = recon.reconstruct(_tokens(2), seed=1).images
    assert not torch.equal(base, recon.reconstruct(_tokens(2), seed=2).images)
    assert not torch.equal(base, recon.reconstruct(_tokens(3), seed=1).images)
    assert not torch.equal(base, recon.reconstruct(_tokens(2), seed=1, guidance=1.0).images)
    zeros_uncond = recon.with_config(unconditional="zeros").reconstruct(_tokens(2), seed=1).images
    assert not torch.equal(base, zeros_uncond)
    # numpy input and a single trial without batch axis
    single = recon.reconstruct(_tokens(2)[0].numpy(), seed=1).images
    assert single.shape == (1, 3, IMAGE, IMAGE)


def test_blurry_blend_follows_the_official_evaluation(tiny_unet, tiny_vae):
    """MindEye2's final_evaluations blends only refined ('enhanced') reconstructions, 0.75 / 0.25."""
    blurry = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    recon = UnclipReconstructor(tiny_unet, tiny_vae, config=_config(blurry_weight=0.25))
    assert recon.config.blend == "refined"
    unrefined = recon.reconstruct(_tokens(4), blurry=blurry, seed=0)
    assert not unrefined.blended and torch.equal(unrefined.images, unrefined.unblended)
    out = recon.reconstruct(_tokens(4), blurry=blurry, seed=0, refined=True)
    assert out.blended and torch.equal(recon.with_config(blend="always").reconstruct(_tokens(4), blurry=blurry,
                                                                                   seed=0).images, out.images)
    upsized = torch.nn.functional.interpolate(blurry, size=(IMAGE, IMAGE), mode="bilinear", antialias=True)
    torch.testing.assert_close(out.images, (0.75 * out.unblended + 0.25 * upsized).clamp(0, 1))
    torch.testing.assert_close(blend(out.unblended, blurry, 0.0), out.unblended)
    torch.testing.assert_close(blend(out.unblended, blurry, 1.0), upsized.clamp(0, 1))
    with pytest.raises(ReconstructionInputError, match="blurry"):
        recon.reconstruct(_tokens(4), blurry=blurry[:1], seed=0)


def test_blurry_decoder_follows_mindeye2(tiny_vae):
    decoder = BlurryDecoder(tiny_vae, device="cpu")
    latent = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    images = decoder.decode(latent.numpy())
    with torch.no_grad():
        expected = (tiny_vae.decode(latent / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape == (2, 3, 14, 14)
    torch.testing.assert_close(images, expected)
    with pytest.raises(ReconstructionInputError, match="blurry_latent"):
        decoder.decode(torch.zeros(1, 3, 7, 7))
    as_uint8 = to_uint8_images(images)
    assert as_uint8.shape == (2, 14, 14, 3) and as_uint8.dtype == np.uint8


def test_input_errors_name_the_field(tiny_unet, tiny_vae):
    recon = UnclipReconstructor(tiny_unet, tiny_vae, config=_config())
    with pytest.raises(ReconstructionInputError) as info:
        recon.reconstruct(torch.zeros(1, 5, 23))
    assert info.value.field == "prior_tokens"
    with pytest.raises(ReconstructionInputError, match="NaN"):
        recon.reconstruct(torch.full((1, 5, 24), float("nan")))
    with pytest.raises(ReconstructionInputError, match="steps"):
        recon.reconstruct(_tokens(0), steps=0)
    with pytest.raises(ConfigError, match="image_size"):
        UnclipReconstructor(tiny_unet, tiny_vae, config=ReconstructConfig(image_size=17, device="cpu"))


def test_tensorrt_is_optional_with_a_clear_message(tiny_unet, tiny_vae):
    if accel.available():
        pytest.skip("torch-tensorrt and a GPU are present here")
    assert "decode.reconstruction.compile" in accel.why_unavailable()
    with pytest.raises(accel.AccelerationUnavailable, match="tensorrt"):
        accel.compile_trt(torch.nn.Identity(), [torch.zeros(1)])
    with pytest.raises(accel.AccelerationUnavailable):
        UnclipReconstructor(tiny_unet, tiny_vae, config=_config(compile="tensorrt"))


def test_config_loads_from_yaml_mapping_and_rejects_bad_values():
    config = from_mapping(DecodeConfig, {"top_k": 3, "reconstruction": {"scheduler": "euler", "steps": 38,
                                                                         "crop_top_left": [0, 0]}},
                          source="decode.yaml", prefix="decode")
    assert config.reconstruction.steps == 38 and config.reconstruction.crop_top_left == (0, 0)
    with pytest.raises(ConfigError, match="decode.reconstruction.scheduler"):
        from_mapping(DecodeConfig, {"reconstruction": {"scheduler": "ddim"}}, source="decode.yaml",
                     prefix="decode")
    with pytest.raises(ConfigError, match="blurry_weight"):
        from_mapping(DecodeConfig, {"reconstruction": {"blurry_weight": 1.5}}, prefix="decode")
