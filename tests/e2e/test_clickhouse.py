"""ClickHouse sink against the real server of scripts/clickhouse.sh, with runs traced for real."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest

from renacerd.experiment_span import ExperimentMetadata, SpanKind, SpanRecord, StatusCode
from renacerd.io.clickhouse_source import (
    is_clickhouse_url,
    load_run_from_url,
    load_run_info_from_url,
)
from renacerd.reports.show import show_data
from renacerd.sinks import Backoff, Progress, SinkError
from renacerd.sinks.clickhouse import (
    ClickHouseClient,
    ClickHouseSink,
    parse_url,
    push_run,
)
from renacerd.store.database import Store
from tests.conftest import IN_CI, ROOT, needs_root, run_cli

SERVER = "127.0.0.1:8123"
WRITER = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[2]), pause_us = argc > 3 ? atoi(argv[3]) : 0;
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    char buf[100] = {0};
    for (int i = 0; i < n; i++) {
        write(fd, buf, 100);
        getppid();
        if (pause_us) usleep(pause_us);
    }
    close(fd);
    return 3;
}
"""


def _ping() -> bool:
    try:
        with urllib.request.urlopen(f"http://{SERVER}/ping", timeout=2) as r:
            return r.read().startswith(b"Ok.")
    except OSError:
        return False


