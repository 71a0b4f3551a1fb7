"""Benchmark of the transport: latency of one 20k-voxel TrialBetas over loopback tcp.

Run from the repository root::

    python bench/transport.py            # 2000 messages per method
    python bench/transport.py --quick    # 50 messages per method (smoke run)

Methods (one message in flight at a time, so this is latency, not throughput; sender and receiver are two threads
of this process, so one ``perf_counter`` clock times both ends):

- ``zero_copy``: ``rt_mindeye.transport.messages.encode`` -> PUSH ``send_multipart(copy=False)`` -> PULL
  ``recv_multipart(copy=False)`` -> ``decode`` (array = ``np.frombuffer`` over the received frame);
- ``json_list`` (baseline): the same fields with the betas as a JSON list of floats in one frame
  (``json.dumps(betas.tolist())`` -> ``np.asarray(json.loads(...), float32)``), the usual "just JSON" approach;
- ``reliable_nofsync`` / ``reliable_fsync``: the full reliable channel (journal append, optional fsync, agent
  thread, ROUTER -> DEALER, ack) from ``ReliableSender.send`` to ``ReliableReceiver.recv``;
- ``send_call_no_decoder_*``: not a latency but what acquisition pays per trial: the duration of the
  ``ReliableSender.send`` call itself (journal write, optional fsync, wake-up) with no decoder connected.

Prints a rich table (p50 / p99 / mean in microseconds, ratio of p50 to the JSON baseline) and writes
``bench/results/transport.json``. Timings on a busy machine are not meaningful: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import zmq  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from rt_mindeye.transport.channel import ReliableReceiver, ReliableSender  # noqa: E402
from rt_mindeye.transport.messages import TrialBetas, decode, encode, encode_header  # noqa: E402

RESULTS = REPO / "bench" / "results" / "transport.json"
N_VOXELS = 20_000


def make_trial(i: int, rng: np.random.Generator) -> TrialBetas:
    return TrialBetas(session="bench", run=1, trial=i, trial_type="image", onset=4.0 * i, estimate_kind="fast",
                      estimate_version=1, n_volumes=10, acquisition_time=time.time(),
                      betas=rng.standard_normal(N_VOXELS).astype(np.float32))


def _pair(ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    return push, pull


def _one_way(n: int, send, receive) -> np.ndarray:
    """Latency of n messages, one at a time: the receiving thread stamps arrival after decoding."""
    arrived = np.zeros(n)
    ready = threading.Event()
    done = threading.Event()

    def consumer():
        ready.set()
        for i in range(n):
            msg = receive()
            arrived[i] = time.perf_counter()
            if msg.trial != i:
                raise RuntimeError(f"bench: got trial {msg.trial}, expected {i}")
        done.set()

    thread = threading.Thread(target=consumer, daemon=True)
    thread.start()
    ready.wait(5)
    rng = np.random.default_rng(0)
    messages = [make_trial(i, rng) for i in range(n)]
    sent = np.zeros(n)
    for i, msg in enumerate(messages):
        sent[i] = time.perf_counter()
        send(msg)
        while arrived[i] == 0.0:  # one in flight at a time
            if not thread.is_alive():
                raise RuntimeError("bench: consumer thread died")
            time.sleep(0)
    done.wait(10)
    return (arrived - sent) * 1e6


def bench_zero_copy(n: int) -> np.ndarray:
    ctx = zmq.Context()
    push, pull = _pair(ctx)
    try:
        return _one_way(n, lambda m: push.send_multipart(encode(m), copy=False),
                        lambda: decode(pull.recv_multipart(copy=False)))
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def bench_json_list(n: int) -> np.ndarray:
    ctx = zmq.Context()
    push, pull = _pair(ctx)

    def send(m: TrialBetas) -> None:
        header = encode_header(m)
        header["fields"]["betas"] = m.betas.tolist()
        push.send(json.dumps(header).encode())

    def receive() -> TrialBetas:
        header = json.loads(pull.recv())
        fields = header["fields"]
        fields["betas"] = np.asarray(fields["betas"], dtype=np.float32)
        return TrialBetas(**fields)

    try:
        return _one_way(n, send, receive)
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def bench_reliable(n: int, fsync: bool) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        sender = ReliableSender("tcp://127.0.0.1:0", Path(tmp) / "bench.journal", session="bench", fsync=fsync)
        receiver = ReliableReceiver(sender.last_endpoint, session="bench")
        try:
            # warm-up: let the receiver connect and catch up before timing
            deadline = time.monotonic() + 10
            while not (sender.peer_alive and receiver.peer_alive) and time.monotonic() < deadline:
                time.sleep(0.01)

            def receive():
                while True:
                    msg = receiver.recv(10.0)
                    if msg is None:
                        raise RuntimeError("bench: reliable receiver timed out")
                    return msg

            return _one_way(n, sender.send, receive)
        finally:
            receiver.close()
            sender.close()


def bench_send_call(n: int, fsync: bool) -> np.ndarray:
    """What acquisition pays: duration of ``ReliableSender.send`` with no decoder connected at all."""
    rng = np.random.default_rng(0)
    messages = [make_trial(i, rng) for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        sender = ReliableSender("tcp://127.0.0.1:0", Path(tmp) / "bench.journal", session="bench", fsync=fsync)
        try:
            durations = np.zeros(n)
            for i, msg in enumerate(messages):
                start = time.perf_counter()
                sender.send(msg)
                durations[i] = time.perf_counter() - start
            return durations * 1e6
        finally:
            sender.close()


def summarise(name: str, micros: np.ndarray) -> dict:
    return {"method": name, "n": int(micros.size), "p50_us": float(np.percentile(micros, 50)),
            "p99_us": float(np.percentile(micros, 99)), "mean_us": float(micros.mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 messages per method (smoke run)")
    parser.add_argument("-n", type=int, default=None, help="messages per method (default 2000, --quick 50)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n = args.n or (50 if args.quick else 2000)

    rows = [summarise("json_list", bench_json_list(n)), summarise("zero_copy", bench_zero_copy(n)),
            summarise("reliable_nofsync", bench_reliable(n, fsync=False)),
            summarise("reliable_fsync", bench_reliable(max(10, n // 4), fsync=True)),
            summarise("send_call_no_decoder_nofsync", bench_send_call(n, fsync=False)),
            summarise("send_call_no_decoder_fsync", bench_send_call(max(10, n // 4), fsync=True))]
    baseline = rows[0]["p50_us"]
    for row in rows:
        comparable = not row["method"].startswith("send_call")  # a call duration, not a delivery latency
        row["p50_vs_json_list"] = baseline / row["p50_us"] if comparable and row["p50_us"] else None

    table = Table(title=f"TrialBetas ({N_VOXELS} float32 voxels) over loopback tcp, one message in flight")
    for column in ("method", "n", "p50 µs", "p99 µs", "mean µs", "p50 speed-up vs json_list"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    for row in rows:
        ratio = row["p50_vs_json_list"]
        table.add_row(row["method"], str(row["n"]), f"{row['p50_us']:.0f}", f"{row['p99_us']:.0f}",
                      f"{row['mean_us']:.0f}", "-" if ratio is None else f"{ratio:.1f}x")
    Console().print(table)

    report = {"benchmark": "transport", "n_voxels": N_VOXELS, "quick": args.quick, "python": platform.python_version(),
              "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "machine": platform.platform(),
              "results": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
