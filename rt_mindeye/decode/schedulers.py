"""Samplers for the unCLIP UNet, by name, all on the legacy DDPM schedule the model was trained with.

Any diffusers scheduler with the ``set_timesteps`` / ``scale_model_input`` / ``step`` contract works in
:class:`~rt_mindeye.decode.reconstruct.UnclipReconstructor`; these are the named ones the config offers.

* ``euler``: MindEye2's sampler. sgm's ``EulerEDMSampler`` with ``LegacyDDPMDiscretization`` and no churn is Euler
  on the discrete DDPM sigmas with the EDM-style input scaling 1/sqrt(sigma^2 + 1) and the model evaluated at the
  discrete timestep: exactly diffusers' ``EulerDiscreteScheduler``. sgm picks ``linspace(999, 0, n,
  endpoint=False)`` truncated, diffusers' "trailing" spacing rounds the same grid, so timesteps agree within 1 of
  1000. (diffusers' ``EDMEulerScheduler`` is *not* this: it assumes an EDM-preconditioned network with continuous
  ``c_noise`` inputs, which this UNet is not.)
* ``euler-karras``: the same with Karras sigma spacing.
* ``dpm++2m`` / ``dpm++2m-karras``: DPM-Solver++ 2M (multistep, one UNet pass per step, second order): the
  usual choice for 10-20 steps.
* ``unipc``: UniPC multistep, another good few-step solver.
"""

from __future__ import annotations

from typing import Any, Mapping

from rt_mindeye.decode.config import SCHEDULER_NAMES
from rt_mindeye.decode.unclip import DDPM_SCHEDULE
from rt_mindeye.errors import ConfigError


def make_scheduler(name: str, schedule: Mapping[str, Any] | None = None):
    """A fresh diffusers scheduler called ``name`` (one of :data:`SCHEDULER_NAMES`) on ``schedule``."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    base = dict(DDPM_SCHEDULE if schedule is None else schedule)
    base["timestep_spacing"] = "trailing"
    if name == "euler":
        return EulerDiscreteScheduler(**base)
    if name == "euler-karras":
        return EulerDiscreteScheduler(**base, use_karras_sigmas=True)
    if name == "dpm++2m":
        return DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2)
    if name == "dpm++2m-karras":
        return DPMSolverMultistepScheduler(**base, algorithm_type="dpmsolver++", solver_order=2,
                                           use_karras_sigmas=True)
    if name == "unipc":
        return UniPCMultistepScheduler(**base)
    raise ConfigError(None, "decode.reconstruction.scheduler", f"must be one of {list(SCHEDULER_NAMES)}, got {name!r}")
