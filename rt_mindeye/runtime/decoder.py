"""The decoder side: trial estimates in, retrieval and reconstructions out.

:class:`TrialDecoder` holds no sockets: it turns one :class:`~rt_mindeye.transport.messages.TrialBetas` into its
retrieval :class:`~rt_mindeye.transport.messages.DecodeResult` at once and, when a reconstructor is configured, hands
the estimate to a :class:`~rt_mindeye.transport.policy.ReconstructionQueue`; :class:`ReconstructionWorker` is the one
thread that takes trials from that queue and reconstructs them, each ending as a :class:`ReconOutcome`
(``reconstructed``, ``skipped`` by the policy, ``superseded`` by a newer estimate of the same trial, or ``failed``).
The decoder service (:func:`rt_mindeye.runtime.decoder_service.run_decoder`) wraps both with the reliable receiver, the
result publisher and the results record.

The model is the calibration bundle's fine-tuned MindEye2; retrieval searches the bundle's candidate image
embeddings; the blurry image comes from the model's low-level head (when it has one); unCLIP reconstruction runs
from the diffusion prior's sampled tokens when ``decoder.unclip_checkpoint`` names MindEye2's SDXL-unCLIP checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.decode.config import DecodeConfig, ReconstructConfig
from rt_mindeye.decode.decoder import Decoder, trial_seed
from rt_mindeye.decode.retrieval import Retriever
from rt_mindeye.errors import CheckpointError, RtMindEyeError
from rt_mindeye.transport.messages import DecodeResult, TrialBetas
from rt_mindeye.transport.policy import QUEUED, SKIPPED, ReconstructionQueue

log = logging.getLogger("rt_mindeye.decoder")

THUMBNAIL_PX = 96
RECONSTRUCTED = "reconstructed"
SUPERSEDED = "superseded"
FAILED = "failed"
RETRIEVAL_ONLY = "retrieval_only"
CONFIG_KEY = "decoder.unclip_checkpoint"


class UnclipCheckpointError(CheckpointError):
    """``decoder.unclip_checkpoint`` is missing, unreadable, not an unCLIP checkpoint or does not fit the model."""

    def __init__(self, path: str | Path | None, problem: str):
        super().__init__(path, f"{CONFIG_KEY}: {problem}")


# --- the unCLIP checkpoint --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnclipCheckpointInfo:
    path: Path
    cross_attention_dim: int
    n_keys: int


def inspect_unclip_checkpoint(path: str | Path) -> UnclipCheckpointInfo:
    """Read the checkpoint's keys (memory-mapped: cheap even for the 10 GB file) and its cross-attention width.

    Raises :class:`UnclipCheckpointError` naming the file when it is missing, unreadable or not a generative-models
    unCLIP checkpoint.
    """
    from rt_mindeye.convert.unclip import LDM_UNET_PREFIX, UNCLIP_PROBE_KEYS, is_unclip_checkpoint, read_checkpoint

    path = Path(path)
    try:
        state_dict = read_checkpoint(path)
    except CheckpointError as exc:
        raise UnclipCheckpointError(path, exc.problem) from exc
    if not is_unclip_checkpoint(state_dict):
        missing = [key for key in UNCLIP_PROBE_KEYS if key not in state_dict]
        raise UnclipCheckpointError(path, f"not a generative-models unCLIP checkpoint (probe keys {missing} absent)")
    widths = {int(v.shape[1]) for k, v in state_dict.items()
              if k.startswith(LDM_UNET_PREFIX) and k.endswith(".attn2.to_k.weight") and v.ndim == 2}
    if len(widths) != 1:
        raise UnclipCheckpointError(path, f"expected one cross-attention width in the UNet, found {sorted(widths)}")
    return UnclipCheckpointInfo(path, widths.pop(), len(state_dict))


def check_unclip_fits(info: UnclipCheckpointInfo, token_dim: int, use_prior: bool) -> None:
    """The UNet attends to the diffusion prior's tokens: the model needs a prior and the widths must agree."""
    if not use_prior:
        raise UnclipCheckpointError(info.path, "the bundle's model has no diffusion prior, whose sampled tokens "
                                               "condition the reconstruction (set it to null, or calibrate a model "
                                               "with use_prior)")
    if info.cross_attention_dim != token_dim:
        raise UnclipCheckpointError(info.path, f"the UNet's cross-attention width {info.cross_attention_dim} does "
                                               f"not match the bundle model's token width {token_dim}")


