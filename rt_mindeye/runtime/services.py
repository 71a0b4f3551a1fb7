"""The three long-running services: scanner host, decoder, console.

Each ``run_*`` function runs one service in the calling process until its stop condition (or ``stop``, a
:class:`threading.Event`, is set) and reads only its own sections of the :class:`SessionConfig`, so each can run on
its own host. ``services/*.py`` are their process entry points and ``rt-mindeye session`` starts all three.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.config import to_mapping
from rt_mindeye.errors import SessionError
from rt_mindeye.runtime.config import SessionConfig
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.transport.messages import Heartbeat, TrialBetas

log = logging.getLogger("rt_mindeye.services")

POLL_S = 0.1
MAX_BATCH = 64
NO_BETAS = np.zeros(0, dtype=np.float32)
ACK_DRAIN_S = 10.0
STATE_SESSION_DONE = "session-done"


def setup_logging(layout: SessionLayout, service: str, level: int = logging.INFO) -> None:
    layout.logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(layout.logs_dir / f"{service}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("rt_mindeye")
    root.setLevel(level)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == handler.baseFilename for h in root.handlers):
        root.addHandler(handler)


def save_resolved_config(config: SessionConfig, layout: SessionLayout) -> None:
    import yaml

    layout.config_yaml.write_text(yaml.safe_dump(to_mapping(config), sort_keys=False))


# --- scanner host ---------------------------------------------------------------------------------------------------


class EventsPlanner:
    """Run plans from the planned BIDS events files (``run-XX_events.tsv``, XX = run ordinal in the session)."""

    def __init__(self, events_dir: Path, first_live_run: int):
        self.events_dir = Path(events_dir)
        self.first_live_run = first_live_run

    def __call__(self, series: int, ordinal: int):
        from rt_mindeye.calibration.workflow import find_events, read_event_rows
        from rt_mindeye.glm.design import RunEvents
        from rt_mindeye.runtime.scanner import RunPlan

        run = self.first_live_run + ordinal - 1
        path = find_events(self.events_dir, run)
        rows = read_event_rows(path)
        events = RunEvents.from_tsv(path)
        # RunEvents sorts by onset; keep the stimulus files in the same order.
        order = np.argsort([float(r["onset"]) for r in rows], kind="stable")
        stim = tuple(str(rows[i].get("stim_file") or "") for i in order)
        return RunPlan(run=run, events=events, stim_files=stim)


def _send_all(messages, sender, publisher, decoder_index: np.ndarray) -> int:
    """Journal and send trial estimates (restricted to the decoder's voxels), publish everything; count trials."""
    trials = 0
    for msg in messages:
        if isinstance(msg, TrialBetas):
            msg = replace(msg, betas=np.ascontiguousarray(msg.betas[decoder_index]))
            sender.send(msg)  # journaled before it is sent
            trials += 1
            # The console needs to know the estimate exists, not its betas: keep its snapshot history small.
            msg = replace(msg, betas=NO_BETAS)
        publisher.publish(msg)
    return trials


def _align_session_start(config: SessionConfig, bundle: CalibrationBundle) -> bool:
    """Whether the first live volume gets the careful reference alignment (motion.align_session_start)."""
    mode = config.motion.align_session_start
    return mode == "always" or (mode == "auto" and bundle.info.session != config.session.id)


def run_scanner(config: SessionConfig, stop: threading.Event | None = None) -> dict:
    """Watch the export folder, correct motion, estimate betas, journal and send them. Returns a summary."""
    from rt_mindeye.glm.estimator import GLMCalibration
    from rt_mindeye.glm.realtime import RealtimeGLM
    from rt_mindeye.ingest.series import RunEnded, VolumeReady
    from rt_mindeye.ingest.watcher import FolderWatcher
    from rt_mindeye.preprocess.motion import MotionCorrector
    from rt_mindeye.runtime.scanner import ScannerPipeline
    from rt_mindeye.transport.channel import ReliableSender
    from rt_mindeye.transport.config import server_security
    from rt_mindeye.transport.pubsub import SnapshotPublisher

    stop = stop or threading.Event()
    s = config.session
    layout = SessionLayout(s.dir).create()
    setup_logging(layout, "scanner")
    save_resolved_config(config, layout)
    if s.events_dir is None:
        raise SessionError(None, "session.events_dir: the real-time GLM needs the run's planned events file")
    bundle = CalibrationBundle.open(s.bundle)
    bundle.check(subject=s.subject, volume=None)
    calibration = GLMCalibration.load(bundle.glm_dir)
    decoder_index = bundle.decoder_index()
    glm_mask = bundle.glm_mask()
    pipeline = ScannerPipeline(reference=bundle.reference(), mask=glm_mask,
                               glm=RealtimeGLM(calibration, config.glm), motion=MotionCorrector(config.motion),
                               planner=EventsPlanner(s.events_dir, s.first_live_run), session=s.id,
                               first_volume=config.watcher.first_volume, motion_dir=layout.derivatives / "motion",
                               align_session_start=_align_session_start(config, bundle))
    t = config.transport
    sender = ReliableSender(t.bind_endpoint("trials"), layout.betas_dir / "trials.journal", session=s.id,
                            service="scanner", server_security=server_security(t, "scanner"),
                            fsync=t.journal_fsync, heartbeat_interval_s=t.heartbeat_interval_s,
                            heartbeat_liveness=t.heartbeat_liveness, send_hwm=t.send_hwm)
    publisher = SnapshotPublisher(t.bind_endpoint("scanner_pub"), t.bind_endpoint("scanner_snapshot"), session=s.id,
                                  service="scanner", server_security=server_security(t, "scanner"),
                                  heartbeat_interval_s=t.heartbeat_interval_s)
    watcher = FolderWatcher(s.watch_dir, replace(config.watcher, record_dir=layout.root), clock=time.time)
    runs_ended = 0
    trials_sent = 0
    volumes = 0
    checked_geometry = False
    last_activity = time.time()
    timings = layout.timings_jsonl.open("a")
    low_disk_warned = False
    try:
        log.info("warm-up (motion-correction kernels) took %.1f s", pipeline.warm_up())
        watcher.start()
        log.info("scanner host watching %s", s.watch_dir)
        while not stop.is_set():
            event = watcher.get(timeout=POLL_S)
            now = time.time()
            if event is None:
                if pipeline.run_active and now - last_activity > s.run_end_timeout_s:
                    log.info("no volume for %.1f s: the run has ended", s.run_end_timeout_s)
                    _send_all(pipeline.end_current_run(), sender, publisher, decoder_index)
                    runs_ended += 1
                    if s.live_runs and runs_ended >= s.live_runs:
                        log.info("%d live run(s) ended: stopping", runs_ended)
                        break
                elif s.idle_timeout_s and runs_ended and now - last_activity > s.idle_timeout_s:
                    log.info("no volume for %.1f s after the last run: stopping", s.idle_timeout_s)
                    break
                continue
            last_activity = now
            if isinstance(event, VolumeReady):
                volumes += 1
                if not checked_geometry:
                    bundle.check(subject=None, volume=event.volume)
                    checked_geometry = True
                if not low_disk_warned and layout.free_bytes() < s.min_free_gb * 1e9:
                    low_disk_warned = True
                    log.warning("session disk has %.1f GB free (< %.1f GB): free space before data is lost",
                                layout.free_bytes() / 1e9, s.min_free_gb)
                    publisher.publish(Heartbeat(session=s.id, service="scanner", state="warning",
                                                detail=f"low disk: {layout.free_bytes() / 1e9:.1f} GB free"))
            errors_before = len(pipeline.run_errors)
            trials_sent += _send_all(pipeline.handle(event), sender, publisher, decoder_index)
            for run, problem in pipeline.run_errors[errors_before:]:
                publisher.publish(Heartbeat(session=s.id, service="scanner", state="warning",
                                            detail=f"run {run} not analysed: {problem}"))
            for row in pipeline.timings:
                timings.write(json.dumps({"service": "scanner", **row}) + "\n")
            pipeline.timings.clear()
            timings.flush()
            if isinstance(event, RunEnded):
                runs_ended += 1
                if s.live_runs and runs_ended >= s.live_runs:
                    log.info("%d live run(s) ended: stopping", runs_ended)
                    break
        trials_sent += _send_all(pipeline.end_current_run(), sender, publisher, decoder_index)
        if not sender.wait_acked(sender.last_seq, ACK_DRAIN_S):
            log.warning("stopping with unacknowledged trials (acked %d of %d): they stay in the journal and are "
                        "re-sent when the scanner host restarts", sender.acked_seq, sender.last_seq)
        publisher.publish(Heartbeat(session=s.id, service="scanner", state=STATE_SESSION_DONE,
                                    detail=f"trials={trials_sent}"))
        time.sleep(2 * t.heartbeat_interval_s)
    finally:
        watcher.stop()
        sender.close()
        publisher.close()
        timings.close()
    return {"volumes": volumes, "runs_ended": runs_ended, "trials_sent": trials_sent,
            "acked": sender.acked_seq, "last_seq": sender.last_seq, "run_errors": len(pipeline.run_errors),
            "low_disk_warning": low_disk_warned}


# --- decoder --------------------------------------------------------------------------------------------------------


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_decoder(config: SessionConfig, stop: threading.Event | None = None) -> dict:
    """Receive trial estimates, decode them, record and publish the results, acknowledge.

    Every estimate gets its retrieval result at once. With ``decoder.unclip_checkpoint`` set, its trial is also
    offered to the reconstruction queue (``transport.recon_policy`` / ``recon_max_pending``); one worker thread
    reconstructs what the policy keeps and publishes a second result per reconstruction. Estimates are acknowledged
    once their retrieval result is recorded (reconstructions are not waited for: after a restart, pending ones are
    not redone).
    """
    from rt_mindeye.runtime.decoder import (ReconstructionWorker, TrialDecoder, build_decoder, load_reconstructor,
                                            reconstruction_decoder, warm_up_reconstructor)
    from rt_mindeye.transport.channel import ReliableReceiver
    from rt_mindeye.transport.config import client_security, server_security
    from rt_mindeye.transport.pubsub import SnapshotPublisher

    stop = stop or threading.Event()
    s = config.session
    d = config.decoder
    layout = SessionLayout(s.dir).create()
    setup_logging(layout, "decoder")
    bundle = CalibrationBundle.open(s.bundle)
    bundle.check(subject=s.subject, volume=None)
    decoder, _ = build_decoder(bundle, d.decode, device=_device(d.device))
    reconstruction = None
    if d.unclip_checkpoint is not None and d.decode.reconstruct:
        model_config = decoder.model_forward.model.config
        reconstructor = load_reconstructor(d.unclip_checkpoint, d.decode.reconstruction,
                                           token_dim=int(model_config.token_dim),
                                           use_prior=bool(model_config.use_prior))
        reconstruction = reconstruction_decoder(decoder, reconstructor)
        log.info("reconstructor warm-up took %.1f s", warm_up_reconstructor(reconstructor, model_config.token_seq))
    elif d.unclip_checkpoint is not None:
        log.info("decoder.decode.reconstruct is off: %s is not loaded", d.unclip_checkpoint)
    t = config.transport
    trial_decoder = TrialDecoder(decoder, session=s.id, recon_dir=layout.recon_dir, policy=t.recon_policy,
                                 max_pending=t.recon_max_pending, stimuli_dir=s.stimuli_dir,
                                 reconstruction=reconstruction)
    receiver = ReliableReceiver(t.connect_endpoint("trials"), session=s.id, service="decoder",
                                client_security=client_security(t, "decoder", "scanner"),
                                state_path=layout.decoder_dir / "receiver.state", auto_ack=False,
                                heartbeat_interval_s=t.heartbeat_interval_s, heartbeat_liveness=t.heartbeat_liveness)
    publisher = SnapshotPublisher(t.bind_endpoint("decoder_pub"), t.bind_endpoint("decoder_snapshot"), session=s.id,
                                  service="decoder", server_security=server_security(t, "decoder"),
                                  heartbeat_interval_s=t.heartbeat_interval_s)
    results = ResultsLog(layout.decoder_results)
    counts = {"decoded": 0, "superseded": 0, "reconstructed": 0, "recon_skipped": 0, "recon_superseded": 0,
              "recon_failed": 0}

    counts_lock = threading.Lock()

    def deliver(outcome) -> None:
        """Record and publish what became of one estimate's reconstruction (worker and main thread)."""
        results.write(_outcome_record(outcome), flush=True)
        if outcome.message is not None:
            publisher.publish(outcome.message)
        key = "reconstructed" if outcome.decision == "reconstructed" else f"recon_{outcome.decision}"
        with counts_lock:
            counts[key] = counts.get(key, 0) + 1

    worker = ReconstructionWorker(trial_decoder, deliver).start() if trial_decoder.reconstructs else None
    log.info("decoder ready: %d candidates, model on %s, reconstruction %s", len(decoder.retriever.ids),
             _device(d.device), f"on {reconstruction.reconstructor.device} ({t.recon_policy}, "
                                f"{t.recon_max_pending} waiting at most)" if worker else "off")
    last = time.time()
    try:
        while not stop.is_set():
            if worker is not None and worker.failure is not None:
                raise worker.failure
            msg = receiver.recv(timeout_s=POLL_S)
            now = time.time()
            if msg is None:
                if trial_decoder.busy:  # idle means no trial and no reconstruction left to do
                    last = now
                elif d.idle_timeout_s and counts["decoded"] and now - last > d.idle_timeout_s:
                    break
                continue
            last = now
            batch = [msg]
            while len(batch) < MAX_BATCH and (more := receiver.recv(timeout_s=0.0)) is not None:
                batch.append(more)
            trials = [m for m in batch if isinstance(m, TrialBetas)]
            # Backpressure: when the decoder has fallen behind, a newer estimate of a trial supersedes the
            # queued older ones; every trial still gets its retrieval, from its newest estimate.
            newest = {(m.run, m.trial): m for m in trials}
            for m in trials:
                if newest[(m.run, m.trial)] is not m:
                    results.write({"seq": m.seq, "run": m.run, "trial": m.trial, "kind": m.estimate_kind,
                                   "version": m.estimate_version, "superseded_by": newest[(m.run, m.trial)].seq})
                    counts["superseded"] += 1
            for m in sorted(newest.values(), key=lambda m: m.seq):
                retrieval = trial_decoder.retrieve(m, now)
                for outcome in retrieval.outcomes:  # earlier estimates the policy dropped or this one replaced
                    deliver(outcome)
                results.write(_result_record(m, retrieval.result))
                publisher.publish(retrieval.result)
                counts["decoded"] += 1
            results.flush()  # recorded before it is acknowledged
            receiver.ack(max(m.seq for m in batch))
    finally:
        if worker is not None:
            if not worker.stop(d.recon_stop_timeout_s):
                log.warning("the reconstruction in progress did not finish within %.1f s: left behind",
                            d.recon_stop_timeout_s)
            for outcome in trial_decoder.drop_waiting("the decoder stopped"):
                deliver(outcome)
        results.close()
        receiver.close()
        publisher.close()
    return counts


class ResultsLog:
    """The decoder's ``results.jsonl``: one JSON record per line, written by the main thread and the
    reconstruction worker; records arriving after :meth:`close` (a worker past its deadline) are dropped."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("a")
        self._lock = threading.Lock()

    def write(self, record: dict, flush: bool = False) -> None:
        with self._lock:
            if self._file.closed:
                log.warning("result recorded after the decoder stopped, dropped: %s", record)
                return
            self._file.write(json.dumps(record) + "\n")
            if flush:
                self._file.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _result_record(msg: TrialBetas, result) -> dict:
    return {"seq": msg.seq, "run": result.run, "trial": result.trial, "kind": result.estimate_kind,
            "version": result.estimate_version, "stim_file": result.stim_file, "topk": list(result.topk_labels),
            "scores": list(result.topk_scores), "recon": result.reconstruction_path,
            "acquisition_time": result.acquisition_time, "received_at": result.received_at,
            "retrieval_done_at": result.retrieval_done_at, "stage_ms": result.stage_ms,
            "policy_decision": result.policy_decision}


def _outcome_record(outcome) -> dict:
    """A reconstruction record: ``event`` tells it apart from the retrieval records (one per estimate)."""
    m = outcome.estimate
    record = {"event": "reconstruction", "seq": m.seq, "run": m.run, "trial": m.trial, "kind": m.estimate_kind,
              "version": m.estimate_version, "policy_decision": outcome.decision}
    if outcome.reason:
        record["reason"] = outcome.reason
    if outcome.message is not None and outcome.message.reconstruction_path is not None:
        record.update(recon=outcome.message.reconstruction_path,
                      reconstruction_done_at=outcome.message.reconstruction_done_at,
                      stage_ms=outcome.message.stage_ms, backlog=outcome.message.backlog)
    return record


# --- console --------------------------------------------------------------------------------------------------------


def console_sources(config: SessionConfig):
    from rt_mindeye.transport.config import client_security
    from rt_mindeye.transport.pubsub import Source

    t = config.transport
    return [Source("scanner", t.connect_endpoint("scanner_pub"), t.connect_endpoint("scanner_snapshot"),
                   client_security(t, "console", "scanner")),
            Source("decoder", t.connect_endpoint("decoder_pub"), t.connect_endpoint("decoder_snapshot"),
                   client_security(t, "console", "decoder"))]


def run_console(config: SessionConfig, stop: threading.Event | None = None, *, headless: bool | None = None,
                duration_s: float | None = None):
    from rt_mindeye.console.runner import OperatorConsole

    s = config.session
    layout = SessionLayout(s.dir)
    console_config = config.console
    if console_config.gallery_dir is None:
        console_config = replace(console_config, gallery_dir=layout.gallery_dir)
    if console_config.stimulus_dir is None and s.stimuli_dir is not None:
        console_config = replace(console_config, stimulus_dir=s.stimuli_dir.parent)
    console = OperatorConsole(console_config, console_sources(config),
                              heartbeat_interval_s=config.transport.heartbeat_interval_s,
                              heartbeat_liveness=config.transport.heartbeat_liveness)
    if stop is not None:
        threading.Thread(target=lambda: (stop.wait(), console.stop()), daemon=True).start()
    try:
        return console.run(duration_s=duration_s, headless=headless)
    finally:
        console.close()
