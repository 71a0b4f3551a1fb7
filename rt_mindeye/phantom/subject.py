"""A simulated subject: head anatomy placed in the scanner, a visual-cortex mask and each visual voxel's tuning.

Everything here depends only on the subject number and the acquisition geometry of the configuration, never on the
session seed: the same subject scanned twice has the same brain, masks, HRFs and receptive fields. Different subjects
differ in head size, position and tilt, cortical folding, ventricle size, the number of visual voxels, their
receptive-field maps and their feature tuning (random projections of the driving network's features per subject).

Voxel tuning has three tiers mixed per voxel, with a posterior-to-anterior gradient as along the visual hierarchy:

* low: a 2-D Gaussian population receptive field (pRF) pooling local contrast energy, luminance and colour
  opponency (retinotopic: contralateral hemifield, eccentricity growing forwards, the upper bank seeing the lower
  field);
* mid: the same pRF pooling a few random directions of the driving network's stage-5 channels (EfficientNet-Lite2 by
  default), each half-rectified (a unit that fires for one sign of its feature) with the default
  ``tuning_nonlinearity``;
* high: a random projection of the pooled 1280-d embedding (no spatial selectivity), half-rectified about each
  unit's mean over the session's images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rt_mindeye.phantom import brain
from rt_mindeye.phantom.config import PhantomConfig
from rt_mindeye.phantom.features import LOW_GRID, ImageFeatures, mid_channels

_SUBJECT_SEED = 7_340_033
MID_DIRECTIONS = 8
N_HRFS = 20


@dataclass(eq=False)
class Subject:
    subject_id: int
    shape: tuple[int, int, int]
    affine: np.ndarray
    """RAS+ affine of the acquisition grid (session space)."""
    head_to_world: np.ndarray
    """4x4: head frame (mm) -> world RAS (mm) at the reference position."""
    head_centre_world: np.ndarray
    """World position of the head's rotation centre (the centre of the cerebrum), mm."""
    labels: np.ndarray
    """uint8 tissue labels on the grid (see :data:`brain.LABELS`)."""
    anatomy: np.ndarray
    """float32 tissue baseline intensity on the grid, reference position, before coil shading."""
    coil: np.ndarray
    """float32 receive-coil sensitivity on the grid (fixed to the scanner)."""
    brain_mask: np.ndarray
    visual_mask: np.ndarray
    voxel_indices: np.ndarray
    """(V, 3) grid indices of the visual voxels, in C order of the grid (the order of every per-voxel array)."""
    responsive: np.ndarray
    """(V,) bool: the voxel responds to images."""
    hrf_index: np.ndarray
    """(V,) int: column of the GLMsingle HRF library the voxel's response follows."""
    mean_response: np.ndarray
    """(V,) % signal change of the average image response (0 for non-responsive voxels)."""
    noise_scale: np.ndarray
    """(V,) multiplier of the physiological noise (voxels differ in SNR)."""
    prf_centres: np.ndarray
    prf_sizes: np.ndarray
    tier_weights: np.ndarray
    """(V, 3) weights of the low, mid and high tuning tiers (rows sum to 1)."""
    low_weights: np.ndarray
    """(V, 4) weights of contrast energy, luminance, red-green, blue-yellow."""
    mid_directions: np.ndarray
    """(MID_DIRECTIONS, C) random channel directions of the stage-5 features (C: the driving network's channels)."""
    mid_mix: np.ndarray
    """(V, MID_DIRECTIONS) each voxel's mix of those directions."""
    high_projection: np.ndarray
    """(1280, V) random projection of the embedding."""
    rectified: bool = True
    """Half-rectify the mid and high units before pooling (the phantom's ``tuning_nonlinearity``)."""

    @property
    def n_voxels(self) -> int:
        return len(self.voxel_indices)

    @property
    def visual_flat_indices(self) -> np.ndarray:
        return np.ravel_multi_index(tuple(self.voxel_indices.T), self.shape)

    def tuned_responses(self, features: ImageFeatures) -> np.ndarray:
        """(N_images, V): each voxel's image-specific response, z-scored over the given images."""
        n_images = len(features.low)
        # Matrix products per feature map (BLAS), not one big einsum: minutes -> seconds at 20k voxels.
        prf_low = brain.prf_weights(self.prf_centres, self.prf_sizes, LOW_GRID).T  # (1024, V)
        low_maps = features.low.reshape(n_images, 4, -1)  # (N, 4, 1024)
        low = np.zeros((n_images, self.n_voxels), np.float32)
        for m in range(low_maps.shape[1]):
            low += (low_maps[:, m] @ prf_low) * self.low_weights[:, m]
        mid_grid = features.mid.shape[-1]
        prf_mid = brain.prf_weights(self.prf_centres, self.prf_sizes, mid_grid).T  # (196, V)
        channels = features.mid.reshape(n_images, features.mid.shape[1], -1)  # (N, C, g*g)
        if channels.shape[1] != self.mid_directions.shape[1]:
            raise ValueError(f"mid features have {channels.shape[1]} channels; this subject was built for "
                             f"{self.mid_directions.shape[1]} (another driving network)")
        mid_maps = np.matmul(self.mid_directions[None], channels)  # (N, K, g*g)
        if self.rectified:
            mid_maps = np.maximum(mid_maps, 0.0)
        mid = np.zeros((n_images, self.n_voxels), np.float32)
        for k in range(MID_DIRECTIONS):
            mid += (mid_maps[:, k] @ prf_mid) * self.mid_mix[:, k]
        high = features.high @ self.high_projection
        if self.rectified:
            high = np.maximum(high - high.mean(axis=0, keepdims=True), 0.0)
        tiers = [_zscore(low), _zscore(mid), _zscore(high)]
        combined = sum(t * self.tier_weights[:, i] for i, t in enumerate(tiers))
        return _zscore(combined).astype(np.float32)


