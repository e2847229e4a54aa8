"""The client library against no daemon, a real in-process SpanServer, and real processes."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from renacerd.client import connection
from renacerd.client import core as client
from renacerd.client.core import experiment_span
from renacerd.client.protocol import (
    MAX_FRAME,
    Ack,
    Dropped,
    Hello,
    Ring,
    SpanEnd,
    SpanStart,
    TraceMe,
    decode,
    encode,
)
from renacerd.experiment_span import StatusCode
from renacerd.serve.span_server import SpanServer
from renacerd.serve.spans import SpanBook
from tests.conftest import RawPeer, burst_into_backlog, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def daemon(sock_dir):
    """A real SpanServer + SpanBook; the client is configured to it, and away afterwards."""
    book = SpanBook(grace_ns=0)
    server = SpanServer(os.path.join(sock_dir, "d.sock"), on_message=book.handle,
                        on_disconnect=book.disconnected)
    server.start()
    client.configure(socket=server.address)
    yield server, book
    client.configure(socket=os.path.join(sock_dir, "gone.sock"))
    server.stop()


def records(book, n):
    """The next n records the book finishes, by span name."""
    got = []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        got += book.drain()
        time.sleep(0.005)
    assert len(got) == n, (got, book.counts())
    return {r.span_name: r for r in got}


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e,
                          capture_output=True, text=True, timeout=60)


def test_no_daemon_works_warns_once_never_raises(sock_dir):
    proc = run_python(f"""
        import time
        from renacerd.client.core import configure, experiment_span, stats
        configure(socket={os.path.join(sock_dir, "none.sock")!r})
        t0 = time.perf_counter()
        for i in range(2000):
            with experiment_span("step", model_name="m", step=i, metrics={{"a": 1.0}}) as s:
                s.set(loss=0.5)
        per_span = (time.perf_counter() - t0) / 2000
        try:
            with experiment_span("boom"):
                raise KeyError("k")
        except KeyError:
            pass
        print(s.step, s.loss, s.status.name, stats(), per_span < 50e-6)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(None, 3)[:3] == ["1999", "0.5", "OK"]
    assert "'sent': 0, 'dropped': 0, 'queued': 0, 'connected': False" in proc.stdout
    assert proc.stdout.strip().endswith("True")
    warnings = [ln for ln in proc.stderr.splitlines() if "renacerd" in ln]
    assert len(warnings) == 1 and "not reachable" in warnings[0], proc.stderr


