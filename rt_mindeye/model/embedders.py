"""Image embedders: the image tokens the model learns to predict (and that retrieval compares against).

Contract (:class:`ImageEmbedder`): ``tokens_shape`` -> (seq, dim); ``embed(images)`` takes uint8 or float images
(N, H, W, 3) (numpy or torch, float in [0, 1]) or a list of PIL images and returns (N, seq, dim) float32 tokens.

- :class:`OpenCLIPEmbedder` / :func:`OpenCLIPBigGEmbedder`: MindEye2's target, OpenCLIP ViT-bigG/14 patch tokens
  (256 x 1664 at 224 px): the vision tower is built with ``pretrained=None`` and its weights come from a local file;
  tokens are the transformer's outputs after ``ln_post`` without the CLS token and without the projection, as
  MindEyeV2's ``FrozenOpenCLIPImageEmbedder(output_tokens=True, only_tokens=True)`` returns them.
- :class:`PhantomEmbedder`: the phantom's real pretrained EfficientNet-Lite0; a chosen feature map average-pooled to
  a grid x grid token map (default stage 5, 4 x 4 = 16 tokens of 112 channels). Cheap on a CPU (and narrow tokens
  keep the prior, which dominates a training step, cheap), and the phantom's voxels are tuned to the same network's
  features (stage-5 maps among them), so the brain carries information about these tokens.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rt_mindeye.errors import CheckpointError, CheckpointKeyError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISUAL_PREFIX = "visual."


def images_to_tensor(images: Any) -> torch.Tensor:
    """uint8/float (N, H, W, 3) arrays or tensors, or a list of PIL images -> float32 (N, 3, H, W) in [0, 1]."""
    if isinstance(images, (list, tuple)):
        arrays = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
        sizes = {a.shape for a in arrays}
        if len(sizes) != 1:
            raise ValueError(f"images have different shapes {sorted(sizes)}; resize them first")
        images = np.stack(arrays)
    tensor = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected images (N, H, W, 3), got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    else:
        tensor = tensor.float()
    return tensor.permute(0, 3, 1, 2).contiguous()


class ImageEmbedder(abc.ABC):
    """Images -> (N, seq, dim) tokens."""

    @property
    @abc.abstractmethod
    def tokens_shape(self) -> tuple[int, int]:
        """(seq, dim) of one image's tokens."""

    @abc.abstractmethod
    def embed(self, images: Any) -> torch.Tensor:
        """(N, seq, dim) float32 tokens of the images."""

    def embed_batched(self, images: Any, batch_size: int = 32) -> torch.Tensor:
        pixels = images_to_tensor(images) if not isinstance(images, torch.Tensor) or images.ndim != 4 \
            or images.shape[1] != 3 else images
        parts = [self._embed_pixels(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
        return torch.cat(parts) if parts else torch.zeros((0, *self.tokens_shape))

    def _embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, H, W) in [0, 1]
        return self.embed(pixels.permute(0, 2, 3, 1))


# -- OpenCLIP ----------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors by extension, else ``torch.load(weights_only=True)`` (local files only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file (weights are read from local paths only)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return dict(obj)


class OpenCLIPEmbedder(ImageEmbedder):
    """Patch tokens of an OpenCLIP ViT vision tower whose weights come from a local file.

    Args:
        checkpoint_path: a full OpenCLIP state dict (``visual.*`` keys are used) or a vision-tower-only one.
        model_name: OpenCLIP architecture name (its config gives the tower's shape), or None with ``vision_cfg``.
        vision_cfg: explicit vision config dict (tests use a tiny one); overrides ``model_name``.
        embed_dim: the CLIP embedding width (only shapes the unused projection).
        mindeye2_input_range: reproduce MindEyeV2's preprocessing, which maps its [0, 1] images with ``(x + 1) / 2``
            (the embedder expected [-1, 1]) before CLIP normalisation. The published models were trained on
            tokens computed that way, so keep it on to match their targets.
        device, dtype: where the tower runs.
    """

    def __init__(self, checkpoint_path: str | Path, model_name: str | None = "ViT-bigG-14",
                 vision_cfg: dict | None = None, embed_dim: int | None = None, mindeye2_input_range: bool = True,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        import open_clip
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        if vision_cfg is None:
            model_cfg = open_clip.get_model_config(model_name)
            if model_cfg is None:
                raise CheckpointError(checkpoint_path, f"unknown OpenCLIP architecture {model_name!r}")
            vision_cfg = model_cfg["vision_cfg"]
            embed_dim = embed_dim or model_cfg["embed_dim"]
        cfg = CLIPVisionCfg(**vision_cfg)
        with torch.device("meta"):
            visual = _build_vision_tower(embed_dim or 512, cfg)
        state = read_state_dict(checkpoint_path)
        if any(k.startswith(VISUAL_PREFIX) for k in state):
            state = {k[len(VISUAL_PREFIX):]: v for k, v in state.items() if k.startswith(VISUAL_PREFIX)}
        expected = visual.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        mismatched = [(k, tuple(expected[k].shape), tuple(v.shape)) for k, v in state.items()
                      if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        if missing or unexpected or mismatched:
            raise CheckpointKeyError(checkpoint_path, missing, unexpected, mismatched)
        visual.load_state_dict(state, strict=True, assign=True)
        visual.output_tokens = True
        self.visual = visual.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.image_size = int(cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0])
        grid = self.image_size // int(cfg.patch_size)
        self._tokens_shape = (grid * grid, int(cfg.width))
        self.mindeye2_input_range = mindeye2_input_range
        self.device, self.dtype = torch.device(device), dtype
        self._mean = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)

    @property
    def tokens_shape(self) -> tuple[int, int]:
        return self._tokens_shape

    @torch.no_grad()
    def _embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=True, antialias=True).clamp(0, 1)
        if self.mindeye2_input_range:
            pixels = (pixels + 1.0) / 2.0
        pixels = (pixels - self._mean) / self._std
        _, tokens = self.visual(pixels.to(self.device, self.dtype))
        return tokens.float().cpu()

    def embed(self, images: Any) -> torch.Tensor:
        return self._embed_pixels(images_to_tensor(images))


