"""`renacer compare --html`: one self-contained page with inline SVG plots (nothing fetched)."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

from renacerd.escaping import escape

BASE_COLOR = "#4e79a7"
CAND_COLOR = "#f28e2b"
W, H, PAD = 760, 240, 48
MAX_BARS = 60


def _e(s: Any) -> str:
    """Captured text in the page: control characters and stray bytes escaped as in the
    text report, then HTML-escaped."""
    return html.escape(escape(s), quote=True)


def _paired_bars(title: str, labels: list[str], a: list[float], b: list[float],
                 unit: str) -> str:
    """Grouped bars: baseline and candidate per label."""
    labels, a, b = labels[:MAX_BARS], a[:MAX_BARS], b[:MAX_BARS]
    n = max(len(labels), 1)
    top = max([*a, *b, 1e-12])
    slot = (W - 2 * PAD) / n
    bw = max(slot * 0.4, 1.0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + 40}" '
             f'role="img" aria-label="{_e(title)}">',
             f'<text x="{PAD}" y="16" font-size="13" font-weight="bold">{_e(title)}</text>',
             f'<line x1="{PAD}" y1="{H}" x2="{W - PAD}" y2="{H}" stroke="#888"/>',
             f'<text x="4" y="{PAD - 6}" font-size="10">{top:.4g} {_e(unit)}</text>']
    for i, (lab, va, vb) in enumerate(zip(labels, a, b)):
        x = PAD + i * slot
        for k, (v, col) in enumerate(((va, BASE_COLOR), (vb, CAND_COLOR))):
            h = (H - PAD) * v / top
            parts.append(f'<rect x="{x + k * bw:.1f}" y="{H - h:.1f}" width="{bw:.1f}" '
                         f'height="{h:.1f}" fill="{col}"><title>{_e(lab)}: {v:.6g} {_e(unit)}'
                         f'</title></rect>')
        if n <= 24:
            parts.append(f'<text x="{x + bw:.1f}" y="{H + 12}" font-size="9" '
                         f'text-anchor="middle">{_e(lab[:14])}</text>')
    parts.append(f'<rect x="{W - 220}" y="26" width="10" height="10" fill="{BASE_COLOR}"/>'
                 f'<text x="{W - 206}" y="35" font-size="11">baseline</text>'
                 f'<rect x="{W - 140}" y="26" width="10" height="10" fill="{CAND_COLOR}"/>'
                 f'<text x="{W - 126}" y="35" font-size="11">candidate</text></svg>')
    return "".join(parts)


def _delta_bars(title: str, rows: list[tuple[str, float]], unit: str) -> str:
    """Horizontal bars around zero: growth right (orange), shrink left (blue)."""
    n = max(len(rows), 1)
    rh = 20
    height = n * rh + 40
    top = max([abs(v) for _, v in rows] + [1e-12])
    mid = W / 2 + 60
    half = W - mid - 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
             f'role="img" aria-label="{_e(title)}">',
             f'<text x="8" y="16" font-size="13" font-weight="bold">{_e(title)}</text>',
             f'<line x1="{mid}" y1="24" x2="{mid}" y2="{height - 8}" stroke="#888"/>']
    for i, (lab, v) in enumerate(rows):
        y = 28 + i * rh
        wbar = half * abs(v) / top
        x = mid if v >= 0 else mid - wbar
        col = CAND_COLOR if v >= 0 else BASE_COLOR
        parts.append(f'<text x="8" y="{y + 13}" font-size="11">{_e(lab[:28])}</text>'
                     f'<rect x="{x:.1f}" y="{y}" width="{max(wbar, 0.5):.1f}" height="{rh - 6}" '
                     f'fill="{col}"><title>{_e(lab)}: {v:+.6g} {_e(unit)}</title></rect>'
                     f'<text x="{mid + (6 if v < 0 else -6)}" y="{y + 12}" font-size="10" '
                     f'text-anchor="{"start" if v < 0 else "end"}">{v:+.4g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _summary(d: dict[str, Any], baseline: str, candidate: str) -> list[str]:
    """The title, the verdict and the table of scores."""
    verdict = "EQUIVALENT" if d["equivalent"] else "NOT EQUIVALENT"
    cls = "ok" if d["equivalent"] else "bad"
    approx = "" if d["exact"] else " (bound: not exact)"
    sections = [
        f"<h1>renacer compare: {_e(baseline)} vs {_e(candidate)}</h1>",
        f'<p class="{cls} verdict">{verdict}{_e(approx)} &mdash; overall {d["overall"]:.4f} '
        f'(threshold {d["threshold"]:.2f})</p>',
        _table(["score", "value"], [
            ["syscall_match", f"{d['syscall_match']:.4f}"],
            ["timing_variance", f"{d['timing_variance']:.4f}"],
            ["semantic_equiv", f"{d['semantic_equiv']:.4f}"],
            ["overall", f"{d['overall']:.4f}"],
            ["calls compared", f"{d['events']['baseline']} vs {d['events']['candidate']}"],
        ]),
    ]
    if d["hard_differences"]:
        items = "".join(f"<li>{_e(h)}</li>" for h in d["hard_differences"])
        sections.append(f'<h2>Hard differences</h2><ul class="bad">{items}</ul>')
    return sections


def _per_step(d: dict[str, Any]) -> list[str]:
    """Calls and syscall time of each step, side by side."""
    steps = d["steps"]
    labels = [f"{s['process'].split(' ')[0]}:{s['step']}" for s in steps]
    return ["<h2>Per step</h2>",
            _paired_bars("syscalls per step", labels,
                         [s["baseline_calls"] for s in steps],
                         [s["candidate_calls"] for s in steps], "calls"),
            _paired_bars("syscall time per step", labels,
                         [s["baseline_ns"] / 1e6 for s in steps],
                         [s["candidate_ns"] / 1e6 for s in steps], "ms")]


def _syscall_deltas(d: dict[str, Any]) -> list[str]:
    """The syscalls whose total time and call count changed most."""
    timing = d["timing"]
    return ["<h2>Top syscall deltas</h2>",
            _delta_bars("change in total time per syscall (ms)",
                        [(t["syscall"], t["delta_ns"] / 1e6) for t in timing], "ms"),
            _delta_bars("change in calls per syscall",
                        [(t["syscall"], float(t["candidate_calls"] - t["baseline_calls"]))
                         for t in timing], "calls")]


def _effects(d: dict[str, Any]) -> list[str]:
    """The files, programs, network and output that differ."""
    eff = [x for x in d["differences"] if x["kind"] == "effect"]
    sections = ["<h2>Effects diff</h2>"]
    if not eff:
        return sections + ["<p>none: same files, programs, network and output</p>"]
    return sections + [_delta_bars("effects that differ (candidate - baseline)",
                                   [(x["item"], float(x["candidate"] - x["baseline"]))
                                    for x in eff[:30]], "units"),
                       _table(["effect", "baseline", "candidate"],
                              [[x["item"], x["baseline"], x["candidate"]] for x in eff])]


def _first_divergence(d: dict[str, Any]) -> list[str]:
    """Where the compared syscall sequences first part, with the calls around it."""
    first = next((x for x in d["differences"] if x["kind"] == "first_divergence"), None)
    sections = ["<h2>First divergence</h2>"]
    if first is None:
        return sections + ["<p>none: the compared syscall sequences are identical</p>"]
    sections.append(f"<p>process {_e(first['process'])}, thread {first['thread']}, "
                    f"{_e(first['step'])}, call #{first['index']}</p>")
    for side in ("baseline", "candidate"):
        lines = "\n".join(f"{'>' if e['at'] else ' '} {e['index']:>7}  {e['event']}"
                          for e in first[side])
        sections.append(f"<h3>{side}</h3><pre>{_e(lines)}</pre>")
    return sections


def _pairings(d: dict[str, Any]) -> list[str]:
    """The paths and the processes paired between the two runs."""
    sections = []
    if d["path_map"]:
        sections.append("<h2>Paths paired</h2>")
        sections.append(_table(["baseline", "", "candidate", "why"],
                               [[m["baseline"], "\u2194", m["candidate"], m["why"]]
                                for m in d["path_map"]]))
    sections.append("<h2>Process pairing</h2>")
    sections.append(_table(["position", "comm", "baseline pid", "candidate pid", "paired"],
                           [[p["position"], p["comm"], p["baseline_pid"], p["candidate_pid"],
                             p["paired"]] for p in d["pairs"]]))
    return sections


def render_html(d: dict[str, Any], baseline: str = "baseline", candidate: str = "candidate") -> str:
    """The whole page as one string."""
    sections = (_summary(d, baseline, candidate) + _per_step(d) + _syscall_deltas(d)
                + _effects(d) + _first_divergence(d) + _pairings(d))
    return _page(f"renacer compare {baseline} vs {candidate}", sections)


STYLE = ("body{font-family:sans-serif;margin:24px;max-width:820px;color:#222}"
         "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;"
         "padding:3px 8px;font-size:13px;text-align:left}.verdict{font-size:20px;"
         "font-weight:bold}.ok{color:#1a7f37}.bad{color:#c0392b}pre{background:#f5f5f5;"
         "padding:8px;overflow:auto}svg{display:block;margin:8px 0}")


def _page(title: str, sections: list[str]) -> str:
    """A whole self-contained page."""
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")


# -- the per-rank view: step x rank heatmaps ------------------------------------------
HEAT_LOW = (247, 251, 255)
HEAT_TIME = (8, 48, 107)      # darkest: the longest step
HEAT_WAIT = (166, 54, 3)      # darkest: a step spent entirely waiting
MISSING = "#dddddd"           # the rank has no such step
STRAGGLER_COLOR = "#d62728"
MAX_COLS = 120                # more steps than this: each column is a run of steps
CELL_H = 22
LABEL_W = 70


def _mix(hi: tuple[int, int, int], t: float) -> str:
    """The colour a share t (0..1) of the way from HEAT_LOW to hi."""
    t = min(max(t, 0.0), 1.0)
    return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(HEAT_LOW, hi))


@dataclass(slots=True)
class HeatColumn:
    """One column of the heatmap: a step, or a run of steps when there are many."""

    label: str
    first: int
    last: int
    # rank -> (the step shown, its step_ms, its waiting share), the longest step of the run
    cells: dict[str, tuple[int, float, float]]
    straggler: tuple[str, int, float] | None  # (rank, step, late_ms), the latest of the run


def heat_columns(d: dict[str, Any], max_cols: int = MAX_COLS) -> list[HeatColumn]:
    """The heatmap's columns from `renacer ranks --json` data."""
    steps = d["steps"]
    per = max(1, math.ceil(len(steps) / max_cols))
    out = []
    for i in range(0, len(steps), per):
        run = steps[i:i + per]
        cells: dict[str, tuple[int, float, float]] = {}
        strag: tuple[str, int, float] | None = None
        for s in run:
            for rank, c in s["ranks"].items():
                if rank not in cells or c["step_ms"] > cells[rank][1]:
                    share = c["wait_ms"] / c["step_ms"] if c["step_ms"] > 0 else 0.0
                    cells[rank] = (s["step"], c["step_ms"], share)
            st = s["straggler"]
            if st and (strag is None or st["late_ms"] > strag[2]):
                strag = (str(st["rank"]), s["step"], st["late_ms"])
        first, last = run[0]["step"], run[-1]["step"]
        out.append(HeatColumn(str(first) if per == 1 else f"{first}-{last}", first, last,
                              cells, strag))
    return out


