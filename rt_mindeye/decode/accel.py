"""Optional UNet acceleration: ``torch.compile`` always, torch-tensorrt when it is installed.

torch-tensorrt comes from NVIDIA's package index and only works on a CUDA machine, so it is never required:
:func:`available` says whether it can be used and :func:`compile_trt` raises :class:`AccelerationUnavailable` with
what to do when it cannot.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Sequence

import torch

from rt_mindeye.errors import RtMindEyeError

TRT_MODULE = "torch_tensorrt"


class AccelerationUnavailable(RtMindEyeError):
    """The requested accelerator cannot be used here; the message says why and what to set instead."""

    def __init__(self, accelerator: str, problem: str):
        self.accelerator = accelerator
        self.problem = problem
        super().__init__(f"{accelerator}: {problem}")


def available() -> bool:
    """True when torch-tensorrt is importable and a CUDA device is present."""
    return importlib.util.find_spec(TRT_MODULE) is not None and torch.cuda.is_available()


def why_unavailable() -> str | None:
    """None when :func:`available`, else a one-line reason with the fix."""
    if importlib.util.find_spec(TRT_MODULE) is None:
        return ("torch-tensorrt is not installed (pip install 'rt-mindeye[trt]' with NVIDIA's index, matching the "
                "torch version); set decode.reconstruction.compile to 'torch' or 'none' to run without it")
    if not torch.cuda.is_available():
        return "torch-tensorrt needs a CUDA device and none is visible; set decode.reconstruction.compile to 'none'"
    return None


def compile_trt(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *,
                dtype: torch.dtype = torch.float16, workspace_bytes: int = 8 << 30) -> torch.nn.Module:
    """Compile ``module`` (positional tensor inputs, static shapes of ``example_inputs``) with torch-tensorrt's
    dynamo path in ``dtype``. Raises :class:`AccelerationUnavailable` when torch-tensorrt cannot be used."""
    reason = why_unavailable()
    if reason is not None:
        raise AccelerationUnavailable("tensorrt", reason)
    torch_tensorrt = importlib.import_module(TRT_MODULE)
    return torch_tensorrt.compile(
        module,
        ir="dynamo",
        inputs=list(example_inputs),
        enabled_precisions={dtype},
        workspace_size=workspace_bytes,
        min_block_size=1,
    )


def compile_torch(module: torch.nn.Module, *, mode: str | None = None) -> torch.nn.Module:
    """``torch.compile`` with a fixed graph (the reconstructor's shapes never change within a session)."""
    return torch.compile(module, mode=mode, dynamic=False)
