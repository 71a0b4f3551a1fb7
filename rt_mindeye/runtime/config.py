"""The session configuration: one YAML file, one validated section per stage.

Every service reads the same file and takes only its own sections, so the scanner host, the GPU host and the
console can be three machines with the same file (the ``transport`` section says where each one is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rt_mindeye.calibration.config import CalibrationConfig
from rt_mindeye.config import from_mapping, read_yaml, setting
from rt_mindeye.console.config import ConsoleConfig
from rt_mindeye.decode.config import DecodeConfig
from rt_mindeye.glm.config import GLMConfig
from rt_mindeye.ingest.config import WatcherConfig
from rt_mindeye.preprocess.config import MotionConfig
from rt_mindeye.transport.config import TransportConfig


@dataclass(frozen=True)
class SessionSection:
    id: str = setting("session", "session id carried by every message and record")
    subject: str = setting("sub-01", "subject label; the calibration bundle must be for this subject")
    dir: Path = setting(Path("runs/session"), "session record folder (BIDS-derivatives-like layout)")
    watch_dir: Path = setting(Path("runs/export"), "the scanner's real-time export folder (share)")
    bundle: Path = setting(Path("runs/bundle"), "calibration bundle made by `rt-mindeye calibrate`")
    events_dir: Path | None = setting(None, "planned BIDS events run-XX_events.tsv, XX = run ordinal in the "
                                            "session; null: every trial comes live from the stimulus computer "
                                            "(needs events.live auto)")
    stimuli_dir: Path | None = setting(None, "folder of the stimulus images (gallery, retrieval thumbnails)")
    first_live_run: int = setting(1, "ordinal of the first run the scanner host analyses (runs before it are "
                                     "calibration runs already in the bundle)", min=1)
    live_runs: int = setting(0, "the scanner host stops after this many live runs have ended (0: until stopped)",
                             min=0)
    run_end_timeout_s: float = setting(15.0, "a run ends (final estimates, next run may start) when no volume has "
                                             "arrived for this long; a new series number also ends it", min=0.1)
    idle_timeout_s: float = setting(0.0, "the scanner host stops after this long without a new volume once a run "
                                         "has ended (0: never)", min=0.0)
    min_free_gb: float = setting(2.0, "warn on the console when the session disk has less free space than this",
                                 min=0.0)


FEEDBACK_ESTIMATES = ("first", "early", "refined", "final")
FEEDBACK_IMAGES = ("none", "blurry", "reconstruction")
FEEDBACK_LATE = ("show", "placeholder", "skip")


@dataclass(frozen=True)
class FeedbackConfig:
    """What the decoder sends back to the stimulus computer for each trial (the closed loop, docs/operator-guide.md)."""

    enabled: bool = setting(True, "send each trial's result to the stimulus computer "
                                  "(transport.port_feedback; journalled in decoder/feedback.journal)")
    estimate: str = setting("first", "which estimate of a trial is fed back: 'first' (whichever comes first), or "
                                     "the first of that kind ('early', 'refined'; a trial that never gets one is fed "
                                     "back from its 'final' estimate)", choices=FEEDBACK_ESTIMATES)
    averaged: bool = setting(False, "feed back the repeat-averaged result when the trial's image was seen before "
                                    "(needs decoder.average_repeats)")
    image: str = setting("blurry", "the image sent: 'none', 'blurry' (the retrieval result's low-level image, "
                                   "fast) or 'reconstruction' (wait for the unCLIP reconstruction; needs "
                                   "decoder.unclip_checkpoint, else 'blurry')", choices=FEEDBACK_IMAGES)
    image_bytes: bool = setting(True, "also send the image's PNG bytes (a stimulus computer cannot read the "
                                      "decoder host's path)")
    top_k: int = setting(5, "retrieved images sent, best first", min=1, max=100)
    deadline_s: float = setting(1.0, "a result ready later than this after the acquisition of the estimate's last "
                                     "volume is late", min=0.0)
    late: str = setting("show", "what a late result becomes: 'show' (sent, marked late), 'placeholder' (a late "
                                "notice without the result: the stimulus computer shows late_text) or 'skip' "
                                "(nothing sent; recorded in decoder/feedback.jsonl)", choices=FEEDBACK_LATE)
    late_text: str = setting("no result in time", "text of a late notice (late: placeholder)")


@dataclass(frozen=True)
class EventsSection:
    live: str = setting("auto", "'auto': the scanner host listens for the stimulus computer (transport.port_stimulus) "
                                "and a run it reports on is analysed with the reported onsets (planned trials not "
                                "reported yet keep their planned onsets; trials shown but not planned are added; "
                                "planned trials not shown are dropped); 'off': the planned events only, the port is "
                                "not opened", choices=("auto", "off"))
    onset_tolerance_s: float = setting(0.5, "a reported onset further than this from the planned one is logged and "
                                            "shown on the console as a disagreement (it is used either way)",
                                       min=0.0)


@dataclass(frozen=True)
class DecoderSection:
    device: str = setting("auto", "'auto' (cuda when present), 'cpu' or 'cuda:N'")
    decode: DecodeConfig = field(default_factory=DecodeConfig, metadata={"doc": "retrieval and reconstruction"})
    unclip_checkpoint: Path | None = setting(None, "SDXL-unCLIP checkpoint (generative-models .ckpt, e.g. MindEye2's "
                                                   "unclip6_epoch0_step110000.ckpt) for full reconstructions, run by "
                                                   "one worker under transport.recon_policy; null: retrieval and "
                                                   "blurry images only")
    blurry_vae: Path | None = setting(None, "SD VAE weights (diffusers AutoencoderKL state dict, MindEye2's "
                                            "sd_image_var_autoenc.pth) that decode the full model's 4-channel blurry "
                                            "latent for the console; null: no blurry image for such a model")
    recon_stop_timeout_s: float = setting(30.0, "on shutdown, wait this long for the reconstruction in progress "
                                                "(trials still waiting are recorded as skipped)", min=0.0)
    idle_timeout_s: float = setting(0.0, "stop after this long without a trial once the scanner host has said "
                                         "the session ended (0: never); waiting reconstructions are done first",
                                    min=0.0)
    average_repeats: bool = setting(False, "also decode each repeated image's average over its trials so far in the "
                                           "session (as real-time MindEye does); results marked averaged")
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig,
                                     metadata={"doc": "closed loop: results back to the stimulus computer"})


@dataclass(frozen=True)
class SessionConfig:
    session: SessionSection = field(default_factory=SessionSection, metadata={"doc": "what and where"})
    events: EventsSection = field(default_factory=EventsSection,
                                  metadata={"doc": "live stimulus events against the planned events"})
    watcher: WatcherConfig = field(default_factory=WatcherConfig, metadata={"doc": "the export-folder watcher"})
    motion: MotionConfig = field(default_factory=MotionConfig, metadata={"doc": "real-time motion correction"})
    glm: GLMConfig = field(default_factory=GLMConfig, metadata={"doc": "single-trial GLM (realtime section live)"})
    transport: TransportConfig = field(default_factory=TransportConfig, metadata={"doc": "ZeroMQ endpoints"})
    decoder: DecoderSection = field(default_factory=DecoderSection, metadata={"doc": "the decoder service"})
    console: ConsoleConfig = field(default_factory=ConsoleConfig, metadata={"doc": "the operator console"})
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig,
                                           metadata={"doc": "`rt-mindeye calibrate`"})


def load_session_config(path: str | Path) -> SessionConfig:
    """Read and validate a session YAML; relative paths in it are relative to the YAML file's folder."""
    path = Path(path)
    return resolve_paths(from_mapping(SessionConfig, read_yaml(path), source=path), path.resolve().parent)


def resolve_paths(config: SessionConfig, base: Path) -> SessionConfig:
    import dataclasses

    def fix(obj):
        if dataclasses.is_dataclass(obj):
            changes = {}
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if isinstance(value, Path) and not value.is_absolute():
                    changes[f.name] = base / value
                elif dataclasses.is_dataclass(value):
                    changes[f.name] = fix(value)
            return dataclasses.replace(obj, **changes) if changes else obj
        return obj

    return fix(config)
