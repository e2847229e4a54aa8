"""ClickHouse sink: a thread tailing the local store into ClickHouse over HTTP (Native format).

Exactly once per event: a batch is a range of the store's chunk ids (syscall events into
`events`, the GPU layer's calls into `gpu_calls`); the range is recorded as pending in
`sink_progress` before it is sent and acknowledged after the server answers. A pending range
found on restart (or after a failed try) is counted on the server, per table, before anything
is re-sent: all rows there -> not again, none -> send again. Each table's part of a batch is
one Native block inside one partition, which ClickHouse writes as one part, so it is never
half there.
Runs, processes, strings and spans are ReplacingMergeTree rows keyed by identity: re-sending
them is harmless (read them with FINAL).
"""

from __future__ import annotations

import functools
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson

from renacerd.columns import SYSCALL_COLUMNS, decode
from renacerd.cuda.hooks import HOOKS
from renacerd.cuda.records import GPU_LAYOUT
from renacerd.escaping import json_text
from renacerd.sinks import (
    Backoff,
    Position,
    Progress,
    SinkError,
    StoredSpan,
    StoreTailer,
    ready_spans,
    ready_summaries,
)
from renacerd.store.database import DIST_COLUMNS, RunInfo, Store
from renacerd.trace.fdtrack import FdState, process_files
from renacerd.trace.unified_trace import UnifiedTrace

DEFAULT_PORT = 8123
BATCH_ROWS = 262_144  # well under max_insert_block_size (1,048,576): one block, one part
# The store layers a batch carries (one chunk id sequence), and the table each goes to (and
# the SinkStats counter of its rows).
LAYER_TABLES = (("sys", "events"), ("gpu", "gpu_calls"))
BATCH_LAYERS = tuple(layer for layer, _ in LAYER_TABLES)
LAYOUTS = {"sys": SYSCALL_COLUMNS, "gpu": GPU_LAYOUT}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DAY_NS = 86_400 * 10**9


# -- URLs ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Target:
    """Where a sink writes: one database of one server (and, for a source, one run)."""

    host: str
    port: int
    database: str
    run: str | None = None
    run_host: str | None = None

    @property
    def key(self) -> str:
        """The sink's name in `sink_progress`."""
        return f"clickhouse://{self.host}:{self.port}/{self.database}"

    @property
    def base(self) -> str:
        """HTTP base URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def parse_url(url: str, *, with_run: bool = False) -> Target:
    """clickhouse://HOST[:PORT]/DATABASE (with_run: .../DATABASE/RUN[?host=HOSTNAME])."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "clickhouse" or not u.hostname:
        form = "clickhouse://HOST:8123/DATABASE" + ("/RUN" if with_run else "")
        raise SinkError(f"not a ClickHouse URL: {url!r} (expected {form})")
    try:
        port = u.port or DEFAULT_PORT
    except ValueError:
        raise SinkError(f"bad port in {url!r}") from None
    parts = [urllib.parse.unquote(p) for p in u.path.split("/")[1:]]
    if parts and parts[-1] == "" and not with_run:
        parts = parts[:-1]
    want = 2 if with_run else 1
    if len(parts) != want or not all(parts):
        what = "a database and a run name" if with_run else "a database name"
        raise SinkError(f"{url!r} needs {what} in its path")
    if not _IDENT.match(parts[0]):
        raise SinkError(f"bad ClickHouse database name {parts[0]!r}")
    q = urllib.parse.parse_qs(u.query)
    return Target(u.hostname, port, parts[0], parts[1] if with_run else None,
                  (q.get("host") or [None])[0])


def quote(s: str) -> str:
    """A ClickHouse string literal (of the name as _b sends it)."""
    return "'" + json_text(s).replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- Native format ------------------------------------------------------------------------
_NUM = {
    "UInt8": "<u1", "UInt16": "<u2", "UInt32": "<u4", "UInt64": "<u8",
    "Int8": "<i1", "Int16": "<i2", "Int32": "<i4", "Int64": "<i8",
    "Float32": "<f4", "Float64": "<f8", "Date": "<u2",
}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _b(v: Any) -> bytes:
    """A String value: bytes (the string table's paths) as they are, text as UTF-8, a byte
    of a name that is not UTF-8 as \\xNN (renacerd.escaping), so every reader gets text."""
    return v if isinstance(v, bytes) else json_text(str(v)).encode()


def encode_column(ctype: str, values: Any) -> bytes:
    """One column's data in Native layout."""
    if ctype in _NUM:
        return np.ascontiguousarray(values, dtype=_NUM[ctype]).tobytes()
    if ctype == "String":
        return b"".join(_varint(len(b)) + b for b in map(_b, values))
    if ctype.startswith("Nullable("):
        inner = ctype[9:-1]
        nulls = bytes(v is None for v in values)
        zero = 0 if inner in _NUM else ""
        return nulls + encode_column(inner, [zero if v is None else v for v in values])
    if ctype.startswith("Array("):
        inner = ctype[6:-1]
        offsets = np.cumsum([len(v) for v in values], dtype=np.uint64)
        flat = [x for v in values for x in v]
        return offsets.tobytes() + encode_column(inner, flat)
    raise ValueError(f"unsupported column type {ctype}")


