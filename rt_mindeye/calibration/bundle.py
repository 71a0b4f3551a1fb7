"""The calibration bundle: everything the live runs freeze from the session's first runs.

::

    BUNDLE/
      bundle.json          format version, subject, session, geometry, TR, voxel count, what made it
      reference.nii.gz     motion-correction reference volume (session space)
      mask.nii.gz          the decoder's voxel mask (anatomical ∩ reliability) on the reference grid
      glm/                 frozen real-time GLM choices (HRF index, noise components, ridge fractions, z-scoring)
      model/               the fine-tuned decoder checkpoint last.pth (published MindEye2 container layout); an
                           ensemble adds member-02.pth, member-03.pth, ... (same layout, other fine-tune seeds)
      candidates.npz       retrieval candidates: image embeddings, ids, stimulus file names
      report.md            reliability summary and held-out retrieval on calibration trials

Live runs call :meth:`CalibrationBundle.check` and refuse a bundle made for another subject or geometry.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from rt_mindeye import __version__
from rt_mindeye.errors import BundleMismatchError, SessionError
from rt_mindeye.volume import Volume

BUNDLE_FORMAT = 1
GEOMETRY_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class BundleInfo:
    subject: str
    session: str
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    affine: tuple[tuple[float, ...], ...]
    tr: float
    n_voxels: int
    calibration_runs: tuple[int, ...]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    software: str = __version__
    format: int = BUNDLE_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format, "software": self.software, "created": self.created, "subject": self.subject,
            "session": self.session, "shape": list(self.shape), "voxel_size": list(self.voxel_size),
            "affine": [list(row) for row in self.affine], "tr": self.tr, "n_voxels": self.n_voxels,
            "calibration_runs": list(self.calibration_runs), "extra": self.extra,
        }

    @classmethod
    def from_json(cls, path: Path, data: dict[str, Any]) -> "BundleInfo":
        try:
            if int(data["format"]) != BUNDLE_FORMAT:
                raise SessionError(path, f"bundle format {data['format']} is not supported (this software reads "
                                         f"format {BUNDLE_FORMAT}); re-run `rt-mindeye calibrate`")
            return cls(subject=str(data["subject"]), session=str(data["session"]), shape=tuple(data["shape"]),
                       voxel_size=tuple(float(v) for v in data["voxel_size"]),
                       affine=tuple(tuple(float(v) for v in row) for row in data["affine"]), tr=float(data["tr"]),
                       n_voxels=int(data["n_voxels"]), calibration_runs=tuple(data["calibration_runs"]),
                       created=str(data["created"]), software=str(data["software"]), format=int(data["format"]),
                       extra=dict(data.get("extra", {})))
        except KeyError as exc:
            raise SessionError(path, f"bundle.json lacks the field {exc.args[0]!r}") from exc


@dataclass(frozen=True)
class BundlePaths:
    """Where each part of a bundle lives; the calibration workflow writes through it, the services read."""

    root: Path

    @property
    def reference_path(self) -> Path:
        return self.root / "reference.nii.gz"

    @property
    def mask_path(self) -> Path:
        """The decoder's voxels."""
        return self.root / "mask.nii.gz"

    @property
    def glm_mask_path(self) -> Path:
        """The voxels the real-time GLM runs on (decoder voxels plus noise-pool candidates)."""
        return self.root / "glm_mask.nii.gz"

    @property
    def decoder_index_path(self) -> Path:
        """Positions of the decoder's voxels within the GLM voxels."""
        return self.glm_dir / "decoder_index.npy"

    @property
    def glm_dir(self) -> Path:
        return self.root / "glm"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def model_checkpoints(self) -> list[Path]:
        """The decoder's checkpoints: ``last.pth`` first, then an ensemble's further members in order."""
        return [self.model_dir / "last.pth", *sorted(self.model_dir.glob("member-*.pth"))]

    @staticmethod
    def member_checkpoint_name(member: int) -> str:
        """File name of ensemble member ``member`` (0-based); member 0 is the single model's ``last.pth``."""
        return "last.pth" if member == 0 else f"member-{member + 1:02d}.pth"

    @property
    def candidates_path(self) -> Path:
        return self.root / "candidates.npz"

    @property
    def report_path(self) -> Path:
        return self.root / "report.md"


@dataclass(frozen=True)
class CalibrationBundle(BundlePaths):
    info: BundleInfo

    # --- reading -------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> "CalibrationBundle":
        root = Path(root)
        path = root / "bundle.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise SessionError(root, "not a calibration bundle (no bundle.json); run `rt-mindeye calibrate` "
                                     "first") from exc
        except json.JSONDecodeError as exc:
            raise SessionError(path, f"invalid JSON at line {exc.lineno}") from exc
        return cls(root, BundleInfo.from_json(path, data))

    def reference(self) -> Volume:
        img = nib.load(str(self.reference_path))
        return Volume(data=np.asarray(img.dataobj, dtype=np.float32), affine=img.affine.astype(np.float64),
                      series=0, volume=0, tr=self.info.tr, acquisition_time=None, slice_times=None,
                      sop_instance_uid="", source=self.reference_path)

    def mask(self) -> np.ndarray:
        return np.asarray(nib.load(str(self.mask_path)).dataobj) > 0

    def glm_mask(self) -> np.ndarray:
        return np.asarray(nib.load(str(self.glm_mask_path)).dataobj) > 0

    def decoder_index(self) -> np.ndarray:
        return np.load(self.decoder_index_path, allow_pickle=False)

    def candidates(self) -> dict[str, np.ndarray]:
        with np.load(self.candidates_path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def check(self, *, subject: str | None, volume: Volume | None) -> None:
        """Refuse a bundle made for another subject, or for a different acquisition grid than ``volume``'s."""
        if subject is not None and str(subject) != self.info.subject:
            raise BundleMismatchError(self.root, f"made for subject {self.info.subject!r}, this session is subject "
                                                 f"{subject!r}: calibrate this subject first")
        if volume is None:
            return
        if tuple(volume.shape) != tuple(self.info.shape):
            raise BundleMismatchError(self.root, f"made for a {self.info.shape} grid, the scanner sends "
                                                 f"{tuple(volume.shape)}: wrong protocol or bundle")
        sizes = np.asarray(volume.voxel_sizes)
        if not np.allclose(sizes, self.info.voxel_size, atol=GEOMETRY_TOLERANCE_MM):
            raise BundleMismatchError(self.root, f"made for {tuple(np.round(self.info.voxel_size, 3))} mm voxels, "
                                                 f"the scanner sends {tuple(np.round(sizes, 3))} mm")


def write_bundle_info(root: Path, info: BundleInfo) -> CalibrationBundle:
    root.mkdir(parents=True, exist_ok=True)
    (root / "bundle.json").write_text(json.dumps(info.to_json(), indent=2) + "\n")
    return CalibrationBundle(root, info)


def save_volume_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64)), str(path))
