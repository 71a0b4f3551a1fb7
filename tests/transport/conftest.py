"""Shared helpers for the transport tests: message factories and bounded waits."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rt_mindeye.transport.messages import TrialBetas

FAST_HEARTBEAT_S = 0.1


def make_trial(i: int, n_voxels: int = 64, session: str = "ses-test") -> TrialBetas:
    rng = np.random.default_rng(i)
    return TrialBetas(session=session, run=1, trial=i, trial_type="image", onset=4.0 * i, estimate_kind="fast",
                      estimate_version=1, n_volumes=6 + i, acquisition_time=1.7e9 + 1.5 * i,
                      betas=rng.standard_normal(n_voxels).astype(np.float32), stim_file=f"img{i:04d}.png")


def drain(receiver, want: int, timeout_s: float) -> list:
    """Receive until ``want`` messages or the deadline."""
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        msg = receiver.recv(0.05)
        if msg is not None:
            got.append(msg)
    return got


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def trial_factory():
    return make_trial


@pytest.fixture
def helpers():
    class H:
        pass

    h = H()
    h.make_trial = make_trial
    h.drain = drain
    h.wait_for = wait_for
    h.hb = FAST_HEARTBEAT_S
    return h