def native_block(columns: list[tuple[str, str, Any]], n: int) -> bytes:
    """A Native block: (name, type, values or pre-encoded bytes) per column, n rows each."""
    parts = [_varint(len(columns)), _varint(n)]
    for name, ctype, values in columns:
        parts += [_varint(len(name)), name.encode(), _varint(len(ctype)), ctype.encode()]
        parts.append(values if isinstance(values, (bytes, bytearray)) else
                     encode_column(ctype, values))
    return b"".join(parts)


def const_string(s: str | bytes, n: int) -> bytes:
    """A String column holding the same value n times (run and host in every event row)."""
    b = _b(s)
    return (_varint(len(b)) + b) * n


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.mv = memoryview(buf)
        self.off = 0

    def varint(self) -> int:
        n = shift = 0
        while True:
            b = self.mv[self.off]
            self.off += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7

    def take(self, k: int) -> memoryview:
        v = self.mv[self.off : self.off + k]
        if len(v) != k:
            raise SinkError("truncated Native block from ClickHouse")
        self.off += k
        return v

    def column(self, ctype: str, n: int) -> Any:
        if ctype in _NUM:
            dt = np.dtype(_NUM[ctype])
            return np.frombuffer(self.take(n * dt.itemsize), dtype=dt).copy()
        if ctype == "String" or ctype.startswith("FixedString("):
            if ctype != "String":
                w = int(ctype[12:-1])
                return [bytes(self.take(w)) for _ in range(n)]
            return [bytes(self.take(self.varint())) for _ in range(n)]
        if ctype.startswith("Nullable("):
            nulls = bytes(self.take(n))
            vals = self.column(ctype[9:-1], n)
            return [None if z else (v.item() if hasattr(v, "item") else v)
                    for z, v in zip(nulls, vals)]
        if ctype.startswith("Array("):
            offs = np.frombuffer(self.take(8 * n), dtype="<u8")
            flat = self.column(ctype[6:-1], int(offs[-1]) if n else 0)
            starts = np.concatenate([[0], offs[:-1]]).astype(np.int64)
            return [flat[int(a) : int(b)] for a, b in zip(starts, offs)]
        raise SinkError(f"unsupported ClickHouse type {ctype} in a result")


def read_native(buf: bytes) -> dict[str, Any]:
    """Decode a Native result (any number of blocks) into one value list/array per column."""
    r = _Reader(buf)
    out: dict[str, list[Any]] = {}
    types: dict[str, str] = {}
    while r.off < len(buf):
        ncols, nrows = r.varint(), r.varint()
        for _ in range(ncols):
            name = bytes(r.take(r.varint())).decode()
            ctype = bytes(r.take(r.varint())).decode()
            types[name] = ctype
            out.setdefault(name, []).append(r.column(ctype, nrows))
    res: dict[str, Any] = {}
    for name, blocks in out.items():
        if types[name] in _NUM:
            res[name] = np.concatenate(blocks)
        else:
            res[name] = [x for b in blocks for x in b]
    return res


