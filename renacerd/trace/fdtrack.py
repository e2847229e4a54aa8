"""Files at analysis time: replay each process's fd table and cwd so every call names its file.

The fd table of a process is rebuilt from its calls (open, dup, fcntl(F_DUPFD), pipe,
socket, accept, eventfd, memfd_create, close, exec's close-on-exec, ...), starting from the
table read from /proc when tracing began (or, for a forked child, its parent's table at the
fork). The working directory lives in the same table under AT_FDCWD (-100): it is read from
/proc at attach/launch, inherited at fork, and followed through chdir/fchdir. Every path
argument is resolved against it, or against the directory fd of an *at() call, so files are
keyed by their absolute path (lexically normalised: symlinks are not followed, a directory
renamed later is not followed).

Calls that need more than the first argument read the `aux` column (absent in runs recorded
before it existed; the fallbacks are noted in AUX):
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from renacerd.records import AT_FDCWD
from renacerd.trace.unified_trace import FD_SYSCALLS, READ_FAMILY, WRITE_FAMILY, UnifiedTrace

O_WRONLY, O_RDWR = 0o1, 0o2
O_CREAT, O_EXCL, O_TRUNC, O_APPEND, O_CLOEXEC = 0o100, 0o200, 0o1000, 0o2000, 0o2000000
F_DUPFD, F_SETFD, F_DUPFD_CLOEXEC, FD_CLOEXEC = 0, 2, 1030, 1
ENOENT = 2

# What the kernel side puts in `aux` (u32) for the calls fdtrack reads it for.
AUX = {
    "open": "flags (a1)", "openat": "flags (a2)", "openat2": "how->flags, low 32 bits",
    "dup3": "flags (a2)", "pipe2": "flags (a1)", "socket": "type (a1)",
    "socketpair": "type (a1)", "accept4": "flags (a3)", "eventfd2": "flags (a1)",
    "timerfd_create": "flags (a1)", "signalfd4": "flags (a3)", "memfd_create": "flags (a1)",
    "fcntl": "cmd (a1) in the low 16 bits, the low 16 bits of arg (a2) above",
    "sendfile": "in_fd (a1)", "copy_file_range": "fd_out (a2)", "splice": "fd_out (a2)",
    "tee": "fd_out (a1)",
    "renameat": "newdirfd (a2)", "renameat2": "newdirfd (a2)", "linkat": "newdirfd (a2)",
    "symlinkat": "newdirfd (a1)",
}
# pipe, pipe2 and socketpair return their fds in user memory: with the `aux` column present,
# a0 holds them as read at exit (fds[0] in the low 32 bits, fds[1] in the high 32 bits).
# Without it they are taken to be the two lowest free fds, which is what the kernel hands
# out when no other thread opens an fd at the same moment.
__doc__ += "".join(f"\n    {k:<16} {v}" for k, v in AUX.items()) + "\n"

OPENS = frozenset({"open", "openat", "openat2", "creat"})
OPENATS, CREATS = frozenset({"openat", "openat2"}), frozenset({"creat"})
DUPS = frozenset({"dup", "dup2", "dup3"})
PAIRS = frozenset({"pipe", "pipe2", "socketpair"})
CLOSES = frozenset({"close"})
CONNECTS = frozenset({"connect", "bind"})
CHDIRS = frozenset({"chdir", "fchdir"})
EXECS = frozenset({"execve", "execveat"})
# fd-returning calls that name no path: (label, where the close-on-exec bit is, its mask);
# labels are those of /proc/PID/fd (and strace -y)
ANON: dict[str, tuple[str, str, int]] = {
    "eventfd": ("anon_inode:[eventfd]", "", 0),
    "eventfd2": ("anon_inode:[eventfd]", "aux", O_CLOEXEC),
    "epoll_create": ("anon_inode:[eventpoll]", "", 0),
    "epoll_create1": ("anon_inode:[eventpoll]", "a0", O_CLOEXEC),
    "timerfd_create": ("anon_inode:[timerfd]", "aux", O_CLOEXEC),
    "signalfd": ("anon_inode:[signalfd]", "", 0),
    "signalfd4": ("anon_inode:[signalfd]", "aux", O_CLOEXEC),
    "inotify_init": ("anon_inode:inotify", "", 0),
    "inotify_init1": ("anon_inode:inotify", "a0", O_CLOEXEC),
    "fanotify_init": ("anon_inode:[fanotify]", "a0", 1),
    "pidfd_open": ("anon_inode:[pidfd]", "always", 0),
    "userfaultfd": ("anon_inode:[userfaultfd]", "a0", O_CLOEXEC),
    "perf_event_open": ("anon_inode:[perf_event]", "", 0),
    "io_uring_setup": ("anon_inode:[io_uring]", "always", 0),
    "memfd_secret": ("/secretmem (deleted)", "a0", O_CLOEXEC),
}
# fd-returning calls whose file cannot be named from the trace: the number stops naming
# the old file
UNNAMED = frozenset({"open_by_handle_at", "pidfd_getfd", "fsopen", "fsmount", "fspick",
                     "open_tree", "landlock_create_ruleset"})
SOCKETS = frozenset({"socket", "accept", "accept4"})
_TABLE_CHANGERS = (OPENS | DUPS | PAIRS | SOCKETS | CLOSES | CONNECTS | CHDIRS | EXECS
                   | UNNAMED | set(ANON) | {"close_range", "fcntl", "memfd_create"})
# *at() calls whose first path is relative to the directory fd in a0
AT_CALLS = frozenset(
    """openat openat2 newfstatat statx faccessat faccessat2 unlinkat mkdirat readlinkat
    fchmodat fchmodat2 fchownat mknodat utimensat futimesat renameat renameat2 linkat
    execveat name_to_handle_at""".split()
)
# calls whose second path is relative to a second directory fd (in aux)
AT_CALLS2 = frozenset({"renameat", "renameat2", "linkat", "symlinkat"})
# the first path of a symlink is the link's text, not a name looked up
TEXT_PATH0 = frozenset({"symlink", "symlinkat"})
# kernel-side copies: bytes read on one fd and written on another; (reader, writer) is
# which of a0 / aux is which
COPIES = {"sendfile": ("aux", "a0"), "copy_file_range": ("a0", "aux"),
          "splice": ("a0", "aux"), "tee": ("a0", "aux")}


class _Interner:
    """Adds labels and resolved paths to the trace's string table."""

    def __init__(self, trace: UnifiedTrace) -> None:
        self.trace = trace
        self.ids = {s: i for i, s in enumerate(trace.strings)}

    def __call__(self, s: str | bytes) -> int:
        b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
        i = self.ids.get(b)
        if i is None:
            i = self.ids[b] = len(self.trace.strings)
            self.trace.strings.append(b)
        return i


