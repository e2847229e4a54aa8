"""fdtrack on constructed traces: path resolution, fd families, close-on-exec, kernel copies,
created files, interrupted calls. `aux` columns are built by hand as the kernel fills them."""

from __future__ import annotations

import numpy as np

from renacerd.columns import SYSCALL_COLUMNS
from renacerd.reports.show import syscall_summary
from renacerd.syscall_table import errno_name, syscall_table
from renacerd.trace.fdtrack import (
    AT_FDCWD,
    F_DUPFD,
    F_DUPFD_CLOEXEC,
    F_SETFD,
    O_APPEND,
    O_CLOEXEC,
    O_CREAT,
    O_EXCL,
    O_TRUNC,
    O_WRONLY,
    run_file_stats,
    run_files,
)
from renacerd.trace.unified_trace import UnifiedTrace

NR = {name: nr for nr, name in syscall_table().items()}
CWD = AT_FDCWD & 0xFFFFFFFF  # as the register holds it: a zero-extended int


class Run:
    """Processes of one run sharing a string table; with_aux=False: a run recorded before
    the kernel filled `aux`."""

    def __init__(self, with_aux: bool = True) -> None:
        self.strings: list[bytes] = []
        self.traces: list[UnifiedTrace] = []
        self.ts = 1_000
        self.with_aux = with_aux

    def intern(self, s: str) -> int:
        b = s.encode()
        if b not in self.strings:
            self.strings.append(b)
        return self.strings.index(b)

    def proc(self, pid: int, ppid: int = 1, fds: dict[int, str] | None = None,
             cwd: str | None = "/work") -> Proc:
        p = Proc(self, pid, ppid, dict(fds or {0: "/dev/null", 1: "/out/stdout",
                                             2: "/out/stderr"}))
        if cwd is not None:
            p.t.process.initial_fds[AT_FDCWD] = cwd
        self.traces.append(p.t)
        return p


class Proc:
    """call() appends one syscall; time advances 100 ns a call."""

    def __init__(self, run: Run, pid: int, ppid: int, fds: dict[int, str]) -> None:
        self.run = run
        self.t = UnifiedTrace(pid, "prog")
        self.t.process.ppid = ppid
        self.t.process.start_mono_ns = run.ts
        self.t.process.initial_fds = fds
        self.t.strings = run.strings
        self.rows: list[tuple] = []
        self.aux: list[int] = []

    def call(self, name: str, ret: int = 0, a0: int = 0, s0: str | None = None,
             s1: str | None = None, aux: int = 0) -> Proc:
        r = self.run
        self.rows.append((r.ts, 50, ret, a0 & 0xFFFFFFFFFFFFFFFF, self.t.pid, NR[name], 0,
                          r.intern(s0) if s0 is not None else -1,
                          r.intern(s1) if s1 is not None else -1))
        self.aux.append(aux)
        r.ts += 100
        cols = list(zip(*self.rows))
        # the nine columns every store has; aux (and mode) only where the kernel fills them
        self.t.columns = {n: np.array(cols[k], dtype=dt)
                          for k, (n, dt) in enumerate(SYSCALL_COLUMNS[:9])}
        if r.with_aux:
            self.t.columns["aux"] = np.array(self.aux, dtype=np.uint32)
            self.t.columns["mode"] = np.zeros(len(self.aux), dtype=np.uint32)
        return self


def stats(run: Run) -> dict[int, dict]:
    return {pid: {p: (f.bytes_read, f.bytes_written) for p, f in fs.items()}
            for pid, fs in run_file_stats(run.traces).items()}


def test_relative_paths_resolve_against_the_cwd_and_chdir():
    r = Run()
    p = r.proc(10)
    p.call("openat", 3, CWD, "a.txt").call("read", 10, 3).call("close", 0, 3)
    p.call("chdir", 0, 0, "sub/./deeper").call("open", 3, 0, "../b.txt").call("write", 7, 3)
    p.call("close", 0, 3).call("openat", 4, CWD, "/etc//x/../hosts").call("read", 5, 4)
    assert stats(r)[10] == {"/work/a.txt": (10, 0), "/work/sub/b.txt": (0, 7),
                            "/etc/hosts": (5, 0)}


