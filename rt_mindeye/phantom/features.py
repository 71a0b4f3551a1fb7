"""Image features the simulated voxels are tuned to: low-level maps from the pixels, mid- and high-level features
from EfficientNet-Lite0 (real ImageNet weights), computed once per stimulus set and kept in memory."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rt_mindeye.phantom.brain import image_feature_maps

LOW_GRID = 32  # pRF pooling grid for the low-level maps
MID_STAGE = "stage5"  # 112 channels at 14x14 for 224 px input
HIGH_KEY = "embedding"  # pooled 1280-d penultimate layer

_IMAGE_CACHE: dict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # sha1(image) -> (low, mid, high)
_CACHE_LOCK = threading.Lock()
_NET = None


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    low: np.ndarray
    """(N, 4, 32, 32): contrast energy, luminance, red-green, blue-yellow (row 0 = image top)."""
    mid: np.ndarray
    """(N, 112, 14, 14): EfficientNet-Lite0 stage-5 maps."""
    high: np.ndarray
    """(N, 1280): EfficientNet-Lite0 pooled penultimate embedding."""


def _network():
    global _NET
    if _NET is None:
        from rt_mindeye.nets.efficientnet_lite0 import load_efficientnet_lite0

        _NET = load_efficientnet_lite0("cpu")
    return _NET


FEATURE_VERSION = 2  # bump when the feature definition changes (invalidates disk caches)


def cache_dir() -> Path | None:
    """Folder of the on-disk feature cache: ``$RT_MINDEYE_CACHE`` or ``~/.cache/rt_mindeye``; "off" disables it."""
    root = os.environ.get("RT_MINDEYE_CACHE")
    if root and root.lower() in ("off", "0", "none"):
        return None
    return Path(root) if root else Path.home() / ".cache" / "rt_mindeye"


def _disk_path(key: bytes) -> Path | None:
    root = cache_dir()
    return root / "phantom_features" / f"v{FEATURE_VERSION}-{key.hex()}.npz" if root else None


def _load_disk(key: bytes) -> ImageFeatures | None:
    path = _disk_path(key)
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return ImageFeatures(low=data["low"], mid=data["mid"], high=data["high"])
    except (OSError, KeyError, ValueError):  # a damaged cache entry is recomputed, never trusted
        return None


def _save_disk(key: bytes, features: ImageFeatures) -> None:
    path = _disk_path(key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, low=features.low, mid=features.mid, high=features.high)
        os.replace(tmp, path)
    except OSError:  # a read-only home is fine: the cache is an optimisation
        pass


def compute_features(images: np.ndarray, batch_size: int = 32, progress=None) -> ImageFeatures:
    """Features of uint8 images (N, H, W, 3).

    Cached by content: per image in memory (any subset or reordering of already seen images costs nothing) and per
    image set on disk (:func:`cache_dir`), so a session's features are computed once per machine.
    """
    import hashlib

    images = np.ascontiguousarray(images)
    keys = [hashlib.sha1(image.tobytes()).digest() for image in images]
    set_key = hashlib.sha1(b"".join(keys) + repr(images.shape).encode()).digest()
    with _CACHE_LOCK:
        missing = [k for k, key in enumerate(keys) if key not in _IMAGE_CACHE]
    if missing:
        cached = _load_disk(set_key)
        if cached is not None and len(cached.high) == len(images):
            _remember(keys, cached)
            missing = []
    if missing:
        computed = _compute(images[missing], batch_size, progress)
        _remember([keys[k] for k in missing], computed)
    with _CACHE_LOCK:
        parts = [_IMAGE_CACHE[key] for key in keys]
    features = ImageFeatures(low=np.stack([p[0] for p in parts]), mid=np.stack([p[1] for p in parts]),
                             high=np.stack([p[2] for p in parts]))
    if missing:
        _save_disk(set_key, features)
    return features


def _remember(keys: list[bytes], features: ImageFeatures) -> None:
    with _CACHE_LOCK:
        for k, key in enumerate(keys):
            _IMAGE_CACHE[key] = (features.low[k], features.mid[k], features.high[k])


def _compute(images: np.ndarray, batch_size: int, progress) -> ImageFeatures:
    import torch

    net = _network()
    mids, highs = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            out = net.features(batch.float() / 255.0)
            mids.append(out[MID_STAGE].numpy())
            highs.append(out[HIGH_KEY].numpy())
            if progress is not None:
                progress(min(start + batch_size, len(images)), len(images))
    return ImageFeatures(low=image_feature_maps(images, LOW_GRID), mid=np.concatenate(mids).astype(np.float32),
                         high=np.concatenate(highs).astype(np.float32))
