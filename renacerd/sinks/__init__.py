"""What the store tailers share: progress kept in the store, backoff, per-span syscall summaries.

The local SQLite store is the source of truth; a sink (ClickHouse, OTLP) is a thread that reads
rows committed since its last acknowledged position and records each acknowledgement in the
`sink_progress` table of the same file, so a restarted sink resumes where it stopped.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from renacerd.store.readers import Position, Progress, StoredSpan, StoreReaders
from renacerd.trace.span_tagging import (
    SpanTable,
    WindowTagger,
    ancestry,
    span_subtree,
    total_events,
)
from renacerd.trace.unified_trace import READ_FAMILY, WRITE_FAMILY

__all__ = ["Backoff", "Position", "Progress", "SinkError", "SpanSummary", "StoreTailer",
           "descendants", "ready_spans", "ready_summaries"]

TOP_SYSCALLS = 5
SPAN_GRACE_S = 5.0  # how long a span waits for its events before it is sent anyway


class SinkError(RuntimeError):
    """A sink cannot reach or use its target (one clear line)."""


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter, capped."""

    base_s: float = 0.5
    cap_s: float = 30.0
    attempt: int = 0

    def next(self) -> float:
        """Seconds to wait before the next try."""
        d = min(self.cap_s, self.base_s * (2 ** self.attempt))
        self.attempt += 1
        # Full jitter: hosts that lost the same server do not come back in lockstep.
        return random.uniform(d / 2, d)

    def reset(self) -> None:
        """A try succeeded."""
        self.attempt = 0


@dataclass(slots=True)
class SpanSummary:
    """What the process tree of a span did in syscalls between its start and end."""

    syscalls: int = 0
    syscall_ns: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    top: list[tuple[str, int, int]] = field(default_factory=list)  # (name, calls, ns)

    def attributes(self) -> dict[str, Any]:
        """The summary as span attributes (ints, and parallel arrays for the top calls)."""
        return {
            "renacer.syscalls.count": self.syscalls,
            "renacer.syscalls.time_ns": self.syscall_ns,
            "renacer.syscalls.errors": self.errors,
            "renacer.io.bytes_read": self.bytes_read,
            "renacer.io.bytes_written": self.bytes_written,
            "renacer.syscalls.top.names": [t[0] for t in self.top],
            "renacer.syscalls.top.calls": [t[1] for t in self.top],
            "renacer.syscalls.top.time_ns": [t[2] for t in self.top],
        }


def descendants(procs: list[tuple[int, int, int]], root_pid: int) -> list[int]:
    """Store proc ids of `root_pid` and every process forked under it, from (proc_id, pid, ppid)."""
    out: list[int] = []
    pids = {root_pid}
    # processes are in order of appearance, so a parent is always seen before its children
    for proc_id, pid, ppid in procs:
        if pid == root_pid or ppid in pids:
            out.append(proc_id)
            pids.add(pid)
    return out


CHUNKS_KEPT = 16  # decoded chunks a batch keeps: one process's spans in start order share them


