"""Round trips of every message over real sockets and bytes, and MessageError for every kind of bad frame."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import zmq

from rt_mindeye.errors import MessageError
from rt_mindeye.transport import protocol
from rt_mindeye.transport.messages import (
    MESSAGE_TYPES, Ack, DecodeResult, DesignNotice, Feedback, Heartbeat, RunTrigger, StatusReply, StatusRequest,
    StimulusEvent,
    TrialBetas, VolumeStatus, decode, encode,
)


def _examples():
    rng = np.random.default_rng(0)
    png = np.frombuffer(b"\x89PNG\r\n\x1a\n" + bytes(range(40)), dtype=np.uint8)
    return [
        VolumeStatus(session="s", seq=3, run=2, volume=17, acquisition_time=1.7e9 + 0.123456, received_at=1.7e9 + 0.9,
                     motion=(0.1, -0.2, 0.3, 0.001, 0.002, -0.003), fd=0.25, gap=True, missing=(15, 16),
                     stage_ms={"read": 12.5, "motion": 40.25}),
        VolumeStatus(session="s", run=1, volume=1, acquisition_time=1.0, received_at=2.0),  # fd NaN
        TrialBetas(session="s", seq=9, run=1, trial=4, trial_type="image", onset=12.0, estimate_kind="fast",
                   estimate_version=2, n_volumes=11, acquisition_time=1.7e9,
                   betas=rng.standard_normal(1000).astype(np.float32), stim_file="a.png"),
        TrialBetas(session="s", run=1, trial=5, trial_type="blank", onset=0.0, estimate_kind="slow",
                   estimate_version=0, n_volumes=1, acquisition_time=0.0, betas=np.zeros(0, np.float32)),
        DecodeResult(session="s", run=1, trial=4, estimate_kind="fast", topk_ids=(5, 9, 1), topk_scores=(0.9, 0.5, 0.1),
                     topk_labels=("dog", "cat", "car"), topk_images=("a", "b", "c"), reconstruction_path="/r/4.png",
                     thumbnail_png=png, acquisition_time=1.7e9, retrieval_done_at=1.7e9 + 3, stage_ms={"retrieval": 8.0},
                     policy="skip", policy_decision="reconstructed", backlog=3),
        DecodeResult(session="s", run=1, trial=4, estimate_kind="fast", acquisition_time=1.7e9),
        Heartbeat(session="s", service="decoder", state="busy", instance="abc", detail="x"),
        StimulusEvent(session="s", run=1, trial=3, onset=10.5, duration=3.0, trial_type="image", stim_file="x.png"),
        RunTrigger(session="s", run=2, client_time=123.25),
        DesignNotice(session="s", run=2, kind="onset", trial=4, offset_s=0.75, detail="shown at 12.75 s"),
        DesignNotice(session="s", run=2, kind="clock"),  # offset NaN
        Ack(session="s", ack_seq=41, catch_up=True, receiver="decoder"),
        StatusRequest(session="s", service="console", query="ping"),
        StatusReply(session="s", request_seq=7, service="decoder", state="ready", details={"gpu": "H100"}),
        Feedback(session="s", seq=4, run=2, trial=7, trial_type="image", estimate_kind="early", estimate_version=9,
                 topk_labels=("dog", "cat"), topk_scores=(0.8, 0.4), score=0.8, averaged=True, n_repeats=2,
                 image_path="/r/7.png", image_png=png, acquisition_time=1.7e9, deadline_s=0.5,
                 result_done_at=1.7e9 + 0.3),
        Feedback(session="s", run=2, trial=8, estimate_kind="early", status="late", text="no result in time",
                 acquisition_time=1.7e9, deadline_s=0.5, result_done_at=1.7e9 + 2.0),  # score NaN, no image
    ]


def test_every_message_type_has_an_example():
    assert {type(m).__name__ for m in _examples()} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", _examples(), ids=lambda m: type(m).__name__)
def test_round_trip_through_bytes(msg):
    frames = encode(msg)
    assert frames[0] == type(msg).TOPIC
    back = decode([bytes(f) for f in frames])
    assert back == msg
    for name, array in msg.arrays().items():
        got = getattr(back, name)
        assert got.dtype == array.dtype and got.shape == array.shape
        assert got.tobytes() == array.tobytes()


def test_round_trip_over_a_real_socket_without_copies():
    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        for msg in _examples():
            push.send_multipart(encode(msg), copy=False)
            assert pull.poll(5000)
            back = decode(pull.recv_multipart(copy=False))
            assert back == msg
        pull.close(0)
        push.close(0)
    finally:
        ctx.term()


def test_nan_and_float_precision_survive():
    msg = _examples()[1]
    back = decode(encode(msg))
    assert math.isnan(back.fd)
    assert back.acquisition_time == msg.acquisition_time


def _header(frames):
    return json.loads(bytes(frames[1]))


def _with_header(frames, header):
    return [frames[0], json.dumps(header).encode(), *frames[2:]]


@pytest.fixture
def trial_frames():
    return [bytes(f) for f in encode(_examples()[2])]


@pytest.mark.parametrize("mutate, field", [
    (lambda h: h.update(schema_version=99), "schema_version"),
    (lambda h: h.update(proto="pyneal"), "proto"),
    (lambda h: h.update(type="Nope"), "type"),
    (lambda h: h["fields"].pop("trial"), "TrialBetas.trial"),
    (lambda h: h["fields"].update(trial="four"), "TrialBetas.trial"),
    (lambda h: h["fields"].update(onset=True), "TrialBetas.onset"),
    (lambda h: h["fields"].update(header={"PatientName": "x"}), "TrialBetas.header"),
    (lambda h: h["arrays"][0].update(dtype="<f8"), "TrialBetas.betas.dtype"),
    (lambda h: h["arrays"][0].update(dtype=">f4"), "TrialBetas.betas.dtype"),
    (lambda h: h["arrays"][0].update(dtype="nonsense"), "TrialBetas.betas.dtype"),
    (lambda h: h["arrays"][0].update(shape=[10, 100]), "TrialBetas.betas.shape"),
    (lambda h: h["arrays"][0].update(shape=[999]), "TrialBetas.betas.nbytes"),
    (lambda h: h["arrays"][0].update(nbytes=12), "TrialBetas.betas.nbytes"),
    (lambda h: h["arrays"][0].update(name="other"), "TrialBetas.other"),
])
def test_bad_header_names_the_field(trial_frames, mutate, field):
    header = _header(trial_frames)
    mutate(header)
    with pytest.raises(MessageError) as info:
        decode(_with_header(trial_frames, header))
    assert info.value.field == field


def test_bad_frames(trial_frames):
    with pytest.raises(MessageError) as info:
        decode(trial_frames[:2])  # buffer missing
    assert info.value.field == "frames"
    with pytest.raises(MessageError) as info:
        decode([trial_frames[0], trial_frames[1], trial_frames[2][:-4]])  # short buffer
    assert info.value.field == "TrialBetas.betas.nbytes"
    with pytest.raises(MessageError) as info:
        decode([trial_frames[0], b"{not json", trial_frames[2]])
    assert info.value.field == "header"
    with pytest.raises(MessageError) as info:
        decode([protocol.TOPIC_RESULT, trial_frames[1], trial_frames[2]])
    assert info.value.field == "topic"
    with pytest.raises(MessageError) as info:
        decode(trial_frames[:1])
    assert info.value.field == "frames"


def test_construction_checks_types_and_shapes():
    with pytest.raises(MessageError) as info:
        TrialBetas(session="s", run=1, trial=1, trial_type="x", onset=0.0, estimate_kind="fast", estimate_version=0,
                   n_volumes=1, acquisition_time=0.0, betas=np.zeros(4, np.float64))
    assert info.value.field == "TrialBetas.betas.dtype"
    with pytest.raises(MessageError) as info:
        VolumeStatus(session="s", run=1, volume=1, acquisition_time=0.0, received_at=0.0, motion=(0.0, 1.0))
    assert info.value.field == "VolumeStatus.motion"
    with pytest.raises(MessageError) as info:
        DecodeResult(session="s", run=1, trial=1, estimate_kind="fast", acquisition_time=0.0, topk_ids=(1, 2),
                     topk_scores=(0.5,), topk_labels=("a", "b"))
    assert info.value.field == "DecodeResult.topk_scores"
    with pytest.raises(MessageError) as info:
        StimulusEvent(session="s", run=1, trial=1, onset=0.0, duration=1.0, trial_type="x", clock="wall")
    assert info.value.field == "StimulusEvent.clock"


def test_non_contiguous_array_is_sent_correctly():
    base = np.arange(20, dtype=np.float32)
    msg = TrialBetas(session="s", run=1, trial=1, trial_type="x", onset=0.0, estimate_kind="fast",
                     estimate_version=0, n_volumes=1, acquisition_time=0.0, betas=base[::2])
    assert np.array_equal(decode(encode(msg)).betas, base[::2])


def test_no_message_can_carry_a_dicom_header():
    # The closed schema is the guarantee that no patient-identifying DICOM field leaves the scanner host.
    forbidden = {"header", "patient_name", "patient_id", "dicom", "meta"}
    for cls in MESSAGE_TYPES.values():
        names = {f for f in cls.__dataclass_fields__}
        assert not names & forbidden, cls.__name__
