"""Shared phantom fixtures: one small simulated session (and its files) per test session, to stay within budget."""

from __future__ import annotations

import pytest

from rt_mindeye.phantom import phantom_config, simulate_session, write_session


@pytest.fixture(scope="session")
def tiny_config():
    """The small preset cut to 3 runs of 12 trials (24 distinct images, 6 of them shown 3 times)."""
    return phantom_config("small", n_runs=3, calibration_runs=2, trials_per_run=12, repeated_images=6, repeats=3)


@pytest.fixture(scope="session")
def tiny_session(tiny_config):
    return simulate_session(tiny_config, subject=1, seed=0)


@pytest.fixture(scope="session")
def written_session(tiny_session, tmp_path_factory):
    """The first run of ``tiny_session`` written as mosaics (and the whole truth)."""
    out = tmp_path_factory.mktemp("phantom_out")
    write_session(tiny_session, out, runs=[0])
    return out
