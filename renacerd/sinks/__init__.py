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
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from renacerd.columns import decode
from renacerd.trace.unified_trace import READ_FAMILY, WRITE_FAMILY

PROGRESS_SCHEMA = """
CREATE TABLE IF NOT EXISTS sink_progress (
    sink TEXT NOT NULL,
    run_id INTEGER NOT NULL,
    chunk_id INTEGER NOT NULL DEFAULT 0,
    string_id INTEGER NOT NULL DEFAULT -1,
    span_rowid INTEGER NOT NULL DEFAULT 0,
    pending_lo INTEGER,
    pending_hi INTEGER,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sink, run_id)
)
"""

TOP_SYSCALLS = 5
SPAN_GRACE_S = 5.0  # how long a span waits for its events before it is sent anyway


class SinkError(RuntimeError):
    """A sink cannot reach or use its target (one clear line)."""


@dataclass(slots=True)
class Position:
    """How far one sink has acknowledged one run."""

    chunk_id: int = 0
    string_id: int = -1
    span_rowid: int = 0
    pending: tuple[int, int] | None = None
    done: bool = False


class Progress:
    """The `sink_progress` table on the store's own SQLite file."""

    def __init__(self, db: sqlite3.Connection, sink: str) -> None:
        self.db = db
        self.sink = sink
        db.execute(PROGRESS_SCHEMA)

    def get(self, run_id: int) -> Position:
        """The acknowledged position (zero for a run never pushed)."""
        row = self.db.execute(
            "SELECT chunk_id, string_id, span_rowid, pending_lo, pending_hi, done "
            "FROM sink_progress WHERE sink=? AND run_id=?",
            (self.sink, run_id),
        ).fetchone()
        if row is None:
            return Position()
        pending = (row[3], row[4]) if row[3] is not None else None
        return Position(row[0], row[1], row[2], pending, bool(row[5]))

    def set(self, run_id: int, pos: Position) -> None:
        """Persist `pos` durably before anything depending on it happens."""
        lo, hi = pos.pending if pos.pending else (None, None)
        # The daemon writes the same file: an immediate transaction waits on busy_timeout
        # instead of failing when the writer holds the lock.
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT OR REPLACE INTO sink_progress (sink, run_id, chunk_id, string_id, "
                "span_rowid, pending_lo, pending_hi, done) VALUES (?,?,?,?,?,?,?,?)",
                (self.sink, run_id, pos.chunk_id, pos.string_id, pos.span_rowid, lo, hi,
                 int(pos.done)),
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def forget(self, run_id: int) -> None:
        """Forget this sink's progress on one run (push it again from the start)."""
        self.db.execute("DELETE FROM sink_progress WHERE sink=? AND run_id=?",
                        (self.sink, run_id))


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


def span_summary(
    db: sqlite3.Connection,
    run_id: int,
    proc_ids: list[int],
    start_mono: int,
    end_mono: int,
    table: dict[int, str],
) -> SpanSummary:
    """Summarise the syscalls entered in [start_mono, end_mono) by the given processes."""
    s = SpanSummary()
    if not proc_ids or end_mono <= start_mono:
        return s
    marks = ",".join("?" * len(proc_ids))
    nrs: list[np.ndarray] = []
    durs: list[np.ndarray] = []
    rets: list[np.ndarray] = []
    # Only chunks overlapping the window are decoded: a long run is never reloaded whole.
    for (blob,) in db.execute(
        f"SELECT data FROM chunks WHERE run_id=? AND layer='sys' AND proc_id IN ({marks}) "
        "AND last_ts >= ? AND first_ts < ?",
        (run_id, *proc_ids, start_mono, end_mono),
    ):
        c = decode(blob)
        m = (c["ts"] >= start_mono) & (c["ts"] < end_mono)
        nrs.append(c["nr"][m])
        durs.append(c["dur"][m])
        rets.append(c["ret"][m])
    if not nrs:
        return s
    nr = np.concatenate(nrs).astype(np.int64)
    dur = np.concatenate(durs)
    ret = np.concatenate(rets)
    s.syscalls = int(len(nr))
    s.syscall_ns = int(dur.sum())
    s.errors = int(((ret < 0) & (ret >= -4095)).sum())
    rd = np.array([n for n, name in table.items() if name in READ_FAMILY], dtype=np.int64)
    wr = np.array([n for n, name in table.items() if name in WRITE_FAMILY], dtype=np.int64)
    s.bytes_read = int(ret[np.isin(nr, rd) & (ret > 0)].sum())
    s.bytes_written = int(ret[np.isin(nr, wr) & (ret > 0)].sum())
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
            self._store.db.close()
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
            self._progress = Progress(self._store.db, self._progress_key)
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


def ready_spans(db: sqlite3.Connection, run_id: int, running: bool, rows: list[tuple],
                end_col: int, seen: dict[tuple[int, int], float]) -> list[tuple]:
    """The leading span rows (rowid first) whose events are in the store: a span's summary
    needs them, so wait until the store holds events past its end, the run has ended, or
    SPAN_GRACE_S has passed since the span was first seen."""
    covered = db.execute("SELECT max(last_ts) FROM chunks WHERE run_id=? AND layer='sys'",
                         (run_id,)).fetchone()[0] or 0
    now = time.monotonic()
    ready = []
    for r in rows:
        first = seen.setdefault((run_id, r[0]), now)
        if running and (r[end_col] or 0) > covered and now - first < SPAN_GRACE_S:
            break
        ready.append(r)
    return ready
