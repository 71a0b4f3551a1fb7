"""rt_mindeye.preprocess: real-time rigid motion correction and voxel masks.

Public API::

    from rt_mindeye.preprocess import MotionCorrector, MotionConfig
    corrector = MotionCorrector(MotionConfig()).fit(reference_volume)
    result = corrector.update(volume)          # MotionResult: params, fd_mm, fd_level, volume (resliced), elapsed_s

    transform = align_reference(calibration_reference, first_volume_today)   # once per session
    mask_today = resample_to_target(mask_session, session_affine, today_shape, today_affine, transform)
    mask = load_mask("nsdgeneral.nii.gz", reference_volume)
    keep = reliability_mask(betas, trial_types, threshold=0.2)
    vector = apply_mask(volume, mask)
"""

from rt_mindeye.preprocess.config import AlignConfig, MaskConfig, MotionConfig
from rt_mindeye.preprocess.geometry import (
    RigidTransform,
    UnsupportedGeometryError,
    framewise_displacement,
    sitk_to_array,
    volume_to_sitk,
)
from rt_mindeye.preprocess.masks import (
    MaskGeometryError,
    apply_mask,
    load_mask,
    reliability,
    reliability_mask,
    save_mask,
    select_voxels,
)
from rt_mindeye.preprocess.motion import (
    MotionCorrector,
    MotionResult,
    RegistrationError,
    align_reference,
    head_mask,
    resample_to_target,
)

__all__ = [
    "AlignConfig",
    "MaskConfig",
    "MaskGeometryError",
    "MotionConfig",
    "MotionCorrector",
    "MotionResult",
    "RegistrationError",
    "RigidTransform",
    "UnsupportedGeometryError",
    "align_reference",
    "apply_mask",
    "framewise_displacement",
    "head_mask",
    "load_mask",
    "reliability",
    "reliability_mask",
    "resample_to_target",
    "save_mask",
    "select_voxels",
    "sitk_to_array",
    "volume_to_sitk",
]
