"""`rt-mindeye demo`: the whole system on the phantom, on one machine.

1. simulate a phantom subject's session and write it as real Siemens mosaic DICOMs;
2. the shared tiny MindEye2 model pretrained on other phantom subjects who saw other images: shipped with the
   package (made beforehand with the same recipe), or pretrained in-session when asked or when the phantom differs;
3. calibrate on the session's first runs (offline GLM, reliability mask, fine-tune within a time budget);
4. run the remaining runs live: the scanner emulator writes them into an export folder at an accelerated TR, the
   scanner host and the decoder run as separate processes linked by ZeroMQ, the console follows them;
5. summarise: retrieval accuracy against chance (first real-time estimates; the same model on the offline type-d
   betas of the live runs; repeats averaged; real-time MindEye's 2AFC), a latency table, a PNG grid of seen /
   retrieved / blurry images for every k-th trial, and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from rt_mindeye.errors import SessionError
from rt_mindeye.timing import percentiles

PRETRAIN_SUBJECTS = (2, 3, 4)
PRETRAIN_RUNS = 8  # x 40 trials: 320 images per pretraining subject, none of them seen by the demo subject
PRETRAIN_TRIALS_PER_RUN = 40
#: The shared model's architecture: the tiny preset with these fields replaced.
SHARED_MODEL: dict = {}
#: The pretraining's settings besides its time budget and seed.
PRETRAIN_TRAIN: dict = dict(epochs=150, global_batch=32, max_lr=1e-3)
#: The shared model shipped with the package, pretrained beforehand with the demo's recipe by
#: ``python calibration/demo_shared_model.py`` (as a real session starts from MindEye2's published weights instead
#: of pretraining at the scanner); its JSON beside it holds the recipe, epochs and seed.
SHIPPED_SHARED_MODEL = Path(__file__).resolve().parents[1] / "data" / "demo_shared_model.pth"
#: The in-session pretraining's budget when the shipped model does not fit the demo (other phantom settings).
IN_SESSION_PRETRAIN_MIN = 2.0
#: The demo's fine-tune settings that differ from the calibration default (docs/model.md, the demo's decoding).
DEMO_FINETUNE: dict = {}
#: The demo decodes with an ensemble of four fine-tunes sharing its budget (``calibration.ensemble_members``): on the
#: scoring harness (three demo sessions, four fine-tune seeds; docs/model.md, "Motion regressors and an ensemble")
#: four members of 18 epochs took the first real-time estimate's mean top-1 from 5.1 % (one member) to 7.6 % and the
#: offline reference from 5.7 to 7.3 %, and cut the spread between fine-tune seeds, which decided whether a run met
#: its targets. (Before the calibration stopped using motion regressors, an ensemble raised only the offline betas.)
DEMO_ENSEMBLE_MEMBERS = 4
DEMO_SUBJECT = 1
#: The phantom's events name every trial's ``trial_type`` "image"; the stimulus file identifies repeats.
CONDITION_COLUMN = "stim_file"
#: How long the console may take, after both services are terminated, to see their goodbye heartbeats.
CONSOLE_GOODBYE_S = 10.0


@dataclass(frozen=True)
class DemoOptions:
    out: Path
    speed: float = 8.0
    #: None: the shipped shared model when it was made for the demo's recipe, else an in-session pretraining of
    #: :data:`IN_SESSION_PRETRAIN_MIN`; a number: pretrain in-session within that many minutes.
    pretrain_budget_min: float | None = None
    finetune_budget_min: float = 2.5
    seed: int = 1
    live_console: bool | None = None  # None: live view when stdout is a terminal
    phantom_overrides: tuple[tuple[str, object], ...] = ()
    quick: bool = False  # toy sizes: see quick_options


# --- `rt-mindeye demo --quick` ---------------------------------------------------------------------------------------

#: The quick demo's phantom: 3 runs of 12 trials (2 for calibration, 1 live), 200 visual voxels.
QUICK_PHANTOM = (("n_runs", 3), ("calibration_runs", 2), ("trials_per_run", 12), ("repeated_images", 6),
                 ("test_repeated_images", 0),
                 ("repeats", 2), ("rest_end_s", 9.0), ("visual_voxels", 200))


def quick_options(options: DemoOptions) -> DemoOptions:
    """Every step of the demo, every process and the closed loop, at toy sizes: a smoke run in well under a minute
    (tests, a first look on a new machine). The shared model is not pretrained (an untrained tiny model of the right
    shapes) and is fine-tuned for seconds: its retrieval figures mean nothing."""
    return dataclasses.replace(options, quick=True, speed=max(options.speed, 20.0), pretrain_budget_min=0.0,
                               finetune_budget_min=0.05, phantom_overrides=QUICK_PHANTOM + options.phantom_overrides)


def _untrained_shared_model(model_dir: Path, options: DemoOptions, console) -> Path:
    """The quick demo's shared model: the tiny architecture at the phantom embedder's shapes, not trained."""
    import torch

    from rt_mindeye.convert.mindeye2 import save_container
    from rt_mindeye.model.config import MindEyeConfig, tiny_fields_for
    from rt_mindeye.model.data import image_targets
    from rt_mindeye.model.embedders import PhantomEmbedder
    from rt_mindeye.model.mindeye import MindEyeModule

    torch.manual_seed(options.seed)
    shapes = image_targets(np.zeros((1, 64, 64, 3), dtype=np.uint8), PhantomEmbedder())  # target shapes only
    seq, dim = shapes.tokens.shape[1:]
    fields = dict(token_seq=int(seq), token_dim=int(dim), **tiny_fields_for(int(dim), shapes.blurry, shapes.aux))
    config = MindEyeConfig.preset("tiny", [64], subject_names=("untrained",), **fields)
    checkpoint = save_container(model_dir / "last.pth", MindEyeModule(config))
    console.print("--quick: an untrained shared model (no pretraining)")
    return checkpoint


#: The demo's session: 6 calibration and 4 real-time runs of 32 trials (192 calibration trials; 128 live trials, so
#: one trial is under 1 %; with 6 live runs the offline type-d reference, fitted on the live runs alone, gained more
#: from the extra runs than the first estimates did), a visual mask of ~5,200 voxels in the small geometry (about
#: 3,100 decoder voxels after the reliability selection: decoding improves with voxels far more than with anything
#: else the demo can afford; a ridge map from the ~1,000 decoder voxels of a 2,000-voxel mask reached 2-5 % top-1
#: among the 268 candidates, from ~3,100 about twice that), 16 images repeated across the session (for the
#: calibration's reliability mask) and 10 repeated only in the real-time runs (scored repeat-averaged).
DEMO_SESSION = dict(n_runs=10, calibration_runs=6, trials_per_run=32, repeated_images=16, test_repeated_images=10,
                    repeats=3, visual_voxels=6000)


def demo_phantom_config(**overrides):
    """The demo's phantom: the small geometry (32 x 32 x 16 at 4 mm) with the session of :data:`DEMO_SESSION`."""
    from rt_mindeye.phantom.config import phantom_config

    fields = dict(DEMO_SESSION)
    fields.update(overrides)
    return phantom_config("small", **fields)