def OpenCLIPBigGEmbedder(checkpoint_path: str | Path, **kwargs: Any) -> OpenCLIPEmbedder:  # noqa: N802 - a factory
    """MindEye2's target: ViT-bigG/14 (``laion2b_s39b_b160k`` weights from a local file), 256 x 1664 tokens."""
    return OpenCLIPEmbedder(checkpoint_path, model_name="ViT-bigG-14", **kwargs)


# -- phantom ---------------------------------------------------------------------------------------------------------

PHANTOM_LAYER_CHANNELS = {"stage5": 112, "stage6": 192, "stage7": 320, "head": 1280}


class PhantomEmbedder(ImageEmbedder):
    """EfficientNet-Lite0 (real ImageNet weights) feature map pooled to grid x grid tokens."""

    def __init__(self, layer: str = "stage5", grid: int = 4, device: str | torch.device = "cpu"):
        if layer not in PHANTOM_LAYER_CHANNELS:
            raise ValueError(f"layer must be one of {sorted(PHANTOM_LAYER_CHANNELS)}, got {layer!r}")
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        from rt_mindeye.nets.efficientnet_lite0 import load_efficientnet_lite0

        self.layer, self.grid = layer, int(grid)
        self.net = load_efficientnet_lite0(device).eval()
        self.device = torch.device(device)

    @property
    def tokens_shape(self) -> tuple[int, int]:
        return (self.grid * self.grid, PHANTOM_LAYER_CHANNELS[self.layer])

    @torch.no_grad()
    def feature_maps(self, pixels: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        stages = [name for name in layers if name.startswith("stage")]
        # Stop after the deepest stage asked for: the phantom's stage-5 tokens skip stages 6-7 and the head.
        until = max(stages, key=lambda name: int(name[5:])) if len(stages) == len(layers) else None
        features = self.net.features(pixels.to(self.device), until=until)
        return {name: features[name] for name in layers}

    def pool_tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        """(n, c, h, w) feature map -> (n, grid^2, c) tokens."""
        pooled = F.adaptive_avg_pool2d(fmap, self.grid)  # (n, c, g, g)
        return pooled.flatten(2).transpose(1, 2).float().cpu()

    @torch.no_grad()
    def _embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool_tokens(self.feature_maps(pixels, [self.layer])[self.layer])

    def embed(self, images: Any) -> torch.Tensor:
        return self._embed_pixels(images_to_tensor(images))


# -- low-level targets: ConvNeXt teacher features ----------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.228, 0.224, 0.225)  # MindEye2's Train.ipynb values (0.228, not torchvision's 0.229)


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (N, C, H, W) maps (ConvNeXt's downsampling norms)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv -> LayerNorm -> Linear(4x) -> GELU -> Linear, added to the input (no layer scale, as the
    VICRegL ConvNeXt MindEye2 uses is built with ``layer_scale_init_value=0``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtBackbone(nn.Module):
    """ConvNeXt feature extractor: (N, 3, H, W) -> (N, H/32 * W/32, dims[-1]) LayerNorm-ed tokens."""

    def __init__(self, depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048)):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4),
                                                              ChannelsFirstLayerNorm(dims[0]))])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(nn.Sequential(ChannelsFirstLayerNorm(dims[i]),
                                                        nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)))
        self.stages = nn.ModuleList([nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)])
                                     for d, n in zip(dims, depths)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x.flatten(2).transpose(1, 2))