def load_reconstructor(path: str | Path, config: ReconstructConfig, *, token_dim: int | None = None,
                       use_prior: bool = True):
    """An :class:`~rt_mindeye.decode.reconstruct.UnclipReconstructor` from MindEye2's unCLIP checkpoint.

    The weights are converted from the generative-models layout (:mod:`rt_mindeye.convert.unclip`, with MindEye2's
    head width, Fourier width and group count) straight into the UNet's and the VAE's precision on their device, so
    the 10 GB checkpoint is never held in float32 on a GPU host. Every failure raises :class:`UnclipCheckpointError`
    naming the file.
    """
    import torch

    from rt_mindeye.convert.unclip import load_unclip_components
    from rt_mindeye.decode.reconstruct import UnclipReconstructor, resolve_device, resolve_dtype

    info = inspect_unclip_checkpoint(path)
    if token_dim is not None:
        check_unclip_fits(info, token_dim, use_prior)
    device = resolve_device(config.device)
    unet_dtype = resolve_dtype(config.unet_dtype, device, gpu_default=torch.float16)
    vae_dtype = resolve_dtype(config.vae_dtype, device, gpu_default=torch.bfloat16)
    started = time.perf_counter()
    try:
        # Built on the meta device and filled tensor by tensor in the final dtype, on the final device.
        unet, vae, dropped = load_unclip_components(info.path, sample_size=max(config.image_size // 8, 1),
                                                    dtype=unet_dtype, vae_dtype=vae_dtype, device=device)
    except CheckpointError as exc:
        raise UnclipCheckpointError(info.path, exc.problem) from exc
    reconstructor = UnclipReconstructor(unet, vae, config=config)
    log.info("unCLIP reconstructor from %s on %s (%d keys dropped on purpose) in %.1f s", info.path,
             reconstructor.device, len(dropped), time.perf_counter() - started)
    return reconstructor


def warm_up_reconstructor(reconstructor, token_seq: int) -> float:
    """One 1-step reconstruction of zero tokens at the real shapes, so CUDA initialisation, kernel selection and any
    compilation (``compile: torch / tensorrt``) happen at start-up, not on the first live trial. Returns seconds."""
    started = time.perf_counter()
    dim = int(reconstructor.unet.config.cross_attention_dim)
    reconstructor.reconstruct(np.zeros((1, int(token_seq), dim), dtype=np.float32), steps=1)
    return time.perf_counter() - started


# --- the model and the Decoder ----------------------------------------------------------------------------------------


class BundleModel:
    """The bundle's fine-tuned model as the :class:`Decoder`'s ``model_forward`` callable.

    With ``sample_prior`` the diffusion prior samples image tokens from the backbone tokens (MindEye2's unCLIP
    condition); :meth:`with_prior` gives such a view of the same loaded model for the reconstruction worker, so
    retrieval never waits for the prior.

    A bundle fine-tuned as an ensemble (``calibration.ensemble_members``) loads every member: retrieval gets the
    mean of their normalised ``clip_voxels``, the blurry image the mean of their low-level outputs, and the prior
    samples from the first member's backbone tokens (each member's prior is conditioned on its own backbone, so
    their tokens are not averaged).
    """

    def __init__(self, bundle: CalibrationBundle, device: str = "cpu", sample_prior: bool = False,
                 prior_steps: int | None = None):
        import torch

        from rt_mindeye.convert.mindeye2 import load_for_inference

        self.torch = torch
        self.members = [load_for_inference(path, device=device).model for path in bundle.model_checkpoints()]
        self.model = self.members[0]
        self.device = device
        self.sample_prior = sample_prior
        self.prior_steps = prior_steps
        self.n_voxels = int(self.model.config.subject_voxels[0])

    def with_prior(self) -> "BundleModel":
        view = object.__new__(BundleModel)
        view.__dict__.update(self.__dict__)
        view.sample_prior = True
        return view

    def __call__(self, betas, seed: int | None = None):
        from rt_mindeye.model.ensemble import average_normalised

        torch = self.torch
        with torch.no_grad(), self.model.autocast():  # float16 weights on a GPU: autocast, float32 inputs
            voxels = torch.as_tensor(np.asarray(betas, dtype=np.float32), device=self.device)
            outs = [member(voxels, 0) for member in self.members]
            out = outs[0]
            prior = None
            if self.sample_prior and self.model.config.use_prior:
                # A per-trial CPU generator: reproducible, and the global random state is never touched.
                generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
                prior = self.model.diffusion_prior.sample(out.tokens, steps=self.prior_steps, generator=generator)
            clip = average_normalised([o.clip_voxels for o in outs])
            blurry = out.blurry_latent
            if blurry is not None and len(outs) > 1:
                blurry = torch.stack([o.blurry_latent for o in outs]).mean(0)
        return clip, prior, blurry


class PixelBlurryDecoder:
    """Low-level head output that is already an image (RGB in [-1, 1], the tiny/phantom models) -> [0, 1]."""

    def __init__(self, size: int = 224):
        self.size = size

    def decode(self, latent):
        import torch
        import torch.nn.functional as F

        images = (torch.as_tensor(latent).float().clamp(-1, 1) + 1) / 2
        return F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)


