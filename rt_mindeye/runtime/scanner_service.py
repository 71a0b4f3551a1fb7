"""The scanner-host service: watch the export folder, correct motion, estimate betas, journal and send them.

:func:`run_scanner` runs in the calling process until its stop condition (or ``stop`` is set) and reads only its own
sections of the :class:`SessionConfig`; ``python -m services.scanner`` is its process entry point.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace

import numpy as np

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.errors import SessionError
from rt_mindeye.runtime.config import SessionConfig
from rt_mindeye.runtime.events_planner import EventsPlanner
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.runtime.service_support import POLL_S, STATE_SESSION_DONE, save_resolved_config, setup_logging
from rt_mindeye.transport.messages import Heartbeat, TrialBetas

log = logging.getLogger("rt_mindeye.services")

NO_BETAS = np.zeros(0, dtype=np.float32)
ACK_DRAIN_S = 10.0


def _send_all(messages, sender, publisher, bundles) -> int:
    """Journal and send trial estimates (restricted to the decoder's voxels of the current bundle, stamped with its
    id), publish everything; count trials."""
    trials = 0
    for msg in messages:
        if isinstance(msg, TrialBetas):
            current = bundles.current
            msg = replace(msg, betas=np.ascontiguousarray(msg.betas[current.decoder_index]), bundle_id=current.id)
            sender.send(msg)  # journaled before it is sent
            bundles.note_run(msg.run)
            trials += 1
            # The console needs to know the estimate exists, not its betas: keep its snapshot history small.
            msg = replace(msg, betas=NO_BETAS)
        publisher.publish(msg)
    return trials


def _stimulus_reports(stimulus, pipeline) -> list:
    """Hand every report the stimulus computer sent since the last call to the pipeline; what it returns."""
    from rt_mindeye.runtime.live_events import TriggerSeen
    from rt_mindeye.transport.messages import RunTrigger

    out = []
    while (message := stimulus.recv(timeout_s=0.0)) is not None:
        if isinstance(message, RunTrigger):
            message = TriggerSeen(message.run, stimulus.trigger_arrival(message.run) or time.time())
        out += pipeline.handle(message)
    return out


def _align_session_start(config: SessionConfig, bundle: CalibrationBundle) -> bool:
    """Whether the first live volume gets the careful reference alignment (motion.align_session_start)."""
    mode = config.motion.align_session_start
    return mode == "always" or (mode == "auto" and bundle.info.session != config.session.id)


def _use_bundle(pipeline, staged, config: SessionConfig, realtime_glm) -> None:
    """Between runs: continue with a reloaded bundle (its reference, GLM voxels and frozen GLM)."""
    pipeline.use_calibration(reference=staged.reference, mask=staged.glm_mask,
                             glm=realtime_glm(staged.calibration, config.glm),
                             align_session_start=_align_session_start(config, staged.bundle))


def _stage_again(bundles, pending: dict) -> None:
    """A reload accepted before a restart is staged again (or, if it no longer validates, logged and dropped)."""
    from rt_mindeye.errors import RtMindEyeError

    try:
        bundles.reload({"bundle": pending["bundle"]})
    except (RtMindEyeError, OSError, ValueError) as exc:
        log.warning("the reload staged before the restart (%s) is refused now: %s", pending["bundle"], exc)


def run_scanner(config: SessionConfig, stop: threading.Event | None = None) -> dict:
    """Watch the export folder, correct motion, estimate betas, journal and send them. Returns a summary."""
    from rt_mindeye.glm.realtime import RealtimeGLM
    from rt_mindeye.ingest.series import RunEnded, VolumeReady
    from rt_mindeye.ingest.watcher import FolderWatcher
    from rt_mindeye.preprocess.motion import MotionCorrector
    from rt_mindeye.runtime.reload import BundleHistory, ScannerBundle, ScannerBundles, control_handler
    from rt_mindeye.runtime.scanner import ScannerPipeline
    from rt_mindeye.transport.channel import ReliableSender
    from rt_mindeye.transport.config import server_security
    from rt_mindeye.transport.pubsub import SnapshotPublisher
    from rt_mindeye.transport.stimulus import StimulusEventServer
    from rt_mindeye.transport.reqrep import StatusServer

    stop = stop or threading.Event()
    s = config.session
    layout = SessionLayout(s.dir).create()
    setup_logging(layout, "scanner")
    save_resolved_config(config, layout)
    live_events = config.events.live != "off"
    if s.events_dir is None and not live_events:
        raise SessionError(None, "session.events_dir: with events.live off the real-time GLM needs the run's "
                                 "planned events file")
    # The bundle this service last switched to (a reload before a restart), else the configured one.
    history = BundleHistory(layout, "scanner")
    bundles = ScannerBundles(ScannerBundle.load(history.current(s.bundle), s.subject), history, s.subject)
    history.start(bundles.current.path, bundles.current.id, s.bundle)
    bundle = bundles.current.bundle
    pipeline = ScannerPipeline(reference=bundles.current.reference, mask=bundles.current.glm_mask,
                               glm=RealtimeGLM(bundles.current.calibration, config.glm),
                               motion=MotionCorrector(config.motion),
                               planner=EventsPlanner(s.events_dir, s.first_live_run), session=s.id,
                               first_volume=config.watcher.first_volume, motion_dir=layout.derivatives / "motion",
                               align_session_start=_align_session_start(config, bundle), func_dir=layout.func_dir,
                               design_dir=layout.design_dir, onset_tolerance_s=config.events.onset_tolerance_s)
    t = config.transport
    sender = ReliableSender(t.bind_endpoint("trials"), layout.betas_dir / "trials.journal", session=s.id,
                            service="scanner", server_security=server_security(t, "scanner"),
                            fsync=t.journal_fsync, heartbeat_interval_s=t.heartbeat_interval_s,
                            heartbeat_liveness=t.heartbeat_liveness, send_hwm=t.send_hwm)
    publisher = SnapshotPublisher(t.bind_endpoint("scanner_pub"), t.bind_endpoint("scanner_snapshot"), session=s.id,
                                  service="scanner", server_security=server_security(t, "scanner"),
                                  heartbeat_interval_s=t.heartbeat_interval_s)
    stimulus = (StimulusEventServer(t.bind_endpoint("stimulus"), session=s.id,
                                    server_security=server_security(t, "scanner")) if live_events else None)
    watcher = FolderWatcher(s.watch_dir, replace(config.watcher, record_dir=layout.root), clock=time.time)
    control = StatusServer(t.bind_endpoint("scanner_control"), control_handler("scanner", bundles.reload,
                                                                               bundles.status),
                           session=s.id, service="scanner", server_security=server_security(t, "scanner"))
    if (pending := history.staged()) is not None:  # accepted before a restart, not yet applied
        _stage_again(bundles, pending)
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
            if stimulus is not None:
                trials_sent += _send_all(_stimulus_reports(stimulus, pipeline), sender, publisher, bundles)
            event = watcher.get(timeout=POLL_S)
            now = time.time()
            if event is None:
                if pipeline.run_active and now - last_activity > s.run_end_timeout_s:
                    log.info("no volume for %.1f s: the run has ended", s.run_end_timeout_s)
                    _send_all(pipeline.end_current_run(), sender, publisher, bundles)
                    runs_ended += 1
                    if s.live_runs and runs_ended >= s.live_runs:
                        log.info("%d live run(s) ended: stopping", runs_ended)
                        break
                elif s.idle_timeout_s and runs_ended and now - last_activity > s.idle_timeout_s:
                    log.info("no volume for %.1f s after the last run: stopping", s.idle_timeout_s)
                    break
                continue
            last_activity = now
            if not pipeline.run_active and (staged := bundles.take_staged()) is not None:
                _use_bundle(pipeline, staged, config, RealtimeGLM)
                checked_geometry = False
            if isinstance(event, VolumeReady):
                volumes += 1
                bundles.last_volume = event.volume
                if not checked_geometry:
                    bundles.current.bundle.check(subject=None, volume=event.volume)
                    checked_geometry = True
                if not low_disk_warned and layout.free_bytes() < s.min_free_gb * 1e9:
                    low_disk_warned = True
                    log.warning("session disk has %.1f GB free (< %.1f GB): free space before data is lost",
                                layout.free_bytes() / 1e9, s.min_free_gb)
                    publisher.publish(Heartbeat(session=s.id, service="scanner", state="warning",
                                                detail=f"low disk: {layout.free_bytes() / 1e9:.1f} GB free"))
            # A run the silence timeout already ended is not counted again when the watcher ends its series.
            ends_a_run = isinstance(event, RunEnded) and pipeline.active_series == event.series
            errors_before = len(pipeline.run_errors)
            trials_sent += _send_all(pipeline.handle(event), sender, publisher, bundles)
            for run, problem in pipeline.run_errors[errors_before:]:
                publisher.publish(Heartbeat(session=s.id, service="scanner", state="warning",
                                            detail=f"run {run} not analysed: {problem}"))
            for row in pipeline.timings:
                timings.write(json.dumps({"service": "scanner", **row}) + "\n")
            pipeline.timings.clear()
            timings.flush()
            if ends_a_run:
                runs_ended += 1
                if s.live_runs and runs_ended >= s.live_runs:
                    log.info("%d live run(s) ended: stopping", runs_ended)
                    break
        trials_sent += _send_all(pipeline.end_current_run(), sender, publisher, bundles)
        # No decoder connected: nothing to wait for (the journal keeps everything for the next one).
        if not (sender.peer_alive and sender.wait_acked(sender.last_seq, ACK_DRAIN_S)) and \
                sender.acked_seq < sender.last_seq:
            log.warning("stopping with unacknowledged trials (acked %d of %d): they stay in the journal and are "
                        "re-sent when the scanner host restarts", sender.acked_seq, sender.last_seq)
        publisher.publish(Heartbeat(session=s.id, service="scanner", state=STATE_SESSION_DONE,
                                    detail=f"trials={trials_sent}"))
        time.sleep(2 * t.heartbeat_interval_s)
    finally:
        watcher.stop()
        if stimulus is not None:
            stimulus.close()
        control.close()
        sender.close()
        publisher.close()
        timings.close()
    return {"volumes": volumes, "runs_ended": runs_ended, "trials_sent": trials_sent,
            "acked": sender.acked_seq, "last_seq": sender.last_seq, "run_errors": len(pipeline.run_errors),
            "low_disk_warning": low_disk_warned}
