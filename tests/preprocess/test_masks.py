"""Masks: NIfTI loading against the reference geometry, the repeat-reliability mask, apply_mask."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from rt_mindeye.errors import GeometryMismatchError, SessionError
from rt_mindeye.preprocess.masks import (
    MaskGeometryError,
    apply_mask,
    load_mask,
    reliability,
    reliability_mask,
    save_mask,
    select_voxels,
)
from rt_mindeye.preprocess.config import MaskConfig
from rt_mindeye.preprocess.synthetic import make_affine, make_volume

SHAPE = (6, 5, 4)
AFFINE = make_affine(SHAPE, 2.5, rotation_deg=(5.0, 0.0, 10.0))


def test_load_mask_round_trip(tmp_path):
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:4, 2:4, 1:3] = True
    path = save_mask(tmp_path / "nsdgeneral.nii.gz", mask, AFFINE)
    loaded = load_mask(path, (SHAPE, AFFINE))
    assert loaded.dtype == bool
    np.testing.assert_array_equal(loaded, mask)


def test_load_mask_treats_minus_one_as_outside(tmp_path):
    data = -np.ones(SHAPE, dtype=np.int16)
    data[2, 2, 2] = 1
    data[0, 0, 0] = 0
    path = tmp_path / "nsd_style.nii"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    loaded = load_mask(path, make_volume(np.zeros(SHAPE), AFFINE))
    assert loaded.sum() == 1 and loaded[2, 2, 2]


def test_mask_on_another_grid_names_the_file(tmp_path):
    path = save_mask(tmp_path / "other_session_mask.nii.gz", np.ones(SHAPE, bool), AFFINE)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [0.0, 2.0, 0.0]
    with pytest.raises(GeometryMismatchError, match="other_session_mask.nii.gz") as info:
        load_mask(path, (SHAPE, shifted))
    assert isinstance(info.value, MaskGeometryError)
    assert info.value.field == "affine"
    with pytest.raises(MaskGeometryError, match="other_session_mask.nii.gz.*shape"):
        load_mask(path, ((6, 5, 5), AFFINE))


def test_missing_or_unreadable_mask(tmp_path):
    with pytest.raises(SessionError, match="not found"):
        load_mask(tmp_path / "absent.nii.gz", (SHAPE, AFFINE))
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(SessionError, match="junk.nii"):
        load_mask(junk, (SHAPE, AFFINE))


def test_apply_mask_order_and_dtype():
    data = np.arange(np.prod(SHAPE), dtype=np.float64).reshape(SHAPE)
    mask = data % 7 == 0
    vector = apply_mask(make_volume(data, AFFINE), mask)
    assert vector.dtype == np.float32
    np.testing.assert_array_equal(vector, data[tuple(np.argwhere(mask).T)])
    with pytest.raises(MaskGeometryError, match="shape"):
        apply_mask(data, mask[:, :, :3])


def _synthetic_betas(n_images=100, n_repeats=3, n_voxels=200, n_reliable=30, seed=0):
    """Betas where the first ``n_reliable`` voxels respond the same way to each repeat of an image."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n_images, n_voxels))
    signal[:, n_reliable:] = 0.0
    labels, rows = [], []
    for repeat in range(n_repeats):
        for image in rng.permutation(n_images):
            labels.append(f"img{image:03d}.png")
            rows.append(signal[image] + 0.5 * rng.normal(size=n_voxels))
    # Images shown once are ignored by the score.
    for extra in range(10):
        labels.append(f"single{extra}.png")
        rows.append(rng.normal(size=n_voxels))
    return np.array(rows), labels, n_reliable


@pytest.mark.parametrize("method", ["pairwise", "split_half"])
def test_reliability_mask_finds_the_reliable_voxels(method):
    betas, labels, n_reliable = _synthetic_betas()
    scores = reliability(betas, labels, method=method)
    assert scores[:n_reliable].min() > 0.6
    assert np.abs(scores[n_reliable:]).max() < 0.4
    selected = reliability_mask(betas, labels, threshold=0.5, method=method)
    np.testing.assert_array_equal(np.flatnonzero(selected), np.arange(n_reliable))
    top = reliability_mask(betas, labels, top_n=10, method=method)
    assert top.sum() == 10 and top[:n_reliable].sum() == 10


def test_reliability_mask_intersects_the_anatomical_mask():
    betas, labels, n_reliable = _synthetic_betas()
    anatomical = np.zeros(betas.shape[1], dtype=bool)
    anatomical[10:100] = True
    selected = reliability_mask(betas, labels, threshold=0.5, anatomical_mask=anatomical)
    np.testing.assert_array_equal(np.flatnonzero(selected), np.arange(10, n_reliable))


def test_reliability_handles_constant_voxels_and_bad_input():
    betas, labels, _ = _synthetic_betas(n_voxels=50)
    betas[:, 5] = 3.0
    scores = reliability(betas, labels)
    assert np.isnan(scores[5])
    assert not reliability_mask(betas, labels, threshold=-1.0)[5]
    with pytest.raises(ValueError, match="labels"):
        reliability(betas, labels[:-1])
    with pytest.raises(ValueError, match="exactly one"):
        reliability_mask(betas, labels)
    # Too few repeated images: nothing can be scored.
    assert np.isnan(reliability(betas[:3], labels[:3])).all()


def test_select_voxels_combines_the_anatomical_and_reliability_selections(tmp_path):
    anatomical = np.zeros(SHAPE, dtype=bool)
    anatomical.reshape(-1)[:100] = True  # the first 100 voxels in C order
    save_mask(tmp_path / "visual.nii.gz", anatomical, AFFINE)
    betas, labels, n_reliable = _synthetic_betas(n_voxels=100)
    reference = (SHAPE, AFFINE)

    everything = select_voxels(MaskConfig(), reference)
    assert everything.all()
    only_anatomical = select_voxels(MaskConfig(anatomical_mask="visual.nii.gz"), reference, base_dir=tmp_path)
    np.testing.assert_array_equal(only_anatomical, anatomical)
    config = MaskConfig(anatomical_mask="visual.nii.gz", reliability_threshold=0.5)
    selected = select_voxels(config, reference, betas, labels, base_dir=tmp_path)
    np.testing.assert_array_equal(np.flatnonzero(selected.reshape(-1)), np.arange(n_reliable))
    top = select_voxels(MaskConfig(anatomical_mask="visual.nii.gz", reliability_top_n=5), reference, betas, labels,
                        base_dir=tmp_path)
    assert top.sum() == 5 and np.flatnonzero(top.reshape(-1)).max() < n_reliable
    with pytest.raises(ValueError, match="calibration betas"):
        select_voxels(config, reference, base_dir=tmp_path)
    with pytest.raises(ValueError, match="anatomical selection"):
        select_voxels(config, reference, betas[:, :50], labels, base_dir=tmp_path)
