"""Sub-commands of `rt-mindeye` for the model: ``model check``, ``pretrain`` and ``finetune``.

    rt-mindeye model check CHECKPOINT [--new-subject-voxels N] [--load [--device cuda] [--dtype float16]]
    rt-mindeye pretrain --out DIR [--preset tiny] (--phantom-subjects 1 2 3 | --data a.npz b.npz) [--config X.yaml]
    rt-mindeye finetune CHECKPOINT --out DIR (--phantom-subject 9 | --data new.npz) [--budget-min 3] [--config X.yaml]
    rt-mindeye pretrain ... --nproc 2                  # 2 processes on this machine (DDP/FSDP, docs/distributed.md)
    torchrun --nproc-per-node 8 -m rt_mindeye pretrain ...   # or under torchrun, on one node or several

Training writes ``DIR/last.pth`` (MindEyeV2's container layout, resumable with ``--resume``) and ``DIR/train_log.json``.
Training settings come from the ``train:`` section of ``--config`` (see :class:`~rt_mindeye.model.train.TrainConfig`)
and architecture overrides from its ``model:`` section; command-line flags override both.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from rt_mindeye.config import read_yaml
from rt_mindeye.errors import ConfigError
from rt_mindeye.process import cli_path


CHECKPOINT_NAME = "last.pth"
LOG_NAME = "train_log.json"


def register(subparsers) -> None:
    model = subparsers.add_parser("model", help="inspect MindEye2 checkpoints")
    model_sub = model.add_subparsers(dest="model_command", metavar="COMMAND")
    check = model_sub.add_parser("check", help="infer a checkpoint's configuration and check every key and shape")
    check.add_argument("checkpoint", type=cli_path)
    check.add_argument("--new-subject-voxels", type=int, default=None,
                       help="check it as the starting point of a new subject with this many voxels "
                            "(old ridge heads dropped)")
    check.add_argument("--json", action="store_true", help="print the configuration as JSON instead of tables")
    check.add_argument("--load", action="store_true",
                       help="also build the model from the file as the decoder would (MindEye2 or unCLIP "
                            "checkpoint) and report the peak memory against the model's float16 size")
    check.add_argument("--device", default="cpu", help="with --load: where to build it (cpu, cuda, cuda:N)")
    check.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                       help="with --load: precision (auto = the decoder's for --device: float16 on a GPU, "
                            "float32 on a CPU)")
    check.set_defaults(func=run_check)
    model.set_defaults(func=lambda args: (model.print_help(), 1)[1])

    pre = subparsers.add_parser("pretrain", help="train the shared model across several subjects")
    _common_training_args(pre)
    pre.add_argument("--preset", default="tiny", choices=("tiny", "light", "full"), help="model size")
    source = pre.add_mutually_exclusive_group(required=True)
    source.add_argument("--phantom-subjects", type=int, nargs="+", help="simulate these phantom subjects")
    source.add_argument("--data", type=cli_path, nargs="+", help="one .npz per subject (voxels, image_tokens, ...)")
    pre.add_argument("--global-batch", type=int, default=None,
                     help="trials per step over all subjects, split evenly across them (MindEye2: 42 over 7 "
                          "subjects); instead of --batch-size, which counts trials per subject")
    pre.set_defaults(func=run_pretrain)

    fine = subparsers.add_parser("finetune", help="fit a new subject from a pretrained checkpoint")
    fine.add_argument("checkpoint", type=cli_path, help="pretrained MindEye2 checkpoint (published or rt-mindeye's)")
    _common_training_args(fine)
    source = fine.add_mutually_exclusive_group(required=True)
    source.add_argument("--phantom-subject", type=int, help="simulate this phantom subject; use its calibration runs")
    source.add_argument("--data", type=cli_path, help=".npz of the new subject's calibration trials")
    fine.add_argument("--budget-min", type=float, default=None, help="plan epochs to finish within this many minutes")
    fine.set_defaults(func=run_finetune)


def _common_training_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=cli_path, required=True, help="output folder (last.pth, train_log.json)")
    parser.add_argument("--config", type=cli_path, default=None, help="YAML with 'train:' and 'model:' sections")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--phantom-preset", default="small", help="phantom preset for simulated subjects")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--nproc", type=int, default=1,
                        help="training processes on this machine (one per GPU, or CPU processes with gloo), started "
                             "by torch's elastic launcher; leave it out under torchrun")
    parser.add_argument("--strategy", default="auto", choices=("auto", "ddp", "fsdp"),
                        help="with several processes: replicate (DDP) or shard (FSDP) the model; auto = FSDP from "
                             "1 B parameters (the full model), DDP below")


# -- model check -----------------------------------------------------------------------------------------------------


def _run_load(args, console, summary: dict | None = None) -> int:
    from rt_mindeye.convert.loading import detect_kind, load_as_decoder

    kind = detect_kind(args.checkpoint)
    report = load_as_decoder(args.checkpoint, kind=kind, device=args.device, dtype=args.dtype)
    if args.json:
        print(json.dumps({**(summary or {}), "load": report}))
        return 0
    gb = 1e9
    console.print(f"loaded {report['kind']} ({report['parameters']:,} parameters, "
                  f"{', '.join(f'{k} {v}' for k, v in report['dtypes'].items())}) on {report['device']} in "
                  f"{report['seconds']:.1f} s")
    console.print(f"peak memory {report['peak_rss_bytes'] / gb:.2f} GB = baseline {report['baseline_rss_bytes'] / gb:.2f}"
                  f" GB + {report['peak_over_baseline_bytes'] / gb:.2f} GB for the load; the model in float16 is "
                  f"{report['fp16_bytes'] / gb:.2f} GB (ratio {report['peak_over_fp16']:.2f})")
    return 0


def run_check(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from rt_mindeye.convert.mindeye2 import check_checkpoint

    console = Console()
    if args.load:
        from rt_mindeye.convert.loading import detect_kind

        if detect_kind(args.checkpoint) == "unclip":  # the key/shape tables below are MindEye2's
            return _run_load(args, console)
    report = check_checkpoint(args.checkpoint, new_subject_voxels=args.new_subject_voxels)
    if args.json:
        summary = {"config": report.config.to_dict(), "parameters": report.parameters, "dtypes": report.dtypes}
        if args.load:
            return _run_load(args, console, summary)
        console.print_json(json.dumps(summary))
        return 0
    config = Table(title=f"{report.path.name}: inferred configuration", show_header=True)
    config.add_column("setting")
    config.add_column("value")
    for key, value in report.config.to_dict().items():
        if key == "subject_voxels":
            value = f"{len(value)} subject(s): {', '.join(str(v) for v in value)} voxels"
        config.add_row(key, str(value))
    console.print(config)
    parts = Table(title="parameters per part")
    for column in ("part", "keys", "parameters (unique)", "numbers stored"):
        parts.add_column(column, justify="right" if column != "part" else "left")
    for part, count in report.parameters.items():
        if part == "total":
            continue
        parts.add_row(part, str(report.keys.get(part, 0)), f"{count:,}", f"{report.stored.get(part, 0):,}")
    parts.add_row("[bold]total", str(sum(report.keys.values())), f"[bold]{report.parameters['total']:,}",
                  f"{sum(report.stored.values()):,}")
    console.print(parts)
    console.print(f"dtypes: {', '.join(f'{k} x{v}' for k, v in report.dtypes.items())}; "
                  f"container entries: {', '.join(report.container_keys) or '(bare state dict)'}")
    if report.placeholders:
        console.print(f"[yellow]non-tensor objects not loaded (placeholders): {', '.join(report.placeholders)}")
    if args.new_subject_voxels is not None:
        console.print(f"fits as a starting point for a new subject of {args.new_subject_voxels} voxels "
                      "(old ridge heads dropped, a new one initialised)")
    console.print("[green]OK: every key and shape fits")
    if args.load:
        return _run_load(args, console)
    return 0


# -- training --------------------------------------------------------------------------------------------------------


def _train_config(args, defaults: dict | None = None):
    from rt_mindeye.model.train import TrainConfig

    data = dict(defaults or {})
    model_overrides: dict = {}
    if args.config is not None:
        yaml = read_yaml(args.config)
        unknown = set(yaml) - {"train", "model"}
        if unknown:
            raise ConfigError(args.config, sorted(unknown)[0], "unknown section (known: model, train)")
        data.update(yaml.get("train") or {})
        model_overrides = dict(yaml.get("model") or {})
    for flag, key in (("epochs", "epochs"), ("batch_size", "batch_size"), ("seed", "seed"), ("device", "device")):
        value = getattr(args, flag, None)
        if value is not None:
            data[key] = value
    if getattr(args, "budget_min", None) is not None:
        data["time_budget_min"] = args.budget_min
    return TrainConfig.from_dict(data, source=str(args.config) if args.config else "<command line>"), model_overrides


def _phantom_targets(preset: str, console):
    from rt_mindeye.model.data import image_targets
    from rt_mindeye.model.embedders import PhantomEmbedder
    from rt_mindeye.phantom import simulate_session

    console.print("computing image targets with the phantom embedder (EfficientNet-Lite0)...")
    reference = simulate_session(preset, subject=1, seed=0)
    return image_targets(reference.images, PhantomEmbedder())


def _write_log(out: Path, result, extra: dict) -> None:
    log = {"epochs": result.epochs, "steps_per_epoch": result.steps_per_epoch, "step_seconds": result.step_seconds,
           "history": [asdict(h) for h in result.history], **extra}
    (out / LOG_NAME).write_text(json.dumps(log, indent=2))


def run_pretrain(args) -> int:
    return _run_training(args, _pretrain)


def run_finetune(args) -> int:
    return _run_training(args, _finetune)


def _run_training(args, body) -> int:
    """One process; ``--nproc N`` worker processes on this machine; or, under torchrun, this process's rank."""
    from rt_mindeye.model import distributed

    if args.nproc < 1:
        raise ConfigError(None, "nproc", f"must be at least 1, got {args.nproc}")
    if distributed.launched():
        if args.nproc != 1:
            raise ConfigError(None, "nproc", "this process was started by torchrun, which already chose the "
                                             "number of processes; leave --nproc out")
        return _training_worker(body, args)
    if args.nproc > 1:
        return max(distributed.launch_local(_training_worker, (body, args), args.nproc).values())
    return body(args, None)


