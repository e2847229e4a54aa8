"""The store's reads for sinks (store/readers.py) on a real SQLite store, and the sinks'
per-span summary: a span's total (its own events and its subtree's, span_tagging)."""

from __future__ import annotations

import numpy as np

from renacerd.columns import SYSCALL_COLUMNS, decode
from renacerd.sinks import ready_summaries
from renacerd.store.database import Store
from renacerd.store.readers import Position, Progress
from renacerd.trace.unified_trace import ProcessSpan
from tests.conftest import span_record

READ = 0  # x86-64 read(2)


def _cols(ts: list[int], ret: int = 0) -> dict[str, np.ndarray]:
    cols = {name: np.zeros(len(ts), dtype=dt) for name, dt in SYSCALL_COLUMNS}
    cols["ts"][:] = ts
    cols["dur"][:] = 10
    cols["ret"][:] = ret
    cols["nr"][:] = READ
    return cols


def _store(tmp_path):
    """A run of pid 1 with a worker pid 2: an epoch [0, 100) holding steps [10, 20) and
    [20, 30); inside step 2 the worker's span [22, 25). pid 1 reads at 5, 12, 21, 23, 40
    (one chunk each of 3 and 2 events), pid 2 at 21, 23, 24, 50 (4 bytes each)."""
    st = Store(tmp_path / "s.db", create=True)
    run = st.begin_run("r", cmdline=[], version="0", syscall_table={READ: "read"},
                       start_wall_ns=1, start_mono_ns=1)
    p1 = st.add_process(run, ProcessSpan(pid=1, ppid=0))
    p2 = st.add_process(run, ProcessSpan(pid=2, ppid=1))
    st.add_chunk(run, p1, _cols([5, 12, 21]))
    st.add_chunk(run, p1, _cols([23, 40]))
    st.add_chunk(run, p2, _cols([21, 23, 24, 50], ret=4))
    st.add_strings(run, [(0, b"a"), (1, b"b\xff"), (2, b"c")])
    st.add_spans(run, [span_record(b"load", b"step2", 2, 22, 25),
                       span_record(b"step1", b"epoch", 1, 10, 20),
                       span_record(b"step2", b"epoch", 1, 20, 30),
                       span_record(b"epoch", None, 1, 0, 100)], {1: p1, 2: p2})
    st.commit()
    return st, run


def test_reads_after_a_position(tmp_path):
    st, run = _store(tmp_path)
    assert st.strings_after(run, 0) == [(1, b"b\xff"), (2, b"c")]
    assert st.last_chunk_id(run) == 3
    assert st.chunk_events(run) == 9
    assert st.chunk_events(run, 2, 3) == 6
    assert [(cid, n) for cid, _, n, _, _ in st.chunks_after(run, 1)] == [(2, 2), (3, 4)]
    assert st.events_until(run) == 50
    assert [decode(b)["ts"].tolist() for b in st.proc_chunks_before(run, 1, 3)] == [
        [5, 12, 21], [23, 40]]
    assert [decode(b)["ts"].tolist() for b in st.proc_chunks_before(run, 1, 2)] == [[5, 12, 21]]
    assert list(st.proc_chunks_before(run, 2, 3)) == []
    spans = st.spans_after(run, 1)
    assert [(s.rowid, s.proc_id, s.record.span_name) for s in spans] == [
        (2, 1, "step1"), (3, 1, "step2"), (4, 1, "epoch")]
    assert spans[0].record.parent_span_id == b"epoch"
    assert spans[2].record.parent_span_id is None
    assert [s.record.span_name for s in st.spans_after(run, 0, limit=1)] == ["load"]


def test_progress_round_trip(tmp_path):
    st, run = _store(tmp_path)
    progress = Progress(st, "test")
    assert progress.get(run) == Position()
    progress.set(run, Position(3, 2, 4, (5, 6), True))
    assert Progress(st, "test").get(run) == Position(3, 2, 4, (5, 6), True)
    assert Progress(st, "other").get(run) == Position()
    progress.forget(run)
    assert progress.get(run) == Position()


def test_sink_summaries_are_totals(tmp_path):
    """Each event counts once in its innermost span (self: epoch 3, step1 1, step2 3, load
    2); the sinks send totals: epoch 9, step1 1, step2 5, load 2."""
    st, run = _store(tmp_path)
    procs = [(i, p.pid, p.ppid) for i, p in st.processes(run)]
    ready = st.spans_after(run, 0)
    sums = ready_summaries(st, run, procs, ready, {READ: "read"})
    got = {sp.record.span_name: (s.syscalls, s.bytes_read) for sp, s in zip(ready, sums)}
    assert got == {"epoch": (9, 16), "step1": (1, 0), "step2": (5, 12), "load": (2, 8)}
    traces = st.load_run("r")
    from renacerd.store.database import span_summaries

    names = [sp.span_name for sp in traces[0].spans]
    selfs = {n: s["syscalls"] for n, s in zip(names, span_summaries(traces))}
    assert selfs == {"epoch": 3, "step1": 1, "step2": 3, "load": 2}