# -- HTTP ---------------------------------------------------------------------------------
class ClickHouseClient:
    """The HTTP interface (port 8123) of one server, bound to one database."""

    def __init__(self, target: Target, timeout_s: float = 30.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.bytes_sent = 0

    def query(self, sql: str, body: bytes | None = None, *, database: bool = True,
              settings: dict[str, Any] | None = None) -> bytes:
        """Run `sql` (with `body` as INSERT data); returns the raw response."""
        params: dict[str, Any] = dict(settings or {})
        if database:
            params["database"] = self.target.database
        if body is None:
            data = sql.encode()
        else:
            params["query"] = sql
            data = body
        url = self.target.base + "?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, data=data, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                out = resp.read()
        except urllib.error.HTTPError as e:
            msg = e.read().decode("utf-8", "replace").strip().splitlines()
            raise SinkError(f"ClickHouse {self.target.host}:{self.target.port}: "
                            f"{msg[0] if msg else e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise SinkError(f"cannot reach ClickHouse at {self.target.host}:{self.target.port}"
                            f": {reason}") from None
        self.bytes_sent += len(data)
        return out

    def insert(self, table: str, columns: list[tuple[str, str, Any]], n: int) -> None:
        """INSERT one Native block."""
        names = ", ".join(f"`{c[0]}`" for c in columns)
        self.query(f"INSERT INTO {table} ({names}) FORMAT Native", native_block(columns, n))

    def rows(self, sql: str) -> list[dict[str, Any]]:
        """A SELECT as dicts (JSONEachRow: numbers stay numbers)."""
        out = self.query(sql + " FORMAT JSONEachRow",
                         settings={"output_format_json_quote_64bit_integers": 0})
        return [orjson.loads(line) for line in out.splitlines() if line]

    def native(self, sql: str) -> dict[str, Any]:
        """A SELECT as columns (Native: numeric columns arrive as numpy arrays)."""
        return read_native(self.query(sql + " FORMAT Native"))

    def scalar(self, sql: str) -> str:
        """The single value of a SELECT, as text."""
        return self.query(sql + " FORMAT TSV").decode().strip()


# -- schema -------------------------------------------------------------------------------
# ClickHouse 18.16 (Debian 12): no DateTime64, LowCardinality is experimental, no codecs, no
# JSON type. Times are Int64/UInt64 nanoseconds; `day` (the run's UTC start date) is the
# partition key, so one batch (one run) always lands in one partition.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runs (
    run String, host String, day Date, kernel String, boot_id String,
    cmdline Array(String), version String, status String,
    start_wall_ns Int64, end_wall_ns Nullable(Int64),
    start_mono_ns Int64, end_mono_ns Nullable(Int64),
    daemon_pid UInt32, owner_uid UInt32,
    events UInt64, events_lost UInt64, details_lost UInt64, failed_reads UInt64,
    unmatched_exits UInt64, client_dropped UInt64, lost_per_cpu String,
    source_counters String,
    syscall_table Nested(nr UInt16, name String),
    exit_code Nullable(Int32), error String, pushed_ns UInt64
) ENGINE = ReplacingMergeTree(pushed_ns) PARTITION BY toYYYYMM(day) ORDER BY (run, host)""",
    """CREATE TABLE IF NOT EXISTS processes (
    run String, host String, day Date, proc UInt32, pid UInt32, ppid UInt32,
    nspid Nullable(UInt32), comm String, exe String, argv Array(String),
    start_mono_ns Int64, end_mono_ns Nullable(Int64),
    exit_code Nullable(Int32), exit_signal Nullable(Int32), attached UInt8,
    initial_fds Nested(fd Int32, path String), pushed_ns UInt64,
    rank Nullable(UInt32), local_rank Nullable(UInt32), world_size Nullable(UInt32),
    group_rank Nullable(UInt32), local_world_size Nullable(UInt32),
    job_id Nullable(String), rank_host Nullable(String), rank_source Nullable(String)
) ENGINE = ReplacingMergeTree(pushed_ns) PARTITION BY toYYYYMM(day)
  ORDER BY (run, host, pid, proc)""",
    """CREATE TABLE IF NOT EXISTS events (
    day Date, run String, host String, pid UInt32, proc UInt32, chunk UInt64, dup UInt32,
    ts Int64, dur UInt64, ret Int64, a0 UInt64, tid UInt32, nr UInt16, syscall String,
    flags UInt16, s0 Int32, s1 Int32, aux UInt32, mode UInt32, file String
) ENGINE = MergeTree PARTITION BY toYYYYMM(day) ORDER BY (run, host, pid, ts)""",
    """CREATE TABLE IF NOT EXISTS gpu_calls (
    day Date, run String, host String, pid UInt32, proc UInt32, chunk UInt64, dup UInt32,
    ts Int64, dur UInt64, ret Int64, tid UInt32, fn String, flags UInt16,
    a0 UInt64, a1 UInt64, a2 UInt64, a3 UInt64, a4 UInt64,
    gx UInt32, gy UInt32, gz UInt32, bx UInt32, by UInt32, bz UInt32, kernel String
) ENGINE = MergeTree PARTITION BY toYYYYMM(day) ORDER BY (run, host, pid, ts)""",

    """CREATE TABLE IF NOT EXISTS strings (
    run String, host String, day Date, id UInt32, s String, pushed_ns UInt64
) ENGINE = ReplacingMergeTree(pushed_ns) PARTITION BY toYYYYMM(day) ORDER BY (run, host, id)""",
    """CREATE TABLE IF NOT EXISTS spans (
    run String, host String, day Date,
    trace_id String, span_id String, parent_span_id String, span_name String,
    span_kind UInt8, start_time_nanos UInt64, end_time_nanos UInt64, duration_nanos UInt64,
    start_mono_nanos Int64, end_mono_nanos Int64, logical_clock UInt64,
    status_code UInt8, status_message String,
    attributes Nested(key String, value String), resource Nested(key String, value String),
    attributes_json String, resource_json String,
    process_id UInt32, thread_id UInt32, proc UInt32, store_rowid UInt64,
    model String, epoch Nullable(UInt32), step Nullable(UInt64), loss Nullable(Float64),
    syscalls UInt64, syscall_ns UInt64, syscall_errors UInt64,
    bytes_read UInt64, bytes_written UInt64,
    top Nested(syscall String, calls UInt64, ns UInt64),
    pushed_ns UInt64
) ENGINE = ReplacingMergeTree(pushed_ns) PARTITION BY toYYYYMM(day)
  ORDER BY (run, host, process_id, start_mono_nanos, span_id)""",
)


# Columns added to tables after their first release, for databases made before them: 18.16
# has no ADD COLUMN IF NOT EXISTS, so system.columns says which are missing. Rows written
# before read the defaults (0, '', NULL: no rank).
ADDED_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "events": (("aux", "UInt32"), ("mode", "UInt32"), ("file", "String")),
    "processes": (("rank", "Nullable(UInt32)"), ("local_rank", "Nullable(UInt32)"),
                  ("world_size", "Nullable(UInt32)"), ("group_rank", "Nullable(UInt32)"),
                  ("local_world_size", "Nullable(UInt32)"), ("job_id", "Nullable(String)"),
                  ("rank_host", "Nullable(String)"), ("rank_source", "Nullable(String)")),
}


def ensure_schema(client: ClickHouseClient) -> None:
    """Create the database and tables if missing; add the columns an older schema lacks."""
    client.query(f"CREATE DATABASE IF NOT EXISTS `{client.target.database}`", database=False)
    for ddl in SCHEMA:
        client.query(ddl)
    have: dict[str, set[str]] = {}
    for r in client.rows(
            "SELECT table, name FROM system.columns WHERE database = currentDatabase() "
            "AND table IN ('events', 'processes')"):
        have.setdefault(r["table"], set()).add(r["name"])
    for table, cols in ADDED_COLUMNS.items():
        for name, ctype in cols:
            if name not in have.get(table, set()):
                client.query(f"ALTER TABLE {table} ADD COLUMN {name} {ctype}")


# -- the sink -----------------------------------------------------------------------------
@dataclass(slots=True)
class SinkStats:
    """What a sink has done since it started."""

    events: int = 0
    gpu_calls: int = 0
    batches: int = 0
    strings: int = 0
    spans: int = 0
    processes: int = 0
    runs: int = 0
    bytes_sent: int = 0
    retries: int = 0
    errors: int = 0
    verified: int = 0  # pending batches found already on the server (not re-sent)
    last_error: str | None = None
    runs_done: int = 0


def _str(v: Any) -> str:
    return v if isinstance(v, str) else orjson.dumps(v).decode()


def _hex(b: bytes | None) -> str:
    return bytes(b).hex() if b is not None else ""


def _kv(js: str | None) -> tuple[list[str], list[str]]:
    try:
        d = orjson.loads(js) if js else {}
    except orjson.JSONDecodeError:
        d = {}
    if not isinstance(d, dict):
        return [], []
    return list(d), [_str(v) for v in d.values()]


def _num(v: str | None, kind: type) -> Any:
    if v is None:
        return None
    try:
        x = kind(float(v)) if kind is int else kind(v)
    except (TypeError, ValueError):
        return None
    return x if kind is not int or x >= 0 else None


def _dups(ts: np.ndarray) -> np.ndarray:
    """Per event, how many earlier events of its chunk share its ts (almost always 0).

    ORDER BY ts, chunk, dup then restores the store's order exactly, and unlike a position
    column (4 bytes an event, since 18.16 has no delta codec) it compresses to nothing.
    """
    order = np.argsort(ts, kind="stable")
    st = ts[order]
    starts = np.flatnonzero(np.concatenate(([True], st[1:] != st[:-1])))
    group_start = np.repeat(starts, np.diff(np.append(starts, len(st))))
    out = np.empty(len(ts), dtype=np.uint32)
    out[order] = np.arange(len(st)) - group_start
    return out


@functools.cache
def _fn_lut() -> np.ndarray:
    """GPU fn id -> its hook's symbol already encoded as a Native String value."""
    names = [""] + [h.symbol for h in HOOKS]
    names += [f"fn_{i}" for i in range(len(names), 65536)]  # an id this table lacks
    return np.array([_varint(len(b)) + b for b in (s.encode() for s in names)], dtype=object)


