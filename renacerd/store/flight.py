"""The flight recorder's tables: a run that keeps only its last window of full events, the
windows it was asked to keep whole, and the trim that folds older events into aggregates."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from renacerd.escaping import lossless_dumps, lossless_loads

FLIGHT_SCHEMA = """
CREATE TABLE IF NOT EXISTS flight (
    run_id INTEGER PRIMARY KEY, window_ns INTEGER NOT NULL,
    trimmed_to_ns INTEGER NOT NULL DEFAULT 0,
    chunks INTEGER NOT NULL DEFAULT 0, events INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS flight_windows (
    run_id INTEGER NOT NULL, reason TEXT NOT NULL,
    from_ns INTEGER NOT NULL, to_ns INTEGER NOT NULL, at_wall_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS flight_windows_run ON flight_windows(run_id);
CREATE TABLE IF NOT EXISTS flight_steps (
    run_id INTEGER NOT NULL, proc_id INTEGER NOT NULL, step TEXT NOT NULL,
    syscall TEXT NOT NULL, calls INTEGER NOT NULL, errors INTEGER NOT NULL,
    total_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS flight_steps_run ON flight_steps(run_id);
CREATE TABLE IF NOT EXISTS flight_files (
    run_id INTEGER NOT NULL, proc_id INTEGER NOT NULL, step TEXT NOT NULL,
    path TEXT NOT NULL, bytes_read INTEGER NOT NULL, bytes_written INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS flight_files_run ON flight_files(run_id);
CREATE TABLE IF NOT EXISTS flight_sums (
    run_id INTEGER NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (run_id, kind, key)
) WITHOUT ROWID;
"""
# The folded part of a flight run's aggregates, summed as they come (one fold a second);
# the run's end writes them, with its kept events', as the run's aggregates.
_PARTIAL_TABLES = ("flight_steps", "flight_files", "flight_sums")
FLIGHT_TABLES = ("flight", "flight_windows", *_PARTIAL_TABLES)


@dataclass(slots=True)
class KeptWindow:
    """A stretch of a flight run kept in full, and why (CLOCK_MONOTONIC ns)."""

    reason: str
    from_ns: int
    to_ns: int
    at_wall_ns: int


@dataclass(slots=True)
class FlightInfo:
    """What a flight run holds: its window, what was folded into aggregates, what was kept."""

    window_ns: int
    trimmed_to_ns: int  # events that ended before this are in the aggregates only
    chunks: int  # event chunks folded into aggregates and deleted
    events: int
    windows: list[KeptWindow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The `flight_recorder` object of `renacer show --json`."""
        return {"window_s": self.window_ns / 1e9, "trimmed_to_mono_ns": self.trimmed_to_ns,
                "trimmed_chunks": self.chunks, "trimmed_events": self.events,
                "kept": [{"reason": w.reason, "from_mono_ns": w.from_ns,
                          "to_mono_ns": w.to_ns, "at_wall_ns": w.at_wall_ns}
                         for w in self.windows]}


class FlightTables:
    """The Store's flight recorder methods (a mixin: `self.db` is the store's connection)."""

    db: Any

    def _flight_schema(self) -> None:
        self.db.executescript(FLIGHT_SCHEMA)

    def _has_flight(self) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                               "name='flight'").fetchone() is not None

    def begin_flight(self, run_id: int, window_ns: int) -> None:
        """Mark a run as recorded with a flight window of `window_ns`."""
        self._tx()
        self.db.execute("INSERT OR REPLACE INTO flight (run_id, window_ns) VALUES (?, ?)",
                        (run_id, window_ns))

    def keep_window(self, run_id: int, reason: str, from_ns: int, to_ns: int) -> KeptWindow:
        """Keep the run's events from `from_ns` on in full (the trim stops there)."""
        w = KeptWindow(reason, from_ns, to_ns, time.time_ns())
        self._tx()
        self.db.execute("INSERT INTO flight_windows VALUES (?,?,?,?,?)",
                        (run_id, reason, from_ns, to_ns, w.at_wall_ns))
        return w

    def flight_info(self, run_id: int) -> FlightInfo | None:
        """The run's flight recorder state, None for a run recorded in full."""
        if not self._has_flight():
            return None
        row = self.db.execute("SELECT window_ns, trimmed_to_ns, chunks, events FROM flight "
                              "WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            return None
        wins = [KeptWindow(*r) for r in self.db.execute(
            "SELECT reason, from_ns, to_ns, at_wall_ns FROM flight_windows WHERE run_id=? "
            "ORDER BY from_ns", (run_id,))]
        return FlightInfo(row[0], row[1], row[2], row[3], wins)

    def chunks_to_trim(self, run_id: int, before_ns: int, layer: str = "sys"
                       ) -> dict[int, list[int]]:
        """Per process, the ids of its chunks of `layer` that ended before `before_ns`,
        oldest first (a process's chunks are in time order: a prefix of them)."""
        out: dict[int, list[int]] = {}
        for cid, proc in self.db.execute(
                "SELECT id, proc_id FROM chunks WHERE run_id=? AND layer=? AND last_ts<? "
                "ORDER BY id", (run_id, layer, before_ns)):
            out.setdefault(proc, []).append(cid)
        return out

    def trim_chunks(self, run_id: int, ids: list[int], before_ns: int) -> int:
        """Delete the chunks `ids` (their aggregates already written) and count them; the
        caller commits, with the aggregates, in one transaction. Returns the events."""
        self._tx()
        events = 0
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            marks = ",".join("?" * len(part))
            events += self.db.execute(f"SELECT COALESCE(SUM(n), 0) FROM chunks WHERE id IN "
                                      f"({marks})", part).fetchone()[0]
            self.db.execute(f"DELETE FROM chunks WHERE id IN ({marks})", part)
        self.db.execute("UPDATE flight SET trimmed_to_ns=max(trimmed_to_ns, ?), "
                        "chunks=chunks+?, events=events+? WHERE run_id=?",
                        (before_ns, len(ids), events, run_id))
        return events

    def set_initial_fds(self, proc_id: int, fds: dict[int, str]) -> None:
        """A process's fd table where its remaining events start (after a trim). Its trace
        now starts mid-life, as an attached process's does: marked attached, so the table
        is read as its start (not its parent's at the fork)."""
        from renacerd.store.database import _dumps

        self._tx()
        self.db.execute("UPDATE processes SET initial_fds=?, attached=1 WHERE id=?",
                        (_dumps({str(k): v for k, v in fds.items()}), proc_id))

    def spans_overlapping(self, run_id: int, lo: int, hi: int) -> list[Any]:
        """The run's SpanRecords alive at some point of [lo, hi] (CLOCK_MONOTONIC), by start."""
        from renacerd.client.span import SPAN_FIELDS, SpanRecord

        return [SpanRecord.from_row(dict(zip(SPAN_FIELDS, row))) for row in self.db.execute(
            f"SELECT {', '.join(SPAN_FIELDS)} FROM spans WHERE run_id=? AND "
            "end_mono_nanos>=? AND start_mono_nanos<=? ORDER BY start_mono_nanos, rowid",
            (run_id, lo, hi))]

    def chunk_columns(self, ids: list[int], layer: str = "sys") -> dict[str, np.ndarray]:
        """The columns of the chunks `ids` of `layer` (one process's, in order), sorted by
        ts."""
        from renacerd.columns import SYSCALL_COLUMNS
        from renacerd.cuda.records import GPU_LAYOUT

        rows: list[tuple] = []
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            rows += self.db.execute(f"SELECT n, first_ts, last_ts, data FROM chunks WHERE id IN "
                                    f"({','.join('?' * len(part))}) ORDER BY id",
                                    part).fetchall()
        if layer == "gpu":  # uprobe records from several CPUs: not known to be in order
            return self.decode_chunks(rows, GPU_LAYOUT, True)
        return self.decode_chunks(rows, SYSCALL_COLUMNS)

    def partial_sums(self, run_id: int, kind: str) -> dict[str, Any]:
        """The folded summaries of one kind ('process' by proc id, 'span' by span id)."""
        return {k: lossless_loads(d) for k, d in self.db.execute(
            "SELECT key, data FROM flight_sums WHERE run_id=? AND kind=?", (run_id, kind))}

    def path_existence(self, run_id: int) -> dict[str, int]:
        """Path -> whether the run's folded part last saw it exist (1) or not (0)."""
        # a list per path: merge_summary keeps the later list, where it would add numbers
        return {p: v[0] for p, v in (self.partial_sums(run_id, "exists").get("run")
                                     or {}).items()}

    def add_partial(self, run_id: int, kind: str, sums: dict[str, Any]) -> None:
        """Add summaries to the folded ones (counts summed: merge_summary)."""
        if not sums:
            return
        old = self.partial_sums(run_id, kind)
        self._tx()
        self.db.executemany("INSERT OR REPLACE INTO flight_sums VALUES (?,?,?,?)",
                            [(run_id, kind, k, lossless_dumps(merge_summary(old.get(k), v))
                              .decode()) for k, v in sums.items()])

    def add_partial_steps(self, run_id: int, steps: list[tuple], files: list[tuple]) -> None:
        """Append per-step rows (proc_id, step, syscall, calls, errors, ns) and (proc_id,
        step, path, bytes read, bytes written): summed when the run ends."""
        from renacerd.store.database import _text

        self._tx()
        self.db.executemany("INSERT INTO flight_steps VALUES (?,?,?,?,?,?,?)",
                            [(run_id, p, _text(st), *r) for p, st, *r in steps])
        self.db.executemany("INSERT INTO flight_files VALUES (?,?,?,?,?,?)",
                            [(run_id, p, _text(st), _text(path), *r)
                             for p, st, path, *r in files])

    def summed_steps(self, run_id: int) -> tuple[list[tuple], list[tuple]]:
        """The folded per-step rows, summed per (process, step, syscall or path)."""
        from renacerd.store.database import _untext

        steps = self.db.execute(
            "SELECT proc_id, step, syscall, SUM(calls), SUM(errors), SUM(total_ns) FROM "
            "flight_steps WHERE run_id=? GROUP BY proc_id, step, syscall "
            "ORDER BY proc_id, step, SUM(total_ns) DESC", (run_id,)).fetchall()
        files = self.db.execute(
            "SELECT proc_id, step, path, SUM(bytes_read), SUM(bytes_written) FROM "
            "flight_files WHERE run_id=? GROUP BY proc_id, step, path "
            "ORDER BY proc_id, step, path", (run_id,)).fetchall()
        return ([(p, _untext(st), *r) for p, st, *r in steps],
                [(p, _untext(st), _untext(path), *r) for p, st, path, *r in files])

    def mark_flight_pruned(self, run_id: int, info: FlightInfo | None) -> None:
        """The run reads as pruned (its reports read its aggregates), by the flight recorder,
        with the windows it kept."""
        if info is None:
            return
        self._tx()
        kept = orjson.dumps({"flight_windows": info.to_json()["kept"]}).decode()
        self.db.execute(
            "INSERT OR REPLACE INTO pruned (run_id, at_wall_ns, reason, chunks, events, bytes, "
            "strings, partial, kept) VALUES (?,?,?,?,?,0,0,0,?)",
            (run_id, time.time_ns(), "flight recorder", info.chunks, info.events, kept))

    def forget_partials(self, run_id: int) -> None:
        """Drop the folded rows (written as the run's aggregates)."""
        self._tx()
        for table in _PARTIAL_TABLES:
            self.db.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))


def merge_summary(a: Any, b: Any) -> Any:
    """Two partial summaries of one process or span added: counts, times and bytes summed,
    flags or'ed, a thread count the larger one (threads seen in both are one set)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) or bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = max(out.get(k) or 0, v or 0) if k == "threads" else (
                merge_summary(out.get(k), v))
        if "syscalls" in out and isinstance(out["syscalls"], dict):
            out["syscalls"] = dict(sorted(out["syscalls"].items(),
                                          key=lambda kv: -kv[1].get("total_ns", 0)))
        return out
    return b  # a text field: the later value


SLICE_NS = 1_000_000_000  # a fold takes at most this much of the run at a time


def _fd_paths(t: Any) -> dict[int, str]:
    """A trace's fd table after its events, as initial_fds (fd -> path; unknown left out)."""
    files = getattr(t, "files", None)
    if files is None:
        return dict(t.process.initial_fds)
    return {fd: t.strings[sid].decode("utf-8", "surrogateescape")
            for fd, sid in files.final.table.items() if sid >= 0}


def _grown(store: Any, run_id: int, known: list[bytes]) -> list[bytes]:
    """`known` (the run's string table as last read) with the strings added since, in
    place: a fold a second reads only the new ones."""
    for i, s in store.strings_after(run_id, len(known) - 1):
        known.extend([b""] * (i - len(known)))
        known.append(s)
    return known


def _outstanding(store: Any, run_id: int, procs: list[tuple[int, Any]], traces: list[Any],
                 processes: list[dict[str, Any]]) -> None:
    """Each process summary's GPU `outstanding` made the change this part brings to the
    allocations still live from the parts before (kept as a partial): summed part by part,
    the run's outstanding allocations, where a part alone cannot tell which of its frees
    free an earlier part's allocations."""
    from renacerd.trace.gpu_trace import carry_allocations

    state = store.partial_sums(run_id, "gpu_live")
    new = {}
    for (proc_id, _), t, d in zip(procs, traces, processes):
        cols = (t.gpu or {}).get("columns")
        if cols is None or not len(cols["ts"]) or not (d or {}).get("gpu"):
            continue
        old = state.get(str(proc_id)) or {"live": [], "orphans": [0, 0]}
        live = {int(p): int(b) for p, b in old["live"]}
        orphans = list(old["orphans"])
        n0, b0 = len(live) + orphans[0], sum(live.values()) + orphans[1]
        n1, b1 = carry_allocations(cols, live, orphans)
        d["gpu"]["outstanding"] = {"allocations": n1 - n0, "bytes": b1 - b0}
        # lists: merge_summary keeps the later state whole
        new[str(proc_id)] = {"live": [[p, b] for p, b in live.items()], "orphans": orphans}
    store.add_partial(run_id, "gpu_live", new)


def _fold_slice(store: Any, info: Any, todo: dict[int, list[int]],
                gtodo: dict[int, list[int]], lo: int, hi: int, known: list[bytes]) -> int:
    """Fold the syscall chunks `todo` and GPU chunks `gtodo` (per proc id) into the partial
    aggregates and delete them, in one transaction; returns the events folded."""
    from renacerd.store.aggregates import compute
    from renacerd.store.database import span_summaries, tag_spans
    from renacerd.trace.gpu_trace import decode_gpu
    from renacerd.trace.unified_trace import UnifiedTrace

    # a copy: the fd replay appends the resolved paths to the traces' table
    strings = list(_grown(store, info.id, known))
    spans = store.spans_overlapping(info.id, lo, hi)
    procs = store.processes(info.id)
    traces = []
    for proc_id, p in procs:
        t = UnifiedTrace(p.pid, p.name)
        t.process, t.run, t.strings, t.spans = p, info.name, strings, spans
        if info.syscall_table:
            t.table = info.syscall_table
        t.columns = store.chunk_columns(todo.get(proc_id, []))
        if proc_id in gtodo:
            t.gpu = decode_gpu(store.chunk_columns(gtodo[proc_id], "gpu"), strings)
        traces.append(t)
    tag_spans(traces)
    exists = store.path_existence(info.id)
    agg = compute(traces, span_summaries(traces), exists)
    _outstanding(store, info.id, procs, traces, agg.processes)
    ids = [proc_id for proc_id, _ in procs]
    store.add_partial(info.id, "process", {
        str(ids[pos]): d for pos, d in enumerate(agg.processes)
        if ids[pos] in todo or ids[pos] in gtodo})
    store.add_partial(info.id, "span", {
        sp.span_id_hex(): d for sp, d in zip(spans, agg.spans)
        if d["syscalls"] or d.get("gpu")})
    # effects sum slice by slice; renames apply at the end, over the whole run's sums
    store.add_partial(info.id, "exists", {"run": {p: [v] for p, v in exists.items()}})
    store.add_partial(info.id, "effects", {"run": agg.effects.items()})
    # keyed by time and place in the slice: a path may not be valid text for a key
    store.add_partial(info.id, "rename", {f"{ts:020d}.{i}": [ts, old, new]
                                          for i, (ts, old, new) in enumerate(agg.renames)})
    store.add_partial_steps(
        info.id, [(ids[pos], str(step), *rest) for pos, step, *rest in agg.step_syscalls],
        [(ids[pos], str(step), *rest) for pos, step, *rest in agg.step_files])
    for (proc_id, _), t in zip(procs, traces):
        if proc_id in todo:
            # where the process's remaining events start: its files as they are now
            store.set_initial_fds(proc_id, _fd_paths(t))
    events = store.trim_chunks(info.id, [i for d in (todo, gtodo) for v in d.values()
                                         for i in v], hi)
    store.commit()
    return events


def fold_events(store: Any, run: str, run_id: int, before_ns: int, lock: Any = None,
                strings: list[bytes] | None = None) -> int:
    """Fold a flight run's events (both layers) that ended before `before_ns` into its partial
    aggregates and delete them, a slice (SLICE_NS) per transaction, `lock` held for each
    (the store's writers wait one slice at most). `strings`: the run's string table as a
    caller keeps it between folds (grown here). Returns the events folded."""
    known = [] if strings is None else strings
    from contextlib import nullcontext

    guard = lock if lock is not None else nullcontext()
    total = 0
    while True:
        with guard:
            info = store.run(run)
            fl = store.flight_info(run_id)
            start = fl.trimmed_to_ns if fl is not None and fl.trimmed_to_ns else 0
            first = store.db.execute("SELECT MIN(last_ts) FROM chunks WHERE run_id=?",
                                     (run_id,)).fetchone()[0]
            if first is None or first >= before_ns:
                return total
            hi = min(before_ns, max(start, first) + SLICE_NS)
            todo = store.chunks_to_trim(run_id, hi)
            gtodo = store.chunks_to_trim(run_id, hi, "gpu")
            if todo or gtodo:
                lo = store.db.execute(
                    "SELECT MIN(first_ts) FROM chunks WHERE run_id=? AND last_ts<?",
                    (run_id, hi)).fetchone()[0]
                try:
                    total += _fold_slice(store, info, todo, gtodo, lo, hi, known)
                except BaseException:
                    store._abandon()
                    raise
            else:
                store.db.execute("UPDATE flight SET trimmed_to_ns=max(trimmed_to_ns, ?) "
                                 "WHERE run_id=?", (hi, run_id))
            if hi >= before_ns:
                return total


def finish_flight(store: Any, run: str, run_id: int) -> None:
    """A flight run ended (its events before its kept windows folded): its aggregates are
    the folded part plus its kept events', and it reads as pruned by the flight recorder."""
    from renacerd.store.aggregates import Aggregates, compute
    from renacerd.store.database import span_summaries
    from renacerd.trace.effects import Effects

    traces = store.load_run(run)  # what is left: the kept windows (if any), tagged
    kept = compute(traces, span_summaries(traces), store.path_existence(run_id))
    procs = store.processes(run_id)
    _outstanding(store, run_id, procs, traces, kept.processes)
    pos_of = {proc_id: pos for pos, (proc_id, _) in enumerate(procs)}
    part_p = store.partial_sums(run_id, "process")
    part_s = store.partial_sums(run_id, "span")
    spans = store.span_records(run_id)
    agg = Aggregates(spans=[
        merge_summary(part_s.get(sp.span_id_hex()),
                      kept.spans[i] if i < len(kept.spans) else _NO_SPAN_SUM)
        for i, sp in enumerate(spans)])
    agg.processes = [merge_summary(part_p.get(str(proc_id)),
                                   kept.processes[pos] if pos < len(kept.processes) else None)
                     or {} for pos, (proc_id, _) in enumerate(procs)]
    steps, files = store.summed_steps(run_id)
    sums: dict[tuple, list[int]] = {}
    for proc_id, step, name, *v in steps:
        sums[(pos_of[proc_id], step, name)] = list(v)
    for pos, step, name, *v in kept.step_syscalls:
        old = sums.setdefault((pos, str(step), name), [0, 0, 0])
        sums[(pos, str(step), name)] = [a + b for a, b in zip(old, v)]
    agg.step_syscalls = [(*k, *v) for k, v in sums.items()]
    fsums: dict[tuple, list[int]] = {}
    for proc_id, step, path, *v in files:
        fsums[(pos_of[proc_id], step, path)] = list(v)
    for pos, step, path, *v in kept.step_files:
        old = fsums.setdefault((pos, str(step), path), [0, 0])
        fsums[(pos, str(step), path)] = [a + b for a, b in zip(old, v)]
    agg.step_files = [(*k, *v) for k, v in fsums.items()]
    agg.effects = Effects.from_items(merge_summary(
        store.partial_sums(run_id, "effects").get("run"), kept.effects.items()) or {})
    agg.renames = kept.renames + [tuple(r) for r in store.partial_sums(run_id, "rename")
                                  .values()]
    info = store.flight_info(run_id)
    store.write_aggregates(run_id, agg)
    store.forget_partials(run_id)
    store.mark_flight_pruned(run_id, info)
    store.commit()


_NO_SPAN_SUM = {"syscalls": 0, "syscall_ns": 0, "bytes_read": 0, "bytes_written": 0,
                "calls": {}}
