"""unCLIP reconstructions in the decoder service: a tiny SDXL-unCLIP checkpoint in the generative-models layout
(converted by the real converter at start-up), the calibrated phantom's bundle and its diffusion prior, real ZeroMQ
sockets on loopback. Retrieval goes out for every estimate; one worker reconstructs what the policy keeps."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from rt_mindeye.calibration.bundle import CalibrationBundle
from rt_mindeye.decode.config import DecodeConfig, ReconstructConfig
from rt_mindeye.decode.unclip import write_tiny_unclip_checkpoint
from rt_mindeye.runtime.config import load_session_config
from rt_mindeye.runtime.decoder import (TrialDecoder, UnclipCheckpointError, build_decoder, load_reconstructor,
                                        reconstruction_decoder)
from rt_mindeye.runtime.launcher import ServiceThread
from rt_mindeye.runtime.layout import SessionLayout
from rt_mindeye.runtime.preflight import FAIL, PASS, run_preflight
from rt_mindeye.timing import wait_until
from rt_mindeye.runtime.decoder_service import run_decoder
from rt_mindeye.transport.channel import ReliableSender
from rt_mindeye.transport.messages import DecodeResult, TrialBetas
from rt_mindeye.transport.pubsub import SnapshotSubscriber, Source

IMAGE_PX = 32
RECON = {"steps": 2, "image_size": IMAGE_PX, "original_size": IMAGE_PX, "device": "cpu"}
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def bundle(calibrated_phantom):
    return CalibrationBundle.open(calibrated_phantom.bundle_dir)


@pytest.fixture(scope="module")
def token_dim(bundle):
    from rt_mindeye.convert.mindeye2 import check_checkpoint

    return int(check_checkpoint(bundle.model_dir / "last.pth", None).config.token_dim)


@pytest.fixture(scope="module")
def unclip_ckpt(tmp_path_factory, token_dim):
    return write_tiny_unclip_checkpoint(tmp_path_factory.mktemp("unclip") / "unclip6_tiny.ckpt",
                                        cross_attention_dim=token_dim)


@pytest.fixture(scope="module")
def decoders(bundle, unclip_ckpt, token_dim):
    decoder, _ = build_decoder(bundle, DecodeConfig(reconstruction=ReconstructConfig(**RECON)))
    reconstructor = load_reconstructor(unclip_ckpt, decoder.config.reconstruction, token_dim=token_dim)
    return decoder, reconstruction_decoder(decoder, reconstructor)


def estimate(bundle, trial: int, kind: str = "early", version: int = 0, seq: int = 0) -> TrialBetas:
    rng = np.random.default_rng(trial * 10 + version)
    n = len(bundle.decoder_index())
    return TrialBetas(session="test", seq=seq, run=3, trial=trial, trial_type="image", onset=4.0 * trial,
                      estimate_kind=kind, estimate_version=version, n_volumes=5 + trial,
                      acquisition_time=time.time(), betas=rng.standard_normal(n).astype(np.float32))


# --- the policy and the worker's steps, one at a time -------------------------------------------------------------


@pytest.mark.parametrize("policy, decisions, skipped, order", [
    ("newest", ["queued"] * 5, [0, 1, 2], [4, 3]),
    ("skip", ["queued", "queued", "skipped", "skipped", "skipped"], [], [0, 1]),
    ("fifo", ["queued"] * 5, [], [0, 1, 2, 3, 4]),
])
def test_policy_decides_which_trials_are_reconstructed(bundle, decoders, tmp_path, policy, decisions, skipped,
                                                       order):
    decoder, reconstruction = decoders
    trials = TrialDecoder(decoder, session="test", recon_dir=tmp_path, policy=policy, max_pending=2,
                          reconstruction=reconstruction)
    results, dropped = [], []
    for trial in range(5):  # five arrivals before the worker takes any
        retrieval = trials.retrieve(estimate(bundle, trial), time.time())
        assert retrieval.result.reconstruction_path is None and len(retrieval.result.topk_ids) == 5
        results.append(retrieval.result)
        dropped += retrieval.outcomes
    assert [r.policy_decision for r in results] == decisions
    assert [o.estimate.trial for o in dropped] == skipped
    assert all(o.decision == "skipped" and o.message.policy_decision == "skipped" for o in dropped)
    done = []
    while (outcome := trials.reconstruct_next()) is not None:
        done.append(outcome)
    assert [o.estimate.trial for o in done] == order
    for outcome in done:
        assert outcome.decision == "reconstructed", outcome.reason
        path = Path(outcome.message.reconstruction_path)
        assert path.name == f"run-03_trial-{outcome.estimate.trial:03d}_early_recon.png"
        assert Image.open(path).size == (IMAGE_PX, IMAGE_PX)
        assert outcome.message.trial == outcome.estimate.trial and outcome.message.reconstruction_done_at
        assert outcome.message.topk_ids == results[outcome.estimate.trial].topk_ids
        assert outcome.message.thumbnail_png is not None and outcome.message.stage_ms["reconstruct_ms"] > 0
    assert trials.backlog == 0


def test_a_newer_estimate_takes_the_waiting_ones_place(bundle, decoders, tmp_path):
    decoder, reconstruction = decoders
    trials = TrialDecoder(decoder, session="test", recon_dir=tmp_path, policy="skip", max_pending=1,
                          reconstruction=reconstruction)
    first = trials.retrieve(estimate(bundle, 0, "early", 0), time.time())
    final = trials.retrieve(estimate(bundle, 0, "final", 1), time.time())
    assert first.result.policy_decision == final.result.policy_decision == "queued"  # not skipped: same trial
    assert [(o.estimate.estimate_kind, o.decision, o.message) for o in final.outcomes] == [("early", "superseded",
                                                                                             None)]
    outcome = trials.reconstruct_next()
    assert outcome.estimate.estimate_kind == "final" and outcome.message.estimate_kind == "final"
    assert Path(outcome.message.reconstruction_path).name == "run-03_trial-000_final_recon.png"
    assert trials.reconstruct_next() is None


def test_a_reconstruction_is_reproducible_from_its_estimate(bundle, decoders, tmp_path):
    decoder, reconstruction = decoders
    images = []
    for n, trial in enumerate((2, 2, 3)):  # prior sample and unCLIP noise are seeded with the trial
        trials = TrialDecoder(decoder, session="test", recon_dir=tmp_path / str(n), reconstruction=reconstruction)
        trials.retrieve(estimate(bundle, trial), time.time())
        outcome = trials.reconstruct_next()
        assert outcome.decision == "reconstructed" and "recon_prior_model_ms" in outcome.message.stage_ms
        images.append(np.asarray(Image.open(outcome.message.reconstruction_path)))
    assert np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])


# --- the service on loopback ---------------------------------------------------------------------------------------


def service_config(phantom, session_yaml, tmp_path: Path, port_base: int, *, policy: str, max_pending: int,
                   checkpoint: Path | None, steps: int = RECON["steps"], **decoder):
    path = session_yaml(tmp_path / "s.yaml", phantom, tmp_path / "session", tmp_path / "export", port_base)
    data = yaml.safe_load(path.read_text())
    data["transport"].update(recon_policy=policy, recon_max_pending=max_pending)
    data["decoder"].update(unclip_checkpoint=None if checkpoint is None else str(checkpoint),
                           decode={"reconstruction": RECON | {"steps": steps}}, **decoder)
    path.write_text(yaml.safe_dump(data))
    return load_session_config(path), path


def records(config) -> list[dict]:
    return SessionLayout(config.session.dir).read_decoder_results()


def finished(rows: list[dict], n_estimates: int) -> bool:
    queued = sum(1 for r in rows if "topk" in r and r["policy_decision"] == "queued")
    ended = sum(1 for r in rows if r.get("event") == "reconstruction")
    return sum(1 for r in rows if "topk" in r) == n_estimates and ended == queued


def run_burst(config, bundle, estimates: list[TrialBetas], stop_after_retrieval: bool = False
              ) -> tuple[list[dict], list[DecodeResult], dict]:
    """Journal ``estimates`` first, then start the decoder: they arrive in one burst, faster than it reconstructs.
    Returns the decoder's records, the results it published and its summary. With ``stop_after_retrieval`` the
    decoder is stopped as soon as every retrieval result is recorded; with ``decoder.idle_timeout_s`` it stops by
    itself."""
    t = config.transport
    sender = ReliableSender(t.bind_endpoint("trials"), Path(config.session.dir) / "trials.journal", session="test",
                            fsync=False, heartbeat_interval_s=t.heartbeat_interval_s)
    source = Source("decoder", t.connect_endpoint("decoder_pub"), t.connect_endpoint("decoder_snapshot"))
    decoder = ServiceThread(run_decoder, config)
    published: list[DecodeResult] = []
    try:
        for msg in estimates:
            sender.send(msg)
        decoder.start()
        if stop_after_retrieval:
            wait_until(lambda: sum(1 for r in records(config) if "topk" in r) == len(estimates), DEADLINE_S,
                     "every estimate's retrieval")
            decoder.stop_event.set()
        if stop_after_retrieval or config.decoder.idle_timeout_s:
            decoder.join(DEADLINE_S)
            assert not decoder.is_alive(), "the decoder did not stop within its deadline"
        # Done when every estimate has its retrieval record and every queued one its reconstruction record.
        wait_until(lambda: finished(records(config), len(estimates)) or decoder.error is not None, DEADLINE_S,
                 "every estimate's retrieval and reconstruction")
        assert sender.wait_acked(sender.last_seq, 10.0), "retrieval results were not acknowledged"
        if not decoder.is_alive():  # stopped: nothing left to subscribe to, its record says it all
            return records(config), [], decoder.finish()
        with SnapshotSubscriber([source], heartbeat_interval_s=t.heartbeat_interval_s) as sub:
            end = time.monotonic() + 10.0
            while time.monotonic() < end and len(published) < len(records(config)):
                delivery = sub.recv(0.1)
                if delivery is not None and isinstance(delivery.message, DecodeResult):
                    published.append(delivery.message)
        summary = decoder.finish()
    finally:
        if decoder.is_alive():
            decoder.finish()
        sender.close()
    return records(config), published, summary


def check_burst(rows, published, estimates):
    """What every policy guarantees; returns the trials reconstructed and the reconstruction records."""
    retrieval = [r for r in rows if "topk" in r]
    recon = [r for r in rows if r.get("event") == "reconstruction"]
    trials = sorted(m.trial for m in estimates)
    # Every estimate got exactly one retrieval result, recorded and published, with its top-5.
    assert sorted(r["trial"] for r in retrieval) == trials
    assert all(len(r["topk"]) == 5 for r in retrieval)
    assert sorted(p.trial for p in published if p.retrieval_done_at is not None) == trials
    # Every queued estimate ended once, reconstructed or skipped; one skipped on arrival has no further record.
    queued = sorted(r["trial"] for r in retrieval if r["policy_decision"] == "queued")
    assert sorted(r["trial"] for r in recon) == queued
    made = [r for r in recon if r["policy_decision"] == "reconstructed"]
    for r in made:  # the PNG exists and names the estimate's trial
        path = Path(r["recon"])
        assert path.name == f"run-03_trial-{r['trial']:03d}_early_recon.png"
        assert Image.open(path).size == (IMAGE_PX, IMAGE_PX)
    second = [p for p in published if p.policy_decision == "reconstructed"]
    assert sorted((p.trial, p.reconstruction_path) for p in second) == sorted((r["trial"], r["recon"]) for r in made)
    assert all(p.thumbnail_png is not None and p.reconstruction_done_at >= p.acquisition_time for p in second)
    notices = [p.trial for p in published if p.policy_decision == "skipped" and p.retrieval_done_at is None]
    assert sorted(notices) == sorted(r["trial"] for r in recon if r["policy_decision"] == "skipped")
    return {r["trial"] for r in made}, retrieval, recon


BURST = 8


def test_service_newest_policy_keeps_the_latest_trials(calibrated_phantom, session_yaml, bundle, unclip_ckpt,
                                                        tmp_path):
    config, _ = service_config(calibrated_phantom, session_yaml, tmp_path, 48100, policy="newest", max_pending=1,
                               checkpoint=unclip_ckpt)
    estimates = [estimate(bundle, trial) for trial in range(BURST)]
    rows, published, summary = run_burst(config, bundle, estimates)
    made, retrieval, recon = check_burst(rows, published, estimates)
    # Reconstruction is far slower than retrieval: the burst overtakes the worker and the oldest waiting trials are
    # dropped; the last trial to arrive is never dropped under 'newest'.
    assert summary["decoded"] == BURST and summary["reconstructed"] == len(made)
    assert summary["recon_skipped"] >= 1 and len(made) < BURST
    assert BURST - 1 in made


def test_service_skip_and_fifo_policies(calibrated_phantom, session_yaml, bundle, unclip_ckpt, tmp_path):
    for n, policy in enumerate(("skip", "fifo")):
        config, _ = service_config(calibrated_phantom, session_yaml, tmp_path / policy, 48200 + 20 * n,
                                   policy=policy, max_pending=1, checkpoint=unclip_ckpt)
        estimates = [estimate(bundle, trial) for trial in range(BURST if policy == "skip" else 4)]
        rows, published, summary = run_burst(config, bundle, estimates)
        made, retrieval, recon = check_burst(rows, published, estimates)
        if policy == "skip":
            # The first trial found the queue empty and is always reconstructed; the ones skipped were skipped on
            # arrival (their retrieval result says so), never after being queued.
            assert 0 in made
            assert [r for r in retrieval if r["policy_decision"] == "skipped"]
            assert all(r["policy_decision"] == "reconstructed" for r in recon)
        else:
            assert made == set(range(len(estimates))) and summary["recon_skipped"] == 0


def test_idle_timeout_waits_for_the_queued_reconstructions(calibrated_phantom, session_yaml, bundle, unclip_ckpt,
                                                            tmp_path):
    config, _ = service_config(calibrated_phantom, session_yaml, tmp_path, 48600, policy="fifo", max_pending=8,
                               checkpoint=unclip_ckpt, idle_timeout_s=0.5)
    rows, _, summary = run_burst(config, bundle, [estimate(bundle, trial) for trial in range(4)])
    made = {r["trial"] for r in rows if r.get("event") == "reconstruction" and r["policy_decision"] == "reconstructed"}
    assert made == {0, 1, 2, 3} and summary["recon_skipped"] == 0


def test_stop_ends_the_worker_and_records_what_was_waiting(calibrated_phantom, session_yaml, bundle, unclip_ckpt,
                                                           tmp_path):
    config, _ = service_config(calibrated_phantom, session_yaml, tmp_path, 48620, policy="fifo", max_pending=8,
                               checkpoint=unclip_ckpt, steps=10, recon_stop_timeout_s=20.0)
    estimates = [estimate(bundle, trial) for trial in range(BURST)]
    rows, _, summary = run_burst(config, bundle, estimates, stop_after_retrieval=True)
    recon = [r for r in rows if r.get("event") == "reconstruction"]
    # Stopped long before eight 10-step reconstructions could be done: the one in progress finished, every trial
    # still waiting was recorded as skipped because the decoder stopped, and nothing ended twice.
    assert sorted(r["trial"] for r in recon) == list(range(BURST))
    skipped = [r for r in recon if r["policy_decision"] == "skipped"]
    assert skipped and all(r["reason"] == "the decoder stopped" for r in skipped)
    assert summary["reconstructed"] + summary["recon_skipped"] == BURST


def test_service_without_checkpoint_does_retrieval_only(calibrated_phantom, session_yaml, bundle, tmp_path):
    config, _ = service_config(calibrated_phantom, session_yaml, tmp_path, 48300, policy="newest", max_pending=1,
                               checkpoint=None)
    rows, published, summary = run_burst(config, bundle, [estimate(bundle, trial) for trial in range(3)])
    assert [r["policy_decision"] for r in rows] == ["retrieval_only"] * 3
    assert summary["reconstructed"] == 0 and not any(r.get("event") for r in rows)


# --- a bad checkpoint fails at start-up -----------------------------------------------------------------------------


def preflight_row(path: Path):
    return next(c for c in run_preflight(path) if c.name == "unCLIP checkpoint")


def test_bad_checkpoint_fails_at_start_up_naming_the_file(calibrated_phantom, session_yaml, bundle, unclip_ckpt,
                                                          tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    narrow = write_tiny_unclip_checkpoint(tmp_path / "narrow.ckpt", cross_attention_dim=24)
    cases = [(tmp_path / "missing.ckpt", "file not found"), (garbage, "cannot read"),
             (bundle.model_dir / "last.pth", "not a generative-models unCLIP checkpoint"),
             (narrow, "cross-attention width 24")]
    for n, (path, problem) in enumerate(cases):
        config, yaml_path = service_config(calibrated_phantom, session_yaml, tmp_path / f"case{n}", 48400 + 20 * n,
                                           policy="newest", max_pending=1, checkpoint=path)
        with pytest.raises(UnclipCheckpointError) as error:
            run_decoder(config, threading.Event())
        assert str(path) in str(error.value) and "decoder.unclip_checkpoint" in str(error.value)
        assert problem in str(error.value)
        row = preflight_row(yaml_path)  # preflight says the same before the session
        assert row.status == FAIL and str(path) in row.detail and problem in row.detail
    _, ok = service_config(calibrated_phantom, session_yaml, tmp_path / "ok", 48500, policy="newest", max_pending=1,
                           checkpoint=unclip_ckpt)
    assert preflight_row(ok).status == PASS


# --- a live run end to end ------------------------------------------------------------------------------------------


def test_live_run_with_reconstructions_reaches_the_console(calibrated_phantom, session_yaml, unclip_ckpt, tmp_path):
    from rt_mindeye.replay.emulator import ScannerEmulator
    from rt_mindeye.runtime.console_service import run_console
    from rt_mindeye.runtime.scanner_service import run_scanner
    from rt_mindeye.transport.journal import read_journal

    phantom = calibrated_phantom
    config, _ = service_config(phantom, session_yaml, tmp_path, 48700, policy="newest", max_pending=2,
                               checkpoint=unclip_ckpt)
    layout = SessionLayout(config.session.dir)
    scanner = ServiceThread(run_scanner, config)
    decoder = ServiceThread(run_decoder, config)
    decoder.start()
    scanner.start()
    time.sleep(0.5)
    ScannerEmulator(phantom.live_files, tmp_path / "export", tr=phantom.session.tr, speed=15.0,
                    restamp_acquisition=True).run()
    scanner.join(DEADLINE_S)
    assert not scanner.is_alive(), "the scanner host did not end the live run"
    scanner.finish()
    sent = [m for m in read_journal(layout.betas_dir / "trials.journal") if isinstance(m, TrialBetas)]

    def done() -> bool:
        rows = records(config)
        answered = sum(1 for r in rows if "topk" in r or "superseded_by" in r)
        queued = sum(1 for r in rows if "topk" in r and r["policy_decision"] == "queued")
        ended = sum(1 for r in rows if r.get("event") == "reconstruction")
        return answered == len(sent) and ended == queued

    wait_until(done, DEADLINE_S, "the decoder to answer every estimate and end every queued reconstruction")
    console = run_console(config, headless=True, duration_s=2.0)  # joins late: the decoder's snapshot has it all
    decoder.finish()
    rows = records(config)
    retrieval = [r for r in rows if "topk" in r]
    made = [r for r in rows if r.get("event") == "reconstruction" and r["policy_decision"] == "reconstructed"]
    # Every trial got retrieval; the last estimate sent was reconstructed ('newest' never drops the latest).
    assert {r["trial"] for r in retrieval} == set(range(phantom.live_trials))
    assert made and (sent[-1].trial, sent[-1].estimate_kind) in {(r["trial"], r["kind"]) for r in made}
    for r in made:
        assert Path(r["recon"]).name == f"run-03_trial-{r['trial']:03d}_{r['kind']}_recon.png"
        assert Image.open(r["recon"]).size == (IMAGE_PX, IMAGE_PX)
    # The console merged the second results into its trial rows and counted what the policy skipped.
    shown = {(row.run, row.trial): row for row in console.trials}
    last_made = {}
    for r in made:
        last_made[(r["run"], r["trial"])] = r["recon"]
    assert all(shown[key].reconstruction_path for key in last_made)
    assert console.recon_policy == "newest"
    skipped = sum(1 for r in rows if r.get("policy_decision") == "skipped")
    assert console.recon_skipped == skipped
