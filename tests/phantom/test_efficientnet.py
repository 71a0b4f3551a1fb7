"""EfficientNet-Lite0 and -Lite2 with the real ImageNet weights: load strictly, classify real photos, stable features;
the phantom's feature cache keeps each driving network's features apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rt_mindeye.errors import CheckpointKeyError
from rt_mindeye.nets.efficientnet_lite import load_efficientnet_lite
from rt_mindeye.nets.efficientnet_lite0 import EMBEDDING_DIM, STAGE_NAMES, load_efficientnet_lite0, weights_path

# ImageNet-1k classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = set(range(281, 286))


@pytest.fixture(scope="module")
def net():
    return load_efficientnet_lite0()


def _square(array: np.ndarray, size: int = 224) -> torch.Tensor:
    image = Image.fromarray(array).convert("RGB")
    w, h = image.size
    side = min(w, h)
    image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    pixels = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None]


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_chelsea_is_a_cat_and_coffee_is_espresso(variant, net):
    import skimage.data

    net = net if variant == "lite0" else load_efficientnet_lite(variant)
    size = net.image_size
    images = torch.cat([_square(skimage.data.chelsea(), size), _square(skimage.data.coffee(), size)])
    with torch.inference_mode():
        top5 = net.classify(images).topk(5).indices.tolist()
    assert CAT_CLASSES & set(top5[0]), top5[0]
    assert 967 in top5[1]  # espresso
    assert not CAT_CLASSES & set(top5[1])


def test_features_shapes_and_embedding_is_pooled_head(net):
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = net.features(x)
    assert set(STAGE_NAMES) <= set(out)
    assert out["embedding"].shape == (2, EMBEDDING_DIM)
    assert out["stage5"].shape == (2, 112, 14, 14)
    assert out["head"].shape == (2, EMBEDDING_DIM, 7, 7)
    torch.testing.assert_close(out["embedding"], out["head"].mean(dim=(2, 3)))
    torch.testing.assert_close(out["logits"], net._fc(out["embedding"]))


def test_folded_batchnorm_matches_plain_path(net):
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():
        plain = net.features(x)["embedding"].detach()
    with torch.inference_mode():
        folded = net.features(x)["embedding"]
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4)


def test_bad_input_is_rejected(net):
    with pytest.raises(ValueError, match="N, 3, H, W"):
        net.features(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="float"):
        net.features(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))


def test_checkpoint_with_missing_and_reshaped_keys_is_refused(tmp_path):
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    del state["_fc.bias"]
    state["_fc.weight"] = state["_fc.weight"][:10]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointKeyError) as info:
        load_efficientnet_lite0(weights=path)
    assert "_fc.bias" in str(info.value) and "extra.weight" in str(info.value) and "_fc.weight" in str(info.value)


def test_lite2_is_a_different_deeper_wider_network(net):
    lite2 = load_efficientnet_lite("lite2")
    assert lite2.image_size == 260 and len(lite2._blocks) == 21 and len(net._blocks) == 16
    with torch.inference_mode():
        out = lite2.features(torch.rand(1, 3, 260, 260, generator=torch.Generator().manual_seed(0)))
    assert out["stage5"].shape == (1, 120, 17, 17) and out["embedding"].shape == (1, EMBEDDING_DIM)


def test_phantom_feature_cache_is_keyed_by_the_driving_network(tmp_path, monkeypatch):
    from rt_mindeye.phantom import features

    monkeypatch.setenv("RT_MINDEYE_CACHE", str(tmp_path))
    monkeypatch.setattr(features, "_IMAGE_CACHE", {})
    images = np.random.default_rng(0).integers(0, 255, size=(2, 64, 64, 3), dtype=np.uint8)
    lite0 = features.compute_features(images, network="efficientnet-lite0")
    lite2 = features.compute_features(images, network="efficientnet-lite2")
    assert lite0.mid.shape[1] == 112 and lite2.mid.shape[1] == 120
    np.testing.assert_array_equal(lite0.low, lite2.low)  # pixel maps do not depend on the network
    files = sorted(p.name for p in (tmp_path / "phantom_features").iterdir())
    assert len(files) == 2 and files[0].startswith("efficientnet-lite0-") and files[1].startswith("efficientnet-lite2-")
    monkeypatch.setattr(features, "_IMAGE_CACHE", {})  # from disk now
    again = features.compute_features(images, network="efficientnet-lite2")
    np.testing.assert_array_equal(again.high, lite2.high)