def test_at_calls_resolve_against_their_directory_fd():
    """tar -C d1 f -C d2 f: one name, two files, each with its own bytes."""
    r = Run()
    p = r.proc(10)
    p.call("openat", 4, CWD, "d1").call("openat", 5, 4, "f.txt").call("read", 6, 5)
    p.call("close", 0, 5).call("openat", 6, 4, "/abs/d2").call("newfstatat", 0, 6, "f.txt")
    p.call("openat", 5, 6, "f.txt").call("read", 14, 5)
    assert stats(r)[10] == {"/work/d1/f.txt": (6, 0), "/abs/d2/f.txt": (14, 0)}
    pf = run_files(r.traces)[10]
    stat = r.traces[0].string(int(pf.path0[5]))
    assert stat == "/abs/d2/f.txt"
    rec = list(r.traces[0].syscalls())[1]
    assert rec.args["path"] == "f.txt" and rec.args["abs_path"] == "/work/d1/f.txt"


def test_fchdir_and_fork_inherit_the_cwd():
    r = Run()
    parent = r.proc(10)
    parent.call("openat", 3, CWD, "/srv/data").call("fchdir", 0, 3).call("close", 0, 3)
    child = r.proc(11, ppid=10, cwd=None)
    child.call("openat", 3, CWD, "in.bin").call("read", 4, 3)
    parent.call("chdir", 0, 0, "/elsewhere")
    assert stats(r)[11] == {"/srv/data/in.bin": (4, 0)}


def test_grandchildren_inherit_through_their_parents():
    """make -C dir: make chdirs, gcc inherits, cc1 (gcc's child) inherits from gcc."""
    r = Run()
    r.proc(10).call("chdir", 0, 0, "proj")
    gcc = r.proc(11, ppid=10, cwd=None)
    gcc.call("openat", 3, CWD, "Makefile")
    cc1 = r.proc(12, ppid=11, cwd=None)
    cc1.call("openat", 4, CWD, "hello.c").call("read", 29, 4).call("read", 1, 3)
    assert stats(r)[12] == {"/work/proj/hello.c": (29, 0), "/work/proj/Makefile": (1, 0)}


def test_unknown_cwd_keeps_the_raw_relative_path():
    r = Run()
    r.proc(10, cwd=None).call("openat", 3, CWD, "rel.txt").call("read", 3, 3)
    assert stats(r)[10] == {"rel.txt": (3, 0)}


def test_fcntl_dupfd_saves_and_restores_stdout():
    """dash's `echo a > out; echo bcd`: fd 1 saved with F_DUPFD, redirected, restored."""
    r = Run()
    p = r.proc(10)
    p.call("openat", 3, CWD, "out", aux=O_WRONLY | O_CREAT | O_TRUNC)
    p.call("fcntl", 11, 1, aux=F_DUPFD | 10 << 16).call("close", 0, 1)
    p.call("fcntl", 0, 11, aux=F_SETFD | 1 << 16).call("dup2", 1, 3).call("close", 0, 3)
    p.call("write", 2, 1).call("dup2", 1, 11).call("close", 0, 11).call("write", 4, 1)
    p.call("fcntl", 0o100001, 1, aux=3)  # F_GETFL: its value is no fd
    p.call("fcntl", 12, 1, aux=F_DUPFD_CLOEXEC).call("write", 1, 12)
    assert stats(r)[10] == {"/work/out": (0, 2), "/out/stdout": (0, 5)}


def test_fcntl_without_aux_changes_nothing():
    r = Run(with_aux=False)
    p = r.proc(10)
    p.call("fcntl", 0, 1).call("write", 3, 0).call("fcntl", 1, 2).call("write", 2, 1)
    assert stats(r)[10] == {"/dev/null": (0, 3), "/out/stdout": (0, 2)}


def test_pipe_ends_pair_up_with_the_captured_fds():
    r = Run()
    p = r.proc(10)
    p.call("pipe2", 0, 7 | 9 << 32, aux=O_CLOEXEC).call("write", 5, 9)
    child = r.proc(11, ppid=10, cwd=None)
    child.call("read", 5, 7)
    p.call("execve", 0, 0, "/bin/x").call("write", 1, 9)  # closed at exec: no file
    s = stats(r)
    (name,) = s[10]
    assert name.startswith("pipe:[") and s[10] == {name: (0, 5)} and s[11] == {name: (5, 0)}