def blurry_decoder_for(model_config, config: DecodeConfig, device: str = "cpu", blurry_vae: Path | None = None):
    """What turns the model's low-level output into the blurry image: the tiny models' RGB output is an image
    already; the full model's 4-channel SD-VAE latent is decoded with ``blurry_vae`` (a diffusers ``AutoencoderKL``
    state dict, MindEye2's ``sd_image_var_autoenc.pth``), as MindEye2 does: ``vae.decode(z / 0.18215) / 2 + 0.5``.
    None when the model has no low-level head, or a latent head and no VAE (logged)."""
    if not model_config.blurry_recon:
        return None
    if model_config.blurry_out_channels == 3:
        return PixelBlurryDecoder()
    if blurry_vae is None:
        log.warning("the model's low-level head gives %d-channel latents but decoder.blurry_vae is not set: no "
                    "blurry images", model_config.blurry_out_channels)
        return None
    from rt_mindeye.convert.unclip import load_diffusers_vae
    from rt_mindeye.decode.reconstruct import BlurryDecoder, resolve_device, resolve_dtype

    import torch

    target = resolve_device(device)
    vae = load_diffusers_vae(blurry_vae, device=target,
                             dtype=resolve_dtype("auto", target, gpu_default=torch.bfloat16))
    return BlurryDecoder(vae, scaling_factor=config.reconstruction.blurry_scaling_factor, device=str(target))


def build_decoder(bundle: CalibrationBundle, config: DecodeConfig, device: str = "cpu",
                  reconstructor=None, blurry_vae: Path | None = None) -> tuple[Decoder, list[str]]:
    """A :class:`Decoder` over the bundle's model and candidates; returns it with the candidate file names.

    With a ``reconstructor`` the model samples the diffusion prior on every call (retrieval and reconstruction in one
    call); the decoder service instead keeps retrieval prior-free and adds :func:`reconstruction_decoder`.
    """
    model = BundleModel(bundle, device=device, sample_prior=reconstructor is not None,
                        prior_steps=config.prior_steps)
    candidates = bundle.candidates()
    files = [str(f) for f in candidates["files"]]
    retriever = Retriever(candidates["tokens"], ids=files, device=device)
    blurry = blurry_decoder_for(model.model.config, config, device, blurry_vae)
    return Decoder(config, model, retriever, reconstructor=reconstructor, blurry_decoder=blurry), files


def reconstruction_decoder(decoder: Decoder, reconstructor) -> Decoder:
    """A :class:`Decoder` sharing ``decoder``'s model, candidates and blurry decoder, sampling the prior and
    reconstructing with ``reconstructor`` (the reconstruction worker's)."""
    model = decoder.model_forward.with_prior() if isinstance(decoder.model_forward, BundleModel) \
        else decoder.model_forward
    return Decoder(decoder.config, model, decoder.retriever, reconstructor=reconstructor,
                   blurry_decoder=decoder.blurry_decoder)


