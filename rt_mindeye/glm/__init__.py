"""Single-trial betas: the offline GLMsingle-style calibration fit and the real-time estimator (see docs/glm.md)."""

from rt_mindeye.glm.config import GLMConfig, RealtimeConfig
from rt_mindeye.glm.design import RunEvents
from rt_mindeye.glm.errors import GLMInputError, RealtimeStateError
from rt_mindeye.glm.estimator import GLMCalibration, GLMSingle, fit_run_frozen
from rt_mindeye.glm.realtime import RealtimeGLM, TrialEstimate

__all__ = ["GLMConfig", "RealtimeConfig", "RunEvents", "GLMInputError", "RealtimeStateError", "GLMCalibration",
           "GLMSingle", "fit_run_frozen", "RealtimeGLM", "TrialEstimate"]
