from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import correlation as scipy_correlation
from skimage.metrics import structural_similarity

from rt_mindeye.eval import metrics
from rt_mindeye.eval.metrics import MetricInputError


def _smooth_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Random low-frequency colour images in [0, 1] (more image-like than white noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1)


# --- retrieval ----------------------------------------------------------------------------------------------------------

def test_retrieval_perfect_and_shuffled():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(400, 8, 4)).astype(np.float32)
    perfect = metrics.retrieval_accuracy(images * 2.0, images, n_way=300, n_draws=5)
    assert perfect.image_retrieval == 1.0 and perfect.brain_retrieval == 1.0
    assert perfect.n_way == 300 and perfect.n_draws == 5 and perfect.chance == pytest.approx(1 / 300)
    shuffled = metrics.retrieval_accuracy(images[rng.permutation(400)], images, n_way=20, n_draws=200, seed=1)
    # chance is 1/20 = 0.05; 200 draws x 20 trials keep the mean within a few points of it
    assert abs(shuffled.image_retrieval - 0.05) < 0.03 and abs(shuffled.brain_retrieval - 0.05) < 0.03


def test_retrieval_small_case_by_hand_differs_by_direction():
    image = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    brain = np.array([[1, 0], [1, 0.05], [0.6, 0.8]], np.float32)
    scores = metrics.retrieval_accuracy(brain, image, n_way=300)
    # brain -> image: b0 finds i0; b1 prefers i0 over i1; b2 equals i1 -> 1/3
    assert scores.image_retrieval == pytest.approx(1 / 3)
    # image -> brain: i0 finds b0; i1 prefers b2; i2 finds b2 -> 2/3
    assert scores.brain_retrieval == pytest.approx(2 / 3)
    assert scores.n_way == 3 and scores.n_draws == 1


def test_retrieval_input_errors():
    with pytest.raises(MetricInputError, match="image_embeddings"):
        metrics.retrieval_accuracy(np.ones((4, 3)), np.ones((5, 3)))
    with pytest.raises(MetricInputError, match="image_embeddings"):
        metrics.retrieval_accuracy(np.ones((4, 3)), np.ones((4, 2)))


# --- two-way identification -----------------------------------------------------------------------------------------

def test_two_way_perfect_shuffled_and_by_hand():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(300, 50))
    assert metrics.two_way_identification(features, features) == 1.0
    shuffled = metrics.two_way_identification(features[rng.permutation(300)], features)
    assert abs(shuffled - 0.5) < 0.05
    eye = np.eye(3)
    # recon 2 is image 0: its own-image correlation (-0.5) beats no other image's -> (2 + 2 + 0) / 3 / 2
    assert metrics.two_way_identification(eye[[0, 1, 0]], eye) == pytest.approx(2 / 3)


def test_two_way_matches_mindeye2_numpy_formulation():
    rng = np.random.default_rng(2)
    reals = rng.normal(size=(12, 30))
    preds = reals + rng.normal(scale=2.0, size=(12, 30))
    r = np.corrcoef(reals, preds)[:12, 12:]
    expected = np.mean(np.sum(r < np.diag(r), 0)) / 11
    assert metrics.two_way_identification(preds, reals) == pytest.approx(expected)


def test_two_way_on_images_with_named_layers_and_batches():
    images = _smooth_images(10, size=16)
    recons = images.flip(0)  # each reconstruction is another trial's image

    def extractor(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixels": batch.flatten(1), "means": batch.mean(dim=(2, 3))}

    perfect = metrics.two_way_identification_images(images, images, extractor, batch_size=3)
    assert perfect == {"pixels": 1.0, "means": 1.0}
    wrong = metrics.two_way_identification_images(recons, images, extractor, batch_size=4)
    assert wrong["pixels"] < 0.9


def test_correlation_distance_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))
    expected = np.mean([scipy_correlation(a[i], b[i]) for i in range(5)])
    assert metrics.correlation_distance(a, b) == pytest.approx(expected)
    assert metrics.correlation_distance(a, a) == pytest.approx(0.0, abs=1e-12)


# --- pixel-level ------------------------------------------------------------------------------------------------------

def test_pixcorr_identical_inverted_and_unrelated():
    images = _smooth_images(6, size=32)
    assert metrics.pixcorr(images, images) == pytest.approx(1.0)
    assert metrics.pixcorr(1.0 - images, images) == pytest.approx(-1.0)
    unrelated = metrics.pixcorr(_smooth_images(6, size=32, seed=9), images)
    assert abs(unrelated) < 0.5
    # numpy input, and resizing happens at 425 px whatever the input size
    assert metrics.resize_images(images.numpy()).shape == (6, 3, 425, 425)


def test_pixcorr_matches_numpy_corrcoef_at_425():
    recons, images = _smooth_images(3, size=425, seed=4), _smooth_images(3, size=425, seed=5)
    expected = np.mean([np.corrcoef(recons[i].flatten().numpy(), images[i].flatten().numpy())[0, 1]
                        for i in range(3)])
    assert metrics.pixcorr(recons, images) == pytest.approx(expected, abs=1e-6)


def test_ssim_identical_and_against_scikit_image():
    images = _smooth_images(3, size=425, seed=6)
    noisy = (images + 0.2 * torch.rand(images.shape, generator=torch.Generator().manual_seed(7))).clamp(0, 1)
    assert metrics.ssim(images, images) == pytest.approx(1.0)
    gray_r, gray_i = metrics.to_grayscale(noisy), metrics.to_grayscale(images)
    expected = np.mean([structural_similarity(gray_r[k], gray_i[k], gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=1.0) for k in range(3)])
    got = metrics.ssim(noisy, images)
    assert got == pytest.approx(expected) and got < 0.9
    # rgb2gray weights: a pure green image is 0.7154 grey
    green = torch.zeros(1, 3, 4, 4)
    green[:, 1] = 1.0
    assert metrics.to_grayscale(green)[0, 0, 0] == pytest.approx(0.7154)


def test_image_shape_errors():
    with pytest.raises(MetricInputError, match="images"):
        metrics.pixcorr(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(MetricInputError, match="images"):
        metrics.ssim(torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8))


def test_evaluate_builds_the_mindeye2_table():
    images = _smooth_images(5, size=32)
    embeddings = np.random.default_rng(4).normal(size=(5, 7))

    def layers(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"low": batch[:, :, ::4, ::4].flatten(1), "mean": batch.mean(dim=(2, 3))}

    table = metrics.evaluate(recons=images, images=images, brain_embeddings=embeddings, image_embeddings=embeddings,
                             extractors={"toy": layers}, distance_extractors={"flat": lambda b: b.flatten(1)})
    assert table == pytest.approx({"pixcorr": 1.0, "ssim": 1.0, "toy.low": 1.0, "toy.mean": 1.0,
                                   "flat_distance": 0.0, "image_retrieval": 1.0, "brain_retrieval": 1.0,
                                   "retrieval_n_way": 5.0}, abs=1e-9)
    assert metrics.evaluate() == {}