def test_refused_socket_file_is_fail_open(sock_dir):
    path = os.path.join(sock_dir, "dead.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(path)
    dead.close()
    proc = run_python(f"""
        from renacerd.client.core import configure, experiment_span, stats
        configure(socket={path!r})
        with experiment_span("s") as s:
            pass
        print(s.status.name, stats()["connected"])
    """)
    assert proc.returncode == 0 and proc.stdout.split() == ["OK", "False"], proc.stderr
    assert "Connection refused" in proc.stderr


def test_env_socket_and_default(sock_dir, monkeypatch):
    monkeypatch.setenv("RENACER_SOCKET", os.path.join(sock_dir, "env.sock"))
    client.configure()
    assert client._client.path == os.path.join(sock_dir, "env.sock")
    monkeypatch.delenv("RENACER_SOCKET")
    client.configure()
    assert client._client.path == "/run/renacer/renacerd.sock"
    client.configure(socket=os.path.join(sock_dir, "gone.sock"))


def test_nested_spans_reach_daemon(daemon):
    server, book = daemon
    with experiment_span("outer", model_name="gpt-2", epoch=1) as outer, experiment_span(
            "inner", model_name="gpt-2", step=7, metrics={"acc": 0.5, "ppl": 3.0}) as inner:
        inner.set(loss=0.25, metrics={"acc": 0.75})
    assert outer.connected and inner.connected
    recs = records(book, 2)
    o, i = recs["outer"], recs["inner"]
    assert o.parent_span_id is None
    assert i.parent_span_id == o.span_id and i.trace_id == o.trace_id
    assert i.span_id_hex() == inner.span_id and o.trace_id_hex() == outer.trace_id
    assert i.attributes() == {
        "experiment.model_name": "gpt-2", "experiment.step": "7", "experiment.loss": "0.25",
        "experiment.metrics.acc": "0.75", "experiment.metrics.ppl": "3",
        "span.type": "experiment"}
    assert (i.start_mono_nanos, i.end_mono_nanos) == (inner.start_mono_ns, inner.end_mono_ns)
    assert o.start_mono_nanos <= i.start_mono_nanos <= i.end_mono_nanos <= o.end_mono_nanos
    assert i.process_id == os.getpid() and i.thread_id == threading.get_native_id()
    assert i.status_code is StatusCode.OK
    assert o.logical_clock > i.logical_clock
    assert client.current_span() is None


def test_local_record_matches_daemon_record(daemon):
    _, book = daemon
    with experiment_span("s", model_name="m", step=1, metrics={"x": 2.0}) as s:
        pass
    local = s.to_span_record()
    remote = records(book, 1)["s"]
    for name in ("trace_id", "span_id", "parent_span_id", "span_name", "start_mono_nanos",
                 "end_mono_nanos", "start_time_nanos", "end_time_nanos", "logical_clock",
                 "status_code", "attributes_json", "process_id", "thread_id"):
        assert getattr(local, name) == getattr(remote, name), name


def test_exception_marks_error_and_reraises(daemon):
    _, book = daemon
    with pytest.raises(ZeroDivisionError), experiment_span("bad") as s:
        1 / 0  # noqa: B018
    assert s.status is StatusCode.ERROR and s.exception_type == "ZeroDivisionError"
    rec = records(book, 1)["bad"]
    assert rec.status_code is StatusCode.ERROR
    assert rec.status_message == "division by zero"
    assert rec.attributes()["exception.type"] == "ZeroDivisionError"


def test_decorator_sync_and_async(daemon):
    _, book = daemon

    @experiment_span("train_step", model_name="m", step=1)
    def step(x):
        return client.current_span(), x * 2

    @experiment_span("async_step", model_name="m")
    async def astep():
        await asyncio.sleep(0)
        return client.current_span()

    s1, doubled = step(21)
    s2, _ = step(1)
    a = asyncio.run(astep())
    assert doubled == 42 and s1.span_id != s2.span_id and s1.name == "train_step"
    assert a.name == "async_step" and step.__name__ == "step"
    assert wait_for(lambda: book.counts()["spans_ended"] == 3)
    assert sorted(r.span_name for r in book.drain()) == ["async_step", "train_step",
                                                         "train_step"]


def test_decorator_exception(daemon):
    _, book = daemon

    @experiment_span("fails")
    def fails():
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        fails()
    assert records(book, 1)["fails"].status_code is StatusCode.ERROR


def test_async_nesting_follows_tasks(daemon):
    _, book = daemon

    async def worker(name):
        with experiment_span(name) as outer:
            await asyncio.sleep(0.01)
            with experiment_span(name + "-inner") as inner:
                await asyncio.sleep(0.005)
        return outer, inner

    async def main():
        with experiment_span("root") as root:
            results = await asyncio.gather(worker("a"), worker("b"))
        return root, results

    root, [(a, ai), (b, bi)] = asyncio.run(main())
    assert a.parent_span_id == root.span_id and b.parent_span_id == root.span_id
    assert ai.parent_span_id == a.span_id and bi.parent_span_id == b.span_id
    assert len({root.trace_id, a.trace_id, bi.trace_id}) == 1
    recs = records(book, 5)
    assert recs["b-inner"].parent_span_id_hex() == b.span_id


def test_explicit_parent_across_threads(daemon):
    _, book = daemon
    box = {}
    with experiment_span("main") as main:
        def work():
            with experiment_span("no-parent") as orphan:
                pass
            with experiment_span("child", parent=main) as child:
                pass
            box.update(orphan=orphan, child=child)
        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert box["child"].parent_span_id == main.span_id
    assert box["child"].trace_id == main.trace_id
    assert box["orphan"].parent_span_id is None and box["orphan"].trace_id != main.trace_id
    assert box["child"].thread_id != main.thread_id
    recs = records(book, 3)
    assert recs["child"].thread_id == box["child"].thread_id


def test_parent_as_traceparent_string(daemon):
    header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with experiment_span("s", parent=header) as s:
        assert s.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert s.parent_span_id == "00f067aa0ba902b7"
        assert s.traceparent == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{s.span_id}-01"


def test_traceparent_env_joins_trace(daemon):
    server, book = daemon
    header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    proc = run_python(f"""
        from renacerd.client.core import configure, experiment_span
        configure(socket={server.address!r})
        with experiment_span("root") as r:
            with experiment_span("kid") as k:
                pass
        print(r.trace_id, r.parent_span_id, k.parent_span_id == r.span_id)
    """, env={"TRACEPARENT": header})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7",
                                   "True"]
    recs = records(book, 2)
    assert recs["root"].parent_span_id_hex() == "00f067aa0ba902b7"
    assert recs["kid"].trace_id_hex() == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_bad_traceparent_env_is_ignored(sock_dir):
    proc = run_python(f"""
        from renacerd.client.core import configure, experiment_span
        configure(socket={os.path.join(sock_dir, "x.sock")!r})
        with experiment_span("root") as r:
            pass
        print(r.parent_span_id, len(r.trace_id))
    """, env={"TRACEPARENT": "garbage"})
    assert proc.returncode == 0 and proc.stdout.split() == ["None", "32"], proc.stderr
    assert "ignoring TRACEPARENT" in proc.stderr


