"""compare_traces on constructed traces: prior-art §1 reference vectors, properties, invariances."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from renacerd.columns import SYSCALL_COLUMNS
from renacerd.compare import Budget, compare_runs, compare_traces
from renacerd.compare.lcs import chunked_lcs
from renacerd.io.runfile import GoldenError, read_golden, write_golden
from renacerd.syscall_table import syscall_table
from renacerd.trace.effects import canonical_endpoint, canonical_path
from renacerd.trace.unified_trace import UnifiedTrace

NR = {name: nr for nr, name in syscall_table().items()}


class Run:
    """Builds the traces of one run by hand: processes sharing one string table."""

    def __init__(self) -> None:
        self.strings: list[bytes] = []
        self.traces: list[UnifiedTrace] = []
        self.ts = 1_000_000

    def intern(self, s: str) -> int:
        b = s.encode()
        if b not in self.strings:
            self.strings.append(b)
        return self.strings.index(b)

    def proc(self, pid: int, name: str = "prog", ppid: int = 1, exit_code: int | None = 0,
             exe: str = "", fds: dict[int, str] | None = None) -> Proc:
        p = Proc(self, pid, name, ppid, exit_code, exe or f"/usr/bin/{name}", fds or {})
        self.traces.append(p.t)
        return p


class Proc:
    """One process: call() appends syscalls, times advance by each call's duration + 10 ns."""

    def __init__(self, run: Run, pid: int, name: str, ppid: int, exit_code: int | None,
                 exe: str, fds: dict[int, str]) -> None:
        self.run = run
        self.t = UnifiedTrace(pid, name)
        self.t.process.ppid = ppid
        self.t.process.exit_code = exit_code
        self.t.process.exe = exe
        self.t.process.start_mono_ns = run.ts
        self.t.process.initial_fds = dict(fds)
        self.t.strings = run.strings
        self.rows: list[tuple] = []

    def call(self, name: str, ret: int = 0, a0: int = 0, dur: int = 100, tid: int | None = None,
             s0: str | None = None, s1: str | None = None) -> Proc:
        r = self.run
        self.rows.append((r.ts, dur, ret, a0, self.t.pid if tid is None else tid, NR[name], 0,
                          r.intern(s0) if s0 is not None else -1,
                          r.intern(s1) if s1 is not None else -1, 0, 0))
        r.ts += dur + 10
        cols = list(zip(*self.rows))
        self.t.columns = {n: np.array(cols[k], dtype=dt)
                          for k, (n, dt) in enumerate(SYSCALL_COLUMNS)}
        return self

    def calls(self, names: list[str], dur: int = 100) -> Proc:
        for n in names:
            self.call(n, dur=dur)
        return self


def single(names: list[str], dur: int = 100, **kw) -> UnifiedTrace:
    return Run().proc(100, **kw).calls(names, dur).t


def empty() -> UnifiedTrace:
    return Run().proc(100).t


# -- reference vectors (prior-art.md §1) ------------------------------------------------------
def test_both_empty():
    s = compare_traces(empty(), empty())
    assert (s.syscall_match, s.timing_variance, s.semantic_equiv) == (1.0, 0.0, 1.0)
    assert s.is_equivalent() and s.exact


def test_one_empty():
    s = compare_traces(single(["read"]), empty())
    assert s.syscall_match == 0.0 and s.timing_variance == 1.0


def test_read_write_close_vs_read_close():
    s = compare_traces(single(["read", "write", "close"]), single(["read", "close"]))
    assert s.syscall_match == pytest.approx(2 / 3)
    assert s.timing_variance == pytest.approx(1 / 3)
    assert s.exact


def test_abc_vs_bcd_lcs_two():
    a = np.array([1, 2, 3], dtype=np.int32)
    b = np.array([2, 3, 4], dtype=np.int32)
    r = chunked_lcs([(a, b)], 3, min_match=None)
    assert (r.lower, r.upper) == (2, 2)
    s = compare_traces(single(["openat", "read", "close"]), single(["read", "close", "write"]))
    assert s.syscall_match == pytest.approx(2 / 3)


def test_read_50_vs_500():
    s = compare_traces(single(["read"], dur=50), single(["read"], dur=500))
    assert s.syscall_match == 1.0
    assert s.timing_variance == pytest.approx(0.9)


def test_self_is_exactly_one():
    r = Run()
    p = r.proc(7, "prog")
    p.call("openat", ret=3, s0="/data/out.bin").call("write", ret=40, a0=3).call("close", a0=3)
    s = compare_traces(r.traces, r.traces)
    assert (s.syscall_match, s.timing_variance, s.semantic_equiv) == (1.0, 0.0, 1.0)
    assert s.overall() == pytest.approx(1.0) and s.is_equivalent()