class Step:
    """Prints a numbered step and its duration."""

    def __init__(self, console):
        self.console = console
        self.times: dict[str, float] = {}
        self.n = 0

    def __call__(self, name: str):
        step = self

        class _Ctx:
            def __enter__(self):
                step.n += 1
                step.console.rule(f"[bold]{step.n}. {name}")
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                step.times[name] = time.perf_counter() - self.t0
                if exc[0] is None:
                    step.console.print(f"[green]done[/] in {step.times[name]:.1f} s")

        return _Ctx()


def run_demo(options: DemoOptions) -> dict:
    from rich.console import Console

    console = Console()
    step = Step(console)
    out = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    phantom_dir = out / "phantom"
    cfg = demo_phantom_config(**dict(options.phantom_overrides))

    with step("phantom session (simulated subject, real DICOM files)"):
        session = _make_phantom(cfg, phantom_dir, options.seed, console)
    live_runs = [r for r in range(session.n_runs) if r not in session.calibration_runs]

    with step("shared model: tiny MindEye2 pretrained on other phantom subjects"):
        pretrained = _pretrain(cfg, out / "shared_model", options, console)

    with step(f"calibration on runs 1-{len(session.calibration_runs)}"):
        bundle_dir = out / "bundle"
        result = _calibrate(session, phantom_dir, bundle_dir, pretrained, options, console)

    with step(f"live runs {live_runs[0] + 1}-{live_runs[-1] + 1} through the scanner host, decoder and console"):
        config_path = _write_session_config(out, phantom_dir, bundle_dir, session, len(live_runs))
        live = _run_live(config_path, out, phantom_dir, session, live_runs, options, console)

    with step("summary"):
        summary = summarise(out / "session", session, live_runs, phantom_dir, calibration=result, live=live,
                            step_seconds=step.times)
        add_feedback_summary(summary, out)
        summary.update(evaluate_live(bundle_dir, out / "session", phantom_dir, live_runs))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        grid = make_grid(out / "session", phantom_dir, out / "grid.png")
        if grid:
            summary["grid_png"] = str(grid)
        print_summary(summary, console)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# --- steps ----------------------------------------------------------------------------------------------------------


