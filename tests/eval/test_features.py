from __future__ import annotations

import pytest
import torch

from rt_mindeye.errors import CheckpointError
from rt_mindeye.eval import features, metrics


def test_layer_extractor_returns_named_flattened_layers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3))
    extractor = features.LayerExtractor(model, {"early": "1", "late": "2"}, size=20)
    out = extractor(torch.rand(5, 3, 37, 37))
    assert out["early"].shape == (5, 4 * 9 * 9) and out["late"].shape == (5, 2 * 7 * 7)
    assert float(out["early"].min()) >= 0.0  # after the ReLU


def test_torchvision_weights_are_never_downloaded(tmp_path):
    with pytest.raises(CheckpointError, match="never downloaded"):
        features.alexnet_extractor(tmp_path / "alexnet-owt-7be5be79.pth")
    with pytest.raises(CheckpointError, match="not found"):
        features.inception_extractor(tmp_path / "inception_v3_google-0cc3c7bd.pth")


def test_efficientnet_lite0_two_way_identification_with_real_weights():
    pytest.importorskip("rt_mindeye.nets.efficientnet_lite0")
    extractor = features.efficientnet_lite0_extractor()
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(6, 3, 5, 5, generator=generator), size=(64, 64),
                                             mode="bicubic").clamp(0, 1)
    embeddings = metrics.extract(extractor, images, batch_size=4)
    assert embeddings.shape == (6, 1280)
    assert metrics.two_way_identification(embeddings, embeddings) == 1.0
    slightly_blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    assert metrics.two_way_identification(metrics.extract(extractor, slightly_blurred), embeddings) > 0.8