class _Paths:
    """Lexical path resolution over string ids, memoised."""

    def __init__(self, intern: _Interner) -> None:
        self.intern = intern
        self.strings = intern.trace.strings
        self._norm: dict[int, int] = {}
        self._join: dict[tuple[int, int], int] = {}

    def absolute(self, sid: int) -> bool:
        """The string `sid` is an absolute path."""
        return 0 <= sid < len(self.strings) and self.strings[sid][:1] == b"/"

    def norm(self, sid: int) -> int:
        """The absolute path `sid` with "//", "." and ".." folded."""
        out = self._norm.get(sid)
        if out is None:
            p = os.path.normpath(self.strings[sid])
            if p.startswith(b"//"):
                p = b"/" + p.lstrip(b"/")
            out = self._norm[sid] = self.intern(p)
        return out

    def resolve(self, base: int, sid: int) -> int:
        """Path `sid` looked up from directory `base` (string ids); `sid` itself when it
        cannot be resolved (the directory is unknown), -1 when there is no path."""
        if sid < 0:
            return -1
        if self.absolute(sid):
            return self.norm(sid)
        if not self.absolute(base):
            return sid
        key = (base, sid)
        out = self._join.get(key)
        if out is None:
            rel = self.strings[sid]
            joined = self.strings[base] + b"/" + rel if rel else self.strings[base]
            out = self._join[key] = self.norm(self.intern(joined))
        return out


@dataclass(slots=True)
class FdState:
    """A process's fd table at one instant: fd -> string id (-1: open, names nothing known),
    the close-on-exec fds; AT_FDCWD holds the working directory."""

    table: dict[int, int] = field(default_factory=dict)
    cloexec: set[int] = field(default_factory=set)


@dataclass(slots=True)
class ProcessFiles:
    """One process's calls resolved to files: per-event string ids (-1: none)."""

    fd: np.ndarray  # the file the fd in a0 referred to
    fd2: np.ndarray  # the file of the second fd (aux) of sendfile/copy_file_range/splice/tee
    path0: np.ndarray  # the first path argument, resolved to an absolute path
    path1: np.ndarray  # the second path argument, resolved
    opens: np.ndarray  # indices of the successful opens
    open_flags: np.ndarray  # their flags (-1: not recorded)
    final: FdState = field(default_factory=FdState)


