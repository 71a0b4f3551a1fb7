"""Load the ConvNeXt teacher of MindEye2's auxiliary low-level loss from a local checkpoint.

MindEye2 (``src/autoencoder/convnext.py``) reads ``convnext_xlarge_alpha0.75_fullckpt.pth`` (VICRegL): a dict whose
``model`` entry is a state dict with ``module.``-prefixed keys: ``backbone.*`` (ConvNeXt-XL) and ``maps_projector.*``
(the 2048 -> 512 map MLP) among other heads of the self-supervised training. The module tree of
:class:`rt_mindeye.model.embedders.ConvNeXtTeacher` mirrors those names, so conversion is: unwrap the container, strip
the prefix, keep the two parts (every other top-level part is dropped on purpose and reported), load strictly. The
architecture (depths, widths, projector) is read from the shapes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from rt_mindeye.errors import CheckpointError, CheckpointKeyError

CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")
STRIP_PREFIXES = ("module.",)
KEPT_PARTS = ("backbone.", "maps_projector.")


def unwrap(obj: Mapping[str, Any], path=None) -> dict[str, torch.Tensor]:
    for key in CONTAINER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"the state dict holds a non-tensor entry {key!r}")
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def split(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the teacher's keys, the keys dropped on purpose)."""
    kept = {k: v for k, v in state_dict.items() if k.startswith(KEPT_PARTS)}
    return kept, sorted(k for k in state_dict if k not in kept)


def infer_teacher_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """depths, dims and projector widths of a ConvNeXt teacher state dict."""
    stages = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"^backbone\.stages\.(\d+)\.", k))})
    if not stages:
        raise CheckpointKeyError(None, missing=["backbone.stages.0.0.dwconv.weight"])
    depths = tuple(len({int(m.group(1)) for k in state_dict
                        if (m := re.match(rf"^backbone\.stages\.{i}\.(\d+)\.", k))}) for i in stages)
    dims = tuple(int(state_dict[f"backbone.stages.{i}.0.dwconv.weight"].shape[0]) for i in stages)
    linears = sorted(int(m.group(1)) for k in state_dict
                     if (m := re.match(r"^maps_projector\.(\d+)\.weight$", k)) and state_dict[k].ndim == 2)
    projector = tuple(int(state_dict[f"maps_projector.{i}.weight"].shape[0]) for i in linears)
    if not projector:
        raise CheckpointKeyError(None, missing=["maps_projector.0.weight"])
    return {"depths": depths, "dims": dims, "projector": projector}


def load_convnext_teacher(path: str | Path, *, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32):
    """A :class:`~rt_mindeye.model.embedders.ConvNeXtTeacher` with the checkpoint's weights, in eval mode.

    Returns ``(teacher, dropped_keys)``. Reads with ``torch.load(weights_only=True)`` (nothing is executed) or
    safetensors; missing and mis-shaped keys raise :class:`CheckpointKeyError`."""
    from rt_mindeye.model.embedders import ConvNeXtTeacher

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file (weights are read from local paths only)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch and safetensors raise several unrelated types for unreadable files
        raise CheckpointError(path, f"cannot read the ConvNeXt checkpoint: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a dict, found {type(obj).__name__}")
    kept, dropped = split(unwrap(obj, path))
    try:
        config = infer_teacher_config(kept)
    except CheckpointKeyError as exc:
        raise CheckpointKeyError(path, exc.missing) from exc
    with torch.device("meta"):
        teacher = ConvNeXtTeacher(**config)
    expected = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    missing = [k for k in expected if k not in kept]
    unexpected = [k for k in kept if k not in expected]
    mismatched = [(k, expected[k], tuple(v.shape)) for k, v in kept.items() if k in expected
                  and tuple(v.shape) != expected[k]]
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(path, missing, unexpected, mismatched)
    teacher.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in kept.items()}, strict=True,
                            assign=True)
    return teacher.eval().requires_grad_(False), dropped
