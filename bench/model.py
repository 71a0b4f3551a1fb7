"""Benchmark of the shared-subject model on the phantom: does pretraining across subjects help a new subject?

Run from the repository root::

    python bench/model.py             # 4 pretraining subjects, 2 fine-tune seeds, light-model projection (~30 min)
    python bench/model.py --quick     # 2 small subjects, short runs, 1 seed (a smoke run, minutes)
    python bench/model.py --measure-light   # also time one CPU training step of the real-size light model
    python bench/model.py --write-keys      # regenerate docs/mindeye2_keys.md from the model (meta device)
    python bench/model.py --timing-only --real-size-load   # load a real-size (1.6 GB) light checkpoint: time, memory

Steps

1. Phantom subjects 1..K (``small`` phantom, 12 runs x 40 trials) give pretraining data: their true single-trial
   betas (the phantom's ground truth, not GLM estimates) z-scored per subject, and the tokens of the images they saw
   from the phantom embedder (EfficientNet-Lite0 stage 5 pooled to 4x4 = 16 tokens x 112). Each pretraining subject
   sees 480 images of its own that neither the new subject nor the other subjects see (as NSD subjects did).
2. ``tiny`` is pretrained on all K subjects (20 epochs, one global batch of 32 split across them), then fine-tuned on
   a new subject's 3 calibration runs with a fresh ridge head within a time budget, up to the calibration workflow's
   60 epochs: with the workflow's recipe (the head alone for the first third) and with MindEye2's (all parts from
   the start). A model of the same size is trained from scratch on the same data, for the same epochs and for 150.
3. All decode the new subject's 3 held-out runs from its true betas: top-1 image retrieval among the 120 held-out
   images (cosine of flattened, L2-normalised tokens, MindEye2's metric; chance = 1 / number of candidates), per
   seed, and a PNG grid of seen / retrieved / blurry-reconstructed images (the tiny model's low-level head predicts a
   28x28 RGB image).
4. Timing: the measured CPU step time of ``tiny``, and for ``light`` on 750 trials (MindEye2's 1-hour fine-tune:
   batch 24, 150 epochs) a FLOP count per step and the projected H100 time (no GPU here); ``--measure-light`` adds a
   measured CPU step of the real-size light model (needs ~8 GB of memory).

Prints rich tables and writes ``bench/results/model.json`` and ``bench/results/model_grid.png``. Timings on a busy
machine are not meaningful; the retrieval numbers are deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rt_mindeye.calibration.config import CalibrationConfig  # noqa: E402
from rt_mindeye.model.config import MindEyeConfig  # noqa: E402
from rt_mindeye.model.mindeye import MindEyeModule, build_model  # noqa: E402

RESULTS = REPO / "bench" / "results"
PRETRAIN_GLOBAL_BATCH = 32  # trials per pretraining step, split evenly across the subjects
FINETUNE_HEAD_ONLY_PCT = 0.33  # the calibration workflow's default (rt_mindeye.calibration.config)
NSD_VOXELS = {1: 15724, 2: 14278, 3: 15226, 4: 13153, 5: 13039, 6: 17907, 7: 12682, 8: 14386}
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense BF16 tensor core peak
ASSUMED_MFU = (0.25, 0.45)
# Phantom image tokens: EfficientNet-Lite0 stage 5 (112 channels; the phantom's voxels are tuned to these maps among
# others) pooled to 4x4 = 16 tokens. Narrow tokens keep the prior (which dominates a step) cheap on a CPU.
PHANTOM_LAYER, PHANTOM_GRID, PRIOR_DIM_HEAD = "stage5", 4, 16  # achieved fraction of peak for a mid-size transformer/MLP step (range, not measured)


# -- docs/mindeye2_keys.md ---------------------------------------------------------------------------------------


def write_key_list(path: Path) -> Path:
    """Every key of the published layouts with its shape in each, from our model built on the meta device."""
    layouts = {
        "light (multisubject_subj01_1024hid_nolow_300ep)":
            MindEyeConfig.preset("light", [NSD_VOXELS[s] for s in range(2, 9)]),
        "full (final_multisubject_subj01)": MindEyeConfig.preset("full", [NSD_VOXELS[s] for s in range(2, 9)]),
        "full fine-tuned (final_subj01_pretrained_1sess_24bs)": MindEyeConfig.preset("full", [NSD_VOXELS[1]]),
    }
    shapes = {name: {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}
              for name, cfg in layouts.items()}
    order: list[str] = []
    for table in shapes.values():
        for key in table:
            if key not in order:
                order.append(key)
    # Keep state_dict order of the full multisubject model (the superset), ridge heads first.
    full = list(shapes["full (final_multisubject_subj01)"])
    order = full + [k for k in order if k not in full]
    lines = [
        "# MindEye2 checkpoint keys",
        "",
        "Every state-dict key of the three published MindEye2 layouts with its shape, in `state_dict()` order. "
        "Generated by `python bench/model.py --write-keys` from rt-mindeye's `MindEyeModule` built on the meta "
        "device; `tests/model/test_layout.py` checks the model against the layouts obtained by instantiating the "
        "original MindEyeV2 code (`tests/data/mindeye2_layout/`). Ridge heads `ridge.linears.i` of the multisubject "
        "checkpoints are NSD subjects 2..8 in order (`--subj=1` held out); the fine-tuned one has subject 1 only. "
        "`-` = absent in that layout.",
        "",
        "| key | " + " | ".join(layouts) + " |",
        "|---|" + "---|" * len(layouts),
    ]
    for key in order:
        cells = [str(list(shapes[name][key])) if key in shapes[name] else "-" for name in layouts]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    counts = {name: build_model(cfg, "meta").parameter_counts() for name, cfg in layouts.items()}
    lines += ["", "Parameters (unique, as MindEyeV2's `count_params` prints them):", "",
              "| layout | ridge | backbone | diffusion_prior | total |", "|---|---|---|---|---|"]
    for name, c in counts.items():
        lines.append(f"| {name} | {c['ridge']:,} | {c['backbone']:,} | {c['diffusion_prior']:,} | {c['total']:,} |")
    path.write_text("\n".join(lines) + "\n")
    return path


# -- FLOP model ----------------------------------------------------------------------------------------------------


def training_flops_per_step(config: MindEyeConfig, batch: int) -> dict[str, float]:
    """Matrix-multiply FLOPs of one training step (forward x3 for forward + backward), by part."""
    model = build_model(config, "meta")
    linear_params = lambda module: sum(p.numel() for n, p in module.named_parameters() if p.ndim == 2)  # noqa: E731
    ridge = 2 * config.hidden_dim * config.subject_voxels[0] * batch
    backbone = 2 * linear_params(model.backbone) * batch
    prior = 0.0
    if config.use_prior:
        tokens = 2 * config.token_seq + 1
        net = model.diffusion_prior.net
        per_token = linear_params(net.causal_transformer) - net.causal_transformer.rel_pos_bias \
            .relative_attention_bias.weight.numel()
        attention = 2 * 2 * config.prior_heads * tokens * (tokens + 1) * config.prior_dim_head * config.prior_depth
        prior = (2 * per_token * tokens + attention) * batch
    forward = {"ridge": ridge, "backbone": backbone, "prior": prior}
    return {k: 3.0 * v for k, v in forward.items()}


# -- phantom experiment --------------------------------------------------------------------------------------------


def phantom_setup(args, console):
    """Images, targets and data: the new subject sees stimuli 0..n-1, each pretraining subject its own next block.

    As in NSD (where MindEye2's pretraining subjects saw ~9,000 mostly distinct images each), the shared model must
    learn a brain-to-image map that generalises to images it never saw, not memorise a few hundred: pretraining
    subjects therefore see images that neither the new subject nor the other pretraining subjects see.
    """
    from rt_mindeye.model.data import image_targets, phantom_subject_data, subject_data, trial_arrays, zscore_stats
    from rt_mindeye.model.embedders import PhantomEmbedder
    from rt_mindeye.phantom import phantom_config, simulate_session
    from rt_mindeye.phantom.stimuli import render_all, stimulus_set

    # GLM betas: a few images repeat across the new subject's runs (the type-d fit chooses its ridge fractions by
    # cross-validating repeats, as in a real calibration); repeated images are then left out of the test set.
    repeats = dict(repeated_images=10, repeats=3) if args.betas == "glm" else dict(repeated_images=0)
    new_cfg = phantom_config("small", n_runs=args.new_runs, calibration_runs=args.calibration_runs,
                             trials_per_run=args.trials_per_run, **repeats)
    per_subject = args.pretrain_runs * args.trials_per_run
    offsets = [new_cfg.n_images + k * per_subject for k in range(args.subjects)]
    n_images = new_cfg.n_images + args.subjects * per_subject
    began = time.perf_counter()
    images = render_all(stimulus_set(n_images), new_cfg.image_size)
    targets = image_targets(images, PhantomEmbedder(layer=PHANTOM_LAYER, grid=PHANTOM_GRID))
    console.print(f"image targets for {n_images} images: {time.perf_counter() - began:.1f} s")

    new_id = args.subjects + 1
    new = simulate_session(new_cfg, subject=new_id, seed=new_id)
    if not np.array_equal(new.images, images[:len(new.images)]):
        raise RuntimeError("phantom images differ between sessions: image indices would not match")
    calib = new.calibration_runs
    held_out = [r for r in range(new.n_runs) if r not in calib]
    pretrain = []
    for subject, offset in zip(range(1, args.subjects + 1), offsets):
        cfg = phantom_config("small", n_runs=args.pretrain_runs, calibration_runs=0, repeated_images=0,
                             trials_per_run=args.trials_per_run, stimulus_offset=offset)
        session = simulate_session(cfg, subject=subject, seed=subject)
        betas, index = trial_arrays(session, range(session.n_runs))
        pretrain.append(subject_data(betas, index + offset, targets, zscore_stats(betas), name=f"phantom{subject:02d}"))
    if args.betas == "glm":
        finetune_data, test_data, test_index = _glm_subject_data(new, calib, held_out, targets, console)
    else:
        finetune_data, _ = phantom_subject_data(new, calib, targets, name=f"phantom{new_id:02d}", stats_runs=calib)
        test_data, test_index = phantom_subject_data(new, held_out, targets, name=f"phantom{new_id:02d}",
                                                     stats_runs=calib)
    return dict(images=images, targets=targets, pretrain=pretrain, finetune=finetune_data, test=test_data,
                test_index=test_index, pretrain_images=args.subjects * per_subject)


def _glm_subject_data(session, calib, held_out, targets, console):
    """The new subject's betas from the offline type-d GLM of its runs (no ground truth), z-scored with the
    calibration runs' statistics; the test set keeps only images never shown in a calibration run."""
    from rt_mindeye.glm.design import RunEvents
    from rt_mindeye.glm.estimator import GLMSingle
    from rt_mindeye.model.data import subject_data, trial_arrays, zscore_stats

    began = time.perf_counter()
    runs = [session.visual_timeseries(r) for r in range(session.n_runs)]
    events = [RunEvents.from_records(session.events(r), condition_column="stim_file") for r in range(session.n_runs)]
    fit = GLMSingle(model="d").fit(runs, events, tr=session.tr)
    betas = np.asarray(fit.betas_, dtype=np.float32)
    truth, index = trial_arrays(session, range(session.n_runs))
    run_of = np.concatenate([[r] * len(session.trials(r)) for r in range(session.n_runs)])
    in_calib = np.isin(run_of, calib)
    held = np.isin(run_of, held_out) & ~np.isin(index, index[in_calib])
    r = np.median([np.corrcoef(betas[:, v], truth[:, v])[0, 1] for v in np.flatnonzero(session.subject.responsive)])
    console.print(f"offline GLM type d of the new subject: {time.perf_counter() - began:.0f} s, median correlation "
                  f"with the true betas over responsive voxels {r:.3f}")
    stats = zscore_stats(betas[in_calib])
    name = "glm"
    return (subject_data(betas, index, targets, stats, name=name, keep=in_calib),
            subject_data(betas, index, targets, stats, name=name, keep=held), index[held])


@torch.no_grad()
def retrieval(model: MindEyeModule, data, test_index: np.ndarray, targets) -> dict:
    """Top-1 brain -> image retrieval among the distinct held-out images."""
    from rt_mindeye.decode.retrieval import Retriever

    model.eval()
    candidates = np.unique(test_index)
    retriever = Retriever(targets.tokens[torch.from_numpy(candidates)])
    out = model(data.voxels, 0)
    top, _ = retriever.topk(out.clip_voxels, k=1)
    retrieved = candidates[np.asarray(top)[:, 0]]
    correct = retrieved == test_index
    return {"top1": float(correct.mean()), "chance": 1.0 / len(candidates), "n_trials": int(len(test_index)),
            "n_candidates": int(len(candidates)), "retrieved": retrieved.tolist(),
            "blurry": out.blurry_latent}


def save_grid(path: Path, images: np.ndarray, test_index: np.ndarray, result: dict, n: int = 8) -> Path:
    """Rows: seen image, retrieved image, blurry reconstruction (the low-level head's 28x28 RGB), for n trials."""
    from PIL import Image

    size = 96
    picks = np.linspace(0, len(test_index) - 1, n).astype(int)
    rows = [[images[test_index[i]] for i in picks], [images[result["retrieved"][i]] for i in picks]]
    if result["blurry"] is not None:
        blurry = ((result["blurry"][picks].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        rows.append(list(blurry))
    canvas = Image.new("RGB", (n * (size + 4) + 4, len(rows) * (size + 4) + 4), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((size, size), Image.BICUBIC)
            canvas.paste(tile, (4 + c * (size + 4), 4 + r * (size + 4)))
    canvas.save(path)
    return path


def run_phantom(args, console) -> dict:
    from rt_mindeye.convert.mindeye2 import save_container
    from rt_mindeye.model.train import TrainConfig, Trainer, finetune, pretrain, split_global_batch

    setup = phantom_setup(args, console)
    seq, dim = setup["targets"].tokens.shape[1:]
    fields = dict(token_seq=int(seq), token_dim=int(dim), prior_dim_head=PRIOR_DIM_HEAD,
                  prior_heads=int(dim) // PRIOR_DIM_HEAD,
                  blurry_aux_dim=int(setup["targets"].aux.shape[-1]))
    pre_config = MindEyeConfig.preset("tiny", [d.voxels.shape[1] for d in setup["pretrain"]],
                                      subject_names=tuple(d.name for d in setup["pretrain"]), **fields)
    torch.manual_seed(args.seed)
    shared = MindEyeModule(pre_config)
    pre_settings = TrainConfig(epochs=args.pretrain_epochs,
                               batch_size=split_global_batch(PRETRAIN_GLOBAL_BATCH, args.subjects),
                               max_lr=1e-3, seed=args.seed,
                               time_budget_min=args.pretrain_budget_min)
    began = time.perf_counter()
    pre = pretrain(shared, setup["pretrain"], pre_settings, progress=not args.no_progress, log=console.print)
    pretrain_s = time.perf_counter() - began
    checkpoint = save_container(RESULTS / "model_pretrained_tiny.pth", shared)

    # Per seed: the calibration workflow's fine-tune (head alone first), MindEye2's fine-tune (everything from the
    # start), and the same model trained from scratch on the same data, for as many epochs as the fine-tune got and
    # for the full 150 (scratch training gains from longer runs; the comparison gives it that chance).
    variants: dict[str, dict] = {}

    def record(name: str, model, epochs: int, seconds: float, seed: int) -> dict:
        result = retrieval(model, setup["test"], setup["test_index"], setup["targets"])
        entry = variants.setdefault(name, {"epochs": epochs, "seconds": [], "top1": [], "seeds": []})
        entry["seconds"].append(seconds)
        entry["top1"].append(result["top1"])
        entry["seeds"].append(seed)
        console.print(f"seed {seed}: {name}: top-1 {result['top1']:.1%} ({epochs} epochs, {seconds:.0f} s)")
        return result

    grid_result = None
    scratch_config = pre_config.replace(subject_voxels=(setup["finetune"].voxels.shape[1],), subject_names=())
    for seed in range(args.seed, args.seed + args.seeds):
        for name, head_only in (("pretrained + fine-tuned (head alone first)", args.head_only_pct),
                                ("pretrained + fine-tuned (MindEye2: all parts from the start)", 0.0)):
            settings = TrainConfig(epochs=args.finetune_max_epochs, batch_size=24, max_lr=1e-3, seed=seed,
                                   head_only_pct=head_only, time_budget_min=args.finetune_budget_min)
            began = time.perf_counter()
            tuned, fine = finetune(checkpoint, setup["finetune"], settings, progress=not args.no_progress,
                                   log=console.print)
            result = record(name, tuned, fine.epochs, time.perf_counter() - began, seed)
            if grid_result is None:
                grid_result, fine_epochs, step_s = result, fine.epochs, fine.step_seconds
        for name, epochs in (("from scratch, same data, same epochs", fine_epochs),
                             (f"from scratch, same data, {args.scratch_long_epochs} epochs", args.scratch_long_epochs)):
            torch.manual_seed(seed)
            scratch = MindEyeModule(scratch_config)
            began = time.perf_counter()
            Trainer(scratch, TrainConfig(epochs=epochs, batch_size=24, max_lr=1e-3, seed=seed),
                    progress=not args.no_progress).fit([setup["finetune"]])
            record(name, scratch, epochs, time.perf_counter() - began, seed)

    grid = save_grid(RESULTS / ("model_grid.png" if args.betas == "true" else "model_grid_glm.png"), setup["images"], setup["test_index"], grid_result)
    for entry in variants.values():
        entry["mean_top1"] = float(np.mean(entry["top1"]))
    return {
        "betas": ("new subject: offline type-d GLM betas (no ground truth); pretraining subjects: true betas"
                  if args.betas == "glm" else "phantom ground-truth betas (not GLM estimates)")
                 + ", z-scored with calibration-run statistics",
        "pretrain": {"subjects": len(setup["pretrain"]), "trials": [len(d) for d in setup["pretrain"]],
                     "epochs": pre.epochs, "seconds": pretrain_s, "step_seconds": pre.step_seconds,
                     "final_loss": pre.history[-1].loss},
        "finetune": {"trials": len(setup["finetune"]), "max_epochs": args.finetune_max_epochs,
                     "budget_min": args.finetune_budget_min, "head_only_pct": args.head_only_pct,
                     "measured_step_seconds": step_s},
        "test": {"trials": grid_result["n_trials"], "candidates": grid_result["n_candidates"],
                 "chance": grid_result["chance"], "pretraining_images": setup["pretrain_images"],
                 "shared_with_new_subject": 0},
        "variants": variants,
        "grid_png": str(grid.relative_to(REPO)),
        "model": pre_config.to_dict(),
    }


# -- timing --------------------------------------------------------------------------------------------------------


def time_steps(config: MindEyeConfig, batch: int, repeats: int) -> list[float]:
    """CPU seconds of forward + backward + AdamW update for one subject's batch (random data)."""
    from rt_mindeye.model.train import TrainConfig, Trainer, parameter_groups

    torch.manual_seed(0)
    model = MindEyeModule(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-2), lr=1e-4)
    trainer = Trainer(model, TrainConfig(batch_size=batch), progress=False)
    voxels = torch.randn(batch, config.subject_voxels[0])
    tokens = torch.randn(batch, config.token_seq, config.token_dim)
    blurry = torch.randn(batch, config.blurry_out_channels, config.blurry_size, config.blurry_size) \
        if config.blurry_recon else None
    aux = torch.randn(batch, config.blurry_grid ** 2, config.blurry_aux_dim) if config.blurry_recon else None
    batches = [{"voxels": voxels, "image_tokens": tokens, "blurry": blurry, "aux": aux}]
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer._loss(batches, torch.device("cpu"), False, 0.005, torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return times[1:]  # the first step warms up allocators


def run_timing(args, console, tiny_config: MindEyeConfig | None) -> dict:
    out: dict = {}
    if tiny_config is not None:
        times = time_steps(tiny_config.replace(subject_voxels=(tiny_config.subject_voxels[0],), subject_names=()), 24,
                           3 if args.quick else 10)
        flops = sum(training_flops_per_step(tiny_config, 24).values())
        out["tiny_cpu_step"] = {"p50_s": statistics.median(times), "p99_s": max(times), "n": len(times),
                                "flops": flops, "threads": torch.get_num_threads()}
    light = MindEyeConfig.preset("light", [15724])
    per_step = training_flops_per_step(light, 24)
    steps = math.ceil(750 / 24) * 150
    total = sum(per_step.values()) * steps
    lo, hi = (total / (H100_BF16_DENSE_TFLOPS * 1e12 * mfu) for mfu in reversed(ASSUMED_MFU))
    out["light_750_trials_projection"] = {
        "flops_per_step_by_part": per_step, "flops_per_step": sum(per_step.values()), "steps": steps,
        "h100_minutes_range": [lo / 60, hi / 60], "assumed_mfu": list(ASSUMED_MFU),
        "note": "FLOP count of the matrix products (forward x3); excludes the image embedder (tokens precomputed "
                "once: ~0.9 TFLOP per ViT-bigG image, ~2 s for 750 images)",
    }
    if args.measure_light:
        times = time_steps(light, 4, 1)
        flops4 = sum(training_flops_per_step(light, 4).values())
        out["light_cpu_step_batch4"] = {"seconds": times[0], "flops": flops4,
                                        "achieved_gflops": flops4 / times[0] / 1e9}
    return out


def real_size_load(console) -> dict:
    """Write a real-size light checkpoint (fp16, uninitialised values) and load it in a child process.

    Reports the file size, the time to check and to load it, and the child's peak resident memory: with memory-mapped
    reading and meta-device construction the peak stays near the file size instead of twice the fp32 model.
    """
    import subprocess
    import tempfile

    config = MindEyeConfig.preset("light", [NSD_VOXELS[s] for s in range(2, 9)])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "last.pth"
        model = build_model(config, "meta")
        state = {k: torch.empty(v.shape, dtype=torch.float16) for k, v in model.state_dict().items()}
        from rt_mindeye.model.prior import cosine_schedule_tensors

        for name, value in cosine_schedule_tensors(config.prior_timesteps).items():
            state[f"diffusion_prior.noise_scheduler.{name}"] = value.half()
        torch.save({"epoch": 0, "model_state_dict": state, "optimizer_state_dict": {}, "lr_scheduler": {},
                    "train_losses": [], "test_losses": [], "lrs": []}, path)
        del state
        size = path.stat().st_size
        child = (
            "import resource, sys, time, torch\n"
            "from rt_mindeye.convert.mindeye2 import check_checkpoint, load_mindeye2\n"
            f"path = {str(path)!r}\n"
            "t = time.perf_counter(); report = check_checkpoint(path); check_s = time.perf_counter() - t\n"
            "t = time.perf_counter(); loaded = load_mindeye2(path, new_subject_voxels=15724)\n"
            "load_s = time.perf_counter() - t\n"
            "total = sum(p.numel() for p in loaded.model.parameters())\n"
            "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            "print(check_s, load_s, total, rss, report.config.hidden_dim)\n"
        )
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=REPO, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"real-size load failed: {out.stderr[-2000:]}")
        check_s, load_s, total, rss, hidden = out.stdout.split()
    result = {"file_bytes": size, "check_seconds": float(check_s), "load_seconds": float(load_s),
              "parameters_loaded": int(total), "peak_rss_bytes": int(rss), "inferred_hidden": int(hidden)}
    console.print(f"real-size light checkpoint: {size / 1e9:.2f} GB file, check {float(check_s):.1f} s, load "
                  f"{float(load_s):.1f} s, peak RSS {int(rss) / 1e9:.2f} GB")
    return result


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--write-keys", action="store_true", help="regenerate docs/mindeye2_keys.md and exit")
    parser.add_argument("--measure-light", action="store_true", help="time a CPU step of the real light model")
    parser.add_argument("--timing-only", action="store_true", help="skip the phantom experiment")
    parser.add_argument("--real-size-load", action="store_true",
                        help="write a real-size light checkpoint (1.6 GB, fp16) and measure check/load time and memory")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--betas", choices=("true", "glm"), default="true",
                        help="new subject's betas: the phantom's ground truth, or the offline type-d GLM of its runs")
    parser.add_argument("--seeds", type=int, default=None, help="fine-tune / scratch seeds (default 2; --quick 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a shared, busy machine 1 is much faster than 2)")
    parser.add_argument("--finetune-budget-min", type=float, default=None, help="override the fine-tune budget")
    parser.add_argument("--head-only-pct", type=float, default=FINETUNE_HEAD_ONLY_PCT,
                        help="fraction of the fine-tune in which only the new ridge head trains (0 = MindEye2's recipe)")
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help="pretraining epochs (default 20)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=150)
    if args.write_keys:
        console.print(f"wrote {write_key_list(REPO / 'docs' / 'mindeye2_keys.md')}")
        return 0
    quick = args.quick
    args.subjects = 2 if quick else 4
    args.seeds = args.seeds or (1 if quick else 2)
    args.scratch_long_epochs = 40 if quick else 150
    # Pretraining subjects see more images than the new subject (as NSD subjects did), minus its held-out ones.
    args.pretrain_runs = 4 if quick else 12
    args.trials_per_run = 30 if quick else 40
    args.new_runs, args.calibration_runs = (4, 2) if quick else (6, 3)
    # Pretraining runs fixed epochs; the fine-tune plans its epochs from the budget up to the calibration default.
    fixed_pretrain = args.pretrain_epochs
    args.pretrain_epochs = fixed_pretrain or 20  # fixed, so the accuracy does not depend on the machine's speed
    args.pretrain_budget_min = 0.0
    args.finetune_max_epochs = 20 if quick else CalibrationConfig().train.epochs  # what a session's fine-tune gets
    budget = args.finetune_budget_min
    args.finetune_budget_min = budget if budget is not None else (0.0 if quick else 3.0)
    RESULTS.mkdir(parents=True, exist_ok=True)

    results: dict = {"quick": quick, "torch_threads": torch.get_num_threads()}
    tiny = None
    if not args.timing_only:
        phantom = run_phantom(args, console)
        results["phantom"] = phantom
        tiny = MindEyeConfig.from_dict(phantom["model"])
        table = Table(title=f"new phantom subject: held-out top-1 retrieval ({args.betas} betas)")
        for column in ("model", "epochs", "train s", "top-1 per seed", "mean", "x chance"):
            table.add_column(column, justify="right" if column != "model" else "left")
        chance = phantom["test"]["chance"]
        for label, entry in phantom["variants"].items():
            table.add_row(label, str(entry["epochs"]), f"{np.median(entry['seconds']):.0f}",
                          " / ".join(f"{t:.1%}" for t in entry["top1"]), f"{entry['mean_top1']:.1%}",
                          f"{entry['mean_top1'] / chance:.1f}")
        console.print(table)
        console.print(f"pretraining: {phantom['pretrain']['subjects']} subjects, {phantom['pretrain']['epochs']} "
                      f"epochs, {phantom['pretrain']['seconds']:.0f} s; grid: {phantom['grid_png']}")
    else:
        tiny = MindEyeConfig.preset("tiny", [450], token_seq=PHANTOM_GRID ** 2, token_dim=112,
                                    prior_dim_head=PRIOR_DIM_HEAD, prior_heads=112 // PRIOR_DIM_HEAD,
                                    blurry_aux_dim=112)
    timing = run_timing(args, console, tiny)
    results["timing"] = timing
    if args.real_size_load:
        results["real_size_load"] = real_size_load(console)
    t = Table(title="training step time")
    t.add_column("what")
    t.add_column("value", justify="right")
    if "tiny_cpu_step" in timing:
        s = timing["tiny_cpu_step"]
        t.add_row("tiny, CPU, batch 24: p50 / p99", f"{s['p50_s'] * 1000:.0f} / {s['p99_s'] * 1000:.0f} ms")
    p = timing["light_750_trials_projection"]
    t.add_row("light, FLOPs per step (batch 24)", f"{p['flops_per_step'] / 1e12:.1f} TFLOP")
    t.add_row("light, 750 trials x 150 epochs", f"{p['steps']} steps")
    t.add_row(f"light, projected H100 (MFU {ASSUMED_MFU[0]:.0%}-{ASSUMED_MFU[1]:.0%})",
              f"{p['h100_minutes_range'][0]:.1f}-{p['h100_minutes_range'][1]:.1f} min (target <= 10)")
    if "light_cpu_step_batch4" in timing:
        s = timing["light_cpu_step_batch4"]
        t.add_row("light, CPU step, batch 4 (measured)", f"{s['seconds']:.1f} s ({s['achieved_gflops']:.0f} GFLOP/s)")
    console.print(t)
    out = RESULTS / ("model.json" if args.betas == "true" else "model_glm.json")
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