def test_pipe_fds_derived_without_aux():
    """Recorded before `aux`: pipe's fds are the two lowest free numbers."""
    r = Run(with_aux=False)
    p = r.proc(10, fds={0: "/dev/null", 1: "/o", 2: "/e", 4: "/x"})
    p.call("pipe", 0, 0x7FFC0000).call("write", 3, 5).call("read", 3, 3)
    p.call("socketpair", 0, 1).call("write", 2, 6).call("read", 2, 7)
    s = stats(r)[10]
    pipe = next(k for k in s if k.startswith("pipe:"))
    sock = next(k for k in s if k.startswith("socket:"))
    assert s[pipe] == (3, 3) and s[sock] == (2, 2)


def test_anonymous_fds_accept_and_dup3():
    r = Run()
    p = r.proc(10)
    p.call("eventfd2", 3, 0).call("write", 8, 3).call("memfd_create", 4, 0, "buf", aux=1)
    p.call("write", 100, 4).call("socket", 5, 2).call("accept4", 6, 5, "inet:10.0.0.1:80")
    p.call("read", 9, 6).call("dup3", 7, 6, aux=O_CLOEXEC).call("read", 1, 7)
    p.call("execve", 0, 0, "/bin/y").call("read", 1, 7).call("write", 1, 3)
    assert stats(r)[10] == {"anon_inode:[eventfd]": (0, 9), "/memfd:buf (deleted)": (0, 100),
                            "socket:inet:10.0.0.1:80": (10, 0)}


def test_close_on_exec_from_open_flags():
    r = Run()
    p = r.proc(10)
    p.call("openat", 3, CWD, "keep").call("openat", 4, CWD, "gone", aux=O_CLOEXEC)
    p.call("execve", -2, 0, "/nope").call("write", 1, 4)  # a failed exec closes nothing
    p.call("execve", 0, 0, "/bin/z").call("write", 2, 3).call("write", 3, 4)
    assert stats(r)[10] == {"/work/keep": (0, 2), "/work/gone": (0, 1)}


def test_kernel_copies_count_both_sides():
    r = Run()
    p = r.proc(10)
    p.call("openat", 3, CWD, "src").call("openat", 4, CWD, "dst", aux=O_WRONLY | O_CREAT)
    p.call("copy_file_range", 4096, 3, aux=4).call("copy_file_range", 0, 3, aux=4)
    p.call("sendfile", 10, 1, aux=3).call("splice", 20, 3, aux=4).call("tee", 5, 3, aux=1)
    p.call("copy_file_range", -18, 3, aux=4)  # EXDEV: nothing moved
    assert stats(r)[10] == {"/work/src": (4131, 0), "/work/dst": (0, 4116),
                            "/out/stdout": (0, 15)}


def test_kernel_copies_without_aux_count_the_known_side():
    r = Run(with_aux=False)
    p = r.proc(10)
    p.call("openat", 3, CWD, "src").call("copy_file_range", 50, 3).call("sendfile", 7, 1)
    assert stats(r)[10] == {"/work/src": (50, 0), "/out/stdout": (0, 7)}


def test_created_truncated_appended():
    r = Run()
    p = r.proc(10)
    mk = O_WRONLY | O_CREAT
    p.call("newfstatat", 0, CWD, "old").call("openat", 3, CWD, "old", aux=mk | O_TRUNC)
    p.call("newfstatat", -2, CWD, "new").call("openat", 4, CWD, "new", aux=mk)
    p.call("openat", 5, CWD, "excl", aux=mk | O_EXCL).call("openat", 6, CWD, "log",
                                                             aux=mk | O_APPEND)
    p.call("write", 3, 6).call("unlink", 0, 0, "old").call("openat", 7, CWD, "old", aux=mk)
    p.call("creat", 8, 0, "made").call("openat", 9, CWD, "new", aux=mk)
    files = run_file_stats(r.traces)[10]
    got = {k: (f.created, f.truncated, f.appended) for k, f in files.items()}
    assert got == {"/work/old": (True, True, False), "/work/new": (True, False, False),
                   "/work/excl": (True, False, False), "/work/log": (True, False, True),
                   "/work/made": (True, True, False)}
    assert files["/work/log"].bytes_written == 3