# --- estimates -> results ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconOutcome:
    """How one estimate's reconstruction ended.

    ``decision``: ``reconstructed`` (``message`` carries the PNG path and thumbnail), ``skipped`` (dropped by the
    policy; ``message`` tells the console), ``superseded`` (a newer estimate of the same trial took its place in the
    queue: recorded only, the console already shows the newer one) or ``failed`` (``reason`` says why).
    """

    estimate: TrialBetas
    decision: str
    message: DecodeResult | None
    reason: str = ""


@dataclass(frozen=True)
class Retrieval:
    """:meth:`TrialDecoder.retrieve`'s answer: the estimate's result and what became of earlier waiting estimates."""

    result: DecodeResult
    outcomes: tuple[ReconOutcome, ...] = ()


@dataclass
class _Waiting:
    estimate: TrialBetas
    result: DecodeResult
    queued_at: float
    reconstruction: Decoder | None = None
    """The reconstruction decoder of the bundle that decoded it (a reload between runs does not change it)."""


class TrialDecoder:
    """TrialBetas -> DecodeResult messages, with PNGs written under ``recon_dir``.

    Every estimate gets retrieval at once (:meth:`retrieve`). With a ``reconstruction`` decoder (one holding an
    :class:`~rt_mindeye.decode.reconstruct.UnclipReconstructor`) the estimate's trial is also offered to the
    :class:`ReconstructionQueue` (policy ``newest``, ``skip`` or ``fifo``, at most ``max_pending`` waiting), and
    :meth:`reconstruct_next`, called by the one :class:`ReconstructionWorker`, reconstructs what the policy picks, so a
    slow reconstructor never delays retrieval. The queue holds trials: a newer estimate of a trial that is still
    waiting takes the older one's place (which is ``superseded``) instead of queueing the trial twice.
    """

    def __init__(self, decoder: Decoder, *, session: str, recon_dir: Path | None, policy: str = "newest",
                 max_pending: int = 2, stimuli_dir: Path | None = None, reconstruction: Decoder | None = None,
                 averager: "RepeatAverager | None" = None):
        self.decoder = decoder
        self.session = session
        self.recon_dir = recon_dir
        self.queue: ReconstructionQueue = ReconstructionQueue(policy=policy, max_pending=max_pending)
        self.policy = policy
        self.stimuli_dir = stimuli_dir
        self.reconstruction = reconstruction
        self.averager = averager
        self._waiting: dict[tuple[int, int], _Waiting] = {}
        self._work = threading.Condition()
        self._reconstructing = 0

    @property
    def reconstructs(self) -> bool:
        r = self.reconstruction
        return r is not None and r.reconstructor is not None and r.config.reconstruct

    @property
    def backlog(self) -> int:
        return self.queue.backlog

    @property
    def busy(self) -> bool:
        """A reconstruction is waiting or in progress."""
        with self._work:
            return bool(self._waiting) or self._reconstructing > 0

    def retrieve(self, msg: TrialBetas, received_at: float) -> Retrieval:
        started = time.time()
        result = self.decoder.decode(msg.betas)
        done = time.time()
        ids = tuple(int(i) for i in result.topk_indices[0])
        labels = tuple(result.topk_ids[0])
        images = tuple(str(self.stimuli_dir / name) for name in labels) if self.stimuli_dir else ()
        image_path, thumb = None, None
        if result.blurry is not None and self.recon_dir is not None:
            image_path, thumb = self._save_png(msg, result.blurry[0], "blurry")
        message = DecodeResult(
            session=self.session, run=msg.run, trial=msg.trial, trial_type=msg.trial_type,
            estimate_kind=msg.estimate_kind, estimate_version=msg.estimate_version, stim_file=msg.stim_file,
            topk_ids=ids, topk_scores=tuple(float(s) for s in result.scores[0]), topk_labels=labels,
            topk_images=images, reconstruction_path=image_path, thumbnail_png=thumb,
            acquisition_time=msg.acquisition_time, received_at=received_at, retrieval_done_at=done,
            stage_ms={k: float(v) for k, v in result.timings_ms.items()} | {"decode_wait": (started - received_at) * 1e3},
            policy=self.policy, policy_decision=RETRIEVAL_ONLY if image_path is None else RECONSTRUCTED,
            backlog=self.queue.backlog)
        if not self.reconstructs:
            return Retrieval(message)
        return self._offer(msg, message)

    def use(self, decoder: Decoder, reconstruction: Decoder | None) -> None:
        """Decode from now on with another bundle's decoders (a reload between runs); estimates already waiting for
        their reconstruction keep the decoder of the bundle that made them."""
        with self._work:
            self.decoder = decoder
            if reconstruction is not None or self.reconstruction is None:
                self.reconstruction = reconstruction

    def set_policy(self, policy: str, max_pending: int) -> list[ReconOutcome]:
        """A new reconstruction policy (a reload between runs): the waiting trials are offered to the new queue in
        their order; those it does not keep are returned as ``skipped``."""
        new_queue = ReconstructionQueue(policy=policy, max_pending=max_pending)
        outcomes = []
        with self._work:
            pending = self.queue.pending()
            self.queue, self.policy = new_queue, policy
            for key in pending:
                for decision in new_queue.submit(key):
                    if decision.decision == SKIPPED:
                        gone = self._waiting.pop(decision.item)
                        outcomes.append(ReconOutcome(gone.estimate, SKIPPED, self._notice(gone.result, SKIPPED),
                                                     f"the reconstruction policy changed to {policy}"))
        return outcomes

    def average(self, msg: TrialBetas, received_at: float) -> DecodeResult | None:
        """The repeat-averaged result of ``msg``'s image (None without an averager, or at its first showing).

        Called after :meth:`retrieve` (the single-trial result goes out first): the average of the newest estimates
        of every trial that showed this image so far in the session, this one included, decoded like one trial.
        """
        if self.averager is None:
            return None
        repeats = self.averager.add(msg)
        if repeats is None:
            return None
        betas, trials = repeats
        started = time.time()
        result = self.decoder.decode(betas)
        done = time.time()
        labels = tuple(result.topk_ids[0])
        image_path, thumb = None, None
        if result.blurry is not None and self.recon_dir is not None:
            image_path, thumb = self._save_png(msg, result.blurry[0], f"avg{len(trials)}_blurry")
        return DecodeResult(
            session=self.session, run=msg.run, trial=msg.trial, trial_type=msg.trial_type,
            estimate_kind=msg.estimate_kind, estimate_version=msg.estimate_version, stim_file=msg.stim_file,
            topk_ids=tuple(int(i) for i in result.topk_indices[0]), topk_scores=tuple(float(s) for s in
                                                                                      result.scores[0]),
            topk_labels=labels, topk_images=tuple(str(self.stimuli_dir / n) for n in labels) if self.stimuli_dir
            else (), reconstruction_path=image_path, thumbnail_png=thumb, acquisition_time=msg.acquisition_time,
            received_at=received_at, retrieval_done_at=done,
            stage_ms={"averaged_total_ms": (done - started) * 1e3}, policy=self.policy,
            policy_decision=RETRIEVAL_ONLY, backlog=self.queue.backlog, averaged=True, n_repeats=len(trials),
            repeat_trials=trials)

    def _offer(self, msg: TrialBetas, message: DecodeResult) -> Retrieval:
        key = (msg.run, msg.trial)
        outcomes: list[ReconOutcome] = []
        with self._work:
            earlier = self._waiting.get(key)
            if earlier is not None:
                outcomes.append(ReconOutcome(earlier.estimate, SUPERSEDED, None,
                                             f"a newer estimate ({msg.estimate_kind} v{msg.estimate_version}) "
                                             "took its place in the queue"))
                decision = QUEUED
            else:
                decisions = self.queue.submit(key)
                decision = decisions[0].decision
                for evicted in decisions[1:]:  # 'newest' drops the oldest waiting trials
                    gone = self._waiting.pop(evicted.item)
                    outcomes.append(ReconOutcome(gone.estimate, SKIPPED, self._notice(gone.result, SKIPPED),
                                                 f"policy {self.policy}: more than {self.queue.max_pending} waiting"))
            message = replace(message, policy_decision=decision, backlog=self.queue.backlog)
            if decision == QUEUED:
                self._waiting[key] = _Waiting(msg, message, time.time(), self.reconstruction)
                self._work.notify_all()
        return Retrieval(message, tuple(outcomes))

    def _notice(self, result: DecodeResult, decision: str, *, reconstruction_path: str | None = None,
                thumbnail_png: np.ndarray | None = None, reconstruction_done_at: float | None = None,
                stage_ms: dict[str, float] | None = None) -> DecodeResult:
        """A follow-up result for the console. The retrieval result already carried the latencies up to retrieval
        and the retrieval stage times, so they are left out here (the console would count them twice)."""
        return replace(result, seq=0, created_at=time.time(), betas_sent_at=None, received_at=None,
                       retrieval_done_at=None, reconstruction_path=reconstruction_path, thumbnail_png=thumbnail_png,
                       reconstruction_done_at=reconstruction_done_at, stage_ms=stage_ms or {},
                       policy_decision=decision, backlog=self.queue.backlog)

    def wait_for_work(self, timeout_s: float) -> None:
        with self._work:
            if not self._waiting:
                self._work.wait(timeout_s)

    def wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def reconstruct_next(self) -> ReconOutcome | None:
        """Reconstruct the trial the policy picks now (None when nothing waits). Runs in the worker thread."""
        with self._work:
            key = self.queue.next()
            if key is None:
                return None
            waiting = self._waiting.pop(key)
            self._reconstructing += 1
        try:
            return self._reconstruct(waiting)
        finally:
            with self._work:
                self._reconstructing -= 1

    def _reconstruct(self, waiting: _Waiting) -> ReconOutcome:
        msg = waiting.estimate
        reconstruction = waiting.reconstruction or self.reconstruction
        started = time.time()
        # Prior and unCLIP draw from generators seeded by (seed, run, trial): a replay reproduces the images.
        seed = trial_seed(reconstruction.config.seed, msg.run, msg.trial)
        try:
            output = reconstruction.decode(msg.betas, seed=seed)
            path, thumb = self._save_png(msg, output.image[0], "recon")
        except (RtMindEyeError, RuntimeError, ValueError, OSError) as exc:
            log.exception("reconstruction of run %d trial %d (%s v%d) failed", msg.run, msg.trial,
                          msg.estimate_kind, msg.estimate_version)
            return ReconOutcome(msg, FAILED, self._notice(waiting.result, FAILED), f"{type(exc).__name__}: {exc}")
        done = time.time()
        stage_ms = {k: float(v) for k, v in output.timings_ms.items() if k.startswith("reconstruct")}
        stage_ms["recon_prior_model_ms"] = float(output.timings_ms.get("model_ms", 0.0))
        stage_ms["recon_wait"] = (started - waiting.queued_at) * 1e3
        message = self._notice(waiting.result, RECONSTRUCTED, reconstruction_path=path, thumbnail_png=thumb,
                               reconstruction_done_at=done, stage_ms=stage_ms)
        return ReconOutcome(msg, RECONSTRUCTED, message)

    def drop_waiting(self, reason: str) -> list[ReconOutcome]:
        """Everything still waiting, as ``skipped`` (the service is stopping)."""
        with self._work:
            outcomes = []
            while (key := self.queue.next()) is not None:
                gone = self._waiting.pop(key)
                outcomes.append(ReconOutcome(gone.estimate, SKIPPED, self._notice(gone.result, SKIPPED), reason))
            return outcomes

    def _save_png(self, msg: TrialBetas, image: np.ndarray, kind: str) -> tuple[str, np.ndarray]:
        from PIL import Image

        self.recon_dir.mkdir(parents=True, exist_ok=True)
        path = self.recon_dir / f"run-{msg.run:02d}_trial-{msg.trial:03d}_{msg.estimate_kind}_{kind}.png"
        picture = Image.fromarray(image)
        picture.save(path)
        buffer = io.BytesIO()
        picture.resize((THUMBNAIL_PX, THUMBNAIL_PX)).save(buffer, format="PNG")
        return str(path), np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()


