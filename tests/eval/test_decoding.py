"""Held-out sets split by image, retrieval directions (and MindEye2's transposed helper), repeat averaging of betas,
the hardest-distractor 2AFC and the noise-ceiling SNR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rt_mindeye.eval.decoding import (PUBLISHED_COLUMN, assert_disjoint_images, average_by_image, decoding_report,
                                      ncsnr, noise_ceiling, paired_directions, split_by_image, top1_among_candidates,
                                      two_afc_hardest)
from rt_mindeye.eval.metrics import MetricInputError, retrieval_accuracy


def test_split_by_image_never_puts_one_image_on_both_sides():
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.repeat(np.arange(10), 3), np.arange(10, 70)])
    rng.shuffle(ids)
    for seed in range(5):
        held = split_by_image(ids, 0.15, seed=seed)
        assert_disjoint_images(ids[~held], ids[held])
        assert 0.1 * ids.size <= held.sum() <= 0.25 * ids.size
        # repeated images are held out first, so the held-out side can be scored repeat-averaged
        assert all(np.sum(ids == i) == 3 for i in np.unique(ids[held]))
    anywhere = split_by_image(ids, 0.3, seed=1, prefer="any")
    assert_disjoint_images(ids[~anywhere], ids[anywhere])
    assert not split_by_image(ids, 0.0).any()
    with pytest.raises(MetricInputError, match="both sides"):
        assert_disjoint_images([1, 2, 3], [3, 4])


def test_a_random_trial_split_would_leak_repeats_and_is_caught():
    ids = np.repeat(np.arange(20), 3)
    held = np.zeros(ids.size, bool)
    held[np.random.default_rng(0).choice(ids.size, 9, replace=False)] = True  # the old split: by trial
    with pytest.raises(MetricInputError):
        assert_disjoint_images(ids[~held], ids[held])


def _mindeye2_batchwise_cosine_similarity(z, b):
    """MindEyeV2 src/utils.py, re-expressed: note the final transpose."""
    z, b = z.flatten(1), b.flatten(1).T
    return ((z @ b) / (z.norm(dim=1, keepdim=True) @ b.norm(dim=0, keepdim=True))).T


def _mindeye2_topk1(similarities, labels):
    """MindEyeV2's ``topk`` with k=1: ranks along rows."""
    return float((torch.argsort(similarities, dim=1)[:, -1] == labels).double().mean())


def test_directions_differ_and_map_onto_mindeye2s_transposed_columns():
    # Brain sample 0 sits between images 0 and 1 (closer to 1), so brain -> image misses it while image 0 still
    # finds brain sample 0 as its nearest brain sample: the two directions give different numbers.
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    brain = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.2, 1.0]])
    ours = paired_directions(brain, images)
    assert ours.brain_to_image == pytest.approx(2 / 3)
    assert ours.image_to_brain == pytest.approx(1.0)
    # The published evaluation, as final_evaluations.ipynb calls it:
    labels = torch.arange(3)
    fwd = _mindeye2_topk1(_mindeye2_batchwise_cosine_similarity(brain, images), labels)  # "image retrieval"
    bwd = _mindeye2_topk1(_mindeye2_batchwise_cosine_similarity(images, brain), labels)  # "brain retrieval"
    assert fwd == pytest.approx(ours.image_to_brain)  # 79.0 % column = image -> brain
    assert bwd == pytest.approx(ours.brain_to_image)  # 57.4 % column = brain -> image
    assert PUBLISHED_COLUMN["image_to_brain"][1] == 0.790 and PUBLISHED_COLUMN["brain_to_image"][1] == 0.574
    # The N-way metric of eval.metrics names the same directions the same way.
    scores = retrieval_accuracy(brain, images)
    assert scores.brain_to_image == ours.brain_to_image and scores.image_to_brain == ours.image_to_brain


def test_average_by_image_averages_repeats_in_first_appearance_order():
    betas = np.array([[1.0, 0.0], [9.0, 9.0], [3.0, 2.0], [5.0, 4.0]], np.float32)
    avg, ids = average_by_image(betas, [7, 2, 7, 7])
    np.testing.assert_array_equal(ids, [7, 2])
    np.testing.assert_allclose(avg, [[3.0, 2.0], [9.0, 9.0]])


def test_report_averages_betas_before_decoding_and_beats_single_trials():
    rng = np.random.default_rng(1)
    n_img, n_vox, rep = 30, 40, 3
    mixing = rng.normal(size=(n_vox, 12))
    images = rng.normal(size=(n_img, 12))
    truth = images @ mixing.T
    ids = np.repeat(np.arange(n_img), rep)
    betas = truth[ids] + 8.0 * rng.normal(size=(ids.size, n_vox))
    decode = np.linalg.pinv(mixing.T)  # a fixed linear read-out of the image embedding
    embed = lambda b: torch.from_numpy(np.asarray(b, np.float64) @ decode)  # noqa: E731
    report = decoding_report(embed, betas, ids, torch.from_numpy(images))
    assert report.n_candidates == n_img and report.n_trials == ids.size
    assert report.averaged is not None and report.averaged.n == n_img
    assert report.top1_averaged > report.top1 + 0.1  # noise averages out over 3 repeats
    assert report.averaged.brain_to_image > report.single.brain_to_image
    assert 0.5 < report.two_afc <= 1.0
    # The averaged scores are the single-trial scorer applied to averaged betas (not averaged embeddings).
    avg, avg_ids = average_by_image(betas, ids)
    assert report.top1_averaged == top1_among_candidates(embed(avg), avg_ids, torch.from_numpy(images),
                                                         np.arange(n_img))


def test_two_afc_uses_the_most_similar_other_image():
    candidates = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])  # 0 and 1 are near twins, 2 is far
    # Nearer its own image than the twin (cos .995 vs .978): right.
    brain = torch.tensor([[1.0, -0.1]])
    assert two_afc_hardest(brain, [0], candidates, [0, 1, 2]) == 1.0
    # Nearer the twin (cos .991) than its own image (.970): wrong, although image 2 would have been beaten easily.
    assert two_afc_hardest(torch.tensor([[0.8, 0.2]]), [0], candidates, [0, 1, 2]) == 0.0
    with pytest.raises(MetricInputError):
        two_afc_hardest(brain, [5], candidates, [0, 1, 2])


def test_ncsnr_matches_glmsingle_definition_and_noise_ceiling():
    rng = np.random.default_rng(2)
    n_img, rep, n_vox = 600, 3, 3
    signal_sd, noise_sd = np.array([1.0, 0.5, 0.0]), 1.0
    signal = rng.normal(size=(n_img, n_vox)) * signal_sd
    ids = np.repeat(np.arange(n_img), rep)
    betas = signal[ids] + noise_sd * rng.normal(size=(ids.size, n_vox))
    values = ncsnr(betas, ids)
    np.testing.assert_allclose(values[:2], signal_sd[:2] / noise_sd, rtol=0.12)
    assert values[2] < 0.15
    assert noise_ceiling(1.0, 1) == pytest.approx(50.0)
    assert noise_ceiling(1.0, 3) == pytest.approx(75.0)
    assert np.isnan(ncsnr(betas[:3], ids[:3])).all()  # one repeated condition is not enough
