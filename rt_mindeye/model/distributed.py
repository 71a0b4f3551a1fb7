"""Training on several processes with torch.distributed: DDP for the tiny and light models, FSDP2 for the full one.

A run with W processes computes what one process computes with the same global batch, not an approximation of it:

- **Data.** Every rank draws the same permutation of every subject (the generator is seeded by seed and epoch) and
  builds the same per-subject batch of ``TrainConfig.batch_size`` trials. MixCo is drawn and applied to that whole
  subject batch on every rank, so a trial's mixing partner may sit on another rank. Then each subject's batch is cut
  into W equal shards and rank r runs shard r of every subject: every ridge head sees data on every rank, and the
  global batch is the single-process one.
- **Random draws inside the model** (backbone dropout, the prior's timesteps, noise and condition dropout) are made
  for the whole global batch from the global RNG, which every rank keeps in step (same seed, same draws), and each
  rank keeps its own rows (:class:`GlobalBatchDraws`). A trial therefore gets the numbers the single process gives
  it; without this each rank would draw its own noise and a 2-process run would be a different run.
- **Losses.** The backbone outputs are all-gathered (differentiably) back into the single-process order, and the
  contrastive, low-level and auxiliary losses are computed on the whole batch, identically on every rank (MindEye2
  computes its contrastive loss per GPU, so its negatives shrink as GPUs are added; here they do not). The
  all-gather's backward sums the W identical gradients of each rank's outputs and DDP/FSDP average over W, which
  is the single-process gradient. The prior's MSE, a per-trial mean, is taken on the rank's own shard: the average
  of W equal-sized shard means is the global mean.
- **Normalisation.** The model has LayerNorm and GroupNorm only, whose statistics are per trial, so nothing else
  crosses ranks; a BatchNorm would need synchronised statistics and is refused.
- **Checkpoints** are written by rank 0 only, in the published container layout, with the same model and optimizer
  state layout as a single-process run (FSDP gathers the full state first), so a run can be resumed with another
  number of processes. The RNG state all ranks share is stored, so resume is exact.
- **Time budget:** the measured step time is the maximum over ranks (``all_reduce(MAX)``).

What remains different is floating-point summation order (gradients summed per shard, then across ranks; matrix
products over smaller batches), which is why the equivalence is stated with a tolerance (docs/distributed.md).

Launch: :func:`launch_local` starts N workers on this machine with torch's elastic launcher (what
``torchrun --standalone`` runs); under ``torchrun`` (one node or several), :func:`init_worker` joins its group.
"""

from __future__ import annotations

import gc
import os
import uuid
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from rt_mindeye.errors import RtMindEyeError
from rt_mindeye.model.backbone import BackboneOutput
from rt_mindeye.model.config import MindEyeConfig
from rt_mindeye.model.mindeye import MindEyeModule, build_model
from rt_mindeye.model.train import (SubjectData, TrainConfig, Trainer, TrainResult, autocast_dtype, resolve_device,
                                    training_forward)

STRATEGIES = ("auto", "ddp", "fsdp")
# "auto" shards (FSDP) from this many parameters: the full model (2.2 B for one subject, 2.6 B for seven) is sharded,
# light (0.8 B) and tiny are replicated (DDP): their fp32 weights, gradients and AdamW state fit one GPU.
FSDP_MIN_PARAMETERS = 1_000_000_000
DEFAULT_TIMEOUT_S = 1800.0  # every collective (including the wait while rank 0 prepares data) ends by then
LAUNCH_ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(RtMindEyeError):
    """A distributed run cannot be set up as asked; ``setting`` names the flag, variable or key at fault."""

    def __init__(self, setting: str, problem: str):
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")


@dataclass(frozen=True)
class World:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# -- launching -------------------------------------------------------------------------------------------------------


def launched() -> bool:
    """True inside a worker started by torchrun or :func:`launch_local` (the launcher sets these variables)."""
    return all(name in os.environ for name in LAUNCH_ENVIRONMENT)