# --- repeat averaging ------------------------------------------------------------------------------------------------


class RepeatAverager:
    """Each image's average over its trials' newest estimates so far in the session (decoder.average_repeats).

    Real-time MindEye averages a repeated image's betas across its showings so far; the average is less noisy than any
    single trial, so it decodes better as the session goes on. Trials are grouped by image (the estimate's
    ``stim_file``) and by the bundle that made the betas (``bundle_id``: two bundles' voxels are not comparable);
    each trial counts once, with its newest estimate. With ``journal_path`` every estimate is kept in an append-only
    journal (the :mod:`~rt_mindeye.transport.journal` format), so a restarted decoder averages over the whole
    session, not only what it saw since the restart.
    """

    def __init__(self, journal_path: Path | None = None):
        from rt_mindeye.transport.journal import Journal, read_journal

        self._groups: dict[tuple[str, str], dict[tuple[int, int], TrialBetas]] = {}
        self._journal = None
        if journal_path is not None:
            if Path(journal_path).exists():
                for msg in read_journal(journal_path):
                    if isinstance(msg, TrialBetas):
                        self._keep(msg)
            # Nothing here is ever sent: the acknowledged watermark follows the end, so no copy stays in memory.
            self._journal = Journal(journal_path, fsync=False)

    @staticmethod
    def image_of(msg: TrialBetas) -> str | None:
        return Path(msg.stim_file).name if msg.stim_file else None

    def _keep(self, msg: TrialBetas) -> dict[tuple[int, int], TrialBetas] | None:
        image = self.image_of(msg)
        if image is None:
            return None
        group = self._groups.setdefault((image, msg.bundle_id), {})
        earlier = group.get((msg.run, msg.trial))
        if earlier is None or msg.estimate_version >= earlier.estimate_version:
            group[(msg.run, msg.trial)] = msg
        return group

    def add(self, msg: TrialBetas) -> tuple[np.ndarray, tuple[tuple[int, int], ...]] | None:
        """Record ``msg``; the mean betas and the (run, trial) of its image's trials, or None below two trials."""
        group = self._keep(msg)
        if group is None:
            return None
        if self._journal is not None:
            from rt_mindeye.transport.messages import encode

            seq = self._journal.next_seq()
            self._journal.append(seq, encode(msg.with_seq(seq)))
            self._journal.mark_acked(seq)
        if len(group) < 2:
            return None
        trials = tuple(sorted(group))
        mean = np.mean(np.stack([np.asarray(group[key].betas, dtype=np.float32) for key in trials]), axis=0)
        return mean.astype(np.float32), trials

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()


