"""Shared fixtures of the preprocessing tests: a small synthetic head and the real Siemens EPI volume."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from rt_mindeye.preprocess.geometry import LPS_FROM_RAS
from rt_mindeye.preprocess.synthetic import SyntheticHead, make_affine, make_volume

SMALL_SHAPE = (40, 40, 30)
SMALL_VOXEL_MM = 4.0


@pytest.fixture(scope="session")
def small_grid():
    """(shape, oblique affine) of a small EPI-like grid."""
    return SMALL_SHAPE, make_affine(SMALL_SHAPE, SMALL_VOXEL_MM, rotation_deg=(12.0, 0.0, -7.0))


@pytest.fixture(scope="session")
def small_head(small_grid):
    shape, affine = small_grid
    return SyntheticHead.fitting(shape, affine, seed=3)


@pytest.fixture(scope="session")
def real_epi(siemens_export_dir):
    """The first real EPI volume (64x64x27, 3x3x4 mm) as a Volume with a RAS+ affine."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom.dicomwrappers import wrapper_from_file

        wrapper = wrapper_from_file(str(siemens_export_dir / "001_000013_000001.dcm"))
        data = np.asarray(wrapper.get_data(), dtype=np.float32)
        affine_lps = np.asarray(wrapper.affine, dtype=np.float64)  # nibabel's DICOM affine is in LPS
    affine_ras = affine_lps.copy()
    affine_ras[:3, :] = LPS_FROM_RAS @ affine_lps[:3, :]
    return make_volume(data, affine_ras, index=1)