def _make_phantom(cfg, phantom_dir: Path, seed: int, console):
    from rt_mindeye.phantom.export import write_session
    from rt_mindeye.phantom.session import simulate_session

    session = simulate_session(cfg, subject=DEMO_SUBJECT, seed=seed)
    manifest = phantom_dir / "session.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("seed") == seed:
        console.print(f"reusing {phantom_dir}")
    else:
        write_session(session, phantom_dir)
    console.print(f"subject {DEMO_SUBJECT}: {session.n_runs} runs x {cfg.trials_per_run} trials, TR {session.tr} s, "
                  f"{session.shape} voxels, {len(session.calibration_runs)} calibration runs")
    return session


def pretrain_recipe(cfg) -> dict:
    """What the shared model depends on besides its training's length and seed: the pretraining subjects and their
    images (after the demo session's own), the architecture, the training settings and the phantom's response model.
    Raise ``version`` when the phantom's simulation changes in a way these fields do not show: the shipped model
    (:data:`SHIPPED_SHARED_MODEL`) and cached in-session ones then stop matching and are made again."""
    return {"version": 4, "subjects": list(PRETRAIN_SUBJECTS), "runs": PRETRAIN_RUNS,
            "trials_per_run": PRETRAIN_TRIALS_PER_RUN, "first_stimulus": cfg.n_images, "model": SHARED_MODEL,
            "train": PRETRAIN_TRAIN, "phantom": {
                k: list(v) if isinstance(v, tuple) else v for k, v in
                ((k, getattr(cfg, k)) for k in ("driving_network", "tuning_nonlinearity", "trial_variability",
                                                "visual_voxels", "matrix"))}}


def shipped_shared_model(cfg) -> Path | None:
    """The shipped shared model when it was pretrained with the recipe ``cfg`` needs, else None."""
    return SHIPPED_SHARED_MODEL if _shipped_info(cfg) is not None else None


def _shipped_info(cfg) -> dict | None:
    """The shipped shared model's JSON (recipe, epochs, seed) when it fits ``cfg``'s recipe, else None."""
    path = SHIPPED_SHARED_MODEL.with_suffix(".json")
    if not (SHIPPED_SHARED_MODEL.is_file() and path.is_file()):
        return None
    info = json.loads(path.read_text())
    return info if info.get("recipe") == pretrain_recipe(cfg) else None


def _pretrain(cfg, model_dir: Path, options: DemoOptions, console) -> Path:
    """The shared model, pretrained on other phantom subjects who each saw their own images: the shipped one (made
    beforehand with the same recipe) unless ``options.pretrain_budget_min`` asks for an in-session pretraining or
    the demo's phantom differs from the recipe.

    As in NSD, pretraining subjects see images that the demo subject never sees (stimuli after the session's own),
    so what the shared model learns must generalise to new images, which is what the live runs need. An in-session
    checkpoint is reused by later demos while the recipe is unchanged.
    """
    if options.quick:
        return _untrained_shared_model(model_dir / "quick", options, console)
    checkpoint = model_dir / "last.pth"
    budget = options.pretrain_budget_min
    if budget is None:
        info = _shipped_info(cfg)
        if info is not None:
            model_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SHIPPED_SHARED_MODEL, checkpoint)
            (model_dir / "recipe.json").write_text(json.dumps(info))
            console.print(f"the shipped shared model ({SHIPPED_SHARED_MODEL.name}: pretrained on subjects "
                          f"{PRETRAIN_SUBJECTS}, {info['epochs']} epochs; --pretrain-minutes M pretrains in-session "
                          f"instead)")
            return checkpoint
        budget = IN_SESSION_PRETRAIN_MIN
        console.print(f"the shipped shared model was made for another phantom or model: pretraining in-session "
                      f"({budget:g} min)")
    recipe = {**pretrain_recipe(cfg), "seed": options.seed, "budget_min": budget}
    recipe_path = model_dir / "recipe.json"
    if checkpoint.exists() and recipe_path.exists() and json.loads(recipe_path.read_text()) == recipe:
        console.print(f"reusing {checkpoint}")
        return checkpoint
    result = pretrain_shared_model(cfg, checkpoint, seed=options.seed, budget_min=budget, log=console.print)
    recipe_path.write_text(json.dumps(recipe))
    console.print(f"pretrained on subjects {PRETRAIN_SUBJECTS} ({result.epochs} epochs)")
    return checkpoint