def launch_local(entrypoint: Callable[..., Any], args: Sequence[Any], nproc: int) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` in ``nproc`` worker processes on this machine and return {rank: return value}.

    This is torch's elastic launcher with the rendezvous ``torchrun --standalone`` uses (c10d on a free local port),
    workers started with ``spawn``. ``entrypoint`` must be a module-level function (it is pickled by name).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise DistributedError("--nproc", f"must be at least 1, got {nproc}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"rt-mindeye-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        return elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        lines = (message or "").strip().splitlines()
        reason = lines[-1] if lines else f"exit code {failure.exitcode}"
        raise DistributedError("--nproc", f"worker {rank} failed (its traceback is above): {reason}") from exc


def init_worker(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group the launcher described in the environment: NCCL with one GPU per local rank, or gloo
    on CPUs. ``device`` is the training setting ('auto', 'cpu', 'cuda'); a GPU index is the launcher's to choose."""
    if not launched():
        raise DistributedError("RANK", "this process was not started by torchrun or --nproc (no RANK, WORLD_SIZE "
                                       "and LOCAL_RANK in the environment)")
    rank, world_size, local_rank = (int(os.environ[name]) for name in LAUNCH_ENVIRONMENT)
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type
    if kind == "cuda":
        if torch.device(device).index is not None and world_size > 1:
            raise DistributedError("device", f"{device!r} names one GPU; with several processes each takes "
                                             "cuda:LOCAL_RANK, so give 'cuda' or 'auto'")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError("LOCAL_RANK", f"local rank {local_rank} but only {torch.cuda.device_count()} "
                                                 "GPU(s) are visible; start at most one process per GPU")
        torch.cuda.set_device(local_rank)
        target, backend = torch.device("cuda", local_rank), "nccl"
    else:
        target, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            # As torchrun does: workers sharing a machine's cores must not each start a thread per core.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def close_worker() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- the global batch, cut into shards -------------------------------------------------------------------------------


def shard_layout(subject_sizes: Sequence[int], world_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where this rank's rows sit in the global batch, and how to put gathered rows back in order.

    The global batch is subject-major (subject 0's ``subject_sizes[0]`` trials, then subject 1's, ...); rank r takes
    the r-th equal slice of every subject. Returns ``rows`` (global index of each local row, local order) and
    ``order`` (for each global row, its position in the rank-major concatenation of all ranks' local rows).
    """
    shards = []
    for subject, size in enumerate(subject_sizes):
        if size % world_size:
            raise DistributedError("train.batch_size", f"subject {subject}'s {size} trials per step cannot be split "
                                                       f"evenly over {world_size} processes; choose a batch size "
                                                       f"divisible by {world_size}")
        shards.append(size // world_size)
    local = sum(shards)
    rows, order, start, local_start = [], [], 0, 0
    for size, shard in zip(subject_sizes, shards):
        rows.append(torch.arange(start + rank * shard, start + (rank + 1) * shard))
        for position in range(size):
            owner, within = divmod(position, shard)
            order.append(owner * local + local_start + within)
        start += size
        local_start += shard
    return torch.cat(rows), torch.tensor(order, dtype=torch.long)


# Random functions the model does not use: under sharding they would give each rank its own numbers, so a training
# forward that calls one is stopped rather than silently turned into a different run.
_UNSHARDABLE_DRAWS = {
    torch.bernoulli, torch.normal, torch.poisson, torch.multinomial, torch.randperm, torch.dropout,
    torch.Tensor.bernoulli_, torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_,
    torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu, F.gumbel_softmax,
}


class GlobalBatchDraws(TorchFunctionMode):
    """Inside one rank's forward: each random draw over the batch is made for the whole global batch and the rank
    keeps its own rows.

    All ranks seed the global RNG alike and make the same draws, so they stay in step, and a trial gets the same
    numbers whichever rank runs it. Handled: ``torch.rand``/``randn``/``randint`` and their ``_like`` forms, and
    ``F.dropout`` (drawn as CPU ``dropout`` draws: ``bernoulli_(1 - p)`` over the input's shape, scaled by
    1 / (1 - p)). A draw whose first dimension is not the local batch, or another random function, raises
    :class:`DistributedError`. Draws with an explicit ``generator`` belong to their caller and pass through.
    """

    def __init__(self, rows: torch.Tensor, global_batch: int):
        super().__init__()
        self.rows = rows
        self.local_batch = int(rows.numel())
        self.global_batch = int(global_batch)
        self._rows_on: dict[torch.device, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        if func in (torch.rand, torch.randn, torch.randint) and "size" in kwargs:
            kwargs["size"] = self._global_size(func, kwargs["size"])
            return self._local(func(*args, **kwargs))
        if func in (torch.rand, torch.randn):
            size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
            return self._local(func(self._global_size(func, size), **kwargs))
        if func is torch.randint:  # (high, size) or (low, high, size)
            return self._local(func(*args[:-1], self._global_size(func, args[-1]), **kwargs))
        if func in (torch.rand_like, torch.randn_like, torch.randint_like):
            like, rest = args[0], args[1:]
            factory = {torch.rand_like: torch.rand, torch.randn_like: torch.randn,
                       torch.randint_like: torch.randint}[func]
            kwargs.pop("memory_format", None)
            kwargs.setdefault("dtype", like.dtype)
            kwargs.setdefault("device", like.device)
            return self._local(factory(*rest, self._global_size(func, like.shape), **kwargs))
        if func is F.dropout:
            return self._dropout(*args, **kwargs)
        if func is F.scaled_dot_product_attention and float(kwargs.get("dropout_p", args[4] if len(args) > 4
                                                                           else 0.0)) > 0:
            raise DistributedError("model", "attention dropout cannot be drawn per global batch; set it to 0")
        if func in _UNSHARDABLE_DRAWS:
            raise DistributedError("model", f"{getattr(func, '__qualname__', func)} draws random numbers that "
                                            "cannot be drawn per global batch under several processes")
        return func(*args, **kwargs)

    def _global_size(self, func, size) -> tuple[int, ...]:
        size = tuple(int(s) for s in size)
        if not size or size[0] != self.local_batch:
            raise DistributedError("model", f"{getattr(func, '__name__', func)} draws shape {size}, whose first "
                                            f"dimension is not the local batch ({self.local_batch}); only per-trial "
                                            "draws can be made for the global batch")
        return (self.global_batch,) + size[1:]

    def _local(self, drawn: torch.Tensor) -> torch.Tensor:
        rows = self._rows_on.get(drawn.device)
        if rows is None:
            rows = self._rows_on[drawn.device] = self.rows.to(drawn.device)
        return drawn[rows]

    def _dropout(self, input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
        if not training or p == 0 or input.numel() == 0:
            return input
        if p >= 1:
            return input.mul_(0) if inplace else input * 0
        noise = torch.empty(self._global_size(F.dropout, input.shape), dtype=input.dtype, device=input.device)
        noise = self._local(noise.bernoulli_(1 - p)).div_(1 - p)
        return input.mul_(noise) if inplace else input * noise


# -- the model's part of a step as one module ------------------------------------------------------------------------


class TrainingStep(nn.Module):
    """:func:`~rt_mindeye.model.train.training_forward` as one module call: the unit DDP wraps and the FSDP root.

    Returns a flat tuple (tokens, clip_voxels, blurry_latent, blurry_aux, prior_loss) so that the wrappers see every
    output tensor.
    """

    def __init__(self, model: MindEyeModule):
        super().__init__()
        self.model = model

    def forward(self, subject_voxels: list[torch.Tensor], image_tokens: torch.Tensor, with_prior: bool):
        out, prior_loss = training_forward(self.model, subject_voxels, image_tokens, with_prior)
        return out.tokens, out.clip_voxels, out.blurry_latent, out.blurry_aux, prior_loss


def fsdp_units(model: MindEyeModule) -> list[nn.Module]:
    """The modules FSDP shards as units, largest first in mind: each ridge head, each residual block,
    ``backbone_linear`` (1.75 B parameters in the full model), the projector, the low-level decoder and its
    auxiliary head, and each prior feed-forward. The prior's attention layers stay in the root unit because they
    share one rotary module (a parameter may belong to one unit only)."""
    units: list[nn.Module] = list(model.ridge.linears)
    backbone = model.backbone
    units += list(backbone.mixer_blocks1) + [backbone.backbone_linear, backbone.clip_proj]
    if model.config.blurry_recon:
        units += [backbone.bupsampler, backbone.b_maps_projector]
    if model.config.use_prior:
        units += [feed_forward for _, feed_forward in model.diffusion_prior.net.causal_transformer.layers]
    return units


def choose_strategy(strategy: str, model: MindEyeModule) -> str:
    if strategy not in STRATEGIES:
        raise DistributedError("strategy", f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy != "auto":
        return strategy
    return "fsdp" if model.parameter_counts()["total"] >= FSDP_MIN_PARAMETERS else "ddp"


# -- the trainer -----------------------------------------------------------------------------------------------------


class DistributedTrainer(Trainer):
    """:class:`~rt_mindeye.model.train.Trainer` on every rank of a process group (see the module docstring).

    Call :meth:`fit` on every rank with the same data and settings. Only rank 0 shows progress, logs and writes the
    checkpoint; every rank returns the same :class:`~rt_mindeye.model.train.TrainResult` (losses averaged over ranks).
    """

    def __init__(self, model: MindEyeModule, config: TrainConfig, world: World,
                 checkpoint_path: str | Path | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, strategy: str = "auto"):
        super().__init__(model, config, checkpoint_path, progress=progress and world.is_main,
                         log=log if world.is_main else None)
        self.world = world
        self.strategy = choose_strategy(strategy, model)
        batch_norms = [name for name, module in model.named_modules()
                       if isinstance(module, nn.modules.batchnorm._BatchNorm)]
        if batch_norms:
            raise DistributedError("model", f"BatchNorm layers ({', '.join(batch_norms)}) would need statistics "
                                            "synchronised across ranks; this trainer supports per-trial norms only")
        self._step = TrainingStep(model)
        self._ddp: nn.Module | None = None
        self._ddp_trainable: tuple[bool, ...] | None = None
        self._gather_group = None
        self._layouts: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._sharded = False

    def fit(self, datasets, validation=None, validation_subject: int = 0, resume_from=None):
        device = resolve_device(self.config.device)
        if device.type != self.world.device.type:
            raise DistributedError("train.device", f"{self.config.device!r} resolves to {device.type} but this "
                                                   f"process group runs on {self.world.device.type}")
        for data in datasets:  # fail before any work if a subject's batch cannot be cut evenly
            shard_layout([min(self.config.batch_size, len(data))], self.world.world_size, 0)
        if self._gather_group is None:
            # The outputs' all-gather (and its backward) runs on its own group, apart from DDP/FSDP's collectives.
            self._gather_group = dist.new_group()
        if self.strategy == "fsdp" and not self._sharded:
            self._shard(device, autocast_dtype(self.config.mixed_precision, device))
        return super().fit(datasets, validation, validation_subject, resume_from)

    # -- seams of Trainer ------------------------------------------------------------------------------------------

    def _forward(self, subject_voxels, image_tokens, with_prior):
        sizes = tuple(int(v.shape[0]) for v in subject_voxels)
        if sizes not in self._layouts:
            self._layouts[sizes] = shard_layout(sizes, self.world.world_size, self.world.rank)
        rows, order = self._layouts[sizes]
        r = self.world.rank
        local_voxels = [v[r * (n // self.world.world_size):(r + 1) * (n // self.world.world_size)]
                        for v, n in zip(subject_voxels, sizes)]
        local_tokens = image_tokens[rows.to(image_tokens.device)]
        with GlobalBatchDraws(rows, sum(sizes)):
            tokens, clip_voxels, blurry, aux, prior_loss = self._module()(local_voxels, local_tokens, with_prior)
        order = order.to(clip_voxels.device)
        out = BackboneOutput(tokens=self._gather(tokens, order), clip_voxels=self._gather(clip_voxels, order),
                             blurry_latent=self._gather(blurry, order), blurry_aux=self._gather(aux, order))
        return out, prior_loss

    def _logged(self, loss, parts):
        names = sorted(parts)
        values = torch.tensor([loss.item(), *(parts[n] for n in names)], dtype=torch.float64,
                              device=self.world.device)
        dist.all_reduce(values)
        values = (values / self.world.world_size).tolist()
        return values[0], dict(zip(names, values[1:]))

    def _load_states(self, resume_state, optimizer):
        if self.strategy != "fsdp":
            return super()._load_states(resume_state, optimizer)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, resume_state["model_state_dict"], options=options)
        named = _named_optimizer_state(resume_state["optimizer_state_dict"], optimizer, self.model)
        set_optimizer_state_dict(self.model, optimizer, optim_state_dict=named, options=options)

    def save(self, path, epoch, total_epochs, steps_per_epoch, optimizer, scheduler, losses, lrs, device,
             model=None, optimizer_state=None):
        if self.strategy == "fsdp":
            model, optimizer_state = self._full_states(optimizer)  # collective: every rank takes part
        if self.world.is_main:
            return super().save(path, epoch, total_epochs, steps_per_epoch, optimizer, scheduler, losses, lrs,
                                device, model=model, optimizer_state=optimizer_state)
        return Path(path)

    def _replanned_epochs(self, done: int, epochs: int, elapsed_s: float) -> int:
        return epochs  # every rank must run the same steps: the plan agreed on at the start stands

    def measure_step_seconds(self, datasets, device, amp_dtype) -> float:
        """The slowest rank's step time: the run goes at its pace."""
        local = torch.tensor([super().measure_step_seconds(datasets, device, amp_dtype)], dtype=torch.float64,
                             device=self.world.device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        return float(local.item())

    @torch.no_grad()
    def evaluate_top1(self, data, subject, device=None) -> float:
        """On every rank, the whole validation set (the same number everywhere). Under FSDP the root unit's
        parameters are gathered around it (the other units gather their own as they run)."""
        if self.strategy != "fsdp":
            return super().evaluate_top1(data, subject, device)
        self._step.unshard()
        try:
            return super().evaluate_top1(data, subject, device)
        finally:
            self._step.reshard()

    # -- placement -------------------------------------------------------------------------------------------------

    def _module(self) -> nn.Module:
        """FSDP: the sharded step. DDP: a wrapper over the parameters that train now, rebuilt when that set changes
        (head-only epochs), because DDP registers its gradient hooks for the trainable parameters once."""
        if self.strategy == "fsdp":
            return self._step
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if self._ddp is None or trainable != self._ddp_trainable:
            from torch.nn.parallel import DistributedDataParallel

            self._ddp = None
            gc.collect()  # the old wrapper's reducer, and its gradient hooks, must be gone before the new one hooks in
            device_ids = [self.world.device.index] if self.world.device.type == "cuda" else None
            # static_graph: the parameters a step uses are the same every step of a phase, including those no loss
            # reaches (e.g. the low-level head with blur_scale 0), which DDP then need not wait for.
            self._ddp = DistributedDataParallel(self._step, device_ids=device_ids, forward_sync_buffers=False,
                                                static_graph=True)
            self._ddp_trainable = trainable
        return self._ddp

    def _gather(self, local: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor | None:
        if local is None:
            return None
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            # Deprecated in favour of a private functional collective; this public one has the autograd we need
            # (backward: the gradients of a rank's rows summed over all ranks).
            warnings.simplefilter("ignore", FutureWarning)
            pieces = all_gather(local.contiguous(), group=self._gather_group)
        return torch.cat(pieces)[order]

    def _shard(self, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # FSDP2 warns when a unit returns a view (a Linear over 3-D input does), because an in-place op on it would
        # skip the pre-backward all-gather; the model applies no in-place op to a unit's output (the FSDP
        # equivalence test would fail if it did).
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
                                category=UserWarning)
        mesh = init_device_mesh(device.type, (self.world.world_size,))
        # Compute in the autocast dtype, reduce gradients and keep the master weights in fp32.
        policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32 if amp_dtype else None)
        for unit in fsdp_units(self.model):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(self._step, mesh=mesh, mp_policy=policy)
        self._sharded = True

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights, full and on the CPU (collective under FSDP: call it on every rank)."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name: value.detach().cpu().clone() for name, value in self.model.state_dict().items()}

    def _full_states(self, optimizer) -> tuple[MindEyeModule | None, dict | None]:
        """The full model and optimizer state gathered to rank 0's CPU memory (None elsewhere)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)
        named = get_optimizer_state_dict(self.model, optimizer, options=options)
        if not self.world.is_main:
            return None, None
        full = build_model(self.model.config, "meta")
        full.load_state_dict(model_state, assign=True)
        return full, _indexed_optimizer_state(named, optimizer, self.model)


# -- programmatic runs -----------------------------------------------------------------------------------------------


@dataclass
class TrainingJob:
    """One training run for :func:`run_jobs`: pretraining from a seeded initialisation, or, with ``finetune_from``,
    a new subject on a pretrained checkpoint (``datasets`` then holds that one subject)."""

    datasets: list[SubjectData]
    config: TrainConfig
    model_config: MindEyeConfig | None = None  # pretraining: the architecture (initialised with ``config.seed``)
    finetune_from: Path | None = None
    checkpoint_path: Path | None = None
    resume_from: Path | None = None
    strategy: str = "auto"
    validation: SubjectData | None = None  # held-out trials of ridge head 0, scored after every epoch


@dataclass
class JobResult:
    result: TrainResult
    state_dict: dict[str, torch.Tensor] | None  # the trained weights, full and on the CPU (rank 0 only)


def run_jobs(jobs: Sequence[TrainingJob], nproc: int) -> dict[int, list[JobResult]]:
    """Run ``jobs`` one after the other in ``nproc`` processes on this machine (one launch, one process group).

    Returns every rank's results ({rank: [one per job]}); rank 0's carry the trained weights."""
    return launch_local(_jobs_worker, (list(jobs),), nproc)


def build_job_model(job: TrainingJob) -> MindEyeModule:
    """The model a job starts from, identical on every rank (seeded init or the seeded new ridge head)."""
    if job.finetune_from is not None:
        from rt_mindeye.convert.mindeye2 import load_mindeye2

        if job.config.adapter_rank or job.config.head_init != "random":  # rt_mindeye.model.adapt is one-process
            raise DistributedError("train.adapter_rank", "low-rank adapters and a closed-form head fine-tune in one "
                                                         "process: run without --nproc")
        data = job.datasets[0]
        return load_mindeye2(job.finetune_from, new_subject_voxels=data.voxels.shape[1],
                             new_subject_name=data.name or None, dtype=torch.float32, seed=job.config.seed).model
    if job.model_config is None:
        raise DistributedError("model_config", "a pretraining job needs the model's configuration")
    torch.manual_seed(job.config.seed)
    return MindEyeModule(job.model_config)


def _jobs_worker(jobs: list[TrainingJob]) -> list[JobResult]:
    world = init_worker(jobs[0].config.device if jobs else "auto")
    try:
        results = []
        for job in jobs:
            trainer = DistributedTrainer(build_job_model(job), job.config, world, job.checkpoint_path,
                                         progress=False, strategy=job.strategy)
            result = trainer.fit(job.datasets, validation=job.validation, resume_from=job.resume_from)
            state = trainer.full_state_dict()  # collective under FSDP
            results.append(JobResult(result=result, state_dict=state if world.is_main else None))
        return results
    finally:
        close_worker()


def _parameter_names(optimizer, model: nn.Module) -> list[str]:
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _indexed_optimizer_state(named: dict, optimizer, model: nn.Module) -> dict:
    """A full optimizer state keyed by parameter name -> ``optimizer.state_dict()``'s layout (keyed by position), the
    one a single-process run saves."""
    index = {name: i for i, name in enumerate(_parameter_names(optimizer, model))}
    return {"state": {index[name]: value for name, value in named["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in named["param_groups"]]}


def _named_optimizer_state(indexed: dict, optimizer, model: nn.Module) -> dict:
    """Inverse of :func:`_indexed_optimizer_state`."""
    names = _parameter_names(optimizer, model)
    return {"state": {names[int(i)]: value for i, value in indexed["state"].items()},
            "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                             for group in indexed["param_groups"]]}
