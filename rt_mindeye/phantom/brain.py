"""Anatomy, acquisition geometry and visual tuning of the simulated brain: pure functions, no state.

Coordinates: the scanner world is RAS+ millimetres (NIfTI convention). The head has its own frame (also mm, RAS
axes) with the centre of the cerebrum at the origin; a subject's pose (offset + rotation + size) places it in the
world. The acquisition grid indexes voxels ``[i, j, k]`` as the product reader (:mod:`rt_mindeye.ingest.dicom`) and
dcm2niix do: ``i`` is the DICOM column index (along the row cosine: towards the patient's left for an axial slice),
``j`` the row index (along the column cosine: posterior) and ``k`` the slice (along the slice normal: superior, tilted
by ``slice_tilt_deg``). A mosaic tile is ``data[:, :, k].T``. Masks and voxel indices of the ground truth therefore
apply directly to volumes read back from the phantom's DICOM files.

Tissue intensities imitate a T2*-weighted gradient-echo EPI at 3T: CSF brightest, grey matter brighter than white
matter, bone dark, scalp moderate; the smooth random fields that fold the cortex and texture the tissue give motion
correction real edges to lock onto.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Scanner units of each tissue (before coil shading and texture).
INTENSITY = {
    "background": 0.0, "scalp": 260.0, "skull": 70.0, "csf": 1050.0, "grey": 760.0, "white": 560.0,
    "ventricle": 1150.0, "cerebellum": 700.0, "eye": 950.0,
}
# Tissue labels stored in the label volume.
LABELS = {name: code for code, name in enumerate(INTENSITY)}

# Adult head geometry in the head frame (mm, RAS): semi-axes of ellipsoids and their centres.
BRAIN_CENTRE = np.array([0.0, 0.0, 0.0])
BRAIN_AXES = np.array([68.0, 86.0, 58.0])
HEAD_CENTRE = np.array([0.0, 4.0, -14.0])
HEAD_AXES = np.array([84.0, 104.0, 92.0])
CEREBELLUM_CENTRE = np.array([0.0, -55.0, -46.0])
CEREBELLUM_AXES = np.array([50.0, 30.0, 20.0])
VENTRICLE_CENTRES = np.array([[-11.0, 4.0, 12.0], [11.0, 4.0, 12.0]])
VENTRICLE_AXES = np.array([6.0, 24.0, 9.0])
EYE_CENTRES = np.array([[-32.0, 78.0, -34.0], [32.0, 78.0, -34.0]])
EYE_RADIUS = 12.0
OCCIPITAL_POLE = np.array([0.0, -86.0, -2.0])
CORTEX_DEPTH = 0.2  # grey-matter depth (gyri included) as a fraction of the brain's normalised radius


# --- geometry ---------------------------------------------------------------------------------------------------

def rotation_matrix(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation (radians) about x, then y, then z of a fixed frame: R = Rz @ Ry @ Rx."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def rigid_matrix(params: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """4x4 world transform for 6 rigid parameters (tx, ty, tz mm; rx, ry, rz radians), rotating about ``centre``.

    ``x' = R (x - centre) + centre + t``: where a point of the head at ``x`` (reference position) is now.
    """
    rot = rotation_matrix(*params[3:6])
    matrix = np.eye(4)
    matrix[:3, :3] = rot
    matrix[:3, 3] = centre + np.asarray(params[:3]) - rot @ centre
    return matrix


def dicom_orientation(tilt_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row cosine, column cosine, slice normal) in DICOM LPS for axial slices tilted about left-right.

    The row cosine points to the patient's left (columns increase leftwards), the column cosine posterior (rows
    increase backwards, tilted down at the back for a positive tilt) and the normal superior, as on a Siemens scanner
    for a transversal slab.
    """
    t = np.deg2rad(tilt_deg)
    row_cosine = np.array([1.0, 0.0, 0.0])
    column_cosine = np.array([0.0, np.cos(t), np.sin(t)])
    normal = np.cross(row_cosine, column_cosine)
    return row_cosine, column_cosine, normal


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def acquisition_affine(matrix: tuple[int, int, int], voxel_size_mm: tuple[float, float, float],
                       slab_centre_ras: tuple[float, float, float], tilt_deg: float) -> np.ndarray:
    """4x4 RAS+ affine of the acquisition grid ``[i, j, k]`` whose centre sits at ``slab_centre_ras``.

    ``matrix`` and ``voxel_size_mm`` are given in that order: (columns, rows, slices) and their spacings.
    """
    row_cos, col_cos, normal = dicom_orientation(tilt_deg)
    di, dj, dk = voxel_size_mm
    # i (DICOM column index) moves along the row cosine, j (row index) along the column cosine.
    lps = np.column_stack([row_cos * di, col_cos * dj, normal * dk])
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ lps
    centre_index = (np.asarray(matrix, float) - 1) / 2
    affine[:3, 3] = np.asarray(slab_centre_ras, float) - affine[:3, :3] @ centre_index
    return affine


