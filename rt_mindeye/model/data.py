"""Training data for the model: per-image targets and per-trial betas, from the phantom or from files.

- :func:`image_targets`: tokens of every stimulus image (the embedder's), plus low-level targets for the blurry head.
  With :class:`LowLevelModels` (local-weight SD VAE and ConvNeXt teacher, as MindEye2's full model): the VAE latent
  ``encode(2x - 1).mode() * 0.18215`` of the 224 px image (4 x 28 x 28) and the ConvNeXt teacher's 49 x 512 maps of
  the image and of ``aug_views`` augmented copies (MindEye2's ``blur_augs``; the trainer picks one per trial and step).
  Without them (tiny model, phantom): the image itself shrunk to ``size`` x ``size`` in [-1, 1] and, for the phantom
  embedder, EfficientNet-Lite0 stage-5 maps pooled to 7 x 7 as the auxiliary tokens.
- :func:`phantom_subject_data`: one phantom subject's true betas for chosen runs, z-scored with statistics from the
  calibration runs (what the scanner side can know), joined with the image targets.
- :func:`load_npz` / :func:`save_npz`: a plain file format for real data (``voxels``, ``image_tokens`` and optionally
  ``blurry_targets``, ``aux_targets``), read without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rt_mindeye.errors import SessionError
from rt_mindeye.model.embedders import ImageEmbedder, PhantomEmbedder, images_to_tensor
from rt_mindeye.model.train import SubjectData

AUX_LAYER = "stage5"
AUX_GRID = 7


@dataclass
class ImageTargets:
    tokens: torch.Tensor  # (n_images, seq, dim)
    blurry: torch.Tensor | None  # (n_images, 3, size, size) in [-1, 1], or (n_images, 4, 28, 28) VAE latents
    aux: torch.Tensor | None  # (n_images, grid^2, channels)
    aux_aug: torch.Tensor | None = None  # (n_images, views, grid^2, channels) float16: teacher on augmented images


@dataclass
class LowLevelModels:
    """The local-weight models behind the full model's low-level targets (MindEye2's ``autoenc`` and ``cnx``).

    ``vae``: a diffusers ``AutoencoderKL`` (MindEye2: the SD 1.x VAE ``sd_image_var_autoenc.pth``, loaded with
    :func:`rt_mindeye.convert.unclip.load_diffusers_vae`); ``convnext``: a
    :class:`~rt_mindeye.model.embedders.ConvNeXtTeacher` (:func:`rt_mindeye.convert.convnext.load_convnext_teacher`)
    or None; ``aug_views`` augmented copies per image for the teacher; ``seed`` fixes the augmentations."""

    vae: torch.nn.Module
    convnext: torch.nn.Module | None = None
    image_size: int = 224
    aug_views: int = 4
    scaling_factor: float = 0.18215
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def from_files(cls, vae_path, convnext_path=None, **kwargs) -> "LowLevelModels":
        from rt_mindeye.convert.convnext import load_convnext_teacher
        from rt_mindeye.convert.unclip import load_diffusers_vae

        device = kwargs.get("device", "cpu")
        vae = load_diffusers_vae(vae_path, dtype=torch.float32, device=device)
        convnext = load_convnext_teacher(convnext_path, device=device)[0] if convnext_path else None
        return cls(vae=vae, convnext=convnext, **kwargs)


@torch.no_grad()
def low_level_targets(pixels: torch.Tensor, models: LowLevelModels, batch_size: int = 16
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(VAE latents, teacher maps, teacher maps of augmented copies) of (N, 3, H, W) images in [0, 1], as MindEye2's
    training loop computes them per batch: ``autoenc.encode(2 * image - 1).latent_dist.mode() * 0.18215`` and
    ``cnx((image - mean) / std)``, ``cnx((blur_augs(image) - mean) / std)``."""
    from rt_mindeye.model.embedders import IMAGENET_MEAN, IMAGENET_STD, convnext_augment

    device = torch.device(models.device)
    size = models.image_size
    mean = torch.tensor(IMAGENET_MEAN, device=device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).reshape(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(models.seed)
    latents, maps, aug_maps = [], [], []
    for start in range(0, len(pixels), batch_size):
        image = pixels[start:start + batch_size].float()
        if image.shape[-2:] != (size, size):
            image = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False,
                                  antialias=True).clamp(0, 1)
        image = image.to(device)
        latents.append((models.vae.encode(2 * image - 1).latent_dist.mode() * models.scaling_factor).float().cpu())
        if models.convnext is not None:
            maps.append(models.convnext((image - mean) / std).float().cpu())
            views = [models.convnext((convnext_augment(image.cpu(), generator).to(device) - mean) / std)
                     for _ in range(models.aug_views)]
            if views:
                aug_maps.append(torch.stack(views, dim=1).half().cpu())
    return (torch.cat(latents), torch.cat(maps) if maps else None, torch.cat(aug_maps) if aug_maps else None)


