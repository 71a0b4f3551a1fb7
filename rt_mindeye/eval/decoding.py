"""Scoring decoded trials the way the references score them: held-out sets split by image, single-trial and
repeat-averaged retrieval in both directions, real-time MindEye's two-alternative choice, and the single-trial
reliability of the betas themselves.

Directions and names (``docs/eval.md`` has the derivation from MindEyeV2's code):

* **brain -> image**: for each brain sample, its seen image among the candidate images. This is what the live
  decoder does for every trial and what the MindEye2 paper's text calls *image retrieval*.
* **image -> brain**: for each image, the brain sample recorded for it among the others. The paper's text calls
  this *brain retrieval*.
* MindEye2's published table is computed by ``src/final_evaluations.ipynb`` with ``batchwise_cosine_similarity``,
  which returns the *transposed* similarity matrix; its "image retrieval" / ``fwd`` column (79.0 % at 1 hour) is
  therefore numerically **image -> brain**, and its "brain retrieval" / ``bwd`` column (57.4 %) **brain -> image**.
  :data:`PUBLISHED_COLUMN` records which of ours compares with which published figure.

All embeddings are compared by cosine of flattened, L2-normalised vectors, as MindEye2 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rt_mindeye.eval.metrics import MetricInputError, _as_tensor, _normalised_rows

#: Our direction -> the MindEye2 table column whose *number* it reproduces (1-hour figures of the paper, 300-way,
#: 3 repeats averaged). The paper's text describes the columns the other way round; see the module docstring.
PUBLISHED_COLUMN = {
    "image_to_brain": ("image retrieval (fwd)", 0.790),
    "brain_to_image": ("brain retrieval (bwd)", 0.574),
}


# --- held-out sets ---------------------------------------------------------------------------------------------------


def split_by_image(image_ids, fraction: float, seed: int = 0, *, prefer: str = "repeated") -> np.ndarray:
    """Boolean mask of held-out trials such that no image has trials on both sides.

    About ``fraction`` of the *trials* are held out, taking whole images: ``prefer='repeated'`` draws images shown
    more than once first (so repeat-averaged scores exist on the held-out side), ``'any'`` draws uniformly. At least
    one image is held out when ``fraction > 0`` and at least one is kept.
    """
    ids = np.asarray(image_ids)
    if ids.ndim != 1:
        raise MetricInputError("image_ids", f"expected a 1-D array, got shape {ids.shape}")
    if not 0.0 <= fraction < 1.0:
        raise MetricInputError("fraction", f"must be in [0, 1), got {fraction}")
    held = np.zeros(ids.size, dtype=bool)
    unique, counts = np.unique(ids, return_counts=True)
    if fraction == 0.0 or unique.size < 2:
        return held
    rng = np.random.default_rng(seed)
    order = rng.permutation(unique.size)
    if prefer == "repeated":
        order = order[np.argsort(~(counts[order] > 1), kind="stable")]
    elif prefer != "any":
        raise MetricInputError("prefer", f"must be 'repeated' or 'any', got {prefer!r}")
    target = fraction * ids.size
    taken = 0
    chosen = []
    for k in order[:-1]:  # always keep at least one image for training
        if taken >= target and chosen:
            break
        chosen.append(unique[k])
        taken += counts[k]
    held[np.isin(ids, chosen)] = True
    return held


def assert_disjoint_images(train_ids, test_ids) -> None:
    """Raise :class:`MetricInputError` if an image has trials on both sides of a split."""
    shared = np.intersect1d(np.asarray(train_ids), np.asarray(test_ids))
    if shared.size:
        raise MetricInputError("test_ids", f"{shared.size} image(s) on both sides of the split, e.g. {shared[:5]}")


def average_by_image(values, image_ids) -> tuple[np.ndarray, np.ndarray]:
    """Average rows of ``values`` (trials x ...) over repeats of the same image, as MindEye2 averages a test image's
    repeated betas before decoding. Returns (averaged rows in order of first appearance, their image ids)."""
    array = np.asarray(values)
    ids = np.asarray(image_ids)
    if array.shape[0] != ids.size:
        raise MetricInputError("image_ids", f"{ids.size} ids for {array.shape[0]} rows")
    unique, first = np.unique(ids, return_index=True)
    order = unique[np.argsort(first)]
    averaged = np.stack([array[ids == image].mean(axis=0) for image in order]) if order.size else array[:0]
    return averaged.astype(array.dtype, copy=False), order


# --- retrieval -------------------------------------------------------------------------------------------------------


def cosine_matrix(rows, columns) -> torch.Tensor:
    """(len(rows), len(columns)) cosine similarities of flattened, L2-normalised embeddings; ``[i, j]`` compares
    ``rows[i]`` with ``columns[j]`` (not transposed, unlike MindEyeV2's ``batchwise_cosine_similarity``)."""
    a = _normalised_rows(_as_tensor(rows, "rows"))
    b = _normalised_rows(_as_tensor(columns, "columns"))
    if a.shape[1] != b.shape[1]:
        raise MetricInputError("columns", f"{b.shape[1]} features for {a.shape[1]} in rows")
    return a @ b.T


@dataclass(frozen=True)
class DirectionScores:
    """Top-1 accuracy in each direction over ``n`` paired samples (N-way, chance 1 / n)."""

    brain_to_image: float
    image_to_brain: float
    n: int

    @property
    def chance(self) -> float:
        return 1.0 / self.n

    def as_dict(self) -> dict:
        return {"brain_to_image": self.brain_to_image, "image_to_brain": self.image_to_brain, "n_way": self.n,
                "chance": self.chance}


def paired_directions(brain, image_embeddings) -> DirectionScores:
    """Both directions over paired samples: ``brain[i]`` belongs with ``image_embeddings[i]`` (distinct images)."""
    sims = cosine_matrix(brain, image_embeddings)  # rows: brain samples, columns: images
    n = sims.shape[0]
    if sims.shape[1] != n or n < 2:
        raise MetricInputError("image_embeddings", f"need >= 2 paired samples, got {tuple(sims.shape)}")
    truth = torch.arange(n)
    brain_to_image = float((sims.argmax(dim=1) == truth).double().mean())
    image_to_brain = float((sims.argmax(dim=0) == truth).double().mean())
    return DirectionScores(brain_to_image=brain_to_image, image_to_brain=image_to_brain, n=n)


def top1_among_candidates(brain, seen_ids, candidate_embeddings, candidate_ids) -> float:
    """Brain -> image top-1 of every trial among the candidate images (repeated images count once as candidates):
    what the live decoder is scored on. ``seen_ids`` must all be among ``candidate_ids``."""
    predicted = np.asarray(candidate_ids)[cosine_matrix(brain, candidate_embeddings).argmax(dim=1).numpy()]
    seen = np.asarray(seen_ids)
    if not np.isin(seen, candidate_ids).all():
        raise MetricInputError("seen_ids", "some seen images are not among the candidates")
    return float(np.mean(predicted == seen)) if seen.size else float("nan")


def two_afc_hardest(brain, seen_ids, candidate_embeddings, candidate_ids) -> float:
    """Real-time MindEye's two-alternative choice: is the brain sample closer to its seen image than to that image's
    most similar other candidate (the hardest distractor, by cosine between the candidates' own embeddings)?
    Chance 0.5; ties count half."""
    candidate_ids = np.asarray(candidate_ids)
    position = {int(c): k for k, c in enumerate(candidate_ids)}
    seen = np.asarray(seen_ids)
    if candidate_ids.size < 2:
        raise MetricInputError("candidate_ids", "need at least two candidates")
    missing = [s for s in seen if int(s) not in position]
    if missing:
        raise MetricInputError("seen_ids", f"{len(missing)} seen image(s) not among the candidates")
    among = cosine_matrix(candidate_embeddings, candidate_embeddings)
    among.fill_diagonal_(-float("inf"))
    distractor = among.argmax(dim=1).numpy()  # per candidate: its most similar other candidate
    sims = cosine_matrix(brain, candidate_embeddings).numpy()
    rows = np.arange(seen.size)
    own = np.array([position[int(s)] for s in seen], dtype=np.int64)
    right, wrong = sims[rows, own], sims[rows, distractor[own]]
    return float(np.mean((right > wrong) + 0.5 * (right == wrong))) if seen.size else float("nan")


@dataclass(frozen=True)
class DecodingReport:
    """Everything a held-out decoding run is scored with (fractions in [0, 1])."""

    top1: float                    # single trial, brain -> image among the distinct held-out images
    n_candidates: int
    n_trials: int
    two_afc: float                 # single trial, seen vs most similar other candidate
    single: DirectionScores        # one trial per image (its first presentation), both directions
    averaged: DirectionScores | None  # repeats averaged per image (only images shown more than once), both ways
    top1_averaged: float | None    # brain -> image of the repeat-averaged samples among all candidates

    @property
    def chance(self) -> float:
        return 1.0 / self.n_candidates

    def as_dict(self) -> dict:
        return {"top1": self.top1, "chance": self.chance, "n_candidates": self.n_candidates,
                "n_trials": self.n_trials, "two_afc": self.two_afc, "single": self.single.as_dict(),
                "averaged": self.averaged.as_dict() if self.averaged is not None else None,
                "top1_averaged": self.top1_averaged}


def decoding_report(embed, betas, image_ids, image_embeddings) -> DecodingReport:
    """Score held-out trials: ``embed(betas) -> brain embeddings`` (e.g. the model's retrieval head), ``betas``
    (trials x voxels), ``image_ids`` per trial, ``image_embeddings[id]`` the target of image ``id``.

    Single-trial scores decode every trial; repeat-averaged scores average each repeated image's betas first
    (MindEye2's test protocol), then decode.
    """
    betas = np.asarray(betas, dtype=np.float32)
    ids = np.asarray(image_ids)
    targets = _as_tensor(image_embeddings, "image_embeddings")
    candidates = np.unique(ids)
    cand_emb = targets[torch.from_numpy(candidates.astype(np.int64))]
    brain = _as_tensor(embed(betas), "brain")
    top1 = top1_among_candidates(brain, ids, cand_emb, candidates)
    afc = two_afc_hardest(brain, ids, cand_emb, candidates)
    _, first = np.unique(ids, return_index=True)
    first = np.sort(first)
    single = paired_directions(brain[torch.from_numpy(first)], targets[torch.from_numpy(ids[first].astype(np.int64))])
    averaged = top1_avg = None
    repeated = [i for i in candidates if np.sum(ids == i) > 1]
    if len(repeated) >= 2:
        keep = np.isin(ids, repeated)
        avg_betas, avg_ids = average_by_image(betas[keep], ids[keep])
        avg_brain = _as_tensor(embed(avg_betas), "brain")
        averaged = paired_directions(avg_brain, targets[torch.from_numpy(avg_ids.astype(np.int64))])
        top1_avg = top1_among_candidates(avg_brain, avg_ids, cand_emb, candidates)
    return DecodingReport(top1=top1, n_candidates=int(candidates.size), n_trials=int(ids.size), two_afc=afc,
                          single=single, averaged=averaged, top1_averaged=top1_avg)


# --- reliability of the betas ------------------------------------------------------------------------------------------


def ncsnr(betas, conditions) -> np.ndarray:
    """Noise-ceiling SNR per voxel (GLMsingle's ``example9_noiseceiling`` / NSD definition) from the conditions
    shown more than once: noise sd = root mean over conditions of the across-repeat variance (ddof 1), signal sd =
    sqrt(max(0, total variance of those trials - noise variance)); ncsnr = signal sd / noise sd. NaN where fewer
    than two repeated conditions exist."""
    betas = np.asarray(betas, dtype=np.float64)
    conditions = np.asarray(conditions)
    if betas.shape[0] != conditions.size:
        raise MetricInputError("conditions", f"{conditions.size} conditions for {betas.shape[0]} trials")
    unique, counts = np.unique(conditions, return_counts=True)
    repeated = unique[counts > 1]
    if repeated.size < 2:
        return np.full(betas.shape[1], np.nan)
    noise_var = np.mean([betas[conditions == c].var(axis=0, ddof=1) for c in repeated], axis=0)
    trials = betas[np.isin(conditions, repeated)]
    signal_var = np.maximum(trials.var(axis=0) - noise_var, 0.0)
    return np.sqrt(signal_var) / np.sqrt(np.where(noise_var > 0, noise_var, np.nan))


def noise_ceiling(ncsnr_values, n_trials: int = 1) -> np.ndarray:
    """Percent of explainable variance of an average of ``n_trials`` repeats: 100 ncsnr^2 / (ncsnr^2 + 1/n)."""
    snr2 = np.asarray(ncsnr_values, dtype=np.float64) ** 2
    return 100.0 * snr2 / (snr2 + 1.0 / n_trials)
