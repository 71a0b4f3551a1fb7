"""Benchmark of training on several processes: memory of a full-model fine-tune under FSDP, and CPU epoch wall time.

Run from the repository root::

    python bench/distributed.py               # both parts (the wall-time part takes a few minutes on 2 cores)
    python bench/distributed.py --memory      # the computed memory table only (seconds, no GPU, no weights)
    python bench/distributed.py --walltime --epochs 4

1. **Memory (computed, not measured: no GPU here).** Fine-tuning the full model (hidden 4096, low-level head, one
   new subject of 15,724 voxels: 2.23 B parameters) with FSDP2 (``fully_shard`` per unit, see
   ``rt_mindeye.model.distributed.fsdp_units``), bf16 compute, fp32 master weights, gradients and AdamW state, at
   1, 2, 4 and 8 GPUs and a global batch of 24 split across them (the trainer's design; a column gives 24 per GPU).
   Per GPU: the fp32 shards of weights, gradients and the two AdamW moments (16 bytes x parameters / GPUs); the
   root unit's bf16 weights, unsharded throughout; the largest unit in flight (``backbone_linear``, 1.75 B
   parameters: its bf16 weights and gradients and the fp32 buffer the gradients are reduce-scattered from, 8 bytes
   a parameter, sharding cannot split one unit); the activations autograd keeps for backward, counted by running the
   real forward (ridge, backbone, prior loss, contrastive loss) on the meta device in bf16 with saved-tensor hooks
   (no memory used). Not counted: the CUDA context, NCCL buffers and allocator fragmentation (typically 1-3 GiB).
2. **Wall time (measured, CPU).** ``rt-mindeye pretrain --phantom-subjects 2 3 --preset tiny`` in one process and
   with ``--nproc 2`` (gloo), same global batch, one torch thread per process; the median epoch time from each run's
   ``train_log.json`` (the first epoch, which includes DDP's set-up, reported apart) and the whole command's time.
   On a busy machine these timings say little; the table says whether the machine was loaded.

3. **Measured memory and step time (where GPUs are lent; not run in this work).** On a GPU node::

       torchrun --standalone --nproc-per-node 8 bench/distributed.py --measure --preset full
       torchrun --standalone --nproc-per-node 1 bench/distributed.py --measure --preset light --strategy ddp

   fine-tunes a randomly initialised model of that preset (one subject of 15,724 voxels, 256 x 1664 tokens) on
   random data at a global batch of 24 for two epochs of ``--steps`` steps with the real trainer, and reports per
   rank the peak GPU memory (``torch.cuda.max_memory_allocated``) and the second epoch's time per step. Every rank
   builds the model in host memory first (full: 9 GB of fp32 per rank). ``--preset tiny --nproc 2`` is a CPU smoke
   run of the same code (gloo; peak RSS instead of GPU memory).

Prints tables and writes ``bench/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rt_mindeye.model.config import MindEyeConfig  # noqa: E402
from rt_mindeye.model.distributed import fsdp_units  # noqa: E402
from rt_mindeye.model.losses import flat_normalized, soft_clip_loss  # noqa: E402
from rt_mindeye.model.mindeye import build_model  # noqa: E402
from rt_mindeye.model.train import training_forward  # noqa: E402

RESULTS = REPO / "bench" / "results"
GIB = 2 ** 30
NSD_SUBJ01_VOXELS = 15724
FINETUNE_BATCH = 24
GPU_COUNTS = (1, 2, 4, 8)
FP32_STATE_BYTES = 4 + 4 + 8  # master weight, gradient, AdamW exp_avg + exp_avg_sq (fp32 each)
UNIT_IN_FLIGHT_BYTES = 2 + 2 + 4  # bf16 unsharded weight and gradient, fp32 reduce-scatter input


def saved_activation_bytes(model, batch: int, voxels: int) -> int:
    """Bytes autograd keeps for backward in one training forward at ``batch`` (meta device, bf16 weights)."""
    saved: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if not (base.is_leaf and base.requires_grad):  # weights are counted apart
            saved[id(base)] = (base, base.numel() * base.element_size())  # keep a reference: ids stay unique
        return tensor

    config = model.config
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        betas = torch.randn(batch, voxels, device="meta", dtype=torch.bfloat16)
        tokens = torch.randn(batch, config.token_seq, config.token_dim, device="meta", dtype=torch.bfloat16)
        out, prior_loss = training_forward(model.train(), [betas], tokens, with_prior=True)
        soft_clip_loss(flat_normalized(out.clip_voxels), flat_normalized(tokens), 0.005) + prior_loss
    return sum(size for _, size in saved.values())


def memory_table() -> dict:
    config = MindEyeConfig.preset("full", [NSD_SUBJ01_VOXELS])
    model = build_model(config, "meta")
    parameters = sum(p.numel() for p in model.parameters())
    units = fsdp_units(model)
    in_units = {id(p) for unit in units for p in unit.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_units)
    largest = max(sum(p.numel() for p in unit.parameters()) for unit in units)
    model = model.to(torch.bfloat16)
    activations = {batch: saved_activation_bytes(model, batch, NSD_SUBJ01_VOXELS)
                   for batch in sorted({FINETUNE_BATCH // g for g in GPU_COUNTS} | {FINETUNE_BATCH})}
    rows = []
    for gpus in GPU_COUNTS:
        state = FP32_STATE_BYTES * parameters / gpus
        fixed = state + 2 * root + UNIT_IN_FLIGHT_BYTES * largest
        per_gpu_batch = FINETUNE_BATCH // gpus
        rows.append({
            "gpus": gpus,
            "per_gpu_batch": per_gpu_batch,
            "weights_fp32_gib": 4 * parameters / gpus / GIB,
            "grads_fp32_gib": 4 * parameters / gpus / GIB,
            "adamw_fp32_gib": 8 * parameters / gpus / GIB,
            "root_unit_bf16_gib": 2 * root / GIB,
            "largest_unit_in_flight_gib": UNIT_IN_FLIGHT_BYTES * largest / GIB,
            "activations_gib": activations[per_gpu_batch] / GIB,
            "total_gib": (fixed + activations[per_gpu_batch]) / GIB,
            "total_at_24_per_gpu_gib": (fixed + activations[FINETUNE_BATCH]) / GIB,
        })
    return {"computed": True, "model": "full, 1 new subject (15,724 voxels)", "parameters": parameters,
            "root_unit_parameters": root, "largest_unit_parameters": largest, "fsdp_units": len(units),
            "activation_bytes_by_batch": activations, "rows": rows}


def run_pretrain(out: Path, nproc: int, epochs: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "rt_mindeye", "pretrain", "--phantom-subjects", "2", "3", "--preset", "tiny",
               "--epochs", str(epochs), "--out", str(out), "--no-progress"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    began = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - began
    log = json.loads((out / "train_log.json").read_text())
    seconds = [h["seconds"] for h in log["history"]]
    return {"nproc": nproc, "command_s": wall, "first_epoch_s": seconds[0],
            "median_epoch_s": statistics.median(seconds[1:] or seconds), "epoch_s": seconds,
            "losses": [h["loss"] for h in log["history"]], "steps_per_epoch": log["steps_per_epoch"]}


def wall_time(epochs: int) -> dict:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_pretrain(Path(tmp) / f"n{n}", n, epochs) for n in (1, 2)]
    load_after = os.getloadavg()
    return {"epochs": epochs, "cpus": os.cpu_count(), "load_avg_1min": [load_before[0], load_after[0]],
            "loaded": max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1), "runs": runs,
            "epoch_ratio_2_over_1": runs[1]["median_epoch_s"] / runs[0]["median_epoch_s"],
            "max_loss_rel_diff": max(abs(a - b) / abs(a) for a, b in zip(runs[0]["losses"], runs[1]["losses"]))}


def _measure_worker(preset: str, strategy: str, steps: int) -> dict:
    """One rank of ``--measure``: a two-epoch fine-tune on random data; peak memory and the second epoch's step."""
    import resource

    import torch.distributed as dist

    from rt_mindeye.model.distributed import DistributedTrainer, close_worker, init_worker
    from rt_mindeye.model.mindeye import MindEyeModule
    from rt_mindeye.model.train import SubjectData, TrainConfig

    world = init_worker("auto")
    try:
        fields = {} if preset == "tiny" else dict(token_seq=256, token_dim=1664)
        config = MindEyeConfig.preset(preset, [NSD_SUBJ01_VOXELS if preset != "tiny" else 500], **fields)
        n = FINETUNE_BATCH * steps
        g = torch.Generator().manual_seed(0)
        blurry = aux = None
        if config.blurry_recon:
            side = config.blurry_size
            blurry = torch.randn(n, config.blurry_out_channels, side, side, generator=g)
            aux = torch.randn(n, config.blurry_grid ** 2, config.blurry_aux_dim, generator=g)
        data = SubjectData(torch.randn(n, config.subject_voxels[0], generator=g),
                           torch.randn(n, config.token_seq, config.token_dim, generator=g), blurry, aux, name="random")
        torch.manual_seed(0)
        model = MindEyeModule(config)
        settings = TrainConfig(epochs=2, batch_size=FINETUNE_BATCH, warmup_epochs=0.5)
        trainer = DistributedTrainer(model, settings, world, progress=False, strategy=strategy)
        if world.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(world.device)
        result = trainer.fit([data])
        peak = (torch.cuda.max_memory_allocated(world.device) if world.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        row = {"rank": world.rank, "gpus": world.world_size, "device": str(world.device),
                "gpu_name": torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else None,
                "strategy": trainer.strategy, "preset": preset, "parameters": model.parameter_counts()["total"],
                "peak_bytes": peak, "peak_kind": "cuda max_memory_allocated" if world.device.type == "cuda"
                else "peak RSS (CPU)", "step_s": result.history[-1].seconds / result.steps_per_epoch,
                "losses": [h.loss for h in result.history]}
        rows: list = [None] * world.world_size
        dist.all_gather_object(rows, row)
        return rows
    finally:
        close_worker()


def measure(preset: str, strategy: str, steps: int, nproc: int) -> list[dict] | None:
    """Every rank's row, in the process that reports (rank 0 under torchrun, else this launcher); None elsewhere."""
    from rt_mindeye.model.distributed import launch_local, launched

    if launched():  # under torchrun this process is one of the ranks
        rows = _measure_worker(preset, strategy, steps)
        return rows if int(os.environ["RANK"]) == 0 else None
    return launch_local(_measure_worker, (preset, strategy, steps), nproc)[0]


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", action="store_true", help="only the computed memory table")
    parser.add_argument("--walltime", action="store_true", help="only the CPU wall-time comparison")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--measure", action="store_true",
                        help="measure peak memory and step time of a fine-tune (run under torchrun on GPUs)")
    parser.add_argument("--preset", default="full", choices=("tiny", "light", "full"))
    parser.add_argument("--strategy", default="auto", choices=("auto", "ddp", "fsdp"))
    parser.add_argument("--steps", type=int, default=4, help="--measure: steps per epoch")
    parser.add_argument("--nproc", type=int, default=2, help="--measure without torchrun: local processes")
    args = parser.parse_args(argv)
    if args.measure:
        rows = measure(args.preset, args.strategy, args.steps, args.nproc)
        return _report_measure(rows, console_width=150) if rows is not None else 0
    both = not (args.memory or args.walltime)
    console = Console(width=150)
    results: dict = {}
    if args.memory or both:
        memory = results["memory"] = memory_table()
        table = Table(title=f"Full-model fine-tune under FSDP2, per GPU, GiB (COMPUTED, not measured): "
                            f"{memory['parameters'] / 1e9:.2f} B parameters, global batch {FINETUNE_BATCH}")
        for column in ("GPUs", "batch/GPU", "weights fp32", "grads fp32", "AdamW fp32", "root bf16",
                       "largest unit in flight", "activations", "total", "total, 24/GPU"):
            table.add_column(column, justify="right")
        for row in memory["rows"]:
            table.add_row(str(row["gpus"]), str(row["per_gpu_batch"]),
                          *(f"{row[k]:.1f}" for k in ("weights_fp32_gib", "grads_fp32_gib", "adamw_fp32_gib",
                                                      "root_unit_bf16_gib", "largest_unit_in_flight_gib",
                                                      "activations_gib", "total_gib", "total_at_24_per_gpu_gib")))
        console.print(table)
    if args.walltime or both:
        timing = results["walltime"] = wall_time(args.epochs)
        label = "LOADED machine" if timing["loaded"] else "quiet machine"
        table = Table(title=f"CPU pretraining epoch, tiny model, phantom subjects 2 and 3 ({label}: 1-min load "
                            f"{timing['load_avg_1min'][0]:.1f} -> {timing['load_avg_1min'][1]:.1f} on "
                            f"{timing['cpus']} CPUs)")
        for column in ("processes", "steps/epoch", "first epoch s", "median epoch s", "command s"):
            table.add_column(column, justify="right")
        for run in timing["runs"]:
            table.add_row(str(run["nproc"]), str(run["steps_per_epoch"]), f"{run['first_epoch_s']:.2f}",
                          f"{run['median_epoch_s']:.2f}", f"{run['command_s']:.1f}")
        console.print(table)
        console.print(f"median epoch, 2 processes / 1: {timing['epoch_ratio_2_over_1']:.2f}x; "
                      f"largest relative difference of the epoch losses: {timing['max_loss_rel_diff']:.1e}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "distributed.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**previous, **results}, indent=2, default=str))
    console.print(f"wrote {path}")
    return 0


def _report_measure(rows: list[dict], console_width: int) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=console_width)
    table = Table(title=f"{rows[0]['preset']} fine-tune, global batch {FINETUNE_BATCH}, {rows[0]['strategy'].upper()} "
                        f"on {rows[0]['gpus']} x {rows[0]['gpu_name'] or 'CPU'} (MEASURED)")
    for column in ("rank", "peak GiB", "peak of", "step s", "losses"):
        table.add_column(column, justify="right")
    for row in sorted(rows, key=lambda r: r["rank"]):
        table.add_row(str(row["rank"]), f"{row['peak_bytes'] / GIB:.2f}", row["peak_kind"], f"{row['step_s']:.3f}",
                      ", ".join(f"{x:.3f}" for x in row["losses"]))
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"distributed_measure_{rows[0]['preset']}_{rows[0]['gpus']}.json"
    path.write_text(json.dumps(rows, indent=2))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
