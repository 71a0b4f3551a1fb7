"""The phantom: a simulated subject and scanner session with known ground truth, written as real DICOM files.

Quick use::

    from rt_mindeye.phantom import phantom_config, simulate_session, write_session
    session = simulate_session("small", subject=1, seed=0)      # in memory
    session.visual_timeseries(0)                                 # (T, V) BOLD of the visual voxels, no motion
    session.betas[0]                                             # (n_trials, V) true betas, % signal change
    write_session(session, "out/")                               # DICOM + events + stimuli + truth

See docs/phantom.md.
"""

from rt_mindeye.phantom.config import PRESETS, PhantomConfig, phantom_config
from rt_mindeye.phantom.export import read_events, write_session
from rt_mindeye.phantom.session import (PhantomSession, RunInfo, Trial, hrf_library, response_regressors,
                                        simulate_session)
from rt_mindeye.phantom.subject import Subject, make_subject

__all__ = ["PRESETS", "PhantomConfig", "phantom_config", "simulate_session", "PhantomSession", "RunInfo", "Trial",
           "Subject", "make_subject", "write_session", "read_events", "hrf_library", "response_regressors"]
