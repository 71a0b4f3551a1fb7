"""The decoder service: receive trial estimates, decode them, record and publish the results, acknowledge.

:func:`run_decoder` runs in the calling process until its stop condition (or ``stop`` is set) and reads only its own
sections of the :class:`SessionConfig`; ``python -m services.decoder`` is its process entry point.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path

from rt_mindeye.errors import RtMindEyeError
from rt_mindeye.runtime.config import SessionConfig
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.runtime.service_support import POLL_S, setup_logging
from rt_mindeye.transport.messages import TrialBetas

log = logging.getLogger("rt_mindeye.services")

MAX_BATCH = 64


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
    from rt_mindeye.runtime.decoder import (ReconstructionWorker, RepeatAverager, TrialDecoder, load_reconstructor,
                                            reconstruction_decoder, warm_up_reconstructor)
    from rt_mindeye.runtime.reload import BundleHistory, DecoderBundles, control_handler
    from rt_mindeye.transport.channel import ReliableReceiver
    from rt_mindeye.transport.config import client_security, server_security
    from rt_mindeye.transport.pubsub import SnapshotPublisher
    from rt_mindeye.transport.reqrep import StatusServer

    stop = stop or threading.Event()
    s = config.session
    d = config.decoder
    layout = SessionLayout(s.dir).create()
    setup_logging(layout, "decoder")
    t = config.transport
    factory = _BundleDecoders(d)
    # The bundle this service last switched to (a reload before a restart), else the configured one.
    bundles = DecoderBundles(factory.build, BundleHistory(layout, "decoder"), s.subject, s.bundle,
                             (t.recon_policy, t.recon_max_pending))
    decoder, _ = bundles.current
    reconstruction = None
    if d.unclip_checkpoint is not None and d.decode.reconstruct:
        model_config = decoder.model_forward.model.config
        reconstructor = load_reconstructor(d.unclip_checkpoint, d.decode.reconstruction,
                                           token_dim=int(model_config.token_dim),
                                           use_prior=bool(model_config.use_prior))
        factory.reconstructor, factory.token_dim = reconstructor, int(model_config.token_dim)
        reconstruction = reconstruction_decoder(decoder, reconstructor)
        bundles.loaded[bundles.current_id] = (decoder, reconstruction)
        log.info("reconstructor warm-up took %.1f s", warm_up_reconstructor(reconstructor, model_config.token_seq))
    elif d.unclip_checkpoint is not None:
        log.info("decoder.decode.reconstruct is off: %s is not loaded", d.unclip_checkpoint)
    averager = RepeatAverager(layout.repeats_journal) if d.average_repeats else None
    trial_decoder = TrialDecoder(decoder, session=s.id, recon_dir=layout.recon_dir, policy=bundles.policy[0],
                                 max_pending=bundles.policy[1], stimuli_dir=s.stimuli_dir,
                                 reconstruction=reconstruction, averager=averager)
    counts = {"decoded": 0, "superseded": 0, "reconstructed": 0, "recon_skipped": 0, "recon_superseded": 0,
              "recon_failed": 0, "averaged": 0, "failed": 0, "feedback_sent": 0, "feedback_not_sent": 0}
    counts_lock = threading.Lock()
    results = ResultsLog(layout.decoder_results)
    opened: list = [results]  # closed again if a later one cannot start (e.g. its port is taken)
    try:
        publisher = SnapshotPublisher(t.bind_endpoint("decoder_pub"), t.bind_endpoint("decoder_snapshot"),
                                      session=s.id, service="decoder", server_security=server_security(t, "decoder"),
                                      heartbeat_interval_s=t.heartbeat_interval_s)
        opened.append(publisher)
        control = StatusServer(t.bind_endpoint("decoder_status"),
                               control_handler("decoder", bundles.reload, lambda: {**bundles.status(), **counts}),
                               session=s.id, service="decoder", server_security=server_security(t, "decoder"))
        opened.append(control)
        feedback = _Feedback.start(config, layout, publisher, counts, counts_lock, trial_decoder.reconstructs)
        opened.append(feedback)
        receiver = ReliableReceiver(t.connect_endpoint("trials"), session=s.id, service="decoder",
                                    client_security=client_security(t, "decoder", "scanner"),
                                    state_path=layout.decoder_dir / "receiver.state", auto_ack=False,
                                    heartbeat_interval_s=t.heartbeat_interval_s,
                                    heartbeat_liveness=t.heartbeat_liveness)
    except BaseException:
        for thing in reversed(opened):
            thing.close()
        if averager is not None:
            averager.close()
        raise
    feedback_averaged = d.feedback.averaged and averager is not None
    if d.feedback.averaged and averager is None:
        log.warning("decoder.feedback.averaged needs decoder.average_repeats: single-trial results are fed back")

    def deliver(outcome) -> None:
        """Record and publish what became of one estimate's reconstruction (worker and main thread)."""
        m = outcome.estimate
        feedback.offer(lambda policy: policy.on_reconstruction(m.run, m.trial, m.estimate_kind, outcome.decision,
                                                               outcome.message, outcome.reason))
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
    decoded_trials: set[tuple[int, int]] = set()
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
            # A trial's first estimate goes before the newer estimates of trials already decoded: it is the one the
            # participant's feedback and the operator's first look wait for. Repeat averages come after the batch.
            decoded_now = []
            for m in sorted(newest.values(), key=lambda m: (m.run, (m.run, m.trial) in decoded_trials, m.seq)):
                try:
                    for outcome in bundles.prepare(m, trial_decoder):  # a reload takes effect between runs
                        deliver(outcome)
                except RtMindEyeError as exc:  # its bundle is unknown or no longer loads: recorded, acknowledged
                    log.error("run %d trial %d (seq %d) cannot be decoded: %s", m.run, m.trial, m.seq, exc)
                    results.write({"seq": m.seq, "run": m.run, "trial": m.trial, "kind": m.estimate_kind,
                                   "version": m.estimate_version, "bundle": m.bundle_id, "failed": str(exc)})
                    counts["failed"] += 1
                    continue
                retrieval = trial_decoder.retrieve(m, now)
                if not feedback_averaged:  # otherwise it waits for the average below
                    feedback.offer(lambda policy: policy.on_retrieval(retrieval.result))
                for outcome in retrieval.outcomes:  # earlier estimates the policy dropped or this one replaced
                    deliver(outcome)
                results.write(_result_record(m, retrieval.result, bundles.current_id))
                publisher.publish(retrieval.result)
                counts["decoded"] += 1
                decoded_trials.add((m.run, m.trial))
                decoded_now.append((m, retrieval.result))
            for m, result in decoded_now if averager is not None else ():
                averaged = trial_decoder.average(m, now)
                if feedback_averaged:
                    feedback.offer(lambda policy: policy.on_retrieval(result, averaged))
                if averaged is not None:
                    results.write(_averaged_record(m, averaged))
                    publisher.publish(averaged)
                    counts["averaged"] += 1
            results.flush()  # recorded before it is acknowledged
            receiver.ack(max(m.seq for m in batch))
    finally:
        if worker is not None:
            if not worker.stop(d.recon_stop_timeout_s):
                log.warning("the reconstruction in progress did not finish within %.1f s: left behind",
                            d.recon_stop_timeout_s)
            for outcome in trial_decoder.drop_waiting("the decoder stopped"):
                deliver(outcome)
        control.close()
        feedback.close()
        if averager is not None:
            averager.close()
        results.close()
        receiver.close()
        publisher.close()
    return counts