def _script(cmd: str) -> None:
    subprocess.run(["bash", str(ROOT / "scripts/clickhouse.sh"), cmd], check=False,
                   capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def server():
    """The loopback server; tests skip only when it cannot start and CI is not set."""
    if not _ping():
        _script("start")
    if not _ping():
        if IN_CI:
            pytest.fail("scripts/clickhouse.sh could not start ClickHouse under CI")
        pytest.skip("no ClickHouse server (scripts/clickhouse.sh start failed)")
    return SERVER


@pytest.fixture
def chdb(server):
    """A database of this test's own, dropped afterwards: its sink URL."""
    name = "renacer_test_" + uuid.uuid4().hex[:10]
    url = f"clickhouse://{server}/{name}"
    yield url
    if _ping():
        ClickHouseClient(parse_url(url)).query(f"DROP DATABASE IF EXISTS {name}", database=False)


def _q(url: str, sql: str) -> list[list[str]]:
    out = ClickHouseClient(parse_url(url)).query(sql + " FORMAT TSV").decode()
    return [line.split("\t") for line in out.splitlines()]


def _span(tid: bytes, sid: bytes, parent: bytes | None, name: str, t0: int, t1: int, pid: int,
          step: int) -> SpanRecord:
    attrs = ExperimentMetadata(model_name="tiny", epoch=1, step=step, loss=0.5).to_attributes()
    import orjson

    return SpanRecord(
        trace_id=tid, span_id=sid, parent_span_id=parent, span_name=name,
        span_kind=SpanKind.INTERNAL, start_time_nanos=1_700_000_000_000_000_000 + t0,
        end_time_nanos=1_700_000_000_000_000_000 + t1, duration_nanos=t1 - t0,
        logical_clock=step, status_code=StatusCode.OK, status_message="",
        attributes_json=orjson.dumps(attrs).decode(),
        resource_json='{"service.name":"renacer","span.type":"experiment"}',
        process_id=pid, thread_id=pid, start_mono_nanos=t0, end_mono_nanos=t1,
    )


def _trace_with_spans(cc, renacerd, db, tmp_path, run: str, n: int) -> dict:
    exe = cc("ch_writer", WRITER)
    out = tmp_path / "out.bin"
    r = renacerd("-q", "--run", run, "--", str(exe), str(out), str(n))
    assert r.returncode == 3, r.stderr
    store = Store(db, create=True)
    info = store.run(run)
    [(proc_id, p)] = store.processes(info.id)
    t = store.load_trace(run, p.pid)
    names = t.names()
    w = np.flatnonzero(names == "write")
    assert len(w) == n
    ts = t.columns["ts"]
    tid = bytes(range(1, 17))
    root = _span(tid, b"\x11" * 8, None, "run", int(p.start_mono_ns), int(p.end_mono_ns),
                 p.pid, 0)
    # writes 10..19 and the getppid after each: exactly 20 calls, 1000 bytes written
    child = _span(tid, b"\x22" * 8, b"\x11" * 8, "training_step", int(ts[w[10]]),
                  int(ts[w[20]]), p.pid, 7)
    store.add_spans(info.id, [root, child], {p.pid: proc_id})
    store.close()
    return {"pid": p.pid, "out": str(out)}


@needs_root
def test_push_reads_back_identical(cc, renacerd, db, tmp_path, chdb):
    """A traced run pushed with `renacer push` comes back identical: events, strings, spans."""
    facts = _trace_with_spans(cc, renacerd, db, tmp_path, "ch-push", 500)
    r = run_cli("push", "ch-push", "--to", chdb, "--db", str(db))
    assert r.returncode == 0, r.stderr
    url = f"{chdb}/ch-push"
    assert is_clickhouse_url(url) and not is_clickhouse_url("ch-push")
    info, traces = load_run_info_from_url(url)
    store = Store(db)
    local_info = store.run("ch-push")
    local = store.load_run("ch-push")
    assert [getattr(info, f) for f in info.__slots__ if f != "id"] == \
           [getattr(local_info, f) for f in info.__slots__ if f != "id"]
    assert len(traces) == len(local) == 1
    a, b = traces[0], local[0]
    assert a.process == b.process and a.process.exit_code == 3
    assert a.strings == b.strings and a.table == b.table
    for k, v in b.columns.items():
        assert a.columns[k].dtype == v.dtype and np.array_equal(a.columns[k], v), k
    assert a.spans == b.spans and len(a.spans) == 2
    assert a.spans[1].parent_span_id == b"\x11" * 8
    assert facts["out"] in [s.decode() for s in a.strings]
    assert show_data(info, traces) == show_data(local_info, local)
    assert len(load_run_from_url(url)[0]) == len(b)
    # exact known values, queried in SQL
    rows = dict((s, (int(c), int(b_))) for s, c, b_ in _q(
        chdb, "SELECT syscall, count(), sum(ret) FROM events WHERE run = 'ch-push' "
              "AND syscall IN ('write', 'getppid') GROUP BY syscall"))
    assert rows["write"] == (500, 50_000) and rows["getppid"][0] == 500
    step = _q(chdb, "SELECT step, syscalls, bytes_written, top.syscall, parent_span_id "
                    "FROM spans FINAL WHERE run = 'ch-push' AND span_name = 'training_step'")
    assert step == [["7", "20", "1000", "['write','getppid']", "11" * 8]] or \
        step == [["7", "20", "1000", "['getppid','write']", "11" * 8]]
    # pushing again sends nothing and duplicates nothing
    r = run_cli("push", "ch-push", "--to", chdb, "--db", str(db))
    assert r.returncode == 0, r.stderr
    assert _q(chdb, "SELECT count() FROM events") == [[str(len(b))]]
    assert _q(chdb, "SELECT count() FROM spans FINAL") == [["2"]]


@needs_root
def test_lost_ack_is_checked_not_resent(cc, renacerd, db, tmp_path, chdb):
    """A batch sent but never acknowledged (crash after the server took it) is not sent twice."""
    _trace_with_spans(cc, renacerd, db, tmp_path, "ch-ack", 300)
    first = push_run(str(db), chdb, "ch-ack")
    assert first.batches >= 1 and first.events > 600
    store = Store(db)
    info = store.run("ch-ack")
    lo, hi = store.db.execute("SELECT min(id), max(id) FROM chunks WHERE run_id=?",
                              (info.id,)).fetchone()
    progress = Progress(store, parse_url(chdb).key)
    pos = progress.get(info.id)
    # as if the daemon died between the server's answer and the acknowledgement
    pos.chunk_id, pos.pending, pos.done = lo - 1, (lo, hi), False
    progress.set(info.id, pos)
    again = push_run(str(db), chdb, "ch-ack")
    assert again.verified == 1 and again.batches == 0
    n = store.db.execute("SELECT sum(n) FROM chunks WHERE run_id=?", (info.id,)).fetchone()[0]
    assert _q(chdb, "SELECT count(), uniqExact(chunk, ts, dup) FROM events") == [[str(n), str(n)]]


@needs_root
def test_server_down_mid_run_loses_and_duplicates_nothing(cc, db, tmp_path, chdb):
    """The sink tails a live run; ClickHouse is stopped and restarted while the target runs."""
    exe = cc("ch_writer", WRITER)
    n = 6000  # 2 ms apart: the target runs ~12 s, well past the outage
    env_cmd = ["-q", "--db", str(db), "--run", "ch-down", "--", str(exe),
               str(tmp_path / "o.bin"), str(n), "2000"]
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "renacerd.cli.renacerd_main", *env_cmd],
                            env=e, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not db.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    sink = ClickHouseSink(str(db), chdb, "ch-down", poll_s=0.2, batch_rows=2000,
                          backoff=Backoff(base_s=0.2, cap_s=1.0)).start()
    try:
        while sink.stats.events == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.stats.events > 0, sink.stats
        _script("stop")
        assert not _ping(), "ClickHouse still answers: not started by scripts/clickhouse.sh?"
        time.sleep(1.5)
        assert proc.poll() is None, "the target finished before the outage ended"
        _script("start")
        assert _ping()
        assert proc.wait(timeout=60) == 3, proc.stderr.read()
    finally:
        if not _ping():
            _script("start")
        stats = sink.stop(drain_s=30)
    assert stats.errors > 0, "the sink never saw the outage"
    store = Store(db)
    info = store.run("ch-down")
    total = store.db.execute("SELECT sum(n) FROM chunks WHERE run_id=?", (info.id,)).fetchone()[0]
    assert info.status == "complete" and total == info.events
    assert _q(chdb, "SELECT count(), uniqExact(chunk, ts, dup) FROM events") == \
           [[str(total), str(total)]]
    assert _q(chdb, "SELECT count(), sum(ret) FROM events WHERE syscall = 'write'") == \
           [[str(n), str(100 * n)]]
    assert _q(chdb, "SELECT status, events FROM runs FINAL") == [["complete", str(total)]]
    assert store.db.execute("SELECT done FROM sink_progress WHERE run_id=?",
                            (info.id,)).fetchone() == (1,)


