"""Real-time rigid motion correction: one registration per volume against a fixed reference, in-process.

:class:`MotionCorrector` follows the estimator pattern: ``MotionCorrector(config).fit(reference)`` builds everything
that depends only on the reference once (head mask, metric sample, SimpleITK registration and resampler, or the
Gauss-Newton Jacobian), then ``update(volume) -> MotionResult`` registers each new volume, starting from the previous
volume's estimate, and reslices it into the reference grid. Both engines minimise mean squares on a fixed random
sample of points inside a head mask at full resolution (10000 for numba, ~2000 for sitk): ``engine="sitk"`` is the tuned SimpleITK setting of the
brief (versor rigid transform, ~15 regular gradient steps), ``engine="numba"`` (default) is inverse-compositional
Gauss-Newton (:mod:`rt_mindeye.preprocess.gauss_newton`).

:func:`align_reference` is the one slower, multi-resolution registration at session start that maps the calibration
session's reference onto today's first volume, so that masks and other session-space arrays can be carried into
today's space with :func:`resample_to_target`.

The parameter convention (RAS+ mm and degrees, rotation about the centre of the reference grid) is documented in
:mod:`rt_mindeye.preprocess.geometry`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from rt_mindeye.errors import GeometryMismatchError, NotFittedError, RtMindEyeError
from rt_mindeye.preprocess.config import AlignConfig, MotionConfig
from rt_mindeye.preprocess.gauss_newton import (
    GaussNewtonRegistration,
    as_kernel_array,
    reslice_nearest,
    reslice_points_trilinear,
    reslice_trilinear,
)
from rt_mindeye.preprocess.geometry import (
    RigidTransform,
    affine_to_itk_geometry,
    array_to_sitk,
    framewise_displacement,
    sitk_to_array,
    volume_center_ras,
    volume_to_sitk,
)
from rt_mindeye.volume import Volume

__all__ = [
    "MotionCorrector",
    "MotionResult",
    "RegistrationError",
    "align_reference",
    "framewise_displacement",
    "head_mask",
    "resample_to_target",
]

_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "lanczos": sitk.sitkLanczosWindowedSinc,
}


class RegistrationError(RtMindEyeError):
    """A registration failed (for instance no overlap between the volume and the reference)."""

    def __init__(self, what: str, problem: str):
        self.what = what
        self.problem = problem
        super().__init__(f"{what}: registration failed: {problem}")


@dataclass(frozen=True)
class MotionResult:
    """What :meth:`MotionCorrector.update` returns for one volume."""

    params: np.ndarray
    """``(tx, ty, tz [mm], rx, ry, rz [deg])`` of the head relative to the reference (see ``geometry``)."""
    transform: RigidTransform
    """The same motion as a rigid map (reference head -> current head), RAS mm."""
    fd_mm: float
    """Framewise displacement relative to the previous volume (0 for the first volume after fit/reset)."""
    fd_level: int
    """How many of the configured FD thresholds (0.2 / 0.3 / 0.4 mm) this volume exceeds (0..3)."""
    volume: Volume | None
    """The volume resliced into the reference grid: float32 data, the reference's affine, the input's metadata
    (``None`` when ``full_reslice`` is off)."""
    voxels: np.ndarray | None
    """``(V,)`` float32 resliced values of the ``voxel_mask`` given to ``fit`` (C order), or ``None`` without one.
    NaN marks a voxel the volume did not acquire: the head moved it more than half a voxel out of the imaged slab
    (:func:`rt_mindeye.glm.missing.fill_not_acquired` and the real-time GLM fill those)."""
    elapsed_s: float
    """Wall time of registration + reslice."""
    registration_s: float
    reslice_s: float
    n_iterations: int
    metric_value: float


def head_mask(data: np.ndarray, threshold: float = 0.15) -> np.ndarray:
    """Boolean head mask of an EPI volume: above ``threshold`` x its 98th percentile, holes filled."""
    data = np.asarray(data, dtype=np.float32)
    level = threshold * float(np.percentile(data, 98))
    mask = data > level
    if not mask.any():
        return mask
    # Keep the largest connected piece (drops ghosts and isolated noise), then fill the holes (ventricles are dark).
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def _crop_box(mask: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, mask.shape)
    return lo, hi


def _shifted_affine(affine: np.ndarray, lo: np.ndarray) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return out


class MotionCorrector:
    """Register each incoming volume rigidly to a reference volume and reslice it into the reference grid.

    Parameters
    ----------
    config:
        :class:`~rt_mindeye.preprocess.config.MotionConfig`; the defaults are the measured real-time setting.

    Attributes (after :meth:`fit`)
    ------------------------------
    reference_ : Volume
        The reference volume.
    mask_ : ndarray of bool
        The head mask (reference grid) the metric samples are drawn from.
    center_ : ndarray (3,)
        RAS+ centre of the reference grid: the rotation centre of the parameters.
    previous_ : RigidTransform
        The last estimate, used to start the next registration.
    history_ : list of ndarray
        Parameters of every volume since ``fit``/``reset``.
    """

    def __init__(self, config: MotionConfig | None = None):
        self.config = config

    # --- fitting ------------------------------------------------------------------------------------------------

    def fit(self, reference: Volume, initial: RigidTransform | None = None,
            voxel_mask: np.ndarray | None = None) -> "MotionCorrector":
        """Prepare the reference image, head mask, registration and resampler.

        ``initial`` seeds the first volume's registration. ``voxel_mask`` (boolean, reference grid) selects voxels
        that every :class:`MotionResult` also carries as a ``(V,)`` vector (``voxels``), resampled directly.
        """
        config = self.config if self.config is not None else MotionConfig()
        if not isinstance(config, MotionConfig):
            raise TypeError(f"config must be a MotionConfig, got {type(config).__name__}")
        data = np.asarray(reference.data, dtype=np.float32)
        what = str(reference.source or f"reference volume {reference.volume}")
        if data.ndim != 3:
            raise GeometryMismatchError(reference.source, "shape", "3-D volume", data.shape)
        if not np.all(np.isfinite(data)):
            raise RegistrationError(what, "the reference has non-finite values")
        mask = head_mask(data, config.mask_threshold)
        if mask.sum() < 64:
            raise RegistrationError(what, f"the head mask has only {int(mask.sum())} voxels (is the volume empty?)")

        self.config_ = config
        self.reference_ = Volume(
            data=data, affine=np.asarray(reference.affine, dtype=np.float64), series=reference.series,
            volume=reference.volume, tr=reference.tr, acquisition_time=reference.acquisition_time,
            slice_times=reference.slice_times, sop_instance_uid=reference.sop_instance_uid, source=reference.source,
            header=reference.header)
        self.mask_ = mask
        if voxel_mask is not None:
            voxel_mask = np.asarray(voxel_mask, dtype=bool)
            if voxel_mask.shape != data.shape:
                raise GeometryMismatchError(reference.source, "voxel_mask shape", data.shape, voxel_mask.shape)
            self.voxel_indices_ = np.argwhere(voxel_mask).astype(np.int64)
        else:
            self.voxel_indices_ = None
        self.center_ = volume_center_ras(data.shape, self.reference_.affine)

        # The metric only looks inside the mask, so hand ITK the mask's bounding box: its per-level copies of the
        # fixed image shrink with it.
        lo, hi = _crop_box(mask, margin=1)
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        crop_affine = _shifted_affine(self.reference_.affine, lo)
        self.fixed_image_ = array_to_sitk(data[crop], crop_affine, what)
        self.reference_image_ = array_to_sitk(data, self.reference_.affine, what)

        # Optimizer scales from the physical shift of a unit parameter change: 1 for translations (mm) and
        # (2 r)^2 for versor components (a versor step v turns by ~2v rad, moving a point at radius r by ~2 v r),
        # with r the RMS radius of the head; rotation_scale < 1 lets rotations take larger steps.
        voxels = np.argwhere(mask).astype(np.float64)
        world = voxels @ self.reference_.affine[:3, :3].T + self.reference_.affine[:3, 3]
        rms_radius = float(np.sqrt(((world - self.center_) ** 2).sum(axis=1).mean()))
        rotation_scale = config.rotation_scale * (2.0 * rms_radius) ** 2
        self.head_radius_mm_ = rms_radius

        if config.engine == "numba":
            self.registration_ = GaussNewtonRegistration(
                config.sample_points, config.n_iterations, config.seed).prepare(
                data, self.reference_.affine, mask, self.center_, rms_radius)
        else:
            fixed_mask = sitk.Cast(array_to_sitk(mask[crop].astype(np.uint8), crop_affine, what), sitk.sitkUInt8)
            self.registration_ = self._build_sitk_registration(config, fixed_mask, mask[crop], rotation_scale)

        resampler = sitk.ResampleImageFilter()
        resampler.SetReferenceImage(self.reference_image_)
        resampler.SetInterpolator(_INTERPOLATORS[config.reslice_interpolation])
        resampler.SetDefaultPixelValue(0.0)
        resampler.SetOutputPixelType(sitk.sitkFloat32)
        resampler.SetNumberOfThreads(config.threads)
        self.resampler_ = resampler

        self.reset(initial)
        if config.engine == "numba":
            # Compile (or load from numba's cache) the kernels now, not on the first live volume.
            self.registration_.register(data, self.reference_.affine, np.eye(4))
            self.reslice(self.reference_, RigidTransform.identity(self.center_))
        return self

    @staticmethod
    def _build_sitk_registration(config: MotionConfig, fixed_mask: sitk.Image, in_mask: np.ndarray,
                                 rotation_scale: float) -> sitk.ImageRegistrationMethod:
        """The tuned SimpleITK registration, built once and re-run on every volume."""
        # ITK draws fraction x (all voxels of the fixed image) points and drops those outside the mask, so the
        # fraction is relative to the in-mask count; the fixed seed makes the sample the same for every volume.
        sampling_fraction = min(1.0, config.sample_points / float(in_mask.sum()))
        registration = sitk.ImageRegistrationMethod()
        registration.SetMetricAsMeanSquares()
        registration.SetMetricFixedMask(fixed_mask)
        if sampling_fraction < 1.0:
            registration.SetMetricSamplingStrategy(registration.RANDOM)
            registration.SetMetricSamplingPercentage(sampling_fraction, config.seed)
        else:
            registration.SetMetricSamplingStrategy(registration.NONE)
        # Gradients at the sample points only (a full gradient image per volume would cost more than the fit).
        registration.SetMetricUseFixedImageGradientFilter(False)
        registration.SetMetricUseMovingImageGradientFilter(False)
        registration.SetInterpolator(sitk.sitkLinear)
        registration.SetOptimizerAsRegularStepGradientDescent(
            learningRate=config.learning_rate, minStep=config.min_step, numberOfIterations=config.n_iterations,
            relaxationFactor=config.relaxation_factor, gradientMagnitudeTolerance=config.gradient_tolerance)
        registration.SetOptimizerScales([rotation_scale] * 3 + [1.0] * 3)
        registration.SetShrinkFactorsPerLevel([1])
        registration.SetSmoothingSigmasPerLevel([0.0])
        registration.SetNumberOfThreads(config.threads)
        return registration

    def reset(self, initial: RigidTransform | None = None) -> None:
        """Forget the motion history (e.g. at a new run); the next volume starts from ``initial`` or identity."""
        self._check_fitted()
        if initial is None:
            initial = RigidTransform.identity(self.center_)
        self.previous_ = RigidTransform.from_matrix(initial.matrix, self.center_)
        self.history_: list[np.ndarray] = []

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "registration_")

    def _check_fitted(self) -> None:
        if not hasattr(self, "registration_"):
            raise NotFittedError(self)

    # --- per volume ---------------------------------------------------------------------------------------------

    def estimate(self, volume: Volume) -> tuple[RigidTransform, int, float]:
        """Register ``volume`` only: (transform reference -> volume, iterations, final metric value)."""
        self._check_fitted()
        what = str(volume.source or f"volume {volume.volume}")
        data = np.asarray(volume.data)
        if data.ndim != 3:
            raise GeometryMismatchError(volume.source, "shape", "3-D volume", data.shape)
        if isinstance(self.registration_, GaussNewtonRegistration):
            try:
                matrix, n_iterations, metric_value = self.registration_.register(
                    data, volume.affine, self.previous_.matrix)
            except ValueError as exc:
                raise RegistrationError(what, str(exc)) from exc
            return RigidTransform.from_matrix(matrix, self.center_), n_iterations, metric_value
        moving = volume_to_sitk(volume)
        transform = self.previous_.to_sitk()
        self.registration_.SetInitialTransform(transform, inPlace=True)
        try:
            self.registration_.Execute(self.fixed_image_, moving)
        except RuntimeError as exc:  # ITK reports "no valid points" and the like as RuntimeError
            raise RegistrationError(what, str(exc).strip().splitlines()[-1]) from exc
        return (RigidTransform.from_sitk(transform, self.center_), int(self.registration_.GetOptimizerIteration()),
                float(self.registration_.GetMetricValue()))

    def reslice(self, volume: Volume, transform: RigidTransform, fill: float = 0.0) -> np.ndarray:
        """Resample ``volume`` into the reference grid through ``transform`` (reference -> volume), float32.
        Reference voxels that fall outside the acquired volume (beyond the edge voxels' half-width) take ``fill``."""
        self._check_fitted()
        interpolation = self.config_.reslice_interpolation
        if self.config_.engine == "numba" and interpolation in ("linear", "nearest"):
            # reference voxel -> reference world -> (motion) -> moving world -> moving voxel
            voxel_map = np.linalg.inv(np.asarray(volume.affine, dtype=np.float64)) @ transform.matrix \
                @ self.reference_.affine
            kernel = reslice_trilinear if interpolation == "linear" else reslice_nearest
            return kernel(as_kernel_array(volume.data), np.ascontiguousarray(voxel_map[:3]),
                          np.asarray(self.reference_.shape, dtype=np.int64), np.float32(fill))
        self.resampler_.SetTransform(transform.to_sitk())
        self.resampler_.SetDefaultPixelValue(float(fill))
        data, _ = sitk_to_array(self.resampler_.Execute(volume_to_sitk(volume)))
        return data

    def reslice_voxels(self, volume: Volume, transform: RigidTransform, fill: float = 0.0) -> np.ndarray:
        """Resample ``volume`` at the ``voxel_mask`` voxels given to :meth:`fit` only (trilinear), ``(V,)``; voxels
        outside the acquired volume take ``fill``."""
        self._check_fitted()
        if self.voxel_indices_ is None:
            raise ValueError("reslice_voxels needs the voxel_mask argument of fit()")
        voxel_map = np.linalg.inv(np.asarray(volume.affine, dtype=np.float64)) @ transform.matrix \
            @ self.reference_.affine
        return reslice_points_trilinear(as_kernel_array(volume.data),
                                        np.ascontiguousarray(voxel_map[:3]), self.voxel_indices_, np.float32(fill))

    def update(self, volume: Volume) -> MotionResult:
        """Register ``volume`` to the reference (from the previous estimate), reslice it, and report the motion."""
        started = time.perf_counter()
        estimate, n_iterations, metric_value = self.estimate(volume)
        registered = time.perf_counter()
        # The mask's voxels say "not acquired" (NaN) where the head moved them out of the imaged slab; the resliced
        # volume, a picture, shows 0 there.
        resliced = self.reslice(volume, estimate, fill=np.nan) if self.config_.full_reslice else None
        voxels = None
        if self.voxel_indices_ is not None:
            if resliced is not None:
                voxels = resliced[tuple(self.voxel_indices_.T)]
            else:
                voxels = self.reslice_voxels(volume, estimate, fill=np.nan)
        if resliced is not None:
            np.nan_to_num(resliced, copy=False, nan=0.0)
        finished = time.perf_counter()

        params = estimate.params
        fd = framewise_displacement(self.history_[-1], params, self.config_.fd_radius_mm) if self.history_ else 0.0
        fd_level = int(sum(fd > t for t in self.config_.fd_thresholds_mm))
        self.previous_ = estimate
        self.history_.append(params)
        out_volume = None if resliced is None else Volume(
            data=resliced, affine=self.reference_.affine.copy(), series=volume.series, volume=volume.volume,
            tr=volume.tr, acquisition_time=volume.acquisition_time, slice_times=volume.slice_times,
            sop_instance_uid=volume.sop_instance_uid, source=volume.source, header=volume.header)
        return MotionResult(params=params, transform=estimate, fd_mm=fd, fd_level=fd_level, volume=out_volume,
                            voxels=voxels,
                            elapsed_s=finished - started, registration_s=registered - started,
                            reslice_s=finished - registered, n_iterations=n_iterations, metric_value=metric_value)


# --- session start: calibration reference -> today ----------------------------------------------------------------


def align_reference(calibration_reference: Volume, first_volume_today: Volume,
                    config: AlignConfig | None = None) -> RigidTransform:
    """Rigid map from the calibration session's head to today's head (RAS mm), by a careful multi-resolution fit.

    The result ``T`` maps a point of the calibration reference's head to the same anatomical point today, about the
    centre of the calibration reference grid. Use :func:`resample_to_target` to carry session-space masks and arrays
    into today's grid. This runs once before the live run, so it may take a second or two.
    """
    config = config if config is not None else AlignConfig()
    what = str(first_volume_today.source or f"volume {first_volume_today.volume}")
    fixed_data = np.asarray(calibration_reference.data, dtype=np.float32)
    fixed = volume_to_sitk(calibration_reference)
    moving = volume_to_sitk(first_volume_today)
    center = volume_center_ras(fixed_data.shape, np.asarray(calibration_reference.affine, dtype=np.float64))
    mask = head_mask(fixed_data)
    fixed_mask = sitk.Cast(array_to_sitk(mask.astype(np.uint8), calibration_reference.affine), sitk.sitkUInt8)

    # Start by matching the centres of mass: between sessions the head can sit centimetres apart.
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.VersorRigid3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS)
    start = RigidTransform.from_sitk(initial, center)
    transform = start.to_sitk()

    registration = sitk.ImageRegistrationMethod()
    if config.metric == "mattes":
        registration.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    elif config.metric == "correlation":
        registration.SetMetricAsCorrelation()
    else:
        registration.SetMetricAsMeanSquares()
    registration.SetMetricFixedMask(fixed_mask)
    registration.SetMetricSamplingStrategy(registration.RANDOM)
    registration.SetMetricSamplingPercentage(min(1.0, config.sampling_fraction), config.seed)
    registration.SetInterpolator(sitk.sitkLinear)
    registration.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-4, numberOfIterations=config.n_iterations, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8)
    registration.SetOptimizerScalesFromPhysicalShift()
    registration.SetShrinkFactorsPerLevel(list(config.shrink_factors))
    registration.SetSmoothingSigmasPerLevel(list(config.smoothing_sigmas_mm))
    registration.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    registration.SetNumberOfThreads(config.threads)
    registration.SetInitialTransform(transform, inPlace=True)
    try:
        registration.Execute(fixed, moving)
    except RuntimeError as exc:
        raise RegistrationError(what, str(exc).strip().splitlines()[-1]) from exc
    return RigidTransform.from_sitk(transform, center)


