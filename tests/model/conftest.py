"""Shared fixtures for the model tests: micro configurations and the published layouts."""

from __future__ import annotations

import json

import pytest
import torch

from rt_mindeye.model.config import MindEyeConfig
from rt_mindeye.model.train import SubjectData

LAYOUTS = {
    "multisubject_subj01_1024hid_nolow_300ep": "light",
    "final_multisubject_subj01": "full",
    "final_subj01_pretrained_1sess_24bs": "full",
}


@pytest.fixture(scope="session")
def layouts(mindeye2_layout_dir):
    return {name: json.loads((mindeye2_layout_dir / f"{name}.json").read_text()) for name in LAYOUTS}


def micro_config(subject_voxels=(20, 24), blurry=False, **overrides) -> MindEyeConfig:
    """A model small enough for many CPU training steps in a test."""
    fields = dict(hidden_dim=32, n_blocks=1, token_seq=4, token_dim=16, blurry_recon=blurry, blurry_channels=8,
                  blurry_out_channels=3, blurry_decoder_channels=(4, 8), blurry_norm_groups=4, blurry_aux_dim=8,
                  prior_depth=1, prior_dim_head=8, prior_heads=2, prior_ff_mult=2)
    fields.update(overrides)
    return MindEyeConfig(subject_voxels=tuple(subject_voxels), **fields)


@pytest.fixture(scope="session")  # session: module-scoped fixtures (one distributed launch) use it too
def micro():
    return micro_config


def synthetic_subject(n: int, n_voxels: int, seed: int, config: MindEyeConfig, name: str = "") -> SubjectData:
    """Voxels that linearly encode a latent which also generates the image tokens (learnable, noisy)."""
    shared = torch.Generator().manual_seed(1234)  # the same "images -> tokens" map for every subject
    mixing = torch.randn(6, config.token_seq * config.token_dim, generator=shared)
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 6, generator=g)
    tokens = (latent @ mixing).reshape(n, config.token_seq, config.token_dim)
    voxels = latent @ torch.randn(6, n_voxels, generator=g) + 0.3 * torch.randn(n, n_voxels, generator=g)
    blurry = aux = None
    if config.blurry_recon:
        size = config.blurry_size
        blurry = torch.tanh(latent[:, :3, None, None].expand(n, 3, size, size).clone())
        aux = torch.randn(n, config.blurry_grid ** 2, config.blurry_aux_dim, generator=g)
    return SubjectData(voxels, tokens, blurry, aux, name=name)


@pytest.fixture(scope="session")
def subject_data():
    return synthetic_subject
