"""Forward shapes and the pieces of the prior checked against independent formulations."""

from __future__ import annotations

import math

import pytest
import torch

from rt_mindeye.model.config import MindEyeConfig
from rt_mindeye.model.mindeye import MindEyeModule
from rt_mindeye.model.prior import RelativePositionBias, RotaryEmbedding


def test_forward_shapes_with_low_level_head(micro):
    config = micro((20, 24), blurry=True, subject_names=("a", "b"))
    model = MindEyeModule(config).eval()
    out = model(torch.randn(3, 24), "b")
    assert out.tokens.shape == out.clip_voxels.shape == (3, 4, 16)
    assert out.blurry_latent.shape == (3, 3, config.blurry_size, config.blurry_size) == (3, 3, 14, 14)
    assert out.blurry_aux.shape == (3, 49, 8)
    assert torch.isfinite(out.blurry_latent).all()
    # (batch, 1, voxels) as MindEye2's loaders give it works too.
    torch.testing.assert_close(model(torch.ones(2, 1, 20), 0).tokens, model(torch.ones(2, 20), "a").tokens)


def test_forward_without_low_level_head_and_input_errors(micro):
    model = MindEyeModule(micro((20,), blurry=False)).eval()
    out = model(torch.randn(2, 20), 0)
    assert out.blurry_latent is None and out.blurry_aux is None
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(2, 21), 0)
    with pytest.raises(IndexError):
        model(torch.randn(2, 20), 1)
    with pytest.raises(KeyError):
        model(torch.randn(2, 20), "nobody")


def test_prior_loss_and_sampling_are_seeded(micro):
    model = MindEyeModule(micro((20,))).eval()
    brain = torch.randn(2, 4, 16)
    torch.manual_seed(0)
    loss, pred = model.diffusion_prior(brain, torch.randn(2, 4, 16))
    assert loss.ndim == 0 and pred.shape == (2, 4, 16)
    a = model.diffusion_prior.sample(brain, generator=torch.Generator().manual_seed(5))
    b = model.diffusion_prior.sample(brain, generator=torch.Generator().manual_seed(5))
    c = model.diffusion_prior.sample(brain, steps=5, generator=torch.Generator().manual_seed(5))
    assert a.shape == c.shape == (2, 4, 16) and torch.equal(a, b) and not torch.equal(a, c)
    tokens = model.predict_image_tokens(torch.randn(2, 20), steps=3, generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (2, 4, 16)
    with pytest.raises(ValueError):
        model.diffusion_prior.sample(brain, steps=101)


def test_rotary_embedding_is_a_complex_rotation_of_interleaved_pairs():
    rotary = RotaryEmbedding(8)
    x = torch.randn(2, 5, 12)
    out = rotary.rotate(x)
    pairs = torch.view_as_complex(x[..., :8].reshape(2, 5, 4, 2).contiguous())
    angles = torch.arange(5.0)[:, None] * rotary.freqs[None, :]
    expected = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).reshape(2, 5, 8)
    torch.testing.assert_close(out[..., :8], expected)
    torch.testing.assert_close(out[..., 8:], x[..., 8:])  # channels beyond the rotary width are untouched


def test_relative_position_buckets():
    # Keys at or after the query share bucket 0; distances 1..15 are exact; far distances are log-spaced up to 31.
    bucket = RelativePositionBias.bucket(torch.tensor([3, 0, -1, -15, -16, -127, -1000]))
    assert bucket.tolist()[:4] == [0, 0, 1, 15]
    assert 16 <= bucket[4] < bucket[5] <= 31 and bucket[6] == 31
    assert int(16 + math.log(127 / 16) / math.log(128 / 16) * 16) == bucket[5]


def test_config_validation_and_round_trip():
    config = MindEyeConfig.preset("tiny", [10, 12])
    assert MindEyeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        MindEyeConfig(subject_voxels=())
    with pytest.raises(ValueError):
        MindEyeConfig.preset("huge", [10])
    from rt_mindeye.errors import ConfigError

    with pytest.raises(ConfigError, match="hidden_dimm"):
        MindEyeConfig.from_dict({"hidden_dimm": 3})
