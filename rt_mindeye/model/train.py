"""Pretraining across subjects and in-session fine-tuning of a new subject (MindEye2's recipe).

Per step, every subject contributes ``batch_size`` trials through its own ridge head; the shared backbone and prior
see the concatenated batch. Loss = ``prior_scale`` x prior MSE + ``clip_scale`` x contrastive (BiMixCo for the first
``mixup_pct`` of the epochs, then SoftCLIP) + ``blur_scale`` x (L1 on the low-level target + ``blur_cont_scale`` x the
auxiliary soft contrastive loss), when the model has a low-level head. AdamW (weight decay 1e-2 except biases; the
ridge "penalty" is this decay) with a OneCycle schedule whose warm-up lasts about two epochs; mixed precision on a GPU
only (bf16 where supported, else fp16 with loss scaling).

Determinism: the global torch RNG is seeded once (dropout, prior timesteps/noise/condition dropout draw from it), data
order and MixCo draw from generators seeded by (seed, epoch), and a checkpoint stores the global RNG state, so a
resumed run continues bit-for-bit like an uninterrupted one (on the same device and thread count).

Checkpoints use MindEyeV2's container layout (``model_state_dict``, ``optimizer_state_dict``, ``lr_scheduler``, ...)
plus the model config and the trainer's state, all readable with ``weights_only=True``.

In-session budget: :meth:`Trainer.fit` with ``TrainConfig.time_budget_min`` first times a few forward/backward steps
(without updating the weights) and plans the number of epochs to fit the budget.

Several processes (DDP / FSDP): :class:`rt_mindeye.model.distributed.DistributedTrainer` overrides the seams
``_forward``, ``_logged``, ``_load_states`` and ``save``; the loss itself is written once, here.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from rt_mindeye.config import from_mapping, setting, to_mapping
from rt_mindeye.errors import CheckpointError, ConfigError
from rt_mindeye.model.losses import (flat_normalized, mixco, mixco_nce, soft_clip_loss, soft_clip_temperature,
                                     soft_cont_loss, top1_accuracy)
from rt_mindeye.model.mindeye import MindEyeModule

TRAIN_STATE_KEY = "rt_mindeye_train"
PROBE_STEPS = 3  # forward/backward steps timed to plan a time budget (the first one is a warm-up)
BUDGET_SAFETY = 0.85  # fraction of the budget planned for training (the rest: evaluation, checkpoints, noise)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (MindEye2's defaults)."""

    epochs: int = setting(150, "epochs (the maximum when a time budget is set)", min=1)
    batch_size: int = setting(24, "trials per subject per step", min=2)
    max_lr: float = setting(3e-4, "peak learning rate of the OneCycle schedule", min=0.0)
    weight_decay: float = setting(1e-2, "AdamW weight decay (the ridge penalty); biases are not decayed", min=0.0)
    shared_lr_scale: float = setting(1.0, "learning-rate factor of the shared parts (backbone, prior) relative to the "
                                          "ridge heads; MindEye2 uses 1", min=0.0, max=1.0)
    head_only_pct: float = setting(0.0, "fraction of the epochs, from the start, in which only the ridge heads train "
                                        "(backbone and prior frozen; 'linear probe, then fine-tune'). Used for a new "
                                        "subject, whose fresh head would otherwise send noise into the pretrained "
                                        "parts; 0 = MindEye2's fine-tune of everything from the start",
                                   min=0.0, max=1.0)
    head_init: str = setting("random", "fine-tuning only: how the new subject's ridge head starts: 'random', or "
                                       "'closed_form' (ridge regression onto hidden vectors found by inverting the "
                                       "frozen pretrained backbone for each training image; rt_mindeye.model.adapt)",
                             choices=("random", "closed_form"))
    adapter_rank: int = setting(0, "fine-tuning only: 0 trains the shared parts themselves; r > 0 freezes them and "
                                   "trains rank-r low-rank adapters on the backbone's linear layers instead "
                                   "(rt_mindeye.model.adapt; merged into the weights at the end)", min=0)
    warmup_epochs: float = setting(2.0, "OneCycle warm-up length in epochs (capped at half the run)", min=0.0)
    mixup_pct: float = setting(0.33, "fraction of epochs trained with BiMixCo before SoftCLIP", min=0.0, max=1.0)
    mixco_beta: float = setting(0.15, "Beta(a, a) parameter of the MixCo weights", min=1e-3)
    mixco_prob: float = setting(0.5, "probability that a trial is mixed in a BiMixCo batch", min=0.0, max=1.0)
    mixco_temp: float = setting(0.006, "BiMixCo temperature", min=1e-5)
    soft_temp_start: float = setting(0.004, "SoftCLIP temperature at the first SoftCLIP epoch", min=1e-5)
    soft_temp_end: float = setting(0.0075, "SoftCLIP temperature at the last epoch", min=1e-5)
    clip_scale: float = setting(1.0, "weight of the contrastive loss", min=0.0)
    prior_scale: float = setting(30.0, "weight of the diffusion prior's MSE", min=0.0)
    blur_scale: float = setting(0.5, "weight of the low-level losses (when the head exists)", min=0.0)
    blur_cont_scale: float = setting(0.1, "weight of the auxiliary contrastive term inside the low-level loss", min=0.0)
    aux_temp: float = setting(0.2, "temperature of the auxiliary soft contrastive loss", min=1e-5)
    seed: int = setting(42, "seed of every random draw in training")
    mixed_precision: str = setting("auto", "autocast dtype on a GPU (never on CPU)",
                                   choices=("auto", "no", "bf16", "fp16"))
    device: str = setting("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")
    time_budget_min: float = setting(0.0, "plan epochs to finish within this many minutes (0: run `epochs`)",
                                     min=0.0)
    checkpoint_every: int = setting(1, "save a checkpoint every N epochs (and at the end)", min=1)

    @classmethod
    def from_dict(cls, data, source: str | None = None) -> "TrainConfig":
        return from_mapping(cls, data, source=source, prefix="train")

    def to_dict(self) -> dict:
        return to_mapping(self)


