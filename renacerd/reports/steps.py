"""Per-span and per-step views: what each experiment span did, and which steps stand out."""

from __future__ import annotations

from typing import Any

import numpy as np

from renacerd.escaping import escape
from renacerd.reports.show import pruned_line
from renacerd.store.aggregates import STEP_KEY
from renacerd.store.database import RunInfo, span_summaries
from renacerd.trace.unified_trace import UnifiedTrace

MODIFIED_Z = 3.5  # Iglewicz & Hoaglin: |0.6745 (x - median) / MAD| above this is an outlier


def spans_data(traces: list[UnifiedTrace], agg: dict[str, Any] | None = None
               ) -> list[dict[str, Any]]:
    """The `renacer spans --json` contract: one object per span, with its syscalls (`agg`:
    a pruned run's stored aggregates, read instead of its events)."""
    spans = traces[0].spans if traces else []
    sums = (agg or {}).get("spans")
    if sums is None:
        sums = span_summaries(traces)
    out = []
    for sp, s in zip(spans, sums):
        out.append({
            "span_id": sp.span_id_hex(),
            "parent_span_id": sp.parent_span_id.hex() if sp.parent_span_id else None,
            "trace_id": sp.trace_id_hex(),
            "name": sp.span_name,
            "status": {0: "unset", 1: "ok", 2: "error"}.get(int(sp.status_code), "unset"),
            "status_message": sp.status_message,
            "start_time_nanos": sp.start_time_nanos,
            "end_time_nanos": sp.end_time_nanos,
            "pid": sp.process_id,
            "tid": sp.thread_id,
            "attributes": sp.attributes(),
            "syscalls": dict(sorted(s["calls"].items(), key=lambda kv: -kv[1])),
            "syscall_count": s["syscalls"],
            "syscall_ns": s["syscall_ns"],
            "bytes_read": s["bytes_read"],
            "bytes_written": s["bytes_written"],
            "gpu": s.get("gpu", {"launches": 0, "h2d_bytes": 0, "d2h_bytes": 0,
                                 "d2d_bytes": 0}),
        })
    return out


def outliers(values: list[float]) -> list[bool]:
    """Robust outlier flags (median / MAD modified z-score)."""
    if len(values) < 3:
        return [False] * len(values)
    a = np.asarray(values, dtype=np.float64)
    med = np.median(a)
    mad = np.median(np.abs(a - med))
    if mad == 0:
        # Most steps identical: anything off the common value by more than half stands out.
        return [bool(abs(v - med) > 0.5 * max(abs(med), 1.0)) for v in a]
    return [bool(abs(0.6745 * (v - med) / mad) > MODIFIED_Z) for v in a]


def steps_data(run: RunInfo, traces: list[UnifiedTrace],
               agg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per step (spans carrying experiment.step, summed per step value), with outlier flags."""
    rows: dict[str, dict[str, Any]] = {}
    for s in spans_data(traces, agg):
        step = s["attributes"].get(STEP_KEY)
        if step is None:
            continue
        r = rows.setdefault(str(step), {"step": step, "spans": 0, "syscalls": 0,
                                        "syscall_ns": 0, "bytes": 0, "errors": 0,
                                        "gpu_launches": 0, "gpu_bytes": 0})
        g = s["gpu"]
        r["gpu_launches"] += g["launches"]
        r["gpu_bytes"] += g["h2d_bytes"] + g["d2h_bytes"] + g["d2d_bytes"]
        r["spans"] += 1
        r["syscalls"] += s["syscall_count"]
        r["syscall_ns"] += s["syscall_ns"]
        r["bytes"] += s["bytes_read"] + s["bytes_written"]
        r["errors"] += s["status"] == "error"
    ordered = sorted(rows.values(), key=lambda r: float(r["step"]))
    for key in ("syscalls", "syscall_ns", "bytes", "gpu_launches", "gpu_bytes"):
        for r, flag in zip(ordered, outliers([r[key] for r in ordered])):
            r.setdefault("outliers", [])
            if flag:
                r["outliers"].append(key)
    return {"run": run.name, "status": run.status, "pruned": bool(run.pruned),
            "dropped": run.pruned, "steps": ordered}


def render_steps(d: dict[str, Any], out) -> None:
    """Per-step table; '!' marks robust outliers."""
    w = out.write
    w(f"run {escape(d['run'])}  status {d['status']}: {len(d['steps'])} steps\n")
    line = pruned_line(d.get("dropped"))
    if line:
        w(line)
    if not d["steps"]:
        w("no spans carry experiment.step (use experiment_span(..., step=N))\n")
        return
    w(f"{'step':>8} {'spans':>6} {'syscalls':>10} {'syscall ms':>11} {'bytes':>12} "
      f"{'launches':>9} {'GPU bytes':>11}  flags\n")
    for r in d["steps"]:
        o = set(r["outliers"])
        m = {k: "!" if k in o else " "
             for k in ("syscalls", "syscall_ns", "bytes", "gpu_launches", "gpu_bytes")}
        flags = ("error " if r["errors"] else "") + (
            "outlier: " + ", ".join(r["outliers"]) if o else "")
        w(f"{escape(r['step']):>8} {r['spans']:>6} {r['syscalls']:>9}{m['syscalls']} "
          f"{r['syscall_ns'] / 1e6:>10.3f}{m['syscall_ns']} {r['bytes']:>11}{m['bytes']}"
          f"{r['gpu_launches']:>9}{m['gpu_launches']}{r['gpu_bytes']:>11}{m['gpu_bytes']}"
          f"  {flags}\n")
