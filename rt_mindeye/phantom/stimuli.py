"""Stimulus images: real pictures that ship with scikit-image plus deterministic variants and synthetic images.

The stimulus sequence is global and fixed (it does not depend on subject or seed): stimulus ``i`` is always the same
224 px RGB image, so every simulated subject sees the same pictures, as in a multi-subject study. The first
:data:`BASE_IMAGES` entries are the scikit-image pictures themselves (centre crop, resized); after that the sequence
cycles through photo variants (random crop, zoom, flip, hue rotation, saturation and contrast change of a base
picture), oriented coloured gratings in an aperture, and scenes of coloured shapes at random positions. Each image
depends only on its index (its own random generator), so any prefix of the sequence is stable.

``stimulus_set(n)`` gives the first ``n`` :class:`Stimulus` descriptions; ``render(stimulus)`` draws one as a uint8
array ``(size, size, 3)``; ``save_stimuli(stimuli, folder)`` writes them as PNG files named ``{index:04d}_{name}.png``.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

# scikit-image pictures installed with the package (no download needed), in the order they enter the sequence.
BASE_IMAGES = (
    "astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry",
    "retina", "colorwheel", "logo", "camera", "coins", "moon", "page", "text", "horse", "brick", "grass", "gravel",
    "checkerboard", "clock", "cell", "microaneurysms",
)
# Scikit-image pictures in colour: variants of these keep their colour, the grey ones get tinted.
COLOUR_BASES = BASE_IMAGES[:10]

KINDS = ("photo", "variant", "grating", "shapes")
_SEQUENCE_SEED = 20240521  # fixed: the stimulus sequence is part of the phantom's definition


@dataclass(frozen=True)
class Stimulus:
    index: int
    """Position in the global stimulus sequence."""
    kind: str
    """One of ``photo`` (a scikit-image picture), ``variant`` (a modified picture), ``grating``, ``shapes``."""
    name: str
    """Short readable name, unique within the sequence (also the PNG file name stem after the index)."""
    source: str | None = None
    """The scikit-image picture a photo or variant comes from."""

    @property
    def file_name(self) -> str:
        return f"{self.index:04d}_{self.name}.png"


@functools.lru_cache(maxsize=None)
def _base_picture(name: str) -> np.ndarray:
    """A scikit-image picture as uint8 RGB (grey and binary images replicated to three channels, alpha dropped)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.shape[-1] == 4:  # composite the logo's alpha over white
        alpha = image[..., 3:4].astype(np.float32) / 255.0
        image = (image[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _kind_for(index: int) -> str:
    if index < len(BASE_IMAGES):
        return "photo"
    # Half photo variants, a quarter gratings, a quarter shape scenes: mostly natural content, as in the study.
    return ("variant", "variant", "grating", "shapes")[(index - len(BASE_IMAGES)) % 4]


def _rng(index: int) -> np.random.Generator:
    return np.random.default_rng([_SEQUENCE_SEED, index])


def stimulus(index: int) -> Stimulus:
    """Description of stimulus ``index`` of the global sequence."""
    if index < 0:
        raise ValueError(f"stimulus index must be >= 0, got {index}")
    kind = _kind_for(index)
    if kind == "photo":
        name = BASE_IMAGES[index]
        return Stimulus(index, kind, name, source=name)
    if kind == "variant":
        source = BASE_IMAGES[int(_rng(index).integers(len(BASE_IMAGES)))]
        return Stimulus(index, kind, f"{source}-v{index}", source=source)
    return Stimulus(index, kind, f"{kind}-{index}")


def stimulus_set(n: int) -> list[Stimulus]:
    """The first ``n`` stimuli of the global sequence."""
    return [stimulus(i) for i in range(n)]


def _square(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def _rotate_hue(image: Image.Image, turns: float) -> Image.Image:
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(round(turns * 255))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _render_variant(stim: Stimulus, size: int) -> Image.Image:
    rng = _rng(stim.index)
    rng.integers(len(BASE_IMAGES))  # the draw that chose the source picture
    base = Image.fromarray(_base_picture(stim.source))
    w, h = base.size
    side = int(min(w, h) * rng.uniform(0.4, 1.0))
    left = int(rng.integers(0, w - side + 1))
    top = int(rng.integers(0, h - side + 1))
    image = base.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if stim.source not in COLOUR_BASES or rng.random() < 0.3:
        # Tint grey pictures (and some colour ones) so colour varies across the set.
        tint = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 0.8), 1.0))
        grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None] / 255.0
        image = Image.fromarray((grey * tint * 255).clip(0, 255).astype(np.uint8))
    else:
        image = _rotate_hue(image, rng.uniform(-0.2, 0.2))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))


