"""Benchmark of the shared-subject model on the phantom: how well does a new subject decode from its GLM betas?

Run from the repository root::

    python bench/model.py                               # small phantom, 3 seeds, train on offline betas (~1 h)
    python bench/model.py --train-betas realtime        # train on the calibration runs' real-time replay (default
                                                        # of the calibration workflow)
    python bench/model.py --preset realistic --methods adapters,ridge_tokens     # the realistic preset
    python bench/model.py --phantom-network efficientnet-lite0 --nonlinearity linear --methods ridge_tokens
                                                        # the old phantom driven by the decoder's own network
    python bench/model.py --quick                       # smoke run
    python bench/model.py --measure-light               # also time one CPU training step of the real-size light model
    python bench/model.py --write-keys                  # regenerate docs/mindeye2_keys.md from the model (meta device)
    python bench/model.py --timing-only --real-size-load   # load a real-size (1.6 GB) light checkpoint: time, memory

Steps

1. The phantom's voxels are driven by EfficientNet-Lite2 through half-rectified units; the decoder's targets are
   EfficientNet-Lite0 stage-5 maps pooled to 4x4 = 16 tokens x 112 (cached in bench/results/cache).
2. Pretraining (cached by recipe): ``tiny`` on 8 phantom subjects' betas (standing for NSD's 40-session betas),
   each subject 480 trials (400 images of its own that the new subject never sees, 40 of them shown 3 times), one
   global batch of 32 split across them, 20 epochs. The betas are each subject's offline type-d GLM fit, noisy as
   NSD's are (``--pretrain-betas true``: the phantom's noiseless truth; ``--pretrain-subjects N``).
3. The new subject: 4 calibration runs and 8 real-time runs of 40 trials. The offline type-d GLM is fitted on the
   calibration runs only; the decoder's voxels are their most repeat-reliable 60 %. Training betas: that fit's
   z-scored betas (``--train-betas offline``, the issue's protocol) or the calibration runs replayed through the
   real-time estimator with that frozen fit (``realtime``). Test trials: real-time-run trials whose image was never
   shown in a calibration run (split by image), as the real-time estimator emits them (first estimate, last
   refined, end of run), plus the offline type-d fit of the real-time runs alone and the true betas (ceiling: the
   first method trained and tested on true betas).
4. Per seed, every method (``--methods``: low-rank adapters, head alone first, MindEye2's recipe, from scratch; a
   ridge regression onto the tokens as a reference without MindEye) gets the same CPU-time budget (``--budget-s``,
   1 thread; epochs planned from each method's measured CPU step time, up to 150), then is scored with
   ``rt_mindeye.eval.decoding``: top-1 brain -> image among the held-out images, both directions on one trial per
   image and on repeat-averaged betas, and the 2AFC against the most similar image. Mean and sd over seeds.
5. Timing: the measured CPU step time of ``tiny``, and for ``light`` on 750 trials (MindEye2's 1-hour fine-tune:
   batch 24, 150 epochs) a FLOP count per step and the projected H100 time (no GPU here).

Prints rich tables and writes ``bench/results/model_<tag>.json`` (``model_runs_<tag>.json`` keeps finished runs for
``--resume``) and ``bench/results/model_grid_<tag>.png`` (seen / retrieved / blurry for every k-th test trial). The
retrieval numbers are deterministic for a given seed and thread count; times depend on the machine.
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

from rt_mindeye.model.config import MindEyeConfig  # noqa: E402
from rt_mindeye.model.mindeye import MindEyeModule, build_model  # noqa: E402

RESULTS = REPO / "bench" / "results"
NEW_SUBJECT = 5  # phantom subject id of the new subject (the pretraining subjects are the others)
PRETRAIN_GLOBAL_BATCH = 32  # trials per pretraining step, split evenly across the subjects
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

#: Fine-tuning recipes compared at equal wall time (each gets the same budget; epochs are planned from its measured
#: step time, up to MindEye2's 150). Keys are what ``--methods`` takes.
METHODS = {
    "adapters": ("pretrained + low-rank adapters (shared parts frozen)", dict(adapter_rank=8, max_lr=3e-3)),
    "head_first": ("pretrained + fine-tuned, head alone for the first third", dict(head_only_pct=0.33, max_lr=1e-3)),
    "mindeye2": ("pretrained + fine-tuned, MindEye2's recipe (all parts from the start)", dict(max_lr=3e-4)),
    "scratch": ("from scratch, same data, same wall time", dict(max_lr=1e-3)),
    "ridge_tokens": ("reference: ridge regression from voxels to the image tokens (no MindEye)", None),
    "adapters_cf": ("pretrained + closed-form head, then low-rank adapters",
                    dict(adapter_rank=8, head_init="closed_form", max_lr=1e-3)),
    "head_cf": ("pretrained + closed-form head only (no gradient steps)", None),
}
DEFAULT_METHODS = ("adapters", "head_first", "mindeye2", "scratch", "ridge_tokens")
KINDS = ("early", "refined", "final", "offline")  # the test betas a model is scored on (plus "true" for the ceiling)
KIND_LABELS = {"early": "real-time, first estimate (5 volumes)", "refined": "real-time, last refined estimate",
               "final": "real-time, end of run", "offline": "offline type-d GLM of the live runs",
               "true": "phantom ground truth"}


def new_subject_config(args):
    """The new subject's session: calibration runs, then real-time runs whose repeated images are held out."""
    from rt_mindeye.phantom import phantom_config

    network = dict(driving_network=args.phantom_network, tuning_nonlinearity=args.nonlinearity)
    if args.preset == "realistic":
        # Its images come after the small subject's and the pretraining subjects' (the same pretrained model serves).
        small = new_subject_config(type(args)(**{**vars(args), "preset": "small"}))
        first = small.n_images + args.subjects * args.pretrain_runs * args.trials_per_run
        return phantom_config("realistic", stimulus_offset=first, **network)
    if args.quick:
        return phantom_config("small", n_runs=4, calibration_runs=2, trials_per_run=30, repeated_images=6,
                              test_repeated_images=6, repeats=2, **network)
    # 8 real-time runs: ~280 held-out images, so that one image is ~0.35 points of top-1 (with 4 runs and 122 images
    # one image was 0.8 points and the seed spread was mostly that counting noise).
    return phantom_config("small", n_runs=12, calibration_runs=4, trials_per_run=40, repeated_images=20,
                          test_repeated_images=15, **network)


