"""fd -> path at analysis time: replay open/dup/close so each fd-based call names its file."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from renacerd.unified_trace import FD_SYSCALLS, READ_FAMILY, WRITE_FAMILY, UnifiedTrace

OPENS = frozenset({"open", "openat", "openat2", "creat"})
DUPS = frozenset({"dup", "dup2", "dup3"})
SOCKETS = frozenset({"socket", "accept", "accept4"})
CLOSES = frozenset({"close"})
CONNECTS = frozenset({"connect", "bind"})
# Calls returning a new fd that names no file: the fd number must stop naming the old one.
OTHER_FDS = frozenset({"eventfd", "eventfd2", "epoll_create", "epoll_create1", "memfd_create",
                       "timerfd_create", "signalfd", "signalfd4", "inotify_init",
                       "inotify_init1", "pidfd_open", "userfaultfd", "perf_event_open", "bpf",
                       "fanotify_init", "open_by_handle_at", "memfd_secret"})
_TABLE_CHANGERS = OPENS | DUPS | SOCKETS | CLOSES | CONNECTS | OTHER_FDS | {"close_range"}


class _Interner:
    """Adds labels that are not paths ("socket:…") to the trace's string table."""

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


def fd_table_at(trace: UnifiedTrace, ts: int | None, initial: dict[int, int] | None = None,
                intern: _Interner | None = None) -> dict[int, int]:
    """The process's fd -> string id table just before `ts` (None: at the end)."""
    changes, table = _replay(trace, initial, intern or _Interner(trace), until=ts)
    del changes
    return table


def _replay(trace: UnifiedTrace, initial: dict[int, int] | None, intern: _Interner,
            until: int | None = None):
    c = trace.columns
    table: dict[int, int] = dict(initial) if initial is not None else {
        fd: intern(path) for fd, path in trace.process.initial_fds.items()
    }
    changes: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for fd, sid in table.items():
        changes[fd].append((-1, sid))
    if not len(trace):
        return changes, table
    nrs_needed = [nr for nr, n in trace.table.items() if n in _TABLE_CHANGERS]
    mask = np.isin(c["nr"], np.array(nrs_needed, dtype=c["nr"].dtype))
    mask &= (c["ret"] >= 0)
    if until is not None:
        mask &= c["ts"] < until
    idx = np.flatnonzero(mask)
    names = trace.table
    for i in idx:
        name = names.get(int(c["nr"][i]), "")
        ret = int(c["ret"][i])
        a0 = int(np.int64(c["a0"][i]))
        ts = int(c["ts"][i])
        if name in OPENS:
            sid = int(c["s0"][i])
            table[ret] = sid
            changes[ret].append((ts, sid))
        elif name in DUPS:
            sid = table.get(a0, -1)
            table[ret] = sid
            changes[ret].append((ts, sid))
        elif name == "socket":
            sid = intern("socket:")
            table[ret] = sid
            changes[ret].append((ts, sid))
        elif name in ("accept", "accept4"):
            peer = trace.string(int(c["s0"][i])) if c["s0"][i] >= 0 else ""
            sid = intern(f"socket:{peer}")
            table[ret] = sid
            changes[ret].append((ts, sid))
        elif name in CONNECTS:
            if c["s0"][i] >= 0:
                sid = intern(f"socket:{trace.string(int(c['s0'][i]))}")
                table[a0] = sid
                changes[a0].append((ts, sid))
        elif name in CLOSES and table.pop(a0, None) is not None:
            changes[a0].append((ts, -1))
        elif name in OTHER_FDS:
            table[ret] = -1
            changes[ret].append((ts, -1))
        elif name == "close_range":
            # close_range(first, last, flags): only `first` is captured; Python's subprocess
            # and most callers close everything from `first` up
            for fd in [f for f in table if f >= a0]:
                del table[fd]
                changes[fd].append((ts, -1))
    return changes, table


def fd_path_ids(trace: UnifiedTrace, initial: dict[int, int] | None = None) -> np.ndarray:
    """For each event, the string id of the file its fd argument referred to (-1: none)."""
    intern = _Interner(trace)
    changes, _ = _replay(trace, initial, intern)
    c = trace.columns
    out = np.full(len(trace), -1, dtype=np.int32)
    if not len(trace):
        return out
    fd_nrs = [nr for nr, n in trace.table.items() if n in FD_SYSCALLS]
    is_fd = np.isin(c["nr"], np.array(fd_nrs, dtype=c["nr"].dtype))
    fds = c["a0"].view(np.int64)
    for fd, hist in changes.items():
        sel = np.flatnonzero(is_fd & (fds == fd))
        if not len(sel):
            continue
        times = np.array([t for t, _ in hist], dtype=np.int64)
        sids = np.array([s for _, s in hist], dtype=np.int32)
        pos = np.searchsorted(times, c["ts"][sel].view(np.int64), side="right") - 1
        ok = pos >= 0
        out[sel[ok]] = sids[pos[ok]]
    return out


def run_fd_path_ids(traces: list[UnifiedTrace]) -> dict[int, np.ndarray]:
    """fd_path_ids for every process of a run; a forked child starts with its parent's fds."""
    by_pid = {t.pid: t for t in traces}
    out: dict[int, np.ndarray] = {}
    for t in traces:
        initial = None
        parent = by_pid.get(t.process.ppid)
        if parent is not None and not t.process.attached and parent is not t:
            # The strings list is shared by every trace of a run, so ids carry over.
            initial = fd_table_at(parent, t.process.start_mono_ns)
        out[t.pid] = fd_path_ids(t, initial)
    return out


def file_io(trace: UnifiedTrace, path_ids: np.ndarray | None = None) -> dict[str, list[int]]:
    """{path: [bytes_read, bytes_written]} over successful read/write-family calls."""
    c = trace.columns
    if path_ids is None:
        path_ids = fd_path_ids(trace)
    names = trace.table
    rd = [nr for nr, n in names.items() if n in READ_FAMILY]
    wr = [nr for nr, n in names.items() if n in WRITE_FAMILY]
    out: dict[str, list[int]] = {}
    ok = (c["ret"] > 0) & (path_ids >= 0)
    for col, nrs in ((0, rd), (1, wr)):
        sel = ok & np.isin(c["nr"], np.array(nrs, dtype=c["nr"].dtype))
        if not sel.any():
            continue
        sums = np.bincount(path_ids[sel], weights=c["ret"][sel].astype(np.float64))
        for sid in np.flatnonzero(sums):
            path = trace.string(int(sid)) or f"<{sid}>"
            out.setdefault(path, [0, 0])[col] += int(sums[sid])
    return out
