"""The feedback policy (decoder.feedback): which result of a trial goes back to the stimulus computer, when, and what
a late one becomes. Pure decisions on DecodeResult messages; the sockets are tested in tests/transport."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from rt_mindeye.runtime.config import FeedbackConfig
from rt_mindeye.runtime.feedback import FeedbackPolicy
from rt_mindeye.transport.messages import DecodeResult

T0 = 1.7e9


def _result(trial: int, kind: str = "early", version: int = 5, ready_after: float = 0.2, image=None,
            decision: str = "retrieval_only", **changes) -> DecodeResult:
    fields = dict(session="s", run=1, trial=trial, trial_type="image", estimate_kind=kind, estimate_version=version,
                  topk_ids=(3, 1, 2), topk_scores=(0.9, 0.5, 0.1), topk_labels=("a.png", "b.png", "c.png"),
                  reconstruction_path=image, acquisition_time=T0, retrieval_done_at=T0 + ready_after,
                  policy_decision=decision)
    fields.update(changes)
    return DecodeResult(**fields)


def _policy(reconstructs: bool = False, decided=None, **config) -> FeedbackPolicy:
    return FeedbackPolicy(FeedbackConfig(**config), session="s", reconstructs=reconstructs, decided=decided)


def test_first_result_is_fed_back_once_with_its_content(tmp_path):
    png = tmp_path / "blurry.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(png)
    policy = _policy(top_k=2)
    decision = policy.on_retrieval(_result(0, image=str(png)))
    message = decision.message
    assert message.status == "on_time" and message.topk_labels == ("a.png", "b.png") and message.score == 0.9
    assert message.image_path == str(png) and message.image_png.tobytes() == png.read_bytes()
    assert decision.record["sent"] and decision.record["ready_s"] == pytest.approx(0.2)
    assert policy.on_retrieval(_result(0, kind="refined", version=9)) is None  # a trial is fed back once
    assert policy.decided(1, 0)


def test_estimate_kind_and_the_final_stand_in():
    policy = _policy(estimate="refined")
    assert policy.on_retrieval(_result(0, kind="early")) is None
    assert policy.on_retrieval(_result(0, kind="refined")).message.estimate_kind == "refined"
    # A trial that never got a refined estimate is fed back from its final one.
    assert policy.on_retrieval(_result(1, kind="final")).message.estimate_kind == "final"


@pytest.mark.parametrize("late, sent, has_result", [("show", True, True), ("placeholder", True, False),
                                                    ("skip", False, False)])
def test_a_late_result_is_shown_replaced_or_skipped_and_recorded(late, sent, has_result):
    policy = _policy(deadline_s=0.5, late=late, late_text="too slow")
    decision = policy.on_retrieval(_result(0, ready_after=0.8))
    assert decision.record["status"] == "late" and decision.record["sent"] is sent
    if not sent:
        assert decision.message is None and "deadline 0.5 s" in decision.record["reason"]
        return
    assert decision.message.status == "late" and bool(decision.message.topk_labels) is has_result
    if not has_result:
        assert decision.message.text == "too slow" and math.isnan(decision.message.score)


def test_averaged_results_and_no_image():
    policy = _policy(averaged=True, image="none")
    single, averaged = _result(0), _result(0, averaged=True, n_repeats=3, topk_labels=("z.png", "b.png", "c.png"))
    message = policy.on_retrieval(single, averaged).message
    assert message.averaged and message.n_repeats == 3 and message.topk_labels[0] == "z.png"
    assert message.image_path is None and message.image_png is None
    assert _policy(averaged=True).on_retrieval(single, None).message.averaged is False  # first showing


def test_reconstruction_image_waits_for_the_worker():
    policy = _policy(reconstructs=True, image="reconstruction", image_bytes=False)
    assert policy.on_retrieval(_result(0, decision="queued")) is None
    # A superseded estimate's trial waits for the newer estimate's reconstruction.
    assert policy.on_reconstruction(1, 0, "early", "superseded", None) is None
    recon = _result(0, reconstruction_path="/r/0.png", reconstruction_done_at=T0 + 3.0)
    message = policy.on_reconstruction(1, 0, "early", "reconstructed", recon).message
    assert message.image_path == "/r/0.png" and message.status == "late" and message.result_done_at == T0 + 3.0
    # Skipped by the reconstruction policy: fed back at once, without an image, saying why.
    skipped = policy.on_retrieval(_result(1, decision="skipped")).message
    assert skipped.image_path is None and "skipped" in skipped.text
    # Still waiting when the decoder stops: fed back without an image.
    policy.on_retrieval(_result(2, decision="queued"))
    assert [d.message.trial for d in policy.drop_waiting("the decoder stopped")] == [2]
    # Without a reconstructor, the blurry image stands in.
    assert _policy(reconstructs=False, image="reconstruction").image == "blurry"


def test_trials_decided_before_a_restart_are_not_decided_again():
    policy = _policy(decided={(1, 0)})
    assert policy.on_retrieval(_result(0)) is None
    assert policy.on_retrieval(_result(1)).message.trial == 1
    assert np.isfinite(policy.on_retrieval(_result(2)).message.score)