def _zscore(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)
    sd = x.std(axis=0, keepdims=True)
    return x / np.where(sd > 0, sd, 1.0)


def make_subject(config: PhantomConfig, subject_id: int = 1) -> Subject:
    """Build subject ``subject_id`` for the geometry of ``config`` (deterministic)."""
    if subject_id < 0:
        raise ValueError(f"subject must be >= 0, got {subject_id}")
    rng = np.random.default_rng([_SUBJECT_SEED, subject_id])
    shape = tuple(config.matrix)
    affine = brain.acquisition_affine(shape, config.voxel_size_mm, config.slab_center_mm, config.slice_tilt_deg)

    # Pose: head size, position and small rotation differ per subject.
    scale = config.head_scale * float(np.exp(rng.normal(0.0, 0.04)))
    offset = rng.normal(0.0, 3.0, size=3) * config.head_scale
    angles = np.deg2rad(rng.normal(0.0, 3.0, size=3))
    head_to_world = np.eye(4)
    head_to_world[:3, :3] = brain.rotation_matrix(*angles) * scale
    head_to_world[:3, 3] = offset
    world = brain.grid_world_coordinates(shape, affine)
    world_to_head = np.linalg.inv(head_to_world)
    points_head = world @ world_to_head[:3, :3].T + world_to_head[:3, 3]
    # The anatomy tables describe an adult head in its own frame; head_to_world carries the size and pose.
    anatomy_rng = np.random.default_rng([_SUBJECT_SEED, subject_id, 1])
    labels, anatomy = brain.render_anatomy(points_head, anatomy_rng, ventricle_scale=float(np.exp(rng.normal(0, 0.15))))
    coil = brain.coil_shading(world, np.random.default_rng([_SUBJECT_SEED, subject_id, 2]))
    brain_mask = brain.brain_mask_from_labels(labels)

    # Visual cortex: the cerebral voxels nearest the occipital pole (grey matter preferred), as many as drawn.
    target = int(round(config.visual_voxels * np.exp(rng.normal(0.0, config.visual_voxels_jitter))))
    cerebral = np.isin(labels, [brain.LABELS["grey"], brain.LABELS["white"]])
    candidates = np.flatnonzero(cerebral)
    if len(candidates) == 0:
        raise ValueError("the imaged slab contains no cerebrum: check slab_center_mm, matrix and head_scale")
    pole = brain.OCCIPITAL_POLE + rng.normal(0.0, 3.0, size=3)
    rel = (points_head.reshape(-1, 3)[candidates] - pole) / np.array([1.0, 1.25, 1.1])
    grey_bonus = np.where(labels.reshape(-1)[candidates] == brain.LABELS["grey"], 0.0, 6.0)
    score = np.linalg.norm(rel, axis=1) + grey_bonus
    chosen = np.sort(candidates[np.argsort(score, kind="stable")[:min(target, len(candidates))]])
    visual_mask = np.zeros(shape, bool)
    visual_mask.reshape(-1)[chosen] = True
    voxel_indices = np.argwhere(visual_mask)  # C order == sorted flat indices
    n_vox = len(voxel_indices)
    p_vis = points_head.reshape(-1, 3)[chosen]

    tuning_rng = np.random.default_rng([_SUBJECT_SEED, subject_id, 3])
    depth = max(float(np.ptp(p_vis[:, 1])), 1.0)
    height = max(float(np.ptp(p_vis[:, 2])) / 2, 1.0)
    centres, sizes, forward = brain.retinotopy(p_vis, pole, depth, height, tuning_rng)
    # Tier mix: low-level posterior, high-level anterior, with voxel-to-voxel scatter.
    raw = np.column_stack([np.clip(1.2 - 2.0 * forward, 0.05, None), 1.0 - np.abs(2.0 * forward - 1.0) + 0.1,
                           np.clip(2.0 * forward - 0.6, 0.05, None)])
    raw *= tuning_rng.gamma(4.0, 0.25, size=raw.shape)
    tier_weights = (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)
    low_weights = np.column_stack([np.ones(n_vox), tuning_rng.normal(0, 0.3, n_vox), tuning_rng.normal(0, 0.4, n_vox),
                                   tuning_rng.normal(0, 0.4, n_vox)]).astype(np.float32)
    channels = mid_channels(config.driving_network)
    mid_directions = tuning_rng.normal(size=(MID_DIRECTIONS, channels)).astype(np.float32) / np.sqrt(channels)
    mid_mix = tuning_rng.normal(size=(n_vox, MID_DIRECTIONS)).astype(np.float32)
    high_projection = (tuning_rng.normal(size=(1280, n_vox)) / np.sqrt(1280)).astype(np.float32)

    # Responsiveness, amplitude, SNR and HRF: smooth across cortex with voxel scatter.
    field_rng = np.random.default_rng([_SUBJECT_SEED, subject_id, 4])
    p_world = world.reshape(-1, 3)[chosen]
    resp_field = brain.SmoothField(field_rng, 12.0)(p_world) + field_rng.normal(0, 0.7, n_vox)
    threshold = np.quantile(resp_field, 1.0 - config.responsive_fraction) if config.responsive_fraction < 1 else -np.inf
    responsive = resp_field >= threshold if config.responsive_fraction > 0 else np.zeros(n_vox, bool)
    amplitude = config.mean_response_psc * np.exp(0.4 * brain.SmoothField(field_rng, 15.0)(p_world)
                                                  + field_rng.normal(0, 0.3, n_vox))
    mean_response = np.where(responsive, amplitude, 0.0).astype(np.float32)
    noise_scale = np.exp(0.3 * brain.SmoothField(field_rng, 20.0)(p_world) + field_rng.normal(0, 0.25, n_vox))
    typical_hrf = 9.5 + field_rng.normal(0, 1.5)
    hrf = typical_hrf + config.hrf_spread * (0.7 * brain.SmoothField(field_rng, 10.0)(p_world)
                                             + 0.7 * field_rng.normal(0, 1, n_vox))
    hrf_index = np.clip(np.round(hrf), 0, N_HRFS - 1).astype(np.int16)

    return Subject(
        subject_id=subject_id, shape=shape, affine=affine, head_to_world=head_to_world,
        head_centre_world=head_to_world[:3, 3] + head_to_world[:3, :3] @ brain.BRAIN_CENTRE,
        labels=labels, anatomy=anatomy, coil=coil, brain_mask=brain_mask, visual_mask=visual_mask,
        voxel_indices=voxel_indices, responsive=responsive, hrf_index=hrf_index, mean_response=mean_response,
        noise_scale=noise_scale.astype(np.float32), prf_centres=centres, prf_sizes=sizes, tier_weights=tier_weights,
        low_weights=low_weights, mid_directions=mid_directions, mid_mix=mid_mix, high_projection=high_projection,
        rectified=config.tuning_nonlinearity == "rectified")