def test_created_not_claimed_for_a_file_seen_before():
    r = Run()
    r.proc(10).call("faccessat2", 0, CWD, "/data/x")
    r.proc(11).call("openat", 3, CWD, "/data/x", aux=O_WRONLY | O_CREAT | O_TRUNC)
    assert run_file_stats(r.traces)[11]["/data/x"].created is False


def test_rename_second_path_uses_the_second_dirfd():
    r = Run()
    p = r.proc(10)
    p.call("openat", 3, CWD, "/a").call("openat", 4, CWD, "/b")
    p.call("renameat2", 0, 3, "tmp", "final", aux=4)
    pf = run_files(r.traces)[10]
    t = r.traces[0]
    assert (t.string(int(pf.path0[2])), t.string(int(pf.path1[2]))) == ("/a/tmp", "/b/final")


def test_restart_errnos_are_interrupted_not_errors():
    r = Run()
    p = r.proc(10)
    p.call("nanosleep", -516).call("nanosleep", 0).call("read", -512, 0).call("read", -4, 0)
    p.call("read", -524, 0)
    tab = syscall_summary(r.traces[0])
    assert tab["nanosleep"]["errors"] == 0 and tab["nanosleep"]["interrupted"] == 1
    assert tab["read"]["errors"] == 2 and tab["read"]["interrupted"] == 1
    assert [errno_name(e) for e in (512, 513, 514, 515, 516, 524, 4)] == [
        "ERESTARTSYS", "ERESTARTNOINTR", "ERESTARTNOHAND", "ENOIOCTLCMD",
        "ERESTART_RESTARTBLOCK", "ENOTSUPP", "EINTR"]


def test_compare_effects_use_created_files_and_absolute_paths():
    """Two runs writing the same relative name from different directories differ; a file
    created only in one run is an effect of that run."""
    from renacerd.trace.effects import run_effects

    def one(cwd: str) -> dict[str, int]:
        r = Run()
        p = r.proc(10, cwd=cwd)
        p.call("openat", 3, CWD, "out.bin", aux=O_WRONLY | O_CREAT)
        p.call("write", 5, 3).call("socketpair", 0, 4 | 5 << 32, aux=0).call("write", 2, 4)
        p.call("read", 2, 5).call("mkdirat", 0, CWD, "d").call("renameat", 0, CWD, "out.bin",
                                                               "d/final.bin", aux=CWD)
        return run_effects(r.traces).items()

    a = one("/data/a")
    assert a == {"written:/data/a/d/final.bin": 5, "created:/data/a/d/final.bin": 1,
                 "created:/data/a/d": 1, "net_sent:socketpair": 2, "net_recv:socketpair": 2}
    b = one("/data/b")
    assert "written:/data/b/d/final.bin" in b and "written:/data/a/d/final.bin" not in b


def _random_trace(seed: int) -> UnifiedTrace:
    """Bursts of opens and closes (absolute, cwd-relative, dirfd-relative, failing) with
    dups, fcntls, pipes, chdirs, execs and close_ranges between them."""
    rng = np.random.default_rng(seed)
    strings = [b"/work", b"/data/a", b"rel/b", b"../c", b"/x//y/./z", b"", b"sub", b"/tmp/s"]
    t = UnifiedTrace(7, "prog")
    t.strings = strings
    t.process.initial_fds = {0: "/dev/null", 3: "/data/a", AT_FDCWD: "/work"}
    rows = []
    opens = ["open", "openat", "creat", "openat2"]
    other = ["dup", "dup2", "fcntl", "pipe2", "chdir", "fchdir", "execve", "close_range",
             "socket", "eventfd2", "close"]
    for _ in range(rng.integers(5, 25)):
        for _ in range(rng.integers(0, 200)):
            name = opens[rng.integers(4)] if rng.random() < 0.5 else "close"
            fd = int(rng.integers(0, 12)) if name == "close" else int(
                rng.choice([AT_FDCWD, 3, 5], p=[0.96, 0.02, 0.02]))
            ret = int(rng.integers(0, 12)) if name != "close" else 0
            rows.append((name, -1 if rng.random() < 0.05 else ret, fd,
                         int(rng.integers(-1, len(strings))), int(rng.integers(0, 1 << 20))))
        for _ in range(rng.integers(0, 3)):
            name = other[rng.integers(len(other))]
            fd = int(rng.choice([AT_FDCWD, -1])) if name == "close" else int(
                rng.integers(0, 12))
            rows.append((name, int(rng.integers(0, 12)) if name != "execve" else 0, fd,
                         int(rng.integers(-1, len(strings))), int(rng.integers(0, 1 << 20))))
    n = len(rows)
    ts = np.cumsum(rng.integers(0, 3, n)) + 10  # ties too
    t.columns = {name: np.zeros(n, dtype=dt) for name, dt in SYSCALL_COLUMNS}
    c = t.columns
    c["ts"][:] = ts
    c["nr"][:] = [NR[r[0]] for r in rows]
    c["ret"][:] = [r[1] for r in rows]
    c["a0"][:] = [r[2] & 0xFFFFFFFF for r in rows]
    c["s0"][:] = [r[3] for r in rows]
    c["aux"][:] = [r[4] for r in rows]
    return t


