"""Read a run back from ClickHouse (clickhouse://HOST:8123/DB/RUN) as UnifiedTraces."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson

from renacerd.columns import OPTIONAL_COLUMNS, SYSCALL_COLUMNS
from renacerd.sinks import SinkError
from renacerd.sinks.clickhouse import ClickHouseClient, Target, parse_url, quote
from renacerd.store.database import RunInfo
from renacerd.trace.unified_trace import ProcessSpan, UnifiedTrace

_EVENT_COLS = ", ".join(["proc"] + [name for name, _ in SYSCALL_COLUMNS])


def is_clickhouse_url(s: str) -> bool:
    """`s` names a run on a ClickHouse server rather than in the local store."""
    return s.startswith("clickhouse://")


def _where(t: Target, host: str) -> str:
    return f"run = {quote(t.run or '')} AND host = {quote(host)}"


def _resolve_host(client: ClickHouseClient, t: Target) -> dict:
    cond = f"run = {quote(t.run or '')}"
    if t.run_host is not None:
        cond += f" AND host = {quote(t.run_host)}"
    rows = client.rows(f"SELECT * FROM runs FINAL WHERE {cond} ORDER BY host")
    if not rows:
        on = f" from host {t.run_host!r}" if t.run_host else ""
        raise SinkError(f"no run named {t.run!r}{on} in {t.key}")
    if len(rows) > 1:
        hosts = ", ".join(r["host"] for r in rows)
        raise SinkError(f"run {t.run!r} exists on several hosts ({hosts}) in {t.key}: "
                        "add ?host=NAME to the URL")
    return rows[0]


def _run_info(r: dict) -> RunInfo:
    known = {f.name for f in dataclasses.fields(RunInfo)}
    extra = {"source_counters": orjson.loads(r.get("source_counters") or "{}")}
    return RunInfo(
        **{k: v for k, v in extra.items() if k in known},
        id=0,
        name=r["run"],
        host=r["host"],
        kernel=r["kernel"],
        cmdline=list(r["cmdline"]),
        version=r["version"],
        start_wall_ns=r["start_wall_ns"],
        end_wall_ns=r["end_wall_ns"],
        start_mono_ns=r["start_mono_ns"],
        end_mono_ns=r["end_mono_ns"],
        status=r["status"],
        daemon_pid=r["daemon_pid"],
        owner_uid=r["owner_uid"],
        events=r["events"],
        events_lost=r["events_lost"],
        details_lost=r["details_lost"],
        failed_reads=r["failed_reads"],
        unmatched_exits=r["unmatched_exits"],
        client_dropped=r["client_dropped"],
        lost_per_cpu=orjson.loads(r["lost_per_cpu"] or "{}"),
        syscall_table=dict(zip(r["syscall_table.nr"], r["syscall_table.name"])),
        exit_code=r["exit_code"],
        error=r["error"] or None,
    )


def _spans(client: ClickHouseClient, where: str) -> list:
    rows = client.rows(
        "SELECT trace_id, span_id, parent_span_id, span_name, span_kind, start_time_nanos, "
        "end_time_nanos, duration_nanos, start_mono_nanos, end_mono_nanos, logical_clock, "
        "status_code, status_message, attributes_json, resource_json, process_id, thread_id "
        f"FROM spans FINAL WHERE {where} ORDER BY start_mono_nanos, store_rowid")
    if not rows:
        return []
    from renacerd.client.span import SpanRecord

    return [SpanRecord.from_row(r) for r in rows]


def load_run_info_from_url(url: str, timeout_s: float = 60.0) -> tuple[RunInfo, list[UnifiedTrace]]:
    """The run row and every process of the run, as `renacer show` needs them."""
    t = parse_url(url, with_run=True)
    client = ClickHouseClient(t, timeout_s)
    info = _run_info(_resolve_host(client, t))
    where = _where(t, info.host or "")
    procs = client.rows(
        "SELECT proc, pid, ppid, nspid, comm, exe, argv, start_mono_ns, end_mono_ns, "
        "exit_code, exit_signal, attached, initial_fds.fd AS fds, initial_fds.path AS paths "
        f"FROM processes FINAL WHERE {where} ORDER BY proc")
    sc = client.native(f"SELECT id, s FROM strings FINAL WHERE {where} ORDER BY id")
    ids = sc.get("id", np.empty(0, dtype=np.uint32))
    strings: list[bytes] = [b""] * (int(ids.max()) + 1 if len(ids) else 0)
    for i, s in zip(ids.tolist(), sc.get("s", [])):
        strings[i] = s
    ev = client.native(f"SELECT {_EVENT_COLS} FROM events WHERE {where} "
                       "ORDER BY proc, ts, chunk, dup")
    spans = _spans(client, where)
    proc_col = ev.get("proc", np.empty(0, dtype=np.uint32))
    traces = []
    for p in procs:
        lo, hi = np.searchsorted(proc_col, [p["proc"], p["proc"] + 1])
        tr = UnifiedTrace(p["pid"], p["comm"])
        tr.process = ProcessSpan(
            pid=p["pid"], ppid=p["ppid"], name=p["comm"], exe=p["exe"], argv=list(p["argv"]),
            start_mono_ns=p["start_mono_ns"], end_mono_ns=p["end_mono_ns"],
            exit_code=p["exit_code"], exit_signal=p["exit_signal"], nspid=p["nspid"],
            attached=bool(p["attached"]), initial_fds=dict(zip(p["fds"], p["paths"])),
        )
        tr.run = info.name
        tr.columns = {
            name: (ev[name][lo:hi].astype(dt, copy=True) if name in ev
                   else np.zeros(hi - lo, dtype=dt) if name in OPTIONAL_COLUMNS
                   else np.empty(0, dtype=dt))
            for name, dt in SYSCALL_COLUMNS
        }
        tr.strings = strings
        if info.syscall_table:
            tr.table = info.syscall_table
        tr.spans = spans
        traces.append(tr)
    return info, traces


def load_run_from_url(url: str) -> list[UnifiedTrace]:
    """Every process of the run at `url`, in order of appearance (like Store.load_run)."""
    return load_run_info_from_url(url)[1]