def image_set(args, new_cfg):
    """Images of the small new subject (stimuli 0..n-1), of each pretraining subject (its own next block) and, for
    the realistic preset, of its new subject (the block after those): returns (images, pretraining offsets)."""
    from rt_mindeye.phantom.stimuli import render_all, stimulus_set

    small = new_cfg if new_cfg.stimulus_offset == 0 else new_subject_config(
        type(args)(**{**vars(args), "preset": "small"}))
    per_subject = args.pretrain_runs * args.trials_per_run
    offsets = [small.n_images + k * per_subject for k in range(args.subjects)]
    end = max(small.n_images + args.subjects * per_subject, new_cfg.stimulus_offset + new_cfg.n_images)
    return render_all(stimulus_set(end), new_cfg.image_size), offsets


def cached_targets(images: np.ndarray):
    """The decoder's targets of ``images`` (EfficientNet-Lite0 stage-5 tokens, blurry and auxiliary targets), cached
    under bench/results/cache by the images' content and the embedder's settings."""
    import hashlib

    from rt_mindeye.model.data import ImageTargets, image_targets
    from rt_mindeye.model.embedders import PhantomEmbedder

    digest = hashlib.sha1(images.tobytes() + repr((images.shape, PHANTOM_LAYER, PHANTOM_GRID)).encode()).hexdigest()
    path = RESULTS / "cache" / f"targets-lite0-{digest[:16]}.pt"
    if path.exists():
        data = torch.load(path, weights_only=True)
        return ImageTargets(tokens=data["tokens"], blurry=data["blurry"], aux=data["aux"])
    targets = image_targets(images, PhantomEmbedder(layer=PHANTOM_LAYER, grid=PHANTOM_GRID))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tokens": targets.tokens, "blurry": targets.blurry, "aux": targets.aux}, path)
    return targets


def pretrained_checkpoint(args, images, offsets, targets, console) -> tuple[Path, dict]:
    """The shared tiny model, pretrained on phantom subjects' true betas (standing for NSD's 40-session betas) of
    images the new subject never sees; cached under bench/results/cache by recipe."""
    import hashlib

    from rt_mindeye.convert.mindeye2 import save_container
    from rt_mindeye.model.data import phantom_subject_data
    from rt_mindeye.model.train import TrainConfig, pretrain, split_global_batch
    from rt_mindeye.phantom import phantom_config, simulate_session

    recipe = {"version": 4, "subjects": pretraining_subjects(args), "runs": args.pretrain_runs,
              "trials": args.trials_per_run, "offsets": offsets, "epochs": args.pretrain_epochs,
              "network": args.phantom_network, "nonlinearity": args.nonlinearity, "seed": args.seed,
              "targets": [PHANTOM_LAYER, PHANTOM_GRID], "threads": torch.get_num_threads(),
              "betas": args.pretrain_betas, "repeated_images": args.pretrain_repeated}
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = RESULTS / "cache" / f"pretrained-{key}.pth"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        console.print(f"reusing the pretrained model {path.relative_to(REPO)}")
        return path, json.loads(meta_path.read_text())
    datasets = []
    for subject, offset in zip(pretraining_subjects(args), offsets):
        cfg = phantom_config("small", n_runs=args.pretrain_runs, calibration_runs=0,
                             repeated_images=args.pretrain_repeated, trials_per_run=args.trials_per_run,
                             stimulus_offset=offset, driving_network=args.phantom_network,
                             tuning_nonlinearity=args.nonlinearity)
        session = simulate_session(cfg, subject=subject, seed=subject)
        if not np.array_equal(session.images, images[offset:offset + len(session.images)]):
            raise RuntimeError("phantom images differ between sessions: image indices would not match")
        shifted = _offset_targets(targets, offset, len(session.images))
        name = f"phantom{subject:02d}"
        if args.pretrain_betas == "true":
            data, _ = phantom_subject_data(session, range(session.n_runs), shifted, name=name)
        else:
            data = glm_subject_data(session, shifted, name)
        datasets.append(data)
    config = tiny_config([d.voxels.shape[1] for d in datasets], targets, tuple(d.name for d in datasets))
    torch.manual_seed(args.seed)
    settings = TrainConfig(epochs=args.pretrain_epochs, batch_size=split_global_batch(PRETRAIN_GLOBAL_BATCH,
                                                                                     args.subjects),
                           max_lr=1e-3, seed=args.seed)
    began = time.perf_counter()
    model = MindEyeModule(config)
    result = pretrain(model, datasets, settings, progress=not args.no_progress, log=console.print)
    meta = {"recipe": recipe, "seconds": time.perf_counter() - began, "epochs": result.epochs,
            "final_loss": result.history[-1].loss, "trials": [len(d) for d in datasets]}
    save_container(path, model)
    meta_path.write_text(json.dumps(meta, indent=2))
    return path, meta


