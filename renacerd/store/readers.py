"""What the store's readers ask of it (sinks, the run loader), so no SQL lives outside the store.

A sink tails the store: strings, event chunks and spans committed after the last position it
acknowledged, which it keeps in the `sink_progress` table of the same file (a restarted sink
resumes where it stopped). Store mixes these methods in; they only read, except the progress
rows, which belong to the sinks alone.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


@dataclass(slots=True)
class StoredSpan:
    """A span as a sink reads it: its row id (the sink's position), store proc id, record."""

    rowid: int
    proc_id: int
    record: Any  # renacerd.client.span.SpanRecord


@dataclass(slots=True)
class Position:
    """How far one sink has acknowledged one run."""

    chunk_id: int = 0
    string_id: int = -1
    span_rowid: int = 0
    pending: tuple[int, int] | None = None
    done: bool = False


class StoreReaders:
    """The reads a sink makes: everything committed after a position. Mixed into Store."""

    db: sqlite3.Connection

    def strings_after(self, run_id: int, after_id: int) -> list[tuple[int, bytes]]:
        """(id, string) of the run's strings with an id above `after_id`, in id order."""
        return [(i, bytes(s)) for i, s in self.db.execute(
            "SELECT id, s FROM strings WHERE run_id=? AND id>? ORDER BY id", (run_id, after_id))]

    def last_chunk_id(self, run_id: int, layers: tuple[str, ...] = ("sys",)) -> int:
        """The id of the run's latest chunk of those layers, 0 for none."""
        marks = ",".join("?" * len(layers))
        return self.db.execute(f"SELECT max(id) FROM chunks WHERE run_id=? AND layer IN "
                               f"({marks})", (run_id, *layers)).fetchone()[0] or 0

    def chunk_events(self, run_id: int, lo: int = 0, hi: int | None = None,
                     layer: str = "sys") -> int:
        """How many rows the run's chunks of one layer with ids in [lo, hi] hold (hi None:
        all)."""
        q = "SELECT coalesce(sum(n), 0) FROM chunks WHERE run_id=? AND layer=? AND id>=?"
        args: tuple = (run_id, layer, lo)
        if hi is not None:
            q += " AND id<=?"
            args += (hi,)
        return self.db.execute(q, args).fetchone()[0]

    def chunks_after(self, run_id: int, after_id: int, limit: int = 4096,
                     layers: tuple[str, ...] = ("sys",)
                     ) -> Iterator[tuple[int, int, int, bytes, str]]:
        """(id, proc id, rows, encoded chunk, layer) of the run's chunks of those layers
        after `after_id`, in id order (the layers share one id sequence)."""
        marks = ",".join("?" * len(layers))
        yield from self.db.execute(
            f"SELECT id, proc_id, n, data, layer FROM chunks WHERE run_id=? AND layer IN "
            f"({marks}) AND id>? ORDER BY id LIMIT ?", (run_id, *layers, after_id, limit))

    def proc_chunks_before(self, run_id: int, proc_id: int, before_id: int
                           ) -> Iterator[bytes]:
        """The encoded syscall chunks of one process with ids below `before_id`, in order."""
        for (blob,) in self.db.execute(
                "SELECT data FROM chunks WHERE run_id=? AND proc_id=? AND layer='sys' AND id<? "
                "ORDER BY id", (run_id, proc_id, before_id)):
            yield blob

    def events_until(self, run_id: int) -> int:
        """The latest event timestamp the run's stored syscall chunks reach, 0 for none."""
        return self.db.execute("SELECT max(last_ts) FROM chunks WHERE run_id=? AND layer='sys'",
                               (run_id,)).fetchone()[0] or 0

    def spans_by_id(self, run_id: int, span_ids: list[bytes]) -> list[Any]:
        """The run's SpanRecords whose span_id is one of `span_ids`."""
        from renacerd.client.span import SPAN_FIELDS, SpanRecord

        out = []
        for i in range(0, len(span_ids), 500):
            part = span_ids[i:i + 500]
            out += [SpanRecord.from_row(dict(zip(SPAN_FIELDS, row))) for row in self.db.execute(
                f"SELECT {', '.join(SPAN_FIELDS)} FROM spans WHERE run_id=? AND span_id IN "
                f"({','.join('?' * len(part))})", (run_id, *part))]
        return out

    def spans_after(self, run_id: int, after_rowid: int, limit: int | None = None
                    ) -> list[StoredSpan]:
        """The run's spans stored after row `after_rowid`, in storage order."""
        from renacerd.client.span import SPAN_FIELDS, SpanRecord

        q = (f"SELECT rowid, proc_id, {', '.join(SPAN_FIELDS)} FROM spans "
             "WHERE run_id=? AND rowid>? ORDER BY rowid")
        args: tuple = (run_id, after_rowid)
        if limit is not None:
            q += " LIMIT ?"
            args += (limit,)
        return [StoredSpan(r[0], r[1], SpanRecord.from_row(dict(zip(SPAN_FIELDS, r[2:]))))
                for r in self.db.execute(q, args)]


class Progress:
    """One sink's rows in the store's `sink_progress` table."""

    def __init__(self, store: StoreReaders, sink: str) -> None:
        self.db = store.db
        self.sink = sink
        self.db.execute(PROGRESS_SCHEMA)

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