def _heatmap(title: str, kind: str, cols: list[HeatColumn], ranks: list[str], top: float,
             hi: tuple[int, int, int], unit: str) -> str:
    """One step x rank heatmap (kind "time": step_ms; "wait": waiting share)."""
    n = max(len(cols), 1)
    cw = max(4.0, min(28.0, (W - LABEL_W - 20) / n))
    width = LABEL_W + n * cw + 20
    height = 40 + len(ranks) * CELL_H + 40
    every = max(1, math.ceil(len(cols) / 24))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="heatmap" data-kind="{kind}" '
             f'width="{width:.0f}" height="{height}" role="img" aria-label="{_e(title)}">',
             f'<text x="8" y="16" font-size="13" font-weight="bold">{_e(title)}</text>']
    for r, rank in enumerate(ranks):
        y = 40 + r * CELL_H
        parts.append(f'<text class="rank-label" x="8" y="{y + 15}" font-size="11">'
                     f'rank {_e(rank)}</text>')
    for j, col in enumerate(cols):
        x = LABEL_W + j * cw
        if j % every == 0:
            parts.append(f'<text class="step-label" x="{x + cw / 2:.1f}" '
                         f'y="{40 + len(ranks) * CELL_H + 14}" font-size="9" '
                         f'text-anchor="middle">{_e(col.label)}</text>')
        for r, rank in enumerate(ranks):
            y = 40 + r * CELL_H
            cell = col.cells.get(rank)
            if cell is None:
                parts.append(f'<rect class="cell" data-rank="{_e(rank)}" '
                             f'data-step="{_e(col.label)}" data-value="" x="{x:.1f}" '
                             f'y="{y}" width="{cw:.1f}" height="{CELL_H - 2}" '
                             f'fill="{MISSING}"><title>rank {_e(rank)}, step '
                             f'{_e(col.label)}: no such step</title></rect>')
                continue
            step, ms, share = cell
            v = ms if kind == "time" else share
            text = f"{ms:.1f} ms" if kind == "time" else f"{100 * share:.1f}% waiting"
            parts.append(f'<rect class="cell" data-rank="{_e(rank)}" '
                         f'data-step="{_e(col.label)}" data-value="{v:.4g}" x="{x:.1f}" '
                         f'y="{y}" width="{cw:.1f}" height="{CELL_H - 2}" '
                         f'fill="{_mix(hi, v / top if top > 0 else 0.0)}"><title>rank '
                         f'{_e(rank)}, step {step}: {_e(text)}</title></rect>')
        if col.straggler is not None and col.straggler[0] in ranks:
            rank, step, late = col.straggler
            y = 40 + ranks.index(rank) * CELL_H
            parts.append(f'<rect class="straggler" data-rank="{_e(rank)}" '
                         f'data-step="{_e(col.label)}" x="{x + 1:.1f}" y="{y + 1}" '
                         f'width="{max(cw - 2, 1):.1f}" height="{CELL_H - 4}" fill="none" '
                         f'stroke="{STRAGGLER_COLOR}" stroke-width="2"><title>rank '
                         f'{_e(rank)} straggler at step {step}: others waited {late:.1f} ms'
                         f'</title></rect>')
    ly = 24
    parts.append(f'<rect x="{width - 300:.0f}" y="{ly}" width="10" height="10" '
                 f'fill="{_mix(hi, 0.0)}" stroke="#888"/>'
                 f'<text x="{width - 286:.0f}" y="{ly + 9}" font-size="10">0</text>'
                 f'<rect x="{width - 250:.0f}" y="{ly}" width="10" height="10" '
                 f'fill="{_mix(hi, 1.0)}"/><text class="scale-top" x="{width - 236:.0f}" '
                 f'y="{ly + 9}" font-size="10">{_e(f"{top:.4g} {unit}")}</text>'
                 f'<rect x="{width - 150:.0f}" y="{ly}" width="10" height="10" fill="none" '
                 f'stroke="{STRAGGLER_COLOR}" stroke-width="2"/>'
                 f'<text x="{width - 136:.0f}" y="{ly + 9}" font-size="10">straggler</text>'
                 "</svg>")
    return "".join(parts)


