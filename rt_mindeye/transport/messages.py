"""Typed transport messages and their wire format.

Every message is a frozen dataclass with a schema version, a sequence number, the session id and its creation time.
On the wire a message is one ZeroMQ multipart message::

    frame 0   topic                 bytes, e.g. b"trial" (see rt_mindeye.transport.protocol); SUB sockets filter on it
    frame 1   JSON header (UTF-8)   {"proto": "rtm", "schema_version": 1, "type": "TrialBetas",
                                     "fields": {...every non-array field...},
                                     "arrays": [{"name": "betas", "dtype": "<f4", "shape": [20000], "nbytes": 80000}]}
    frame 2.. raw array buffers      one per entry of "arrays", in that order, C-contiguous, sent with copy=False

No pickle: the header is plain JSON and the arrays are raw little-endian bytes described by dtype and shape.
:func:`decode` checks the protocol name, schema version, type, topic, every field's presence and type, and every
array's dtype, shape and byte count, and raises :class:`~rt_mindeye.errors.MessageError` naming the field.

The schema is closed (an unknown field is an error), and no message has a free-form slot for a DICOM header: this is
how "no patient-identifying DICOM field leaves the scanner host" is kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from rt_mindeye.errors import MessageError
from rt_mindeye.transport import protocol

__all__ = [
    "Message", "VolumeStatus", "TrialBetas", "DecodeResult", "Heartbeat", "StimulusEvent", "RunTrigger", "Ack",
    "StatusRequest", "StatusReply", "DesignNotice", "Feedback", "MESSAGE_TYPES", "encode", "decode", "encode_header",
    "SCHEMA_VERSION",
]

SCHEMA_VERSION = protocol.SCHEMA_VERSION

# eq=False: the generated __eq__ would compare arrays with ==; Message.__eq__ compares them exactly instead.
_message = dataclass(frozen=True, kw_only=True, eq=False)


@_message
class Message:
    """Fields every message carries. ``seq`` is assigned by the sending channel (0 = not yet assigned)."""

    TOPIC: ClassVar[bytes] = b""
    #: array fields: name -> (numpy dtype string, number of dimensions)
    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {}
    #: tuple fields of fixed length: name -> length
    FIXED_LENGTHS: ClassVar[dict[str, int]] = {}

    session: str
    seq: int = 0
    created_at: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # Normalise lists to tuples and arrays to contiguous arrays of the declared dtype, and check everything, so a
        # bad message fails where it is built rather than on the other host.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = _check_value(type(self), f.name, value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)

    def with_seq(self, seq: int) -> "Message":
        """A copy with sequence number ``seq`` (messages are frozen)."""
        return dataclasses.replace(self, seq=int(seq))

    def __eq__(self, other: object) -> bool:
        """Field-by-field equality; arrays must match in dtype, shape and values, and NaN equals NaN."""
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    __hash__ = object.__hash__

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.ARRAYS if getattr(self, name) is not None}


@_message
class VolumeStatus(Message):
    """One acquired volume as the scanner host saw it (scanner -> console).

    Times are POSIX seconds: ``acquisition_time`` from the DICOM acquisition date/time
    (:func:`rt_mindeye.timing.acquisition_epoch`), ``received_at`` when the file was complete on the scanner host.
    ``motion`` is (tx, ty, tz in mm, rx, ry, rz in radians); ``fd`` the framewise displacement in mm (NaN for the
    first volume); ``gap`` is true when volumes are missing (listed in ``missing``): either volumes before this
    one, or, when ``volume`` itself is in ``missing``, this message is only a placeholder for a volume declared
    missing (no data: its times are the declaration time);
    ``stage_ms`` maps a stage name (``read``, ``motion``, ``glm``, ...) to its duration in milliseconds.
    """

    TOPIC: ClassVar[bytes] = protocol.TOPIC_VOLUME
    FIXED_LENGTHS: ClassVar[dict[str, int]] = {"motion": 6}

    run: int
    volume: int
    acquisition_time: float
    received_at: float
    motion: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    fd: float = math.nan
    gap: bool = False
    missing: tuple[int, ...] = ()
    stage_ms: dict[str, float] = field(default_factory=dict)


@_message
class TrialBetas(Message):
    """A single-trial estimate (scanner -> decoder, reliable channel).

    ``estimate_kind`` says which estimate this is (e.g. ``fast`` a few volumes after the stimulus, ``slow``, or
    ``end_of_run``) and ``estimate_version`` counts re-estimates of the same trial; ``n_volumes`` is how many
    volumes of the run the estimate used and ``acquisition_time`` (POSIX s) the acquisition time of the last of
    them, from which the console measures latency. ``betas`` is float32, one value per voxel of the decoder's mask.
    ``fd_max_mm`` is the largest framewise displacement over the trial's window so far (NaN: unknown) and
    ``motion_gated`` whether it exceeds the motion gate (``motion.gate_fd_mm``).
    ``bundle_id`` names the calibration bundle whose GLM and masks made the estimate (the decoder decodes it with the
    same bundle's model; empty: whichever the decoder has).
    """

    TOPIC: ClassVar[bytes] = protocol.TOPIC_TRIAL
    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {"betas": ("float32", 1)}

    run: int
    trial: int
    trial_type: str
    onset: float
    estimate_kind: str
    estimate_version: int
    n_volumes: int
    acquisition_time: float
    betas: np.ndarray
    stim_file: str | None = None
    fd_max_mm: float = math.nan
    motion_gated: bool = False
    bundle_id: str = ""


@_message
class DecodeResult(Message):
    """What the decoder made of one trial estimate (decoder -> console).

    A trial gets a result as soon as retrieval is done (``reconstruction_path`` None, ``policy_decision`` says what
    happens to its reconstruction: ``queued``, ``skipped``, ``reconstructed``, ``failed`` or ``retrieval_only``)
    and, when the reconstruction policy lets it through, a second result with the reconstruction. ``thumbnail_png`` optionally
    carries a small PNG of the reconstruction as uint8 bytes, so a console on another host can show it.
    Timestamps are POSIX seconds; ``stage_ms`` maps decoder stages to milliseconds. An ``averaged`` result (decoder
    option ``average_repeats``) decodes the average of the newest estimates of the ``n_repeats`` trials that showed
    this trial's image so far in the session (``repeat_trials``: their (run, trial)); it follows the trial's
    single-trial result and has no reconstruction of its own.
    """

    TOPIC: ClassVar[bytes] = protocol.TOPIC_RESULT
    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {"thumbnail_png": ("uint8", 1)}

    run: int
    trial: int
    trial_type: str = ""
    estimate_kind: str
    estimate_version: int = 0
    stim_file: str | None = None
    topk_ids: tuple[int, ...] = ()
    topk_scores: tuple[float, ...] = ()
    topk_labels: tuple[str, ...] = ()
    topk_images: tuple[str, ...] = ()
    reconstruction_path: str | None = None
    thumbnail_png: np.ndarray | None = None
    acquisition_time: float
    betas_sent_at: float | None = None
    received_at: float | None = None
    retrieval_done_at: float | None = None
    reconstruction_done_at: float | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    policy: str = "newest"
    policy_decision: str = "queued"
    backlog: int = 0
    averaged: bool = False
    n_repeats: int = 1
    repeat_trials: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self.topk_ids)
        for name in ("topk_scores", "topk_labels"):
            if len(getattr(self, name)) != n:
                raise MessageError(f"DecodeResult.{name}", f"has {len(getattr(self, name))} items, topk_ids has {n}")
        if self.topk_images and len(self.topk_images) != n:
            raise MessageError("DecodeResult.topk_images", f"has {len(self.topk_images)} items, topk_ids has {n}")


@_message
class Heartbeat(Message):
    """Liveness of a service on one stream. ``instance`` changes when the service restarts."""

    TOPIC: ClassVar[bytes] = protocol.TOPIC_HEARTBEAT

    service: str
    state: str = protocol.STATE_READY
    instance: str = ""
    detail: str = ""


@_message
class StimulusEvent(Message):
    """A stimulus shown by the stimulus computer.

    ``clock`` says what ``onset`` (seconds) is measured against: ``trigger`` = seconds after the run's trigger (the
    start of the run's first volume), ``scanner`` = POSIX seconds on the scanner's acquisition clock. ``client_time``
    is the stimulus computer's own clock when it sent the event (for diagnostics only).
    """

    TOPIC: ClassVar[bytes] = protocol.TOPIC_STIMULUS

    run: int
    trial: int
    onset: float
    duration: float
    trial_type: str
    stim_file: str = ""
    clock: str = "trigger"
    client_time: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clock not in ("trigger", "scanner"):
            raise MessageError("StimulusEvent.clock", f"must be 'trigger' or 'scanner', got {self.clock!r}")
        if not (self.duration >= 0):
            raise MessageError("StimulusEvent.duration", f"must be >= 0, got {self.duration!r}")


@_message
class RunTrigger(Message):
    """The stimulus computer received the scanner trigger for ``run`` at ``client_time`` on its own clock."""

    TOPIC: ClassVar[bytes] = protocol.TOPIC_TRIGGER

    run: int
    client_time: float


@_message
class DesignNotice(Message):
    """What the scanner host made of the live stimulus events of a run (scanner -> console).

    ``kind``: ``clock`` (the run's clock: ``offset_s`` = arrival of the stimulus computer's trigger on the scanner
    host minus the acquisition time of the run's first volume; NaN when no trigger came), ``onset`` (trial ``trial``
    was shown ``offset_s`` seconds later than planned), ``unplanned`` (shown, not planned), ``not_shown`` (planned,
    not shown: left out of the design, earlier estimates withdrawn), ``late`` (a trial taken for not shown was
    reported after later ones: back in the design), ``refit`` (a report changed volumes already
    used: the listed trials were re-estimated), ``stray`` (a report for a run that is not in progress). ``trial`` is
    the scanner host's trial id (-1: the run as a whole).
    """

    TOPIC: ClassVar[bytes] = protocol.TOPIC_DESIGN

    run: int
    kind: str
    trial: int = -1
    offset_s: float = math.nan
    detail: str = ""


@_message
class Ack(Message):
    """Receiver -> sender: everything up to and including ``ack_seq`` arrived (0 = nothing yet).

    With ``catch_up`` true it also asks the sender to (re)send everything after ``ack_seq``; ``ack_seq`` -1 means
    "I have no state: send whatever you have not had acknowledged".
    """

    TOPIC: ClassVar[bytes] = protocol.TOPIC_ACK

    ack_seq: int
    catch_up: bool = False
    receiver: str = ""


@_message
class StatusRequest(Message):
    """Lazy Pirate request: a status query, a preflight ping, or a control command (``query="reload"`` with its
    ``args``, e.g. ``{"bundle": PATH}``)."""

    TOPIC: ClassVar[bytes] = protocol.TOPIC_STATUS_REQUEST

    service: str
    query: str = "status"
    args: dict[str, str] = field(default_factory=dict)


@_message
class StatusReply(Message):
    """Reply to a :class:`StatusRequest`; ``request_seq`` echoes the request's seq."""

    TOPIC: ClassVar[bytes] = protocol.TOPIC_STATUS_REPLY

    request_seq: int
    service: str
    state: str
    details: dict[str, str] = field(default_factory=dict)


@_message
class Feedback(Message):
    """What the participant is shown about one trial (decoder -> stimulus computer, reliable channel).

    One per trial, chosen by the decoder's feedback policy (``decoder.feedback``): the retrieval ``topk_labels`` /
    ``topk_scores`` (best first) and ``score`` (the top-1 similarity), the reconstruction as ``image_path`` (a PNG on
    the decoder host) and, optionally, its PNG bytes in ``image_png``. ``status`` is ``on_time`` when the result was
    ready within ``deadline_s`` of ``acquisition_time`` (the acquisition of the last volume the estimate used),
    otherwise ``late``; a late notice without a result (policy ``late: placeholder``) has empty top-k and ``text``
    says what to show instead. ``averaged`` results decode the image's average over ``n_repeats`` trials.
    """

    TOPIC: ClassVar[bytes] = protocol.TOPIC_FEEDBACK
    ARRAYS: ClassVar[dict[str, tuple[str, int]]] = {"image_png": ("uint8", 1)}

    run: int
    trial: int
    trial_type: str = ""
    estimate_kind: str
    estimate_version: int = 0
    status: str = protocol.FEEDBACK_ON_TIME
    topk_labels: tuple[str, ...] = ()
    topk_scores: tuple[float, ...] = ()
    score: float = math.nan
    averaged: bool = False
    n_repeats: int = 1
    image_path: str | None = None
    image_png: np.ndarray | None = None
    text: str = ""
    acquisition_time: float
    deadline_s: float
    result_done_at: float

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.status not in protocol.FEEDBACK_STATUSES:
            raise MessageError("Feedback.status", f"must be one of {list(protocol.FEEDBACK_STATUSES)}, "
                                                  f"got {self.status!r}")
        if len(self.topk_scores) != len(self.topk_labels):
            raise MessageError("Feedback.topk_scores", f"has {len(self.topk_scores)} items, topk_labels has "
                                                       f"{len(self.topk_labels)}")


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls
    for cls in (VolumeStatus, TrialBetas, DecodeResult, Heartbeat, StimulusEvent, RunTrigger, Ack, StatusRequest,
                StatusReply, DesignNotice, Feedback)
}