# -- properties ---------------------------------------------------------------------------------
NAMES = ["read", "write", "close", "openat", "mmap", "fstat"]
seqs = st.lists(st.sampled_from(NAMES), max_size=40)


def _dp_lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


@settings(max_examples=60, deadline=None)
@given(seqs, seqs, st.integers(1, 1000), st.integers(1, 1000))
def test_symmetry_bounds_and_exact_lcs(a, b, da, db):
    x, y = single(a, dur=da), single(b, dur=db)
    s1, s2 = compare_traces(x, y), compare_traces(y, x)
    assert (s1.syscall_match, s1.timing_variance, s1.semantic_equiv) == (
        s2.syscall_match, s2.timing_variance, s2.semantic_equiv)
    for v in (s1.syscall_match, s1.timing_variance, s1.semantic_equiv, s1.overall()):
        assert 0.0 <= v <= 1.0
    if a or b:
        # min_match of 0.625 may stop early; when exact, it is the textbook LCS
        if s1.exact:
            assert s1.syscall_match == pytest.approx(_dp_lcs(a, b) / max(len(a), len(b)))
        else:
            assert s1.syscall_match >= _dp_lcs(a, b) / max(len(a), len(b))
            assert s1.syscall_match < 0.625


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), max_size=300), st.lists(st.integers(1, 5), max_size=300))
def test_lcs_engine_matches_dp(a, b):
    r = chunked_lcs([(np.array(a, np.int32), np.array(b, np.int32))], 1, min_match=None)
    assert r.exact and r.lower == _dp_lcs([str(v) for v in a], [str(v) for v in b])


# -- normalisation ------------------------------------------------------------------------------
def test_nondeterministic_calls_are_dropped():
    base = single(["openat", "read", "close"])
    r = Run()
    p = r.proc(100)
    p.call("openat").call("futex").call("clock_gettime").call("getrandom").call("read", ret=-11)
    p.call("epoll_wait").call("read").call("sched_yield").call("read", ret=-4).call("close")
    assert compare_traces(base, r.traces[0]).syscall_match == 1.0
    assert compare_traces(base, r.traces[0], normalize=False).syscall_match == pytest.approx(0.3)


def test_threads_are_canonical_by_creation_order():
    def two_threads(t1: int, t2: int, interleave: bool) -> UnifiedTrace:
        p = Run().proc(t1)
        order = [(t1, "openat"), (t2, "read"), (t1, "write"), (t2, "read"), (t1, "close")]
        if interleave:
            order = [order[0], order[2], order[1], order[4], order[3]]
        for tid, n in order:
            p.call(n, tid=tid)
        return p.t

    a, b = two_threads(100, 101, False), two_threads(500, 777, True)
    assert compare_traces(a, b).syscall_match == 1.0
    assert compare_traces(a, b, normalize=False).syscall_match < 1.0


def _writer(pid: int, fd: int, tmp: str, proc_pid: int, port: int) -> list[UnifiedTrace]:
    r = Run()
    p = r.proc(pid, "trainer", fds={1: f"/dev/pts/{pid % 7}"})
    p.call("openat", ret=fd, s0=tmp).call("write", ret=100, a0=fd).call("close", a0=fd)
    p.call("openat", ret=fd, s0=f"/proc/{proc_pid}/status").call("read", ret=50, a0=fd)
    p.call("close", a0=fd)
    p.call("socket", ret=fd + 1).call("connect", a0=fd + 1, s0=f"inet:10.0.0.1:{port}")
    p.call("sendto", ret=64, a0=fd + 1).call("write", ret=12, a0=1)
    p.call("execve", s0="/usr/bin/python3")
    return r.traces


def test_renamed_pids_fds_tmp_names_proc_paths_change_nothing():
    a = _writer(1234, 3, "/tmp/tmpa1b2c3d4", 1234, 41000)
    b = _writer(98765, 9, "/tmp/tmpz9y8x7w6", 98765, 53001)
    c = compare_runs(a, b)
    s = c.score
    assert (s.syscall_match, s.timing_variance, s.semantic_equiv) == (1.0, 0.0, 1.0)
    assert c.hard == [] and c.effects.differing() == []
    assert c.effects.baseline == {
        "written:/tmp/tmpa1b2c3d4": 100, "execs:/usr/bin/python3": 1,
        "connects:inet:10.0.0.1:*": 1, "net_sent:inet:10.0.0.1:*": 64, "stdio:stdout": 12}
    # the candidate's temp name is paired with the baseline's, not replaced by a pattern
    assert c.effects.candidate == c.effects.baseline
    assert c.path_map.lines() == ["/tmp/tmpa1b2c3d4 \u2194 /tmp/tmpz9y8x7w6"]


