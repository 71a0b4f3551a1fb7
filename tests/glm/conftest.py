"""Fixtures: small simulated sessions with known betas from ``rt_mindeye.glm.simulate``, which builds its HRFs,
convolution and resampling independently of the fit's own design code (library and out-of-library double-gamma
HRFs, AR(1) noise, drift, low-rank shared noise, motion-locked signal)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rt_mindeye.glm.design import RunEvents
from rt_mindeye.glm.estimator import GLMSingle
from rt_mindeye.glm.simulate import median_correlation, simulate_session


def make_session(*, seed: int = 0, n_runs: int = 5, n_frames: int = 150, n_vox: int = 300, **options):
    """A simulated session whose events are :class:`RunEvents` (the generator itself returns plain columns)."""
    sim = simulate_session(seed=seed, n_runs=n_runs, n_frames=n_frames, n_vox=n_vox, **options)
    events = [RunEvents(ev["onset"], ev["duration"], tuple(ev["trial_type"])) for ev in sim.events]
    return SimpleNamespace(runs=sim.runs, events=events, tr=sim.tr, true_betas=sim.true_betas,
                           responsive=sim.responsive, true_hrf=sim.true_hrf, motion=sim.motion,
                           description=sim.description, true_motion_coef=sim.true_motion_coef)


@pytest.fixture(scope="session")
def synthetic_session():
    return make_session(shared_sd=1.4)


@pytest.fixture(scope="session")
def session_factory():
    return make_session


@pytest.fixture(scope="session")
def correlation():
    return median_correlation


@pytest.fixture(scope="session")
def fits(synthetic_session):
    """Types a-d fitted once on the synthetic session (shared by the offline and CLI tests)."""
    s = synthetic_session
    return {m: GLMSingle(model=m).fit(s.runs, s.events, s.tr) for m in "abcd"}