def _training_worker(body, args) -> int:
    from rt_mindeye.model import distributed

    world = distributed.init_worker(_train_config(args)[0].device)
    try:
        return body(args, world)
    finally:
        distributed.close_worker()


def _trainer(model, train_cfg, world, args, console):
    """The single-process trainer, or this rank's share of a distributed one (only rank 0 shows progress)."""
    from rt_mindeye.model.train import Trainer

    path = args.out / CHECKPOINT_NAME
    if world is None:
        return Trainer(model, train_cfg, path, progress=not args.no_progress, log=console.print)
    from rt_mindeye.model.distributed import DistributedTrainer

    trainer = DistributedTrainer(model, train_cfg, world, path, progress=not args.no_progress, log=console.print,
                                 strategy=args.strategy)
    console.print(f"{world.world_size} processes on {world.device.type}, {trainer.strategy.upper()}; "
                  f"{train_cfg.batch_size // world.world_size} trials per subject per process per step")
    return trainer


def _run_record(world, trainer) -> dict:
    if world is None:
        return {"processes": 1}
    return {"processes": world.world_size, "strategy": trainer.strategy}


def _pretrain(args, world) -> int:
    import torch
    from rich.console import Console

    from rt_mindeye.model.config import MindEyeConfig, tiny_fields_for
    from rt_mindeye.model.data import load_npz, phantom_subject_data
    from rt_mindeye.model.mindeye import MindEyeModule
    from rt_mindeye.model.train import split_global_batch

    main = world is None or world.is_main
    console = Console(quiet=not main)
    if args.global_batch is not None:
        if args.batch_size is not None:
            raise ConfigError(None, "global_batch", "give --global-batch or --batch-size, not both")
        n_subjects = len(args.data or args.phantom_subjects)
        args.batch_size = split_global_batch(args.global_batch, n_subjects)
    train_cfg, overrides = _train_config(args)
    # Every rank reads (or simulates, deterministically) the same data.
    if args.data:
        datasets = [load_npz(p) for p in args.data]
    else:
        from rt_mindeye.phantom import simulate_session

        targets = _phantom_targets(args.phantom_preset, console)
        datasets = []
        for subject in args.phantom_subjects:
            session = simulate_session(args.phantom_preset, subject=subject, seed=subject)
            data, _ = phantom_subject_data(session, range(session.n_runs), targets, name=f"phantom{subject:02d}")
            datasets.append(data)
    seq, dim = datasets[0].image_tokens.shape[1:]
    blurry = datasets[0].blurry_targets
    preset_fields = dict(token_seq=int(seq), token_dim=int(dim))
    if args.preset == "tiny":
        preset_fields.update(tiny_fields_for(int(dim), blurry, datasets[0].aux_targets))
    preset_fields.update(overrides)
    config = MindEyeConfig.preset(args.preset, [d.voxels.shape[1] for d in datasets],
                                  subject_names=tuple(d.name for d in datasets), **preset_fields)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(train_cfg.seed)  # the same initial weights in every process and every run
    model = MindEyeModule(config)
    trainer = _trainer(model, train_cfg, world, args, console)
    result = trainer.fit(datasets, resume_from=(args.out / CHECKPOINT_NAME) if args.resume else None)
    if main:
        _write_log(args.out, result, {"model": config.to_dict(), "train": train_cfg.to_dict(),
                                      **_run_record(world, trainer)})
    console.print(f"pretrained {len(datasets)} subjects for {result.epochs} epochs: {result.checkpoint}")
    return 0