def resample_to_target(data: np.ndarray, source_affine: np.ndarray, target_shape, target_affine: np.ndarray,
                       transform: RigidTransform | None = None, order: int = 0) -> np.ndarray:
    """Carry an array from a source grid (e.g. the calibration session) into a target grid (e.g. today).

    ``transform`` maps source-head points to target-head points (what :func:`align_reference` returns); ``None``
    means the heads are already aligned in world space. ``order`` 0 is nearest neighbour (for masks and labels,
    keeps the dtype), 1 linear (float32 out). Target voxels that fall outside the source grid get 0.
    """
    data = np.asarray(data)
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    source = array_to_sitk(data.astype(np.float32), source_affine, "source array")
    reference = sitk.Image([int(s) for s in target_shape[:3]], sitk.sitkFloat32)
    origin, spacing, direction = affine_to_itk_geometry(target_affine, "target affine")
    reference.SetOrigin(origin)
    reference.SetSpacing(spacing)
    reference.SetDirection(direction)
    # ITK resampling maps each *output* (target) point into the *input* (source): that is the inverse map.
    itk_transform = transform.inverse().to_sitk() if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    out = sitk.Resample(source, reference, itk_transform,
                        sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    result, _ = sitk_to_array(out)
    if order == 0:
        return result.astype(data.dtype)
    return result.astype(np.float32)