def pretrain_shared_model(cfg, checkpoint: Path, *, seed: int, budget_min: float = 0.0, epochs: int | None = None,
                          log=print):
    """Pretrain the shared tiny model on :data:`PRETRAIN_SUBJECTS` (each with its own images) and write it to
    ``checkpoint``: within ``budget_min`` minutes, or for exactly ``epochs`` epochs when the budget is 0."""
    from rt_mindeye.model.config import MindEyeConfig, tiny_fields_for
    from rt_mindeye.model.data import image_targets, phantom_subject_data
    from rt_mindeye.model.embedders import PhantomEmbedder
    from rt_mindeye.model.mindeye import MindEyeModule
    from rt_mindeye.model.train import TrainConfig, pretrain, split_global_batch
    from rt_mindeye.phantom.session import simulate_session

    datasets = []
    per_subject = PRETRAIN_RUNS * PRETRAIN_TRIALS_PER_RUN
    for k, subject in enumerate(PRETRAIN_SUBJECTS):
        other_cfg = dataclasses.replace(cfg, n_runs=PRETRAIN_RUNS, calibration_runs=0, repeated_images=0,
                                        test_repeated_images=0, trials_per_run=PRETRAIN_TRIALS_PER_RUN,
                                        stimulus_offset=cfg.stimulus_offset + cfg.n_images + k * per_subject)
        other = simulate_session(other_cfg, subject=subject, seed=100 + subject)
        targets = image_targets(other.images, PhantomEmbedder())
        data, _ = phantom_subject_data(other, range(other.n_runs), targets, name=f"phantom{subject:02d}")
        datasets.append(data)
    seq, dim = datasets[0].image_tokens.shape[1:]
    fields = dict(token_seq=int(seq), token_dim=int(dim))
    fields.update(tiny_fields_for(int(dim), datasets[0].blurry_targets, datasets[0].aux_targets))
    fields.update(SHARED_MODEL)
    model_config = MindEyeConfig.preset("tiny", [d.voxels.shape[1] for d in datasets],
                                        subject_names=tuple(d.name for d in datasets), **fields)
    # One checkpoint at the end (checkpoint_every = epochs): the shared model with three subjects' heads and its
    # optimiser state is ~35 MB, and writing it every epoch cost a noticeable part of the budget.
    settings = dict(PRETRAIN_TRAIN)
    if epochs is not None:
        settings["epochs"] = int(epochs)
    batch = split_global_batch(settings.pop("global_batch"), len(datasets))
    train = TrainConfig(batch_size=batch, time_budget_min=budget_min, seed=seed,
                        checkpoint_every=settings["epochs"], **settings)
    return pretrain(MindEyeModule(model_config), datasets, train, checkpoint_path=checkpoint, progress=False, log=log)


def write_shipped_shared_model(path: Path, *, epochs: int, seed: int, log=print) -> Path:
    """Pretrain the shared model for ``epochs`` with the demo's recipe and write what the package ships: the
    weights in float16 (fine-tuning loads them in float32; the optimiser state is left out) and, beside them, a JSON
    with the recipe, the epochs and the seed."""
    import tempfile

    import torch

    from rt_mindeye.convert.mindeye2 import load_mindeye2, save_container

    cfg = demo_phantom_config()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = pretrain_shared_model(cfg, Path(tmp) / "last.pth", seed=seed, epochs=epochs, log=log)
        seconds = time.perf_counter() - started
        model = load_mindeye2(result.checkpoint, dtype=torch.float16).model
    save_container(path, model, epoch=result.epochs)
    path.with_suffix(".json").write_text(json.dumps(
        {"recipe": pretrain_recipe(cfg), "epochs": result.epochs, "seed": seed,
         "seconds": round(seconds, 1), "made_by": f"python calibration/demo_shared_model.py --epochs {epochs} "
                                                  f"--seed {seed}"}, indent=1) + "\n")
    return path


def _calibrate(session, phantom_dir: Path, bundle_dir: Path, pretrained: Path, options: DemoOptions, console):
    from rt_mindeye.calibration.config import CalibrationConfig
    from rt_mindeye.calibration.workflow import calibrate

    # The calibration workflow's own fine-tune settings (adapters, epochs), with the demo's budget, seed and
    # DEMO_FINETUNE.
    train = dataclasses.replace(CalibrationConfig().train, time_budget_min=options.finetune_budget_min,
                                seed=options.seed, **DEMO_FINETUNE)
    config = CalibrationConfig(
        subject=f"phantom{DEMO_SUBJECT:02d}", calibration_runs=len(session.calibration_runs),
        events_dir=phantom_dir / "events", stimuli_dir=phantom_dir / "stimuli", condition_column=CONDITION_COLUMN,
        anatomical_mask=phantom_dir / "truth" / "visual_mask.nii.gz", pretrained=pretrained,
        ensemble_members=1 if options.quick else DEMO_ENSEMBLE_MEMBERS, train=train)
    return calibrate(phantom_dir, bundle_dir, config, dicom_dir=phantom_dir / "dicom", session_id="demo",
                     progress=console.print)