def test_canonical_names():
    assert canonical_path("/proc/4242/status") == "/proc/<pid>/status"
    assert canonical_path("/proc/4242/task/4243/stat") == "/proc/<pid>/task/<tid>/stat"
    assert canonical_path("/tmp/tmpk3j_9x2a") == "/tmp/tmpk3j_9x2a"  # paired, not masked
    assert canonical_path("/data/output.bin") == "/data/output.bin"
    assert canonical_path("pipe:[77123]") == "pipe:"
    assert canonical_endpoint("inet:127.0.0.1:8080") == "inet:127.0.0.1:8080"
    assert canonical_endpoint("inet6:[::1]:40001") == "inet6:[::1]:*"


# -- effects ------------------------------------------------------------------------------------
def _files(paths: list[str], exit_code: int = 0, execs: tuple[str, ...] = ()) -> list[UnifiedTrace]:
    r = Run()
    p = r.proc(10, exit_code=exit_code)
    for k, path in enumerate(paths):
        p.call("openat", ret=3 + k, s0=path).call("write", ret=10, a0=3 + k)
    for e in execs:
        p.call("execve", s0=e)
    return r.traces


def test_extra_file_is_not_equivalent():
    c = compare_runs(_files(["/out/a"]), _files(["/out/a", "/out/b"]))
    assert c.hard == ["file /out/b written only in the candidate"]
    assert c.score.semantic_equiv == 0.0 and not c.score.is_equivalent() and not c.equivalent(0.1)


def test_exit_status_and_exec_are_hard():
    c = compare_runs(_files(["/out/a"], 0), _files(["/out/a"], 1))
    assert c.hard == ["process 0 prog: baseline exit 0, candidate exit 1"]
    c = compare_runs(_files([], execs=("/bin/true",)), _files([], execs=("/bin/false",)))
    assert c.hard == ["program /bin/false exec'd only in the candidate",
                      "program /bin/true exec'd only in the baseline"]


def test_temp_then_rename_credits_final_name():
    a = _files(["/out/model.pt"])
    r = Run()
    p = r.proc(10)
    p.call("openat", ret=3, s0="/out/.model.pt.tmp").call("write", ret=10, a0=3)
    p.call("close", a0=3).call("rename", s0="/out/.model.pt.tmp", s1="/out/model.pt")
    c = compare_runs(a, r.traces)
    assert c.hard == []
    assert c.effects.candidate["written:/out/model.pt"] == 10


def test_unpaired_process_counts_against():
    a = _files(["/out/a"])
    r = Run()
    r.proc(10).call("openat", ret=3, s0="/out/a").call("write", ret=10, a0=3)
    r.proc(11, "helper", ppid=10).calls(["getpid", "getppid"])
    c = compare_runs(a, r.traces)
    assert [p.to_json()["paired"] for p in c.pairs] == [True, False]
    assert c.score.syscall_match == pytest.approx(2 / 4)
    assert c.effects.score == pytest.approx(2 / 3)  # file ok, exit ok, unpaired 0


# -- scale machinery ----------------------------------------------------------------------------
def test_early_out_gives_bound():
    a = np.tile(np.array([1, 2], np.int32), 5000)
    b = np.tile(np.array([3, 4, 1], np.int32), 3000)
    r = chunked_lcs([(a, b)], 10000, min_match=0.625)
    assert r.early_out and not r.exact and r.upper < 6250


def test_budget_gives_honest_bound():
    rng = np.random.default_rng(3)
    a = rng.integers(1, 6, 200_000).astype(np.int32)
    b = rng.integers(1, 6, 200_000).astype(np.int32)
    r = chunked_lcs([(a, b)], 200_000, min_match=None, budget=Budget(seconds=1e-6))
    assert r.over_budget and not r.exact
    assert r.lower <= r.upper <= 200_000


# -- golden files -------------------------------------------------------------------------------
def test_golden_round_trip_and_errors(tmp_path):
    a = _writer(1234, 3, "/tmp/tmpa1b2c3d4", 1234, 41000)
    run = {"name": "r1", "status": "complete", "syscall_table": {}}
    path = tmp_path / "r1.rgt"
    write_golden(path, run, a)
    info, back = read_golden(path)
    assert info["name"] == "r1" and len(back) == 1
    for k, v in a[0].columns.items():
        assert np.array_equal(back[0].columns[k], v)
    assert back[0].strings == a[0].strings
    assert back[0].process == a[0].process
    s = compare_traces(a, back)
    assert (s.syscall_match, s.timing_variance, s.semantic_equiv) == (1.0, 0.0, 1.0)
    data = path.read_bytes()
    (tmp_path / "t.rgt").write_bytes(data[:-5])
    (tmp_path / "v.rgt").write_bytes(data[:8] + b"\x09\x00" + data[10:])
    (tmp_path / "o.rgt").write_bytes(b'{"traceEvents": []}')
    (tmp_path / "c.rgt").write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    for name, msg in (("t.rgt", "truncated"), ("v.rgt", "version 9 is not supported"),
                      ("o.rgt", "not a renacer golden trace"), ("c.rgt", "checksum"),
                      ("missing.rgt", "no such file")):
        with pytest.raises(GoldenError, match=msg):
            read_golden(tmp_path / name)