class _BundleDecoders:
    """Builds the decoding side of a bundle: its retrieval decoder and, once the unCLIP reconstructor is loaded
    (shared by every bundle), its reconstruction decoder, refusing a bundle whose model cannot condition it."""

    def __init__(self, section):
        self.section = section
        self.reconstructor = None
        self.token_dim: int | None = None

    def build(self, bundle):
        from rt_mindeye.runtime.decoder import UnclipCheckpointError, build_decoder, reconstruction_decoder

        decoder, _ = build_decoder(bundle, self.section.decode, device=_device(self.section.device),
                                   blurry_vae=self.section.blurry_vae)
        if self.reconstructor is None:
            return decoder, None
        model_config = decoder.model_forward.model.config
        if not model_config.use_prior or int(model_config.token_dim) != self.token_dim:
            raise UnclipCheckpointError(self.section.unclip_checkpoint, f"the model of bundle {bundle.root} "
                                        f"({'no prior' if not model_config.use_prior else model_config.token_dim}) "
                                        f"cannot condition the loaded reconstructor ({self.token_dim}-d tokens)")
        return decoder, reconstruction_decoder(decoder, self.reconstructor)


class _Feedback:
    """The decoder's side of the closed loop: the feedback policy, the reliable stream to the stimulus computer and
    ``feedback.jsonl``; with ``decoder.feedback.enabled`` off, offers are ignored."""

    def __init__(self, policy, server, log_file: "ResultsLog | None", publisher, counts: dict,
                 counts_lock: threading.Lock):
        self.policy, self.server, self.log_file = policy, server, log_file
        self.publisher, self.counts, self.counts_lock = publisher, counts, counts_lock

    @classmethod
    def start(cls, config: SessionConfig, layout: SessionLayout, publisher, counts: dict,
              counts_lock: threading.Lock, reconstructs: bool) -> "_Feedback":
        from rt_mindeye.runtime.feedback import FeedbackPolicy
        from rt_mindeye.transport.config import server_security
        from rt_mindeye.transport.feedback import FeedbackServer

        f, t = config.decoder.feedback, config.transport
        if not f.enabled:
            return cls(None, None, None, publisher, counts, counts_lock)
        server = FeedbackServer(t.bind_endpoint("feedback"), layout.feedback_journal, session=config.session.id,
                                server_security=server_security(t, "decoder"), fsync=t.journal_fsync,
                                heartbeat_interval_s=t.heartbeat_interval_s, heartbeat_liveness=t.heartbeat_liveness)
        decided = set(server.sent) | {(r["run"], r["trial"]) for r in layout.read_jsonl(layout.feedback_jsonl)}
        policy = FeedbackPolicy(f, session=config.session.id, reconstructs=reconstructs, decided=decided)
        log.info("feedback to the stimulus computer on %s: %s estimate, image %s, deadline %.2f s, late: %s",
                 server.endpoint, f.estimate, policy.image, f.deadline_s, f.late)
        return cls(policy, server, ResultsLog(layout.feedback_jsonl), publisher, counts, counts_lock)

    def offer(self, decide) -> None:
        """``decide(policy)`` -> FeedbackDecision or None; a decision is sent first, then recorded."""
        if self.policy is None:
            return
        decision = decide(self.policy)
        if decision is None:
            return
        self._apply(decision)

    def _apply(self, decision) -> None:
        from dataclasses import replace

        record = {**decision.record, "at": time.time()}
        if decision.message is not None:
            sent = self.server.send(decision.message)
            if sent is None:
                return  # sent before a decoder restart: already recorded
            record["seq"] = sent.seq
            # The console is told what the participant was shown, without the image bytes it already has.
            self.publisher.publish(replace(sent, image_png=None))
        self.log_file.write(record, flush=True)
        with self.counts_lock:
            self.counts["feedback_sent" if decision.message is not None else "feedback_not_sent"] += 1

    def close(self, ack_wait_s: float = 1.0) -> None:
        if self.policy is None:
            return
        for decision in self.policy.drop_waiting("the decoder stopped"):
            self._apply(decision)
        if self.server.peer_alive and not self.server.wait_acked(ack_wait_s):
            log.info("stopping with unacknowledged feedback: it stays in the journal and is re-sent after a restart")
        self.server.close()
        self.log_file.close()


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


