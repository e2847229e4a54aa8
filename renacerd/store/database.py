"""The embedded store: one SQLite file (WAL) holding runs, processes, event chunks, spans."""

from __future__ import annotations

import functools
import grp
import logging
import os
import socket
import sqlite3
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from renacerd.columns import SYSCALL_COLUMNS, ChunkError, chunk_len, decode_into, encode
from renacerd.escaping import escape, lossless_dumps, lossless_loads
from renacerd.store.flight import FLIGHT_SCHEMA, FlightTables
from renacerd.store.readers import StoreReaders
from renacerd.trace.unified_trace import ProcessSpan, UnifiedTrace

SCHEMA_VERSION = 3
# Versions this code reads; a writer upgrades an older store in place. 2: chunks carry the
# aux and mode columns, runs the truncated counter. 3: runs may be pruned (their events
# dropped, their aggregates kept): a reader of 2 would show a pruned run as one that did
# nothing.
READABLE_SCHEMAS = (1, 2, 3)
log = logging.getLogger("renacerd.store.database")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    host TEXT, kernel TEXT, cmdline TEXT, version TEXT, boot_id TEXT,
    start_wall_ns INTEGER, end_wall_ns INTEGER,
    start_mono_ns INTEGER, end_mono_ns INTEGER,
    status TEXT NOT NULL DEFAULT 'running',
    daemon_pid INTEGER, owner_uid INTEGER,
    events INTEGER NOT NULL DEFAULT 0,
    events_lost INTEGER NOT NULL DEFAULT 0,
    details_lost INTEGER NOT NULL DEFAULT 0,
    failed_reads INTEGER NOT NULL DEFAULT 0,
    unmatched_exits INTEGER NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0,
    client_dropped INTEGER NOT NULL DEFAULT 0,
    lost_per_cpu TEXT, syscall_table TEXT, exit_code INTEGER, error TEXT,
    source_counters TEXT
);
CREATE TABLE IF NOT EXISTS processes (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    pid INTEGER NOT NULL, ppid INTEGER, nspid INTEGER,
    comm TEXT, exe TEXT, argv TEXT,
    start_mono_ns INTEGER, end_mono_ns INTEGER,
    exit_code INTEGER, exit_signal INTEGER,
    attached INTEGER NOT NULL DEFAULT 0,
    initial_fds TEXT,
    rank INTEGER, local_rank INTEGER, world_size INTEGER, group_rank INTEGER,
    local_world_size INTEGER, job_id TEXT, rank_host TEXT, rank_source TEXT
);
CREATE INDEX IF NOT EXISTS processes_run ON processes(run_id, pid);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL, proc_id INTEGER NOT NULL,
    layer TEXT NOT NULL DEFAULT 'sys',
    n INTEGER NOT NULL, first_ts INTEGER, last_ts INTEGER,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_proc ON chunks(run_id, proc_id, layer, id);
