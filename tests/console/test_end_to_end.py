"""Scanner -> decoder -> console over real loopback sockets, with a numpy stand-in for the model.

The decoder thread here is the shape services/decoder.py takes: receive TrialBetas on the reliable stream, publish
retrieval for every trial at once, reconstruct by policy, acknowledge after publishing.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from rt_mindeye.console.config import ConsoleConfig
from rt_mindeye.console.runner import OperatorConsole
from rt_mindeye.transport.channel import ReliableReceiver, ReliableSender
from rt_mindeye.transport.messages import DecodeResult, TrialBetas
from rt_mindeye.transport.policy import ReconstructionQueue
from rt_mindeye.transport.pubsub import SnapshotPublisher, Source

LOOP = "tcp://127.0.0.1:0"
HB = 0.1
N_VOXELS = 500
N_TRIALS = 6


def _decoder(endpoint: str, results: SnapshotPublisher, bank: np.ndarray, stop: threading.Event, png: np.ndarray):
    receiver = ReliableReceiver(endpoint, session="e2e", auto_ack=False, heartbeat_interval_s=HB)
    queue = ReconstructionQueue("newest", max_pending=1)
    try:
        while not stop.is_set():
            msg = receiver.recv(0.05)
            if msg is not None:
                received_at = time.time()
                scores = bank @ msg.betas / (np.linalg.norm(bank, axis=1) * np.linalg.norm(msg.betas))
                top = np.argsort(-scores)[:5]
                decisions = queue.submit(msg)
                results.publish(DecodeResult(
                    session="e2e", run=msg.run, trial=msg.trial, trial_type=msg.trial_type,
                    estimate_kind=msg.estimate_kind, stim_file=msg.stim_file, topk_ids=tuple(int(i) for i in top),
                    topk_scores=tuple(float(scores[i]) for i in top), topk_labels=tuple(f"img{i}" for i in top),
                    acquisition_time=msg.acquisition_time, betas_sent_at=msg.created_at, received_at=received_at,
                    retrieval_done_at=time.time(), policy=queue.policy, policy_decision=decisions[0].decision,
                    backlog=queue.backlog))
                for evicted in decisions[1:]:
                    results.publish(DecodeResult(session="e2e", run=evicted.item.run, trial=evicted.item.trial,
                                                 estimate_kind=evicted.item.estimate_kind,
                                                 acquisition_time=evicted.item.acquisition_time,
                                                 policy=queue.policy, policy_decision="skipped",
                                                 backlog=queue.backlog))
                receiver.ack(msg.seq)
            elif (item := queue.next()) is not None:  # idle: reconstruct the trial the policy picks
                results.publish(DecodeResult(
                    session="e2e", run=item.run, trial=item.trial, estimate_kind=item.estimate_kind,
                    acquisition_time=item.acquisition_time, reconstruction_path=f"/decoder/recon_{item.trial}.png",
                    thumbnail_png=png, reconstruction_done_at=time.time(), policy=queue.policy,
                    policy_decision="reconstructed", backlog=queue.backlog))
    finally:
        receiver.close()


def test_trials_flow_from_scanner_to_console(tmp_path, factories):
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((40, N_VOXELS)).astype(np.float32)
    sender = ReliableSender(LOOP, tmp_path / "trials.journal", session="e2e", fsync=False, heartbeat_interval_s=HB)
    scanner_pub = SnapshotPublisher(LOOP, LOOP, session="e2e", service="scanner", heartbeat_interval_s=HB)
    results = SnapshotPublisher(LOOP, LOOP, session="e2e", service="decoder", heartbeat_interval_s=HB)
    stop = threading.Event()
    decoder = threading.Thread(target=_decoder, args=(sender.last_endpoint, results, bank, stop,
                                                      factories.png_bytes()), daemon=True)
    decoder.start()
    try:
        # The "scanner": trial i's betas are a noisy copy of bank image 3*i, so retrieval must find it first.
        for trial in range(1, N_TRIALS + 1):
            scanner_pub.publish(factories.volume(trial))
            betas = (bank[3 * trial] + 0.1 * rng.standard_normal(N_VOXELS)).astype(np.float32)
            sender.send(TrialBetas(session="e2e", run=1, trial=trial, trial_type="image", onset=4.0 * trial,
                                   estimate_kind="fast", estimate_version=1, n_volumes=trial + 5,
                                   acquisition_time=time.time(), betas=betas, stim_file=f"img{3 * trial}.png"))
        assert sender.wait_acked(N_TRIALS, 15.0)
        console = OperatorConsole(
            ConsoleConfig(gallery_dir=tmp_path / "gallery", headless=True, refresh_per_second=20.0),
            [Source("scanner", scanner_pub.pub_endpoint, scanner_pub.snapshot_endpoint),
             Source("decoder", results.pub_endpoint, results.snapshot_endpoint)], heartbeat_interval_s=HB)
        # joins late: everything comes from the snapshots
        state = console.run(duration_s=20.0, until=lambda s: (
            s.last_volume == N_TRIALS and len(s.trials) == N_TRIALS and all(r.topk for r in s.trials)
            and any(r.thumbnail_path for r in s.trials) and sum(p.alive for p in s.peers) == 2))
    finally:
        stop.set()
        decoder.join(10)
        for component in (sender, scanner_pub, results):
            component.close()
    assert state.last_volume == N_TRIALS
    assert [row.trial for row in state.trials] == list(range(1, N_TRIALS + 1))
    for row in state.trials:
        assert row.topk[0].label == f"img{3 * row.trial}"  # retrieval for every trial
        assert row.stim_file == f"img{3 * row.trial}.png"
    reconstructed = [row for row in state.trials if row.reconstruction_path]
    assert reconstructed and all(row.thumbnail_path for row in reconstructed)
    assert state.recon_policy == "newest"
    assert {p.name for p in state.peers if p.alive} == {"scanner", "decoder"}
    assert state.latency("retrieval") and state.latency("console")
    page = (tmp_path / "gallery" / "index.html").read_text()
    assert all(f'id="r1t{t}"' in page for t in range(1, N_TRIALS + 1))
