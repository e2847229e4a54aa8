"""The service under hostile input, load and faults: it stays up and loses nothing.

Ring-buffer overflow (losses counted, persisted, shown) is covered by
tests/bpf/test_capture.py::test_tiny_ring_buffer_losses_are_counted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time

import orjson
import pytest
from test_service import Service, _progs, _progs_left, _store, finish

from renacerd.client import protocol
from renacerd.experiment_span import StatusCode

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the service loads BPF: needs root")

FUZZ_MESSAGES = 10_000
CLIENTS = 200
GOOD_SPANS = 300


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def steady(pid: int, quiet: float = 0.3) -> int:
    """The fd count once it has not changed for `quiet` seconds (a just-answered connection
    is closed by its thread a moment after the reply)."""
    last, since = fd_count(pid), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.05)
        if (n := fd_count(pid)) != last:
            last, since = n, time.monotonic()
    return last


def settle(pid: int, want: int, timeout: float = 5.0) -> int:
    """The fd count once it is back to `want` (or whatever it is after `timeout`)."""
    deadline = time.monotonic() + timeout
    while (n := fd_count(pid)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def _valid_start(rng: random.Random) -> dict:
    return {"t": "span_start", "span": f"{rng.getrandbits(64) | 1:016x}",
            "trace": f"{rng.getrandbits(128) | 1:032x}", "parent": None, "name": "fuzz",
            "kind": "experiment", "md": {"step": 1}, "mono": 1, "wall": 1, "tid": 1, "lc": 1}


def fuzz_frame(rng: random.Random, good_run: str) -> bytes:
    """One hostile frame: random, truncated, oversized, wrong-typed, or valid but misplaced."""
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 400))
    if kind == 1:
        frame = orjson.dumps(_valid_start(rng))
        return frame[: rng.randrange(1, len(frame))]
    if kind == 2:
        return b'{"t":"hello","v":1,"pid":1,"client":"' + b"x" * (protocol.MAX_FRAME
                                                                 + rng.randrange(1, 9000)) + b'"}'
    if kind == 3:
        return orjson.dumps(rng.choice([[1, 2], 3, "hello", None, True, {"t": 5}, {"t": "nope"},
                                        {}, {"t": "ack"}, {"t": "dropped", "n": -1}]))
    if kind == 4:
        obj = _valid_start(rng)
        field = rng.choice(list(obj))
        obj[field] = rng.choice([None, -1, 2**70, "z" * 300, [], {}, 1.5, "0" * 16])
        return json.dumps(obj).encode()  # orjson refuses integers past 64 bits
    if kind == 5:
        return orjson.dumps({"t": "trace_me", "req": rng.choice([1, -1, "x", 2**40]),
                             "run": rng.choice([good_run, "", "../etc", "a" * 200, 7, None])})
    if kind == 6:
        return orjson.dumps({"t": "hello", "v": rng.choice([0, 2, "1", None]), "pid": 1})
    return orjson.dumps(rng.choice([{"t": "status"}, _valid_start(rng),
                                    {"t": "span_end", "span": "1" * 16, "status": "ok",
                                     "mono": 1, "wall": 1, "lc": 1}]))


HELLO = protocol.encode(protocol.Hello(pid=1, client="fuzz"))


def fuzz_worker(path: str, seed: int, quota: int, good_run: str, sent: list[int]) -> None:
    """Send `quota` hostile frames over many connections (a closed one is reopened)."""
    rng = random.Random(seed)
    done = 0
    while done < quota:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 18)
        try:
            s.connect(path)
            if rng.random() < 0.6:
                s.send(HELLO)
            for _ in range(rng.randrange(1, 6)):
                if done >= quota:
                    break
                s.send(fuzz_frame(rng, good_run), socket.MSG_NOSIGNAL)
                done += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            s.close()
    sent.append(done)


@pytest.fixture
def svc(tmp_path):
    """A service of this test's own, binding its socket itself."""
    os.chmod(tmp_path, 0o755)
    s = Service(tmp_path, activate=False, caps=False)
    s.wait_ready()
    yield s
    s.stop()