class ClickHouseSink(StoreTailer):
    """Tails the store at `store_path` into ClickHouse at `url` (one run, or all of them)."""

    _thread_name = "renacer-clickhouse"

    def __init__(self, store_path: str, url: str, run: str | None = None, *,
                 poll_s: float = 1.0, batch_rows: int = BATCH_ROWS,
                 timeout_s: float = 30.0, backoff: Backoff | None = None) -> None:
        super().__init__(store_path, run, poll_s, backoff)
        self.target = parse_url(url)
        self.batch_rows = batch_rows
        self.timeout_s = timeout_s
        self.client = ClickHouseClient(self.target, timeout_s)
        self._progress_key = self.target.key
        self._stats = SinkStats()
        self._schema_ok = False
        self._sent_rows: dict[tuple[str, int, int], tuple] = {}
        self._span_seen: dict[tuple[int, int], float] = {}
        self._luts: dict[int, np.ndarray] = {}
        # (run id, proc id) -> its fd table after the last chunk sent, files as bytes
        self._fds: dict[tuple[int, int], tuple[dict[int, bytes | None], set[int]] | None] = {}

    @property
    def stats(self) -> SinkStats:
        """A snapshot of the counters."""
        s = replace(self._stats)
        s.bytes_sent = self.client.bytes_sent
        return s

    def _poll(self) -> bool:
        """One pass over the runs; True when nothing was left to send."""
        store, progress = self._open()
        if not self._schema_ok:
            ensure_schema(self.client)
            self._schema_ok = True
        runs = [store.run(self.run)] if self.run else store.runs()
        idle = True
        for info in runs:
            pos = progress.get(info.id)
            if pos.done:
                continue
            idle &= self._push_run(store, progress, info, pos)
        return idle

    def _changed(self, kind: str, run_id: int, key: int, row: tuple) -> bool:
        return self._sent_rows.get((kind, run_id, key)) != row

    def _push_run(self, store: Store, progress: Progress, info: RunInfo, pos: Position) -> bool:
        idle = True
        day = (info.start_wall_ns or 0) // _DAY_NS
        host = info.host or ""
        # the run row goes first so a reader sees the run before its events
        run_row = self._run_tuple(info)
        if self._changed("run", info.id, 0, run_row):
            self._send_run(info, day)
            self._sent_rows[("run", info.id, 0)] = run_row
            idle = False
        procs = store.processes(info.id)
        pids = {proc_id: p.pid for proc_id, p in procs}
        changed = [(i, p) for i, p in procs
                   if self._changed("proc", info.id, i, self._proc_tuple(p))]
        if changed:
            self._send_processes(info, host, day, changed)
            for i, p in changed:
                self._sent_rows[("proc", info.id, i)] = self._proc_tuple(p)
            idle = False
        rows = store.strings_after(info.id, pos.string_id)
        if rows:
            self._send_strings(info, host, day, rows)
            pos.string_id = rows[-1][0]
            progress.set(info.id, pos)
            idle = False
        idle &= self._push_events(store, progress, info, host, day, pids, pos, dict(procs))
        idle &= self._push_spans(store, progress, info, host, day, procs, pos)
        # A last look: rows committed between the reads above and the status read.
        if (idle and info.status != "running"
                and store.last_chunk_id(info.id, BATCH_LAYERS) <= pos.chunk_id):
            pos.done = True
            progress.set(info.id, pos)
            self._stats.runs_done += 1
        return idle

    # -- rows -----------------------------------------------------------------------------
    @staticmethod
    def _run_tuple(info: RunInfo) -> tuple:
        return (info.status, info.end_wall_ns, info.end_mono_ns, info.events, info.events_lost,
                info.details_lost, info.failed_reads, info.unmatched_exits,
                info.client_dropped, info.exit_code, info.error,
                orjson.dumps(getattr(info, "source_counters", {}) or {}))

    @staticmethod
    def _proc_tuple(p: Any) -> tuple:
        return (p.name, p.exe, tuple(p.argv), p.end_mono_ns, p.exit_code, p.exit_signal,
                p.dist)

    def _send_run(self, info: RunInfo, day: int) -> None:
        table = sorted(info.syscall_table.items())
        cols = [
            ("run", "String", [info.name]), ("host", "String", [info.host or ""]),
            ("day", "Date", [day]), ("kernel", "String", [info.kernel or ""]),
            ("boot_id", "String", [""]),
            ("cmdline", "Array(String)", [info.cmdline]),
            ("version", "String", [info.version or ""]), ("status", "String", [info.status]),
            ("start_wall_ns", "Int64", [info.start_wall_ns or 0]),
            ("end_wall_ns", "Nullable(Int64)", [info.end_wall_ns]),
            ("start_mono_ns", "Int64", [info.start_mono_ns or 0]),
            ("end_mono_ns", "Nullable(Int64)", [info.end_mono_ns]),
            ("daemon_pid", "UInt32", [info.daemon_pid or 0]),
            ("owner_uid", "UInt32", [info.owner_uid or 0]),
            ("events", "UInt64", [info.events]), ("events_lost", "UInt64", [info.events_lost]),
            ("details_lost", "UInt64", [info.details_lost]),
            ("failed_reads", "UInt64", [info.failed_reads]),
            ("unmatched_exits", "UInt64", [info.unmatched_exits]),
            ("client_dropped", "UInt64", [info.client_dropped]),
            ("lost_per_cpu", "String", [orjson.dumps(info.lost_per_cpu)]),
            ("source_counters", "String",
             [orjson.dumps(getattr(info, "source_counters", {}) or {})]),
            ("syscall_table.nr", "Array(UInt16)", [[k for k, _ in table]]),
            ("syscall_table.name", "Array(String)", [[v for _, v in table]]),
            ("exit_code", "Nullable(Int32)", [info.exit_code]),
            ("error", "String", [info.error or ""]),
            ("pushed_ns", "UInt64", [time.time_ns()]),
        ]
        self.client.insert("runs", cols, 1)
        self._stats.runs += 1

    def _send_processes(self, info: RunInfo, host: str, day: int, procs: list) -> None:
        n = len(procs)
        ps = [p for _, p in procs]
        fds = [sorted(p.initial_fds.items()) for p in ps]
        cols = [
            ("run", "String", const_string(info.name, n)), ("host", "String", [host] * n),
            ("day", "Date", [day] * n), ("proc", "UInt32", [i for i, _ in procs]),
            ("pid", "UInt32", [p.pid for p in ps]), ("ppid", "UInt32", [p.ppid for p in ps]),
            ("nspid", "Nullable(UInt32)", [p.nspid for p in ps]),
            ("comm", "String", [p.name for p in ps]), ("exe", "String", [p.exe for p in ps]),
            ("argv", "Array(String)", [p.argv for p in ps]),
            ("start_mono_ns", "Int64", [p.start_mono_ns for p in ps]),
            ("end_mono_ns", "Nullable(Int64)", [p.end_mono_ns for p in ps]),
            ("exit_code", "Nullable(Int32)", [p.exit_code for p in ps]),
            ("exit_signal", "Nullable(Int32)", [p.exit_signal for p in ps]),
            ("attached", "UInt8", [int(p.attached) for p in ps]),
            ("initial_fds.fd", "Array(Int32)", [[k for k, _ in f] for f in fds]),
            ("initial_fds.path", "Array(String)", [[v for _, v in f] for f in fds]),
            ("pushed_ns", "UInt64", [time.time_ns()] * n),
        ]
        dist = [p.dist for p in ps]  # the rank the store keeps (the exec-time environment)
        for name in DIST_COLUMNS:
            ctype = dict(ADDED_COLUMNS["processes"])[name]
            attr = {"rank_host": "host", "rank_source": "source"}.get(name, name)
            cols.append((name, ctype, [None if d is None else getattr(d, attr) for d in dist]))
        self.client.insert("processes", cols, n)
        self._stats.processes += n

    def _send_strings(self, info: RunInfo, host: str, day: int, rows: list) -> None:
        for i in range(0, len(rows), 100_000):
            part = rows[i : i + 100_000]
            n = len(part)
            self.client.insert("strings", [
                ("run", "String", const_string(info.name, n)),
                ("host", "String", const_string(host, n)),
                ("day", "Date", np.full(n, day)),
                ("id", "UInt32", [i for i, _ in part]),
                ("s", "String", [s for _, s in part]),
                ("pushed_ns", "UInt64", np.full(n, time.time_ns(), dtype=np.uint64)),
            ], n)
            self._stats.strings += n

    # -- events ---------------------------------------------------------------------------
    def _server_count(self, info: RunInfo, host: str, lo: int, hi: int,
                      table: str = "events") -> int:
        return int(self.client.scalar(
            f"SELECT count() FROM {table} WHERE run = {quote(info.name)} AND host = "
            f"{quote(host)} AND chunk >= {lo} AND chunk <= {hi}"))

    def _missing_layers(self, store: Store, info: RunInfo, host: str, lo: int, hi: int
                        ) -> tuple[str, ...]:
        """The layers of the pending batch [lo, hi] that are not on the server (a layer
        with every row there was sent; one with only some raises)."""
        missing = []
        for layer, table in LAYER_TABLES:
            want = store.chunk_events(info.id, lo, hi, layer)
            have = self._server_count(info, host, lo, hi, table) if want else 0
            if have == want:  # sent before the crash or failure: counted, not sent again
                setattr(self._stats, table, getattr(self._stats, table) + have)
                continue
            if have:
                raise SinkError(f"batch {host}/{info.name}/chunks/{lo}-{hi} is partly on the "
                                f"server ({have} of {want} rows of {table}): delete it there "
                                "to resend")
            missing.append(layer)
        return tuple(missing)

    def _batch(self, store: Store, info: RunInfo, after: int,
               layers: tuple[str, ...] = BATCH_LAYERS, hi: int | None = None) -> list:
        """The next batch after chunk `after`: (id, proc id, layer, columns) per chunk, up to
        batch_rows rows (`hi`: exactly the chunks up to id hi, however many rows)."""
        batch: list[tuple[int, int, str, dict[str, np.ndarray]]] = []
        rows = 0
        for cid, proc_id, n, blob, layer in store.chunks_after(info.id, after, layers=layers):
            if hi is not None and cid > hi or hi is None and batch and rows + n > self.batch_rows:
                break
            batch.append((cid, proc_id, layer, decode(blob, LAYOUTS[layer])))
            rows += n
        return batch

    def _push_events(self, store: Store, progress: Progress, info: RunInfo,
                     host: str, day: int, pids: dict[int, int], pos: Position,
                     procs: dict[int, Any]) -> bool:
        """Send the run's chunks (syscall events and GPU calls) after the acknowledged one,
        a batch at a time; True when there were none."""
        if pos.pending is not None:
            lo, hi = pos.pending
            missing = self._missing_layers(store, info, host, lo, hi)
            if missing:  # resend exactly those layers of the range, then acknowledge it
                self._send_batch(store, info, host, day, pids, procs,
                                 self._batch(store, info, lo - 1, missing, hi))
            else:
                self._stats.verified += 1
            pos.chunk_id, pos.pending = hi, None
            progress.set(info.id, pos)
        idle = True
        while True:
            batch = self._batch(store, info, pos.chunk_id)
            if not batch:
                return idle
            idle = False
            pos.pending = (batch[0][0], batch[-1][0])
            progress.set(info.id, pos)
            self._send_batch(store, info, host, day, pids, procs, batch)
            pos.chunk_id, pos.pending = batch[-1][0], None
            progress.set(info.id, pos)
            self._stats.batches += 1

    def _send_batch(self, store: Store, info: RunInfo, host: str, day: int,
                    pids: dict[int, int], procs: dict[int, Any], batch: list) -> None:
        """One batch's syscall events into `events`, its GPU calls into `gpu_calls`."""
        sys_part = [(c, p, cols) for c, p, layer, cols in batch if layer == "sys"]
        gpu_part = [(c, p, cols) for c, p, layer, cols in batch if layer == "gpu"]
        if sys_part:
            n = sum(len(cols["ts"]) for _, _, cols in sys_part)
            files = self._files(store, info, procs, sys_part)
            self._send_events(info, host, day, pids, self._name_lut(info), sys_part, n, files)
            self._stats.events += n
        if gpu_part:
            n = sum(len(cols["ts"]) for _, _, cols in gpu_part)
            self._send_gpu(info, host, day, pids, store.strings(info.id), gpu_part, n)
            self._stats.gpu_calls += n

    def _name_lut(self, info: RunInfo) -> np.ndarray:
        """nr -> the syscall name already encoded as a Native String value."""
        lut = self._luts.get(info.id)
        if lut is None:
            from renacerd.syscall_table import syscall_table

            table = info.syscall_table or syscall_table()
            # strace's name for a number the table lacks
            names = [table.get(nr, f"syscall_{nr}") for nr in range(65536)]
            lut = np.array([_varint(len(b)) + b for b in (s.encode() for s in names)],
                           dtype=object)
            self._luts[info.id] = lut
        return lut

    @staticmethod
    def _row_keys(info: RunInfo, host: str, day: int, pids: dict[int, int], batch: list,
                  n: int) -> list[tuple[str, str, Any]]:
        """The columns every chunk row carries: where it comes from, and its chunk (what a
        pending batch is counted by) and dup (its place among rows of the same ts)."""
        lens = [len(c["ts"]) for _, _, c in batch]
        pid = np.repeat(np.array([pids.get(p, 0) for _, p, _ in batch], dtype=np.uint32), lens)
        return [
            ("day", "Date", np.full(n, day, dtype=np.uint16)),
            ("run", "String", const_string(info.name, n)),
            ("host", "String", const_string(host, n)),
            ("pid", "UInt32", pid),
            ("proc", "UInt32", np.repeat(np.array([p for _, p, _ in batch], np.uint32), lens)),
            ("chunk", "UInt64", np.repeat(np.array([i for i, _, _ in batch], np.uint64), lens)),
            ("dup", "UInt32", np.concatenate([_dups(c["ts"]) for _, _, c in batch])),
        ]

    def _send_events(self, info: RunInfo, host: str, day: int, pids: dict[int, int],
                     lut: np.ndarray, batch: list, n: int, files: bytes) -> None:
        def cat(name: str) -> np.ndarray:
            return np.concatenate([c[name] for _, _, c in batch])

        nr = cat("nr")
        cols = self._row_keys(info, host, day, pids, batch, n) + [
            ("ts", "Int64", cat("ts")), ("dur", "UInt64", cat("dur")),
            ("ret", "Int64", cat("ret")), ("a0", "UInt64", cat("a0")),
            ("tid", "UInt32", cat("tid")), ("nr", "UInt16", nr),
            ("syscall", "String", b"".join(lut[nr].tolist())),
            ("flags", "UInt16", cat("flags")), ("s0", "Int32", cat("s0")),
            ("s1", "Int32", cat("s1")), ("aux", "UInt32", cat("aux")),
            ("mode", "UInt32", cat("mode")), ("file", "String", files),
        ]
        self.client.insert("events", cols, n)

    def _send_gpu(self, info: RunInfo, host: str, day: int, pids: dict[int, int],
                  strings: list[bytes], batch: list, n: int) -> None:
        """GPU calls (CUDA runtime, driver, NCCL) as `gpu_calls` rows: the hook's symbol in
        `fn`, the launched kernel's name in `kernel`."""
        def cat(name: str) -> np.ndarray:
            return np.concatenate([c[name] for _, _, c in batch])

        names = [_varint(len(b)) + b for b in strings]
        empty = _varint(0)
        kernel = b"".join(names[i] if 0 <= i < len(names) else empty
                          for i in cat("name").tolist())
        cols = self._row_keys(info, host, day, pids, batch, n) + [
            ("ts", "Int64", cat("ts")), ("dur", "UInt64", cat("dur")),
            ("ret", "Int64", cat("ret")), ("tid", "UInt32", cat("tid")),
            ("fn", "String", b"".join(_fn_lut()[cat("fn")].tolist())),
            ("flags", "UInt16", cat("flags")),
        ]
        cols += [(f"a{i}", "UInt64", cat(f"a{i}")) for i in range(5)]
        cols += [(k, "UInt32", cat(k)) for k in ("gx", "gy", "gz", "bx", "by", "bz")]
        cols.append(("kernel", "String", kernel))
        self.client.insert("gpu_calls", cols, n)

    def _files(self, store: Store, info: RunInfo, procs: dict[int, Any], batch: list) -> bytes:
        """The `file` column of a batch: per event, the file its fd argument named (fdtrack's
        replay, carried from chunk to chunk of each process), else its path argument as
        stored, else ''; what `renacer ranks` groups a step's calls by."""
        strings = store.strings(info.id)
        ids = {s: i for i, s in enumerate(strings)}
        sids = []
        for cid, proc_id, cols in batch:
            key = (info.id, proc_id)
            proc = procs.get(proc_id)
            if key not in self._fds:  # the first chunk sent of this process: replay the rest
                self._fds[key] = None
                for blob in store.proc_chunks_before(info.id, proc_id, cid):
                    self._replay(key, proc, decode(blob), strings, ids, info.syscall_table)
            fd = self._replay(key, proc, cols, strings, ids, info.syscall_table)
            sids.append(np.where(fd >= 0, fd, cols["s0"]))
        names = [_varint(len(b)) + b for b in strings]
        empty = _varint(0)
        return b"".join(names[i] if 0 <= i < len(names) else empty
                        for i in np.concatenate(sids).tolist())

    def _replay(self, key: tuple[int, int], proc: Any, cols: dict[str, np.ndarray],
                strings: list[bytes], ids: dict[bytes, int], table: dict[int, str]
                ) -> np.ndarray:
        """One chunk's fd files as string ids (new names appended to `strings`), replayed
        from the process's fd table after its previous chunk; the table after it is kept."""
        def sid(b: bytes | None) -> int:
            if b is None:
                return -1
            if b not in ids:
                ids[b] = len(strings)
                strings.append(b)
            return ids[b]

        state = self._fds.get(key)
        t = UnifiedTrace(proc.pid if proc is not None else 0, proc.name if proc else "")
        if proc is not None:
            t.process = proc
        t.columns = cols
        t.strings = strings
        if table:
            t.table = table
        initial = None  # the process's first chunk: its table read from /proc
        if state is not None or proc is None:
            fds, cloexec = state or ({}, set())
            initial = FdState({fd: sid(b) for fd, b in fds.items()}, set(cloexec))
        before = len(strings)
        pf = process_files(t, initial)
        for i in range(before, len(strings)):
            ids.setdefault(strings[i], i)
        self._fds[key] = ({fd: (strings[i] if i >= 0 else None)
                           for fd, i in pf.final.table.items()}, set(pf.final.cloexec))
        return pf.fd

    # -- spans ----------------------------------------------------------------------------
    def _push_spans(self, store: Store, progress: Progress, info: RunInfo, host: str,
                    day: int, procs: list, pos: Position) -> bool:
        spans = store.spans_after(info.id, pos.span_rowid)
        if not spans:
            return True
        ready = ready_spans(store, info.id, info.status == "running", spans, self._span_seen)
        if not ready:
            return True
        tree = [(i, p.pid, p.ppid) for i, p in procs]
        table = info.syscall_table
        if not table:
            from renacerd.syscall_table import syscall_table

            table = syscall_table()
        sums = ready_summaries(store, info.id, tree, ready, table)
        self._send_spans(info, host, day, ready, sums)
        pos.span_rowid = ready[-1].rowid
        progress.set(info.id, pos)
        for sp in ready:
            self._span_seen.pop((info.id, sp.rowid), None)
        return False

    def _send_spans(self, info: RunInfo, host: str, day: int, spans: list[StoredSpan],
                    sums: list) -> None:
        n = len(spans)
        rows = [sp.record for sp in spans]
        attrs = [_kv(r.attributes_json) for r in rows]
        res = [_kv(r.resource_json) for r in rows]
        ad = [dict(zip(k, v)) for k, v in attrs]
        hx = _hex
        cols = [
            ("run", "String", const_string(info.name, n)), ("host", "String", [host] * n),
            ("day", "Date", [day] * n),
            ("trace_id", "String", [hx(r.trace_id) for r in rows]),
            ("span_id", "String", [hx(r.span_id) for r in rows]),
            ("parent_span_id", "String", [hx(r.parent_span_id) for r in rows]),
            ("span_name", "String", [r.span_name for r in rows]),
            ("span_kind", "UInt8", [r.span_kind or 0 for r in rows]),
            ("start_time_nanos", "UInt64", [r.start_time_nanos or 0 for r in rows]),
            ("end_time_nanos", "UInt64", [r.end_time_nanos or 0 for r in rows]),
            ("duration_nanos", "UInt64", [r.duration_nanos or 0 for r in rows]),
            ("start_mono_nanos", "Int64", [r.start_mono_nanos or 0 for r in rows]),
            ("end_mono_nanos", "Int64", [r.end_mono_nanos or 0 for r in rows]),
            ("logical_clock", "UInt64", [r.logical_clock or 0 for r in rows]),
            ("status_code", "UInt8", [r.status_code or 0 for r in rows]),
            ("status_message", "String", [r.status_message or "" for r in rows]),
            ("attributes.key", "Array(String)", [a[0] for a in attrs]),
            ("attributes.value", "Array(String)", [a[1] for a in attrs]),
            ("resource.key", "Array(String)", [a[0] for a in res]),
            ("resource.value", "Array(String)", [a[1] for a in res]),
            ("attributes_json", "String", [r.attributes_json or "" for r in rows]),
            ("resource_json", "String", [r.resource_json or "" for r in rows]),
            ("process_id", "UInt32", [r.process_id or 0 for r in rows]),
            ("thread_id", "UInt32", [r.thread_id or 0 for r in rows]),
            ("proc", "UInt32", [sp.proc_id or 0 for sp in spans]),
            ("store_rowid", "UInt64", [sp.rowid for sp in spans]),
            ("model", "String", [a.get("experiment.model_name", "") for a in ad]),
            ("epoch", "Nullable(UInt32)", [_num(a.get("experiment.epoch"), int) for a in ad]),
            ("step", "Nullable(UInt64)", [_num(a.get("experiment.step"), int) for a in ad]),
            ("loss", "Nullable(Float64)", [_num(a.get("experiment.loss"), float) for a in ad]),
            ("syscalls", "UInt64", [s.syscalls for s in sums]),
            ("syscall_ns", "UInt64", [s.syscall_ns for s in sums]),
            ("syscall_errors", "UInt64", [s.errors for s in sums]),
            ("bytes_read", "UInt64", [s.bytes_read for s in sums]),
            ("bytes_written", "UInt64", [s.bytes_written for s in sums]),
            ("top.syscall", "Array(String)", [[t[0] for t in s.top] for s in sums]),
            ("top.calls", "Array(UInt64)", [[t[1] for t in s.top] for s in sums]),
            ("top.ns", "Array(UInt64)", [[t[2] for t in s.top] for s in sums]),
            ("pushed_ns", "UInt64", [time.time_ns()] * n),
        ]
        self.client.insert("spans", cols, n)
        self._stats.spans += n


def push_run(store_path: str, url: str, run: str, *, batch_rows: int = BATCH_ROWS) -> SinkStats:
    """Push one stored run now (what `renacer push` does); raises SinkError/StoreError."""
    sink = ClickHouseSink(store_path, url, run, batch_rows=batch_rows)
    try:
        store, progress = sink._open()
        info = store.run(run)
        if progress.get(info.id).done:
            ensure_schema(sink.client)
            sink._schema_ok = True
            have = int(sink.client.scalar(
                f"SELECT count() FROM events WHERE run = {quote(run)} "
                f"AND host = {quote(info.host or '')}"))
            want = store.chunk_events(info.id)
            if have == 0 and want:
                progress.forget(info.id)  # pushed once, since dropped there: push it again
            elif have != want:
                raise SinkError(f"run {run!r} has {have} events on {sink.target.key} but "
                                f"{want} here: delete it there to push it again")
        return sink.flush_now()
    finally:
        if sink._store is not None:
            sink._store.close()


__all__ = ["ClickHouseClient", "ClickHouseSink", "SinkStats", "Target", "ensure_schema",
           "parse_url", "push_run", "quote", "read_native", "native_block"]