def _result_record(msg: TrialBetas, result, bundle_id: str) -> dict:
    return {"seq": msg.seq, "run": result.run, "trial": result.trial, "kind": result.estimate_kind,
            "bundle": bundle_id,
            "version": result.estimate_version, "stim_file": result.stim_file, "topk": list(result.topk_labels),
            "scores": list(result.topk_scores), "recon": result.reconstruction_path,
            "acquisition_time": result.acquisition_time, "received_at": result.received_at,
            "retrieval_done_at": result.retrieval_done_at, "stage_ms": result.stage_ms,
            "policy_decision": result.policy_decision,
            "fd_max_mm": None if math.isnan(msg.fd_max_mm) else msg.fd_max_mm, "motion_gated": msg.motion_gated}


def _averaged_record(msg: TrialBetas, result) -> dict:
    """A repeat-averaged result: ``event`` tells it apart from the single-trial records (one per estimate)."""
    return {"event": "averaged", "seq": msg.seq, "run": result.run, "trial": result.trial,
            "kind": result.estimate_kind, "version": result.estimate_version, "stim_file": result.stim_file,
            "n_repeats": result.n_repeats, "repeat_trials": [list(k) for k in result.repeat_trials],
            "topk": list(result.topk_labels), "scores": list(result.topk_scores), "recon": result.reconstruction_path,
            "acquisition_time": result.acquisition_time, "retrieval_done_at": result.retrieval_done_at}


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