def _reference_totals(st, run, procs, spans) -> list[tuple[int, int, int]]:
    """(calls, ns, bytes read) of each span by the definition: the events of its process
    tree in its window whose innermost span (tag_events) is in its subtree."""
    from renacerd.sinks import descendants
    from renacerd.trace.span_tagging import SpanTable, ancestry, span_subtree, tag_events

    table = SpanTable.of(spans)
    ppid = {pid: pp for _, pid, pp in procs}
    pid_of = {i: pid for i, pid, _ in procs}
    cols = {i: st.load_run("r")[k].columns for k, (i, _, _) in enumerate(procs)}
    out = []
    for k, sp in enumerate(spans):
        sub = span_subtree(table, k)
        calls = ns = rd = 0
        for proc_id in descendants(procs, sp.process_id):
            c = cols[proc_id]
            ts = c["ts"].astype(np.int64)
            m = ((ts >= sp.start_mono_nanos) & (ts < sp.end_mono_nanos)
                 & np.isin(tag_events(ts, table, ancestry(pid_of[proc_id], ppid)), sub))
            calls += int(m.sum())
            ns += int(c["dur"][m].sum())
            rd += int(c["ret"][m].sum())
        out.append((calls, ns, rd))
    return out


def test_batched_summaries_equal_the_definition_over_many_chunks(tmp_path):
    """Steps with two children each (one in the worker), events over 40 chunks per
    process: each span's total is the definition's, whatever the chunk cache holds."""
    rng = np.random.default_rng(7)
    st = Store(tmp_path / "m.db", create=True)
    run = st.begin_run("r", cmdline=[], version="0", syscall_table={READ: "read"},
                       start_wall_ns=1, start_mono_ns=1)
    procs = [st.add_process(run, ProcessSpan(pid=1, ppid=0)),
             st.add_process(run, ProcessSpan(pid=2, ppid=1))]
    for proc_id in procs:
        ts = np.sort(rng.integers(0, 400_000, 40 * 50))
        for part in np.split(ts, 40):
            c = _cols(part.tolist(), ret=proc_id)
            c["dur"][:] = rng.integers(1, 1000, len(part))
            st.add_chunk(run, proc_id, c)
    spans = []
    for k in range(300):  # steps of 1,000 ns back to back, children inside
        s0 = 50_000 + k * 1000
        sid = f"s{k}".encode()
        spans += [span_record(sid, None, 1, s0, s0 + 1000),
                  span_record(f"a{k}".encode(), sid, 1, s0 + 100, s0 + 400),
                  span_record(f"w{k}".encode(), sid, 2, s0 + 300, s0 + 900)]
    st.add_spans(run, spans, {1: procs[0], 2: procs[1]})
    st.commit()
    tree = [(i, p.pid, p.ppid) for i, p in st.processes(run)]
    ready = st.spans_after(run, 0)
    sums = ready_summaries(st, run, tree, ready, {READ: "read"})
    got = [(s.syscalls, s.syscall_ns, s.bytes_read) for s in sums]
    want = _reference_totals(st, run, tree, [sp.record for sp in ready])
    assert got == want and sum(g[0] for g in got) > 3000
    # a batch of a few spans (the live sink's case) gives the same numbers
    part = ready_summaries(st, run, tree, ready[450:460], {READ: "read"})
    assert [(s.syscalls, s.syscall_ns, s.bytes_read) for s in part] == got[450:460]


def test_a_batch_links_its_spans_through_a_parent_outside_its_window(tmp_path):
    """epoch [0, 100) is the parent of late [200, 300), the parent of the worker's inner
    [30, 60): a batch of epoch alone reads only the spans alive in [0, 100), and still counts
    the worker's call at 50 (inner's) for epoch through late, as the whole run's table does:
    9 calls, 16 bytes (8 and 12 without the link)."""
    st, run = _store(tmp_path)
    st.add_spans(run, [span_record(b"late", b"epoch", 1, 200, 300),
                       span_record(b"inner", b"late", 2, 30, 60)], {1: 1, 2: 2})
    st.commit()
    procs = [(i, p.pid, p.ppid) for i, p in st.processes(run)]
    ready = [sp for sp in st.spans_after(run, 0) if sp.record.span_name == "epoch"]
    (alone,) = ready_summaries(st, run, procs, ready, {READ: "read"})
    every = ready_summaries(st, run, procs, st.spans_after(run, 0), {READ: "read"})
    names = [sp.record.span_name for sp in st.spans_after(run, 0)]
    assert (alone.syscalls, alone.bytes_read) == (every[names.index("epoch")].syscalls,
                                                  every[names.index("epoch")].bytes_read)
    assert (alone.syscalls, alone.bytes_read) == (9, 16)
