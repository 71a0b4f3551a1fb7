"""`rt-mindeye preflight`: the operator's check before the subject goes in.

Every check returns a :class:`Check` (name, status, detail, fix); none raises. The command prints them as a
pass/fail table and exits non-zero when any check fails (warnings do not fail).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rt_mindeye.errors import RtMindEyeError

PASS, WARN, FAIL = "pass", "warn", "fail"
MIN_FREE_GB = 5.0
CLOCK_TOLERANCE_S = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _guard(name: str, fn: Callable[[], Check], fix: str) -> Check:
    try:
        return fn()
    except RtMindEyeError as exc:
        return Check(name, FAIL, str(exc), fix)
    except (OSError, ValueError, RuntimeError) as exc:
        return Check(name, FAIL, f"{type(exc).__name__}: {exc}", fix)


def check_config(path: Path):
    from rt_mindeye.runtime.config import load_session_config

    try:
        config = load_session_config(path)
    except RtMindEyeError as exc:
        return None, Check("configuration", FAIL, str(exc), "correct the named key in the YAML file")
    return config, Check("configuration", PASS, f"{path} is valid")


def check_bundle(config) -> list[Check]:
    from rt_mindeye.calibration.bundle import CalibrationBundle

    checks = []

    def bundle() -> Check:
        b = CalibrationBundle.open(config.session.bundle)
        b.check(subject=config.session.subject, volume=None)
        return Check("calibration bundle", PASS, f"subject {b.info.subject}, {b.info.n_voxels} voxels, grid "
                                                  f"{tuple(b.info.shape)}, made {b.info.created}")

    checks.append(_guard("calibration bundle", bundle, "run `rt-mindeye calibrate SESSION_DIR` for this subject"))

    def model() -> Check:
        from rt_mindeye.convert.mindeye2 import check_checkpoint

        b = CalibrationBundle.open(config.session.bundle)
        paths = b.model_checkpoints()
        for path in paths:  # every ensemble member: raises CheckpointKeyError naming the one that does not fit
            report = check_checkpoint(path, None)
        total = report.parameters.get("total", sum(report.parameters.values()))
        members = f", {len(paths)} ensemble members" if len(paths) > 1 else ""
        return Check("decoder checkpoint", PASS, f"{paths[0]} loads ({total:,} parameters{members})")

    checks.append(_guard("decoder checkpoint", model, "re-run `rt-mindeye calibrate`"))
    return checks


def check_accelerator(config) -> list[Check]:
    import torch

    from rt_mindeye.decode import accel

    wants_gpu = config.decoder.device not in ("cpu", "auto")
    if torch.cuda.is_available():
        gpu = Check("GPU", PASS, torch.cuda.get_device_name(0))
    else:
        gpu = Check("GPU", FAIL if wants_gpu else WARN, "no CUDA device: the decoder runs on the CPU (retrieval and "
                                                        "blurry images only at real-time speed)",
                    "run the decoder on the GPU host (transport.decoder_host)" if wants_gpu else "")
    trt = Check("torch-tensorrt", PASS if accel.available() else WARN,
                "available" if accel.available() else "not installed: reconstruction uses plain torch",
                "" if accel.available() else "pip install 'rt-mindeye[trt]' on the GPU host")
    return [gpu, trt]


def check_reconstruction(config) -> Check:
    """``decoder.unclip_checkpoint``: readable, an unCLIP checkpoint, and conditioned on the bundle model's tokens."""
    from rt_mindeye.runtime.decoder import check_unclip_fits, inspect_unclip_checkpoint

    path = config.decoder.unclip_checkpoint
    if path is None:
        return Check("unCLIP checkpoint", PASS, "not configured: retrieval and blurry images only")
    if not config.decoder.decode.reconstruct:
        return Check("unCLIP checkpoint", WARN, f"{path} is set but decoder.decode.reconstruct is off: not loaded")
    info = inspect_unclip_checkpoint(path)  # raises UnclipCheckpointError naming the file
    try:
        from rt_mindeye.calibration.bundle import CalibrationBundle
        from rt_mindeye.convert.mindeye2 import check_checkpoint

        model = check_checkpoint(CalibrationBundle.open(config.session.bundle).model_dir / "last.pth", None).config
    except RtMindEyeError:  # the bundle checks above report it; the file itself is readable
        return Check("unCLIP checkpoint", WARN, f"{path} reads ({info.n_keys} keys) but the bundle's model could not "
                                                "be read to check the token width")
    check_unclip_fits(info, int(model.token_dim), bool(model.use_prior))
    return Check("unCLIP checkpoint", PASS, f"{path}: {info.n_keys} keys, cross-attention on the model's "
                                            f"{info.cross_attention_dim}-d prior tokens")


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def check_ports(config) -> list[Check]:
    t = config.transport
    out = []
    names = ["trials", "scanner_pub", "scanner_snapshot", "stimulus", "decoder_pub", "decoder_snapshot",
             "decoder_status", "scanner_control"]
    if config.decoder.feedback.enabled:
        names.append("feedback")
    for name in names:
        port = int(t.bind_endpoint(name).rsplit(":", 1)[1])
        free = _port_free(t.bind_host, port)
        out.append(Check(f"port {name} ({port})", PASS if free else FAIL,
                         "free" if free else f"{t.bind_host}:{port} is in use",
                         "" if free else "stop the other session, or set transport.port_* to free ports"))
    return out