@dataclass
class SubjectData:
    """One subject's training trials: betas and the targets derived from the seen images."""

    voxels: torch.Tensor  # (n, n_voxels) float: z-scored single-trial betas
    image_tokens: torch.Tensor  # (n, seq, dim): the image embedder's tokens of the seen images
    blurry_targets: torch.Tensor | None = None  # (n, c, s, s): low-level targets (VAE latents or small images)
    aux_targets: torch.Tensor | None = None  # (n, grid^2, aux_dim): features for the auxiliary head
    name: str = ""
    aux_aug_targets: torch.Tensor | None = None  # (n, views, grid^2, aux_dim): teacher on augmented images

    def __post_init__(self):
        n = self.voxels.shape[0]
        for label, value in (("image_tokens", self.image_tokens), ("blurry_targets", self.blurry_targets),
                             ("aux_targets", self.aux_targets), ("aux_aug_targets", self.aux_aug_targets)):
            if value is not None and value.shape[0] != n:
                raise ValueError(f"subject {self.name or '?'}: {label} has {value.shape[0]} rows for {n} trials")

    def __len__(self) -> int:
        return self.voxels.shape[0]


@dataclass
class EpochLog:
    epoch: int
    loss: float
    clip_loss: float
    prior_loss: float
    blur_loss: float
    train_top1: float
    lr: float
    seconds: float
    val_top1: float | None = None


@dataclass
class TrainResult:
    epochs: int
    steps_per_epoch: int
    step_seconds: float | None  # measured per-step time when a budget was planned
    history: list[EpochLog] = field(default_factory=list)
    checkpoint: Path | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(setting_value: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on a GPU only: bf16 where the GPU supports it, fp16 otherwise."""
    if device.type != "cuda" or setting_value == "no":
        return None
    if setting_value == "fp16":
        return torch.float16
    if setting_value == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def parameter_groups(model: MindEyeModule, weight_decay: float, shared_lr_scale: float = 1.0) -> list[dict]:
    """MindEye2's groups: ridge heads all decayed; elsewhere biases are not. ``lr_scale`` marks the shared parts."""
    ridge, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("ridge."):
            ridge.append(param)
        elif "bias" not in name:
            decay.append(param)
        else:
            no_decay.append(param)
    return [{"params": ridge, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": decay, "weight_decay": weight_decay, "lr_scale": shared_lr_scale},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": shared_lr_scale}]


def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int, warmup_fraction: float):
    """OneCycle (final lr = max_lr / 25 / 1000) as MindEye2 uses it; a constant rate for runs of under 4 steps.

    The warm-up fraction is kept within (2 steps, half the run) so that very short runs still have a valid schedule.
    """
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    if total_steps < 4:
        for group, scale in zip(optimizer.param_groups, scales):
            group["lr"] = max_lr * scale
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    pct = min(max(warmup_fraction, 2.0 / total_steps), 0.5)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[max_lr * s for s in scales],
                                               total_steps=total_steps, final_div_factor=1000, pct_start=pct)