# --- field checking ------------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls, globalns={"np": np, **vars(typing)})
        hints = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
        _HINTS[cls] = hints
    return hints


def _type_problem(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, normalised value) for a JSON-able value against an annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return (type(None) in args), None
        for option in args:
            if option is type(None):
                continue
            ok, out = _type_problem(value, option)
            if ok:
                return True, out
        return False, value
    if tp is bool:
        return isinstance(value, (bool, np.bool_)), bool(value) if isinstance(value, (bool, np.bool_)) else value
    if tp is int:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        return ok, int(value) if ok else value
    if tp is float:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if not isinstance(value, (list, tuple)):
            return False, value
        item_tp = args[0] if args else Any
        out = []
        for item in value:
            ok, norm = _type_problem(item, item_tp)
            if not ok:
                return False, value
            out.append(norm)
        return True, tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        kt, vt = args
        out = {}
        for k, v in value.items():
            ok_k, nk = _type_problem(k, kt)
            ok_v, nv = _type_problem(v, vt)
            if not (ok_k and ok_v):
                return False, value
            out[nk] = nv
        return True, out
    if tp is Any:
        return True, value
    return isinstance(value, tp), value


def _check_value(cls: type[Message], name: str, value: Any) -> Any:
    where = f"{cls.__name__}.{name}"
    if name in cls.ARRAYS:
        dtype, ndim = cls.ARRAYS[name]
        if value is None:
            if type(None) in typing.get_args(_hints(cls)[name]):
                return None
            raise MessageError(where, "is required")
        if not isinstance(value, np.ndarray):
            raise MessageError(where, f"expected a numpy array, got {type(value).__name__}")
        if value.dtype != np.dtype(dtype):
            raise MessageError(f"{where}.dtype", f"expected {dtype}, got {value.dtype}")
        if value.ndim != ndim:
            raise MessageError(f"{where}.shape", f"expected {ndim} dimension(s), got shape {value.shape}")
        return value if value.flags.c_contiguous else np.ascontiguousarray(value)
    ok, out = _type_problem(value, _hints(cls)[name])
    if not ok:
        raise MessageError(where, f"expected {_type_name(_hints(cls)[name])}, got {value!r:.80}")
    length = cls.FIXED_LENGTHS.get(name)
    if length is not None and len(out) != length:
        raise MessageError(where, f"expected {length} items, got {len(out)}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "") if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))


# --- encode / decode -----------------------------------------------------------------------------------------------


def encode_header(msg: Message) -> dict:
    """The JSON header object of ``msg`` (frame 1), without its array buffers."""
    cls = type(msg)
    fields = {}
    arrays = []
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.name in cls.ARRAYS:
            if value is not None:
                arrays.append({"name": f.name, "dtype": value.dtype.str, "shape": list(value.shape),
                               "nbytes": int(value.nbytes)})
            continue
        if f.name == "schema_version":
            continue
        fields[f.name] = list(value) if isinstance(value, tuple) else value
    return {"proto": protocol.PROTOCOL_NAME, "schema_version": msg.schema_version, "type": cls.__name__,
            "fields": fields, "arrays": arrays}


def encode(msg: Message) -> list:
    """``[topic, header, buffers...]`` for ``socket.send_multipart(frames, copy=False)``: arrays are not copied."""
    header = json.dumps(encode_header(msg), separators=(",", ":")).encode("utf-8")
    frames: list = [type(msg).TOPIC, header]
    for name, array in msg.arrays().items():
        frames.append(memoryview(array.reshape(-1)).cast("B") if array.size else b"")
    return frames


def _frame_bytes(frame: Any) -> memoryview:
    """A read-only view of a received frame (``zmq.Frame`` with copy=False, or bytes / memoryview)."""
    buffer = getattr(frame, "buffer", None)
    if buffer is not None:
        return memoryview(buffer)
    return memoryview(frame)


def decode(frames: Sequence[Any]) -> Message:
    """Rebuild a message from its frames, checking everything; raises :class:`MessageError` naming the field."""
    if len(frames) < 2:
        raise MessageError("frames", f"expected at least 2 frames (topic, header), got {len(frames)}")
    topic = bytes(_frame_bytes(frames[0]))
    try:
        header = json.loads(bytes(_frame_bytes(frames[1])).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError("header", f"not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise MessageError("header", f"expected a JSON object, got {type(header).__name__}")
    if header.get("proto") != protocol.PROTOCOL_NAME:
        raise MessageError("proto", f"expected {protocol.PROTOCOL_NAME!r}, got {header.get('proto')!r}")
    if header.get("schema_version") != SCHEMA_VERSION:
        raise MessageError("schema_version", f"expected {SCHEMA_VERSION}, got {header.get('schema_version')!r}")
    type_name = header.get("type")
    cls = MESSAGE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise MessageError("type", f"unknown message type {type_name!r}")
    if topic != cls.TOPIC:
        raise MessageError("topic", f"{type_name} travels on topic {cls.TOPIC!r}, got {topic!r}")
    fields = header.get("fields")
    arrays = header.get("arrays", [])
    if not isinstance(fields, dict):
        raise MessageError("fields", "expected a JSON object")
    if not isinstance(arrays, list):
        raise MessageError("arrays", "expected a JSON list")

    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in known or name in cls.ARRAYS or name == "schema_version":
            raise MessageError(f"{type_name}.{name}", "unknown field")
        kwargs[name] = value
    for name, f in known.items():
        if name in cls.ARRAYS or name == "schema_version" or name in kwargs:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MessageError(f"{type_name}.{name}", "missing")

    if len(frames) != 2 + len(arrays):
        raise MessageError("frames", f"header lists {len(arrays)} array(s) but {len(frames) - 2} buffer frame(s) came")
    for index, spec in enumerate(arrays):
        kwargs.update(_decode_array(cls, spec, frames[2 + index], kwargs))
    for name in cls.ARRAYS:
        kwargs.setdefault(name, None)
    return cls(**kwargs)


def _decode_array(cls: type[Message], spec: Any, frame: Any, seen: dict) -> dict[str, np.ndarray]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise MessageError("arrays", f"entry {spec!r:.80} has no name")
    name = spec["name"]
    where = f"{cls.__name__}.{name}"
    if name not in cls.ARRAYS:
        raise MessageError(where, "unknown array")
    if name in seen:
        raise MessageError(where, "listed twice")
    want_dtype, want_ndim = cls.ARRAYS[name]
    try:
        dtype = np.dtype(spec.get("dtype"))
    except TypeError:
        raise MessageError(f"{where}.dtype", f"not a numpy dtype: {spec.get('dtype')!r}") from None
    if dtype != np.dtype(want_dtype) or dtype.byteorder == ">":
        raise MessageError(f"{where}.dtype", f"expected {np.dtype(want_dtype).str}, got {spec.get('dtype')!r}")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) != want_ndim
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise MessageError(f"{where}.shape", f"expected {want_ndim} non-negative integer(s), got {shape!r}")
    nbytes = spec.get("nbytes")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes != expected:
        raise MessageError(f"{where}.nbytes", f"header says {nbytes!r} but dtype and shape give {expected}")
    buffer = _frame_bytes(frame)
    if buffer.nbytes != expected:
        raise MessageError(f"{where}.nbytes", f"frame has {buffer.nbytes} bytes, header says {expected}")
    return {name: np.frombuffer(buffer, dtype=dtype).reshape(shape)}