def _finetune(args, world) -> int:
    import torch
    from rich.console import Console

    from rt_mindeye.convert.mindeye2 import load_mindeye2
    from rt_mindeye.model.data import load_npz, phantom_subject_data

    main = world is None or world.is_main
    console = Console(quiet=not main)
    train_cfg, _ = _train_config(args)
    if args.data:
        data = load_npz(args.data)
    else:
        from rt_mindeye.phantom import simulate_session

        targets = _phantom_targets(args.phantom_preset, console)
        session = simulate_session(args.phantom_preset, subject=args.phantom_subject, seed=args.phantom_subject)
        runs = session.calibration_runs
        data, _ = phantom_subject_data(session, runs, targets, name=f"phantom{args.phantom_subject:02d}")
    args.out.mkdir(parents=True, exist_ok=True)
    # The new subject's ridge head is initialised from the training seed: the same in every process.
    model = load_mindeye2(args.checkpoint, new_subject_voxels=data.voxels.shape[1], new_subject_name=data.name or None,
                          dtype=torch.float32, seed=train_cfg.seed).model
    trainer = _trainer(model, train_cfg, world, args, console)
    result = trainer.fit([data], resume_from=(args.out / CHECKPOINT_NAME) if args.resume else None)
    if main:
        _write_log(args.out, result, {"model": model.config.to_dict(), "train": train_cfg.to_dict(),
                                      "pretrained": str(args.checkpoint), **_run_record(world, trainer)})
    console.print(f"fine-tuned {data.name or 'the new subject'} ({len(data)} trials) for {result.epochs} epochs: "
                  f"{result.checkpoint}")
    return 0