def grid_world_coordinates(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """RAS mm of every voxel centre, shape ``shape + (3,)``."""
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    return world.T.reshape(*shape, 3)


# --- smooth random fields ---------------------------------------------------------------------------------------

class SmoothField:
    """A smooth random scalar field defined everywhere (sum of random plane waves), unit variance.

    ``scale_mm`` is the typical length over which it changes. Defined by its generator's draws only, so it is the
    same at any resolution, which keeps anatomy consistent between presets and under resampling.
    """

    def __init__(self, rng: np.random.Generator, scale_mm: float, n_waves: int = 48):
        self.k = rng.normal(0.0, 1.0 / scale_mm, size=(n_waves, 3))
        self.phase = rng.uniform(0, 2 * np.pi, size=n_waves)
        self.amp = np.sqrt(2.0 / n_waves)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        flat = points.reshape(-1, 3)
        out = np.zeros(len(flat))
        for start in range(0, len(flat), 262_144):  # bounded memory for big grids
            chunk = flat[start:start + 262_144]
            out[start:start + 262_144] = self.amp * np.cos(chunk @ self.k.T + self.phase).sum(axis=1)
        return out.reshape(points.shape[:-1])


def _ellipsoid_radius(points: np.ndarray, centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    return np.sqrt((((points - centre) / axes) ** 2).sum(axis=-1))


# --- anatomy ----------------------------------------------------------------------------------------------------

def render_anatomy(points_head: np.ndarray, rng: np.random.Generator,
                   ventricle_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Tissue labels and EPI intensity at head-frame points (mm), shape ``points.shape[:-1]``.

    ``rng`` draws the subject's cortical folding and tissue texture. Intensities are blurred by about half a voxel
    so edges are partial-volumed as in a real image.
    """
    fold = SmoothField(rng, scale_mm=7.0)
    fold_coarse = SmoothField(rng, scale_mm=25.0)
    texture = SmoothField(rng, scale_mm=4.0)
    r_brain = _ellipsoid_radius(points_head, BRAIN_CENTRE, BRAIN_AXES) * (1 - 0.025 * fold_coarse(points_head))
    r_head = _ellipsoid_radius(points_head, HEAD_CENTRE, HEAD_AXES)
    r_cereb = _ellipsoid_radius(points_head, CEREBELLUM_CENTRE, CEREBELLUM_AXES)
    folds = fold(points_head)

    labels = np.full(points_head.shape[:-1], LABELS["background"], np.uint8)
    labels[r_head < 1.0] = LABELS["scalp"]
    labels[(r_brain < 1.13) | (r_cereb < 1.18)] = LABELS["skull"]
    labels[(r_brain < 1.05) | (r_cereb < 1.09)] = LABELS["csf"]
    labels[r_cereb < 1.0] = LABELS["cerebellum"]
    # Sulci: CSF reaching into the outer cortex where the folding field is high.
    cortex = r_brain < 1.0
    labels[cortex] = LABELS["grey"]
    labels[cortex & (r_brain > 1.0 - 0.7 * CORTEX_DEPTH) & (folds > 1.1)] = LABELS["csf"]
    # White matter reaches into the gyri (where the folding field is low), so grey and white interdigitate.
    white = r_brain < (1.0 - CORTEX_DEPTH) * (1.0 + 0.12 * np.clip(-folds, -1.0, 2.0))
    labels[white] = LABELS["white"]
    for centre in VENTRICLE_CENTRES:
        labels[_ellipsoid_radius(points_head, centre, VENTRICLE_AXES * ventricle_scale) < 1.0] = LABELS["ventricle"]
    for centre in EYE_CENTRES:
        labels[np.linalg.norm(points_head - centre, axis=-1) < EYE_RADIUS] = LABELS["eye"]

    table = np.array(list(INTENSITY.values()), np.float64)
    intensity = table[labels]
    in_head = labels != LABELS["background"]
    intensity[in_head] *= 1.0 + 0.06 * texture(points_head[in_head])
    # Partial volume and the EPI point-spread function: blur by sigma 0.75 voxel (about 1.8 voxels FWHM).
    intensity = ndimage.gaussian_filter(intensity, sigma=0.75, mode="nearest") if intensity.ndim == 3 else intensity
    return labels, intensity.astype(np.float32)


def brain_mask_from_labels(labels: np.ndarray) -> np.ndarray:
    return np.isin(labels, [LABELS["grey"], LABELS["white"], LABELS["ventricle"], LABELS["cerebellum"]])


def coil_shading(points_world: np.ndarray, rng: np.random.Generator, strength: float = 0.15) -> np.ndarray:
    """Multiplicative receive-coil sensitivity (fixed to the scanner, so it does not move with the head)."""
    field = SmoothField(rng, scale_mm=80.0, n_waves=12)
    return (1.0 + strength * np.tanh(field(points_world))).astype(np.float32)


# --- visual tuning ----------------------------------------------------------------------------------------------

def image_feature_maps(images: np.ndarray, grid: int = 32) -> np.ndarray:
    """Low-level maps the pRF voxels pool: (N, 4, grid, grid) = contrast energy, luminance, red-green, blue-yellow.

    ``images`` uint8 (N, H, W, 3). Contrast energy is the gradient magnitude of luminance at ~1/32 image scale.
    Each map is expressed on the image grid with row 0 at the top of the image.
    """
    rgb = images.astype(np.float32) / 255.0
    n, h, w, _ = rgb.shape
    lum = rgb.mean(axis=-1)
    smooth = ndimage.gaussian_filter(lum, sigma=(0, h / 224, w / 224))
    gy = ndimage.sobel(smooth, axis=1)
    gx = ndimage.sobel(smooth, axis=2)
    energy = np.hypot(gx, gy)
    red_green = rgb[..., 0] - rgb[..., 1]
    blue_yellow = rgb[..., 2] - 0.5 * (rgb[..., 0] + rgb[..., 1])
    maps = np.stack([energy, lum, red_green, blue_yellow], axis=1)
    # Area-average down to grid x grid.
    fh, fw = h // grid, w // grid
    maps = maps[:, :, :fh * grid, :fw * grid].reshape(n, 4, grid, fh, grid, fw).mean(axis=(3, 5))
    return maps.astype(np.float32)


def prf_weights(centres: np.ndarray, sizes: np.ndarray, grid: int) -> np.ndarray:
    """Normalised 2-D Gaussian weights (V, grid*grid) on a grid covering the image.

    ``centres`` (V, 2) are visual-field positions (x right, y up) in units of the image half-width, so the image spans
    [-1, 1]^2; ``sizes`` (V,) are Gaussian sigmas in the same units. Row 0 of the grid is the top of the image.
    """
    coords = (np.arange(grid) + 0.5) / grid * 2 - 1
    xs = coords[None, None, :]
    ys = -coords[None, :, None]
    g = np.exp(-((xs - centres[:, 0, None, None]) ** 2 + (ys - centres[:, 1, None, None]) ** 2)
               / (2 * sizes[:, None, None] ** 2))
    g = g.reshape(len(centres), -1)
    total = g.sum(axis=1, keepdims=True)
    return (g / np.maximum(total, 1e-12)).astype(np.float32)


def retinotopy(points_head: np.ndarray, pole: np.ndarray, depth_mm: float, height_mm: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Population receptive fields for visual voxels at head-frame points (V, 3).

    A coarse model of early visual cortex: each hemisphere sees the opposite half of the visual field,
    eccentricity grows with distance forward from the occipital pole (log-like, foveal magnification), and the
    upper bank of the calcarine represents the lower visual field. Returns (centres (V, 2) in image half-widths,
    sizes (V,), anterior position (V,) in [0, 1]).
    """
    forward = np.clip((points_head[:, 1] - pole[1]) / depth_mm, 0.0, 1.0)
    eccentricity = 0.04 + 1.1 * forward ** 1.4
    elevation = np.clip((points_head[:, 2] - pole[2]) / height_mm, -1.0, 1.0) * (np.pi / 2) * 0.95
    hemifield = -np.sign(points_head[:, 0] + 1e-6)
    centres = np.column_stack([hemifield * eccentricity * np.cos(elevation), -eccentricity * np.sin(elevation)])
    centres += rng.normal(0.0, 0.04 + 0.08 * eccentricity[:, None], size=centres.shape)
    sizes = (0.05 + 0.22 * eccentricity) * np.exp(rng.normal(0.0, 0.2, size=len(points_head)))
    return centres.astype(np.float32), sizes.astype(np.float32), forward.astype(np.float32)