class ConvNeXtTeacher(nn.Module):
    """The teacher of MindEye2's auxiliary low-level loss: a ConvNeXt (``convnext_xlarge_alpha0.75_fullckpt.pth``,
    VICRegL) whose 7x7 final tokens go through the ``maps_projector`` MLP (2048 -> 512 -> 512 -> 512, LayerNorm and
    ReLU between, no bias at the end): (N, 3, 224, 224) normalised images -> (N, 49, 512).

    Key names mirror the published checkpoint (``backbone.*``, ``maps_projector.*``), so
    :func:`rt_mindeye.convert.convnext.load_convnext_teacher` loads it without renaming. Sizes are arguments so that
    tests can build a tiny one."""

    def __init__(self, depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048), projector=(512, 512, 512)):
        super().__init__()
        self.backbone = ConvNeXtBackbone(depths, dims)
        widths = (dims[-1], *projector)
        layers: list[nn.Module] = []
        for i in range(len(widths) - 2):
            layers += [nn.Linear(widths[i], widths[i + 1]), nn.LayerNorm(widths[i + 1]), nn.ReLU(True)]
        layers.append(nn.Linear(widths[-2], widths[-1], bias=False))
        self.maps_projector = nn.Sequential(*layers)

    @property
    def out_dim(self) -> int:
        return self.maps_projector[-1].out_features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images already normalised with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`."""
        return self.maps_projector(self.backbone(pixels))


def convnext_augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MindEye2's ``blur_augs`` on (N, 3, H, W) images in [0, 1], every random draw from ``generator``:
    colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with probability 0.8, grayscale with
    probability 0.1, solarize (threshold 0.5 +- 0.1, brightness +- 0.1) with probability 0.1, and a square crop of 90 %
    of the area at a random place resized back to the input size (kornia's RandomResizedCrop(scale=(.9, .9),
    ratio=(1, 1)))."""
    import torchvision.transforms.v2.functional as TF

    def uniform(low: float, high: float) -> float:
        return float(low + (high - low) * torch.rand((), generator=generator))

    out = []
    size = pixels.shape[-2:]
    for image in pixels:
        if uniform(0, 1) < 0.8:
            image = TF.adjust_brightness(image, uniform(0.6, 1.4))
            image = TF.adjust_contrast(image, uniform(0.6, 1.4))
            image = TF.adjust_saturation(image, uniform(0.8, 1.2))
            image = TF.adjust_hue(image, uniform(-0.1, 0.1))
        if uniform(0, 1) < 0.1:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if uniform(0, 1) < 0.1:
            image = (image + uniform(-0.1, 0.1)).clamp(0, 1)
            threshold = uniform(0.4, 0.6)
            image = torch.where(image >= threshold, 1.0 - image, image)
        side_h, side_w = (max(1, round(s * 0.9 ** 0.5)) for s in size)
        top = int(torch.randint(0, size[0] - side_h + 1, (), generator=generator))
        left = int(torch.randint(0, size[1] - side_w + 1, (), generator=generator))
        image = TF.resized_crop(image, top, left, side_h, side_w, list(size), antialias=True)
        out.append(image.clamp(0, 1))
    return torch.stack(out)