def test_push_bad_input_is_one_line_exit_2(tmp_path, db):
    """Bad URL, unknown run, unreachable server: one line each, exit status 2."""
    st = Store(db, create=True)
    st.begin_run("r", cmdline=["true"], version="t", syscall_table={0: "read"},
                 start_wall_ns=time.time_ns(), start_mono_ns=time.monotonic_ns())
    st.close()
    cases = [
        (["r", "--to", "http://x/db"], "not a ClickHouse URL"),
        (["r", "--to", "clickhouse://127.0.0.1:8123/"], "needs a database name"),
        (["r", "--to", "clickhouse://127.0.0.1:8123/bad-name"], "bad ClickHouse database name"),
        (["r", "--to", "clickhouse://127.0.0.1:1/db"], "cannot reach ClickHouse at 127.0.0.1:1"),
        (["nosuch", "--to", "clickhouse://127.0.0.1:1/db"], "no run named 'nosuch'"),
    ]
    for args, msg in cases:
        r = run_cli("push", *args, "--db", str(db))
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
        assert r.stderr.count("\n") == 1


def test_push_unknown_run(db, chdb):
    """A run missing from the store is a usage error."""
    Store(db, create=True).close()
    r = run_cli("push", "nosuch", "--to", chdb, "--db", str(db))
    assert r.returncode == 2 and "no run named 'nosuch'" in r.stderr


def test_url_source_errors(chdb):
    """Unknown runs and malformed run URLs name the problem."""
    from renacerd.sinks import SinkError
    from renacerd.sinks.clickhouse import ensure_schema

    ensure_schema(ClickHouseClient(parse_url(chdb)))
    with pytest.raises(SinkError, match="no run named 'nope'"):
        load_run_from_url(f"{chdb}/nope")
    with pytest.raises(SinkError, match="needs a database and a run name"):
        load_run_from_url(chdb)


class _GpuInsertLost(ClickHouseSink):
    """A sink whose first GPU insert fails: its batch's events are on the server, its GPU
    calls are not, and the batch stays pending."""

    def _send_gpu(self, *args) -> None:
        if not getattr(self, "_failed", False):
            self._failed = True
            raise SinkError("the GPU insert was lost")
        super()._send_gpu(*args)


def test_gpu_layer_pushed_once_each(db, chdb):
    """The GPU layer goes to gpu_calls, a row per call with the hook's symbol and the
    kernel's name; a batch whose GPU insert failed after its events went in sends only its
    GPU calls again (the events are counted on the server, not resent)."""
    from renacerd.cuda.records import GPU_LAYOUT
    from tests.unit.test_flight_fold import add_gpu_run

    st = Store(db, create=True)
    add_gpu_run(st, "g", flight=False)
    info = st.run("g")
    [(proc_id, p)] = st.processes(info.id)
    gpu = st.columns(info.id, proc_id, "gpu", GPU_LAYOUT)
    n_sys, n_gpu = st.chunk_events(info.id), st.chunk_events(info.id, layer="gpu")
    st.close()
    sink = _GpuInsertLost(str(db), chdb, "g", batch_rows=10**6)
    with pytest.raises(SinkError, match="GPU insert was lost"):
        sink.flush_now()
    sink._store.close()
    assert _q(chdb, "SELECT count() FROM gpu_calls") == [["0"]]
    stats = push_run(str(db), chdb, "g")  # a new sink, as after a restart
    assert (stats.events, stats.gpu_calls, stats.batches, stats.verified) == (n_sys, 52, 0, 0)
    assert n_gpu == 52
    assert _q(chdb, "SELECT count(), uniqExact(chunk, ts, dup) FROM events") == [
        [str(n_sys), str(n_sys)]]
    # 6 steps: a malloc each and 2 more, 5 frees, 1+2+..+6 gemm and 2 relu launches a
    # step, a copy a step
    assert _q(chdb, "SELECT fn, kernel, count() FROM gpu_calls GROUP BY fn, kernel "
                    "ORDER BY fn, kernel") == [
        ["cudaFree", "", "5"], ["cudaLaunchKernel", "gemm", "21"],
        ["cudaLaunchKernel", "relu", "12"], ["cudaMalloc", "", "8"], ["cudaMemcpy", "", "6"]]
    cols = [k for k, _ in GPU_LAYOUT if k not in ("fn", "name")]
    got = _q(chdb, f"SELECT pid, {', '.join(cols)} FROM gpu_calls ORDER BY ts, chunk, dup")
    assert got == [[str(p.pid)] + [str(gpu[k][i]) for k in cols] for i in range(n_gpu)]
    again = push_run(str(db), chdb, "g")
    assert (again.events, again.gpu_calls) == (0, 0)
    assert _q(chdb, "SELECT count() FROM gpu_calls") == [["52"]]
