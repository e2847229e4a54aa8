"""Retention: keep the store under a size and an age budget by dropping the events of the
oldest runs (their metadata, spans and aggregates stay), and delete runs outright.

Each run is pruned in one transaction (a process killed at any point leaves the run whole
or pruned, never half), then the freed pages go back to the file system
(incremental_vacuum) and the WAL is truncated, so the file actually shrinks.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from renacerd.columns import encode
from renacerd.store.aggregates import STEP_KEY, compute
from renacerd.store.database import (
    AGGREGATE_TABLES,
    RunInfo,
    Store,
    StoreError,
    _writes,
    span_summaries,
    tag_spans,
)
from renacerd.store.flight import FLIGHT_TABLES

log = logging.getLogger("renacerd.store.retention")

# A live run loses at most this many of its oldest chunks per transaction: the unit the
# budget may be overshot by while a run writes.
CHUNK_GROUP = 16
INTERVAL_S = 60.0  # how often the daemon and the service apply the policy
DEFAULT_SIZE = "10%"  # of the store's file system (the service's default)
DEFAULT_TIME = "30d"  # the service's default

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9,
       "w": 7 * 86400 * 10**9, "y": 365 * 86400 * 10**9}


class RetentionError(ValueError):
    """A size or duration that does not parse (one line for the user)."""


def parse_size(text: str, store_path: str | None = None) -> int:
    """Bytes of a size budget: `500M`, `2G`, `1024` (binary units) or `10%` of the file
    system holding `store_path`."""
    t = text.strip()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise RetentionError(f"bad size {text!r} (e.g. 500M, 2G or 10%)") from None
        if not 0 < pct <= 100:
            raise RetentionError(f"bad size {text!r}: a percentage is above 0 and at most 100")
        st = os.statvfs(_existing_dir(store_path or "."))
        return int(st.f_blocks * st.f_frsize * pct / 100)
    m = _SIZE.match(t)
    if not m or m.group(2).upper() not in _UNITS:
        raise RetentionError(f"bad size {text!r} (e.g. 500M, 2G or 10%)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise RetentionError(f"bad size {text!r}: must be above 0")
    return n


def _existing_dir(path: str) -> str:
    """The nearest existing directory at or above `path` (a store not made yet)."""
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        p = os.path.dirname(p)
    return p


def parse_duration(text: str) -> int:
    """Nanoseconds of an age budget: `30d`, `12h`, `1h30m`, `90s`, `2w`, `1y`."""
    t = text.strip()
    parts = _DURATION_PART.findall(t)
    if not t or "".join(n + u for n, u in parts) != t:
        raise RetentionError(f"bad duration {text!r} (e.g. 30d, 12h or 1h30m)")
    ns = sum(int(n) * _NS[u] for n, u in parts)
    if ns <= 0:
        raise RetentionError(f"bad duration {text!r}: must be above 0")
    return ns


# A run's steps as `renacer show --by step` has them: [{"step", "outliers": [...]}, ...]
# (reports.steps.steps_data, handed in by the command line: the store comes before reports).
StepsOf = Callable[[RunInfo, list[Any]], list[dict[str, Any]]]
STEP_CHUNK_EVENTS = 1 << 16  # the daemon's chunk size, for the chunks a step prune rewrites


@dataclass(slots=True)
class Policy:
    """The budgets (None: no limit of that kind)."""

    size: int | None = None
    age_ns: int | None = None
    keep_steps: int | None = None  # full events: first, last N steps, anomalies, N sampled
    steps_of: StepsOf | None = None

    @property
    def empty(self) -> bool:
        """No budget at all."""
        return self.size is None and self.age_ns is None and self.keep_steps is None


@dataclass(slots=True)
class Action:
    """One run pruned (or that would be): why, and what it dropped."""

    run: str
    reason: str  # "age", "size" or "live" (a live run's oldest chunks)
    chunks: int
    events: int
    bytes: int


@dataclass(slots=True)
class _Usage:
    chunks: int
    events: int
    bytes: int
    first_id: int


def store_size(path: str | os.PathLike[str]) -> int:
    """Bytes of the store file and its WAL."""
    total = 0
    for p in (str(path), f"{path}-wal"):
        try:
            total += os.stat(p).st_size
        except FileNotFoundError:
            pass
    return total


class Retention:
    """Retention passes over one store (its own connection: the daemon's writer goes on)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db
        self.path = store.path  # for the one-line StoreError of a refused write

    def _abandon(self) -> None:
        self.store._abandon()

    # -- measuring ---------------------------------------------------------------------
    def used(self) -> int:
        """Bytes the store would take with its free pages returned: pages in use plus WAL
        (a store made before auto_vacuum keeps its free pages for reuse instead)."""
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        size = self.db.execute("PRAGMA page_size").fetchone()[0]
        try:
            wal = os.stat(self.store.path + "-wal").st_size
        except FileNotFoundError:
            wal = 0
        return (pages - free) * size + wal

    def usage(self) -> dict[int, _Usage]:
        """Per run id: its chunks, their events and bytes, the oldest chunk id."""
        return {rid: _Usage(n, ev or 0, b or 0, lo) for rid, n, ev, b, lo in self.db.execute(
            "SELECT run_id, count(*), sum(n), sum(length(data)), min(id) FROM chunks "
            "GROUP BY run_id")}

    # -- pruning -----------------------------------------------------------------------
    def _aggregates(self, info: RunInfo):
        """The aggregates of a run, computed from its events as stored now."""
        st = self.store
        strings = st.strings(info.id)
        spans = st.span_records(info.id)
        traces = [st._trace(info, pid, p, strings, spans) for pid, p in st.processes(info.id)]
        tag_spans(traces)
        return compute(traces, span_summaries(traces))

    @_writes
    def prune_run(self, info: RunInfo, reason: str) -> Action:
        """Drop every event chunk and string of an ended run in one transaction; its
        aggregates (computed first, unless kept from an earlier partial prune) stay."""
        agg = None if self.store.has_aggregates(info.id) else self._aggregates(info)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            u = self.usage_of(info.id)
            # another pass may have pruned it meanwhile: its aggregates stand, not ours of
            # the events it left
            if agg is not None and not self.store.has_aggregates(info.id):
                self.store.write_aggregates(info.id, agg)
            self.db.execute("DELETE FROM chunks WHERE run_id=?", (info.id,))
            strings = self.db.execute("DELETE FROM strings WHERE run_id=?",
                                      (info.id,)).rowcount
            self._record(info.id, reason, u, strings, partial=False)
            self.db.execute("COMMIT")
        except BaseException:
            self.store._abandon()
            raise
        return Action(info.name, reason, u.chunks, u.events, u.bytes)

    @_writes
    def prune_oldest_chunks(self, info: RunInfo, count: int = CHUNK_GROUP) -> Action:
        """Drop a live run's `count` oldest chunks in one transaction (its strings stay:
        later events refer to them)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            ids = [r[0] for r in self.db.execute(
                "SELECT id FROM chunks WHERE run_id=? ORDER BY id LIMIT ?", (info.id, count))]
            u = _Usage(0, 0, 0, 0)
            if ids:
                marks = ",".join("?" * len(ids))
                n, ev, b = self.db.execute(
                    f"SELECT count(*), sum(n), sum(length(data)) FROM chunks WHERE id IN "
                    f"({marks})", ids).fetchone()
                u = _Usage(n, ev or 0, b or 0, ids[0])
                self.db.execute(f"DELETE FROM chunks WHERE id IN ({marks})", ids)
                self._record(info.id, "live", u, 0, partial=True)
            self.db.execute("COMMIT")
        except BaseException:
            self.store._abandon()
            raise
        return Action(info.name, "live", u.chunks, u.events, u.bytes)

    def usage_of(self, run_id: int) -> _Usage:
        """One run's chunk usage (zero for none)."""
        n, ev, b, lo = self.db.execute(
            "SELECT count(*), sum(n), sum(length(data)), min(id) FROM chunks WHERE run_id=?",
            (run_id,)).fetchone()
        return _Usage(n, ev or 0, b or 0, lo or 0)

    def _record(self, run_id: int, reason: str, u: _Usage, strings: int, partial: bool,
                kept: str | None = None) -> None:
        """Add to the run's `pruned` row (a live run is pruned group by group)."""
        self.db.execute(
            "INSERT INTO pruned (run_id, at_wall_ns, reason, chunks, events, bytes, strings, "
            "partial, kept) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(run_id) DO UPDATE SET "
            "at_wall_ns=excluded.at_wall_ns, reason=CASE WHEN pruned.reason=excluded.reason "
            "THEN pruned.reason WHEN pruned.partial THEN "
            "pruned.reason || ',' || excluded.reason ELSE excluded.reason END, "
            "chunks=pruned.chunks+excluded.chunks, events=pruned.events+excluded.events, "
            "bytes=pruned.bytes+excluded.bytes, strings=pruned.strings+excluded.strings, "
            "partial=max(pruned.partial, excluded.partial), kept=excluded.kept",
            (run_id, time.time_ns(), reason, u.chunks, u.events, u.bytes, strings, int(partial),
             kept))

    @_writes
    def prune_steps(self, info: RunInfo, n: int, steps_of: StepsOf) -> Action | None:
        """Keep full events for the first and last `n` steps, the anomalous ones (as
        `steps_of` flags them) and `n` sampled, drop the other steps' syscall events
        (rewriting the chunks of each process), in one transaction with the run's
        aggregates; None when every step is kept."""
        st = self.store
        strings = st.strings(info.id)
        spans = st.span_records(info.id)
        procs = st.processes(info.id)
        traces = [st._trace(info, pid, p, strings, spans) for pid, p in procs]
        tag_spans(traces)
        agg = compute(traces, span_summaries(traces))
        steps = steps_of(info, traces)
        order, why = _kept_steps(steps, n)
        drop = {k for k in order if k not in why}
        if not drop:
            return None
        # per span: does it carry a dropped step (events are tagged with their innermost)
        dropped_span = np.array([str(sp.attributes().get(STEP_KEY)) in drop
                                 if sp.attributes().get(STEP_KEY) is not None else False
                                 for sp in spans] + [False])
        kept = orjson.dumps({"keep_steps": n, "steps": {k: why[k] for k in order if k in why},
                             "dropped_steps": [k for k in order if k in drop]}).decode()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if st.pruned_info(info.id) is not None:  # another pass got there first
                self.db.execute("ROLLBACK")
                return None
            before = self.usage_of(info.id)
            st.write_aggregates(info.id, agg)
            self._rewrite_kept(info, procs, traces, dropped_span)
            after = self.usage_of(info.id)
            u = _Usage(before.chunks - after.chunks, before.events - after.events,
                       before.bytes - after.bytes, before.first_id)
            self._record(info.id, "keep-steps", u, 0, partial=False, kept=kept)
            self.db.execute("COMMIT")
        except BaseException:
            self.store._abandon()
            raise
        return Action(info.name, "keep-steps", u.chunks, u.events, u.bytes)

    def _rewrite_kept(self, info: RunInfo, procs: list[tuple[int, Any]], traces: list[Any],
                      dropped_span: np.ndarray) -> None:
        """Rewrite each process's syscall chunks with only the events of kept steps (inside
        the caller's transaction)."""
        st = self.store
        for (proc_id, _), t in zip(procs, traces):
            if not len(t):
                continue
            keep = ~dropped_span[t.span_index]
            if keep.all():
                continue
            self.db.execute("DELETE FROM chunks WHERE run_id=? AND proc_id=? AND "
                            "layer='sys'", (info.id, proc_id))
            idx = np.flatnonzero(keep)
            for lo in range(0, len(idx), STEP_CHUNK_EVENTS):
                part = idx[lo:lo + STEP_CHUNK_EVENTS]
                cols = {k: v[part] for k, v in t.columns.items()}
                ts = cols["ts"]
                st.add_encoded_chunk(info.id, proc_id, encode(cols), len(ts), int(ts[0]),
                                     int(ts[-1]))

    @_writes
    def delete_run(self, info: RunInfo) -> None:
        """Remove a run and everything it recorded, in one transaction."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            tables = ("chunks", "strings", "spans", "processes", *AGGREGATE_TABLES,
                      *FLIGHT_TABLES)
            if self.store._has_table("sink_progress"):
                tables += ("sink_progress",)
            for table in tables:
                self.db.execute(f"DELETE FROM {table} WHERE run_id=?", (info.id,))
            self.db.execute("DELETE FROM runs WHERE id=?", (info.id,))
            self.db.execute("COMMIT")
        except BaseException:
            self.store._abandon()
            raise

    def reclaim(self) -> None:
        """Return free pages to the file system and truncate the WAL (a reader still on
        it keeps it until the next pass)."""
        try:
            # executescript steps it to the end (execute frees one page per step)
            self.db.executescript("PRAGMA incremental_vacuum")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except Exception as e:  # a busy store: the next pass returns them
            log.info("reclaiming space in %s: %s", self.store.path, e)

    def enable_incremental(self) -> bool:
        """A store made before auto_vacuum: rewrite it once (VACUUM) so that freed pages are
        returned from now on; only with no live run (the rewrite blocks writers). True if
        done."""
        if self.db.execute("PRAGMA auto_vacuum").fetchone()[0] != 0:
            return False
        if any(r.status == "running" for r in self.store.runs()):
            return False
        self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self.db.execute("VACUUM")
        self.reclaim()
        return True

    # -- the pass ----------------------------------------------------------------------
    def apply(self, policy: Policy, dry_run: bool = False, now_ns: int | None = None,
              on_action: Callable[[Action], None] | None = None) -> list[Action]:
        """One pass: runs past the age budget, then the oldest ended runs while over the
        size budget, then (last resort) the oldest chunks of live runs. `dry_run`: what
        would be pruned, nothing written; `on_action` sees each ended run as it is done."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        usage = self.usage()
        runs = [r for r in self.store.runs() if r.id in usage]
        ended = [r for r in runs if r.status != "running"]
        live = [r for r in runs if r.status == "running"]
        actions: list[Action] = []
        done: set[int] = set()
        if policy.keep_steps is not None and policy.steps_of is not None:
            self._prune_steps_of(ended, policy, dry_run, actions, on_action)
            usage = self.usage()
            runs = [r for r in self.store.runs() if r.id in usage]
            ended = [r for r in runs if r.status != "running"]
            live = [r for r in runs if r.status == "running"]
        if policy.age_ns is not None:
            cutoff = now_ns - policy.age_ns
            for r in ended:
                when = r.end_wall_ns or r.start_wall_ns or 0
                if when < cutoff:
                    actions.append(self._prune(r, "age", usage[r.id], dry_run, on_action))
                    done.add(r.id)
        if policy.size is None:
            return actions
        used = self.used()
        if dry_run:
            used -= sum(a.bytes for a in actions)
        for r in ended:
            if used <= policy.size:
                return actions
            if r.id in done:
                continue
            actions.append(self._prune(r, "size", usage[r.id], dry_run, on_action))
            used = used - usage[r.id].bytes if dry_run else self.used()
        self._prune_live(live, usage, used, policy.size, dry_run, actions)
        return actions

    def _prune_steps_of(self, ended: list[RunInfo], policy: Policy, dry_run: bool,
                        actions: list[Action],
                        on_action: Callable[[Action], None] | None) -> None:
        """The keep-steps pass over the ended runs not pruned yet (none in a dry run)."""
        for r in ended:
            if r.pruned is not None:
                continue
            if dry_run:
                continue  # what would go needs the pass's own analysis
            a = self.prune_steps(r, policy.keep_steps, policy.steps_of)
            if a is not None:
                self.reclaim()
                actions.append(a)
                if on_action is not None:
                    on_action(a)

    def _prune_live(self, live: list[RunInfo], usage: dict[int, _Usage], used: int, size: int,
                    dry_run: bool, actions: list[Action]) -> None:
        """Last resort: the oldest chunk groups of live runs while the store is over `size`."""
        for r in live:
            u = usage[r.id]
            while used > size and u.chunks > 0:
                if dry_run:
                    a = Action(r.name, "live", min(u.chunks, CHUNK_GROUP), 0, 0)
                    u.chunks -= a.chunks
                    used -= u.bytes // max(u.chunks + a.chunks, 1) * a.chunks
                else:
                    a = self.prune_oldest_chunks(r)
                    if not a.chunks:
                        break
                    u.chunks -= a.chunks
                    self.reclaim()
                    used = self.used()
                _merge(actions, a)

    def _prune(self, r: RunInfo, reason: str, u: _Usage, dry_run: bool,
               on_action: Callable[[Action], None] | None) -> Action:
        if dry_run:
            a = Action(r.name, reason, u.chunks, u.events, u.bytes)
        else:
            a = self.prune_run(r, reason)
            self.reclaim()
        if on_action is not None:
            on_action(a)
        return a


def _merge(actions: list[Action], a: Action) -> None:
    """A live run's chunk groups as one action."""
    if actions and actions[-1].run == a.run and actions[-1].reason == a.reason:
        prev = actions[-1]
        prev.chunks += a.chunks
        prev.events += a.events
        prev.bytes += a.bytes
    else:
        actions.append(a)


def _kept_steps(steps: list[dict[str, Any]], n: int) -> tuple[list[str], dict[str, list[str]]]:
    """(every step in order, step -> why it is kept: first, last, anomalous, sample)."""
    order = [str(s["step"]) for s in steps]
    why: dict[str, list[str]] = {}
    for i, s in enumerate(steps):
        key = str(s["step"])
        if i < n:
            why.setdefault(key, []).append("first")
        if i >= len(steps) - n:
            why.setdefault(key, []).append("last")
        if s.get("outliers"):
            why.setdefault(key, []).append("anomalous: " + ", ".join(s["outliers"]))
    # and n ordinary steps evenly spread over the rest: what a normal step looked like in
    # the middle of the run, the same steps on every pass (no randomness)
    rest = [k for k in order if k not in why]
    for j in range(min(n, len(rest))):
        why[rest[int((j + 0.5) * len(rest) / n)]] = ["sample"]
    return order, why


class RetentionLoop:
    """Applies a policy to a store every `interval` seconds and on demand (a run's end),
    on its own thread and connection; a failed pass is logged, never fatal."""

    def __init__(self, path: str, policy: Policy, interval: float = INTERVAL_S) -> None:
        self.path = path
        self.policy = policy
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, name="renacerd-retention", daemon=True)

    def start(self) -> RetentionLoop:
        """Start the thread (a first pass at once)."""
        self._t.start()
        return self

    def poke(self) -> None:
        """Run a pass now (a run ended)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop after the pass in progress."""
        self._stop.set()
        self._wake.set()
        if self._t.is_alive():
            self._t.join()

    def pass_once(self) -> list[Action]:
        """One pass on a fresh connection."""
        st = Store(self.path)
        try:
            acts = Retention(st).apply(self.policy)
        finally:
            st.close()
        for a in acts:
            log.info("retention: pruned %s (%s): %d chunks, %d events, %d bytes",
                     a.run, a.reason, a.chunks, a.events, a.bytes)
        return acts

    def pass_once_logged(self) -> None:
        """One pass; a failure is logged (the daemon outlives a bad pass)."""
        try:
            self.pass_once()
        except (StoreError, OSError) as e:
            log.warning("retention pass on %s failed: %s", self.path, e)
        except Exception:  # noqa: BLE001
            log.exception("retention pass on %s failed", self.path)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.pass_once_logged()
            self._wake.wait(self.interval)
            self._wake.clear()
