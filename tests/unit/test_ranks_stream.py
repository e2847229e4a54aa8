"""renacer ranks streams each rank's chunks through the fd replay: the same per-step sums and
profiles as replaying the whole first, with files named by relative paths (new strings),
ties at chunk boundaries and several ranks on threads."""

from __future__ import annotations

import json

import numpy as np

from renacerd.client.dist_env import DistInfo
from renacerd.experiment_span import SpanRecord
from renacerd.reports import ranks as R
from renacerd.store.database import Store
from renacerd.syscall_table import syscall_table
from renacerd.trace.unified_trace import ProcessSpan

NR = {name: nr for nr, name in syscall_table().items()}
AT = (-100) & 0xFFFFFFFF
STEP = 40_000_000
STRINGS = [b"/data/abs", b"ckpt/shard.pt", b"../logs/out.txt", b"sub"]


def _span(pid: int, name: str, step: int, start: int, end: int, i: int) -> SpanRecord:
    attrs = {"experiment.step": str(step)}
    return SpanRecord(trace_id=b"\1" * 16, span_id=(pid << 32 | i + 1).to_bytes(8, "big"),
                      parent_span_id=None, span_name=name, span_kind=0, start_time_nanos=start,
                      end_time_nanos=end, duration_nanos=end - start, logical_clock=i,
                      status_code=1, status_message="", attributes_json=json.dumps(attrs),
                      resource_json="{}", process_id=pid, thread_id=pid,
                      start_mono_nanos=start, end_mono_nanos=end)


def _calls(rng: np.random.Generator, rank: int, steps: int, per: int) -> list[tuple]:
    """(ts, name, ret, a0, s0, dur): a chdir, then per step relative opens, reads and closes
    of fd 5, an fsync on rank 1's late steps; runs of equal timestamps."""
    rows = [(10**12 - 100, "chdir", 0, 0, 3, 10)]
    for k in range(steps):
        ts = 10**12 + k * STEP + np.sort(rng.integers(0, STEP // 2, per))
        ts[7:14] = ts[7]
        for j in range(per):
            m, t = j % 10, int(ts[j])
            if m == 0:
                rows.append((t, "openat", 5, AT, 1 if j % 20 else 2, 300))
            elif m == 9:
                rows.append((t, "close", 0, 5, -1, 300))
            elif j == 5 and rank == 1 and k % 5 == 2:
                rows.append((t, "fsync", 0, 5, -1, STEP * 3 // 10))
            else:
                rows.append((t, "read" if m != 6 else "futex", 100, 5, -1, 300 + j))
    return rows


def _store(path: str, ranks: int = 3, steps: int = 20, per: int = 100) -> Store:
    """Ranks whose chunks are cut inside runs of equal timestamps."""
    s = Store(path, create=True)
    rid = s.begin_run("r", cmdline=["x"], version="x", syscall_table=syscall_table(),
                      start_wall_ns=0, start_mono_ns=0)
    s.add_strings(rid, list(enumerate(STRINGS)))
    rng = np.random.default_rng(1)
    for r in range(ranks):
        pid = 2000 + r
        p = ProcessSpan(pid=pid, name="python", start_mono_ns=0)
        p.initial_fds = {0: "/dev/null", -100: f"/work/r{r}"}
        proc = s.add_process(rid, p)
        s.set_process_dist(proc, DistInfo(rank=r, local_rank=r, world_size=ranks, job_id="j",
                                          host="h"))
        rows = _calls(rng, r, steps, per)
        n = len(rows)
        cols = {"ts": np.array([x[0] for x in rows], np.int64),
                "dur": np.array([x[5] for x in rows], np.uint64),
                "ret": np.array([x[2] for x in rows], np.int64),
                "a0": np.array([x[3] for x in rows], np.uint64),
                "tid": np.full(n, pid, np.uint32),
                "nr": np.array([NR[x[1]] for x in rows], np.uint16),
                "flags": np.zeros(n, np.uint16), "s0": np.array([x[4] for x in rows], np.int32),
                "s1": np.full(n, -1, np.int32)}
        cuts = [0] + [1 + per * k + 9 for k in range(1, steps, 2 + r)] + [n]
        for a, b in zip(cuts[:-1], cuts[1:]):
            s.add_chunk(rid, proc, {k: v[a:b] for k, v in cols.items()})
        spans = []
        for k in range(steps):
            st = 10**12 + k * STEP
            wait = 50_000 + (STEP * 3 // 10 if k % 5 == 2 and r != 1 else 0)
            c1 = st + STEP - wait - 20_000
            spans += [_span(pid, "train_step", k, st, st + STEP, 2 * k),
                      _span(pid, "c10d.all_reduce", k, c1, c1 + wait, 2 * k + 1)]
        s.add_spans(rid, spans, {pid: proc})
        s.commit()
    s.update_run(rid, status="complete")
    return s


def _two_passes(s: Store, monkeypatch) -> None:
    """Make every process's chunks look overlapping: the replay of the whole comes first."""
    real = s.chunk_index

    def index(run_id: int, proc_id: int, layer: str = "sys") -> list[tuple]:
        ix = real(run_id, proc_id, layer)
        return [ix[0], (*ix[1][:2], ix[0][3] - 1, ix[1][3]), *ix[2:]] if len(ix) > 1 else ix

    monkeypatch.setattr(s, "chunk_index", index)


def test_streamed_ranks_match_the_replay_of_the_whole(tmp_path, monkeypatch):
    s = _store(str(tmp_path / "s.db"))
    run = s.run("r")
    got_strings = s.strings(run.id)
    got = R.load_ranks(s, run, got_strings)
    _two_passes(s, monkeypatch)
    want_strings = s.strings(run.id)
    want = R.load_ranks(s, run, want_strings)
    assert got_strings == want_strings and len(got_strings) > len(STRINGS)
    assert [r.rank for r in got] == [0, 1, 2]
    for a, b in zip(got, want):
        for f in ("prof_step", "prof_code", "prof_ns", "prof_calls", "wait_sys_ns",
                  "syscall_ns", "step_ns", "coll_ns"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), (a.rank, f)
        assert a.keys == b.keys
    d = R.ranks_data(s, run)
    causes = {(c["syscall"], c["path"]) for x in d["steps"] if x["straggler"]
              for c in x["straggler"]["causes"][:1]}
    assert causes == {("fsync", "/work/r1/logs/out.txt")}