def _write_session_config(out: Path, phantom_dir: Path, bundle_dir: Path, session, n_live: int) -> Path:
    config = {
        "session": {"id": "demo", "subject": f"phantom{DEMO_SUBJECT:02d}", "dir": "session", "watch_dir": "export",
                    "bundle": os.path.relpath(bundle_dir, out), "events_dir": os.path.relpath(phantom_dir / "events", out),
                    "stimuli_dir": os.path.relpath(phantom_dir / "stimuli", out),
                    "first_live_run": len(session.calibration_runs) + 1, "live_runs": n_live, "min_free_gb": 0.5,
                    "run_end_timeout_s": 3.0},
        "watcher": {"gap_timeout_tr": 2.0, "existing_files": "process"},
        "transport": {"journal_fsync": False, **demo_ports()},
        "decoder": {"device": "cpu", "idle_timeout_s": 0.0, "average_repeats": True},
    }
    path = out / "session.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def demo_ports() -> dict[str, int]:
    """The transport's ports for the demo: none (the documented defaults) when all are free on loopback, else ports
    the system hands out, so a second demo, or a demo beside a running session, does not stop on "Address already
    in use". (A port taken between this check and the services' bind still fails that way, naming the port.)"""
    import socket

    from rt_mindeye.transport.config import TransportConfig

    names = [f.name for f in dataclasses.fields(TransportConfig) if f.name.startswith("port_")]
    defaults = TransportConfig()

    def free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    if all(free(getattr(defaults, name)) for name in names):
        return {}
    probes = []
    try:
        for _ in names:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            probe.bind(("127.0.0.1", 0))
        return {name: probe.getsockname()[1] for name, probe in zip(names, probes)}
    finally:
        for probe in probes:
            probe.close()


def _run_live(config_path: Path, out: Path, phantom_dir: Path, session, live_runs: list[int],
              options: DemoOptions, console) -> dict:
    from rt_mindeye.replay.emulator import ScannerEmulator
    from rt_mindeye.runtime.config import load_session_config
    from rt_mindeye.runtime.launcher import spawn, terminate
    from rt_mindeye.runtime.services import run_console

    config = load_session_config(config_path)
    if config.session.dir.exists():  # a new demo session: the previous one's record would mix into the summary
        shutil.rmtree(config.session.dir)
    export = out / "export"
    if export.exists():
        for stale in export.iterdir():
            stale.unlink()
    export.mkdir(parents=True, exist_ok=True)
    logs = out / "session" / "logs"
    scanner = spawn("scanner", config_path, logs)
    decoder = spawn("decoder", config_path, logs)
    live_series = {session.runs[r].series_number for r in live_runs}
    files = [p for p in sorted((phantom_dir / "dicom").iterdir())
             if config.watcher.parse_name(p.name) and config.watcher.parse_name(p.name)[0] in live_series]
    emulator = ScannerEmulator(files, export, tr=session.tr, speed=options.speed, seed=options.seed,
                               restamp_acquisition=True)
    stimulus_pc = _stimulus_computer(config, phantom_dir, session, live_runs, options)
    stop_console = threading.Event()
    services_ended = threading.Event()
    console_state = {}

    def follow():
        # Once both services are terminated the console leaves by itself when it has seen each one go (a goodbye
        # heartbeat shows as "stopped"), so the operator's last view says how the session ended.
        console_state["state"] = run_console(
            config, stop_console, headless=not _live_view(options),
            until=lambda state: services_ended.is_set() and bool(state.peers)
            and not any(peer.alive for peer in state.peers))

    viewer = threading.Thread(target=follow, daemon=True)
    viewer.start()
    t0 = time.time()
    try:
        # The scanner starts sending when the services are up, as an operator starts the run after preflight.
        _wait_for_log(out / "session" / "logs" / "scanner.log", "scanner host watching", scanner, 120)
        _wait_for_log(out / "session" / "logs" / "decoder.log", "decoder ready", decoder, 120)
        emulator.run(on_progress=stimulus_pc.on_volume)
        deadline = time.time() + 120 + 3 * len(files) * session.tr / options.speed
        while scanner.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        if scanner.poll() is None:
            raise SessionError(out / "session", "the scanner host did not finish the live runs in time (see "
                                                "session/logs/scanner.log)")
        _wait_decoder_drained(out / "session", decoder, timeout_s=60)
        stimulus_pc.wait_feedback(set(stimulus_pc.expected_trials()), timeout_s=10)
    finally:
        _close_stimulus_computer(stimulus_pc, out)
        terminate((scanner, decoder))
        services_ended.set()
        viewer.join(timeout=CONSOLE_GOODBYE_S)
        stop_console.set()
        viewer.join(timeout=10)
    return {"seconds": time.time() - t0, "scanner_rc": scanner.returncode, "decoder_rc": decoder.returncode,
            "volumes_sent": len(emulator.sent)}


# --- the stimulus computer (closed loop) ------------------------------------------------------------------------------

STIMULUS_PC_RECORD = "stimulus_pc.jsonl"