def check_disk(config) -> Check:
    target = Path(config.session.dir)
    probe = target
    while not probe.exists():
        probe = probe.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    status = PASS if free_gb >= MIN_FREE_GB else FAIL
    return Check("session disk", status, f"{free_gb:.1f} GB free at {probe}",
                 "" if status == PASS else f"free at least {MIN_FREE_GB:.0f} GB or move session.dir")


def check_watch_folder(config) -> Check:
    folder = Path(config.session.watch_dir)
    if not folder.is_dir():
        return Check("watch folder", FAIL, f"{folder} does not exist or is not mounted",
                     "mount the scanner share / create the folder, or fix session.watch_dir")
    probe = folder / f".rt-mindeye-preflight-{os.getpid()}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        return Check("watch folder", WARN, f"{folder} is visible but not writable ({exc.strerror})",
                     "fine for a read-only share; the emulator needs write access")
    return Check("watch folder", PASS, f"{folder} visible and writable")


def check_clock(config) -> Check:
    """The newest DICOM in the watch folder was acquired in the past, and recently if it is fresh."""
    from rt_mindeye.ingest.dicom import read_volume
    from rt_mindeye.timing import volume_epoch

    folder = Path(config.session.watch_dir)
    files = sorted((p for p in folder.glob("*.dcm")), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not files:
        return Check("scanner clock", WARN, "no DICOM in the watch folder yet: clock offset unknown",
                     "re-run preflight after the localizer/first export, or check NTP on both hosts")
    newest = files[-1]
    volume = read_volume(newest)
    acquired = volume_epoch(volume)
    if acquired is None:
        return Check("scanner clock", WARN, f"{newest.name} has no AcquisitionTime")
    written = newest.stat().st_mtime
    offset = written - acquired
    if offset < -CLOCK_TOLERANCE_S:
        return Check("scanner clock", FAIL, f"{newest.name} was written {-offset:.1f} s before it was acquired: "
                                            "the clocks are out of step", "synchronise both hosts with NTP")
    return Check("scanner clock", PASS, f"file written {offset:.1f} s after acquisition ({newest.name})")


def run_preflight(config_path: str | Path) -> list[Check]:
    config, first = check_config(Path(config_path))
    checks = [first]
    if config is None:
        return checks
    checks.extend(check_bundle(config))
    checks.extend(check_accelerator(config))
    checks.append(_guard("unCLIP checkpoint", lambda: check_reconstruction(config),
                         "set decoder.unclip_checkpoint to MindEye2's unclip6_epoch0_step110000.ckpt, or null for "
                         "retrieval and blurry images only"))
    checks.extend(check_ports(config))
    checks.append(_guard("session disk", lambda: check_disk(config), "fix session.dir"))
    checks.append(_guard("watch folder", lambda: check_watch_folder(config), "fix session.watch_dir"))
    checks.append(_guard("scanner clock", lambda: check_clock(config), "check NTP on both hosts"))
    return checks


def render(checks: list[Check]):
    from rich.table import Table

    colour = {PASS: "green", WARN: "yellow", FAIL: "bold red"}
    table = Table(title=f"rt-mindeye preflight ({time.strftime('%H:%M:%S')})")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column)
    for c in checks:
        table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail, c.fix)
    return table
