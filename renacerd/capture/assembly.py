"""A drain's events into per-process buffers, and a buffer into a chunk for the writer: the
compiled path (renacerd/_hot.c) and its numpy reference, which store the same bytes."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from renacerd.columns import EventRows, row_buffer
from renacerd.columns import _hot as _compiled
from renacerd.syscall_table import NR_EXECVE, NR_EXECVEAT

if TYPE_CHECKING:
    from renacerd.capture.tracer import ProcState, Tracer

log = logging.getLogger("renacerd")

CHUNK_EVENTS = 1 << 16
# Event fields kept as columns (pid is the process the chunk belongs to; aux: open flags)
EVENT_COLUMNS = ("ts", "dur", "ret", "a0", "tid", "nr", "flags", "aux")

# The compiled path, or None: the numpy path (tests set it to compare the two).
hot: Any = _compiled
_told = False


def new_buffer() -> Any:
    """An empty per-process buffer of the path in use: rows, or a list of column slices."""
    global _told
    if hot is None and _compiled is None and not _told:
        _told = True
        log.warning("renacerd._hot is not built (no C compiler or Python headers at "
                    "install): the daemon runs its slower numpy path")
    return row_buffer() if hot is not None else []


def take_chunk(st: ProcState) -> dict[str, np.ndarray] | EventRows:
    """The process's buffered events as one chunk (the buffer starts again empty)."""
    buf = st.buf
    st.buf, st.buffered = new_buffer(), 0
    if isinstance(buf, bytearray):
        return EventRows(buf)
    if len(buf) == 1:
        return buf[0]
    return {k: np.concatenate([p[k] for p in buf]) for k in buf[0]}


def group(tr: Tracer, ev: np.ndarray, flags: np.ndarray, s0: np.ndarray, s1: np.ndarray,
          mode: np.ndarray) -> None:
    """Append a drain's events (a process gated before its exec keeps none before it) to
    their processes' buffers, in ring order; a buffer of CHUNK_EVENTS goes to the writer.
    Processes are taken in pid order (new ones get their rows in that order)."""
    if hot is not None:
        _group_compiled(tr, ev, flags, s0, s1, mode)
    else:
        _group_numpy(tr, ev, flags, s0, s1, mode)


def _gate(st: ProcState, nrs: np.ndarray) -> int:
    """How many leading events of a gated process to drop: up to its first execve (all
    when none), which ungates it."""
    hit = np.flatnonzero((nrs == NR_EXECVE) | (nrs == NR_EXECVEAT))
    if not len(hit):
        return len(nrs)
    st.gated = False
    return int(hit[0])


def _added(tr: Tracer, st: ProcState, m: int) -> None:
    st.buffered += m
    st.events += m
    tr.events += m
    if st.buffered >= CHUNK_EVENTS:
        tr._flush_proc(st)


def _group_compiled(tr: Tracer, ev: np.ndarray, flags: np.ndarray, s0: np.ndarray,
                    s1: np.ndarray, mode: np.ndarray) -> None:
    pids, first, counts = hot.pid_runs(ev)
    states: list[ProcState | None] = []
    bufs: list[bytearray | None] = []
    skips: list[int] = []
    for pid, ts, n in zip(pids, first, counts):
        st = tr._proc(pid, ts)
        skip = 0
        if st is None:
            tr.foreign_events += n - 1
            skip = n
        elif st.gated:
            skip = _gate(st, ev["nr"][ev["pid"] == pid])
        states.append(st)
        bufs.append(st.buf if st is not None else None)
        skips.append(skip)
    hot.scatter(ev, flags, s0, s1, mode, pids, bufs, skips)
    for st, n, skip in zip(states, counts, skips):
        if st is not None and n > skip:
            _added(tr, st, n - skip)


def _group_numpy(tr: Tracer, ev: np.ndarray, flags: np.ndarray, s0: np.ndarray,
                 s1: np.ndarray, mode: np.ndarray) -> None:
    """The reference: one stable sort by pid, one gather per column, each process's
    events a slice of every column."""
    n = len(ev)
    pid = ev["pid"]
    if (pid[1:] == pid[:-1]).all():
        spid = pid
        # copy(), not ascontiguousarray(): a one-event drain is "contiguous" and would
        # stay a view of the ring, which the kernel reuses after release()
        cols = {f: ev[f].copy() for f in EVENT_COLUMNS}
        cols["s0"], cols["s1"], cols["mode"] = s0, s1, mode
        cols["flags"] = flags
    else:
        order = np.argsort(pid, kind="stable")
        spid = pid.take(order)
        cols = {f: ev[f].take(order) for f in EVENT_COLUMNS}
        cols["s0"] = s0.take(order)
        cols["s1"] = s1.take(order)
        cols["mode"] = mode.take(order)
        cols["flags"] = flags.take(order)
    cols["ts"] = cols["ts"].view(np.int64)
    cuts = np.flatnonzero(spid[1:] != spid[:-1]) + 1
    for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), n]):
        piece = {k: v[a:b] for k, v in cols.items()}
        st = tr._proc(int(spid[a]), int(piece["ts"][0]))
        if st is None:
            tr.foreign_events += b - a - 1
            continue
        if st.gated:
            k = _gate(st, piece["nr"])
            if st.gated:
                continue
            piece = {key: v[k:] for key, v in piece.items()}
        st.buf.append(piece)
        _added(tr, st, len(piece["ts"]))