def pretraining_subjects(args) -> list[int]:
    """Phantom subject ids of the pretraining subjects: 1, 2, ... skipping the new subject's id (5, fixed so that
    more pretraining subjects do not change the subject the methods are scored on)."""
    return [s for s in range(1, args.subjects + 2) if s != NEW_SUBJECT][:args.subjects]


def glm_subject_data(session, targets, name: str):
    """A pretraining subject's single-trial betas as NSD distributes them: the offline type-d GLM of all its runs
    (z-scored per voxel), not the phantom's noiseless truth, so the shared model learns from betas as noisy as the
    ones a new subject brings."""
    from rt_mindeye.glm.estimator import GLMSingle
    from rt_mindeye.model.data import identity_stats, subject_data, trial_arrays

    runs = range(session.n_runs)
    fit = GLMSingle(model="d").fit([session.visual_timeseries(r) for r in runs], session_events(session), session.tr)
    betas = fit.zscored_betas()
    _, image_index = trial_arrays(session, runs)
    return subject_data(betas, image_index, targets, identity_stats(betas.shape[1]), name=name)


def session_events(session) -> list:
    """Every run's events of a phantom session, one condition per stimulus file (as the GLM fits them)."""
    from rt_mindeye.glm.design import RunEvents

    return [RunEvents.from_records(session.events(r), condition_column="stim_file") for r in range(session.n_runs)]


def _offset_targets(targets, offset: int, n: int):
    from rt_mindeye.model.data import ImageTargets

    window = slice(offset, offset + n)
    return ImageTargets(tokens=targets.tokens[window], blurry=None if targets.blurry is None else targets.blurry[window],
                        aux=None if targets.aux is None else targets.aux[window])


