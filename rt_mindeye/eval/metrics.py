"""Reconstruction and retrieval metrics with MindEye2's definitions (``src/final_evaluations.ipynb``).

* Retrieval: cosine between flattened, L2-normalised embeddings; top-1 among ``n_way`` random test samples (300 in
  MindEye2, averaged over 30 draws). *Image retrieval* looks up the right image for each brain sample
  (brain -> image), *brain retrieval* the right brain sample for each image (image -> brain). Chance = 1 / n_way.
* Two-way identification: features of reconstructions and of the seen images from any extractor; for each
  reconstruction j, the fraction of other images i whose feature correlation with it is lower than that of its own
  image (chance 50 %).
* PixCorr: Pearson correlation over all pixels (RGB) after a bilinear resize to 425 px, averaged over images.
* SSIM: scikit-image ``structural_similarity`` on grayscale (``rgb2gray``) images at 425 px, Gaussian weights with
  sigma 1.5, population covariance, data range 1, averaged over images.
* Correlation distance (MindEye2's EfficientNet-B1 and SwAV scores; lower is better): mean of
  ``scipy.spatial.distance.correlation`` between paired feature vectors.

Images are float arrays or tensors (N, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from rt_mindeye.errors import RtMindEyeError

METRIC_IMAGE_SIZE = 425  # NSD stimuli are 425 x 425


class MetricInputError(RtMindEyeError):
    """Metric inputs have mismatched or wrong shapes."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"metric input {field}: {problem}")


def _as_tensor(array, field: str) -> torch.Tensor:
    if isinstance(array, np.ndarray):
        array = torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(array, torch.Tensor):
        raise MetricInputError(field, f"expected an array or tensor, got {type(array).__name__}")
    return array.detach().to(torch.float32).cpu()


