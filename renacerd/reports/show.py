"""The data behind `renacer show`: process tree, strace -c tables, files, losses."""

from __future__ import annotations

from typing import Any

from renacerd.reports.rank_labels import label_traces, rank_entry
from renacerd.store.aggregates import process_summary, syscall_counts
from renacerd.store.database import RunInfo
from renacerd.trace.fdtrack import run_file_stats
from renacerd.trace.unified_trace import UnifiedTrace

# strace -c per process; a pruned run's come from its stored aggregates
syscall_summary = syscall_counts


def pruned_line(p: dict[str, Any] | None) -> str | None:
    """The one line every text report on a pruned run (RunInfo.pruned) prints, else None."""
    if not p:
        return None
    kept = p.get("kept") or {}
    if p["reason"] == "keep-steps" and kept:
        steps = ", ".join(f"{k} ({'; '.join(v)})" for k, v in kept["steps"].items())
        return (f"!! run pruned by retention: the events of steps "
                f"{', '.join(kept['dropped_steps'])} dropped (keep-steps {kept['keep_steps']});"
                f" full events kept for steps {steps}; reports read its stored aggregates\n")
    what = (f"its {p['chunks']} oldest event chunks ({p['events']} events) dropped while "
            "live; reports count the events kept" if p["partial"] and p["reason"] == "live"
            else f"{p['events']} events in {p['chunks']} chunks dropped ({p['reason']}); "
            "reports read its stored aggregates")
    if p["partial"] and p["reason"] != "live":
        what += " (the oldest chunks were dropped while live: the aggregates miss them)"
    if p["reason"] == "flight recorder":
        wins = (p.get("kept") or {}).get("flight_windows") or []
        kept = "; ".join(f"{(w['to_mono_ns'] - w['from_mono_ns']) / 1e9:.1f} s kept whole "
                         f"({w['reason']})" for w in wins) or "no window kept (it ended well)"
        return (f"!! flight recorder run: {p['events']} events older than its window folded "
                f"into aggregates (reports read them); {kept}\n")
    return f"!! run pruned by retention: {what}\n"


def _process_entry(t: UnifiedTrace, s: dict[str, Any]) -> dict[str, Any]:
    """One item of `processes`: the process and its summary."""
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
        "events": s["events"],
        "threads": s["threads"],
        "syscalls": s["syscalls"],
        # keyed by absolute path; see docs/counters.md for what cannot be resolved
        "files": dict(sorted(s["files"].items(),
                             key=lambda kv: (-(kv[1]["bytes_read"] + kv[1]["bytes_written"]),
                                             kv[0]))),
    }
    if s.get("stopped_following"):
        entry["stopped_following"] = s["stopped_following"]
    entry["gpu"] = s["gpu"]
    return entry


def show_data(run: RunInfo, traces: list[UnifiedTrace],
              agg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `renacer show --json` contract (more keys than the contract are fine); `agg`: a
    pruned run's stored aggregates (Store.aggregates), read instead of its events."""
    sums = (agg or {}).get("processes")
    if sums is None:
        stats = run_file_stats(traces)
        sums = [process_summary(t, stats[t.pid]) for t in traces]
    label_traces(traces)
    procs = []
    for t, s in zip(traces, sums):
        procs.append(_process_entry(t, s))
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
        "lost": {
            "events": run.events_lost,
            "details": run.details_lost,
            "failed_reads": run.failed_reads,
            "unmatched_exits": run.unmatched_exits,
            "truncated": run.truncated,
            "gpu_events": run.source_counters.get("gpu_events_lost", 0),
            "sources": run.source_counters,
            "client_dropped": run.client_dropped,
            "per_cpu": run.lost_per_cpu,
        },
        "error": run.error,
        "pruned": bool(run.pruned),
        "dropped": run.pruned,
        "flight_recorder": run.flight,
        "processes": procs,
    }