def test_fork_child_gets_its_own_connection(daemon):
    server, book = daemon
    with experiment_span("parent-step") as parent:
        pass
    assert client.stats()["connected"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            before = client.stats()
            with experiment_span("child-step") as child:
                pass
            after = client.stats()
            ok = (before == {"sent": 0, "dropped": 0, "queued": 0, "connected": False,
                             "ring": False}
                  and after["connected"] and after["ring"] and after["sent"] == 4
                  and child.connected
                  and child.process_id == os.getpid())
            os.write(w, b"ok" if ok else repr((before, after)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    answer = os.read(r, 4096)
    os.close(r)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert answer == b"ok"
    recs = records(book, 2)
    assert recs["child-step"].process_id == pid != recs["parent-step"].process_id
    assert server.stats["connections"] == 2
    # the parent's connection is untouched by the child closing its copy
    with experiment_span("parent-again"):
        pass
    assert records(book, 1)["parent-again"].process_id == os.getpid()
    assert parent.process_id == os.getpid()


def test_fork_inside_span_child_does_not_end_parent_span(daemon):
    _, book = daemon
    with experiment_span("outer") as outer:
        pid = os.fork()
        if pid == 0:
            os._exit(0)  # leaves the with-block in the child without ending anything remote
        os.waitpid(pid, 0)
    recs = records(book, 1)
    assert recs["outer"].span_id_hex() == outer.span_id
    assert book.counts()["orphan_ends"] == 0


def test_full_socket_backlog_then_drops_and_reports_count(listener):
    path, sock = listener
    client.configure(socket=path, ring=False)
    base = client.stats()
    n = 0
    while client.stats()["dropped"] == base["dropped"] and n < 200_000:
        with experiment_span("flood", metrics={"x": 1.0}):
            pass
        n += 1
    assert client.stats()["queued"] >= connection.BACKLOG
    t0 = time.perf_counter()
    for _ in range(100):
        with experiment_span("more"):
            pass
    assert time.perf_counter() - t0 < 0.5  # never blocks on a full socket
    stats = client.stats()
    assert stats["dropped"] > base["dropped"] and stats["connected"]
    conn, _ = sock.accept()
    conn.setblocking(False)
    frames = []

    def read_all():
        while True:
            try:
                frames.append(decode(conn.recv(MAX_FRAME)))
            except BlockingIOError:
                return

    for _ in range(1000):
        read_all()
        if client.stats()["queued"] == 0:
            break
        with experiment_span("nudge"):  # each send first pushes the backlog out
            pass
    with experiment_span("after") as after:  # the backlog is gone: sent at once
        pass
    read_all()
    starts = {f.span_id for f in frames if isinstance(f, SpanStart)}
    ends = {f.span_id for f in frames if isinstance(f, SpanEnd)}
    assert after.span_id in starts
    final = client.stats()
    assert isinstance(frames[0], Hello)
    assert final["queued"] == 0
    assert len(frames) == final["sent"] - base["sent"]
    reports = [f for f in frames if isinstance(f, Dropped)]
    assert reports == [Dropped(final["dropped"] - base["dropped"])]
    # every span the daemon saw start was also ended: no span left open there
    assert starts == ends
    conn.close()


def test_daemon_dies_mid_run_then_returns(sock_dir):
    path = os.path.join(sock_dir, "die.sock")
    book = SpanBook()
    server = SpanServer(path, on_message=book.handle, on_disconnect=book.disconnected)
    server.start()
    client.configure(socket=path)
    try:
        with experiment_span("before"):
            pass
        assert wait_for(lambda: book.counts()["spans_ended"] == 1)
        dropped = client.stats()["dropped"]
        with experiment_span("straddles") as straddles:
            server.stop()
        # A ring write never fails: the client looks at the socket once a second.
        t0 = time.monotonic()
        n = 0
        while client.stats()["connected"] and time.monotonic() - t0 < 3:
            with experiment_span("while-down"):
                pass
            n += 1
            time.sleep(0.005)
        assert not client.stats()["connected"] and time.monotonic() - t0 < 1.5
        # Written after the daemon's last read: the end of "straddles" and every span but the
        # one that found the daemon gone (that one stayed local).
        assert client.stats()["dropped"] - dropped == 1 + 2 * (n - 1)
        book2 = SpanBook()
        server2 = SpanServer(path, on_message=book2.handle)
        server2.start()
        t0 = time.monotonic()
        try:
            while book2.counts()["spans_ended"] == 0 and time.monotonic() - t0 < 5:
                with experiment_span("after"):
                    pass
                time.sleep(0.01)
            # reconnects after the 1 s back-off, not on every span
            assert 0.5 < time.monotonic() - t0 < 3
            assert book2.counts()["orphan_ends"] == 0
            assert straddles.status is StatusCode.OK
        finally:
            server2.stop()
    finally:
        client.configure(socket=os.path.join(sock_dir, "gone.sock"))


def test_unsendable_metadata_is_cleaned_not_fatal(daemon):
    server, book = daemon
    np = pytest.importorskip("numpy")
    metrics = {"nan": math.nan, "inf": math.inf, "flag": True, 3: 1.5, "np": np.float32(0.5),
               "i": 2, "text": "x", "k" * 300: 1.0}
    with experiment_span("weird" * 100, model_name=12, epoch=-1, step=np.int64(5),
                         loss=math.nan, metrics=metrics) as s:
        s.set(loss=np.float64(0.125), epoch=2**40)
    assert s.connected
    assert wait_for(lambda: book.counts()["spans_ended"] == 1)
    (rec,) = book.drain()
    attrs = rec.attributes()
    assert attrs["experiment.model_name"] == "12"
    assert attrs["experiment.step"] == "5"
    assert attrs["experiment.loss"] == "0.125"
    assert "experiment.epoch" not in attrs
    assert attrs["experiment.metrics.flag"] == "1" and attrs["experiment.metrics.3"] == "1.5"
    assert attrs["experiment.metrics.np"] == "0.5" and attrs["experiment.metrics.i"] == "2"
    assert attrs["experiment.metrics." + "k" * 128] == "1"
    assert not {"experiment.metrics.nan", "experiment.metrics.inf",
                "experiment.metrics.text"} & attrs.keys()
    assert len(rec.span_name) == 256
    assert server.stats["protocol_errors"] == 0


def test_stats_count_messages(daemon):
    before = client.stats()["sent"]
    with experiment_span("a") as a:
        a.set(step=3)
    assert client.stats()["sent"] - before in (3, 5)  # (hello, ring +) start, set, end
    assert client.stats()["connected"]


def test_request_tracing_ack_and_nack(sock_dir):
    answers = iter([(True, ""), (False, "not your process tree")])
    asked = []

    def trace_request(peer, msg):
        asked.append((peer.pid, msg.run))
        return next(answers)

    book = SpanBook(trace_request=trace_request)
    with SpanServer(os.path.join(sock_dir, "svc.sock"), on_message=book.handle) as server:
        client.configure(socket=server.address, run="llama-ft")
        try:
            with experiment_span("first"):  # triggers the request once
                pass
            with experiment_span("second"):
                pass
            assert asked == [(os.getpid(), "llama-ft")]
            assert client.request_tracing(timeout=2) is False
            assert len(asked) == 2
        finally:
            client.configure(socket=os.path.join(sock_dir, "gone.sock"))


def test_request_tracing_times_out_open(listener):
    path, sock = listener
    client.configure(socket=path)
    t0 = time.monotonic()
    assert client.request_tracing(timeout=0.3) is False
    assert 0.25 < time.monotonic() - t0 < 2
    conn, _ = sock.accept()
    conn.settimeout(2)
    assert isinstance(decode(conn.recv(MAX_FRAME)), Hello)
    assert isinstance(decode(conn.recv(MAX_FRAME)), Ring)
    # a request that wants an answer goes over the socket, not through the ring
    assert isinstance(decode(conn.recv(MAX_FRAME)), TraceMe)
    conn.send(encode(Ack(999, True)))  # an answer to another request is not ours
    conn.close()


def test_request_tracing_without_daemon_is_immediate(sock_dir):
    client.configure(socket=os.path.join(sock_dir, "none.sock"))
    t0 = time.monotonic()
    assert client.request_tracing(timeout=5) is False
    assert time.monotonic() - t0 < 1


def test_run_env_triggers_request(sock_dir):
    path = os.path.join(sock_dir, "svcenv.sock")
    asked = []
    book = SpanBook(trace_request=lambda peer, msg: (asked.append((peer.pid, msg.run)) or True,
                                                     ""))
    with SpanServer(path, on_message=book.handle):
        proc = run_python("""
            import os
            from renacerd.client.core import experiment_span
            with experiment_span("s"):
                pass
            print(os.getpid())
        """, env={"RENACER_SOCKET": path, "RENACER_RUN": "env-run"})
    assert proc.returncode == 0, proc.stderr
    assert asked == [(int(proc.stdout), "env-run")]


def test_client_import_is_light():
    proc = run_python("""
        import sys
        import renacerd, renacerd.client.core
        heavy = {"numpy", "bcc", "psutil", "transformers", "lightning", "torch",
                 "pytorch_lightning", "renacerd.serve", "renacerd.integrations"}
        print(sorted(m for m in sys.modules if m in heavy or m.split(".")[0] in heavy))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_threads_share_connection_safely(daemon):
    _, book = daemon
    n_threads, n_spans = 8, 200

    def work(i):
        for k in range(n_spans):
            with experiment_span(f"t{i}", step=k), experiment_span(f"t{i}-in"):
                pass

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = n_threads * n_spans * 2
    dropped = client.stats()["dropped"]
    assert wait_for(lambda: book.counts()["spans_ended"] + book.counts()["orphan_ends"]
                    >= total - dropped)
    assert book.counts()["spans_ended"] + dropped >= total


def test_threads_racing_the_first_connect_all_reach_daemon(daemon):
    # A thread that finds another one connecting waits for it instead of taking the daemon
    # for absent (which would silently keep its spans local).
    _, book = daemon
    n = 8
    barrier = threading.Barrier(n)
    spans = []

    def work():
        barrier.wait()
        with experiment_span("first") as s:
            pass
        spans.append(s)

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(spans) == n and all(s.connected for s in spans)
    assert wait_for(lambda: book.counts()["spans_ended"] == n)


def test_experiment_span_builds_what_the_span_class_builds():
    args = dict(model_name="m", epoch=1, step=2, loss=0.5, metrics={"x": 1.0}, parent=None)
    a = experiment_span("n", **args)
    b = client.Span("n", **args)
    assert type(a) is client.Span

    def state(s):
        return {k: getattr(s, k) for k in client.Span.__slots__ if hasattr(s, k)}

    assert state(a) == state(b)
    for s in (a, b):
        assert (s.span_id, s.trace_id, s.parent_span_id) == ("", "", None)
        assert s.status is StatusCode.UNSET and s.exception_type is None
        assert (s.start_wall_ns, s.end_wall_ns, s.connected) == (0, 0, False)


class _Str(str):
    pass


class _Float(float):
    pass


# (kwargs of one span, attributes its record must have, attributes it must not have)
ODD_METADATA = {
    "bool-metric": ({"metrics": {"flag": True, "x": 0.5}},
                    {"experiment.metrics.flag": "1", "experiment.metrics.x": "0.5"}, ()),
    "int-metric": ({"metrics": {"i": 2, "x": 0.5}}, {"experiment.metrics.i": "2"}, ()),
    "nan-metric": ({"metrics": {"nan": math.nan, "x": 0.5}}, {"experiment.metrics.x": "0.5"},
                   ("experiment.metrics.nan",)),
    "inf-metric": ({"metrics": {"inf": -math.inf, "x": 0.5}}, {"experiment.metrics.x": "0.5"},
                   ("experiment.metrics.inf",)),
    "sum-overflows": ({"metrics": {"a": 1e308, "b": 1e308}},
                      {"experiment.metrics.a": "1" + "0" * 308}, ()),
    "long-key": ({"metrics": {"k" * 129: 0.5}}, {"experiment.metrics." + "k" * 128: "0.5"}, ()),
    "int-key": ({"metrics": {3: 0.5}}, {"experiment.metrics.3": "0.5"}, ()),
    "str-subclass-key": ({"metrics": {_Str("s"): 0.5}}, {"experiment.metrics.s": "0.5"}, ()),
    "float-subclass": ({"metrics": {"f": _Float(0.5)}}, {"experiment.metrics.f": "0.5"}, ()),
    "str-value": ({"metrics": {"s": "x", "x": 0.5}}, {"experiment.metrics.x": "0.5"},
                  ("experiment.metrics.s",)),
    "none-value": ({"metrics": {"n": None}}, {}, ("experiment.metrics.n",)),
    "nested-value": ({"metrics": {"d": {"a": 1.0}}}, {}, ("experiment.metrics.d",)),
    "too-many": ({"metrics": {f"m{i:03}": float(i) for i in range(300)}},
                 {"experiment.metrics.m255": "255"}, ("experiment.metrics.m256",)),
    "not-a-dict": ({"metrics": [("a", 1.0)]}, {}, ("experiment.metrics.a",)),
    "bool-epoch": ({"epoch": True}, {"experiment.epoch": "1"}, ()),
    "big-epoch": ({"epoch": 2**32}, {}, ("experiment.epoch",)),
    "negative-epoch": ({"epoch": -1}, {}, ("experiment.epoch",)),
    "big-step": ({"step": 2**64}, {}, ("experiment.step",)),
    "max-step": ({"step": 2**64 - 1}, {"experiment.step": str(2**64 - 1)}, ()),
    "negative-step": ({"step": -1}, {}, ("experiment.step",)),
    "nan-loss": ({"loss": math.nan}, {}, ("experiment.loss",)),
    "int-loss": ({"loss": 1}, {"experiment.loss": "1"}, ()),
    "none-model": ({"model_name": None}, {"experiment.model_name": ""}, ()),
    "int-model": ({"model_name": 7}, {"experiment.model_name": "7"}, ()),
    "long-model": ({"model_name": "m" * 300}, {"experiment.model_name": "m" * 256}, ()),
}


def test_odd_metadata_each_alone_is_coerced_never_fatal(daemon):
    # Each odd value alone in otherwise clean metadata: the fast path must hand it to the
    # coercing one, and the daemon must never see a frame it refuses.
    server, book = daemon
    for label, (kwargs, _, _) in ODD_METADATA.items():
        with experiment_span(label, **kwargs) as s:
            pass
        assert s.connected, label
    with experiment_span(42):
        pass
    with experiment_span("n" * 300):
        pass
    recs = records(book, len(ODD_METADATA) + 2)
    for label, (_, want, absent) in ODD_METADATA.items():
        attrs = recs[label].attributes()
        assert want.items() <= attrs.items(), (label, attrs)
        assert not set(absent) & attrs.keys(), (label, attrs)
    assert "42" in recs and "n" * 256 in recs
    assert server.stats["protocol_errors"] == 0


def test_backlog_tail_is_sent_without_further_spans(listener):
    # The last frames of a burst that found the socket full reach the daemon once it reads,
    # with no later span to push them out.
    path, sock = listener
    client.configure(socket=path, ring=False)
    base = client.stats()
    n = burst_into_backlog(200_000)
    assert 0 < client.stats()["queued"] < connection.BACKLOG
    assert client.stats()["dropped"] == base["dropped"]
    conn, _ = sock.accept()
    conn.setblocking(False)
    frames = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            frames.append(decode(conn.recv(MAX_FRAME)))
        except BlockingIOError:
            if client.stats()["queued"] == 0 and len(frames) == (
                    client.stats()["sent"] - base["sent"]):
                break
            time.sleep(0.001)
    starts = [f.span_id for f in frames if isinstance(f, SpanStart)]
    ends = [f.span_id for f in frames if isinstance(f, SpanEnd)]
    assert len(starts) == n + 10 and sorted(starts) == sorted(ends)
    assert client.stats()["queued"] == 0
    assert wait_for(lambda: client._client.flusher is None)
    assert not [t for t in threading.enumerate() if t.name == "renacerd-client-flush"]
    conn.close()


def test_wall_times_follow_the_wall_clock(daemon):
    _, book = daemon
    c = client._client
    with experiment_span("w1") as w1:
        pass
    assert abs(w1.start_wall_ns - time.time_ns()) < 10**9
    # A step of the wall clock (faked here through the offset) shows once it is re-read.
    c.wall_offset_ns -= 3600 * 10**9
    c.wall_due_ns = 0
    with experiment_span("w2") as w2:
        pass
    recs = records(book, 2)
    for rec, span in ((recs["w1"], w1), (recs["w2"], w2)):
        assert rec.start_time_nanos == span.start_wall_ns
        assert rec.end_time_nanos == span.end_wall_ns
        assert rec.duration_nanos == span.end_mono_ns - span.start_mono_ns
        assert abs(rec.start_time_nanos - time.time_ns()) < 10**9


def test_client_frames_are_the_protocol_encoding(listener):
    # The hot path builds its frames by hand (compact arrays, written into the ring by inlined
    # code): byte for byte they must be what renacerd.client.protocol encodes for the same messages.
    path, sock = listener
    client.configure(socket=path)
    with experiment_span("outer", model_name="gpt-2", epoch=3, step=2**64 - 1,
                         loss=0.125, metrics={"acc": 0.5, "é": 1e-7}) as outer, \
            experiment_span("inner"):
        pass
    with pytest.raises(ValueError), experiment_span("bad"):
        raise ValueError("no")
    peer = RawPeer(sock)
    frames = peer.read()
    assert peer.ring is not None
    peer.close()
    msgs = [decode(f) for f in frames]
    assert [type(m) for m in msgs] == [Hello, SpanStart, SpanStart, SpanEnd, SpanEnd,
                                       SpanStart, SpanEnd]
    for i, (frame, msg) in enumerate(zip(frames, msgs)):
        # hello and the error end in the object form, the rest compact
        assert encode(msg, compact=i not in (0, 6)) == frame, frame
    start = msgs[1]
    assert (start.span_id, start.trace_id, start.parent_span_id) == (
        outer.span_id, outer.trace_id, None)
    assert (start.metadata.step, start.metadata.metrics) == (2**64 - 1, {"acc": 0.5, "é": 1e-7})
    assert (start.mono_ns, start.wall_ns) == (outer.start_mono_ns, outer.start_wall_ns)
    assert msgs[2].parent_span_id == outer.span_id
    assert msgs[6].status is StatusCode.ERROR and msgs[6].exception_type == "ValueError"
