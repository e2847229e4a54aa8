"""Text report of `renacer compare`: scores and verdict, pairing, divergence, steps, effects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TextIO

from renacerd.escaping import escape as _esc

MAX_STEPS = 20
MAX_EFFECTS = 20


def _calls(d: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in list(d.items())[:8]) + (" ..." if len(d) > 8 else "")


def render_text(d: dict[str, Any], out: TextIO, baseline: str = "baseline",
                candidate: str = "candidate") -> None:
    """Write the human report for report_data() output."""
    w = out.write
    _header(d, w, baseline, candidate)
    _pairing(d, w)
    _divergence(d, w)
    _steps(d, w)
    _effects(d, w)
    _timing(d, w)


def _header(d: dict[str, Any], w: Callable[[str], Any], baseline: str, candidate: str) -> None:
    """The verdict and the three scores."""
    verdict = "EQUIVALENT" if d["equivalent"] else "NOT EQUIVALENT"
    le = "<=" if not d["exact"] else "="
    w(f"compare {_esc(baseline)} (baseline) vs {_esc(candidate)} (candidate)"
      f"{'' if d['normalized'] else '  [raw: no normalisation]'}\n")
    w(f"  syscall_match   {le} {d['syscall_match']:.4f}"
      f"   ({d['events']['baseline']} vs {d['events']['candidate']} calls compared)\n")
    w(f"  timing_variance = {d['timing_variance']:.4f}"
      f"   ({d['total_syscall_ns']['baseline'] / 1e6:.3f} ms vs "
      f"{d['total_syscall_ns']['candidate'] / 1e6:.3f} ms in syscalls)\n")
    w(f"  semantic_equiv  = {d['semantic_equiv']:.4f}   (effects match {d['effects_match']:.4f})\n")
    w(f"  overall         {le} {d['overall']:.4f}   threshold {d['threshold']:.2f}"
      f"  ->  {verdict}\n")
    if not d["exact"]:
        lo, hi = d["syscall_match_bounds"]
        why = ("stopped early: the match provably stays below what the threshold needs"
               if d["early_out"] else "exact work would exceed the time budget")
        w(f"  !! bound, not exact: syscall_match in [{lo:.4f}, {hi:.4f}] ({why})\n")
    for h in d["hard_differences"]:
        w(f"  !! {_esc(h)}\n")


def _pairing(d: dict[str, Any], w: Callable[[str], Any]) -> None:
    """The process pairing and the paths paired."""
    w("\nprocess pairing (position comm: baseline pid <-> candidate pid):\n")
    for p in d["pairs"]:
        b = p["baseline_pid"] if p["baseline_pid"] is not None else "-"
        c = p["candidate_pid"] if p["candidate_pid"] is not None else "-"
        flag = "" if p["paired"] else "   UNPAIRED (counts against the score)"
        w(f"  {p['position']:<8} {_esc(p['comm']):<16} {b!s:>8} <-> {c!s:<8}{flag}\n")
    if d["path_map"]:
        w("\npaths paired (baseline \u2194 candidate):\n")
        for m in d["path_map"]:
            w(f"  {_esc(m['baseline'])} \u2194 {_esc(m['candidate'])}   ({m['why']})\n")


def _divergence(d: dict[str, Any], w: Callable[[str], Any]) -> None:
    """The first divergence, with the calls around it on each side."""
    first = next((x for x in d["differences"] if x["kind"] == "first_divergence"), None)
    if first is None:
        w("\nno divergence: the compared syscall sequences are identical\n")
    else:
        w(f"\nfirst divergence: process {_esc(first['process'])}, thread {first['thread']}, "
          f"{_esc(first['step'])}, call #{first['index']}\n")
        for side in ("baseline", "candidate"):
            w(f"  {side}:\n")
            for e in first[side]:
                w(f"    {'>' if e['at'] else ' '} {e['index']:>7}  {_esc(e['event'])}\n")
            if not first[side]:
                w("      (no calls)\n")


def _steps(d: dict[str, Any], w: Callable[[str], Any]) -> None:
    """The steps whose calls differ."""
    steps = [s for s in d["steps"] if s["extra"] or s["missing"]]
    if steps:
        w(f"\nsteps that differ ({len(steps)} of {len(d['steps'])}):\n")
        for s in steps[:MAX_STEPS]:
            w(f"  {_esc(s['process'])} / {_esc(s['step'])}: {s['baseline_calls']} -> "
              f"{s['candidate_calls']} calls\n")
            if s["extra"]:
                w(f"      extra:   {_calls(s['extra'])}\n")
            if s["missing"]:
                w(f"      missing: {_calls(s['missing'])}\n")
        if len(steps) > MAX_STEPS:
            w(f"  ... {len(steps) - MAX_STEPS} more\n")


def _effects(d: dict[str, Any], w: Callable[[str], Any]) -> None:
    """The effects that differ."""
    eff = [x for x in d["differences"] if x["kind"] == "effect"]
    w("\neffects diff" + (":\n" if eff else ": none (same files, programs, network, output)\n"))
    for x in eff[:MAX_EFFECTS]:
        w(f"  {_esc(x['item']):<50} {x['baseline']:>12} -> {x['candidate']:<12}\n")
    if len(eff) > MAX_EFFECTS:
        w(f"  ... {len(eff) - MAX_EFFECTS} more\n")


def _timing(d: dict[str, Any], w: Callable[[str], Any]) -> None:
    """The biggest timing changes per syscall."""
    if d["timing"]:
        w("\nbiggest timing changes per syscall:\n")
        w(f"  {'syscall':<18} {'baseline ms':>12} {'candidate ms':>13} {'delta ms':>10}"
          f" {'calls':>15}\n")
        for t in d["timing"]:
            w(f"  {t['syscall']:<18} {t['baseline_ns'] / 1e6:12.3f} "
              f"{t['candidate_ns'] / 1e6:13.3f} {t['delta_ns'] / 1e6:+10.3f} "
              f"{t['baseline_calls']:>7}/{t['candidate_calls']:<7}\n")