def _render_grating(stim: Stimulus, size: int) -> Image.Image:
    rng = _rng(stim.index)
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    theta = rng.uniform(0, np.pi)
    cycles = rng.uniform(1.5, 12.0)  # cycles per image
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * cycles * (x * np.cos(theta) + y * np.sin(theta)) + phase)
    if rng.random() < 0.3:
        wave = np.sign(wave)  # square-wave grating
    cx, cy = rng.uniform(-0.2, 0.2, size=2)
    radius = rng.uniform(0.2, 0.5)
    aperture = 1.0 / (1.0 + np.exp((np.hypot(x - cx, y - cy) - radius) / 0.015))
    fg = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 1.0), 1.0))
    bg = np.full(3, rng.uniform(0.3, 0.6))
    contrast = rng.uniform(0.3, 1.0)
    pixel = bg + aperture[..., None] * contrast * 0.5 * wave[..., None] * fg
    return Image.fromarray((pixel.clip(0, 1) * 255).astype(np.uint8))


def _render_shapes(stim: Stimulus, size: int) -> Image.Image:
    rng = _rng(stim.index)
    bg = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.2, 1.0)))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 6))):
        hsv = (rng.random(), rng.uniform(0.4, 1), rng.uniform(0.4, 1))
        colour = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(*hsv))
        r = rng.uniform(0.06, 0.3) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif shape == 1:
            draw.rectangle((cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r), fill=colour)
        else:
            angle = rng.uniform(0, 2 * np.pi)
            points = [(cx + r * np.cos(angle + k * 2 * np.pi / 3), cy + r * np.sin(angle + k * 2 * np.pi / 3))
                      for k in range(3)]
            draw.polygon(points, fill=colour)
    return image


def render(stim: Stimulus, size: int = 224) -> np.ndarray:
    """The stimulus as a uint8 array ``(size, size, 3)``; the same for the same stimulus on every machine."""
    if stim.kind == "photo":
        image = _square(Image.fromarray(_base_picture(stim.source)), size)
    elif stim.kind == "variant":
        image = _render_variant(stim, size)
    elif stim.kind == "grating":
        image = _render_grating(stim, size)
    elif stim.kind == "shapes":
        image = _render_shapes(stim, size)
    else:
        raise ValueError(f"unknown stimulus kind {stim.kind!r} (known: {', '.join(KINDS)})")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def render_all(stimuli: Sequence[Stimulus], size: int = 224) -> np.ndarray:
    """All stimuli as one uint8 array ``(n, size, size, 3)``."""
    return np.stack([render(s, size) for s in stimuli]) if stimuli else np.zeros((0, size, size, 3), np.uint8)


def save_stimuli(stimuli: Sequence[Stimulus], folder: str | Path, size: int = 224,
                 images: np.ndarray | None = None) -> list[Path]:
    """Write each stimulus as ``folder/{index:04d}_{name}.png``; returns the paths in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, stim in enumerate(stimuli):
        pixels = images[k] if images is not None else render(stim, size)
        path = folder / stim.file_name
        Image.fromarray(pixels).save(path, optimize=False, compress_level=1)
        paths.append(path)
    return paths
