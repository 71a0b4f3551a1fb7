"""The decoder side: trial estimates in, retrieval and reconstructions out.

:class:`TrialDecoder` holds no sockets: it turns one :class:`~rt_mindeye.transport.messages.TrialBetas` into one
or two :class:`~rt_mindeye.transport.messages.DecodeResult` messages (retrieval first, reconstruction when the
policy lets it through). The decoder service wraps it with the reliable receiver and the result publisher.

The model is the calibration bundle's fine-tuned MindEye2; retrieval searches the bundle's candidate image
embeddings; the blurry image comes from the model's low-level head (when it has one); unCLIP reconstruction runs when
a reconstructor is configured (GPU host with the SDXL-unCLIP weights).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.decode.config import DecodeConfig
from rt_mindeye.decode.decoder import Decoder
from rt_mindeye.decode.retrieval import Retriever
from rt_mindeye.transport.messages import DecodeResult, TrialBetas
from rt_mindeye.transport.policy import ReconstructionQueue

log = logging.getLogger("rt_mindeye.decoder")

THUMBNAIL_PX = 96


class BundleModel:
    """The bundle's fine-tuned model as the :class:`Decoder`'s ``model_forward`` callable."""

    def __init__(self, bundle: CalibrationBundle, device: str = "cpu", sample_prior: bool = False):
        import torch

        from rt_mindeye.convert.mindeye2 import load_mindeye2

        self.torch = torch
        loaded = load_mindeye2(bundle.model_dir / "last.pth", device=device, dtype=torch.float32)
        self.model = loaded.model.eval()
        self.device = device
        self.sample_prior = sample_prior
        self.n_voxels = int(self.model.config.subject_voxels[0])

    def __call__(self, betas):
        torch = self.torch
        with torch.no_grad():
            voxels = torch.as_tensor(np.asarray(betas, dtype=np.float32), device=self.device)
            out = self.model(voxels, 0)
            prior = None
            if self.sample_prior and self.model.config.use_prior:
                prior = self.model.diffusion_prior.sample(out.tokens)
            blurry = out.blurry_latent
        return out.clip_voxels, prior, blurry


class PixelBlurryDecoder:
    """Low-level head output that is already an image (RGB in [-1, 1], the tiny/phantom models) -> [0, 1]."""

    def __init__(self, size: int = 224):
        self.size = size

    def decode(self, latent):
        import torch
        import torch.nn.functional as F

        images = (torch.as_tensor(latent).float().clamp(-1, 1) + 1) / 2
        return F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)


@dataclass
class DecodedTrial:
    messages: list[DecodeResult]
    recon_image: np.ndarray | None


def build_decoder(bundle: CalibrationBundle, config: DecodeConfig, device: str = "cpu",
                  reconstructor=None) -> tuple[Decoder, list[str]]:
    """A :class:`Decoder` over the bundle's model and candidates; returns it with the candidate file names."""
    model = BundleModel(bundle, device=device, sample_prior=reconstructor is not None)
    candidates = bundle.candidates()
    files = [str(f) for f in candidates["files"]]
    retriever = Retriever(candidates["tokens"], ids=files, device=device)
    blurry = None
    if model.model.config.blurry_recon and model.model.config.blurry_out_channels == 3:
        blurry = PixelBlurryDecoder()
    return Decoder(config, model, retriever, reconstructor=reconstructor, blurry_decoder=blurry), files


class TrialDecoder:
    """TrialBetas -> DecodeResult messages, with PNGs written under ``recon_dir``.

    Which estimates are decoded: every estimate gets retrieval; reconstruction (or the blurry image, on a CPU
    decoder) follows the :class:`ReconstructionQueue` policy so a slow reconstructor never delays retrieval.
    """

    def __init__(self, decoder: Decoder, *, session: str, recon_dir: Path | None, policy: str = "newest",
                 max_pending: int = 2, stimuli_dir: Path | None = None):
        self.decoder = decoder
        self.session = session
        self.recon_dir = recon_dir
        self.queue: ReconstructionQueue = ReconstructionQueue(policy=policy, max_pending=max_pending)
        self.policy = policy
        self.stimuli_dir = stimuli_dir

    def retrieve(self, msg: TrialBetas, received_at: float) -> DecodeResult:
        started = time.time()
        result = self.decoder.decode(msg.betas)
        done = time.time()
        ids = tuple(int(i) for i in result.topk_indices[0])
        labels = tuple(result.topk_ids[0])
        images = tuple(str(self.stimuli_dir / name) for name in labels) if self.stimuli_dir else ()
        image_path, thumb = None, None
        if result.blurry is not None and self.recon_dir is not None:
            image_path, thumb = self._save_png(msg, result.blurry[0], "blurry")
        return DecodeResult(
            session=self.session, run=msg.run, trial=msg.trial, trial_type=msg.trial_type,
            estimate_kind=msg.estimate_kind, estimate_version=msg.estimate_version, stim_file=msg.stim_file,
            topk_ids=ids, topk_scores=tuple(float(s) for s in result.scores[0]), topk_labels=labels,
            topk_images=images, reconstruction_path=image_path, thumbnail_png=thumb,
            acquisition_time=msg.acquisition_time, received_at=received_at, retrieval_done_at=done,
            stage_ms={k: float(v) for k, v in result.timings_ms.items()} | {"decode_wait": (started - received_at) * 1e3},
            policy=self.policy, policy_decision="retrieval_only" if image_path is None else "reconstructed",
            backlog=self.queue.backlog)

    def _save_png(self, msg: TrialBetas, image: np.ndarray, kind: str) -> tuple[str, np.ndarray]:
        from PIL import Image

        self.recon_dir.mkdir(parents=True, exist_ok=True)
        path = self.recon_dir / f"run-{msg.run:02d}_trial-{msg.trial:03d}_{msg.estimate_kind}_{kind}.png"
        picture = Image.fromarray(image)
        picture.save(path)
        buffer = io.BytesIO()
        picture.resize((THUMBNAIL_PX, THUMBNAIL_PX)).save(buffer, format="PNG")
        return str(path), np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()
