"""The full model's low-level path: VAE-latent and ConvNeXt targets from local-weight models, and MindEye2's loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rt_mindeye.decode.unclip import build_vae, tiny_vae_config
from rt_mindeye.model.data import LowLevelModels, image_targets, load_npz, save_npz, subject_data
from rt_mindeye.model.embedders import IMAGENET_MEAN, IMAGENET_STD, ConvNeXtTeacher, convnext_augment
from rt_mindeye.model.losses import mixco
from rt_mindeye.model.mindeye import MindEyeModule
from rt_mindeye.model.train import SubjectData, Trainer, TrainConfig

from .conftest import micro_config

SIZE = 64  # tiny VAE: 2 px per latent cell -> 32 x 32 latents; tiny ConvNeXt: 32 px per token -> 2 x 2 tokens


class _Embedder:
    tokens_shape = (4, 16)

    def embed_batched(self, images, batch_size=32):
        return torch.from_numpy(np.asarray(images, dtype=np.float32)[:, :4, :16, 0])


@pytest.fixture(scope="module")
def low_level():
    torch.manual_seed(0)
    teacher = ConvNeXtTeacher(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), projector=(12, 8)).eval()
    return LowLevelModels(vae=build_vae(tiny_vae_config(), seed=1), convnext=teacher, image_size=SIZE, aug_views=3,
                          seed=5)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def test_targets_are_vae_latents_and_convnext_maps_of_plain_and_augmented_images(low_level):
    images = _images(3)
    targets = image_targets(images, _Embedder(), low_level=low_level)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        latents = low_level.vae.encode(2 * pixels - 1).latent_dist.mode() * 0.18215
        mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
        maps = low_level.convnext((pixels - mean) / std)
    torch.testing.assert_close(targets.blurry, latents)
    torch.testing.assert_close(targets.aux, maps)
    assert targets.aux_aug.shape == (3, 3, 4, 8) and targets.aux_aug.dtype == torch.float16
    assert not torch.allclose(targets.aux_aug[:, 0].float(), maps, atol=1e-3)  # the teacher saw augmented images
    again = image_targets(images, _Embedder(), low_level=low_level)
    assert torch.equal(again.aux_aug, targets.aux_aug)  # augmentations are seeded

    # per-trial data and the npz round trip keep the augmented views (in float16)
    data = subject_data(np.zeros((5, 7), np.float32), np.array([0, 1, 2, 1, 0]), targets,
                        (np.zeros(7, np.float32), np.ones(7, np.float32)))
    assert data.aux_aug_targets.shape == (5, 3, 4, 8)


def test_npz_round_trip_keeps_augmented_views(tmp_path):
    data = SubjectData(torch.zeros(4, 6), torch.zeros(4, 2, 3), torch.zeros(4, 4, 2, 2), torch.zeros(4, 4, 8),
                       name="s", aux_aug_targets=torch.ones(4, 2, 4, 8, dtype=torch.float16))
    loaded = load_npz(save_npz(tmp_path / "s.npz", data))
    assert loaded.aux_aug_targets.dtype == torch.float16 and torch.equal(loaded.aux_aug_targets,
                                                                         data.aux_aug_targets)


def test_augmentation_is_mindeye2s_family_and_seeded():
    pixels = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = convnext_augment(pixels, torch.Generator().manual_seed(1))
    b = convnext_augment(pixels, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == pixels.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.allclose(a, pixels)


def _latent_subject(config, n=12, views=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = config.blurry_size
    return SubjectData(torch.randn(n, config.subject_voxels[0], generator=g),
                       torch.randn(n, config.token_seq, config.token_dim, generator=g),
                       torch.randn(n, 4, size, size, generator=g),
                       torch.randn(n, config.blurry_grid ** 2, config.blurry_aux_dim, generator=g),
                       aux_aug_targets=(torch.randn(n, views, config.blurry_grid ** 2, config.blurry_aux_dim,
                                                    generator=g).half() if views else None))


def test_bimixco_l1_uses_the_unmixed_latent_as_mindeye2():
    config = micro_config(subject_voxels=(20,), blurry=True, blurry_out_channels=4, backbone_dropout=0.0)
    torch.manual_seed(0)
    model = MindEyeModule(config).eval()  # eval: no dropout, so the forward can be repeated
    data = _latent_subject(config)
    trainer = Trainer(model, TrainConfig(clip_scale=0, prior_scale=0, blur_cont_scale=0, blur_scale=1,
                                         batch_size=12), progress=False)
    batch = trainer._batch(data, torch.arange(12), 0)
    _, parts = trainer._loss([batch], torch.device("cpu"), True, 0.004, torch.Generator().manual_seed(3))
    mixed, perm, betas, select = mixco(batch["voxels"].clone(), torch.Generator().manual_seed(3))
    assert bool(select.any())
    with torch.no_grad():
        out = model.backbone(model.ridge(mixed, 0))
    unmixed = F.l1_loss(out.blurry_latent, batch["blurry"]).item()
    b = betas.reshape(-1, 1, 1, 1)
    mixed_target = F.l1_loss(out.blurry_latent, batch["blurry"] * b + batch["blurry"][perm] * (1 - b)).item()
    assert parts["blur_loss"] == pytest.approx(unmixed, rel=1e-5)
    assert abs(unmixed - mixed_target) > 1e-4


def test_teacher_side_of_the_auxiliary_loss_sees_augmented_views():
    config = micro_config(subject_voxels=(20,), blurry=True, blurry_out_channels=4)
    torch.manual_seed(0)
    model = MindEyeModule(config).eval()
    plain = _latent_subject(config, views=0, seed=1)
    augmented = _latent_subject(config, views=2, seed=1)
    assert torch.equal(plain.aux_targets, augmented.aux_targets)
    trainer = Trainer(model, TrainConfig(clip_scale=0, prior_scale=0, blur_scale=1, batch_size=12), progress=False)

    def blur_loss(data):
        batch = trainer._batch(data, torch.arange(12), 0)
        return trainer._loss([batch], torch.device("cpu"), False, 0.004, torch.Generator().manual_seed(0))[1]

    assert blur_loss(plain)["blur_loss"] != pytest.approx(blur_loss(augmented)["blur_loss"], rel=1e-4)
    # a fine-tune step runs with them
    result = Trainer(MindEyeModule(config), TrainConfig(epochs=1, batch_size=6, device="cpu"),
                     progress=False).fit([augmented])
    assert np.isfinite(result.history[-1].loss)