def _paired(a, b, names: tuple[str, str], min_n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    first, second = _as_tensor(a, names[0]), _as_tensor(b, names[1])
    if first.shape[0] != second.shape[0]:
        raise MetricInputError(names[1], f"{second.shape[0]} samples for {first.shape[0]} in {names[0]}")
    if first.shape[0] < min_n:
        raise MetricInputError(names[0], f"needs at least {min_n} samples, got {first.shape[0]}")
    return first, second


def _check_images(images: torch.Tensor, field: str) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise MetricInputError(field, f"expected (N, 3, H, W) images in [0, 1], got {tuple(images.shape)}")
    return images


def resize_images(images, size: int = METRIC_IMAGE_SIZE) -> torch.Tensor:
    """Bilinear (antialiased) resize of (N, 3, H, W) images to size x size, as torchvision's ``Resize(425)``."""
    images = _check_images(_as_tensor(images, "images"), "images")
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# --- retrieval ----------------------------------------------------------------------------------------------------------


def _normalised_rows(embeddings: torch.Tensor) -> torch.Tensor:
    flat = embeddings.reshape(embeddings.shape[0], -1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class RetrievalScores:
    """Top-1 accuracies in [0, 1], named as the MindEye2 paper's text names them: image retrieval = brain -> image,
    brain retrieval = image -> brain. MindEye2's published *numbers* come from code that swaps the two (its
    similarity helper returns the transposed matrix): compare :attr:`brain_retrieval` (image -> brain) with its
    "image retrieval" 79.0 % and :attr:`image_retrieval` (brain -> image) with its "brain retrieval" 57.4 %
    (``docs/eval.md``, :data:`rt_mindeye.eval.decoding.PUBLISHED_COLUMN`)."""

    image_retrieval: float
    brain_retrieval: float
    n_way: int
    n_draws: int

    @property
    def chance(self) -> float:
        return 1.0 / self.n_way

    @property
    def brain_to_image(self) -> float:
        return self.image_retrieval

    @property
    def image_to_brain(self) -> float:
        return self.brain_retrieval


def top1_accuracy(similarity: torch.Tensor) -> float:
    """Fraction of rows whose largest entry is on the diagonal (row i's match is column i)."""
    best = torch.argmax(similarity, dim=1)
    return float((best == torch.arange(similarity.shape[0])).to(torch.float64).mean())


def retrieval_accuracy(brain_embeddings, image_embeddings, *, n_way: int = 300, n_draws: int = 30,
                       seed: int = 0) -> RetrievalScores:
    """MindEye2's N-way top-1 retrieval, both directions.

    With at least ``n_way`` samples, ``n_draws`` random subsets of ``n_way`` are scored and averaged; with fewer,
    all N samples are scored once (N-way). ``brain_embeddings[i]`` must belong with ``image_embeddings[i]``.
    """
    brain, image = _paired(brain_embeddings, image_embeddings, ("brain_embeddings", "image_embeddings"), min_n=2)
    brain, image = _normalised_rows(brain), _normalised_rows(image)
    if brain.shape[1] != image.shape[1]:
        raise MetricInputError("image_embeddings", f"{image.shape[1]} features for {brain.shape[1]} brain features")
    n = brain.shape[0]
    if n_way < 2:
        raise MetricInputError("n_way", f"must be >= 2, got {n_way}")
    if n <= n_way:
        draws = [np.arange(n)]
    else:
        rng = np.random.default_rng(seed)
        draws = [rng.choice(n, size=n_way, replace=False) for _ in range(n_draws)]
    forward, backward = [], []
    for subset in draws:
        index = torch.from_numpy(subset)
        b, i = brain[index], image[index]
        forward.append(top1_accuracy(b @ i.T))  # each brain sample looks for its image
        backward.append(top1_accuracy(i @ b.T))  # each image looks for its brain sample
    return RetrievalScores(image_retrieval=float(np.mean(forward)), brain_retrieval=float(np.mean(backward)),
                           n_way=len(draws[0]), n_draws=len(draws))


# --- feature comparisons --------------------------------------------------------------------------------------------


def two_way_identification(recon_features, image_features) -> float:
    """MindEye2's two-way identification from paired features (N, ...): mean over reconstructions j of the
    fraction of other images i with corr(image_i, recon_j) < corr(image_j, recon_j). Chance 0.5."""
    recon, image = _paired(recon_features, image_features, ("recon_features", "image_features"), min_n=2)
    recon = recon.reshape(recon.shape[0], -1).to(torch.float64)
    image = image.reshape(image.shape[0], -1).to(torch.float64)
    n = recon.shape[0]
    # Pearson correlation of every image with every reconstruction (rows: images, columns: reconstructions).
    image_c = image - image.mean(dim=1, keepdim=True)
    recon_c = recon - recon.mean(dim=1, keepdim=True)
    image_c = image_c / image_c.norm(dim=1, keepdim=True).clamp_min(1e-300)
    recon_c = recon_c / recon_c.norm(dim=1, keepdim=True).clamp_min(1e-300)
    corr = image_c @ recon_c.T
    congruent = torch.diagonal(corr)
    wins = (corr < congruent[None, :]).sum(dim=0).to(torch.float64)
    return float(wins.mean() / (n - 1))


def correlation_distance(recon_features, image_features) -> float:
    """Mean correlation distance 1 - r between paired feature vectors (MindEye2's EffNet-B1 / SwAV scores)."""
    recon, image = _paired(recon_features, image_features, ("recon_features", "image_features"))
    recon = recon.reshape(recon.shape[0], -1).to(torch.float64)
    image = image.reshape(image.shape[0], -1).to(torch.float64)
    recon = recon - recon.mean(dim=1, keepdim=True)
    image = image - image.mean(dim=1, keepdim=True)
    r = (recon * image).sum(dim=1) / (recon.norm(dim=1) * image.norm(dim=1)).clamp_min(1e-300)
    return float((1.0 - r).mean())


FeatureExtractor = Callable[[torch.Tensor], "torch.Tensor | np.ndarray | Mapping[str, torch.Tensor]"]


def two_way_identification_images(recons, images, extractor: FeatureExtractor, *, batch_size: int = 32
                                  ) -> dict[str, float] | float:
    """Two-way identification of reconstructions against images with ``extractor`` (images -> features or a dict
    of named feature maps, e.g. AlexNet layers 2 and 5). Returns one score, or one per named layer."""
    features_recon = extract(extractor, recons, batch_size=batch_size)
    features_image = extract(extractor, images, batch_size=batch_size)
    if isinstance(features_recon, dict):
        return {name: two_way_identification(features_recon[name], features_image[name]) for name in features_recon}
    return two_way_identification(features_recon, features_image)


def extract(extractor: FeatureExtractor, images, *, batch_size: int = 32):
    """Run ``extractor`` over images in batches; concatenates arrays or dicts of arrays (float32 numpy)."""
    images = _check_images(_as_tensor(images, "images"), "images")
    outputs = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            outputs.append(extractor(images[start:start + batch_size]))
    if isinstance(outputs[0], Mapping):
        return {name: np.concatenate([_to_numpy(o[name]) for o in outputs]) for name in outputs[0]}
    return np.concatenate([_to_numpy(o) for o in outputs])


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32).cpu().numpy()
    return np.asarray(value, dtype=np.float32)


# --- pixel-level --------------------------------------------------------------------------------------------------------


def pixcorr(recons, images, *, size: int = METRIC_IMAGE_SIZE) -> float:
    """Mean over images of the Pearson correlation over all pixels (RGB) at ``size`` px."""
    recon, image = _paired(recons, images, ("recons", "images"))
    recon = resize_images(recon, size).reshape(recon.shape[0], -1).to(torch.float64)
    image = resize_images(image, size).reshape(image.shape[0], -1).to(torch.float64)
    recon = recon - recon.mean(dim=1, keepdim=True)
    image = image - image.mean(dim=1, keepdim=True)
    r = (recon * image).sum(dim=1) / (recon.norm(dim=1) * image.norm(dim=1))
    return float(r.mean())


def to_grayscale(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) -> (N, H, W) with scikit-image's ``rgb2gray`` (ITU-R 709 luma)."""
    from skimage.color import rgb2gray

    return rgb2gray(images.permute(0, 2, 3, 1).numpy().astype(np.float64))


def ssim(recons, images, *, size: int = METRIC_IMAGE_SIZE) -> float:
    """Mean SSIM between grayscale reconstructions and images at ``size`` px (MindEye2's settings)."""
    from skimage.metrics import structural_similarity

    recon, image = _paired(recons, images, ("recons", "images"))
    recon_gray = to_grayscale(resize_images(recon, size))
    image_gray = to_grayscale(resize_images(image, size))
    scores = [structural_similarity(r, i, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0) for r, i in zip(recon_gray, image_gray)]
    return float(np.mean(scores))


# --- all at once ------------------------------------------------------------------------------------------------------


def evaluate(*, recons=None, images=None, brain_embeddings=None, image_embeddings=None,
             extractors: Mapping[str, FeatureExtractor] | None = None,
             distance_extractors: Mapping[str, FeatureExtractor] | None = None,
             n_way: int = 300, n_draws: int = 30, seed: int = 0) -> dict[str, float]:
    """MindEye2's table for whatever inputs are given.

    ``recons``/``images`` (N, 3, H, W) in [0, 1] give PixCorr, SSIM, two-way identification for each of
    ``extractors`` (a dict-returning extractor contributes one entry per layer, named ``<name>.<layer>``) and the
    correlation distance for each of ``distance_extractors``; embeddings give image and brain retrieval.
    """
    table: dict[str, float] = {}
    if recons is not None and images is not None:
        table["pixcorr"] = pixcorr(recons, images)
        table["ssim"] = ssim(recons, images)
        for name, extractor in (extractors or {}).items():
            score = two_way_identification_images(recons, images, extractor)
            if isinstance(score, dict):
                table.update({f"{name}.{layer}": value for layer, value in score.items()})
            else:
                table[name] = score
        for name, extractor in (distance_extractors or {}).items():
            table[f"{name}_distance"] = correlation_distance(extract(extractor, recons), extract(extractor, images))
    if brain_embeddings is not None and image_embeddings is not None:
        scores = retrieval_accuracy(brain_embeddings, image_embeddings, n_way=n_way, n_draws=n_draws, seed=seed)
        table.update(image_retrieval=scores.image_retrieval, brain_retrieval=scores.brain_retrieval,
                     retrieval_n_way=float(scores.n_way))
    return table