def tiny_config(subject_voxels, targets, names=()):
    seq, dim = targets.tokens.shape[1:]
    return MindEyeConfig.preset("tiny", list(subject_voxels), subject_names=tuple(names), token_seq=int(seq),
                                token_dim=int(dim), prior_dim_head=PRIOR_DIM_HEAD,
                                prior_heads=int(dim) // PRIOR_DIM_HEAD, blurry_aux_dim=int(targets.aux.shape[-1]))


def new_subject_sets(session, targets, console, top_fraction: float = 0.6) -> dict:
    """Training and test betas of the new subject, as a session produces them.

    * train: the offline type-d GLM of the calibration runs only (the real-time runs never enter it), z-scored with
      its own statistics, on the decoder voxels (the calibration workflow's rule: the most repeat-reliable
      ``top_fraction`` of the visual voxels); or ("realtime") the calibration runs replayed through the real-time
      estimator with that frozen fit (first, last refined and end-of-run estimates of every calibration trial);
    * test: real-time runs' trials whose image was never shown in a calibration run, as the real-time GLM (frozen
      calibration) emits them: first ("early"), last refined and end-of-run estimates; plus the offline type-d GLM
      fitted on the real-time runs alone (the reference the real-time estimates are compared with; z-scored with its
      own statistics) and the phantom's true betas (a ceiling, z-scored with the calibration runs' statistics).
    """
    from rt_mindeye.calibration.workflow import realtime_replay
    from rt_mindeye.eval.decoding import assert_disjoint_images, ncsnr
    from rt_mindeye.glm.config import RealtimeConfig
    from rt_mindeye.glm.estimator import GLMSingle
    from rt_mindeye.glm.realtime import RealtimeGLM
    from rt_mindeye.model.data import trial_arrays
    from rt_mindeye.preprocess.masks import reliability, reliability_mask

    began = time.perf_counter()
    calib = list(session.calibration_runs)
    live = [r for r in range(session.n_runs) if r not in calib]
    runs = [session.visual_timeseries(r) for r in range(session.n_runs)]
    events = session_events(session)
    truth, image_ids = trial_arrays(session, range(session.n_runs))
    run_of = np.concatenate([[r] * len(session.trials(r)) for r in range(session.n_runs)])
    in_calib = np.isin(run_of, calib)
    cal_fit = GLMSingle(model="d").fit([runs[r] for r in calib], [events[r] for r in calib], session.tr)
    z_cal = cal_fit.zscored_betas()
    cal_ids = image_ids[in_calib]
    # The calibration runs replayed through the real-time estimator (the calibration workflow's default training set).
    replayed, replayed_trial = realtime_replay(cal_fit.calibration_, RealtimeConfig(), [runs[r] for r in calib],
                                               [events[r] for r in calib], None, session.tr)
    conditions = [str(i) for i in cal_ids]
    scores = reliability(z_cal, conditions)
    if np.isfinite(scores).any():
        voxels = reliability_mask(z_cal, conditions, top_n=max(1, int(round(top_fraction * z_cal.shape[1]))))
    else:
        voxels = np.ones(z_cal.shape[1], bool)

    estimates: dict[str, dict[int, np.ndarray]] = {"early": {}, "refined": {}, "final": {}}
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in events])])
    for r in live:
        rt = RealtimeGLM(cal_fit, RealtimeConfig()).start_run(events[r], session.tr, run=r,
                                                              n_volumes=runs[r].shape[0])
        for i, row in enumerate(runs[r]):
            for e in rt.add_volume(i, row):
                row_index = offsets[r] + e.trial
                if e.kind == "early":
                    estimates["early"].setdefault(row_index, e.betas)
                else:
                    estimates["refined"][row_index] = e.betas  # the last refined one wins
        for e in rt.end_run():
            estimates["final"][offsets[r] + e.trial] = e.betas
    live_rows = np.flatnonzero(~in_calib)
    live_fit = GLMSingle(model="d").fit([runs[r] for r in live], [events[r] for r in live], session.tr)
    offline = live_fit.zscored_betas()  # its own statistics, as an offline analysis z-scores a session
    glm_s = time.perf_counter() - began

    test = live_rows[~np.isin(image_ids[live_rows], cal_ids)]
    assert_disjoint_images(cal_ids, image_ids[test])
    position_in_live = {row: k for k, row in enumerate(live_rows)}
    true_mean, true_sd = truth[in_calib].mean(axis=0), truth[in_calib].std(axis=0)
    true_sd = np.where(true_sd > 1e-8, true_sd, 1.0)
    test_betas = {kind: np.stack([estimates[kind][row] for row in test])[:, voxels] for kind in estimates}
    test_betas["offline"] = offline[[position_in_live[row] for row in test]][:, voxels]
    test_betas["true"] = ((truth[test] - true_mean) / true_sd).astype(np.float32)[:, voxels]
    responsive = np.asarray(session.subject.responsive)
    true_cal_z = ((truth[in_calib] - true_mean) / true_sd).astype(np.float32)
    reliability_report = {
        "ncsnr_median_decoder_voxels_offline": float(np.nanmedian(ncsnr(z_cal[:, voxels], conditions))),
        "ncsnr_median_visual_offline": float(np.nanmedian(ncsnr(z_cal, conditions))),
        "ncsnr_median_responsive_offline": float(np.nanmedian(ncsnr(z_cal[:, responsive], conditions))),
        "ncsnr_median_decoder_voxels_true": float(np.nanmedian(ncsnr(true_cal_z[:, voxels], conditions))),
        "repeated_conditions_in_calibration": int(sum(np.sum(cal_ids == i) > 1 for i in np.unique(cal_ids))),
    }
    console.print(f"new subject: {len(voxels)} visual voxels, {int(voxels.sum())} decoder voxels; GLM fits and "
                  f"real-time estimates {glm_s:.0f} s; median single-trial ncsnr in the decoder voxels "
                  f"{reliability_report['ncsnr_median_decoder_voxels_offline']:.3f} (offline type d, calibration "
                  f"runs)")
    return {
        "train": {"offline": (z_cal[:, voxels], cal_ids), "realtime": (replayed[:, voxels], cal_ids[replayed_trial]),
                  "true": (true_cal_z[:, voxels], cal_ids)},
        "test_ids": image_ids[test], "test_betas": test_betas, "voxels": int(voxels.sum()),
        "visual_voxels": int(len(voxels)), "reliability": reliability_report, "glm_seconds": glm_s,
        "n_calibration_trials": int(in_calib.sum()), "n_live_trials": int(len(live_rows)),
    }


