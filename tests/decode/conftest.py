"""Tiny real diffusers components in the unCLIP layout, built once per test session."""

from __future__ import annotations

import pytest

from rt_mindeye.decode.unclip import build_unet, build_vae, tiny_unet_config, tiny_vae_config


@pytest.fixture(scope="session")
def tiny_unet():
    return build_unet(tiny_unet_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_vae():
    return build_vae(tiny_vae_config(), seed=1)