def split_global_batch(global_batch: int, n_subjects: int, minimum: int = 4) -> int:
    """Per-subject batch when one global batch is split across the pretraining subjects, as MindEye2 splits its 42
    over 7 subjects (6 each); it also keeps the auxiliary loss's (batch x tokens)^2 similarities small on a CPU."""
    return max(minimum, int(global_batch) // max(1, int(n_subjects)))


def training_forward(model: MindEyeModule, subject_voxels: Sequence[torch.Tensor], image_tokens: torch.Tensor,
                     with_prior: bool):
    """Ridge head i on ``subject_voxels[i]``, the backbone on the concatenated batch, and the prior's loss against
    ``image_tokens`` (None without it). Returns (BackboneOutput, prior loss)."""
    hidden = [model.ridge(voxels, subject) for subject, voxels in enumerate(subject_voxels)]
    out = model.backbone(torch.cat(hidden, dim=0))
    prior_loss = model.diffusion_prior(out.tokens, image_tokens)[0] if with_prior else None
    return out, prior_loss


def plan_epochs(budget_s: float, step_s: float, steps_per_epoch: int, max_epochs: int) -> int:
    """Whole epochs that fit ``BUDGET_SAFETY`` of the budget at the measured step time (at least 1)."""
    per_epoch = max(step_s * steps_per_epoch, 1e-9)
    return int(max(1, min(max_epochs, math.floor(budget_s * BUDGET_SAFETY / per_epoch))))


class Trainer:
    """Trains a :class:`MindEyeModule` on one or more subjects (ridge head i <-> ``datasets[i]``)."""

    def __init__(self, model: MindEyeModule, config: TrainConfig, checkpoint_path: str | Path | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None):
        self.model = model
        self.config = config
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.progress = progress
        self.log = log or (lambda message: None)

    # -- the loop --------------------------------------------------------------------------------------------------

    def fit(self, datasets: Sequence[SubjectData], validation: SubjectData | None = None,
            validation_subject: int = 0, resume_from: str | Path | None = None) -> TrainResult:
        cfg = self.config
        self._check_data(datasets)
        device = resolve_device(cfg.device)
        self.model.to(device)
        amp_dtype = autocast_dtype(cfg.mixed_precision, device)
        steps_per_epoch = min(max(1, len(d) // cfg.batch_size) for d in datasets)
        torch.manual_seed(cfg.seed)

        step_s = None
        epochs = cfg.epochs
        resume_state = self._read_resume(resume_from) if resume_from else None
        if resume_state is not None:
            epochs = int(resume_state["total_epochs"])
        elif cfg.time_budget_min > 0:
            step_s = self.measure_step_seconds(datasets, device, amp_dtype)
            epochs = plan_epochs(cfg.time_budget_min * 60, step_s, steps_per_epoch, cfg.epochs)
            self.log(f"measured {step_s * 1000:.0f} ms/step: {epochs} epochs of {steps_per_epoch} steps fit "
                     f"{cfg.time_budget_min:g} min")

        optimizer = torch.optim.AdamW(parameter_groups(self.model, cfg.weight_decay, cfg.shared_lr_scale),
                                      lr=cfg.max_lr)
        total_steps = epochs * steps_per_epoch
        scheduler = one_cycle(optimizer, cfg.max_lr, total_steps, cfg.warmup_epochs / epochs)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

        result = TrainResult(epochs=epochs, steps_per_epoch=steps_per_epoch, step_seconds=step_s)
        start_epoch, losses, lrs = 0, [], []
        if resume_state is not None:
            self._load_states(resume_state, optimizer)
            scheduler.load_state_dict(resume_state["lr_scheduler"])
            torch.set_rng_state(resume_state["torch_rng"])
            if device.type == "cuda" and resume_state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(resume_state["cuda_rng"], device)
            start_epoch = int(resume_state["epoch"])
            losses, lrs = list(resume_state["train_losses"]), list(resume_state["lrs"])

        mix_epochs, head_only_epochs = self._phase_epochs(epochs)
        self._trainable = {name: p.requires_grad for name, p in self.model.named_parameters()}
        fit_began = time.perf_counter()
        with _progress(self.progress, epochs, start_epoch) as (bar, task):
            epoch = start_epoch
            while epoch < epochs:
                if step_s is not None and epoch > start_epoch:
                    shorter = self._replanned_epochs(epoch, epochs, time.perf_counter() - fit_began)
                    if shorter < epochs:
                        # The probe steps under-estimated the real epochs (a loaded machine, checkpoints,
                        # evaluation): shorten the run so that it still ends within the budget, and give the
                        # schedule its new length (the one-cycle schedule then still ends at its low rate).
                        self.log(f"epochs take {(time.perf_counter() - fit_began) / (epoch - start_epoch):.1f} s "
                                 f"each, more than planned: {shorter} epochs instead of {epochs} to stay within "
                                 f"{cfg.time_budget_min:g} min")
                        epochs = shorter
                        result.epochs = epochs
                        scheduler = one_cycle(optimizer, cfg.max_lr, epochs * steps_per_epoch,
                                              cfg.warmup_epochs / epochs)
                        with warnings.catch_warnings():  # fast-forwarding the new schedule, no update skipped
                            warnings.simplefilter("ignore", UserWarning)
                            for _ in range(epoch * steps_per_epoch):
                                scheduler.step()
                        if bar is not None:
                            bar.update(task, total=epochs)
                        mix_epochs, head_only_epochs = self._phase_epochs(epochs)
                began = time.perf_counter()
                self._freeze_shared(epoch < head_only_epochs)
                sums = self._train_epoch(datasets, epoch, epochs, mix_epochs, steps_per_epoch, optimizer, scheduler,
                                         scaler, device, amp_dtype, losses, lrs)
                entry = EpochLog(epoch=epoch, lr=lrs[-1], seconds=time.perf_counter() - began,
                                 **{k: v / steps_per_epoch for k, v in sums.items()})
                if validation is not None:
                    entry.val_top1 = self.evaluate_top1(validation, validation_subject, device)
                result.history.append(entry)
                done = epoch + 1
                if self.checkpoint_path and (done % cfg.checkpoint_every == 0 or done == epochs):
                    result.checkpoint = self.save(self.checkpoint_path, done, epochs, steps_per_epoch, optimizer,
                                                  scheduler, losses, lrs, device)
                if bar is not None:
                    desc = f"loss {entry.loss:.3f} top1 {entry.train_top1:.2f}"
                    if entry.val_top1 is not None:
                        desc += f" val {entry.val_top1:.2f}"
                    bar.update(task, advance=1, description=desc)
                epoch += 1
        self._freeze_shared(False)
        return result

    def _phase_epochs(self, epochs: int) -> tuple[int, int]:
        """(BiMixCo epochs, head-only epochs) of a run of ``epochs``."""
        return int(self.config.mixup_pct * epochs), int(round(self.config.head_only_pct * epochs))

    def _replanned_epochs(self, done: int, epochs: int, elapsed_s: float) -> int:
        """The run's length after ``done`` epochs took ``elapsed_s``: unchanged while the budget holds, otherwise the
        epochs that fit what is left of it at the measured pace (never fewer than ``done + 1``, never more than
        planned). A distributed trainer keeps its plan (every rank must run the same number of steps)."""
        per_epoch = elapsed_s / max(done, 1)
        budget = self.config.time_budget_min * 60 * BUDGET_SAFETY
        if elapsed_s + (epochs - done) * per_epoch <= budget * 1.05:
            return epochs
        return int(min(epochs, max(done + 1, done + math.floor((budget - elapsed_s) / per_epoch))))

    def _freeze_shared(self, frozen: bool) -> None:
        """Stop (or restart) gradients into everything but the ridge heads. AdamW skips parameters without a
        gradient, so frozen parts are neither stepped nor decayed, and the optimizer state needs no rebuilding.
        Parameters the caller had frozen before training stay frozen."""
        for name, param in self.model.named_parameters():
            if not name.startswith("ridge."):
                param.requires_grad_(self._trainable.get(name, True) and not frozen)

    def _train_epoch(self, datasets, epoch, epochs, mix_epochs, steps_per_epoch, optimizer, scheduler, scaler,
                     device, amp_dtype, losses, lrs) -> dict[str, float]:
        cfg = self.config
        self.model.train()
        data_gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        orders = [torch.randperm(len(d), generator=data_gen) for d in datasets]
        use_mixco = epoch < mix_epochs
        temp = soft_clip_temperature(epoch - mix_epochs, epochs - mix_epochs, cfg.soft_temp_start,
                                     cfg.soft_temp_end)
        sums = dict(loss=0.0, clip_loss=0.0, prior_loss=0.0, blur_loss=0.0, train_top1=0.0)
        for step in range(steps_per_epoch):
            batches = [self._batch(d, order, step) for d, order in zip(datasets, orders)]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, parts = self._loss(batches, device, use_mixco, temp, data_gen)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            value, parts = self._logged(loss, parts)
            losses.append(value)
            lrs.append(optimizer.param_groups[0]["lr"])
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"loss became {losses[-1]} at epoch {epoch} step {step}")
            sums["loss"] += losses[-1]
            for k, v in parts.items():
                sums[k] += v
        return sums

    def _batch(self, data: SubjectData, order: torch.Tensor, step: int) -> dict[str, torch.Tensor | None]:
        size = min(self.config.batch_size, len(data))
        index = order[step * size:(step + 1) * size]
        return {
            "voxels": data.voxels[index],
            "image_tokens": data.image_tokens[index],
            "blurry": data.blurry_targets[index] if data.blurry_targets is not None else None,
            "aux": data.aux_targets[index] if data.aux_targets is not None else None,
            "aux_aug": data.aux_aug_targets[index] if data.aux_aug_targets is not None else None,
        }

    def _loss(self, batches, device, use_mixco: bool, temp: float, generator: torch.Generator):
        cfg, model = self.config, self.model
        subject_voxels, perms, betas_all, offset = [], [], [], 0
        for batch in batches:
            voxels = batch["voxels"].to(device, torch.float32)
            if use_mixco:
                voxels, perm, betas, _ = mixco(voxels, generator, cfg.mixco_beta, cfg.mixco_prob)
                perms.append(perm + offset)
                betas_all.append(betas)
            subject_voxels.append(voxels)
            offset += voxels.shape[0]
        if use_mixco:
            perm, betas = torch.cat(perms), torch.cat(betas_all)
        targets = torch.cat([b["image_tokens"] for b in batches]).to(device, torch.float32)
        out, prior_loss = self._forward(subject_voxels, targets, model.config.use_prior and cfg.prior_scale > 0)
        loss = torch.zeros((), device=device)
        parts = dict(clip_loss=0.0, prior_loss=0.0, blur_loss=0.0)

        preds_n, targets_n = flat_normalized(out.clip_voxels), flat_normalized(targets)
        if cfg.clip_scale > 0:
            if use_mixco:
                clip_loss = mixco_nce(preds_n, targets_n, cfg.mixco_temp, perm, betas)
            else:
                clip_loss = soft_clip_loss(preds_n, targets_n, temp)
            loss = loss + cfg.clip_scale * clip_loss
            parts["clip_loss"] = clip_loss.item()
        if prior_loss is not None:
            loss = loss + cfg.prior_scale * prior_loss
            parts["prior_loss"] = prior_loss.item()
        if model.config.blurry_recon and cfg.blur_scale > 0 and batches[0]["blurry"] is not None:
            # L1 against the unmixed target even in BiMixCo epochs: MindEye2 computes its L1 before (and never
            # uses) the mixed latent.
            blurry = torch.cat([b["blurry"] for b in batches]).to(device, torch.float32)
            blur_loss = F.l1_loss(out.blurry_latent.float(), blurry)
            if batches[0]["aux"] is not None and cfg.blur_cont_scale > 0:
                aux = torch.cat([b["aux"] for b in batches]).to(device, torch.float32)
                student = F.normalize(out.blurry_aux.float().reshape(-1, out.blurry_aux.shape[-1]), dim=-1)
                teacher = F.normalize(aux.reshape(-1, aux.shape[-1]), dim=-1)
                teacher_aug = teacher  # no augmented views prepared: the teacher against itself
                if batches[0]["aux_aug"] is not None:  # one augmented view per trial, drawn per step
                    views = torch.cat([b["aux_aug"] for b in batches])
                    pick = torch.randint(views.shape[1], (views.shape[0],), generator=generator)
                    aug = views[torch.arange(views.shape[0]), pick].to(device, torch.float32)
                    teacher_aug = F.normalize(aug.reshape(-1, aug.shape[-1]), dim=-1)
                blur_loss = blur_loss + cfg.blur_cont_scale * soft_cont_loss(student, teacher, teacher_aug,
                                                                             cfg.aux_temp)
            loss = loss + cfg.blur_scale * blur_loss
            parts["blur_loss"] = blur_loss.item()
        with torch.no_grad():
            parts["train_top1"] = top1_accuracy(out.clip_voxels, targets)
        return loss, parts

    # -- seams for other placements (rt_mindeye.model.distributed overrides these) --------------------------------

    def _forward(self, subject_voxels: list[torch.Tensor], image_tokens: torch.Tensor, with_prior: bool):
        """The model's part of a step: returns (backbone outputs of the whole batch, prior loss or None)."""
        return training_forward(self.model, subject_voxels, image_tokens, with_prior)

    def _logged(self, loss: torch.Tensor, parts: dict[str, float]) -> tuple[float, dict[str, float]]:
        """The step's loss and parts as logged (a distributed trainer averages them over ranks)."""
        return loss.item(), parts

    def _load_states(self, resume_state: dict, optimizer: torch.optim.Optimizer) -> None:
        self.model.load_state_dict(resume_state["model_state_dict"])
        optimizer.load_state_dict(resume_state["optimizer_state_dict"])

    # -- budget ----------------------------------------------------------------------------------------------------

    def measure_step_seconds(self, datasets, device, amp_dtype) -> float:
        """Median time of forward+backward+update-sized work, without changing weights or the RNG stream."""
        rng = torch.get_rng_state()
        self.model.train()
        gen = torch.Generator().manual_seed(0)
        times = []
        for step in range(PROBE_STEPS):
            batches = [self._batch(d, torch.arange(len(d)), 0) for d in datasets]
            began = time.perf_counter()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _ = self._loss(batches, device, True, self.config.soft_temp_start, gen)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - began)
            self.model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        timed = sorted(times[1:]) if len(times) > 1 else times
        # The optimiser update (AdamW) is about one more pass over the parameters: add 10 % for it.
        return timed[len(timed) // 2] * 1.1

    # -- evaluation ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_top1(self, data: SubjectData, subject: int, device: torch.device | None = None) -> float:
        device = device or next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out = self.model(data.voxels.to(device, torch.float32), subject)
        self.model.train(was_training)
        return top1_accuracy(out.clip_voxels, data.image_tokens.to(device))

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def save(self, path: Path, epoch: int, total_epochs: int, steps_per_epoch: int, optimizer, scheduler,
             losses, lrs, device, model: MindEyeModule | None = None, optimizer_state: dict | None = None) -> Path:
        """Write the resumable checkpoint; ``model`` / ``optimizer_state`` replace this trainer's own (a sharded
        trainer passes the gathered full ones)."""
        from rt_mindeye.convert.mindeye2 import save_container

        state = {
            "config": self.config.to_dict(),
            "total_epochs": total_epochs,
            "steps_per_epoch": steps_per_epoch,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
        model = self.model if model is None else model
        return save_container(path, model, epoch=epoch, optimizer_state=optimizer_state,
                              lr_scheduler_state=scheduler.state_dict(), train_losses=losses, lrs=lrs,
                              extra={TRAIN_STATE_KEY: state})

    def _read_resume(self, path: str | Path) -> dict:
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as exc:
            raise CheckpointError(path, f"cannot read the checkpoint to resume from: {exc}") from exc
        state = payload.get(TRAIN_STATE_KEY)
        if not isinstance(state, dict):
            raise CheckpointError(path, f"not a resumable rt-mindeye training checkpoint (no {TRAIN_STATE_KEY})")
        saved = TrainConfig.from_dict(state["config"], source=str(path))
        if _resume_relevant(saved) != _resume_relevant(self.config):
            raise ConfigError(path, "train", "the training settings differ from those the checkpoint was made with")
        return {**payload, **state}

    def _check_data(self, datasets: Sequence[SubjectData]) -> None:
        cfg = self.model.config
        if len(datasets) != cfg.n_subjects:
            raise ValueError(f"{len(datasets)} datasets for a model with {cfg.n_subjects} ridge heads")
        for i, d in enumerate(datasets):
            if d.voxels.shape[1] != cfg.subject_voxels[i]:
                raise ValueError(f"dataset {i} ({d.name}) has {d.voxels.shape[1]} voxels; ridge head {i} expects "
                                 f"{cfg.subject_voxels[i]}")
            if tuple(d.image_tokens.shape[1:]) != (cfg.token_seq, cfg.token_dim):
                raise ValueError(f"dataset {i} ({d.name}) has image tokens {tuple(d.image_tokens.shape[1:])}; the "
                                 f"model expects {(cfg.token_seq, cfg.token_dim)}")


def _resume_relevant(config: TrainConfig) -> TrainConfig:
    """The settings that must match to resume (device, precision, budget and checkpoint interval may change)."""
    return dataclasses.replace(config, device="auto", mixed_precision="auto", time_budget_min=0.0,
                               checkpoint_every=1)


class _progress:
    """A rich progress bar over epochs, or nothing."""

    def __init__(self, enabled: bool, epochs: int, start: int):
        self.enabled, self.epochs, self.start = enabled, epochs, start
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None, None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.description}"), TimeRemainingColumn())
        self.bar.__enter__()
        task = self.bar.add_task("", total=self.epochs, completed=self.start)
        return self.bar, task

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


# -- entry points ----------------------------------------------------------------------------------------------------


def pretrain(model: MindEyeModule, datasets: Sequence[SubjectData], config: TrainConfig,
             checkpoint_path: str | Path | None = None, validation: SubjectData | None = None,
             resume_from: str | Path | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> TrainResult:
    """Train the shared model on several subjects (ridge head i <-> ``datasets[i]``)."""
    return Trainer(model, config, checkpoint_path, progress, log).fit(datasets, validation, 0, resume_from)


def finetune(checkpoint: str | Path, data: SubjectData, config: TrainConfig,
             checkpoint_path: str | Path | None = None, validation: SubjectData | None = None,
             resume_from: str | Path | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> tuple[MindEyeModule, TrainResult]:
    """Fine-tune a pretrained checkpoint on a new subject: fresh ridge head, everything else trained (or, with
    ``config.adapter_rank``, low-rank adapters in place of the shared parts, merged into the weights at the end)."""
    from rt_mindeye.convert.mindeye2 import load_mindeye2

    loaded = load_mindeye2(checkpoint, new_subject_voxels=data.voxels.shape[1], new_subject_name=data.name or None,
                           dtype=torch.float32, seed=config.seed)
    if config.head_init == "closed_form" and resume_from is None:
        from rt_mindeye.model.adapt import init_head_closed_form

        alpha = init_head_closed_form(loaded.model, data.voxels, data.image_tokens, seed=config.seed)
        if log is not None:
            log(f"new head started in closed form (ridge penalty {alpha:g} x mean squared singular value)")
    if not config.adapter_rank:
        result = Trainer(loaded.model, config, checkpoint_path, progress, log).fit([data], validation, 0, resume_from)
        return loaded.model, result
    from rt_mindeye.convert.mindeye2 import save_container
    from rt_mindeye.model.adapt import add_adapters, merge_adapters

    if resume_from is not None:
        raise ConfigError(resume_from, "train.adapter_rank", "an adapter fine-tune cannot resume (it is short)")
    handle = add_adapters(loaded.model, config.adapter_rank)
    result = Trainer(loaded.model, config, None, progress, log).fit([data], validation, 0)
    merge_adapters(loaded.model, handle)
    if checkpoint_path is not None:
        result.checkpoint = save_container(checkpoint_path, loaded.model, epoch=result.epochs)
    return loaded.model, result
