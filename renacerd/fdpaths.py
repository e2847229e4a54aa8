"""fd -> path of chosen events, vectorised: renacerd.fdtrack's replay without a Python step
per open and close (what `renacer ranks` needs on 10^8 events)."""

from __future__ import annotations

import numpy as np

from renacerd.fdtrack import (
    CLOSES,
    CONNECTS,
    DUPS,
    OPENS,
    OTHER_FDS,
    _Interner,
    fd_path_ids,
)
from renacerd.unified_trace import FD_SYSCALLS, UnifiedTrace

_DUP_ROUNDS = 8  # a dup of a dup of ...: each round resolves one more link
_SOCKETS = frozenset({"socket", "accept", "accept4"})
_FD_LIMIT = 1 << 31  # fds (and events) below this: fd * events fits an int64 key


def _nrs(trace: UnifiedTrace, names: frozenset[str] | set[str]) -> np.ndarray:
    return np.array([nr for nr, n in trace.table.items() if n in names], dtype=np.int64)


def fd_paths_of(trace: UnifiedTrace, idx: np.ndarray) -> np.ndarray:
    """For events `idx` of a trace whose events are in time order, the string id of the file
    their fd argument named then (-1: none), as fdtrack.fd_path_ids gives it."""
    c = trace.columns
    nr = c["nr"]
    # one gather classifies every event (a pass per np.isin would cost seven)
    classes = (OPENS, OTHER_FDS, CLOSES, DUPS, _SOCKETS, CONNECTS, {"close_range"})
    lut = np.zeros(max(max(trace.table, default=0), int(nr.max(initial=0))) + 1, np.int8)
    for i, names in enumerate(classes, 1):
        lut[_nrs(trace, names)] = i
    cls = lut[nr]
    cls[c["ret"] < 0] = 0
    if (cls == 7).any():
        return fd_path_ids(trace)[idx]  # ranges of fds: the replay handles them
    intern = _Interner(trace)
    ret, a0 = c["ret"], c["a0"].view(np.int64)
    changed = np.flatnonzero(cls)
    kind = cls[changed]
    opens, others, closes, dups, socks = (changed[kind == k] for k in range(1, 6))
    conns = changed[kind == 6]
    conns = conns[c["s0"][conns] >= 0]
    # sockets and connects are few: their labels are interned one by one
    sock_sid = np.array([
        intern("socket:") if trace.table.get(int(nr[i])) == "socket"
        else intern(f"socket:{trace.string(int(c['s0'][i])) or ''}") for i in socks.tolist()
    ], dtype=np.int64)
    conn_sid = np.array([intern(f"socket:{trace.string(int(c['s0'][i]))}")
                         for i in conns.tolist()], dtype=np.int64)
    init = trace.process.initial_fds
    # every change to the table: (when: event index + 1, 0 = at start; fd; string id or -1)
    when = np.concatenate([np.zeros(len(init), np.int64), opens + 1, others + 1, closes + 1,
                           socks + 1, conns + 1, dups + 1])
    fd = np.concatenate([np.array(list(init), dtype=np.int64), ret[opens], ret[others],
                         a0[closes], ret[socks], a0[conns], ret[dups]])
    sid = np.concatenate([np.array([intern(p) for p in init.values()], dtype=np.int64),
                          c["s0"][opens].astype(np.int64), np.full(len(others), -1),
                          np.full(len(closes), -1), sock_sid, conn_sid,
                          np.full(len(dups), -1)])
    n = len(nr) + 1
    ndup = len(dups)
    dup_at = len(when) - ndup
    if fd.max(initial=0) >= _FD_LIMIT or n >= _FD_LIMIT:
        return fd_path_ids(trace)[idx]
    order = np.argsort(fd * n + when, kind="stable")
    keys = (fd * n + when)[order]

    def lookup(qfd: np.ndarray, qwhen: np.ndarray, side: str) -> np.ndarray:
        """The string id fd `qfd` named at event `qwhen` - 1: before its own change
        ("left"), or after it ("right": a connect names its new peer, a close nothing)."""
        if not len(keys):
            return np.full(len(qfd), -1, dtype=np.int64)
        pos = np.searchsorted(keys, qfd * n + qwhen, side=side) - 1
        hit = (pos >= 0) & (keys[np.maximum(pos, 0)] // n == qfd)
        return np.where(hit, sid[order][np.maximum(pos, 0)], -1)

    if ndup:  # a dup names what its source fd named at the dup
        src = a0[dups]
        for _ in range(_DUP_ROUNDS):
            new = lookup(src, dups + 1, "left")
            if np.array_equal(new, sid[dup_at:]):
                break
            sid[dup_at:] = new
    qa0 = a0[idx]
    fd_lut = np.zeros(len(lut), dtype=bool)
    fd_lut[_nrs(trace, FD_SYSCALLS)] = True
    is_fd = fd_lut[nr[idx]] & (qa0 >= 0) & (qa0 < _FD_LIMIT)
    out = np.full(len(idx), -1, dtype=np.int64)
    q = np.flatnonzero(is_fd)  # a bad fd (-1, garbage) names nothing
    out[q] = lookup(a0[idx[q]], idx[q] + 1, "right")
    return out
