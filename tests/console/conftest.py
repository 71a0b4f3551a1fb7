"""Message factories for the console tests."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rt_mindeye.transport.messages import DecodeResult, VolumeStatus

T0 = 1.7e9


def volume(v: int, run: int = 1, fd: float = 0.1, missing=()) -> VolumeStatus:
    acq = T0 + 1.5 * v
    return VolumeStatus(session="sub-01_ses-01", run=run, volume=v, acquisition_time=acq, received_at=acq + 0.25,
                        fd=fd, gap=bool(missing), missing=tuple(missing), motion=(0.1, 0.0, -0.1, 0.0, 0.01, 0.0),
                        stage_ms={"motion": 46.0, "glm": 12.0}, created_at=acq + 0.4)


def png_bytes(color=(200, 30, 30), size=64) -> np.ndarray:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def result(trial: int, *, recon: bool = False, run: int = 1, labels=("dog", "cat", "car", "tree", "boat"),
           images=(), stim_file=None, decision="queued") -> DecodeResult:
    acq = T0 + 10.0 * trial
    return DecodeResult(session="sub-01_ses-01", run=run, trial=trial, trial_type="image", estimate_kind="fast",
                        estimate_version=1, stim_file=stim_file, topk_ids=(11, 12, 13, 14, 15),
                        topk_scores=(0.91, 0.52, 0.43, 0.34, 0.25), topk_labels=tuple(labels),
                        topk_images=tuple(images), acquisition_time=acq, betas_sent_at=acq + 0.5,
                        received_at=acq + 0.52, retrieval_done_at=acq + 0.6,
                        reconstruction_done_at=acq + 4.5 if recon else None,
                        reconstruction_path=f"/nonexistent/recon_{trial}.png" if recon else None,
                        thumbnail_png=png_bytes() if recon else None, stage_ms={"retrieval": 9.0},
                        policy="newest", policy_decision="reconstructed" if recon else decision, backlog=1)


@pytest.fixture
def factories():
    class F:
        pass

    f = F()
    f.volume, f.result, f.png_bytes, f.T0 = volume, result, png_bytes, T0
    return f
