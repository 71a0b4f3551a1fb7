"""The closed-loop feedback stream on real loopback sockets: the decoder host's FeedbackServer and the stimulus
computer's StimulusClient. Every trial's feedback arrives once, through a stimulus-computer disconnect, a restart of
the stimulus program, and a restart of the decoder."""

from __future__ import annotations

import time

import numpy as np

from rt_mindeye.transport.feedback import FeedbackServer
from rt_mindeye.transport.journal import read_journal
from rt_mindeye.transport.messages import Feedback
from rt_mindeye.transport.stimulus_client import StimulusClient

HB = 0.1
PNG = np.frombuffer(b"\x89PNG\r\n\x1a\n" + bytes(range(200)), dtype=np.uint8)


def _endpoint(folder, name: str = "feedback") -> str:
    """A loopback endpoint no other process can hold (a Unix socket in the test's folder): a restarted server binds
    the same address again, and tests running beside this one never cross."""
    return f"ipc://{folder}/{name}.sock"


def _feedback(trial: int, run: int = 1, **changes) -> Feedback:
    fields = dict(session="s", run=run, trial=trial, trial_type="image", estimate_kind="early",
                  topk_labels=(f"img{trial}.png", "other.png"), topk_scores=(0.9, 0.1), score=0.9,
                  image_path=f"/recon/{trial}.png", image_png=PNG, acquisition_time=time.time() - 0.2,
                  deadline_s=1.0, result_done_at=time.time())
    fields.update(changes)
    return Feedback(**fields)


def _client(endpoint: str, **kwargs) -> StimulusClient:
    # The stimulus endpoint is never served here: only the feedback half is under test.
    unused = endpoint.replace(".sock", "-stimulus-unused.sock")
    return StimulusClient(unused, session="s", run=1, feedback_endpoint=endpoint, heartbeat_interval_s=HB, **kwargs)


def _server(endpoint: str, journal) -> FeedbackServer:
    return FeedbackServer(endpoint, journal, session="s", fsync=False, heartbeat_interval_s=HB)


def _trials(client) -> list[int]:
    return [item.trial for item in client.feedback_received]


def test_feedback_reaches_the_stimulus_client_with_its_content(tmp_path, helpers):
    endpoint = _endpoint(tmp_path)
    with _server(endpoint, tmp_path / "feedback.journal") as server:
        client = _client(endpoint)
        server.send(_feedback(1))
        late = server.send(_feedback(2, status="late", topk_labels=(), topk_scores=(), score=float("nan"),
                                     image_path=None, image_png=None, text="no result in time"))
        item = client.feedback(trial=1, timeout_s=5.0)
        assert item is not None and item.topk_labels == ("img1.png", "other.png") and item.score == 0.9
        assert item.image_png == PNG.tobytes() and item.image_path == "/recon/1.png" and not item.late
        assert 0.0 < item.latency_s < 5.0
        notice = client.feedback(trial=2, timeout_s=5.0)
        assert notice.seq == late.seq and notice.late and not notice.has_result and notice.text == "no result in time"
        assert client.feedback(trial=3, timeout_s=0.05) is None  # never sent: the caller shows its placeholder
        assert server.wait_acked(5.0)
        assert [i.trial for i in client.poll_feedback()] == [1, 2] and client.poll_feedback() == []
        client.close(0.1)


def test_stimulus_computer_disconnects_and_comes_back_without_loss_or_duplicates(tmp_path, helpers):
    endpoint = _endpoint(tmp_path)
    state = str(tmp_path / "stimulus.state")
    with _server(endpoint, tmp_path / "feedback.journal") as server:
        first = _client(endpoint, feedback_state=state)
        for trial in range(3):
            server.send(_feedback(trial))
        assert helpers.wait_for(lambda: len(first.feedback_received) == 3, 5.0)
        assert server.wait_acked(5.0)
        first.close(0.1)  # the stimulus program goes away (crash, restart, network)
        for trial in range(3, 7):  # the decoder goes on: feedback waits in its journal
            server.send(_feedback(trial))
        time.sleep(3 * HB)
        assert server.acked_seq == 3
        second = _client(endpoint, feedback_state=state)  # restarted, remembering what it acknowledged
        assert helpers.wait_for(lambda: len(second.feedback_received) == 4, 5.0)
        time.sleep(5 * HB)  # heartbeats and catch-up requests go on: still nothing twice
        assert _trials(first) + _trials(second) == list(range(7))
        assert server.wait_acked(5.0) and server.acked_seq == 7
        second.close(0.1)
        # A stimulus program without a state file is sent what was never acknowledged: here, only what comes next.
        # (One stimulus computer at a time: the acknowledged watermark is the stream's.)
        third = _client(endpoint)
        server.send(_feedback(7))
        assert helpers.wait_for(lambda: len(third.feedback_received) == 1, 5.0)
        time.sleep(5 * HB)
        assert _trials(third) == [7]
        third.close(0.1)


def test_decoder_restart_resends_the_unacknowledged_and_never_feeds_a_trial_back_twice(tmp_path, helpers):
    endpoint = _endpoint(tmp_path)
    journal = tmp_path / "feedback.journal"
    server = _server(endpoint, journal)
    server.send(_feedback(0))
    server.send(_feedback(1))  # no stimulus computer yet: both wait in the journal
    server.close()  # the decoder is killed
    client = _client(endpoint)
    restarted = _server(endpoint, journal)
    assert restarted.sent == {(1, 0), (1, 1)}
    # The restarted decoder re-decodes trial 1 (it had not acknowledged its estimate): not fed back twice.
    assert restarted.send(_feedback(1)) is None
    restarted.send(_feedback(2))
    assert helpers.wait_for(lambda: len(client.feedback_received) == 3, 5.0)
    time.sleep(5 * HB)
    assert _trials(client) == [0, 1, 2]
    assert restarted.wait_acked(5.0)
    assert [m.trial for m in read_journal(journal)] == [0, 1, 2]
    client.close(0.1)
    restarted.close()


def test_feedback_receiver_never_blocks_the_experiment_without_a_decoder(tmp_path):
    client = _client(_endpoint(tmp_path))
    began = time.monotonic()
    assert client.feedback(trial=1, timeout_s=0.2) is None
    assert client.poll_feedback() == [] and not client.feedback_connected
    assert time.monotonic() - began < 1.0
    client.close(0.1)


def test_psychopy_example_dry_run_receives_the_feedback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from rt_mindeye.transport.stimulus import StimulusEventServer

    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "psychopy_stimulus.py"
    endpoint = _endpoint(tmp_path)
    with StimulusEventServer("tcp://127.0.0.1:0", session="s") as scanner, \
            _server(endpoint, tmp_path / "feedback.journal") as decoder:
        decoder.send(_feedback(0, session="sub-01_ses-01"))
        decoder.send(_feedback(1, session="sub-01_ses-01", status="late"))
        done = subprocess.run([sys.executable, str(example), "--dry-run", "--scanner", scanner.endpoint,
                               "--decoder", endpoint], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "trial 0 (shared0001.png): img0.png (score 0.90)" in done.stdout
        assert "trial 1 (shared0002.png): img1.png (score 0.90) (late)" in done.stdout
        assert "trial 2 (shared0003.png): no feedback in time" in done.stdout
        assert "all acknowledged: True" in done.stdout
        assert decoder.wait_acked(5.0)
