"""Single-trial betas: the offline GLMsingle-style calibration fit and the real-time estimator (see docs/glm.md).

The names below are imported on first use (PEP 562): importing a submodule, e.g. :mod:`rt_mindeye.glm.io`, does not
load the fit's numba kernels, so ``rt-mindeye glm fit`` reads its runs while another thread loads them.
"""

from __future__ import annotations

import importlib

_HOMES = {"GLMConfig": "config", "RealtimeConfig": "config", "RunEvents": "design", "GLMInputError": "errors",
          "RealtimeStateError": "errors", "GLMCalibration": "estimator", "GLMSingle": "estimator",
          "fit_run_frozen": "estimator", "RealtimeGLM": "realtime", "TrialEstimate": "realtime"}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