def _stimulus_computer(config, phantom_dir: Path, session, live_runs: list[int], options: DemoOptions):
    """The demo's stimulus computer: reports each live trial through the stimulus API as it is shown and receives
    the decoder's feedback (what a PsychoPy experiment does with StimulusClient)."""
    from rt_mindeye.runtime.stimulus_player import StimulusPlayer

    t = config.transport
    first = config.session.first_live_run
    runs = {session.runs[r].series_number: first + i for i, r in enumerate(live_runs)}
    feedback = t.connect_endpoint("feedback") if config.decoder.feedback.enabled else None
    return StimulusPlayer(t.connect_endpoint("stimulus"), feedback, session=config.session.id,
                          events_dir=phantom_dir / "events", runs=runs, tr=session.tr, speed=options.speed,
                          heartbeat_interval_s=t.heartbeat_interval_s)


def _close_stimulus_computer(player, out: Path) -> None:
    """Stop the stimulus computer and write what it received (``stimulus_pc.jsonl``, one line per feedback)."""
    player.close(timeout_s=1.0)
    expected = player.expected_trials()
    with (out / STIMULUS_PC_RECORD).open("w") as f:
        f.write(json.dumps({"expected_trials": expected, "events_sent": len(player.sent)}) + "\n")
        for item in player.feedback:
            f.write(json.dumps({"seq": item.seq, "run": item.run, "trial": item.trial, "status": item.status,
                                "kind": item.estimate_kind, "averaged": item.averaged, "top1": (item.topk_labels or
                                                                                              [None])[0],
                                "score": item.score, "acquisition_time": item.acquisition_time,
                                "received_at": item.received_at, "latency_s": item.latency_s}) + "\n")


def add_feedback_summary(summary: dict, out: Path) -> dict:
    """``latency_s.feedback`` (acquisition of a trial's last needed volume -> the stimulus computer received its
    feedback) and ``feedback``: per-trial accounting, with the recorded reason for every trial without feedback."""
    from rt_mindeye.runtime.layout import SessionLayout

    path = out / STIMULUS_PC_RECORD
    if not path.exists():
        return summary
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    head, received = lines[0], lines[1:]
    summary.setdefault("latency_s", {})["feedback"] = percentiles(r["latency_s"] for r in received)
    layout = SessionLayout(out / "session")
    decided = {(r["run"], r["trial"]): r for r in layout.read_jsonl(layout.feedback_jsonl)}
    decoded = {(r["run"], r["trial"]) for r in layout.read_decoder_results() if "event" not in r}
    got = {(r["run"], r["trial"]) for r in received}
    missing = []
    for run, trial in (tuple(k) for k in head["expected_trials"]):
        if (run, trial) in got:
            continue
        record = decided.get((run, trial))
        if record is not None and not record.get("sent", True):
            reason = record.get("reason", "not sent")
        elif record is not None:
            reason = f"sent (seq {record.get('seq')}) but not received by the stimulus computer"
        elif (run, trial) in decoded:
            reason = "decoded, but no estimate of the kind decoder.feedback.estimate asks for"
        else:
            reason = "no estimate of this trial reached the decoder"
        missing.append({"run": run, "trial": trial, "reason": reason})
    summary["feedback"] = {
        "trials": len(head["expected_trials"]), "received": len(got), "duplicates": len(received) - len(got),
        "on_time": sum(r["status"] == "on_time" for r in received), "late": sum(r["status"] == "late" for r in received),
        "events_sent": head["events_sent"], "missing": missing}
    return summary


def _live_view(options: DemoOptions) -> bool:
    return sys.stdout.isatty() if options.live_console is None else options.live_console