def rank_sections(d: dict[str, Any]) -> list[str]:
    """The per-rank view of `renacer ranks --json` data: heatmaps of step time and waiting
    share (step x rank, the straggler of each step outlined), the stragglers and the desync."""
    ranks = [str(r["rank"]) for r in d["ranks"]]
    cols = heat_columns(d)
    n_steps = len(d["steps"])
    out = ["<h2>Per rank</h2>",
           f'<p class="ranks-summary">{len(ranks)} ranks, {n_steps} steps'
           + (f", {math.ceil(n_steps / len(cols))} steps a column (the longest shown)"
              if cols and len(cols) < n_steps else "") + "</p>"]
    if not ranks or not cols:
        out.append("<p>no rank processes with step spans</p>")
        return out
    top = max((c[1] for col in cols for c in col.cells.values()), default=0.0)
    out.append(_heatmap("step time per rank (ms)", "time", cols, ranks, top, HEAT_TIME, "ms"))
    out.append(_heatmap("share of the step spent waiting for the others", "wait", cols, ranks,
                        1.0, HEAT_WAIT, "share"))
    late = [s for s in d["steps"] if s["straggler"]]
    out.append("<h3>Stragglers</h3>")
    if late:
        rows = []
        for s in late:
            st = s["straggler"]
            why = "; ".join(f"{c['syscall']}{' of ' + c['path'] if c['path'] else ''} "
                            f"{c['ms']:.1f} ms" for c in st["causes"][:3]) or "no single cause"
            rows.append([s["step"], st["rank"], f"{st['late_ms']:.1f}", why])
        out.append(_table(["step", "rank", "others waited (ms)", "cause"], rows))
    else:
        out.append(f"<p>none: no rank kept the others waiting {d['min_late_ms']:g} ms or "
                   "more</p>")
    ds = d.get("desync")
    if ds:
        calls = "; ".join(
            f"rank {r}: " + ("nothing" if c is None else
                             f"{c['op']}({c['numel']} x {c['dtype']}, group {c['group']})")
            for r, c in ds["calls"].items())
        out.append(f'<p class="bad desync">DESYNC at step {ds["step"]}, collective '
                   f'#{ds["position"]}: {_e(calls)}</p>')
    return out


def render_ranks_html(d: dict[str, Any]) -> str:
    """`renacer ranks RUN --html OUT`: the per-rank view as one page."""
    return _page(f"renacer ranks {d['run']}",
                 [f"<h1>renacer ranks: {_e(d['run'])}</h1>", *rank_sections(d)])