def _i32(a: np.ndarray) -> np.ndarray:
    """Low 32 bits as a C int: fds are ints, passed zero-extended in the 64-bit register."""
    return (a & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


def _nrs(trace: UnifiedTrace, names) -> np.ndarray:
    return _table_nrs(trace.table, names)


def _table_nrs(table: dict[int, str], names) -> np.ndarray:
    return np.array([nr for nr, n in table.items() if n in names], dtype=np.uint16)


def _lowest_free(table: dict[int, int], n: int) -> list[int]:
    out, fd = [], 0
    while len(out) < n:
        if fd not in table:
            out.append(fd)
        fd += 1
    return out


class History:
    """One fd's changes in time order, (ts, string id; -1: closed), appended one at a time by
    the replay's loop or a run at a time by its vectorised path; kept in arrays that grow
    by doubling (a replay fed in parts reads them between parts without copying)."""

    __slots__ = ("_ts", "_sid", "_n", "_pend", "ordered")

    def __init__(self) -> None:
        self._ts = np.empty(0, dtype=np.int64)
        self._sid = np.empty(0, dtype=np.int32)
        self._n = 0
        self._pend: list[tuple[int, int]] = []
        self.ordered = True  # times non-decreasing: a lookup may search a slice of them

    def __len__(self) -> int:
        return self._n + len(self._pend)

    def append(self, ts: int, sid: int) -> None:
        """One change."""
        self._pend.append((ts, sid))

    def extend(self, ts: np.ndarray, sid: np.ndarray) -> None:
        """Changes in time order, after those already held."""
        self._flush()
        self._push(ts, sid)

    def _flush(self) -> None:
        if self._pend:
            ts, sid = zip(*self._pend)
            self._pend = []
            self._push(np.array(ts, dtype=np.int64), np.array(sid, dtype=np.int32))

    def _push(self, ts: np.ndarray, sid: np.ndarray) -> None:
        n, m = self._n, len(ts)
        if n + m > len(self._ts):
            cap = max(2 * len(self._ts), n + m, 16)
            self._ts = np.concatenate([self._ts[:n], np.empty(cap - n, dtype=np.int64)])
            self._sid = np.concatenate([self._sid[:n], np.empty(cap - n, dtype=np.int32)])
        self._ts[n:n + m] = ts
        self._sid[n:n + m] = sid
        if self.ordered and m:
            self.ordered = (not n or int(ts[0]) >= int(self._ts[n - 1])) and bool(
                (np.diff(ts) >= 0).all())
        self._n = n + m

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(times, string ids) of every change."""
        self._flush()
        return self._ts[:self._n], self._sid[:self._n]


Changes = dict[int, History]  # fd -> its changes
# Runs of opens and closes shorter than this are replayed one by one: numpy's fixed cost per
# run exceeds the loop's for a few calls.
FAST_RUN = 64


def _segments(fast: np.ndarray) -> list[tuple[int, int, bool]]:
    """(start, end, vectorised) ranges covering `fast` in order: its runs of True at least
    FAST_RUN long, and the rest between them."""
    edges = np.flatnonzero(fast[1:] != fast[:-1]) + 1
    bounds = [0, *edges.tolist(), len(fast)]
    out: list[tuple[int, int, bool]] = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi == lo:
            continue
        f = bool(fast[lo]) and hi - lo >= FAST_RUN
        if out and not f and not out[-1][2]:
            out[-1] = (out[-1][0], hi, False)
        else:
            out.append((lo, hi, f))
    return out


def _initial(trace: UnifiedTrace, intern: _Interner) -> FdState:
    return FdState({fd: intern(path) for fd, path in trace.process.initial_fds.items()})


class _Replay:
    """One pass over a process's fd-changing calls, in time order."""

    def __init__(self, trace: UnifiedTrace, initial: FdState | None, paths: _Paths) -> None:
        self.trace = trace
        self.paths = paths
        self.intern = paths.intern
        st = initial if initial is not None else _initial(trace, self.intern)
        self.table = dict(st.table)
        self.cloexec = set(st.cloexec)
        self.changes: Changes = defaultdict(History)
        for fd, sid in self.table.items():
            self.changes[fd].append(-1, sid)
        self._luts: dict[frozenset, np.ndarray] = {}

    def _lut(self, names: frozenset) -> np.ndarray:
        """_nr_lut of the trace's table, made once per set of names."""
        lut = self._luts.get(names)
        if lut is None:
            lut = self._luts[names] = _nr_lut(self.trace.table, names)
        return lut

    def set(self, fd: int, sid: int, ts: int, cloexec: bool = False) -> None:
        self.table[fd] = sid
        self.changes[fd].append(ts, sid)
        if cloexec:
            self.cloexec.add(fd)
        else:
            self.cloexec.discard(fd)

    def drop(self, fd: int, ts: int) -> None:
        if self.table.pop(fd, None) is not None or fd in self.changes:
            self.changes[fd].append(ts, -1)
        self.cloexec.discard(fd)

    def run(self, until: int | None, r0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Replay; fills r0 for opens and chdirs; returns (open indices, their flags)."""
        t, c = self.trace, self.trace.columns
        # in pieces, one per run of calls: a list of millions of ints costs 40 bytes each
        opens: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
        flags_out: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
        if len(t):
            mask = self._lut(_TABLE_CHANGERS)[c["nr"]] & (c["ret"] >= 0)
            if until is not None:
                mask &= c["ts"] < until
            rows = np.flatnonzero(mask)
            for lo, hi, fast in _segments(self._fast(rows)):
                run = self._run_fast if fast else self._run_slow
                run(rows[lo:hi], r0, opens, flags_out)
        return np.concatenate(opens), np.concatenate(flags_out)

    def _fast(self, rows: np.ndarray) -> np.ndarray:
        """Which of these calls the vectorised path replays: closes of an fd, and opens whose
        file does not hang on an fd that the same run of calls could change (an absolute
        path, or one relative to the cwd, which only chdir/fchdir change)."""
        c = self.trace.columns
        nr, s0, fd = c["nr"][rows], c["s0"][rows], _i32(c["a0"][rows])
        opn = self._lut(OPENS)[nr]
        uniq = _distinct(s0[opn].astype(np.int64)).tolist()
        absolute = [u for u in uniq if self.paths.absolute(u)]
        own_dir = self._lut(OPENATS)[nr] & (fd != AT_FDCWD)
        # an absolute path (or none) hangs on no directory fd
        own_dir &= False if len(absolute) == len(uniq) else ~((s0 < 0) | np.isin(s0, absolute))
        return (opn & ~own_dir) | (self._lut(CLOSES)[nr] & (fd >= 0))

    def _run_fast(self, rows: np.ndarray, r0: np.ndarray, opens: list[np.ndarray],
                  flags_out: list[np.ndarray]) -> None:
        """A run of opens and closes (see _fast), replayed with numpy; the table, changes,
        close-on-exec set and interned strings end exactly as the one-by-one loop leaves
        them."""
        c = self.trace.columns
        nr = c["nr"][rows]
        is_open = self._lut(OPENS)[nr]
        oi = np.flatnonzero(is_open)
        sid = np.full(len(rows), -1, dtype=np.int64)
        cx = np.zeros(len(rows), dtype=bool)
        if len(oi):
            sid[oi] = self._resolve_cwd(c["s0"][rows[oi]])
            aux = c.get("aux")
            fl = (aux[rows[oi]].astype(np.int64) if aux is not None
                  else np.full(len(oi), -1, dtype=np.int64))
            fl[self._lut(CREATS)[nr[oi]]] = O_CREAT | O_WRONLY | O_TRUNC
            r0[rows[oi]] = sid[oi]
            opens.append(rows[oi].astype(np.int64))
            flags_out.append(fl)
            cx[oi] = (fl >= 0) & ((fl & O_CLOEXEC) != 0)
        target = np.where(is_open, c["ret"][rows].astype(np.int64),
                          _i32(c["a0"][rows]).astype(np.int64))
        self._apply(target, is_open, sid, c["ts"][rows].astype(np.int64), cx)

    def _resolve_cwd(self, s0: np.ndarray) -> np.ndarray:
        """The opens' paths resolved against the cwd, each distinct path once, in the order
        first seen (so new strings get the ids the loop would give them)."""
        cwd = self.table.get(AT_FDCWD, -1)
        s0 = s0.astype(np.int64)
        uniq = _distinct(s0)
        if len(uniq) > 64:
            uniq, first = np.unique(s0, return_index=True)
        else:  # few paths (the usual case): a pass each beats a sort
            first = np.array([int(np.argmax(s0 == u)) for u in uniq.tolist()], dtype=np.int64)
        out = np.empty(len(uniq), dtype=np.int64)
        for j in np.argsort(first, kind="stable").tolist():
            out[j] = self.paths.resolve(cwd, int(uniq[j]))
        return out[np.searchsorted(uniq, s0)]

    def _apply(self, target: np.ndarray, is_open: np.ndarray, sid: np.ndarray, ts: np.ndarray,
               cx: np.ndarray) -> None:
        """Per fd, a run's opens (set) and closes (drop) in time order."""
        lo = int(target.min())
        # fds of a small range sort as u16: numpy's stable sort is then a radix sort
        order = np.argsort(target - lo if int(target.max()) - lo >= 1 << 16 else
                           (target - lo).astype(np.uint16), kind="stable")
        tg = target[order]
        starts = np.flatnonzero(np.r_[True, tg[1:] != tg[:-1]]).tolist()
        inserts = []
        for a, b in zip(starts, [*starts[1:], len(tg)]):
            seg, f = order[a:b], int(tg[a])
            kinds = is_open[seg]
            # a close appends only once the fd has a history (drop)
            keep = seg if f in self.changes else seg[int(np.argmax(kinds)):] if kinds.any() \
                else seg[:0]
            if len(keep):
                self.changes[f].extend(ts[keep], sid[keep])
            if not kinds[-1]:
                self.table.pop(f, None)
                self.cloexec.discard(f)
                continue
            closes = np.flatnonzero(~kinds)
            if not len(closes) and f in self.table:
                self.table[f] = int(sid[seg[-1]])  # updated in place: it keeps its position
            else:  # (re)inserted at the first open after its last close: it moves to the end
                self.table.pop(f, None)
                at = int(closes[-1]) + 1 if len(closes) else 0
                inserts.append((int(seg[at]), f, int(sid[seg[-1]])))
            (self.cloexec.add if cx[seg[-1]] else self.cloexec.discard)(f)
        for _, f, s in sorted(inserts):
            self.table[f] = s

    def _run_slow(self, rows: np.ndarray, r0: np.ndarray, opens_out: list[np.ndarray],
                  flags_out: list[np.ndarray]) -> None:
        """Calls replayed one by one, in order."""
        opens: list[int] = []
        flags: list[int] = []
        self._one_by_one(rows, r0, opens, flags)
        opens_out.append(np.array(opens, dtype=np.int64))
        flags_out.append(np.array(flags, dtype=np.int64))

    def _one_by_one(self, rows: np.ndarray, r0: np.ndarray, opens: list[int],
                    flags_out: list[int]) -> None:
        """The loop of _run_slow."""
        t, c = self.trace, self.trace.columns
        aux = c.get("aux")
        names = t.table
        for i in rows:
            name = names.get(int(c["nr"][i]), "")
            ret = int(c["ret"][i])
            a0 = int(np.uint64(c["a0"][i]) & np.uint64(0xFFFFFFFF))
            fd = a0 - (1 << 32) if a0 >= 1 << 31 else a0
            ts = int(c["ts"][i])
            x = int(aux[i]) if aux is not None else None
            if name in OPENS:
                dirfd = fd if name in ("openat", "openat2") else AT_FDCWD
                sid = self.paths.resolve(self.table.get(dirfd, -1), int(c["s0"][i]))
                fl = O_CREAT | O_WRONLY | O_TRUNC if name == "creat" else (
                    x if x is not None else -1)
                r0[i] = sid
                opens.append(int(i))
                flags_out.append(fl)
                self.set(ret, sid, ts, fl >= 0 and bool(fl & O_CLOEXEC))
            elif name in DUPS or name == "fcntl":
                self._dup(name, fd, ret, ts, x)
            elif name in PAIRS:
                self._pair(name, i, ts, x)
            elif name in ("socket", "accept", "accept4") or name in CONNECTS:
                self._socket(name, i, fd, ret, ts, x)
            elif name in CLOSES or name == "close_range":
                self._close(name, fd, ts)
            elif name == "memfd_create" or name in ANON or name in UNNAMED:
                self._anonymous(name, i, a0, ret, ts, x)
            elif name == "chdir":
                sid = self.paths.resolve(self.table.get(AT_FDCWD, -1), int(c["s0"][i]))
                r0[i] = sid
                self.set(AT_FDCWD, sid, ts)
            elif name == "fchdir":
                self.set(AT_FDCWD, self.table.get(fd, -1), ts)
            elif name in EXECS and ret == 0:
                for f in sorted(self.cloexec):
                    self.drop(f, ts)

    def _dup(self, name: str, fd: int, ret: int, ts: int, x: int | None) -> None:
        """dup, dup2, dup3 and fcntl's F_DUPFD and F_SETFD."""
        if name in DUPS:
            cx = name == "dup3" and x is not None and bool(x & O_CLOEXEC)
            self.set(ret, self.table.get(fd, -1), ts, cx)
            return
        if x is None:
            return  # without the command, a return value is not known to be an fd
        cmd, arg = x & 0xFFFF, x >> 16
        if cmd in (F_DUPFD, F_DUPFD_CLOEXEC):
            self.set(ret, self.table.get(fd, -1), ts, cmd == F_DUPFD_CLOEXEC)
        elif cmd == F_SETFD and fd in self.table:
            (self.cloexec.add if arg & FD_CLOEXEC else self.cloexec.discard)(fd)

    def _socket(self, name: str, i: int, fd: int, ret: int, ts: int, x: int | None) -> None:
        """socket, accept, accept4 and the connects: the fd names its peer when known."""
        t, c = self.trace, self.trace.columns
        if name == "socket":
            self.set(ret, self.intern("socket:"), ts, x is not None and bool(x & O_CLOEXEC))
        elif name in ("accept", "accept4"):
            peer = t.string(int(c["s0"][i])) if c["s0"][i] >= 0 else ""
            cx = name == "accept4" and x is not None and bool(x & O_CLOEXEC)
            self.set(ret, self.intern(f"socket:{peer}"), ts, cx)
        elif c["s0"][i] >= 0:
            self.set(fd, self.intern(f"socket:{t.string(int(c['s0'][i]))}"), ts,
                     fd in self.cloexec)

    def _close(self, name: str, fd: int, ts: int) -> None:
        """close and close_range."""
        if name in CLOSES:
            self.drop(fd, ts)
            return
        # close_range(first, last, flags): only `first` is captured; Python's
        # subprocess and most callers close everything from `first` up
        for f in [f for f in self.table if f >= fd >= 0]:
            self.drop(f, ts)

    def _anonymous(self, name: str, i: int, a0: int, ret: int, ts: int, x: int | None) -> None:
        """memfd_create, the anonymous-inode fds (eventfd, timerfd, ...) and unnamed ones."""
        if name == "memfd_create":
            c = self.trace.columns
            label = self.trace.string(int(c["s0"][i])) if c["s0"][i] >= 0 else ""
            self.set(ret, self.intern(f"/memfd:{label} (deleted)"), ts,
                     x is not None and bool(x & 1))  # MFD_CLOEXEC
        elif name in ANON:
            label, where, bit = ANON[name]
            cx = (where == "always" or (where == "a0" and bool(a0 & bit))
                  or (where == "aux" and x is not None and bool(x & bit)))
            self.set(ret, self.intern(label), ts, cx)
        else:
            self.set(ret, -1, ts)

    def _pair(self, name: str, i: int, ts: int, x: int | None) -> None:
        c = self.trace.columns
        if x is not None:
            v = int(c["a0"][i])
            fds = [v & 0xFFFFFFFF, v >> 32]
        else:
            fds = _lowest_free(self.table, 2)
        kind = "socket" if name == "socketpair" else "pipe"
        # no inode in the trace: the call's timestamp names the pair, unique in the run
        sid = self.intern(f"{kind}:[{int(c['ts'][i])}]")
        cx = name != "pipe" and x is not None and bool(x & O_CLOEXEC)
        for f in fds:
            self.set(f, sid, ts, cx)


def _lookup(changes: Changes, fds: np.ndarray, ts: np.ndarray, side: str) -> np.ndarray:
    """For each (fd, ts): the string id the fd named at ts (-1: none)."""
    out = np.full(len(fds), -1, dtype=np.int32)
    uniq = _distinct(fds)
    for fd in uniq.tolist():
        hist = changes.get(fd)
        if not hist:
            continue
        sel = np.flatnonzero(fds == fd) if len(uniq) > 1 else np.arange(len(fds))
        times, sids = hist.arrays()
        q = ts[sel]
        if hist.ordered and len(q):
            # only the changes between these calls' first and last: a search over a slice
            lo = int(np.searchsorted(times, q.min(), side="left"))
            hi = int(np.searchsorted(times, q.max(), side="right"))
            pos = np.searchsorted(times[lo:hi], q, side=side) + (lo - 1)
        else:
            pos = np.searchsorted(times, q, side=side) - 1
        ok = pos >= 0
        out[sel[ok]] = sids[pos[ok]]
    return out


def _distinct(a: np.ndarray) -> np.ndarray:
    """np.unique of integers, through a bincount where their range is small."""
    if not len(a):
        return a
    lo, hi = int(a.min()), int(a.max())
    if hi - lo < 1 << 16:
        return np.flatnonzero(np.bincount(a - lo)) + lo
    return np.unique(a)


def _resolve_rest(trace: UnifiedTrace, rp: _Replay, slot: int, r: np.ndarray) -> None:
    """Resolve the path arguments of column s<slot> that the replay did not (-2 in r)."""
    c = trace.columns
    s = c[f"s{slot}"]
    todo = np.flatnonzero((s >= 0) & (r == -2))
    r[r == -2] = -1
    if not len(todo):
        return
    paths = rp.paths
    sids = s[todo]
    uniq = np.unique(sids)
    absolute = np.isin(sids, np.array([u for u in uniq if paths.absolute(int(u))],
                                      dtype=sids.dtype))
    for u in np.unique(sids[absolute]):
        r[todo[absolute & (sids == u)]] = paths.norm(int(u))
    rel = todo[~absolute]
    if not len(rel):
        return
    if slot == 0:
        dirfd = np.where(np.isin(c["nr"][rel], _nrs(trace, AT_CALLS)), _i32(c["a0"][rel]),
                         AT_FDCWD)
        text = np.isin(c["nr"][rel], _nrs(trace, TEXT_PATH0))
    else:
        at2 = np.isin(c["nr"][rel], _nrs(trace, AT_CALLS2))
        aux = c.get("aux")
        # without aux: rename/link within one directory fd (the common case), symlinkat
        # relative to the cwd
        second = (aux[rel].astype(np.int64).astype(np.uint32).view(np.int32)
                  if aux is not None else
                  np.where(np.isin(c["nr"][rel], _nrs(trace, {"symlinkat"})), AT_FDCWD,
                           _i32(c["a0"][rel])))
        dirfd = np.where(at2, second, AT_FDCWD)
        text = np.zeros(len(rel), dtype=bool)
    base = _lookup(rp.changes, dirfd.astype(np.int64), c["ts"][rel].astype(np.int64), "left")
    rs = s[rel]
    pairs = np.unique(np.stack([base, rs]), axis=1)
    for b, p in pairs.T:
        hit = (base == b) & (rs == p)
        r[rel[hit & ~text]] = paths.resolve(int(b), int(p))
        r[rel[hit & text]] = int(p)


def process_files(trace: UnifiedTrace, initial: FdState | None = None,
                  until: int | None = None, paths: _Paths | None = None) -> ProcessFiles:
    """Replay one process: its fd files, resolved paths and opens."""
    paths = paths or _Paths(_Interner(trace))
    n = len(trace)
    r0 = np.full(n, -2, dtype=np.int32)
    r1 = np.full(n, -2, dtype=np.int32)
    rp = _Replay(trace, initial, paths)
    opens, flags = rp.run(until, r0)
    final = FdState(rp.table, rp.cloexec)
    empty = np.empty(0, dtype=np.int64)
    if until is not None or not n:
        z = np.full(n, -1, dtype=np.int32)
        return ProcessFiles(z, z.copy(), z.copy(), z.copy(), empty, empty, final)
    _resolve_rest(trace, rp, 0, r0)
    _resolve_rest(trace, rp, 1, r1)
    c = trace.columns
    ts = c["ts"].astype(np.int64)
    fd = fd_files(rp.changes, trace.table, c["nr"], c["a0"], ts)
    fd2 = np.full(n, -1, dtype=np.int32)
    if "aux" in c:
        cp = np.flatnonzero(np.isin(c["nr"], _nrs(trace, COPIES)))
        fd2[cp] = _lookup(rp.changes, c["aux"][cp].astype(np.int64).astype(np.uint32)
                          .view(np.int32).astype(np.int64), ts[cp], "right")
    return ProcessFiles(fd, fd2, r0, r1, np.array(opens, dtype=np.int64),
                        np.array(flags, dtype=np.int64), final)


# What the replay reads of a call, and of which calls (table_changers): a trace holding only
# those replays as the whole one does (fd_changes).
REPLAY_COLUMNS = ("ts", "ret", "a0", "nr", "s0", "aux")


def table_changers(table: dict[int, str]) -> np.ndarray:
    """Indexed by syscall number: whether the call can change an fd table or the cwd."""
    return _nr_lut(table, _TABLE_CHANGERS)


def _nr_lut(table: dict[int, str], names) -> np.ndarray:
    """Indexed by syscall number (any u16): whether its name is one of `names`; a lookup
    costs a fraction of np.isin's sort."""
    lut = np.zeros(max(max(table, default=0) + 1, 1 << 16), dtype=bool)
    lut[_table_nrs(table, names)] = True
    return lut


def fd_changes(trace: UnifiedTrace, initial: FdState | None = None) -> Changes:
    """Each fd's changes over the trace, as process_files replays them (files it names are
    added to the trace's strings)."""
    rp = _Replay(trace, initial, _Paths(_Interner(trace)))
    rp.run(None, np.full(len(trace), -2, dtype=np.int32))
    return rp.changes


class StreamedFiles:
    """fd_changes fed a process's calls a part at a time, in the order of its columns: after
    each part, fd_files of the calls up to it reads what the whole replay would give for
    calls no later change can reach (before the next part's first ts)."""

    def __init__(self, trace: UnifiedTrace, initial: FdState | None = None) -> None:
        self.trace = trace  # its columns: each part's table-changing calls in turn
        self.replay = _Replay(trace, initial, _Paths(_Interner(trace)))
        self.changers = table_changers(trace.table)
        self.fd_calls = _nr_lut(trace.table, FD_SYSCALLS)

    def feed(self, cols: dict[str, np.ndarray]) -> None:
        """Replay one part's calls (REPLAY_COLUMNS at least), after the parts before."""
        sel = np.flatnonzero(self.changers[cols["nr"]] & (cols["ret"] >= 0))
        if len(sel):
            self.trace.columns = {name: cols[name][sel] for name in REPLAY_COLUMNS}
            self.replay.run(None, np.full(len(sel), -2, dtype=np.int32))

    def files(self, nr: np.ndarray, a0: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """fd_files of calls fed so far."""
        return fd_files(self.replay.changes, self.trace.table, nr, a0, ts, self.fd_calls)


def fd_files(changes: Changes, table: dict[int, str], nr: np.ndarray, a0: np.ndarray,
             ts: np.ndarray, fd_calls: np.ndarray | None = None) -> np.ndarray:
    """For each call, the string id of the file its fd argument named then (-1: none, or
    not a call on an fd): ProcessFiles.fd of any subset of the calls, from fd_changes."""
    fd = np.full(len(nr), -1, dtype=np.int32)
    if fd_calls is None:  # the lookup table of the calls on an fd, made once by a caller
        fd_calls = _nr_lut(table, FD_SYSCALLS)
    is_fd = np.flatnonzero(fd_calls[nr])
    fd[is_fd] = _lookup(changes, _i32(a0[is_fd]).astype(np.int64),
                        ts[is_fd].astype(np.int64), "right")
    return fd


def run_files(traces: list[UnifiedTrace]) -> dict[int, ProcessFiles]:
    """process_files for every process of a run; a forked child starts with its parent's
    fds and cwd as they were at the fork. Sets each trace's `files`."""
    if not traces:
        return {}
    by_pid = {t.pid: t for t in traces}
    paths = _Paths(_Interner(traces[0]))  # the strings list is shared by a run's traces
    initial: dict[int, FdState | None] = {}

    def inherit(t: UnifiedTrace) -> None:
        # a parent's own start is inherited from its parent: walk up first
        chain = []
        while t.pid not in initial:
            chain.append(t)
            parent = by_pid.get(t.process.ppid)
            if parent is None or t.process.attached or parent is t or parent in chain:
                initial[t.pid] = None
                chain.pop()
                break
            t = parent
        for child in reversed(chain):
            parent = by_pid[child.process.ppid]
            initial[child.pid] = process_files(parent, initial[parent.pid],
                                               until=child.process.start_mono_ns,
                                               paths=paths).final

    out: dict[int, ProcessFiles] = {}
    for t in traces:
        inherit(t)
        out[t.pid] = t.files = process_files(t, initial[t.pid], paths=paths)
    return out


def run_fd_path_ids(traces: list[UnifiedTrace]) -> dict[int, np.ndarray]:
    """For each process, the string id of the file each event's fd argument named."""
    return {pid: pf.fd for pid, pf in run_files(traces).items()}


def fd_path_ids(trace: UnifiedTrace, initial: FdState | None = None) -> np.ndarray:
    """For each event, the string id of the file its fd argument referred to (-1: none)."""
    return process_files(trace, initial).fd


@dataclass(slots=True)
class FileStat:
    """What one process did to one file."""

    bytes_read: int = 0
    bytes_written: int = 0
    created: bool = False
    truncated: bool = False
    appended: bool = False


def _sums(trace: UnifiedTrace, ids: np.ndarray, sel: np.ndarray) -> dict[int, int]:
    sel = sel & (ids >= 0)
    if not sel.any():
        return {}
    sums = np.bincount(ids[sel], weights=trace.columns["ret"][sel].astype(np.float64))
    return {int(s): int(sums[s]) for s in np.flatnonzero(sums)}


def file_stats(trace: UnifiedTrace, pf: ProcessFiles | None = None,
               created: set[int] | None = None) -> dict[str, FileStat]:
    """{absolute path: FileStat}: bytes of successful read/write-family calls and kernel
    copies, and the files this process's opens created (indices in `created`), truncated
    (O_TRUNC) or opened for appending (O_APPEND)."""
    if pf is None:
        pf = process_files(trace)
    c = trace.columns
    out: dict[int, FileStat] = {}
    if len(trace):
        ok = c["ret"] > 0
        nr = c["nr"]
        reads = ok & np.isin(nr, _nrs(trace, READ_FAMILY))
        writes = ok & np.isin(nr, _nrs(trace, WRITE_FAMILY))
        moved = [(pf.fd, reads, 0), (pf.fd, writes, 1)]
        for name, (rd, wr) in COPIES.items():
            sel = ok & (nr == (trace.nr_of(name) if trace.nr_of(name) is not None else -1))
            if sel.any():
                moved.append((pf.fd if rd == "a0" else pf.fd2, sel, 0))
                moved.append((pf.fd if wr == "a0" else pf.fd2, sel, 1))
        for ids, sel, col in moved:
            for sid, n in _sums(trace, ids, sel).items():
                fs = out.setdefault(sid, FileStat())
                if col:
                    fs.bytes_written += n
                else:
                    fs.bytes_read += n
        for i, fl in zip(pf.opens.tolist(), pf.open_flags.tolist()):
            sid = int(pf.path0[i])
            if sid < 0 or fl < 0:
                continue
            made = created is not None and i in created
            if made or fl & (O_TRUNC | O_APPEND):
                fs = out.setdefault(sid, FileStat())
                fs.created |= made
                fs.truncated |= bool(fl & O_TRUNC)
                fs.appended |= bool(fl & O_APPEND)
    res: dict[str, FileStat] = {}
    for sid, fs in out.items():
        path = trace.string(sid) or f"<{sid}>"
        prev = res.get(path)
        if prev is None:
            res[path] = fs
        else:  # one path under two ids (an fd inherited under its /proc name)
            prev.bytes_read += fs.bytes_read
            prev.bytes_written += fs.bytes_written
            prev.created |= fs.created
            prev.truncated |= fs.truncated
            prev.appended |= fs.appended
    return res


def file_io(trace: UnifiedTrace, path_ids: np.ndarray | None = None) -> dict[str, list[int]]:
    """{path: [bytes_read, bytes_written]} over successful read/write-family calls and
    kernel copies (path_ids: the fd files of run_fd_path_ids, else replayed alone)."""
    pf = trace.files if trace.files is not None else process_files(trace)
    if path_ids is not None and path_ids is not pf.fd:
        pf = dataclasses.replace(pf, fd=path_ids)
    return {p: [s.bytes_read, s.bytes_written] for p, s in file_stats(trace, pf).items()
            if s.bytes_read or s.bytes_written}


# How each call bears on whether a path exists (for "created by the run").
REMOVING = frozenset({"unlink", "unlinkat", "rmdir"})
MOVING = frozenset({"rename", "renameat", "renameat2"})


def created_opens(traces: list[UnifiedTrace], files: dict[int, ProcessFiles],
                  exists: dict[str, int] | None = None) -> dict[int, set[int]]:
    """pid -> indices of its successful O_CREAT opens that made a new file.

    The kernel does not say whether O_CREAT created the file, so: O_CREAT|O_EXCL always
    did; plain O_CREAT did unless the run had seen the path exist before (a successful
    call on it, not since undone by unlink/rename). A file that existed before the run and
    is first opened with O_CREAT counts as created. `exists` (path -> 1 seen existing, 0
    seen absent) carries what the run's earlier part saw, for a run folded part by part;
    it is updated to the end of these traces.
    """
    cand: dict[int, list[tuple[int, int, int, bool]]] = defaultdict(list)  # sid -> opens
    for t in traces:
        pf = files[t.pid]
        for i, fl in zip(pf.opens.tolist(), pf.open_flags.tolist()):
            sid = int(pf.path0[i])
            if fl >= 0 and fl & O_CREAT and sid >= 0:
                cand[sid].append((int(t.columns["ts"][i]), t.pid, i, bool(fl & O_EXCL)))
    out: dict[int, set[int]] = defaultdict(set)
    name = traces[0].string if traces else None
    if exists is not None and name is not None:
        ts, sids, seen = _existence(traces, files, None)
        keep = np.isin(sids, np.array(sorted(cand), dtype=np.int64))
        ev = list(zip(ts[keep].tolist(), sids[keep].tolist(), seen[keep].tolist()))
    elif cand:
        ev = list(zip(*(a.tolist() for a in _existence(traces, files, sorted(cand)))))
    else:
        return out
    opens = sorted((o[0], sid, o[1], o[2], o[3]) for sid, os_ in cand.items() for o in os_)
    state = {sid: exists[p] for sid in cand
             if exists and (p := name(sid)) is not None and p in exists}
    k = 0
    for ts_, sid, pid, i, excl in opens:
        while k < len(ev) and ev[k][0] < ts_:
            state[ev[k][1]] = ev[k][2]
            k += 1
        if excl or state.get(sid) != 1:
            out[pid].add(i)
        state[sid] = 1
    if exists is not None and name is not None and len(sids):
        # the last call on each path says whether it exists where these traces end
        last, at = np.unique(sids[::-1], return_index=True)
        for sid, v in zip(last.tolist(), seen[::-1][at].tolist()):
            if (p := name(sid)) is not None:
                exists[p] = v
    return out


def _existence(traces: list[UnifiedTrace], files: dict[int, ProcessFiles],
               keys: list[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ts, path sid, 1 seen existing / 0 seen absent) of the calls on paths `keys` (every
    path when None), in time order: a successful call says it exists (unlink and rename
    say their path is gone), ENOENT on the first path says it does not."""
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    want = None if keys is None else np.array(keys, dtype=np.int64)
    for t in traces:
        if not len(t):
            continue
        pf, c = files[t.pid], t.columns
        nr, ret = c["nr"], c["ret"]
        nrs = np.unique(nr).tolist()
        text0 = np.isin(nr, [n for n in nrs if t.table.get(n, "") in TEXT_PATH0])
        gone0 = np.isin(nr, [n for n in nrs if t.table.get(n, "") in REMOVING | MOVING])
        ok = ret >= 0
        for col, r in ((0, pf.path0), (1, pf.path1)):
            sel = (r >= 0) if want is None else np.isin(r, want)
            if col == 0:
                sel &= ~text0 & (ok | (ret == -ENOENT))
                seen = ok & ~gone0
            else:
                sel &= ok
                seen = ok
            idx = np.flatnonzero(sel)
            parts.append((c["ts"][idx].astype(np.int64), r[idx].astype(np.int64),
                          seen[idx].astype(np.int64)))
    if not parts:
        return (np.zeros(0, np.int64),) * 3
    ts, sid, seen = (np.concatenate(x) for x in zip(*parts))
    order = np.lexsort((seen, sid, ts))  # the order of sorting (ts, sid, seen) tuples
    return ts[order], sid[order], seen[order]


def run_file_stats(traces: list[UnifiedTrace]) -> dict[int, dict[str, FileStat]]:
    """pid -> {absolute path: FileStat} for every process of a run."""
    files = run_files(traces)
    made = created_opens(traces, files)
    return {t.pid: file_stats(t, files[t.pid], made.get(t.pid, set())) for t in traces}
