"""What a pruned run keeps of its events: per-process syscall and file tables, per-span
summaries, its effects, and per-step syscall calls, errors and time and bytes per file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from renacerd.records import F_UNFOLLOWED
from renacerd.trace.effects import Effects, apply_renames, run_effects
from renacerd.trace.fdtrack import FileStat, created_opens, file_stats, run_files
from renacerd.trace.gpu_trace import gpu_summary
from renacerd.trace.unified_trace import READ_FAMILY, WRITE_FAMILY, UnifiedTrace

STEP_KEY = "experiment.step"


def syscall_counts(trace: UnifiedTrace, sel: np.ndarray | None = None
                   ) -> dict[str, dict[str, int]]:
    """{name: {calls, errors, interrupted, total_ns}} over the trace (or the events under
    `sel`), like strace -c (partial calls included; a call a signal interrupted is not an
    error), biggest total time first."""
    c = trace.columns
    if not len(trace):
        return {}
    nr = c["nr"].astype(np.int64)
    err = trace.errors().astype(np.float64)
    intr = trace.interrupted().astype(np.float64)
    dur = c["dur"].astype(np.float64)
    if sel is not None:
        nr, err, intr, dur = nr[sel], err[sel], intr[sel], dur[sel]
        if not len(nr):
            return {}
    calls = np.bincount(nr)
    errs = np.bincount(nr, weights=err)
    intrs = np.bincount(nr, weights=intr)
    tot = np.bincount(nr, weights=dur)
    out = {}
    for n in np.flatnonzero(calls):
        name = trace.table.get(int(n), f"syscall_{int(n)}")
        out[name] = {"calls": int(calls[n]), "errors": int(errs[n]),
                     "interrupted": int(intrs[n]), "total_ns": int(tot[n])}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["total_ns"]))


def process_summary(t: UnifiedTrace, files: dict[str, FileStat]) -> dict[str, Any]:
    """The event-derived part of a process's `renacer show` entry."""
    gcols = (t.gpu or {}).get("columns")
    has_gpu = gcols is not None and len(gcols["ts"]) > 0
    out: dict[str, Any] = {
        "events": len(t),
        "threads": int(len(np.unique(t.columns["tid"]))) if len(t) else 0,
        "syscalls": syscall_counts(t),
        "files": {path: {"bytes_read": f.bytes_read, "bytes_written": f.bytes_written,
                         "created": f.created, "truncated": f.truncated,
                         "appended": f.appended} for path, f in files.items()},
        # null for a process with no GPU layer or no GPU calls, not a block of zeros
        "gpu": gpu_summary(t) if has_gpu else None,
    }
    if len(t) and (t.columns["flags"] & F_UNFOLLOWED).any():
        out["stopped_following"] = "privilege gained at exec"
    return out


@dataclass(slots=True)
class Aggregates:
    """A run's aggregates; processes and step rows by position in the run's process order."""

    processes: list[dict[str, Any]] = field(default_factory=list)
    spans: list[dict[str, Any]] = field(default_factory=list)
    # (process position, step, syscall, calls, errors, total_ns)
    step_syscalls: list[tuple[int, str, str, int, int, int]] = field(default_factory=list)
    # (process position, step, path, bytes_read, bytes_written)
    step_files: list[tuple[int, str, str, int, int]] = field(default_factory=list)
    # the run's effects (compare's semantic part) before its renames, which
    # final_effects applies: a run folded part by part sums the parts' first
    effects: Effects = field(default_factory=Effects)
    renames: list[tuple[int, str, str]] = field(default_factory=list)

    def final_effects(self) -> dict[str, int]:
        """The run's effects with every rename applied, as items() (what is stored)."""
        e = Effects.from_items(self.effects.items())
        apply_renames(e, self.renames)
        return e.items()


def _step_of_span(spans: list[Any]) -> tuple[np.ndarray, list[str]]:
    """Per span, the index of its step value (-1: no step attribute), and the values."""
    values: dict[str, int] = {}
    idx = np.full(len(spans) + 1, -1, dtype=np.int64)  # the last slot: events in no span
    for i, sp in enumerate(spans):
        step = sp.attributes().get(STEP_KEY)
        if step is not None:
            idx[i] = values.setdefault(str(step), len(values))
    return idx, list(values)


def compute(traces: list[UnifiedTrace], span_sums: list[dict[str, Any]],
            exists: dict[str, int] | None = None) -> Aggregates:
    """The aggregates of a loaded run (span_sums: store.database.span_summaries); `exists`
    carries which paths the run has seen exist from part to part of a run folded part by
    part (trace.fdtrack.created_opens)."""
    agg = Aggregates(spans=span_sums)
    if not traces:
        return agg
    files = run_files(traces)
    made = created_opens(traces, files, exists)
    agg.effects = run_effects(traces, files=files, renames=agg.renames, made=made)
    step_idx, steps = _step_of_span(traces[0].spans)
    for pos, t in enumerate(traces):
        pf = files[t.pid]
        agg.processes.append(process_summary(t, file_stats(t, pf, made.get(t.pid, set()))))
        if not len(t) or not steps or t.span_index is None:
            continue
        ev_step = step_idx[t.span_index]  # span_index -1 reads the last slot
        c = t.columns
        ok = c["ret"] > 0
        rd = ok & np.isin(c["nr"], [k for k, v in t.table.items() if v in READ_FAMILY])
        wr = ok & np.isin(c["nr"], [k for k, v in t.table.items() if v in WRITE_FAMILY])
        for j in np.unique(ev_step[ev_step >= 0]):
            m = ev_step == j
            for name, s in syscall_counts(t, m).items():
                agg.step_syscalls.append((pos, steps[j], name, s["calls"], s["errors"],
                                          s["total_ns"]))
            per: dict[str, list[int]] = {}
            for col, sel in ((0, m & rd & (pf.fd >= 0)), (1, m & wr & (pf.fd >= 0))):
                if not sel.any():
                    continue
                sums = np.bincount(pf.fd[sel], weights=c["ret"][sel].astype(np.float64))
                for sid in np.flatnonzero(sums):
                    path = t.string(int(sid)) or f"<{int(sid)}>"
                    per.setdefault(path, [0, 0])[col] += int(sums[sid])
            for path, (r, w) in sorted(per.items()):
                agg.step_files.append((pos, steps[j], path, r, w))
    return agg
