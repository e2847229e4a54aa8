"""The data behind `renacer show`: process tree, strace -c tables, files, losses."""

from __future__ import annotations

from typing import Any

import numpy as np

from renacerd.records import F_UNFOLLOWED
from renacerd.reports.rank_labels import label_traces, rank_entry
from renacerd.store.database import RunInfo
from renacerd.trace.fdtrack import run_file_stats
from renacerd.trace.gpu_trace import gpu_summary
from renacerd.trace.unified_trace import UnifiedTrace


def syscall_table(trace: UnifiedTrace) -> dict[str, dict[str, int]]:
    """{name: {calls, errors, interrupted, total_ns}} over the trace, like strace -c (partial
    calls included; a call a signal interrupted is not an error)."""
    c = trace.columns
    if not len(trace):
        return {}
    nr = c["nr"].astype(np.int64)
    calls = np.bincount(nr)
    errs = np.bincount(nr, weights=trace.errors().astype(np.float64))
    intr = np.bincount(nr, weights=trace.interrupted().astype(np.float64))
    tot = np.bincount(nr, weights=c["dur"].astype(np.float64))
    out = {}
    for n in np.flatnonzero(calls):
        name = trace.table.get(int(n), f"syscall_{int(n)}")
        out[name] = {"calls": int(calls[n]), "errors": int(errs[n]),
                     "interrupted": int(intr[n]), "total_ns": int(tot[n])}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["total_ns"]))


def _files(files: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A process's file counters by absolute path, most bytes moved first."""
    return {
        path: {"bytes_read": f.bytes_read, "bytes_written": f.bytes_written,
               "created": f.created, "truncated": f.truncated, "appended": f.appended}
        for path, f in sorted(files.items(),
                              key=lambda kv: (-(kv[1].bytes_read + kv[1].bytes_written), kv[0]))
    }


def _process_entry(t: UnifiedTrace, files: dict[str, Any]) -> dict[str, Any]:
    """One process of `renacer show --json`."""
    p = t.process
    entry: dict[str, Any] = {
        "pid": p.pid,
        "ppid": p.ppid,
        "comm": p.name,
        "exe": p.exe,
        "argv": p.argv,
        "exit_code": p.exit_code,
        "exit_signal": p.exit_signal,
        "start_mono_ns": p.start_mono_ns,
        "end_mono_ns": p.end_mono_ns,
        "attached": p.attached,
        "rank": rank_entry(p),
        "events": len(t),
        "threads": int(len(np.unique(t.columns["tid"]))) if len(t) else 0,
        "syscalls": syscall_table(t),
        # keyed by absolute path; see docs/counters.md for what cannot be resolved
        "files": _files(files),
    }
    if len(t) and (t.columns["flags"] & F_UNFOLLOWED).any():
        entry["stopped_following"] = "privilege gained at exec"
    # null for a process with no GPU layer or no GPU calls, not a block of zeros
    gcols = (t.gpu or {}).get("columns")
    has_gpu = gcols is not None and len(gcols["ts"]) > 0
    entry["gpu"] = gpu_summary(t) if has_gpu else None
    return entry


def _losses(run: RunInfo) -> dict[str, Any]:
    """Everything the run lost or could not read, by where it was lost."""
    return {
        "events": run.events_lost,
        "details": run.details_lost,
        "failed_reads": run.failed_reads,
        "unmatched_exits": run.unmatched_exits,
        "truncated": run.truncated,
        "gpu_events": run.source_counters.get("gpu_events_lost", 0),
        "sources": run.source_counters,
        "client_dropped": run.client_dropped,
        "per_cpu": run.lost_per_cpu,
    }


def show_data(run: RunInfo, traces: list[UnifiedTrace]) -> dict[str, Any]:
    """The `renacer show --json` contract (more keys than the contract are fine)."""
    stats = run_file_stats(traces)
    label_traces(traces)
    procs = [_process_entry(t, stats[t.pid]) for t in traces]
    return {
        "run": run.name,
        "status": run.status,
        "host": run.host,
        "kernel": run.kernel,
        "cmdline": run.cmdline,
        "start_wall_ns": run.start_wall_ns,
        "end_wall_ns": run.end_wall_ns,
        "events": run.events,
        "lost_events": run.events_lost + run.details_lost
        + run.source_counters.get("gpu_events_lost", 0),
        "lost": _losses(run),
        "error": run.error,
        "processes": procs,
    }
