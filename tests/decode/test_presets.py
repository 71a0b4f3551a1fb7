"""Sampling presets and per-trial seeding of the prior and the unCLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rt_mindeye.config import from_mapping
from rt_mindeye.decode.config import DEFAULT_PRESET, PRESETS, DecodeConfig, ReconstructConfig
from rt_mindeye.decode.decoder import Decoder, prior_seed, trial_seed
from rt_mindeye.decode.reconstruct import UnclipReconstructor
from rt_mindeye.decode.retrieval import Retriever
from rt_mindeye.errors import ConfigError
from rt_mindeye.model.config import MindEyeConfig
from rt_mindeye.model.mindeye import MindEyeModule

N_VOXELS = 30


def test_mindeye2_preset_is_the_official_reconstruction():
    config = DecodeConfig(preset="mindeye2")
    recon = config.reconstruction
    assert (recon.scheduler, recon.steps, recon.guidance, recon.unconditional) == ("euler", 38, 5.0, "noise")
    assert config.prior_steps == 20
    fast = DecodeConfig(preset="fast")
    assert (fast.reconstruction.scheduler, fast.reconstruction.steps) == ("dpm++2m-karras", 16)
    assert fast.reconstruction.unconditional == "noise" and fast.prior_steps == 20
    assert DecodeConfig().preset == DEFAULT_PRESET in PRESETS


def test_explicit_keys_override_the_preset_and_bad_names_are_config_errors():
    config = from_mapping(DecodeConfig, {"preset": "mindeye2", "prior_steps": 10,
                                         "reconstruction": {"steps": 20}}, source="x.yaml", prefix="decode")
    assert config.reconstruction.steps == 20 and config.reconstruction.scheduler == "euler"
    assert config.prior_steps == 10
    with pytest.raises(ConfigError, match="decode.preset"):
        from_mapping(DecodeConfig, {"preset": "slow"}, source="x.yaml", prefix="decode")
    # a bare ReconstructConfig (tests, benches) resolves to the default preset inside the reconstructor
    assert not ReconstructConfig().resolved
    assert ReconstructConfig().with_preset(DEFAULT_PRESET).resolved


def test_trial_seeds_differ_across_runs_and_trials_and_repeat_per_trial():
    seeds = {trial_seed(0, run, trial) for run in range(1, 4) for trial in range(60)}
    assert len(seeds) == 180
    assert trial_seed(0, 2, 7) == trial_seed(0, 2, 7) != trial_seed(1, 2, 7)
    assert prior_seed(5) != 5 and 0 <= prior_seed(5) < 2 ** 63


class _PriorModel:
    """A tiny real MindEye2 model as the decoder's model_forward, its prior seeded from the decoder."""

    def __init__(self):
        config = MindEyeConfig(subject_voxels=(N_VOXELS,), hidden_dim=16, n_blocks=1, token_seq=5, token_dim=24,
                               prior_depth=1, prior_dim_head=8, prior_heads=3, prior_ff_mult=2)
        torch.manual_seed(0)
        self.model = MindEyeModule(config).eval()

    @torch.no_grad()
    def __call__(self, betas, seed=None):
        out = self.model(torch.as_tensor(np.asarray(betas, dtype=np.float32)), 0)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return out.clip_voxels, self.model.diffusion_prior.sample(out.tokens, steps=4, generator=generator), None


def test_prior_and_unclip_replay_bit_for_bit_without_touching_the_global_generator(tiny_unet, tiny_vae):
    model = _PriorModel()
    betas = np.random.default_rng(3).normal(size=(4, N_VOXELS)).astype(np.float32)
    recon_config = ReconstructConfig(image_size=16, steps=3, device="cpu")
    config = DecodeConfig(preset="mindeye2", reconstruction=recon_config)
    retriever = Retriever(model(betas)[0], ids=[str(i) for i in range(4)])
    decoder = Decoder(config, model, retriever, reconstructor=UnclipReconstructor(tiny_unet, tiny_vae,
                                                                                  config=config.reconstruction))
    state = torch.get_rng_state()
    first = decoder.decode(betas[1], seed=trial_seed(0, 1, 1))
    torch.manual_seed(123)  # whatever else the process draws in between does not matter
    again = decoder.decode(betas[1], seed=trial_seed(0, 1, 1))
    other = decoder.decode(betas[1], seed=trial_seed(0, 1, 2))
    assert np.array_equal(first.image, again.image)
    assert not np.array_equal(first.image, other.image)
    torch.set_rng_state(state)
    before = torch.get_rng_state()
    decoder.decode(betas[2], seed=7)
    assert torch.equal(before, torch.get_rng_state())