class _BatchEvents:
    """The events of a batch of spans' windows: each chunk decoded and tagged once.

    A chunk holds dozens of steps; decoding it, and building the stretches of every span of
    its process, for each span made a finished run's push quadratic in its spans."""

    def __init__(self, store: StoreReaders, run_id: int, procs: list[tuple[int, int, int]],
                 table: SpanTable, lo: int, hi: int) -> None:
        self.store, self.run_id, self.procs = store, run_id, procs
        self.tagger = WindowTagger(table, lo, hi)
        self.pid_of = {proc_id: pid for proc_id, pid, _ in procs}
        self.ppid_of = {pid: ppid for _, pid, ppid in procs}
        self._index: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._chunks: OrderedDict[int, tuple[dict[str, np.ndarray], np.ndarray]] = OrderedDict()

    def window(self, proc_id: int, start: int, end: int
               ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """(columns, span tags) of the process's events in [start, end), chunk by chunk."""
        if end <= start:
            return
        ix = self._index.get(proc_id)
        if ix is None:
            rows = self.store.chunk_index(self.run_id, proc_id)  # (id, n, first, last)
            ix = self._index[proc_id] = tuple(
                np.array([r[k] for r in rows], dtype=np.int64) for k in (0, 2, 3))
        ids, first, last = ix
        for k in np.flatnonzero((last >= start) & (first < end)).tolist():
            cols, tags = self._chunk(proc_id, int(ids[k]))
            a, b = np.searchsorted(cols["ts"], (start, end)).tolist()
            if b > a:
                yield {n: v[a:b] for n, v in cols.items()}, tags[a:b]

    def _chunk(self, proc_id: int, cid: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        got = self._chunks.get(cid)
        if got is not None:
            self._chunks.move_to_end(cid)
            return got
        c = self.store.chunk_columns([cid])
        cols = {n: c[n] for n in ("ts", "nr", "dur", "ret")}
        chain = ancestry(self.pid_of[proc_id], self.ppid_of)
        got = self._chunks[cid] = (cols, self.tagger.tag(cols["ts"], chain))
        if len(self._chunks) > CHUNKS_KEPT:
            self._chunks.popitem(last=False)
        return got

    def summary(self, spans: Sequence[Any], i: int, names: _Names) -> SpanSummary:
        """Span `i`'s total syscalls (its own and its subtree's, span_tagging's total) from
        the events of its process tree in its window."""
        sp = spans[i]
        subtree = span_subtree(self.tagger.table, i)
        nrs: list[np.ndarray] = []
        durs: list[np.ndarray] = []
        rets: list[np.ndarray] = []
        for proc_id in descendants(self.procs, sp.process_id or 0):
            for c, tags in self.window(proc_id, sp.start_mono_nanos or 0,
                                       sp.end_mono_nanos or 0):
                m = total_events(tags, subtree)
                nrs.append(c["nr"][m])
                durs.append(c["dur"][m])
                rets.append(c["ret"][m])
        if not nrs:
            return SpanSummary()
        return _summarise(np.concatenate(nrs).astype(np.int64), np.concatenate(durs),
                          np.concatenate(rets), names)


@dataclass(frozen=True, slots=True)
class _Names:
    """The run's syscall table, and its read and write families' numbers (found once)."""

    table: dict[int, str]
    reads: np.ndarray
    writes: np.ndarray

    @classmethod
    def of(cls, table: dict[int, str]) -> _Names:
        """The families of `table`."""
        def family(names: Any) -> np.ndarray:
            return np.array([n for n, name in table.items() if name in names], dtype=np.int64)

        return cls(table, family(READ_FAMILY), family(WRITE_FAMILY))


def _summarise(nr: np.ndarray, dur: np.ndarray, ret: np.ndarray, names: _Names
               ) -> SpanSummary:
    s = SpanSummary()
    s.syscalls = int(len(nr))
    s.syscall_ns = int(dur.sum())
    s.errors = int(((ret < 0) & (ret >= -4095)).sum())
    s.bytes_read = int(ret[np.isin(nr, names.reads) & (ret > 0)].sum())
    s.bytes_written = int(ret[np.isin(nr, names.writes) & (ret > 0)].sum())
    table = names.table
    calls = Counter()
    ns = Counter()
    uniq, inv = np.unique(nr, return_inverse=True)
    cnt = np.bincount(inv)
    tot = np.bincount(inv, weights=dur.astype(np.float64))
    for i, n in enumerate(uniq):
        name = table.get(int(n), f"syscall_{int(n)}")
        calls[name] += int(cnt[i])
        ns[name] += int(tot[i])
    ranked = sorted(calls, key=lambda k: (-ns[k], -calls[k], k))[:TOP_SYSCALLS]
    s.top = [(k, calls[k], ns[k]) for k in ranked]
    return s


def _spans_near(store: StoreReaders, run_id: int, lo: int, hi: int) -> list[Any]:
    """The spans that can hold an event of [lo, hi] or link one to a batch's span: those
    alive in it, and their ancestors (outside it only where a child outlives its parent).
    Not every span of the run: a long run's sink would read them all at every poll."""
    spans: list[Any] = []
    have: set[tuple[bytes, bytes]] = set()
    more = store.spans_overlapping(run_id, lo, hi)
    while more:
        spans += more
        have.update((r.trace_id, r.span_id) for r in more)
        parents = sorted({r.parent_span_id for r in more if r.parent_span_id
                          and (r.trace_id, r.parent_span_id) not in have})
        more = [r for r in store.spans_by_id(run_id, parents)
                if (r.trace_id, r.span_id) not in have] if parents else []
    return spans


def ready_summaries(store: StoreReaders, run_id: int, procs: list[tuple[int, int, int]],
                    ready: list[StoredSpan], table: dict[int, str]) -> list[SpanSummary]:
    """The total-syscall summary of each of `ready` (a child's events count for its
    parent: span_tagging's total), against the spans near the batch (_spans_near)."""
    if not ready:
        return []
    lo = min(sp.record.start_mono_nanos or 0 for sp in ready)
    hi = max(sp.record.end_mono_nanos or 0 for sp in ready)
    spans = _spans_near(store, run_id, lo, hi)
    st = SpanTable.of(spans)
    at = {(r.trace_id, r.span_id): k for k, r in enumerate(spans)}
    idx = [at[(sp.record.trace_id, sp.record.span_id)] for sp in ready]
    batch = _BatchEvents(store, run_id, procs, st, lo, hi)
    names = _Names.of(table)
    out: dict[int, SpanSummary] = {}
    # one process's spans in start order: consecutive spans share the chunks kept
    for i in sorted(set(idx), key=lambda i: (int(st.pids[i]), int(st.starts[i]), i)):
        out[i] = batch.summary(spans, i, names)
    return [out[i] for i in idx]


class StoreTailer:
    """A thread that pushes what the local store has committed, with backoff on failure.

    Subclasses set `_stats` (with errors, retries, last_error), `timeout_s` and `_progress_key`,
    and implement `_poll()`: one pass, True when nothing was left to send.
    """

    _thread_name = "renacer-sink"

    def __init__(self, store_path: str, run: str | None, poll_s: float,
                 backoff: Backoff | None) -> None:
        self.store_path = str(store_path)
        self.run = run
        self.poll_s = poll_s
        self._backoff = backoff or Backoff()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drain_until = 0.0
        self._thread: threading.Thread | None = None
        self._store = None
        self._progress: Progress | None = None

    def start(self):
        """Start the background thread (returns self)."""
        self._thread = threading.Thread(target=self._loop, name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_s: float = 10.0):
        """Push what is committed (for up to drain_s while the target answers), then stop.
        Whatever is not pushed stays in the store and goes out on the next start or push."""
        self._drain_until = time.monotonic() + drain_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(drain_s + self.timeout_s + 5)
        if self._store is not None:
            self._store.close()
            self._store = None
        return self.stats

    def flush_now(self):
        """Push everything committed so far, now, in this thread; raises SinkError on failure."""
        with self._lock:
            while not self._poll():
                pass
        return self.stats

    def _open(self):
        from renacerd.store.database import Store

        if self._store is None:
            self._store = Store(self.store_path)
            self._progress = Progress(self._store, self._progress_key)
        assert self._progress is not None
        return self._store, self._progress

    def _loop(self) -> None:
        from renacerd.store.database import StoreError

        while True:
            stopping = self._stop.is_set()
            try:
                with self._lock:
                    idle = self._poll()
                self._backoff.reset()
                if stopping and idle:
                    return
                wait = self.poll_s if idle else 0.0
            except (SinkError, StoreError, sqlite3.Error) as e:
                self._stats.errors += 1
                self._stats.retries += 1
                self._stats.last_error = str(e)
                wait = max(self._backoff.next(), getattr(e, "retry_after", 0.0))
            if stopping and time.monotonic() + wait > self._drain_until:
                return
            if stopping:
                time.sleep(wait)
            else:
                self._stop.wait(wait)


def ready_spans(store: StoreReaders, run_id: int, running: bool, spans: list[StoredSpan],
                seen: dict[tuple[int, int], float]) -> list[StoredSpan]:
    """The leading spans whose events are in the store: a span's summary needs them, so wait
    until the store holds events past its end, the run has ended, or SPAN_GRACE_S has passed
    since the span was first seen."""
    covered = store.events_until(run_id)
    now = time.monotonic()
    ready = []
    for sp in spans:
        first = seen.setdefault((run_id, sp.rowid), now)
        if running and (sp.record.end_mono_nanos or 0) > covered and now - first < SPAN_GRACE_S:
            break
        ready.append(sp)
    return ready