@needs_root
def test_fuzz_10000_messages_while_a_good_client_runs(svc, tmp_path):
    marker = tmp_path / "good-marker"
    marker.touch()
    idle = steady(svc.proc.pid)  # no run: the service traces runs itself, their fds are its
    good = svc.client("good", "churn", str(marker), extra={"STEPS": str(GOOD_SPANS)})
    # Traced first: fuzzed trace requests for the same run name must be refused, not win.
    assert good.stdout.readline() == "started\n"
    assert [r["pid"] for r in svc.status()["runs"]] == [good.pid]
    good.stdin.write("go\n")
    good.stdin.flush()
    sent: list[int] = []
    workers = [threading.Thread(target=fuzz_worker,
                                args=(svc.sock, seed, FUZZ_MESSAGES // 4, "good", sent))
               for seed in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert sum(sent) == FUZZ_MESSAGES
    assert finish(good) == "done 0\n"
    assert svc.proc.poll() is None
    assert svc.status()["pid"] == svc.proc.pid
    info = svc.wait_run_ended("good")
    # every fuzzing connection closed, and the run's own once it ended
    assert settle(svc.proc.pid, idle) == idle
    with _store(svc.db) as st:
        spans = st.span_records(info.id)
    assert len(spans) == GOOD_SPANS
    assert sorted(int(json.loads(s.attributes_json)["experiment.step"]) for s in spans) == list(
        range(GOOD_SPANS))
    assert {(s.span_name, StatusCode(s.status_code)) for s in spans} == {("good",
                                                                         StatusCode.OK)}
    assert info.client_dropped == 0
    assert "protocol error" in svc.text()


def _status_client(path: str, results: list[bool]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(30)
        s.connect(path)
        s.send(HELLO)
        s.send(protocol.encode(protocol.StatusQuery()))
        results.append(isinstance(protocol.decode(s.recv(protocol.MAX_FRAME)),
                                  protocol.ServiceStatus))


@needs_root
def test_200_concurrent_clients_lose_no_span_and_leak_no_fd(svc, tmp_path):
    assert svc.status()["runs"] == []
    service_fds = steady(svc.proc.pid)
    results: list[bool] = []
    threads = [threading.Thread(target=_status_client, args=(svc.sock, results))
               for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * CLIENTS
    assert settle(svc.proc.pid, service_fds) == service_fds

    c = svc.client("many", "fork", str(tmp_path / "m"), extra={"KIDS": str(CLIENTS)})
    assert c.stdout.readline() == "parent\n"
    tracer = svc.status()["runs"][0]["tracer_pid"]
    tracer_fds = steady(tracer)
    c.stdin.write("go\n")
    c.stdin.flush()
    assert c.stdout.readline() == f"forked {CLIENTS} failed 0\n"
    assert settle(tracer, tracer_fds) == tracer_fds
    finish(c)
    info = svc.wait_run_ended("many")
    with _store(svc.db) as st:
        spans = st.span_records(info.id)
        procs = st.processes(info.id)
    children = [s for s in spans if s.span_name == "child"]
    assert len(children) == CLIENTS and len(spans) == CLIENTS + 1
    assert sorted(int(json.loads(s.attributes_json)["experiment.step"]) for s in children) == list(
        range(1, CLIENTS + 1))
    assert {StatusCode(s.status_code) for s in spans} == {StatusCode.OK}
    assert len({s.process_id for s in children}) == CLIENTS
    assert len(procs) == CLIENTS + 1
    assert settle(svc.proc.pid, service_fds) == service_fds


@needs_root
def test_service_sigkill_mid_run_keeps_committed_data(tmp_path):
    os.chmod(tmp_path, 0o755)
    progs_before = _progs()
    svc = Service(tmp_path, activate=False, caps=False)
    svc.wait_ready()
    c = svc.client("killed", "hold", str(tmp_path / "k"))
    assert c.stdout.readline() == "in-span\n"
    assert svc.status()["runs"][0]["tracer_pid"] == svc.proc.pid  # one tracer: the service
    time.sleep(1.2)  # past one flush interval: the attach and the first events are committed
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait()
    info = svc.wait_run_ended("killed")
    assert info.status == "incomplete"
    assert info.error == "daemon stopped before the run ended"
    with _store(svc.db) as st:
        (_, proc), = st.processes(info.id)
        trace = st.load_run("killed")[0]
    assert proc.pid == c.pid
    assert str(tmp_path / "k") in {trace.string(s) for s in trace.columns["s0"] if s >= 0}
    assert c.poll() is None  # the target is unharmed
    assert finish(c) == "released\n"
    assert _progs_left(progs_before) == set()
    svc.stop()


@needs_root
def test_disk_full_stops_tracing_gracefully(tmp_path):
    os.chmod(tmp_path, 0o755)
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(full)], check=True)
    try:
        svc = Service(tmp_path, activate=False, caps=False, db=full / "traces.db")
        svc.wait_ready()
        c = svc.client("filler", "files", str(tmp_path / "nowhere"), extra={"STEPS": "60000"})
        assert finish(c, timeout=120) == "done\n"  # the target is unharmed
        info = svc.wait_run_ended("filler")
        assert info.status == "incomplete"
        assert info.error == f"cannot write {svc.db}: database or disk is full"
        line = f"renacerd: run filler: error: {info.error}\n"
        deadline = time.monotonic() + 10
        while line not in svc.text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert line in svc.text()
        assert svc.proc.poll() is None
        # The store stays readable: what was committed before the disk filled loads.
        with _store(svc.db) as st:
            trace = st.load_run("filler")[0]
        assert trace.pid == c.pid and len(trace) > 0
        svc.stop()
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
