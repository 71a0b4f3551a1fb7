"""calibration.ensemble_members: several fine-tunes written to the bundle and decoded together by the decoder."""

from __future__ import annotations

import numpy as np
import torch


def test_an_ensemble_bundle_holds_every_member_and_the_decoder_averages_them(calibrated_phantom, tmp_path):
    from rt_mindeye.calibration.bundle import CalibrationBundle
    from rt_mindeye.calibration.config import CalibrationConfig
    from rt_mindeye.calibration.workflow import calibrate
    from rt_mindeye.convert.mindeye2 import load_for_inference
    from rt_mindeye.model.ensemble import average_normalised
    from rt_mindeye.model.train import TrainConfig
    from rt_mindeye.runtime.decoder import BundleModel

    phantom_dir = calibrated_phantom.phantom_dir
    bundle_dir = tmp_path / "bundle"
    stale = bundle_dir / "model" / "member-05.pth"  # left by an earlier calibration with more members
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old member")
    result = calibrate(phantom_dir, bundle_dir, CalibrationConfig(
        subject="phantom01", calibration_runs=2, condition_column="stim_file",
        anatomical_mask=phantom_dir / "truth" / "visual_mask.nii.gz", noise_pool_voxels=300,
        pretrained=calibrated_phantom.root / "pretrained" / "last.pth", holdout_fraction=0.2, ensemble_members=2,
        train=TrainConfig(epochs=1, batch_size=8, time_budget_min=0.0, seed=4)), dicom_dir=phantom_dir / "dicom",
        session_id="test")

    bundle = CalibrationBundle.open(bundle_dir)
    paths = bundle.model_checkpoints()
    assert [p.name for p in paths] == ["last.pth", "member-02.pth"]
    assert not stale.exists()
    assert bundle.info.extra["ensemble_members"] == 2
    assert result.holdout_top1 is not None  # scored with the ensemble

    model = BundleModel(bundle)
    assert len(model.members) == 2
    betas = np.random.default_rng(0).normal(size=(5, bundle.info.n_voxels)).astype(np.float32)
    clip, _, _ = model(betas)
    with torch.no_grad():
        singles = [load_for_inference(p).model(torch.from_numpy(betas), 0).clip_voxels for p in paths]
    # Members are other fine-tunes (seeds 4 and 5: other new heads), and the decoder votes with both.
    assert not torch.allclose(singles[0], singles[1])
    assert torch.allclose(clip, average_normalised(singles), atol=1e-6)
    assert not torch.allclose(clip, singles[0])
