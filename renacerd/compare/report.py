"""Report data from a Comparison: first divergence, per-step and effects diffs, timing, --json."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from renacerd.compare import Chunk, Comparison
from renacerd.compare.normalize import NormTrace
from renacerd.trace.unified_trace import UnifiedTrace

CONTEXT = 3
TOP_TIMING = 10


def segment_label(n: NormTrace | None, seg: int) -> str:
    """Human name of a step segment: inside step k, or the gap before/after it."""
    if seg == 0:
        return "before the first step" if n is not None and n.steps else "whole process"
    k = (seg - 1) // 2
    label = n.steps[k] if n is not None and k < len(n.steps) else f"step #{k}"
    return label if seg % 2 else f"after {label}"


def describe_event(t: UnifiedTrace, i: int, fd_ids: np.ndarray | None) -> str:
    """`name(path) = ret` for one event, with the file its fd referred to when known."""
    c = t.columns
    name = t.table.get(int(c["nr"][i]), f"syscall_{int(c['nr'][i])}")
    ret = int(c["ret"][i])
    what = t.string(int(c["s0"][i])) if c["s0"][i] >= 0 else None
    if what is None and fd_ids is not None and len(fd_ids) > i and fd_ids[i] >= 0:
        what = f"{int(np.int64(c['a0'][i]))}<{t.string(int(fd_ids[i]))}>"
    if c["s1"][i] >= 0 and name not in ("execve", "execveat"):
        what = f"{what}, {t.string(int(c['s1'][i]))}"
    r = f"-{t.errno_name(-ret)}" if -4095 <= ret < 0 else str(ret)
    return f"{name}({what or ''}) = {r}"


def _side(comp: Comparison, ch: Chunk, which: int, pos: int) -> list[dict[str, Any]]:
    n = comp.norms[ch.pair][which]
    sel = ch.base if which == 0 else ch.cand
    if n is None:
        return []
    ids = comp.fd_ids[which].get(n.trace.pid)
    out = []
    for k in range(max(0, pos - CONTEXT), min(len(sel), pos + CONTEXT + 1)):
        i = int(n.idx[sel[k]])
        out.append({"index": k, "at": k == pos, "event": describe_event(n.trace, i, ids)})
    return out


def first_divergence(comp: Comparison) -> dict[str, Any] | None:
    """Where the compared sequences first differ, with the calls around it on both sides."""
    for ch in comp.chunks:
        nb, nc = comp.norms[ch.pair]
        a = nb.codes[ch.base] if nb is not None and len(ch.base) else np.empty(0, np.int32)
        b = nc.codes[ch.cand] if nc is not None and len(ch.cand) else np.empty(0, np.int32)
        k = min(len(a), len(b))
        ne = np.flatnonzero(a[:k] != b[:k])
        if not len(ne) and len(a) == len(b):
            continue
        pos = int(ne[0]) if len(ne) else k
        return {
            "process": comp.pairs[ch.pair].label,
            "thread": ch.thread,
            "step": segment_label(nb or nc, ch.segment),
            "index": pos,
            "baseline": _side(comp, ch, 0, pos),
            "candidate": _side(comp, ch, 1, pos),
        }
    return None


def _names(comp: Comparison, codes: np.ndarray) -> Counter:
    u, n = np.unique(codes, return_counts=True)
    return Counter({comp.vocab.name(int(c)): int(k) for c, k in zip(u, n)})


def step_table(comp: Comparison) -> list[dict[str, Any]]:
    """Per process pair and step segment: calls and time on both sides, extra/missing calls."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for ch in comp.chunks:
        nb, nc = comp.norms[ch.pair]
        row = rows.setdefault((ch.pair, ch.segment), {
            "process": comp.pairs[ch.pair].label,
            "step": segment_label(nb or nc, ch.segment),
            "segment": ch.segment,
            "baseline_calls": 0, "candidate_calls": 0,
            "baseline_ns": 0, "candidate_ns": 0,
            "_b": Counter(), "_c": Counter(),
        })
        for n, sel, side in ((nb, ch.base, "baseline"), (nc, ch.cand, "candidate")):
            if n is None or not len(sel):
                continue
            row[f"{side}_calls"] += len(sel)
            row[f"{side}_ns"] += int(n.dur()[sel].sum())
            row["_b" if side == "baseline" else "_c"].update(_names(comp, n.codes[sel]))
    out = []
    for key in sorted(rows):
        r = rows[key]
        b, c = r.pop("_b"), r.pop("_c")
        r["extra"] = dict((c - b).most_common())
        r["missing"] = dict((b - c).most_common())
        out.append(r)
    return out


def timing_changes(comp: Comparison, top: int = TOP_TIMING) -> list[dict[str, Any]]:
    """Per syscall name: total time and calls on both sides, biggest absolute change first."""
    tot: dict[str, list[int]] = {}
    for nb, nc in comp.norms:
        for side, n in ((0, nb), (1, nc)):
            if n is None or not len(n):
                continue
            sums = np.bincount(n.codes, weights=n.dur().astype(np.float64))
            cnt = np.bincount(n.codes)
            for code in np.flatnonzero(cnt):
                v = tot.setdefault(comp.vocab.name(int(code)), [0, 0, 0, 0])
                v[side] += int(sums[code])
                v[2 + side] += int(cnt[code])
    rows = [{"syscall": k, "baseline_ns": v[0], "candidate_ns": v[1], "delta_ns": v[1] - v[0],
             "baseline_calls": v[2], "candidate_calls": v[3]} for k, v in tot.items()]
    rows.sort(key=lambda r: (-abs(r["delta_ns"]), r["syscall"]))
    return rows[:top]


def report_data(comp: Comparison, threshold: float | None = None) -> dict[str, Any]:
    """The --json contract plus the detail the text and HTML reports show."""
    s = comp.score
    t = comp.threshold if threshold is None else threshold
    steps = step_table(comp)
    first = first_divergence(comp)
    diffs: list[dict[str, Any]] = [{"kind": "hard", "what": h} for h in comp.hard]
    diffs += [{"kind": "unpaired", "process": p.label,
               "side": "baseline" if p.baseline is not None else "candidate"}
              for p in comp.pairs if p.baseline is None or p.candidate is None]
    if first is not None:
        diffs.append({"kind": "first_divergence", **first})
    diffs += [{"kind": "step", **r} for r in steps if r["extra"] or r["missing"]]
    diffs += [{"kind": "effect", "item": k, "baseline": b, "candidate": c}
              for k, b, c in comp.effects.differing()]
    lo, hi = comp.match_bounds
    return {
        "syscall_match": s.syscall_match,
        "timing_variance": s.timing_variance,
        "semantic_equiv": s.semantic_equiv,
        "overall": s.overall(),
        "equivalent": comp.equivalent(t),
        "exact": comp.exact,
        "pairs": [p.to_json() for p in comp.pairs],
        "differences": diffs,
        "threshold": t,
        "normalized": not comp.raw,
        "syscall_match_bounds": [lo, hi],
        "early_out": comp.lcs.early_out,
        "over_budget": comp.lcs.over_budget,
        "events": {"baseline": comp.events[0], "candidate": comp.events[1]},
        "total_syscall_ns": {"baseline": comp.total_ns[0], "candidate": comp.total_ns[1]},
        "effects_match": comp.effects.score,
        "path_map": [r.to_json() for r in comp.path_map.rules],
        "hard_differences": comp.hard,
        "steps": steps,
        "timing": timing_changes(comp),
        "effects": {"baseline": comp.effects.baseline, "candidate": comp.effects.candidate},
        "compare_seconds": comp.lcs.seconds,
    }