def _wait_for_log(path: Path, text: str, process, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        if process.poll() is not None:
            raise SessionError(path, f"the service exited (status {process.returncode}) before it was ready")
        time.sleep(0.2)
    raise SessionError(path, f"the service was not ready within {timeout_s:.0f} s")


def _wait_decoder_drained(session_dir: Path, decoder, timeout_s: float) -> None:
    """Wait until the decoder has recorded a result for every journaled trial estimate."""
    from rt_mindeye.transport.journal import read_journal

    journal = session_dir / "derivatives" / "rt-mindeye" / "betas" / "trials.journal"
    sent = sum(1 for m in read_journal(journal) if hasattr(m, "betas")) if journal.exists() else 0
    deadline = time.time() + timeout_s
    while time.time() < deadline and decoder.poll() is None:
        done = len(_estimate_rows(session_dir))
        if done >= sent:
            return
        time.sleep(0.2)


# --- summary --------------------------------------------------------------------------------------------------------


def _estimate_rows(session_dir: Path) -> list[dict]:
    """One row per trial estimate the decoder received (reconstruction events are extra rows, left out)."""
    from rt_mindeye.runtime.layout import SessionLayout

    return [r for r in SessionLayout(session_dir).read_decoder_results() if "event" not in r]


def read_results(session_dir: Path) -> list[dict]:
    """The decoder's retrieval results (estimates it superseded by a newer one of the same trial are left out)."""
    rows = _estimate_rows(session_dir)
    return [r for r in rows if "superseded_by" not in r]


def summarise(session_dir: Path, session, live_runs: list[int], phantom_dir: Path, *, calibration=None, live=None,
              step_seconds=None) -> dict:
    results = read_results(session_dir)
    n_candidates = len(list((phantom_dir / "stimuli").glob("*.png")))
    total = sum(len(session.trials(r)) for r in live_runs)
    by_kind: dict[str, list[bool]] = {}
    first_result: dict[tuple, dict] = {}
    for rec in results:
        hit = bool(rec["topk"]) and Path(rec["stim_file"] or "").name == rec["topk"][0]
        by_kind.setdefault(rec["kind"], []).append(hit)
        key = (rec["run"], rec["trial"])
        if key not in first_result:
            first_result[key] = rec
    firsts = list(first_result.values())
    first_hits = [bool(r["topk"]) and Path(r["stim_file"] or "").name == r["topk"][0] for r in firsts]
    timings_path = session_dir / "derivatives" / "rt-mindeye" / "timings.jsonl"
    volume_rows = [json.loads(line) for line in timings_path.open()] if timings_path.exists() else []
    latency = {
        "volume_processed": percentiles(r["done"] - r["acquired"] for r in volume_rows),
        "volume_motion_ms": percentiles(r.get("motion") for r in volume_rows),
        "volume_glm_ms": percentiles(r.get("glm") for r in volume_rows),
        "first_estimate_retrieval": percentiles(r["retrieval_done_at"] - r["acquisition_time"] for r in firsts),
        "retrieval_all_estimates": percentiles(r["retrieval_done_at"] - r["acquisition_time"] for r in results),
        "decoder_ms": percentiles(r["stage_ms"].get("total_ms") for r in results),
    }
    summary = {
        "trials_total": total,
        "trials_decoded": len(first_result),
        "estimates_decoded": len(results),
        "retrieval_top1": float(np.mean(first_hits)) if first_hits else 0.0,
        "retrieval_top1_by_estimate": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        "retrieval_chance": 1.0 / n_candidates if n_candidates else None,
        "candidates": n_candidates,
        "latency_s": {k: v for k, v in latency.items() if not k.endswith("_ms")},
        "latency_ms": {k: v for k, v in latency.items() if k.endswith("_ms")},
        "seconds": step_seconds or {},
    }
    if calibration is not None:
        summary["calibration"] = {"decoder_voxels": calibration.n_decoder_voxels,
                                  "holdout_top1": calibration.holdout_top1,
                                  "reliability_median": calibration.reliability_median}
    if live is not None:
        summary["live"] = live
    return summary


def first_estimates(session_dir: Path) -> list:
    """The first real-time estimate of every live trial, from the scanner host's journal, in trial order."""
    from rt_mindeye.runtime.layout import SessionLayout
    from rt_mindeye.transport.journal import read_journal
    from rt_mindeye.transport.messages import TrialBetas

    journal = SessionLayout(session_dir).betas_dir / "trials.journal"
    first: dict[tuple[int, int], TrialBetas] = {}
    if journal.exists():
        for message in read_journal(journal):
            if isinstance(message, TrialBetas):
                first.setdefault((message.run, message.trial), message)
    return [first[key] for key in sorted(first)]


def evaluate_live(bundle_dir: Path, session_dir: Path, phantom_dir: Path, live_runs: list[int]) -> dict:
    """Scores beyond the decoder's own top-1, with the bundle's model: its top-1 on the offline type-d betas of the
    live runs (fitted on those runs alone), on the first estimates averaged over each image's repeats in the live runs,
    and real-time MindEye's 2AFC (seen image against its most similar candidate) on the first estimates."""
    from rt_mindeye.calibration.bundle import CalibrationBundle
    from rt_mindeye.calibration.workflow import list_stimuli, offline_betas
    from rt_mindeye.eval.decoding import average_by_image, top1_among_candidates, two_afc_hardest
    from rt_mindeye.runtime.decoder import BundleModel
    from rt_mindeye.runtime.layout import SessionLayout

    bundle = CalibrationBundle.open(bundle_dir)
    model = BundleModel(bundle)
    candidates = bundle.candidates()
    tokens, ids = candidates["tokens"], candidates["ids"]
    index_of = {str(name): int(i) for name, i in zip(candidates["files"], ids)}
    firsts = [m for m in first_estimates(session_dir) if m.stim_file and Path(m.stim_file).name in index_of]
    out = {"retrieval_top1_offline": None, "retrieval_top1_averaged": None, "two_afc": None,
           "averaged_images": 0}
    if firsts:
        seen = np.array([index_of[Path(m.stim_file).name] for m in firsts])
        betas = np.stack([m.betas for m in firsts])
        out["two_afc"] = two_afc_hardest(model(betas)[0], seen, tokens, ids)
        repeated = np.array([np.sum(seen == i) > 1 for i in seen])
        if repeated.any():
            averaged, avg_ids = average_by_image(betas[repeated], seen[repeated])
            out["retrieval_top1_averaged"] = top1_among_candidates(model(averaged)[0], avg_ids, tokens, ids)
            out["averaged_images"] = int(len(avg_ids))
    # The decoder's own repeat averages (decoder.average_repeats): the last average of each image, decoded live.
    last_average: dict[str, dict] = {}
    for rec in SessionLayout(session_dir).read_decoder_results():
        if rec.get("event") == "averaged" and rec.get("stim_file"):
            last_average[Path(rec["stim_file"]).name] = rec
    if last_average:
        out["retrieval_top1_averaged_live"] = float(np.mean(
            [bool(r["topk"]) and r["topk"][0] == name for name, r in last_average.items()]))
    stimuli = list_stimuli(phantom_dir / "stimuli")
    # offline_betas takes the condition column the calibration recorded in the bundle (CONDITION_COLUMN).
    live_betas, live_ids = offline_betas(bundle, phantom_dir / "dicom", phantom_dir / "events",
                                         [r + 1 for r in live_runs], stimuli)
    names = np.array([p.name for p in stimuli])
    live_seen = np.array([index_of[n] for n in names[live_ids]])
    out["retrieval_top1_offline"] = top1_among_candidates(model(live_betas)[0], live_seen, tokens, ids)
    return out


def make_grid(session_dir: Path, phantom_dir: Path, path: Path, rows: int = 8) -> Path | None:
    """seen | top-1 retrieved | blurry reconstruction of the first real-time estimate, for every k-th live trial
    (k = trials // rows): the rows are picked by position, never by how well they decoded."""
    from PIL import Image, ImageDraw

    firsts: dict[tuple, dict] = {}
    for rec in read_results(session_dir):
        firsts.setdefault((rec["run"], rec["trial"]), rec)
    results = [firsts[key] for key in sorted(firsts)]
    if not results:
        return None
    cell = 112
    picked = results[::max(1, len(results) // rows)][:rows]
    grid = Image.new("RGB", (3 * cell, len(picked) * cell + 16), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(("seen", "retrieved (top-1)", "reconstructed (blurry)")):
        draw.text((j * cell + 4, 2), title, fill="black")
    for i, rec in enumerate(picked):
        tiles = [phantom_dir / "stimuli" / Path(rec["stim_file"] or "").name,
                 phantom_dir / "stimuli" / rec["topk"][0] if rec["topk"] else None,
                 Path(rec["recon"]) if rec.get("recon") else None]
        for j, tile in enumerate(tiles):
            if tile is not None and Path(tile).is_file():
                grid.paste(Image.open(tile).convert("RGB").resize((cell, cell)), (j * cell, 16 + i * cell))
    grid.save(path)
    return path


def print_summary(summary: dict, console) -> None:
    from rich.table import Table

    table = Table(title="rt-mindeye demo", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("trials decoded / total", f"{summary['trials_decoded']} / {summary['trials_total']}")
    chance = summary["retrieval_chance"] or 0.0
    table.add_row("top-1 retrieval (first real-time estimate)", f"{summary['retrieval_top1']:.1%} (chance {chance:.1%})")
    for kind, value in summary["retrieval_top1_by_estimate"].items():
        table.add_row(f"  top-1, {kind} estimates", f"{value:.1%}")
    for key, label in (("retrieval_top1_offline", "top-1, same model on offline type-d betas of the live runs"),
                       ("retrieval_top1_averaged", "top-1, first estimates averaged over repeats"),
                       ("two_afc", "2AFC, seen vs most similar image (first estimates)")):
        if summary.get(key) is not None:
            table.add_row(label, f"{summary[key]:.1%}")
    for name, stats in summary["latency_s"].items():
        if stats["n"]:
            table.add_row(f"latency {name} (s) p50 / p99", f"{stats['p50']:.3f} / {stats['p99']:.3f}")
    if "feedback" in summary:
        fb = summary["feedback"]
        table.add_row("feedback received by the stimulus computer / trials",
                      f"{fb['received']} / {fb['trials']} ({fb['late']} late, {fb['duplicates']} duplicates)")
    for name, stats in summary["latency_ms"].items():
        if stats["n"]:
            table.add_row(f"{name} p50 / p99", f"{stats['p50']:.1f} / {stats['p99']:.1f}")
    console.print(table)
