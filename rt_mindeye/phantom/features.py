"""Image features the simulated voxels are tuned to: low-level maps from the pixels, mid- and high-level features
from a pretrained network (EfficientNet-Lite2 by default, real ImageNet weights), computed once per stimulus set and
kept in memory and on disk.

The driving network is deliberately not the decoder's target embedder (EfficientNet-Lite0 on the phantom): a decoder
scored on voxels made from its own target features would be inflated by construction. Lite2 is deeper and wider, was
trained separately and sees the images at its own 260 px, so the brain carries information about the images, not a
copy of the decoder's targets.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rt_mindeye.phantom.brain import image_feature_maps

LOW_GRID = 32  # pRF pooling grid for the low-level maps
MID_STAGE = "stage5"  # Lite0: 112 channels at 14x14 (224 px); Lite2: 120 channels at 17x17 (260 px)
HIGH_KEY = "embedding"  # pooled 1280-d penultimate layer
NETWORKS = {"efficientnet-lite0": "lite0", "efficientnet-lite1": "lite1", "efficientnet-lite2": "lite2"}
DEFAULT_NETWORK = "efficientnet-lite2"

# (network, sha1(image)) -> (low, mid, high)
_IMAGE_CACHE: dict[tuple[str, bytes], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
_CACHE_LOCK = threading.Lock()
_NETS: dict[str, object] = {}


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    low: np.ndarray
    """(N, 4, 32, 32): contrast energy, luminance, red-green, blue-yellow (row 0 = image top)."""
    mid: np.ndarray
    """(N, C, g, g): the driving network's stage-5 maps at its native input size."""
    high: np.ndarray
    """(N, 1280): the driving network's pooled penultimate embedding."""


def network_variant(network: str) -> str:
    if network not in NETWORKS:
        raise ValueError(f"unknown phantom driving network {network!r} (known: {', '.join(NETWORKS)})")
    return NETWORKS[network]


def mid_channels(network: str) -> int:
    """Channels of the mid-tier feature maps of ``network`` (no weights loaded)."""
    from rt_mindeye.nets.efficientnet_lite import stage_channels

    return stage_channels(network_variant(network))[MID_STAGE]


def _network(network: str):
    with _CACHE_LOCK:
        if network not in _NETS:
            from rt_mindeye.nets.efficientnet_lite import load_efficientnet_lite

            _NETS[network] = load_efficientnet_lite(network_variant(network), "cpu")
        return _NETS[network]


FEATURE_VERSION = 3  # bump when the feature definition changes (invalidates disk caches)


def cache_dir() -> Path | None:
    """Folder of the on-disk feature cache: ``$RT_MINDEYE_CACHE`` or ``~/.cache/rt_mindeye``; "off" disables it."""
    root = os.environ.get("RT_MINDEYE_CACHE")
    if root and root.lower() in ("off", "0", "none"):
        return None
    return Path(root) if root else Path.home() / ".cache" / "rt_mindeye"


def _disk_path(network: str, key: bytes) -> Path | None:
    """One file per (driving network, image set): features of another network never collide with these."""
    root = cache_dir()
    return root / "phantom_features" / f"{network}-v{FEATURE_VERSION}-{key.hex()}.npz" if root else None


def _load_disk(network: str, key: bytes) -> ImageFeatures | None:
    path = _disk_path(network, key)
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return ImageFeatures(low=data["low"], mid=data["mid"], high=data["high"])
    except (OSError, KeyError, ValueError):  # a damaged cache entry is recomputed, never trusted
        return None


def _save_disk(network: str, key: bytes, features: ImageFeatures) -> None:
    path = _disk_path(network, key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, low=features.low, mid=features.mid, high=features.high)
        os.replace(tmp, path)
    except OSError:  # a read-only home is fine: the cache is an optimisation
        pass


def compute_features(images: np.ndarray, batch_size: int = 32, progress=None,
                     network: str = DEFAULT_NETWORK) -> ImageFeatures:
    """Features of uint8 images (N, H, W, 3) from ``network`` (a key of :data:`NETWORKS`).

    Cached by content and network: per image in memory (any subset or reordering of already seen images costs
    nothing) and per image set on disk (:func:`cache_dir`), so a session's features are computed once per machine.
    """
    import hashlib

    network_variant(network)
    images = np.ascontiguousarray(images)
    keys = [(network, hashlib.sha1(image.tobytes()).digest()) for image in images]
    set_key = hashlib.sha1(b"".join(k for _, k in keys) + repr(images.shape).encode()).digest()
    with _CACHE_LOCK:
        missing = [k for k, key in enumerate(keys) if key not in _IMAGE_CACHE]
    if missing:
        cached = _load_disk(network, set_key)
        if cached is not None and len(cached.high) == len(images):
            _remember(keys, cached)
            missing = []
    if missing:
        computed = _compute(images[missing], batch_size, progress, network)
        _remember([keys[k] for k in missing], computed)
    with _CACHE_LOCK:
        parts = [_IMAGE_CACHE[key] for key in keys]
    features = ImageFeatures(low=np.stack([p[0] for p in parts]), mid=np.stack([p[1] for p in parts]),
                             high=np.stack([p[2] for p in parts]))
    if missing:
        _save_disk(network, set_key, features)
    return features


def _remember(keys: list[tuple[str, bytes]], features: ImageFeatures) -> None:
    with _CACHE_LOCK:
        for k, key in enumerate(keys):
            _IMAGE_CACHE[key] = (features.low[k], features.mid[k], features.high[k])


def _compute(images: np.ndarray, batch_size: int, progress, network: str) -> ImageFeatures:
    import torch
    import torch.nn.functional as F

    net = _network(network)
    mids, highs = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            batch = batch.float() / 255.0
            if batch.shape[-1] != net.image_size or batch.shape[-2] != net.image_size:
                # Each network sees the stimuli at the size it was trained at (Lite2: 260 px).
                batch = F.interpolate(batch, size=(net.image_size, net.image_size), mode="bilinear",
                                      align_corners=False, antialias=True).clamp(0.0, 1.0)
            out = net.features(batch)
            mids.append(out[MID_STAGE].numpy())
            highs.append(out[HIGH_KEY].numpy())
            if progress is not None:
                progress(min(start + batch_size, len(images)), len(images))
    return ImageFeatures(low=image_feature_maps(images, LOW_GRID), mid=np.concatenate(mids).astype(np.float32),
                         high=np.concatenate(highs).astype(np.float32))