CREATE TABLE IF NOT EXISTS strings (
    run_id INTEGER NOT NULL, id INTEGER NOT NULL, s BLOB NOT NULL,
    PRIMARY KEY (run_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spans (
    run_id INTEGER NOT NULL, proc_id INTEGER,
    trace_id BLOB NOT NULL, span_id BLOB NOT NULL, parent_span_id BLOB,
    span_name TEXT NOT NULL, span_kind INTEGER NOT NULL DEFAULT 0,
    start_time_nanos INTEGER, end_time_nanos INTEGER, duration_nanos INTEGER,
    start_mono_nanos INTEGER, end_mono_nanos INTEGER,
    logical_clock INTEGER, status_code INTEGER, status_message TEXT,
    attributes_json TEXT, resource_json TEXT,
    process_id INTEGER, thread_id INTEGER
);
CREATE INDEX IF NOT EXISTS spans_run ON spans(run_id, process_id, start_mono_nanos);
CREATE TABLE IF NOT EXISTS aggregates (
    run_id INTEGER NOT NULL, kind TEXT NOT NULL, idx INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (run_id, kind, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS step_syscalls (
    run_id INTEGER NOT NULL, proc_id INTEGER NOT NULL, step TEXT NOT NULL,
    syscall TEXT NOT NULL, calls INTEGER NOT NULL, errors INTEGER NOT NULL,
    total_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS step_syscalls_run ON step_syscalls(run_id);
CREATE TABLE IF NOT EXISTS step_files (
    run_id INTEGER NOT NULL, proc_id INTEGER NOT NULL, step TEXT NOT NULL,
    path TEXT NOT NULL, bytes_read INTEGER NOT NULL, bytes_written INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS step_files_run ON step_files(run_id);
CREATE TABLE IF NOT EXISTS pruned (
    run_id INTEGER PRIMARY KEY,
    at_wall_ns INTEGER NOT NULL, reason TEXT NOT NULL,
    chunks INTEGER NOT NULL DEFAULT 0, events INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0, strings INTEGER NOT NULL DEFAULT 0,
    partial INTEGER NOT NULL DEFAULT 0, kept TEXT
);
"""
# Tables a pruned run keeps its aggregates in (deleted with the run by `renacer rm`).
AGGREGATE_TABLES = ("aggregates", "step_syscalls", "step_files", "pruned")

# The rank columns of `processes` (DIST_COLUMNS) are nullable additions that older readers
# ignore (no version bump, docs/store.md): a store made before them gains them (NULL) when a
# daemon opens it, and every process of an older file reads without a rank.
DIST_COLUMNS = ("rank", "local_rank", "world_size", "group_rank", "local_world_size", "job_id",
                "rank_host", "rank_source")
_DIST_TYPES = {"job_id": "TEXT", "rank_host": "TEXT", "rank_source": "TEXT"}

RUN_COUNTERS = ("events_lost", "details_lost", "failed_reads", "unmatched_exits", "truncated")
# Why a run whose daemon is gone is incomplete.
STALE_ERROR = "daemon stopped before the run ended"


def _text(s: str | None) -> str | bytes | None:
    """A name for a TEXT column: as it is, or, holding bytes that are not UTF-8 (surrogate
    escapes), as a BLOB of those bytes, so nothing is lost."""
    if s is None or s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape")


def _untext(v: str | bytes | None) -> str | None:
    """What _text stored, back as the same str."""
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v


def _dumps(v: Any) -> str:
    """JSON text of a column, lossless (renacerd.escaping.lossless_dumps)."""
    return lossless_dumps(v).decode()


def _loads(text: str | None, empty: str) -> Any:
    """The value _dumps wrote (`empty` for NULL)."""
    return lossless_loads(text or empty)


def _dist(cols: tuple) -> Any:
    """The DistInfo of a process row's rank columns, or None."""
    if cols[-1] is None:
        return None
    from renacerd.client.dist_env import DistInfo

    return DistInfo(*cols[:5], _untext(cols[5]), _untext(cols[6]), cols[7])


class StoreError(RuntimeError):
    """The store cannot be opened or written (one clear line for the user)."""


class UnknownRunError(StoreError):
    """No run of that name in the store."""


@dataclass(slots=True)
class RunInfo:
    """One row of `runs`."""

    id: int
    name: str
    host: str | None
    kernel: str | None
    cmdline: list[str]
    version: str | None
    start_wall_ns: int | None
    end_wall_ns: int | None
    start_mono_ns: int | None
    end_mono_ns: int | None
    status: str
    daemon_pid: int | None
    owner_uid: int | None
    events: int
    events_lost: int
    details_lost: int
    failed_reads: int
    unmatched_exits: int
    client_dropped: int
    lost_per_cpu: dict[str, list[int]]
    source_counters: dict[str, int]
    syscall_table: dict[int, str]
    exit_code: int | None
    error: str | None
    truncated: int = 0  # records whose path or argv was cut at the capture bounds
    # what retention dropped (Store.pruned_info), None for a run with all its events
    pruned: dict[str, Any] | None = None
    # a flight-recorder run's window and kept windows (FlightInfo.to_json), else None
    flight: dict[str, Any] | None = None

    @property
    def lost(self) -> int:
        """Everything that did not reach the store whole: events, details, failed reads,
        truncated records, and what other sources (CUDA) dropped."""
        other = sum(v for k, v in self.source_counters.items()
                    if k.endswith("_lost") or k.endswith("_failed_reads"))
        return (self.events_lost + self.details_lost + self.failed_reads + self.truncated
                + other)


ROOT_STORE_DIR = "/var/lib/renacer"
STORE_GROUP = "renacer"
# Whatever the umask (root's is often 022): the group may read, nobody else anything.
DIR_MODE = 0o750
FILE_MODE = 0o640


def default_db_path() -> str:
    """$RENACER_DB, else /var/lib/renacer/traces.db as root, else $XDG_DATA_HOME/renacer."""
    env = os.environ.get("RENACER_DB")
    if env:
        return env
    if os.geteuid() == 0:
        return os.path.join(ROOT_STORE_DIR, "traces.db")
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "renacer", "traces.db")


def boot_id() -> str:
    """This boot's id: a run left 'running' by another boot is certainly dead."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _store_gid(group: str) -> int | None:
    """The group's gid when we may give files to it (root), else None."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def _secure(path: str, mode: int, gid: int | None, fd: int | None = None) -> None:
    """Set `mode` (and group `gid`) on a store path we created or repair."""
    if fd is not None:
        os.fchmod(fd, mode)
        if gid is not None:
            os.fchown(fd, -1, gid)
        return
    os.chmod(path, mode, follow_symlinks=False)
    if gid is not None:
        os.chown(path, -1, gid, follow_symlinks=False)


def _make_store_dir(directory: Path, gid: int | None) -> None:
    """Create the store's directory DIR_MODE, or repair the default one if an earlier
    version left it open to every user (one line says so)."""
    try:
        os.mkdir(directory, DIR_MODE)
    except FileExistsError:
        st = os.stat(directory)
        if (str(directory) == ROOT_STORE_DIR and st.st_mode & 0o007
                and st.st_uid == os.geteuid()):
            _secure(str(directory), DIR_MODE, gid)
            log.warning("store directory %s was mode %04o (readable by every user); now %04o",
                        directory, stat.S_IMODE(st.st_mode), DIR_MODE)
        return
    except FileNotFoundError:
        directory.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(directory, DIR_MODE)
    _secure(str(directory), DIR_MODE, gid)


def _make_store_file(path: str, gid: int | None) -> bool:
    """Create the store file FILE_MODE (SQLite gives its -wal and -shm the same mode and
    owner); False when it exists already (see _repair_store_files)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     FILE_MODE)
    except FileExistsError:
        return False
    try:
        _secure(path, FILE_MODE, gid, fd)
    finally:
        os.close(fd)
    return True


def _repair_store_files(path: str, gid: int | None) -> None:
    """Close store files that an earlier version left open to every user (one line each);
    called only once the file is known to be a store, so no other file is touched."""
    for name in (path, path + "-wal", path + "-shm"):
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o007 and st.st_uid == os.geteuid():
            _secure(name, FILE_MODE, gid)
            log.warning("store file %s was mode %04o (readable by every user); now %04o",
                        name, stat.S_IMODE(st.st_mode), FILE_MODE)


def _schema_of(db: sqlite3.Connection) -> str | None:
    """The file's schema_version; "" for an empty database; raises DatabaseError for a file
    that is not SQLite, StoreError for a database that is not a store."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return ""
    if "meta" not in tables:
        raise StoreError("no meta table")
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return row[0] if row else None


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writes(fn):
    """A failed write (disk full, read-only, locked) becomes one clear StoreError."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        try:
            return fn(self, *args, **kw)
        except sqlite3.Error as e:
            # What the failed transaction held cannot be made durable (the disk refused it);
            # without the rollback every later write, the run's end among them, would join
            # the same doomed transaction.
            self._abandon()
            raise StoreError(f"cannot write {self.path}: {e}") from e

    return wrapper


class Store(StoreReaders, FlightTables):
    """SQLite store; one writer (the daemon) and any number of readers."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False,
                 group: str = STORE_GROUP) -> None:
        """Open the store; `create`: make it (directory DIR_MODE, files FILE_MODE, `group`)
        if missing."""
        self.path = str(path)
        p = Path(self.path)
        try:
            exists = p.exists()
        except OSError as e:  # a directory the user may not enter (0750 root:renacer)
            raise StoreError(f"cannot open {self.path}: {e.strerror}") from e
        if not create and not exists:
            raise StoreError(f"no store at {self.path}")
        if create:
            gid, made = self._make_files(p, group)
        try:
            self.db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False,
                                      isolation_level=None)
            self._reads = threading.Lock()  # readers on threads (stored_chunks)
            self.db.execute("PRAGMA busy_timeout=10000")
            # nothing is written to (or chmod'ed on) a file before it is known to be a store
            # of a version this code reads
            try:
                found = _schema_of(self.db)
            except StoreError:
                raise StoreError(f"{self.path} is not a renacer store (no meta table)") from None
            if found and (not found.isdigit() or int(found) not in READABLE_SCHEMAS):
                raise StoreError(f"{self.path}: unsupported store schema {found}")
            if create and found == "":
                # Only before the first table: freed pages can then be handed back to the
                # file system (PRAGMA incremental_vacuum) without rewriting the file.
                self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            if create and not made:
                _repair_store_files(self.path, gid)
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if create and mode != "wal":
                raise StoreError(f"store {self.path}: cannot enable WAL (journal_mode={mode})")
            self.db.execute("PRAGMA synchronous=NORMAL")
            if create:
                self._create_schema()
            ver = self.db.execute(
                "SELECT value FROM meta WHERE key='schema_version'"
            ).fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a renacer store ({e})") from e
        if ver is None or not ver[0].isdigit() or int(ver[0]) not in READABLE_SCHEMAS:
            raise StoreError(f"{self.path}: unsupported store schema {ver and ver[0]}")

    def _make_files(self, p: Path, group: str) -> tuple[int | None, bool]:
        """Make the store's directory and file if missing: (their group id, whether the file
        was made here)."""
        gid = _store_gid(group)
        try:
            _make_store_dir(p.parent, gid)
        except OSError as e:
            raise StoreError(f"cannot create {p.parent}: {e.strerror}") from e
        if p.exists() and not os.access(self.path, os.W_OK):
            raise StoreError(f"store {self.path} is not writable")
        if not p.exists() and not os.access(p.parent, os.W_OK):
            raise StoreError(f"cannot write in {p.parent}")
        try:
            made = _make_store_file(self.path, gid)
        except OSError as e:
            raise StoreError(f"cannot create {self.path}: {e.strerror}") from e
        return gid, made

    def _create_schema(self) -> None:
        """The tables, the columns added since schema 1 and the schema version."""
        self.db.executescript(SCHEMA + FLIGHT_SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(runs)")}
        if "source_counters" not in cols:  # stores made before the CUDA layer
            self.db.execute("ALTER TABLE runs ADD COLUMN source_counters TEXT")
        if "truncated" not in cols:  # schema 1
            self.db.execute(
                "ALTER TABLE runs ADD COLUMN truncated INTEGER NOT NULL DEFAULT 0")
        pcols = {r[1] for r in self.db.execute("PRAGMA table_info(processes)")}
        for c in DIST_COLUMNS:  # stores made before ranks
            if c not in pcols:
                self.db.execute(f"ALTER TABLE processes ADD COLUMN {c} "
                                f"{_DIST_TYPES.get(c, 'INTEGER')}")
        self.db.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        old = self.db.execute(
            "SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if old is not None and old[0].isdigit() and int(old[0]) in READABLE_SCHEMAS:
            # chunks of schema 1 read as they are (aux and mode 0)
            self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'",
                            (str(SCHEMA_VERSION),))

    # -- writing ---------------------------------------------------------------------
    def _tx(self) -> None:
        if not self.db.in_transaction:
            self.db.execute("BEGIN")

    def _abandon(self) -> None:
        """Roll back the open transaction, if SQLite has not already."""
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    @_writes
    def commit(self) -> None:
        """Make everything written so far durable."""
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    @_writes
    def mark_stale_runs_incomplete(self) -> list[str]:
        """Runs left 'running' by a daemon that is gone become 'incomplete'."""
        me = boot_id()
        stale = []
        for rid, name, dpid, bid in self.db.execute(
            "SELECT id, name, daemon_pid, boot_id FROM runs WHERE status='running'"
        ).fetchall():
            if bid != me or not _pid_alive(dpid) or dpid == os.getpid():
                stale.append((rid, name))
        if stale:
            self._tx()
            self.db.executemany(
                "UPDATE runs SET status='incomplete', error=coalesce(error, ?) WHERE id=?",
                [(STALE_ERROR, rid) for rid, _ in stale],
            )
            self.commit()
        return [_untext(n) for _, n in stale]

    def run_exists(self, name: str) -> bool:
        """A run of that name is already stored."""
        return self.db.execute(
            "SELECT 1 FROM runs WHERE name=?", (_text(name),)).fetchone() is not None

    @_writes
    def begin_run(
        self,
        name: str,
        *,
        cmdline: list[str],
        version: str,
        syscall_table: dict[int, str],
        start_wall_ns: int,
        start_mono_ns: int,
        owner_uid: int = 0,
    ) -> int:
        """Create a run in state 'running' and return its id."""
        if self.run_exists(name):
            raise StoreError(f"run '{escape(name)}' already exists in {self.path}")
        self._tx()
        cur = self.db.execute(
            "INSERT INTO runs (name, host, kernel, cmdline, version, boot_id, start_wall_ns, "
            "start_mono_ns, status, daemon_pid, owner_uid, syscall_table) "
            "VALUES (?,?,?,?,?,?,?,?,'running',?,?,?)",
            (
                _text(name),
                socket.gethostname(),
                os.uname().release,
                _dumps(cmdline),
                version,
                boot_id(),
                start_wall_ns,
                start_mono_ns,
                os.getpid(),
                owner_uid,
                orjson.dumps({str(k): v for k, v in syscall_table.items()}).decode(),
            ),
        )
        self.commit()
        return int(cur.lastrowid)

    @_writes
    def add_process(self, run_id: int, p: ProcessSpan) -> int:
        """Insert a process row; returns its id (chunks refer to it)."""
        self._tx()
        cur = self.db.execute(
            "INSERT INTO processes (run_id, pid, ppid, nspid, comm, exe, argv, start_mono_ns, "
            "end_mono_ns, exit_code, exit_signal, attached, initial_fds) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                run_id,
                p.pid,
                p.ppid,
                p.nspid,
                _text(p.name),
                _text(p.exe),
                _dumps(p.argv),
                p.start_mono_ns,
                p.end_mono_ns,
                p.exit_code,
                p.exit_signal,
                int(p.attached),
                _dumps({str(k): v for k, v in p.initial_fds.items()}),
            ),
        )
        return int(cur.lastrowid)

    @_writes
    def update_process(self, proc_id: int, p: ProcessSpan) -> None:
        """Rewrite the mutable fields of a process row."""
        self._tx()
        self.db.execute(
            "UPDATE processes SET comm=?, exe=?, argv=?, end_mono_ns=?, exit_code=?, "
            "exit_signal=? WHERE id=?",
            (
                _text(p.name),
                _text(p.exe),
                _dumps(p.argv),
                p.end_mono_ns,
                p.exit_code,
                p.exit_signal,
                proc_id,
            ),
        )

    @_writes
    def set_process_dist(self, proc_id: int, d: Any) -> None:
        """Record a process's rank (a renacerd.client.dist_env.DistInfo)."""
        self._tx()
        self.db.execute(
            f"UPDATE processes SET {', '.join(f'{c}=?' for c in DIST_COLUMNS)} WHERE id=?",
            (d.rank, d.local_rank, d.world_size, d.group_rank, d.local_world_size,
             _text(d.job_id), _text(d.host), d.source, proc_id),
        )

    @_writes
    def add_strings(self, run_id: int, items: Iterable[tuple[int, bytes]]) -> None:
        """Append to the run's string table."""
        self._tx()
        self.db.executemany(
            "INSERT INTO strings (run_id, id, s) VALUES (?,?,?)",
            [(run_id, i, s) for i, s in items],
        )

    @_writes
    def add_chunk(
        self, run_id: int, proc_id: int, cols: dict[str, np.ndarray], layer: str = "sys",
        layout: Any = None,
    ) -> int:
        """Store one columnar chunk; returns its size in bytes."""
        blob = encode(cols) if layout is None else encode(cols, layout)
        ts = cols["ts"]
        self._tx()
        self.db.execute(
            "INSERT INTO chunks (run_id, proc_id, layer, n, first_ts, last_ts, data) "
            "VALUES (?,?,?,?,?,?,?)",
            (run_id, proc_id, layer, len(ts), int(ts.min()), int(ts.max()), blob),
        )
        return len(blob)

    @_writes
    def add_encoded_chunk(self, run_id: int, proc_id: int, blob: bytes, n: int, first_ts: int,
                          last_ts: int, layer: str = "sys") -> None:
        """Store a chunk already encoded by columns.encode."""
        self._tx()
        self.db.execute(
            "INSERT INTO chunks (run_id, proc_id, layer, n, first_ts, last_ts, data) "
            "VALUES (?,?,?,?,?,?,?)",
            (run_id, proc_id, layer, n, first_ts, last_ts, blob),
        )

    @_writes
    def add_spans(self, run_id: int, records: Iterable[Any], proc_ids: dict[int, int]) -> None:
        """Persist SpanRecords (renacerd.client.span.SpanRecord)."""
        rows = []
        for r in records:
            rows.append(
                (
                    run_id,
                    proc_ids.get(r.process_id),
                    r.trace_id,
                    r.span_id,
                    r.parent_span_id,
                    r.span_name,
                    int(r.span_kind),
                    r.start_time_nanos,
                    r.end_time_nanos,
                    r.duration_nanos,
                    r.start_mono_nanos,
                    r.end_mono_nanos,
                    r.logical_clock,
                    int(r.status_code),
                    r.status_message,
                    r.attributes_json,
                    r.resource_json,
                    r.process_id,
                    r.thread_id,
                )
            )
        if not rows:
            return
        self._tx()
        self.db.executemany(
            "INSERT INTO spans VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
        )

    @_writes
    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set columns of a run row (counters, status, end times)."""
        if not fields:
            return
        for k in ("lost_per_cpu", "source_counters"):
            if k in fields and not isinstance(fields[k], str):
                fields[k] = orjson.dumps(fields[k]).decode()
        cols = ", ".join(f"{k}=?" for k in fields)
        self._tx()
        self.db.execute(f"UPDATE runs SET {cols} WHERE id=?", (*fields.values(), run_id))

    @_writes
    def forget_run(self, run_id: int, error: str) -> None:
        """Remove what a run recorded, keeping its row as 'incomplete' with `error`: the data
        of a run that must not have been traced."""
        self._tx()
        for table in ("chunks", "strings", "spans", "processes"):
            self.db.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
        self.db.execute("UPDATE runs SET status='incomplete', error=?, events=0, cmdline=NULL "
                        "WHERE id=?", (error, run_id))

    @_writes
    def write_aggregates(self, run_id: int, agg: Any) -> None:
        """Store a run's aggregates (store.aggregates.Aggregates), replacing earlier ones, in
        the open transaction (the caller commits: with the prune they belong to)."""
        self._tx()
        for table in AGGREGATE_TABLES[:3]:
            self.db.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
        rows = [(run_id, "process", i, _dumps(d)) for i, d in enumerate(agg.processes)]
        rows += [(run_id, "span", i, _dumps(d)) for i, d in enumerate(agg.spans)]
        rows.append((run_id, "effects", 0, _dumps(agg.final_effects())))
        self.db.executemany("INSERT INTO aggregates VALUES (?,?,?,?)", rows)
        ids = [pid for pid, _ in self.processes(run_id)]
        self.db.executemany(
            "INSERT INTO step_syscalls VALUES (?,?,?,?,?,?,?)",
            [(run_id, ids[pos], _text(step), name, calls, errs, ns)
             for pos, step, name, calls, errs, ns in agg.step_syscalls])
        self.db.executemany(
            "INSERT INTO step_files VALUES (?,?,?,?,?,?)",
            [(run_id, ids[pos], _text(step), _text(path), r, w)
             for pos, step, path, r, w in agg.step_files])

    def _has_table(self, name: str) -> bool:
        """Whether the file has the table (a store of an older schema opened to read may not)."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                               (name,)).fetchone() is not None

    def has_aggregates(self, run_id: int) -> bool:
        """Whether the run's aggregates are stored."""
        return self._has_table("aggregates") and self.db.execute(
            "SELECT 1 FROM aggregates WHERE run_id=? LIMIT 1", (run_id,)).fetchone() is not None

    def aggregates(self, run_id: int) -> dict[str, list[Any]] | None:
        """{"processes": [...], "spans": [...]} as stored (process and span order), or None."""
        if not self.has_aggregates(run_id):
            return None
        out: dict[str, list[Any]] = {"processes": [], "spans": []}
        for kind, data in self.db.execute(
                "SELECT kind, data FROM aggregates WHERE run_id=? AND kind IN "
                "('process', 'span') ORDER BY kind, idx", (run_id,)):
            out[f"{kind}es" if kind == "process" else f"{kind}s"].append(_loads(data, "{}"))
        return out

    def stored_effects(self, run_id: int) -> dict[str, int] | None:
        """The run's effects as its aggregates keep them (trace.effects.Effects.items()), or
        None (not pruned, or pruned before effects were kept)."""
        if not self._has_table("aggregates"):
            return None
        row = self.db.execute("SELECT data FROM aggregates WHERE run_id=? AND kind='effects'",
                              (run_id,)).fetchone()
        return None if row is None else _loads(row[0], "{}")

    def step_aggregates(self, run_id: int) -> dict[str, list[dict[str, Any]]]:
        """The run's per-step rows: {"syscalls": [...], "files": [...]} with the pid."""
        out: dict[str, list[dict[str, Any]]] = {"syscalls": [], "files": []}
        if not self._has_table("step_syscalls"):
            return out
        for pid, step, name, calls, errs, ns in self.db.execute(
                "SELECT p.pid, s.step, s.syscall, s.calls, s.errors, s.total_ns "
                "FROM step_syscalls s JOIN processes p ON p.id=s.proc_id WHERE s.run_id=? "
                "ORDER BY s.rowid", (run_id,)):
            out["syscalls"].append({"pid": pid, "step": _untext(step), "syscall": name,
                                    "calls": calls, "errors": errs, "total_ns": ns})
        for pid, step, path, r, w in self.db.execute(
                "SELECT p.pid, f.step, f.path, f.bytes_read, f.bytes_written "
                "FROM step_files f JOIN processes p ON p.id=f.proc_id WHERE f.run_id=? "
                "ORDER BY f.rowid", (run_id,)):
            out["files"].append({"pid": pid, "step": _untext(step), "path": _untext(path),
                                 "bytes_read": r, "bytes_written": w})
        return out

    def pruned_info(self, run_id: int) -> dict[str, Any] | None:
        """What retention dropped of the run, or None when it has all its events."""
        if not self._has_table("pruned"):
            return None
        row = self.db.execute(
            "SELECT at_wall_ns, reason, chunks, events, bytes, strings, partial, kept "
            "FROM pruned WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            return None
        return {"at_wall_ns": row[0], "reason": row[1], "chunks": row[2], "events": row[3],
                "bytes": row[4], "strings": row[5], "partial": bool(row[6]),
                "kept": _loads(row[7], "null")}

    def close(self) -> None:
        """Commit and close."""
        try:
            self.commit()
        finally:
            self.db.close()

    # -- reading ---------------------------------------------------------------------
    def _run_from_row(self, row: sqlite3.Row | tuple) -> RunInfo:
        d = dict(zip([c[0] for c in self._run_cols], row))
        stale = d["status"] == "running" and (
            d["boot_id"] != boot_id() or not _pid_alive(d["daemon_pid"])
        )
        return RunInfo(
            id=d["id"],
            name=_untext(d["name"]),
            host=d["host"],
            kernel=d["kernel"],
            cmdline=_loads(d["cmdline"], "[]"),
            version=d["version"],
            start_wall_ns=d["start_wall_ns"],
            end_wall_ns=d["end_wall_ns"],
            start_mono_ns=d["start_mono_ns"],
            end_mono_ns=d["end_mono_ns"],
            status="incomplete" if stale else d["status"],
            daemon_pid=d["daemon_pid"],
            owner_uid=d["owner_uid"],
            events=d["events"],
            events_lost=d["events_lost"],
            details_lost=d["details_lost"],
            failed_reads=d["failed_reads"],
            unmatched_exits=d["unmatched_exits"],
            client_dropped=d["client_dropped"],
            lost_per_cpu=orjson.loads(d["lost_per_cpu"] or "{}"),
            source_counters=orjson.loads(d.get("source_counters") or "{}"),
            syscall_table={int(k): v for k, v in orjson.loads(d["syscall_table"] or "{}").items()},
            exit_code=d["exit_code"],
            truncated=d.get("truncated") or 0,
            # A run read as stale before anyone marked it says what marking it would say.
            error=d["error"] or (STALE_ERROR if stale else None),
            pruned=self.pruned_info(d["id"]),
            flight=(lambda f: f.to_json() if f is not None else None)(
                self.flight_info(d["id"])),
        )

    @property
    def _run_cols(self) -> list[tuple]:
        return self.db.execute("SELECT * FROM runs LIMIT 0").description

    def runs(self) -> list[RunInfo]:
        """Every run, oldest first."""
        return [self._run_from_row(r) for r in self.db.execute("SELECT * FROM runs ORDER BY id")]

    def run(self, name: str) -> RunInfo:
        """The run called `name`."""
        row = self.db.execute("SELECT * FROM runs WHERE name=?", (_text(name),)).fetchone()
        if row is None:
            raise UnknownRunError(f"no run named '{escape(name)}' in {self.path}")
        return self._run_from_row(row)

    def processes(self, run_id: int) -> list[tuple[int, ProcessSpan]]:
        """(proc_id, ProcessSpan) for every process of a run, in order of appearance."""
        out = []
        have = {r[1] for r in self.db.execute("PRAGMA table_info(processes)")}
        dist = ", ".join(c if c in have else "NULL" for c in DIST_COLUMNS)
        for row in self.db.execute(
            "SELECT id, pid, ppid, nspid, comm, exe, argv, start_mono_ns, end_mono_ns, "
            f"exit_code, exit_signal, attached, initial_fds, {dist} FROM processes "
            "WHERE run_id=? ORDER BY id",
            (run_id,),
        ):
            fds = _loads(row[12], "{}")
            out.append(
                (
                    row[0],
                    ProcessSpan(
                        pid=row[1],
                        ppid=row[2] or 0,
                        nspid=row[3],
                        name=_untext(row[4]) or "",
                        exe=_untext(row[5]) or "",
                        argv=_loads(row[6], "[]"),
                        start_mono_ns=row[7] or 0,
                        end_mono_ns=row[8],
                        exit_code=row[9],
                        exit_signal=row[10],
                        attached=bool(row[11]),
                        initial_fds={int(k): v for k, v in fds.items()},
                        dist=_dist(row[13:]),
                    ),
                )
            )
        return out

    def strings(self, run_id: int) -> list[bytes]:
        """The run's string table, indexed by id."""
        rows = self.db.execute(
            "SELECT id, s FROM strings WHERE run_id=? ORDER BY id", (run_id,)
        ).fetchall()
        out: list[bytes] = [b""] * (rows[-1][0] + 1 if rows else 0)
        for i, s in rows:
            out[i] = bytes(s)
        return out

    def span_records(self, run_id: int) -> list[Any]:
        """The run's SpanRecords, ordered by start."""
        q = "SELECT 1 FROM spans WHERE run_id=? LIMIT 1"
        if self.db.execute(q, (run_id,)).fetchone() is None:
            return []
        from renacerd.client.span import SPAN_FIELDS, SpanRecord

        # The row as SpanRecord.from_row would read it (ids are BLOBs, empty attribute or
        # resource text is none), built by position: a run of a long job has 100,000s.
        cols = [f"NULLIF({k}, '')" if k in ("attributes_json", "resource_json") else k
                for k in SPAN_FIELDS]
        return [SpanRecord(*row) for row in self.db.execute(
            f"SELECT {', '.join(cols)} FROM spans WHERE run_id=? "
            "ORDER BY start_mono_nanos, rowid", (run_id,))]

    def columns(self, run_id: int, proc_id: int, layer: str = "sys", layout: Any = None):
        """One layer of one process, decoded into numpy columns sorted by ts."""
        layout = SYSCALL_COLUMNS if layout is None else layout
        rows = self.db.execute(
            "SELECT n, first_ts, last_ts, data FROM chunks WHERE run_id=? AND proc_id=? "
            "AND layer=? ORDER BY id",
            (run_id, proc_id, layer),
        ).fetchall()
        return self.decode_chunks(rows, layout, layer != "sys")

    def decode_chunks(self, rows: list[tuple], layout: Any, resort: bool = False):
        """Chunk rows (n, first_ts, last_ts, data) of one process, in id order, decoded into
        one set of columns sorted by ts (`resort`: their order is not known to be so)."""
        total = sum(r[0] for r in rows)
        cols = {name: np.empty(total, dtype=dt) for name, dt in layout}
        pos = 0
        for n, _, _, blob in rows:
            pos += self._decode_chunk(n, blob, cols, pos, layout)
        # Chunks are sorted inside; only overlapping chunks can leave the whole out of order.
        overlap = any(rows[i][1] < rows[i - 1][2] for i in range(1, len(rows)))
        if overlap or resort:
            ts = cols["ts"]
            if len(ts) > 1 and (np.diff(ts.view(np.int64)) < 0).any():
                order = np.argsort(ts, kind="stable")
                cols = {k: v[order] for k, v in cols.items()}
        return cols

    def _decode_chunk(self, n: int, blob: bytes, cols: dict[str, np.ndarray], pos: int,
                      layout: Any, subset: bool = False) -> int:
        """One chunk row's events decoded into cols[...][pos:]; a bad chunk is a StoreError."""
        try:
            if chunk_len(blob) != n:
                raise ChunkError(f"chunk says {chunk_len(blob)} events, its row {n}")
            return decode_into(blob, cols, pos, layout, subset)
        except ChunkError as e:
            raise StoreError(f"{self.path}: {e}") from e

    def chunk_index(self, run_id: int, proc_id: int, layer: str = "sys"
                    ) -> list[tuple[int, int, int, int]]:
        """(id, events, first ts, last ts) of one process's chunks of a layer, in id order."""
        with self._reads:
            return self.db.execute(
                "SELECT id, n, first_ts, last_ts FROM chunks WHERE run_id=? AND proc_id=? "
                "AND layer=? ORDER BY id", (run_id, proc_id, layer)).fetchall()

    def stored_chunks(self, index: list[tuple[int, int, int, int]], batch: int = 16
                      ) -> Iterator[StoredChunk]:
        """The syscall chunks of `index` (chunk_index rows) one at a time, in its order, each
        still encoded: a process's events streamed, never all in memory. Safe from several
        threads."""
        for at in range(0, len(index), batch):
            part = index[at:at + batch]
            marks = ",".join("?" * len(part))
            with self._reads:
                blobs = dict(self.db.execute(
                    f"SELECT id, data FROM chunks WHERE id IN ({marks})",
                    [r[0] for r in part]).fetchall())
            for cid, n, _, _ in part:
                yield StoredChunk(self, n, blobs.pop(cid))

    def _trace(self, run: RunInfo, proc_id: int, p: ProcessSpan, strings: list[bytes],
               spans: list[Any]) -> UnifiedTrace:
        t = UnifiedTrace(p.pid, p.name)
        t.process = p
        t.run = run.name
        t.columns = self.columns(run.id, proc_id)
        t.strings = strings
        if run.syscall_table:
            t.table = run.syscall_table
        t.spans = spans
        from renacerd.trace.gpu_trace import load_gpu

        t.gpu = load_gpu(self, run.id, proc_id, strings)
        return t

    def load_run(self, run: str) -> list[UnifiedTrace]:
        """Every process of the run, each as a UnifiedTrace, in order of appearance, its
        events tagged with the innermost experiment span active at their timestamp."""
        info = self.run(run)
        strings = self.strings(info.id)
        spans = self.span_records(info.id)
        traces = [
            self._trace(info, pid_, p, strings, spans)
            for pid_, p in self.processes(info.id)
        ]
        tag_spans(traces)
        return traces

    def query_by_attribute(self, key: str, run: str) -> dict[str, list[tuple[Any, dict]]]:
        """Spans of a run grouped by one attribute's value (e.g. experiment.step), each with
        a summary of the events tagged with it: {value: [(SpanRecord, summary), ...]}."""
        traces = self.load_run(run)
        spans = traces[0].spans if traces else []
        summaries = span_summaries(traces)
        out: dict[str, list[tuple[Any, dict]]] = {}
        for i, sp in enumerate(spans):
            attrs = sp.attributes()
            if key in attrs:
                out.setdefault(str(attrs[key]), []).append((sp, summaries[i]))
        return out

    def load_trace(self, run: str, pid: int) -> UnifiedTrace:
        """One process of a run (spans tagged as in load_run)."""
        for t in self.load_run(run):
            if t.pid == pid:
                return t
        raise StoreError(f"run {run!r} has no process {pid}")


@dataclass(slots=True)
class StoredChunk:
    """One encoded syscall chunk, decoded a few columns at a time."""

    store: Store
    n: int
    blob: bytes

    def columns(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The named columns only (the chunk's others are not decompressed)."""
        want = set(names)
        layout = tuple((name, dt) for name, dt in SYSCALL_COLUMNS if name in want)
        cols = {name: np.empty(self.n, dtype=dt) for name, dt in layout}
        self.store._decode_chunk(self.n, self.blob, cols, 0, layout, True)
        return cols


def tag_spans(traces: list[UnifiedTrace]) -> None:
    """Set each trace's span_index: the innermost span of its own process or of an ancestor
    active at each event, or -1 (renacerd.trace.span_tagging.tag_events)."""
    from renacerd.trace.span_tagging import SpanTable, ancestry, tag_events

    if not traces:
        return
    table = SpanTable.of(traces[0].spans)
    ppid = {t.pid: t.process.ppid for t in traces}
    for t in traces:
        chain = ancestry(t.pid, ppid)
        t.span_index = tag_events(t.columns["ts"], table, chain)
        gcols = (t.gpu or {}).get("columns")
        if gcols is not None:
            t.gpu["span_index"] = tag_events(gcols["ts"], table, chain)


def span_summaries(traces: list[UnifiedTrace]) -> list[dict[str, Any]]:
    """Per span of the run: syscall count, time in syscalls, bytes read/written, calls by
    name, over its self events (span_tagging.self_events) in every process."""
    from renacerd.trace.unified_trace import READ_FAMILY, WRITE_FAMILY

    n = len(traces[0].spans) if traces else 0
    out = [{"syscalls": 0, "syscall_ns": 0, "bytes_read": 0, "bytes_written": 0, "calls": {}}
           for _ in range(n)]
    from renacerd.trace.gpu_trace import summarize

    for t in traces:
        gsi = (t.gpu or {}).get("span_index")
        if gsi is not None and (gsi >= 0).any():
            for j in np.unique(gsi[gsi >= 0]):
                g = summarize(t.gpu["columns"], t.gpu.get("strings", t.strings), gsi == j)
                o = out[int(j)].setdefault("gpu", {"launches": 0, "h2d_bytes": 0,
                                                   "d2h_bytes": 0, "d2d_bytes": 0})
                o["launches"] += sum(g["kernels"].values())
                for k in ("h2d_bytes", "d2h_bytes", "d2d_bytes"):
                    o[k] += g["memcpy"][k]
        if not len(t) or not (t.span_index >= 0).any():
            continue
        c = t.columns
        sel = t.span_index >= 0
        si, nr = t.span_index[sel], c["nr"][sel].astype(np.int64)
        ret, dur = c["ret"][sel], c["dur"][sel]
        rd = np.isin(nr, [k for k, v in t.table.items() if v in READ_FAMILY]) & (ret > 0)
        wr = np.isin(nr, [k for k, v in t.table.items() if v in WRITE_FAMILY]) & (ret > 0)
        for j in np.unique(si):
            m = si == j
            o = out[int(j)]
            o["syscalls"] += int(m.sum())
            o["syscall_ns"] += int(dur[m].sum())
            o["bytes_read"] += int(ret[m & rd].sum())
            o["bytes_written"] += int(ret[m & wr].sum())
            names, counts = np.unique(nr[m], return_counts=True)
            for k, cnt in zip(names, counts):
                name = t.table.get(int(k), f"syscall_{int(k)}")
                o["calls"][name] = o["calls"].get(name, 0) + int(cnt)
    return out
