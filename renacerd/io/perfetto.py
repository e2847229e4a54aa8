"""Chrome trace / Perfetto JSON: processes and threads named, syscalls and spans as X slices."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import orjson

from renacerd.escaping import json_safe, json_text
from renacerd.trace.unified_trace import UnifiedTrace

SPAN_TID_BASE = 1_000_000_000  # span tracks get tids no kernel hands out


def _us(ns: int | np.integer) -> float:
    return int(ns) / 1000.0


def syscall_events(t: UnifiedTrace) -> list[dict[str, Any]]:
    """X slices for one process; per thread each slice ends before the next begins."""
    c = t.columns
    out: list[dict[str, Any]] = []
    if not len(t):
        return out
    ts = c["ts"].astype(np.int64)
    dur = c["dur"].astype(np.int64)
    tid = c["tid"]
    end = ts + dur
    for th in np.unique(tid):
        sel = np.flatnonzero(tid == th)
        nxt = np.r_[ts[sel][1:], np.iinfo(np.int64).max]
        # clock skew between enter and exit records must not make slices overlap
        end[sel] = np.minimum(end[sel], nxt)
    names = t.names()
    texts = t.texts()
    for i in range(len(t)):
        args: dict[str, Any] = {"ret": int(c["ret"][i])}
        if c["s0"][i] >= 0:
            args["path"] = texts[int(c["s0"][i])]
        if c["s1"][i] >= 0:
            args["path2"] = texts[int(c["s1"][i])]
        out.append({"ph": "X", "name": names[i], "cat": "syscall", "pid": t.pid,
                    "tid": int(tid[i]), "ts": _us(ts[i]), "dur": _us(max(end[i] - ts[i], 0)),
                    "args": args})
    return out


def _lanes(spans: list[Any]) -> list[tuple[int, Any]]:
    """Put each span on the first lane where it nests inside the lane's open spans."""
    lanes: list[list[int]] = []  # per lane, the end times of the open spans (a stack)
    out = []
    for s in sorted(spans, key=lambda s: (s.start_mono_nanos, -(s.end_mono_nanos or 0))):
        start = s.start_mono_nanos
        end = s.end_mono_nanos or start
        for k, stack in enumerate(lanes):
            while stack and stack[-1] <= start:
                stack.pop()
            if not stack or end <= stack[-1]:
                stack.append(end)
                out.append((k, s))
                break
        else:
            lanes.append([end])
            out.append((len(lanes) - 1, s))
    return out


GPU_TRACK = 1_000_000_000  # a CUDA API track beside each thread: calls nest, syscalls inside


def gpu_events(t: UnifiedTrace) -> list[dict[str, Any]]:
    """X slices for the process's CUDA API calls, one track per calling thread."""
    from renacerd.trace.gpu_trace import _SYMBOL

    cols = (t.gpu or {}).get("columns")
    if cols is None or not len(cols["ts"]):
        return []
    out: list[dict[str, Any]] = []
    comm = json_text(t.process.name)
    names = {int(th): f"{comm} thread {th} CUDA" for th in np.unique(cols["tid"])}
    for th, name in names.items():
        out.append({"ph": "M", "name": "thread_name", "pid": t.pid, "tid": GPU_TRACK + th,
                    "args": {"name": name}})
    sym = _SYMBOL[cols["fn"].astype(np.int64)]
    for i in range(len(cols["ts"])):
        args: dict[str, Any] = {"ret": int(cols["ret"][i])}
        if "name" in cols and cols["name"][i] >= 0:
            args["kernel"] = json_text(t.string(int(cols["name"][i])) or "")
        out.append({"ph": "X", "name": str(sym[i]), "cat": "cuda", "pid": t.pid,
                    "tid": GPU_TRACK + int(cols["tid"][i]), "ts": _us(cols["ts"][i]),
                    "dur": _us(cols["dur"][i]), "args": args})
    return out


def chrome_trace(traces: list[UnifiedTrace], run: str | None = None) -> dict[str, Any]:
    """The whole run as a Chrome trace JSON object."""
    ev: list[dict[str, Any]] = []
    pids = {t.pid for t in traces}
    nspid = {t.process.nspid: t.pid for t in traces if t.process.nspid}
    for t in traces:
        comm = json_text(t.process.name)
        ev.append({"ph": "M", "name": "process_name", "pid": t.pid, "tid": 0,
                   "args": {"name": f"{comm} ({t.pid})"}})
        for k, th in enumerate(dict.fromkeys(t.columns["tid"].tolist())):
            ev.append({"ph": "M", "name": "thread_name", "pid": t.pid, "tid": int(th),
                       "args": {"name": f"{comm} thread {k} ({th})"}})
        ev += syscall_events(t)
        ev += gpu_events(t)
    spans = [s for s in (traces[0].spans if traces else [])
             if getattr(s, "start_mono_nanos", 0)]
    by_pid: dict[int, list[Any]] = {}
    for s in spans:
        pid = s.process_id if s.process_id in pids else nspid.get(
            s.process_id, traces[0].pid if traces else 0)
        by_pid.setdefault(pid, []).append(s)
    for pid, group in by_pid.items():
        named: set[int] = set()
        for lane, s in _lanes(group):
            tid = SPAN_TID_BASE + lane
            if tid not in named:
                named.add(tid)
                label = "experiment spans" + (f" #{lane + 1}" if lane else "")
                ev.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                           "args": {"name": label}})
            end = s.end_mono_nanos or s.start_mono_nanos
            ev.append({"ph": "X", "name": s.span_name, "cat": "span", "pid": pid, "tid": tid,
                       "ts": _us(s.start_mono_nanos), "dur": _us(end - s.start_mono_nanos),
                       "args": {"attributes": s.attributes_json, "span_id": s.span_id.hex(),
                                "thread_id": s.thread_id}})
    return {"traceEvents": ev, "displayTimeUnit": "ns",
            "otherData": json_safe({"run": run}) if run else {}}


def write_perfetto(path: str | os.PathLike[str], traces: list[UnifiedTrace],
                   run: str | None = None) -> int:
    """Write the Chrome trace JSON; returns its size."""
    data = orjson.dumps(chrome_trace(traces, run))
    with open(path, "wb") as f:
        f.write(data)
    return len(data)
