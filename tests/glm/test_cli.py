"""`rt-mindeye glm fit` on NIfTI runs and BIDS events written to a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rt_mindeye.cli import main
from rt_mindeye.glm.design import read_trials_tsv
from rt_mindeye.glm.estimator import GLMCalibration, GLMSingle


@pytest.fixture(scope="module")
def bids_runs(tmp_path_factory, synthetic_session):
    """The simulated session's voxels placed in a 8x8x6 grid (the rest is dark background)."""
    s = synthetic_session
    root = tmp_path_factory.mktemp("glm_cli")
    shape = (8, 8, 6)
    mask = np.zeros(shape, bool)
    mask.reshape(-1)[:s.runs[0].shape[1]] = True
    affine = np.diag([3.0, 3.0, 3.5, 1.0])
    bold, events = [], []
    for r, run in enumerate(s.runs):
        vol = np.full(shape + (run.shape[0],), 5.0, np.float32)
        vol[mask] = run.T
        path = root / f"run-{r + 1}_bold.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), str(path))
        bold.append(str(path))
        ev = root / f"run-{r + 1}_events.tsv"
        # Listed out of onset order on purpose: trials.tsv must come out sorted.
        order = np.arange(len(s.events[r]))[::-1]
        lines = ["onset\tduration\ttrial_type"] + [
            f"{s.events[r].onsets[k]}\t{s.events[r].durations[k]}\t{s.events[r].trial_types[k]}" for k in order]
        ev.write_text("\n".join(lines) + "\n")
        events.append(str(ev))
    mpath = root / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(mpath))
    return root, bold, events, str(mpath), mask


def test_fit_writes_every_output_with_the_right_shapes(bids_runs, synthetic_session, fits):
    root, bold, events, mask_path, mask = bids_runs
    out = root / "out"
    rc = main(["glm", "fit", "--bold", *bold, "--events", *events, "--tr", str(synthetic_session.tr),
               "--mask", mask_path, "--model", "d", "--out", str(out), "--quiet"])
    assert rc == 0
    n_trials = sum(len(e) for e in synthetic_session.events)
    betas = nib.load(str(out / "betas.nii.gz"))
    assert betas.shape == mask.shape + (n_trials,)
    assert np.allclose(betas.affine, np.diag([3.0, 3.0, 3.5, 1.0]))
    for name in ("hrf_index", "r2", "frac", "noise_pool"):
        assert nib.load(str(out / f"{name}.nii.gz")).shape == mask.shape
    trials = read_trials_tsv(out / "trials.tsv")
    assert len(trials["run"]) == n_trials
    for r in range(len(synthetic_session.events)):
        rows = trials["run"] == r
        assert list(trials["trial"][rows]) == list(range(rows.sum()))
        assert np.allclose(trials["onset"][rows], synthetic_session.events[r].onsets, atol=1e-4)
        assert list(trials["trial_type"][rows]) == list(synthetic_session.events[r].trial_types)
    # The volumes hold the same betas as fitting the arrays directly, in trials.tsv order.
    data = np.asarray(betas.dataobj)[mask].T
    assert np.allclose(data, fits["d"].betas_, atol=1e-4)
    cal = GLMCalibration.load(out)
    assert cal.n_voxels == mask.sum() and cal.model == "d"
    with np.load(out / "noise_components.npz") as nc:
        assert int(nc["n_pcs"]) == cal.n_pcs and nc["run0"].shape[1] == cal.n_pcs
    assert json.loads((out / "summary.json").read_text())["n_trials"] == n_trials


def test_region_fit_with_whole_brain_noise_pool_saved_types_and_fixed_pcs(bids_runs, synthetic_session):
    root, bold, events, mask_path, mask = bids_runs
    s = synthetic_session
    # Fit a region (the first 120 voxels) while the noise pool comes from the whole brain (default --noise-mask).
    region = np.zeros_like(mask)
    region.reshape(-1)[:120] = True
    region_path = root / "region.nii.gz"
    nib.save(nib.Nifti1Image(region.astype(np.uint8), np.diag([3.0, 3.0, 3.5, 1.0])), str(region_path))
    out = root / "region_out"
    rc = main(["glm", "fit", "--bold", *bold, "--events", *events, "--tr", str(s.tr), "--mask", str(region_path),
               "--model", "d", "--n-pcs", "2", "--no-rescale", "--save-types", "abcd", "--out", str(out), "--quiet"])
    assert rc == 0
    n_trials = sum(len(e) for e in s.events)
    for kind in "abcd":
        assert nib.load(str(out / f"betas_type{kind}.nii.gz")).shape == mask.shape + (n_trials,)
    betas_d = np.asarray(nib.load(str(out / "betas_typed.nii.gz")).dataobj)
    assert np.array_equal(betas_d, np.asarray(nib.load(str(out / "betas.nii.gz")).dataobj))
    direct = GLMSingle(model="d", n_pcs=2, rescale=False).fit([y[:, :120] for y in s.runs], s.events, s.tr,
                                                              noise_runs=s.runs)
    assert np.allclose(betas_d[region].T, direct.betas_, atol=1e-4)
    pool = np.asarray(nib.load(str(out / "noise_pool_candidates.nii.gz")).dataobj) > 0
    assert pool.sum() == direct.noise_pool_candidates_.sum() and not np.any(pool & ~mask)
    assert (pool & ~region).any()  # drawn from outside the fitted region
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_pcs"] == 2 and summary["config"]["rescale"] is False and summary["saved_types"] == list("abcd")
    assert summary["ar_rho"] == pytest.approx(direct.ar_rho_) and summary["ar_rho"] > 0  # prewhitened by default
    for name in ("meanvol", "onoff_r2", "hrf_r2", "pcvoxels"):
        assert nib.load(str(out / f"{name}.nii.gz")).shape == mask.shape
    assert nib.load(str(out / "r2_run.nii.gz")).shape == mask.shape + (len(s.runs),)
    assert nib.load(str(out / "scale_offset.nii.gz")).shape == mask.shape + (2,)


def test_fit_errors_are_one_line_with_exit_status_2(bids_runs, capsys, tmp_path):
    root, bold, events, mask_path, _ = bids_runs
    rc = main(["glm", "fit", "--bold", *bold, "--events", *events[:2], "--tr", "1.5", "--out", str(tmp_path)])
    assert rc == 2
    assert "--events" in capsys.readouterr().err
    rc = main(["glm", "fit", "--bold", bold[0], "--events", str(root / "missing.tsv"), "--tr", "1.5",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 2
    assert "missing.tsv" in capsys.readouterr().err
    # A gzipped run cut short: a one-line error naming the file, not a traceback.
    cut = tmp_path / "cut_bold.nii.gz"
    whole = Path(bold[0]).read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    rc = main(["glm", "fit", "--bold", str(cut), "--events", events[0], "--tr", "1.5", "--out", str(tmp_path / "o"),
               "--quiet"])
    assert rc == 2
    assert "cut_bold.nii.gz" in capsys.readouterr().err