def _replayed(t: UnifiedTrace, fast_run: int, monkeypatch) -> tuple:
    import renacerd.trace.fdtrack as fdt

    monkeypatch.setattr(fdt, "FAST_RUN", fast_run)
    t.strings = list(t.strings[:8])
    pf = fdt.process_files(t)
    hist = fdt.fd_changes(t)
    return (pf.fd.tolist(), pf.fd2.tolist(), pf.path0.tolist(), pf.path1.tolist(),
            pf.opens.tolist(), pf.open_flags.tolist(), list(pf.final.table.items()),
            sorted(pf.final.cloexec), list(t.strings),
            {fd: [a.tolist() for a in h.arrays()] for fd, h in hist.items()})


def test_vectorised_replay_matches_the_loop(monkeypatch):
    # the vectorised runs of opens and closes leave exactly what the one-by-one loop does
    for seed in range(25):
        t = _random_trace(seed)
        want = _replayed(t, 10**9, monkeypatch)
        for fast_run in (1, 3, 64):
            assert _replayed(t, fast_run, monkeypatch) == want, (seed, fast_run)


def test_streamed_files_match_the_whole_replay():
    # fed in parts, the replay names each fd call's file as process_files does on the whole
    # trace, for calls before the next part's first ts (the rest wait for it)
    from renacerd.trace.fdtrack import (
        REPLAY_COLUMNS,
        StreamedFiles,
        fd_changes,
        fd_files,
        process_files,
    )

    for seed in range(10):
        t = _random_trace(seed)
        t.strings = list(t.strings[:8])
        want = process_files(t).fd
        strings = list(t.strings)
        cuts = sorted({0, len(t), *np.random.default_rng(seed).integers(0, len(t), 6).tolist()})
        whole = t.columns
        part = UnifiedTrace(t.pid, t.name)
        part.process, part.strings, part.table = t.process, list(strings), t.table
        sf = StreamedFiles(part)
        got = np.full(len(t), -9, dtype=np.int32)
        done = 0
        for a, b in zip(cuts[:-1], cuts[1:]):
            sf.feed({k: v[a:b] for k, v in whole.items()})
            end = b if b == len(t) else int(np.searchsorted(whole["ts"], whole["ts"][b]))
            got[done:end] = sf.files(whole["nr"][done:end], whole["a0"][done:end],
                                     whole["ts"][done:end])
            done = end
        # string ids of the same replay (the parts' own table starts as the whole's did)
        assert [part.strings[i] if i >= 0 else None for i in got.tolist()] == \
            [t.strings[i] if i >= 0 else None for i in want.tolist()], seed
        # a replay of only the table-changing calls gives the same
        sub = UnifiedTrace(t.pid, t.name)
        sub.process, sub.strings, sub.table = t.process, list(strings), t.table
        keep = np.isin(whole["nr"], [nr for nr, n in t.table.items() if n in {
            "open", "openat", "openat2", "creat", "close", "dup", "dup2", "fcntl", "pipe2",
            "chdir", "fchdir", "execve", "close_range", "socket", "eventfd2"}])
        sub.columns = {k: whole[k][keep] for k in REPLAY_COLUMNS}
        fd = fd_files(fd_changes(sub), t.table, whole["nr"], whole["a0"], whole["ts"])
        assert [sub.strings[i] if i >= 0 else None for i in fd.tolist()] == \
            [t.strings[i] if i >= 0 else None for i in want.tolist()], seed
