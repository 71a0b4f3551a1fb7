"""The full model's blurry image: its 4-channel SD-VAE latent decoded with a diffusers AutoencoderKL from a local file,
as the decoder service does it, down to the PNG and thumbnail the console shows."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

from rt_mindeye.convert.unclip import SD_VAE_CONFIG, infer_diffusers_vae_config, load_diffusers_vae
from rt_mindeye.decode.config import DecodeConfig
from rt_mindeye.decode.decoder import Decoder
from rt_mindeye.decode.reconstruct import BlurryDecoder
from rt_mindeye.decode.retrieval import Retriever
from rt_mindeye.decode.unclip import build_vae, tiny_vae_config
from rt_mindeye.model.config import MindEyeConfig
from rt_mindeye.model.mindeye import MindEyeModule
from rt_mindeye.runtime.decoder import PixelBlurryDecoder, TrialDecoder, blurry_decoder_for
from rt_mindeye.transport.messages import TrialBetas

VOXELS = 40
CONFIG = MindEyeConfig(subject_voxels=(VOXELS,), hidden_dim=16, n_blocks=1, token_seq=4, token_dim=16,
                       blurry_recon=True, blurry_channels=8, blurry_out_channels=4, blurry_decoder_channels=(8, 8),
                       blurry_norm_groups=4, blurry_aux_dim=8, use_prior=False)


def _vae_file(tmp_path):
    vae = build_vae(tiny_vae_config(block_out_channels=(32, 32), norm_num_groups=32), seed=3)
    path = tmp_path / "sd_image_var_autoenc.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    return vae, path


def test_vae_config_is_read_from_the_shapes(tmp_path):
    vae, path = _vae_file(tmp_path)
    config = infer_diffusers_vae_config(vae.state_dict())
    assert config["block_out_channels"] == (32, 32) and config["scaling_factor"] == 0.18215
    with torch.device("meta"):
        from diffusers import AutoencoderKL

        full = AutoencoderKL(**SD_VAE_CONFIG)
    assert infer_diffusers_vae_config(full.state_dict())["block_out_channels"] == (128, 256, 512, 512)
    loaded = load_diffusers_vae(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))


def test_blurry_decoder_choice_follows_the_low_level_head(tmp_path):
    _, path = _vae_file(tmp_path)
    decode = DecodeConfig()
    assert isinstance(blurry_decoder_for(CONFIG, decode, "cpu", path), BlurryDecoder)
    assert blurry_decoder_for(CONFIG, decode, "cpu", None) is None
    assert isinstance(blurry_decoder_for(CONFIG.replace(blurry_out_channels=3), decode, "cpu", None),
                      PixelBlurryDecoder)
    assert blurry_decoder_for(CONFIG.replace(blurry_recon=False), decode, "cpu", path) is None


def test_latent_head_gives_the_console_a_blurry_png(tmp_path):
    vae, path = _vae_file(tmp_path)
    torch.manual_seed(0)
    model = MindEyeModule(CONFIG).eval()

    def forward(betas):
        with torch.no_grad():
            out = model(torch.as_tensor(np.asarray(betas, dtype=np.float32)), 0)
        return out.clip_voxels, None, out.blurry_latent

    betas = np.random.default_rng(0).standard_normal((3, VOXELS)).astype(np.float32)
    blurry = blurry_decoder_for(CONFIG, DecodeConfig(), "cpu", path)
    decoder = Decoder(DecodeConfig(reconstruct=False), forward, Retriever(forward(betas)[0]), blurry_decoder=blurry)
    result = decoder.decode(betas[:1])
    latent = forward(betas[:1])[2]
    with torch.no_grad():
        expected = ((vae.decode(latent / 0.18215).sample / 2 + 0.5).clamp(0, 1) * 255).round()
    assert result.blurry.shape == (1, 28, 28, 3)
    np.testing.assert_allclose(result.blurry[0].astype(np.float32),
                               expected[0].permute(1, 2, 0).numpy(), atol=1.0)

    trial = TrialDecoder(decoder, session="s", recon_dir=tmp_path / "recon")
    message = trial.retrieve(TrialBetas(session="s", seq=0, run=1, trial=2, trial_type="image", onset=0.0,
                                        estimate_kind="final", estimate_version=0, n_volumes=5, acquisition_time=0.0,
                                        betas=betas[0]), received_at=0.0).result
    assert message.reconstruction_path.endswith("_blurry.png") and message.thumbnail_png.size > 0