# --- the worker -------------------------------------------------------------------------------------------------------


class ReconstructionWorker:
    """The one thread that reconstructs: takes trials from ``trial_decoder``'s queue and hands every
    :class:`ReconOutcome` to ``sink`` (the service records and publishes it).

    On a GPU it runs on its own CUDA stream, so the retrieval kernels of the service's main thread are not queued
    behind a reconstruction's. :meth:`stop` waits for the reconstruction in progress up to a deadline; a failure
    other than a failed reconstruction stops the worker and is kept in ``failure`` for the service to raise.
    """

    POLL_S = 0.1

    def __init__(self, trial_decoder: TrialDecoder, sink: Callable[[ReconOutcome], None]):
        self.trial_decoder = trial_decoder
        self.sink = sink
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtm-reconstruct", daemon=True)

    def start(self) -> "ReconstructionWorker":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float) -> bool:
        """Ask the worker to stop after the reconstruction in progress; True when it stopped within ``timeout_s``."""
        self._stop.set()
        self.trial_decoder.wake()
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _stream(self):
        reconstructor = self.trial_decoder.reconstruction.reconstructor
        device = getattr(reconstructor, "device", None)
        if device is not None and getattr(device, "type", "") == "cuda":
            import torch

            torch.cuda.synchronize(device)  # the weights were placed on the default stream
            return torch.cuda.stream(torch.cuda.Stream(device=device))
        return contextlib.nullcontext()

    def _run(self) -> None:
        try:
            with self._stream():
                while not self._stop.is_set():
                    outcome = self.trial_decoder.reconstruct_next()
                    if outcome is None:
                        self.trial_decoder.wait_for_work(self.POLL_S)
                        continue
                    self.sink(outcome)
        except BaseException as exc:  # kept for the service to raise: a dead worker must not go unnoticed
            log.exception("reconstruction worker stopped")
            self.failure = exc
