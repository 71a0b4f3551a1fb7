"""Golden forward tests: rt-mindeye's modules against tensors made by running the official MindEyeV2 code.

``tests/data/mindeye2_golden/`` holds the official modules' (tiny, seeded) weights, inputs and outputs; how they were
made is in its README. These tests load the weights into rt-mindeye's own modules and compare the outputs.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rt_mindeye.model.backbone import BrainNetwork
from rt_mindeye.model.config import MindEyeConfig
from rt_mindeye.model.prior import DiffusionPrior

GOLDEN = "mindeye2_golden/mindeye2_golden.safetensors"
CONFIG = MindEyeConfig(subject_voxels=(16,), hidden_dim=16, n_blocks=2, token_seq=4, token_dim=16, blurry_recon=True,
                       blurry_channels=64, blurry_grid=7, blurry_out_channels=4, blurry_decoder_channels=(32, 32, 32),
                       blurry_norm_groups=32, blurry_aux_dim=512, prior_depth=2, prior_dim_head=8, prior_heads=2,
                       prior_ff_mult=4)


@pytest.fixture(scope="module")
def golden(data_dir):
    return load_file(str(data_dir / GOLDEN))


def _part(golden, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.float() for k, v in golden.items() if k.startswith(prefix)}


def test_backbone_and_blurry_head_match_the_official_brain_network(golden):
    backbone = BrainNetwork(CONFIG).eval()
    backbone.load_state_dict(_part(golden, "backbone.state."), strict=True)
    with torch.no_grad():
        out = backbone(golden["backbone.input"])
    torch.testing.assert_close(out.tokens, golden["backbone.tokens"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.clip_voxels, golden["backbone.clip_voxels"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.blurry_latent, golden["backbone.blurry_latent"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.blurry_aux, golden["backbone.blurry_aux"], atol=1e-5, rtol=1e-4)


def test_mixer_blocks1_output_is_overwritten_as_in_the_official_forward(golden):
    """The official forward discards what mixer_blocks1 computes: its weights do not change the output."""
    backbone = BrainNetwork(CONFIG).eval()
    state = _part(golden, "backbone.state.")
    state = {k: (torch.randn_like(v) if k.startswith("mixer_blocks1.") else v) for k, v in state.items()}
    backbone.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = backbone(golden["backbone.input"])
    torch.testing.assert_close(out.tokens, golden["backbone.tokens"], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def prior(golden):
    model = DiffusionPrior(CONFIG).eval()
    model.load_state_dict(_part(golden, "prior.state."), strict=True)
    return model


@pytest.mark.parametrize("drop", [0, 1])
def test_prior_loss_at_fixed_noise_matches_the_official_prior(golden, prior, drop):
    with torch.no_grad():
        loss, pred = prior(golden["prior.brain"], golden["prior.image"], noise=golden["prior.noise"],
                           timesteps=golden["prior.times"], cond_drop_prob=float(drop))
    torch.testing.assert_close(pred, golden[f"prior.pred_drop{drop}"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss.reshape(1), golden[f"prior.loss_drop{drop}"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cond_scale", [1, 3])
def test_prior_ddim_sample_at_fixed_noise_matches_the_official_loop(golden, prior, cond_scale):
    """dalle2-pytorch's p_sample_loop_ddim (20 steps, eta 1) draws from torch's global generator seeded with 7;
    the same numbers come from a torch.Generator seeded with 7."""
    sample = prior.sample(golden["prior.brain"], steps=20, cond_scale=float(cond_scale),
                          generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, golden[f"prior.ddim20_scale{cond_scale}"], atol=1e-4, rtol=1e-4)


def test_convnext_teacher_matches_the_official_convnext_and_loads_the_published_container(golden, tmp_path):
    """src/autoencoder/convnext.py's ConvnextXL (tiny widths): the published file is {'model': {'module.' + key}}
    with other heads of the self-supervised training beside the two parts the teacher uses."""
    from rt_mindeye.convert.convnext import load_convnext_teacher

    state = _part(golden, "convnext.state.")
    container = {"model": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    container["model"]["module.projector.0.weight"] = torch.zeros(4, 16)  # a head the teacher does not use
    path = tmp_path / "convnext_fullckpt.pth"
    torch.save(container, path)
    teacher, dropped = load_convnext_teacher(path)
    assert dropped == ["projector.0.weight"]
    with torch.no_grad():
        maps = teacher(golden["convnext.input"])
    torch.testing.assert_close(maps, golden["convnext.maps"], atol=1e-5, rtol=1e-4)
