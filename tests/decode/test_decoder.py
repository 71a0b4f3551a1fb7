from __future__ import annotations

import numpy as np
import pytest
import torch

from rt_mindeye.decode.config import DecodeConfig, ReconstructConfig
from rt_mindeye.decode.decoder import DecodeInputError, Decoder
from rt_mindeye.decode.reconstruct import BlurryDecoder, UnclipReconstructor
from rt_mindeye.decode.retrieval import Retriever

N_VOXELS, SEQ, DIM = 30, 5, 24


class TinyBrainModel(torch.nn.Module):
    """A real (tiny) torch model with MindEye2's output contract: betas -> (clip tokens, prior tokens, latent)."""

    def __init__(self, with_blurry: bool):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.to_tokens = torch.nn.Linear(N_VOXELS, SEQ * DIM)
        with torch.no_grad():
            self.to_tokens.weight.copy_(torch.randn(SEQ * DIM, N_VOXELS, generator=generator))
        self.to_latent = torch.nn.Linear(N_VOXELS, 4 * 7 * 7) if with_blurry else None

    @torch.no_grad()
    def forward(self, betas):
        betas = torch.as_tensor(np.asarray(betas), dtype=torch.float32)
        tokens = self.to_tokens(betas).reshape(-1, SEQ, DIM)
        latent = self.to_latent(betas).reshape(-1, 4, 7, 7) if self.to_latent is not None else None
        return tokens, tokens * 0.5, latent


def _candidates(model: TinyBrainModel, betas: np.ndarray) -> Retriever:
    tokens, _, _ = model(betas)
    return Retriever(tokens, ids=[f"shared{i:04d}" for i in range(len(betas))])


def test_retrieval_only_decoder_finds_the_trial_image():
    model = TinyBrainModel(with_blurry=False)
    betas = np.random.default_rng(0).normal(size=(12, N_VOXELS)).astype(np.float32)
    decoder = Decoder(DecodeConfig(top_k=3), model, _candidates(model, betas))
    result = decoder.decode(betas[[5, 9]])
    assert [row[0] for row in result.topk_ids] == ["shared0005", "shared0009"]
    assert result.topk_indices.shape == (2, 3) and result.scores.dtype == np.float32
    np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=1e-5)
    assert result.image is None and result.blurry is None
    assert {"model_ms", "retrieval_ms", "total_ms"} <= set(result.timings_ms)
    one = decoder.decode(betas[7])  # a single trial (V,)
    assert one.topk_ids[0][0] == "shared0007"


def test_full_decoder_returns_uint8_images(tiny_unet, tiny_vae):
    model = TinyBrainModel(with_blurry=True)
    betas = np.random.default_rng(1).normal(size=(6, N_VOXELS)).astype(np.float32)
    recon_config = ReconstructConfig(image_size=16, steps=2, device="cpu")
    decoder = Decoder(DecodeConfig(top_k=2, reconstruction=recon_config), model, _candidates(model, betas),
                      reconstructor=UnclipReconstructor(tiny_unet, tiny_vae, config=recon_config),
                      blurry_decoder=BlurryDecoder(tiny_vae, device="cpu"))
    result = decoder.decode(betas[:2])
    assert result.image.shape == (2, 16, 16, 3) and result.image.dtype == np.uint8
    assert result.blurry.shape == (2, 14, 14, 3) and result.blurry.dtype == np.uint8
    assert {"blurry_ms", "reconstruct_ms", "reconstruct_denoise_ms"} <= set(result.timings_ms)
    # the trial counter moves the seed, an explicit seed repeats an image
    again = decoder.decode(betas[:2], seed=0)
    first = Decoder(DecodeConfig(top_k=2, reconstruction=recon_config), model, _candidates(model, betas),
                    reconstructor=decoder.reconstructor, blurry_decoder=decoder.blurry_decoder).decode(betas[:2])
    assert np.array_equal(again.image, first.image)

    no_blurry = Decoder(DecodeConfig(blurry=False, reconstruction=recon_config), model, _candidates(model, betas),
                        reconstructor=decoder.reconstructor, blurry_decoder=decoder.blurry_decoder)
    assert no_blurry.decode(betas[:1]).blurry is None


def test_bad_inputs_and_model_outputs_are_named():
    model = TinyBrainModel(with_blurry=False)
    betas = np.random.default_rng(2).normal(size=(4, N_VOXELS)).astype(np.float32)
    decoder = Decoder(DecodeConfig(), model, _candidates(model, betas))
    with pytest.raises(DecodeInputError, match="betas"):
        decoder.decode(np.zeros((1, 2, 3), np.float32))
    broken = Decoder(DecodeConfig(), lambda b: (None, None), _candidates(model, betas))
    with pytest.raises(DecodeInputError, match="model_forward"):
        broken.decode(betas)
