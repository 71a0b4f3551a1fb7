"""The decoding stage as the GPU service sees it: betas in, retrieval + images out.

:class:`Decoder` is model-agnostic: it takes ``model_forward``, any callable mapping z-scored betas (B, V) to
``(clip_tokens, prior_tokens, blurry_latent or None)`` (MindEye2: backbone + projector, diffusion prior, low-level
head), a :class:`~rt_mindeye.decode.retrieval.Retriever`, and optionally an
:class:`~rt_mindeye.decode.reconstruct.UnclipReconstructor` and a
:class:`~rt_mindeye.decode.reconstruct.BlurryDecoder`. Its :class:`DecodeResult` holds only numpy arrays, strings and
floats, ready for a transport message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import inspect

from rt_mindeye.decode.config import DecodeConfig
from rt_mindeye.errors import RtMindEyeError

ModelForward = Callable[..., tuple[Any, Any, Any]]
SEED_BITS = 63  # torch.Generator.manual_seed takes up to 64-bit seeds; keep them positive int64


def trial_seed(base: int, run: int, trial: int) -> int:
    """The reconstruction seed of one trial: a hash of (base seed, run, trial), the same for every estimate of that
    trial and different for every trial of a session (runs restart their trial numbers)."""
    state = np.random.SeedSequence([int(base), int(run), int(trial)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << SEED_BITS) - 1)


def prior_seed(seed: int) -> int:
    """The diffusion prior's seed for a trial whose unCLIP seed is ``seed``: a separate stream, so the prior's first
    noise draw is not the same numbers as the unCLIP's unconditional tokens."""
    state = np.random.SeedSequence([int(seed), 1]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << SEED_BITS) - 1)


def _accepts_seed(function: Callable) -> bool:
    # A torch module's __call__ takes **kwargs whatever its forward does: look at forward.
    target = getattr(function, "forward", function)
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == "seed" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class DecodeInputError(RtMindEyeError):
    """Betas, or what the model returned for them, do not have the expected form."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"decode {field}: {problem}")


@dataclass(frozen=True)
class DecodeResult:
    """What one :meth:`Decoder.decode` call produced, for B trials.

    ``topk_ids`` (B lists of k candidate ids, best first), ``topk_indices`` (B, k) int64, ``scores`` (B, k) float32
    cosines; ``image`` (B, H, W, 3) uint8 final reconstruction (blurry blended in when present) or None;
    ``blurry`` (B, h, w, 3) uint8 or None; ``timings_ms`` per stage (model, retrieval, blurry, reconstruct, total).
    """

    topk_ids: list[list[str]]
    topk_indices: np.ndarray
    scores: np.ndarray
    image: np.ndarray | None = None
    blurry: np.ndarray | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


def _to_numpy(value: Any, field_name: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        return value.detach().float().cpu().numpy()
    raise DecodeInputError(field_name, f"expected an array or tensor, got {type(value).__name__}")


class Decoder:
    """Betas -> retrieval top-k, reconstruction and blurry image.

    Parameters
    ----------
    config:
        :class:`~rt_mindeye.decode.config.DecodeConfig`.
    model_forward:
        callable ``betas (B, V) -> (clip_tokens (B, seq, dim), prior_tokens (B, seq, dim), blurry_latent (B, 4, h, w)
        or None)``. When it takes a ``seed`` keyword, it gets :func:`prior_seed` of the call's seed, to seed the
        diffusion prior's own generator.
    retriever:
        candidate set to search with ``clip_tokens``.
    reconstructor, blurry_decoder:
        optional; without them ``image`` / ``blurry`` stay None.
    """

    def __init__(self, config: DecodeConfig, model_forward: ModelForward, retriever, reconstructor=None,
                 blurry_decoder=None):
        self.config = config
        self.model_forward = model_forward
        self.retriever = retriever
        self.reconstructor = reconstructor
        self.blurry_decoder = blurry_decoder
        self._forward_takes_seed = _accepts_seed(model_forward)
        self.calls_ = 0

    def decode(self, betas, *, seed: int | None = None) -> DecodeResult:
        """Decode one trial (V,) or a batch (B, V) of betas.

        ``seed`` (default ``config.seed`` + the number of earlier calls) seeds the prior's and the unCLIP's
        generators: the same betas and seed give the same images on the same device."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        if hasattr(betas, "ndim") and betas.ndim == 1:
            betas = betas[None]
        if not hasattr(betas, "ndim") or betas.ndim != 2 or betas.shape[0] == 0:
            raise DecodeInputError("betas", f"expected (V,) or (B, V), got {getattr(betas, 'shape', type(betas))}")
        batch = int(betas.shape[0])

        base_seed = self.config.seed + self.calls_ if seed is None else int(seed)
        tick = time.perf_counter()
        if self._forward_takes_seed:
            outputs = self.model_forward(betas, seed=prior_seed(base_seed))
        else:
            outputs = self.model_forward(betas)
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 3:
            raise DecodeInputError("model_forward", "must return (clip_tokens, prior_tokens, blurry_latent or None)")
        clip_tokens, prior_tokens, blurry_latent = outputs
        timings["model_ms"] = (time.perf_counter() - tick) * 1e3
        if clip_tokens is None or len(clip_tokens) != batch:
            raise DecodeInputError("clip_tokens", f"expected {batch} rows from model_forward")

        tick = time.perf_counter()
        indices, scores = self.retriever.topk(clip_tokens, k=self.config.top_k)
        ids = [[self.retriever.ids[i] for i in row] for row in indices]
        timings["retrieval_ms"] = (time.perf_counter() - tick) * 1e3

        blurry_images = None
        blurry_uint8 = None
        if self.config.blurry and blurry_latent is not None and self.blurry_decoder is not None:
            tick = time.perf_counter()
            blurry_images = self.blurry_decoder.decode(blurry_latent)
            blurry_uint8 = _images_to_uint8(blurry_images)
            timings["blurry_ms"] = (time.perf_counter() - tick) * 1e3

        image = None
        if self.config.reconstruct and self.reconstructor is not None:
            if prior_tokens is None:
                raise DecodeInputError("prior_tokens", "model_forward returned None but a reconstructor is set")
            tick = time.perf_counter()
            output = self.reconstructor.reconstruct(prior_tokens, blurry=blurry_images, seed=base_seed)
            image = _images_to_uint8(output.images)
            timings["reconstruct_ms"] = (time.perf_counter() - tick) * 1e3
            for key, value in output.timings_ms.items():
                if key != "total_ms":
                    timings[f"reconstruct_{key}"] = value

        self.calls_ += 1
        timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return DecodeResult(topk_ids=ids, topk_indices=np.asarray(indices, dtype=np.int64),
                            scores=np.asarray(scores, dtype=np.float32), image=image, blurry=blurry_uint8,
                            timings_ms=timings)


def _images_to_uint8(images) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8."""
    array = _to_numpy(images, "images")
    return np.clip(np.rint(np.transpose(array, (0, 2, 3, 1)) * 255.0), 0, 255).astype(np.uint8)