# -- steps --------------------------------------------------------------------------------------
def _stepped(extra_in_step: int | None) -> list[UnifiedTrace]:
    from renacerd.experiment_span import SpanKind, SpanRecord, StatusCode

    r = Run()
    p = r.proc(10, "trainer")
    spans = []
    for k in range(3):
        start = r.ts
        p.calls(["openat", "read", "close"])
        if k == extra_in_step:
            p.call("write", ret=1, a0=1)
        spans.append(SpanRecord(
            trace_id=b"\1" * 16, span_id=bytes([0] * 7 + [k + 1]), parent_span_id=None,
            span_name="training_step", span_kind=SpanKind.INTERNAL, start_time_nanos=0,
            end_time_nanos=0, duration_nanos=0, logical_clock=k, status_code=StatusCode.OK,
            status_message="", attributes_json=f'{{"experiment.step": {k * 10}}}',
            resource_json="{}", process_id=10, thread_id=10,
            start_mono_nanos=start, end_mono_nanos=r.ts))
        p.call("getpid")
    p.t.spans = spans
    return r.traces


def test_per_step_differences_and_first_divergence(tmp_path):
    from renacerd.compare.report import first_divergence, step_table

    c = compare_runs(_stepped(None), _stepped(1))
    differ = [s for s in step_table(c) if s["extra"] or s["missing"]]
    assert [(s["step"], s["extra"], s["missing"]) for s in differ] == [
        ("training_step step 10", {"write": 1}, {})]
    first = first_divergence(c)
    assert first is not None and first["step"] == "training_step step 10"
    assert first["index"] == 3 and len(first["baseline"]) == 3
    assert first["candidate"][-1] == {"index": 3, "at": True, "event": "write() = 1"}
    path = tmp_path / "s.rgt"
    write_golden(path, {"name": "s"}, _stepped(None))
    _, back = read_golden(path)
    assert [(s.span_id, s.start_mono_nanos, s.attributes_json) for s in back[0].spans] == [
        (s.span_id, s.start_mono_nanos, s.attributes_json) for s in _stepped(None)[0].spans]
    assert compare_traces(_stepped(None), back).syscall_match == 1.0


def test_gpu_effects_compare_launches_and_bytes():
    def gpu(launches: int) -> list[UnifiedTrace]:
        t = single(["ioctl"])
        t.gpu = {"summary": {"kernels": {"gemm": launches, "relu": 4},
                             "memcpy": {"h2d_bytes": 1 << 20, "d2h_bytes": 512 << 10,
                                        "d2d_bytes": 0}}}
        return [t]

    c = compare_runs(gpu(8), gpu(8))
    assert c.effects.baseline == {"gpu_kernels:gemm": 8, "gpu_kernels:relu": 4,
                                  "gpu_bytes:h2d": 1 << 20, "gpu_bytes:d2h": 512 << 10}
    assert c.score.semantic_equiv == 1.0
    c = compare_runs(gpu(8), gpu(16))
    # items: gemm 0.5, relu 1, h2d 1, d2h 1, exit 1 -> 4.5 / 5
    assert c.score.semantic_equiv == pytest.approx(0.9) and c.hard == []


def test_path_pairing_rules():
    from renacerd.compare.pathmap import _is_date_pair, _is_temp_pair

    assert _is_temp_pair("tmpk3j_9x2a", "tmpz9y8x7w6", in_tmp=True)
    assert _is_temp_pair("model.pt.Xa93kQ", "model.pt.bT71zP", in_tmp=False)
    assert not _is_temp_pair("step_000001", "step_000002", in_tmp=True)  # a counter
    assert not _is_temp_pair("step_000123", "step_000456", in_tmp=True)  # digits only
    assert not _is_temp_pair("shard-000.bin", "shard-731.bin", in_tmp=True)  # run of 3
    assert _is_date_pair("log-20240101-120000.txt", "log-20240102-093011.txt")
    assert _is_date_pair("ckpt-1733100000.pt", "ckpt-1733100421.pt")
    assert not _is_date_pair("step-1.pt", "step-2.pt")