def train_method(method: str, checkpoint: Path, data, args, seed: int, console):
    """One fine-tune (or scratch training) within the shared wall-time budget; returns (model, seconds, epochs)."""
    from rt_mindeye.model.train import TrainConfig, Trainer, finetune, plan_epochs

    _, options = METHODS[method]
    began = time.perf_counter()
    if method in ("head_cf", "ridge_tokens"):
        model = closed_form_model(method, checkpoint, data, seed)
        seconds = time.perf_counter() - began
        console.print(f"seed {seed}: {method}: closed form in {seconds:.1f} s")
        return model, seconds, 0
    settings = TrainConfig(epochs=args.max_epochs, batch_size=16, seed=seed, **options)
    base = _checkpoint_config(checkpoint) if checkpoint else tiny_config([1], args.targets).to_dict()
    scratch_config = MindEyeConfig.from_dict({**base, "subject_voxels": [data.voxels.shape[1]], "subject_names": []})
    step_s = cpu_step_seconds(method, settings, checkpoint, scratch_config, data)
    steps_per_epoch = max(1, len(data) // settings.batch_size)
    epochs = plan_epochs(args.budget_s, step_s, steps_per_epoch, args.max_epochs)
    settings = TrainConfig(**{**settings.to_dict(), "epochs": epochs})
    cpu_began = time.process_time()
    if method == "scratch":
        torch.manual_seed(seed)
        model = MindEyeModule(scratch_config)
        result = Trainer(model, settings, progress=not args.no_progress).fit([data])
    else:
        model, result = finetune(checkpoint, data, settings, progress=not args.no_progress)
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    console.print(f"seed {seed}: {method}: {result.epochs} epochs ({step_s * 1000:.0f} ms CPU per step), "
                  f"{cpu:.0f} s CPU, {seconds:.0f} s wall")
    return model.eval(), cpu, result.epochs


def cpu_step_seconds(method: str, settings, checkpoint, scratch_config, data, repeats: int = 5) -> float:
    """Median CPU time of one training step (forward, backward, update) of ``method``'s model as it will train.

    Every method gets the same budget of *CPU* time (1 thread), so its epochs do not depend on what else the machine
    runs: on a quiet machine CPU time is wall time, on a shared one wall time would hand the budget to whichever
    method happened to be measured at a quiet moment."""
    from rt_mindeye.convert.mindeye2 import load_mindeye2
    from rt_mindeye.model.adapt import add_adapters
    from rt_mindeye.model.train import Trainer, parameter_groups

    torch.manual_seed(settings.seed)
    if method == "scratch":
        model = MindEyeModule(scratch_config)
    else:
        model = load_mindeye2(checkpoint, new_subject_voxels=data.voxels.shape[1], dtype=torch.float32).model
        if settings.adapter_rank:
            add_adapters(model, settings.adapter_rank)
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=1e-6)
    trainer = Trainer(model, settings, progress=False)
    batches = [trainer._batch(data, torch.arange(len(data)), 0)]
    times = []
    for _ in range(repeats + 1):
        began = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer._loss(batches, torch.device("cpu"), False, settings.soft_temp_start,
                                torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        times.append(time.process_time() - began)
    return float(np.median(times[1:]))


class _TokenRidge(torch.nn.Module):
    """The linear reference decoder: voxels -> flattened image tokens by ridge regression (GCV penalty)."""

    def __init__(self, weights, bias, shape):
        super().__init__()
        self.weights, self.bias, self.shape = weights, bias, shape

    def forward(self, voxels, subject=0):
        from rt_mindeye.model.mindeye import MindEyeOutput

        tokens = (voxels.float() @ self.weights + self.bias).reshape(len(voxels), *self.shape)
        return MindEyeOutput(tokens=tokens, clip_voxels=tokens)


def closed_form_model(method: str, checkpoint: Path, data, seed: int):
    from rt_mindeye.convert.mindeye2 import load_mindeye2
    from rt_mindeye.model.adapt import init_head_closed_form, ridge_fit

    if method == "ridge_tokens":
        weights, bias, _ = ridge_fit(data.voxels, data.image_tokens.flatten(1),
                                     alphas=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0))
        return _TokenRidge(weights, bias, tuple(data.image_tokens.shape[1:]))
    model = load_mindeye2(checkpoint, new_subject_voxels=data.voxels.shape[1], dtype=torch.float32, seed=seed).model
    init_head_closed_form(model, data.voxels, data.image_tokens, seed=seed)
    return model


def _checkpoint_config(path: Path) -> dict:
    from rt_mindeye.convert.mindeye2 import CONFIG_KEY

    return torch.load(path, map_location="cpu", weights_only=True)[CONFIG_KEY]


@torch.no_grad()
def score(model, betas: np.ndarray, image_ids: np.ndarray, targets) -> dict:
    from rt_mindeye.eval.decoding import decoding_report

    embed = lambda b: model(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)), 0).clip_voxels  # noqa: E731
    return decoding_report(embed, betas, image_ids, targets.tokens).as_dict()


