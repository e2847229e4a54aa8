"""SpanServer and SpanBook with real sockets and real client processes."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import orjson
import pytest

from renacerd.client.protocol import (
    MAX_FRAME,
    Ack,
    Dropped,
    Hello,
    SpanEnd,
    SpanSet,
    SpanStart,
    TraceMe,
    encode,
)
from renacerd.experiment_span import ExperimentMetadata, SpanType, StatusCode
from renacerd.serve.span_server import (
    PeerCred,
    SocketInUseError,
    SpanServer,
    sockets_from_systemd,
)
from renacerd.serve.spans import DISCONNECTED, EXITED, SpanBook
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def daemon(span_daemon):
    """A SpanServer feeding a SpanBook on a fresh socket path (conftest's span_daemon)."""
    return span_daemon


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def raw_client(path: str, hello: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    if hello:
        s.send(encode(Hello(pid=os.getpid())))
    return s


def span_start(span_id: str, mono: int = 100, md: ExperimentMetadata | None = None) -> bytes:
    return encode(SpanStart(span_id, TRACE, None, "step", SpanType.EXPERIMENT,
                            md or ExperimentMetadata("m", step=1), mono, 1000 + mono, 7, 1))


def span_end(span_id: str, mono: int = 200) -> bytes:
    return encode(SpanEnd(span_id, StatusCode.OK, "", None, mono, 1000 + mono, 2))


def closed_by_server(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(10) == b""
    except ConnectionResetError:
        return True


def run_python(code: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=60, **kw)


def test_peercred_pid_is_the_real_client_pid(daemon):
    server, book = daemon
    proc = run_python(f"""
        import os
        from renacerd.client.core import configure, experiment_span, stats
        configure(socket={server.address!r})
        with experiment_span("step", model_name="m", step=3):
            pass
        print(os.getpid(), stats()["sent"])
    """)
    assert proc.returncode == 0, proc.stderr
    pid, sent = map(int, proc.stdout.split())
    assert sent == 4  # hello, ring, span_start, span_end
    assert wait_for(lambda: book.counts()["spans_ended"] == 1)
    (rec,) = book.drain()
    assert rec.process_id == pid != os.getpid()
    assert rec.resource()["process.pid"] == pid
    assert rec.resource()["process.user.id"] == os.getuid()
    assert rec.attributes()["experiment.step"] == "3"


def test_pid_in_hello_is_not_trusted(daemon):
    server, book = daemon
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(server.address)
    s.send(encode(Hello(pid=1)))
    s.send(span_start("00000000000000aa"))
    s.send(span_end("00000000000000aa"))
    assert wait_for(lambda: book.counts()["spans_ended"] == 1)
    assert book.drain()[0].process_id == os.getpid()
    s.close()


def test_garbage_closes_only_that_connection(daemon):
    server, book = daemon
    good = raw_client(server.address)
    good.send(span_start("0000000000000001"))
    assert wait_for(lambda: book.counts()["spans_started"] == 1)
    bad = raw_client(server.address)
    bad.send(b"\x00garbage{")
    assert closed_by_server(bad)
    assert server.stats["protocol_errors"] == 1
    good.send(span_end("0000000000000001"))
    assert wait_for(lambda: book.counts()["spans_ended"] == 1)
    assert book.counts()["ended_by_disconnect"] == 0
    good.close()
    bad.close()


@pytest.mark.parametrize(
    ("frames", "hello"),
    [
        ([b"x" * (MAX_FRAME + 100)], True),
        ([b'{"t":"span_start"'], True),
        ([orjson.dumps({"t": "hello", "v": 99, "pid": 1})], False),
        ([span_start("0000000000000001")], False),
        ([orjson.dumps({"t": "dropped", "n": -1})], True),
    ],
    ids=["oversized", "truncated", "wrong-version", "no-hello", "wrong-type"],
)
def test_bad_input_closes_connection(daemon, frames, hello):
    server, book = daemon
    s = raw_client(server.address, hello=hello)
    for frame in frames:
        s.send(frame)
    assert closed_by_server(s)
    assert wait_for(lambda: server.stats["protocol_errors"] == 1)
    s.close()


def test_span_set_and_error_status(daemon):
    server, book = daemon
    s = raw_client(server.address)
    s.send(span_start("0000000000000002", md=ExperimentMetadata("m", metrics={"a": 1.0})))
    s.send(encode(SpanSet("0000000000000002", ExperimentMetadata(loss=0.5, metrics={"b": 2.0}),
                          frozenset({"loss", "metrics"}))))
    s.send(encode(SpanEnd("0000000000000002", StatusCode.ERROR, "bad", "KeyError", 300, 1300,
                          9)))
    s.send(encode(Dropped(4)))
    assert wait_for(lambda: book.counts()["client_dropped"] == 4)
    (rec,) = book.drain()
    assert rec.status_code is StatusCode.ERROR and rec.status_message == "bad"
    assert rec.attributes() == {
        "experiment.model_name": "m", "experiment.loss": "0.5",
        "experiment.metrics.a": "1", "experiment.metrics.b": "2", "span.type": "experiment",
        "exception.type": "KeyError"}
    assert (rec.start_mono_nanos, rec.end_mono_nanos) == (100, 300)
    assert (rec.start_time_nanos, rec.end_time_nanos, rec.duration_nanos) == (1100, 1300, 200)
    assert rec.logical_clock == 9 and rec.thread_id == 7
    s.close()


def test_end_without_start_is_counted(daemon):
    server, book = daemon
    s = raw_client(server.address)
    s.send(span_end("0000000000000003"))
    s.send(encode(Dropped(0)))
    assert wait_for(lambda: book.counts()["orphan_ends"] == 1)
    assert book.drain() == []
    assert server.stats["protocol_errors"] == 0
    s.close()


def test_client_cannot_end_another_process_span(daemon):
    server, book = daemon
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import socket, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from renacerd.client.protocol import encode, Hello
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect({server.address!r})
        s.send(encode(Hello()))
        s.send(sys.stdin.buffer.read())
        time.sleep(0.3)
    """)], stdin=subprocess.PIPE)
    mine = raw_client(server.address)
    mine.send(span_start("0000000000000004"))
    assert wait_for(lambda: book.counts()["spans_started"] == 1)
    proc.communicate(span_end("0000000000000004"), timeout=30)
    assert wait_for(lambda: book.counts()["orphan_ends"] == 1)
    assert book.counts()["spans_ended"] == 0
    mine.send(span_end("0000000000000004"))
    assert wait_for(lambda: book.counts()["spans_ended"] == 1)
    mine.close()


def test_disconnect_mid_span_then_exit_time(sock_dir):
    book = SpanBook(grace_ns=10**12)
    with SpanServer(os.path.join(sock_dir, "g.sock"), on_message=book.handle,
                    on_disconnect=book.disconnected) as server:
        s = raw_client(server.address)
        s.send(span_start("0000000000000005", mono=500))
        s.send(span_start("0000000000000006", mono=600))
        assert wait_for(lambda: book.counts()["spans_started"] == 2)
        s.close()
        assert wait_for(lambda: server.stats["open"] == 0)
        assert book.drain() == []  # held for the tracer's exit time
        assert book.process_exited(os.getpid(), 900, 1900) == 2
        recs = sorted(book.drain(), key=lambda r: r.start_mono_nanos)
    assert [(r.start_mono_nanos, r.end_mono_nanos) for r in recs] == [(500, 900), (600, 900)]
    assert all(r.status_code is StatusCode.ERROR and r.status_message == EXITED for r in recs)
    assert all(r.end_time_nanos == 1900 for r in recs)


def test_grace_counts_in_the_time_the_tracer_has_read_through(sock_dir):
    # A starved tracer reads a process's exit late: the grace must not run out on the
    # clock while the exit record waits unread in the ring.
    book = SpanBook(grace_ns=10**9)
    with SpanServer(os.path.join(sock_dir, "w.sock"), on_message=book.handle,
                    on_disconnect=book.disconnected) as server:
        s = raw_client(server.address)
        before = time.monotonic_ns()
        s.send(span_start("0000000000000009", mono=before))
        assert wait_for(lambda: book.counts()["spans_started"] == 1)
        s.close()
        assert wait_for(lambda: server.stats["open"] == 0 and book.counts()["open"] == 1)
        # the tracer has read only up to before the disconnect, then not a full grace past it
        assert book.drain(before) == []
        assert book.drain(before + 10**9 - 1) == []
        assert book.process_exited(os.getpid(), before + 7, 1007 + before) == 1
        (rec,) = book.drain(before)
    assert (rec.status_message, rec.end_mono_nanos, rec.end_time_nanos) == (
        EXITED, before + 7, 1007 + before)
    assert book.counts()["ended_by_exit"] == 1


def test_a_start_read_after_its_process_exit_still_ends_at_the_exit(sock_dir):
    # The tracer may read a process's exit before the socket thread reads that process's
    # span_start; a start stamped after the exit is a new process that reused the pid.
    book = SpanBook(grace_ns=10**9)
    exit_mono = time.monotonic_ns()
    assert book.process_exited(os.getpid(), exit_mono, 1000 + exit_mono) == 0
    with SpanServer(os.path.join(sock_dir, "x.sock"), on_message=book.handle,
                    on_disconnect=book.disconnected) as server:
        s = raw_client(server.address)
        s.send(span_start("000000000000000a", mono=exit_mono - 5))
        s.send(span_start("000000000000000b", mono=exit_mono + 5))
        assert wait_for(lambda: book.counts()["spans_started"] == 2)
        s.close()
        assert wait_for(lambda: server.stats["open"] == 0)
        (rec,) = book.drain(exit_mono)
        assert (rec.span_id.hex(), rec.status_message, rec.end_mono_nanos) == (
            "000000000000000a", EXITED, exit_mono)
        (rec,) = book.drain(time.monotonic_ns() + 10**9)
    assert (rec.span_id.hex(), rec.status_message) == ("000000000000000b", DISCONNECTED)


def test_disconnect_without_exit_ends_after_grace(daemon):
    server, book = daemon  # grace 0
    s = raw_client(server.address)
    s.send(span_start("0000000000000007", mono=time.monotonic_ns()))
    assert wait_for(lambda: book.counts()["spans_started"] == 1)
    s.close()
    assert wait_for(lambda: book.counts()["open"] == 1 and server.stats["open"] == 0)
    (rec,) = book.drain()
    assert rec.status_code is StatusCode.ERROR and rec.status_message == DISCONNECTED
    assert rec.end_mono_nanos >= rec.start_mono_nanos


def test_trace_me_answered(sock_dir):
    asked = []

    def trace_request(peer: PeerCred, msg: TraceMe):
        asked.append((peer.pid, msg.run))
        return True, ""

    for book, expect in ((SpanBook(), False), (SpanBook(trace_request=trace_request), True)):
        with SpanServer(os.path.join(sock_dir, "t.sock"), on_message=book.handle) as server:
            s = raw_client(server.address)
            s.send(encode(TraceMe(42, "run-a")))
            s.settimeout(5)
            from renacerd.client.protocol import decode

            ack = decode(s.recv(MAX_FRAME))
            assert isinstance(ack, Ack) and ack.request_id == 42 and ack.ok is expect
            assert expect or "renacerd serve" in ack.reason
            s.close()
    assert asked == [(os.getpid(), "run-a")]


def test_many_concurrent_client_processes_no_span_lost_no_fd_leak(sock_dir):
    n_clients, n_spans = 60, 25
    before = fd_count()
    book = SpanBook()
    server = SpanServer(os.path.join(sock_dir, "m.sock"), on_message=book.handle,
                        on_disconnect=book.disconnected)
    server.start()
    from renacerd.client import core as client

    client.configure(socket=server.address)
    pids = []
    for i in range(n_clients):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for k in range(n_spans):
                    with client.experiment_span("step", model_name="m", step=k,
                                                metrics={"i": float(i)}):
                        pass
                code = 0 if client.stats()["dropped"] == 0 else 3
            finally:
                os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    client.configure(socket=os.path.join(sock_dir, "absent.sock"))
    assert codes == [0] * n_clients
    assert wait_for(lambda: book.counts()["spans_ended"] == n_clients * n_spans)
    assert wait_for(lambda: server.stats["open"] == 0)
    server.stop()
    counts = book.counts()
    assert counts["spans_started"] == n_clients * n_spans
    assert counts["orphan_ends"] == 0 and counts["open"] == 0
    assert server.stats["connections"] == n_clients
    records = book.drain()
    assert len(records) == n_clients * n_spans
    assert {r.process_id for r in records} == set(pids)
    # a connection's fd is closed by its reader as it ends, which may lag stop() a moment
    assert wait_for(lambda: fd_count() == before), (fd_count(), before)
    assert not os.path.exists(os.path.join(sock_dir, "m.sock"))


def test_socket_in_use_by_live_daemon(daemon):
    server, _ = daemon
    other = SpanServer(server.address, on_message=lambda p, m: None)
    with pytest.raises(SocketInUseError, match="already listens"):
        other.start()
    assert os.path.exists(server.address)
    # the first server still serves
    s = raw_client(server.address)
    s.send(encode(Dropped(1)))
    assert wait_for(lambda: daemon[1].counts()["client_dropped"] == 1)
    s.close()


def test_stale_socket_file_is_replaced(sock_dir):
    path = os.path.join(sock_dir, "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(path)
    dead.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with SpanServer(path, on_message=lambda p, m: None) as server:
        raw_client(server.address).close()


def test_regular_file_is_never_replaced(sock_dir):
    path = os.path.join(sock_dir, "file.sock")
    Path(path).write_text("precious")
    with pytest.raises(SocketInUseError, match="not a socket"):
        SpanServer(path, on_message=lambda p, m: None).start()
    assert Path(path).read_text() == "precious"


def test_socket_mode(sock_dir):
    for mode in (0o660, 0o600):
        path = os.path.join(sock_dir, f"mode{mode:o}.sock")
        with SpanServer(path, on_message=lambda p, m: None, mode=mode):
            assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_authorize_refuses(sock_dir):
    seen = []

    def authorize(peer):
        seen.append(peer)
        return False

    with SpanServer(os.path.join(sock_dir, "a.sock"), on_message=lambda p, m: None,
                    authorize=authorize) as server:
        s = raw_client(server.address, hello=False)
        assert closed_by_server(s)
        assert wait_for(lambda: server.stats["rejected"] == 1)
        s.close()
    assert seen[0].pid == os.getpid() and seen[0].uid == os.getuid()


def test_rate_limit_throttles_without_loss(sock_dir):
    book = SpanBook()
    with SpanServer(os.path.join(sock_dir, "r.sock"), on_message=book.handle, rate=200,
                    burst=20) as server:
        s = raw_client(server.address)
        t0 = time.monotonic()
        for _ in range(60):
            s.send(encode(Dropped(1)))
        assert wait_for(lambda: book.counts()["client_dropped"] == 60)
        elapsed = time.monotonic() - t0
        s.close()
        assert server.stats["throttled"] >= 1
    # 20 from the bucket, 40 more at 200/s take about 0.2 s
    assert elapsed >= 0.15


def test_stream_socket_refused():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(ValueError, match="ListenSequentialPacket"):
            SpanServer(sock=s, on_message=lambda p, m: None)
    finally:
        s.close()


def test_systemd_socket_activation(sock_dir):
    path = os.path.join(sock_dir, "sd.sock")
    proc = run_python(f"""
        import os, socket
        from renacerd.serve.span_server import SpanServer, sockets_from_systemd
        from renacerd.serve.spans import SpanBook
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind({path!r})
        listener.listen()
        fd = listener.detach()
        if fd != 3:
            os.dup2(fd, 3)
            os.close(fd)
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["LISTEN_FDS"] = "1"
        socks = sockets_from_systemd()
        assert "LISTEN_FDS" not in os.environ
        assert [s.fileno() for s in socks] == [3], socks
        book = SpanBook()
        with SpanServer(sock=socks[0], on_message=book.handle) as server:
            from renacerd.client.core import configure, experiment_span
            configure(socket=server.address)
            with experiment_span("s"):
                pass
            import time
            for _ in range(500):
                if book.counts()["spans_ended"]:
                    break
                time.sleep(0.01)
            print(server.address, book.counts()["spans_ended"])
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [path, "1"]


def test_systemd_env_for_another_pid_is_ignored(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert sockets_from_systemd() == []
    assert "LISTEN_PID" not in os.environ


def test_callback_failure_keeps_serving(sock_dir):
    calls = []

    def on_message(peer, msg):
        calls.append(msg)
        if isinstance(msg, Dropped) and msg.count == 1:
            raise RuntimeError("handler bug")
        return None

    with SpanServer(os.path.join(sock_dir, "c.sock"), on_message=on_message) as server:
        s = raw_client(server.address)
        s.send(encode(Dropped(1)))
        s.send(encode(Dropped(2)))
        assert wait_for(lambda: len(calls) == 3)
        assert server.stats["callback_errors"] == 1 and server.stats["open"] == 1
        s.close()


def test_max_open_spans_per_connection(sock_dir):
    book = SpanBook(max_open_per_connection=3)
    with SpanServer(os.path.join(sock_dir, "o.sock"), on_message=book.handle) as server:
        s = raw_client(server.address)
        for i in range(1, 6):
            s.send(span_start(f"{i:016x}"))
        assert wait_for(lambda: book.counts()["rejected_starts"] == 2)
        assert book.counts()["spans_started"] == 3
        s.close()


def test_stop_ends_nothing_silently(sock_dir):
    book = SpanBook(grace_ns=10**12)
    server = SpanServer(os.path.join(sock_dir, "s.sock"), on_message=book.handle,
                        on_disconnect=book.disconnected)
    server.start()
    s = raw_client(server.address)
    s.send(span_start("0000000000000009"))
    assert wait_for(lambda: book.counts()["spans_started"] == 1)
    server.stop()
    (rec,) = book.end_all()
    assert rec.status_code is StatusCode.ERROR
    s.close()


def test_server_thread_survives_many_bad_clients(daemon):
    server, book = daemon
    good = raw_client(server.address)
    for i in range(30):
        bad = raw_client(server.address, hello=i % 2 == 0)
        bad.send(os.urandom(64))
        bad.close()
    good.send(span_start("000000000000000a"))
    good.send(span_end("000000000000000a"))
    assert wait_for(lambda: book.counts()["spans_ended"] == 1)
    assert threading.active_count() >= 2
    good.close()