def image_targets(images: np.ndarray, embedder: ImageEmbedder, blurry_size: int | None = 28,
                  batch_size: int = 32, low_level: LowLevelModels | None = None) -> ImageTargets:
    """Targets of every image (uint8 (N, H, W, 3)); the phantom embedder runs its network once per image.

    ``low_level`` (the full model): the blurry targets are VAE latents and the auxiliary ones ConvNeXt maps."""
    pixels = images_to_tensor(images)
    if low_level is not None:
        latents, maps, aug_maps = low_level_targets(pixels, low_level)
        return ImageTargets(tokens=embedder.embed_batched(images, batch_size=batch_size), blurry=latents, aux=maps,
                            aux_aug=aug_maps)
    blurry = None
    if blurry_size:
        blurry = F.interpolate(pixels, size=(blurry_size, blurry_size), mode="area") * 2 - 1
    if not isinstance(embedder, PhantomEmbedder):
        return ImageTargets(tokens=embedder.embed_batched(images, batch_size=batch_size), blurry=blurry, aux=None)
    tokens, aux = [], []
    for i in range(0, len(pixels), batch_size):
        maps = embedder.feature_maps(pixels[i:i + batch_size], [embedder.layer, AUX_LAYER])
        tokens.append(embedder.pool_tokens(maps[embedder.layer]))
        aux.append(F.adaptive_avg_pool2d(maps[AUX_LAYER], AUX_GRID).flatten(2).transpose(1, 2).float().cpu())
    return ImageTargets(tokens=torch.cat(tokens), blurry=blurry, aux=torch.cat(aux))


def zscore_stats(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = betas.mean(axis=0)
    sd = betas.std(axis=0)
    return mean.astype(np.float32), np.where(sd > 1e-8, sd, 1.0).astype(np.float32)


def identity_stats(n_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean 0, sd 1) per voxel: the :func:`subject_data` stats of betas that are already z-scored."""
    return np.zeros(n_voxels, np.float32), np.ones(n_voxels, np.float32)


def trial_arrays(session, runs: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(betas (n, V), image_index (n,)) of a phantom session's trials in ``runs`` (true betas)."""
    betas = np.concatenate([session.betas[r] for r in runs], axis=0).astype(np.float32)
    index = np.array([t.image_index for r in runs for t in session.trials(r)], dtype=np.int64)
    return betas, index


def subject_data(betas: np.ndarray, image_index: np.ndarray, targets: ImageTargets,
                 stats: tuple[np.ndarray, np.ndarray], name: str = "", keep: np.ndarray | None = None
                 ) -> SubjectData:
    """Z-scored betas joined with the targets of each trial's image; ``keep`` selects trials."""
    if keep is not None:
        betas, image_index = betas[keep], image_index[keep]
    mean, sd = stats
    voxels = torch.from_numpy((betas - mean) / sd)
    index = torch.from_numpy(image_index)
    return SubjectData(
        voxels=voxels,
        image_tokens=targets.tokens[index],
        blurry_targets=targets.blurry[index] if targets.blurry is not None else None,
        aux_targets=targets.aux[index] if targets.aux is not None else None,
        aux_aug_targets=targets.aux_aug[index] if targets.aux_aug is not None else None,
        name=name,
    )


def phantom_subject_data(session, runs: Sequence[int], targets: ImageTargets, name: str = "",
                         stats_runs: Sequence[int] | None = None, exclude_images: set[int] | None = None
                         ) -> tuple[SubjectData, np.ndarray]:
    """One phantom subject's trials of ``runs``; returns (data, image index per kept trial).

    Betas are z-scored with the mean/sd of ``stats_runs`` (default: ``runs``). ``exclude_images`` drops trials of
    those images (to keep test images out of pretraining).
    """
    betas, index = trial_arrays(session, runs)
    stats = zscore_stats(trial_arrays(session, stats_runs)[0] if stats_runs is not None else betas)
    keep = None
    if exclude_images:
        keep = ~np.isin(index, np.array(sorted(exclude_images), dtype=np.int64))
    data = subject_data(betas, index, targets, stats, name=name, keep=keep)
    return data, (index[keep] if keep is not None else index)


NPZ_FIELDS = ("voxels", "image_tokens", "blurry_targets", "aux_targets", "aux_aug_targets")
HALF_FIELDS = ("aux_aug_targets",)  # kept in float16 (views x 49 x 512 per trial)


def save_npz(path: str | Path, data: SubjectData) -> Path:
    path = Path(path)
    arrays = {k: getattr(data, k).numpy() for k in NPZ_FIELDS if getattr(data, k) is not None}
    np.savez(path, name=np.array(data.name), **arrays)
    return path


def load_npz(path: str | Path) -> SubjectData:
    """A subject's training data from ``.npz`` (``voxels``, ``image_tokens``, optional low-level targets)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: torch.from_numpy(np.asarray(f[k], dtype=np.float16 if k in HALF_FIELDS else np.float32))
                      for k in NPZ_FIELDS if k in f}
            name = str(f["name"]) if "name" in f else path.stem
    except (OSError, ValueError) as exc:
        raise SessionError(path, f"cannot read training data: {exc}") from exc
    for required in ("voxels", "image_tokens"):
        if required not in arrays:
            raise SessionError(path, f"training data has no '{required}' array")
    try:
        return SubjectData(name=name, **arrays)
    except ValueError as exc:
        raise SessionError(path, str(exc)) from exc