def save_grid(path: Path, images: np.ndarray, model, betas: np.ndarray, image_ids: np.ndarray, targets,
              n: int = 8) -> Path:
    """Rows: seen image, top-1 retrieved image, blurry reconstruction (the tiny low-level head's 28x28 RGB) for every
    k-th held-out trial (k = trials // n), picked without looking at the result."""
    from PIL import Image

    from rt_mindeye.eval.decoding import cosine_matrix

    size = 96
    picks = np.arange(0, len(image_ids), max(1, len(image_ids) // n))[:n]
    candidates = np.unique(image_ids)
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(betas[picks], dtype=np.float32)), 0)
    retrieved = candidates[cosine_matrix(out.clip_voxels, targets.tokens[torch.from_numpy(candidates)])
                           .argmax(dim=1).numpy()]
    rows = [[images[image_ids[i]] for i in picks], [images[r] for r in retrieved]]
    if out.blurry_latent is not None:
        blurry = ((out.blurry_latent.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        rows.append(list(blurry))
    canvas = Image.new("RGB", (len(picks) * (size + 4) + 4, len(rows) * (size + 4) + 4), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((size, size), Image.BICUBIC)
            canvas.paste(tile, (4 + c * (size + 4), 4 + r * (size + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def run_phantom(args, console) -> dict:
    """Pretrain (cached), build the new subject's GLM betas, then per seed fine-tune every method within the same
    budget and score it on every kind of test betas. Progress is saved after each run (``--resume`` skips what is
    done)."""
    from rt_mindeye.model.data import identity_stats, subject_data
    from rt_mindeye.phantom import simulate_session

    new_cfg = new_subject_config(args)
    began = time.perf_counter()
    images, offsets = image_set(args, new_cfg)
    targets = args.targets = cached_targets(images)
    console.print(f"image targets for {len(images)} images: {time.perf_counter() - began:.1f} s")
    needs_pretraining = any(m not in ("ridge_tokens", "scratch") for m in args.methods)
    checkpoint, pre_meta = (pretrained_checkpoint(args, images, offsets, targets, console) if needs_pretraining
                            else (None, {"epochs": 0, "seconds": 0.0, "skipped": "no method needs it"}))

    session = simulate_session(new_cfg, subject=NEW_SUBJECT, seed=NEW_SUBJECT)
    first = new_cfg.stimulus_offset
    if not np.array_equal(session.images, images[first:first + len(session.images)]):
        raise RuntimeError("phantom images differ between sessions: image indices would not match")
    images, targets = images[first:first + len(session.images)], _offset_targets(targets, first, len(session.images))
    sets = new_subject_sets(session, targets, console)
    identity = identity_stats(sets["voxels"])  # the sets' betas are already z-scored
    train = subject_data(*sets["train"][args.train_betas], targets, identity, name="new")
    train_true = subject_data(*sets["train"]["true"], targets, identity, name="new")

    progress_path = RESULTS / f"model_runs_{args.tag}.json"
    runs = json.loads(progress_path.read_text()) if args.resume and progress_path.exists() else {}
    grid = None
    for seed in range(args.seed, args.seed + args.seeds):
        for method in args.methods + (["ceiling"] if args.ceiling else []):
            key = f"{method}/{seed}"
            if key in runs:
                continue
            if method == "ceiling":  # the default method trained and tested on the phantom's true betas
                model, seconds, epochs = train_method(args.methods[0], checkpoint, train_true, args, seed, console)
                scores = {"true": score(model, sets["test_betas"]["true"], sets["test_ids"], targets)}
            else:
                model, seconds, epochs = train_method(method, checkpoint, train, args, seed, console)
                scores = {kind: score(model, sets["test_betas"][kind], sets["test_ids"], targets) for kind in KINDS}
                if grid is None and method == args.methods[0]:
                    grid = save_grid(RESULTS / f"model_grid_{args.tag}.png", images, model,
                                     sets["test_betas"]["early"], sets["test_ids"], targets)
            runs[key] = {"method": method, "seed": seed, "seconds": seconds, "epochs": epochs, "scores": scores}
            line = ", ".join(f"{k} {v['top1']:.1%}" for k, v in scores.items())
            console.print(f"  top-1: {line}")
            progress_path.write_text(json.dumps(runs, indent=2))
    example = next(iter(runs.values()))["scores"]
    first = example.get("early") or example.get("true")
    return {
        "new_subject": {"preset": new_cfg.preset, "driving_network": new_cfg.driving_network,
                        "tuning_nonlinearity": new_cfg.tuning_nonlinearity,
                        "calibration_trials": sets["n_calibration_trials"], "live_trials": sets["n_live_trials"],
                        "test_trials": int(len(sets["test_ids"])), "candidates": first["n_candidates"],
                        "chance": first["chance"], "visual_voxels": sets["visual_voxels"],
                        "decoder_voxels": sets["voxels"], "reliability": sets["reliability"],
                        "glm_seconds": sets["glm_seconds"], "train_betas": args.train_betas,
                        "train_rows": len(train)},
        "pretrain": pre_meta, "budget_s": args.budget_s, "methods": {m: METHODS[m][0] for m in args.methods},
        "runs": runs, "grid_png": str(grid.relative_to(REPO)) if grid else None,
        "model": _checkpoint_config(checkpoint) if checkpoint else None,
    }


def summarise(phantom: dict) -> dict:
    """Mean and sample standard deviation over seeds of every score, per method and kind of betas."""
    table: dict = {}
    for run in phantom["runs"].values():
        for kind, scores in run["scores"].items():
            entry = table.setdefault(run["method"], {}).setdefault(kind, {})
            flat = {"top1": scores["top1"], "two_afc": scores["two_afc"], "top1_averaged": scores["top1_averaged"],
                    "single_brain_to_image": scores["single"]["brain_to_image"],
                    "single_image_to_brain": scores["single"]["image_to_brain"]}
            if scores["averaged"] is not None:
                flat.update(averaged_brain_to_image=scores["averaged"]["brain_to_image"],
                            averaged_image_to_brain=scores["averaged"]["image_to_brain"],
                            averaged_n_way=scores["averaged"]["n_way"])
            flat["single_n_way"] = scores["single"]["n_way"]
            for name, value in flat.items():
                entry.setdefault(name, []).append(value)
        table[run["method"]].setdefault("_seconds", []).append(run["seconds"])
        table[run["method"]].setdefault("_epochs", []).append(run["epochs"])
    out: dict = {}
    for method, kinds in table.items():
        out[method] = {}
        for kind, values in kinds.items():
            if kind.startswith("_"):
                out[method][kind[1:]] = _stats(values)
            else:
                out[method][kind] = {name: _stats(v) for name, v in values.items()}
    return out


def _stats(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0, "values": []}
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values), "values": [float(v) for v in values]}


# -- timing --------------------------------------------------------------------------------------------------------


def time_steps(config: MindEyeConfig, batch: int, repeats: int) -> list[float]:
    """CPU seconds of forward + backward + AdamW update for one subject's batch (random data)."""
    from rt_mindeye.model.train import SubjectData, TrainConfig, Trainer, parameter_groups

    torch.manual_seed(0)
    model = MindEyeModule(config)
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-2), lr=1e-4)
    trainer = Trainer(model, TrainConfig(batch_size=batch), progress=False)
    voxels = torch.randn(batch, config.subject_voxels[0])
    tokens = torch.randn(batch, config.token_seq, config.token_dim)
    blurry = torch.randn(batch, config.blurry_out_channels, config.blurry_size, config.blurry_size) \
        if config.blurry_recon else None
    aux = torch.randn(batch, config.blurry_grid ** 2, config.blurry_aux_dim) if config.blurry_recon else None
    batches = [trainer._batch(SubjectData(voxels, tokens, blurry, aux), torch.arange(batch), 0)]
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
    # Adapters (the calibration default): frozen weights need no weight gradients, so the backbone and prior cost a
    # forward and an input-gradient pass (2x) instead of 3x; the new ridge head still trains in full.
    forward = {k: v / 3.0 for k, v in per_step.items()}
    adapter_step = 3.0 * forward["ridge"] + 2.0 * (forward["backbone"] + forward["prior"])
    lo_a, hi_a = (adapter_step * steps / (H100_BF16_DENSE_TFLOPS * 1e12 * mfu) for mfu in reversed(ASSUMED_MFU))
    out["light_750_trials_adapters_projection"] = {"flops_per_step": adapter_step, "steps": steps,
                                                   "h100_minutes_range": [lo_a / 60, hi_a / 60]}
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


def _fmt(stat: dict, percent: bool = True) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    if percent:
        return f"{stat['mean']:.1%} ± {stat['sd']:.1%}"
    return f"{stat['mean']:.0f} ± {stat['sd']:.0f}"


def print_phantom(phantom: dict, summary: dict, console) -> None:
    from rich.table import Table

    chance = phantom["new_subject"]["chance"]
    title = (f"held-out top-1 (brain -> image among {phantom['new_subject']['candidates']} images, chance "
             f"{chance:.1%}); mean ± sd over seeds; every fine-tune gets {phantom['budget_s']:.0f} s of CPU time")
    table = Table(title=title)
    table.add_column("model")
    for kind in KINDS:
        table.add_column(KIND_LABELS[kind], justify="right")
    table.add_column("early / offline", justify="right")
    for method, label in phantom["methods"].items():
        row = summary.get(method, {})
        cells = [_fmt(row.get(kind, {}).get("top1")) for kind in KINDS]
        early, offline = row.get("early", {}).get("top1", {}), row.get("offline", {}).get("top1", {})
        ratio = early["mean"] / offline["mean"] if early and offline and offline.get("mean") else float("nan")
        table.add_row(label, *cells, f"{ratio:.2f}")
    if "ceiling" in summary:
        table.add_row("ceiling: " + phantom["methods"][next(iter(phantom["methods"]))] + ", true betas",
                      *["" for _ in KINDS[:-1]], _fmt(summary["ceiling"]["true"]["top1"]), "")
    console.print(table)

    default = next(iter(phantom["methods"]))
    detail = Table(title=f"{phantom['methods'][default]}: directions, repeat averaging and 2AFC (mean ± sd)")
    for column in ("betas", "single trial: brain -> image (the paper's text: image retrieval)",
                   "single trial: image -> brain", "repeats averaged: brain -> image (published 'brain' column)",
                   "repeats averaged: image -> brain (published 'image' column)", "averaged, among all",
                   "2AFC vs most similar"):
        detail.add_column(column, justify="right" if column != "betas" else "left")
    for kind in KINDS + ("true",):
        source = summary.get("ceiling" if kind == "true" else default, {}).get(kind)
        if not source:
            continue
        detail.add_row(KIND_LABELS[kind], _fmt(source["single_brain_to_image"]), _fmt(source["single_image_to_brain"]),
                       _fmt(source.get("averaged_brain_to_image")), _fmt(source.get("averaged_image_to_brain")),
                       _fmt(source.get("top1_averaged")), _fmt(source["two_afc"]))
    console.print(detail)
    times = Table(title="fine-tune time (tiny, CPU seconds of 1 thread; equals wall time on a quiet machine)")
    for column in ("model", "CPU seconds", "epochs"):
        times.add_column(column, justify="left" if column == "model" else "right")
    for method, label in phantom["methods"].items():
        if method in summary:
            times.add_row(label, _fmt(summary[method]["seconds"], False), _fmt(summary[method]["epochs"], False))
    console.print(times)
    rel = phantom["new_subject"]["reliability"]
    console.print(f"new subject: {phantom['new_subject']['decoder_voxels']} decoder voxels of "
                  f"{phantom['new_subject']['visual_voxels']}; single-trial ncsnr (offline type d, calibration "
                  f"runs): decoder voxels {rel['ncsnr_median_decoder_voxels_offline']:.3f}, all visual "
                  f"{rel['ncsnr_median_visual_offline']:.3f}; pretraining {phantom['pretrain']['epochs']} epochs "
                  f"({phantom['pretrain']['seconds']:.0f} s when it ran); grid: {phantom['grid_png']}")


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
    parser.add_argument("--preset", choices=("small", "realistic"), default="small", help="the new subject's phantom")
    parser.add_argument("--phantom-network", default="efficientnet-lite2",
                        choices=("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"),
                        help="network driving the phantom's voxels (lite0 = the decoder's own embedder: inflated)")
    parser.add_argument("--nonlinearity", choices=("rectified", "linear"), default="rectified")
    parser.add_argument("--train-betas", choices=("offline", "realtime"), default="offline",
                        help="fine-tune on the calibration runs' offline type-d betas, or on those runs replayed "
                             "through the real-time estimator (the calibration workflow's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=None, help="fine-tune seeds (default 3; --quick 1)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated fine-tune methods, the first is the default ({', '.join(METHODS)})")
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                        help="skip the true-beta ceiling row")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="CPU time of every fine-tune, 1 thread (default 90 s; epochs planned from each method's "
                             "measured CPU step time)")
    parser.add_argument("--max-epochs", type=int, default=150, help="epoch cap of a fine-tune (MindEye2: 150)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: deterministic numbers; on a shared, busy machine also fastest)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="pretraining epochs (default 20)")
    parser.add_argument("--pretrain-subjects", type=int, default=None, help="pretraining subjects (default 8)")
    parser.add_argument("--pretrain-betas", choices=("glm", "true"), default="glm",
                        help="pretrain on the pretraining subjects' offline type-d GLM betas (as NSD's are) or on "
                             "the phantom's noiseless true betas")
    parser.add_argument("--resume", action="store_true", help="keep finished (method, seed) runs of the same --tag")
    parser.add_argument("--tag", default=None, help="name of this run's result files (default from the options)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=180)
    if args.write_keys:
        console.print(f"wrote {write_key_list(REPO / 'docs' / 'mindeye2_keys.md')}")
        return 0
    quick = args.quick
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    args.subjects = args.pretrain_subjects or (2 if quick else 8)
    # NSD shows every image 3 times; a third of the pretraining trials here are repeats of 40 images (type d's
    # cross-validation needs repeated conditions).
    args.pretrain_repeated = (6 if quick else 40) if args.pretrain_betas == "glm" else 0
    args.seeds = args.seeds or (1 if quick else 3)
    args.pretrain_runs = 4 if quick else 12
    args.trials_per_run = 30 if quick else 40
    args.pretrain_epochs = args.pretrain_epochs or (3 if quick else 20)
    args.budget_s = args.budget_s if args.budget_s is not None else (10.0 if quick else 90.0)
    if args.tag is None:
        short = args.phantom_network.replace("efficientnet-", "")
        args.tag = f"{args.preset}-{short}-{args.nonlinearity}-{args.train_betas}" + ("-quick" if quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)

    results: dict = {"quick": quick, "torch_threads": torch.get_num_threads(), "tag": args.tag}
    tiny = None
    if not args.timing_only:
        phantom = run_phantom(args, console)
        results["phantom"] = phantom
        results["summary"] = summarise(phantom)
        tiny = MindEyeConfig.from_dict(phantom["model"]) if phantom["model"] else None
        print_phantom(phantom, results["summary"], console)
    if tiny is None:
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
    pa = timing["light_750_trials_adapters_projection"]
    t.add_row(f"light with adapters (calibration default), projected H100",
              f"{pa['h100_minutes_range'][0]:.1f}-{pa['h100_minutes_range'][1]:.1f} min")
    if "light_cpu_step_batch4" in timing:
        s = timing["light_cpu_step_batch4"]
        t.add_row("light, CPU step, batch 4 (measured)", f"{s['seconds']:.1f} s ({s['achieved_gflops']:.0f} GFLOP/s)")
    console.print(t)
    out = RESULTS / f"model_{args.tag}.json"
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
