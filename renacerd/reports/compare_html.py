"""`renacer compare --html`: one self-contained page with inline SVG plots (nothing fetched)."""

from __future__ import annotations

import html
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


def render_html(d: dict[str, Any], baseline: str = "baseline", candidate: str = "candidate") -> str:
    """The whole page as one string."""
    verdict = "EQUIVALENT" if d["equivalent"] else "NOT EQUIVALENT"
    cls = "ok" if d["equivalent"] else "bad"
    approx = "" if d["exact"] else " (bound: not exact)"
    steps = d["steps"]
    labels = [f"{s['process'].split(' ')[0]}:{s['step']}" for s in steps]
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
    sections.append("<h2>Per step</h2>")
    sections.append(_paired_bars("syscalls per step", labels,
                                 [s["baseline_calls"] for s in steps],
                                 [s["candidate_calls"] for s in steps], "calls"))
    sections.append(_paired_bars("syscall time per step", labels,
                                 [s["baseline_ns"] / 1e6 for s in steps],
                                 [s["candidate_ns"] / 1e6 for s in steps], "ms"))
    timing = d["timing"]
    sections.append("<h2>Top syscall deltas</h2>")
    sections.append(_delta_bars("change in total time per syscall (ms)",
                                [(t["syscall"], t["delta_ns"] / 1e6) for t in timing], "ms"))
    sections.append(_delta_bars(
        "change in calls per syscall",
        [(t["syscall"], float(t["candidate_calls"] - t["baseline_calls"])) for t in timing],
        "calls"))
    eff = [x for x in d["differences"] if x["kind"] == "effect"]
    sections.append("<h2>Effects diff</h2>")
    if eff:
        sections.append(_delta_bars("effects that differ (candidate - baseline)",
                                    [(x["item"], float(x["candidate"] - x["baseline"]))
                                     for x in eff[:30]], "units"))
        sections.append(_table(["effect", "baseline", "candidate"],
                               [[x["item"], x["baseline"], x["candidate"]] for x in eff]))
    else:
        sections.append("<p>none: same files, programs, network and output</p>")
    first = next((x for x in d["differences"] if x["kind"] == "first_divergence"), None)
    sections.append("<h2>First divergence</h2>")
    if first is None:
        sections.append("<p>none: the compared syscall sequences are identical</p>")
    else:
        sections.append(f"<p>process {_e(first['process'])}, thread {first['thread']}, "
                        f"{_e(first['step'])}, call #{first['index']}</p>")
        for side in ("baseline", "candidate"):
            lines = "\n".join(f"{'>' if e['at'] else ' '} {e['index']:>7}  {e['event']}"
                              for e in first[side])
            sections.append(f"<h3>{side}</h3><pre>{_e(lines)}</pre>")
    if d["path_map"]:
        sections.append("<h2>Paths paired</h2>")
        sections.append(_table(["baseline", "", "candidate", "why"],
                               [[m["baseline"], "\u2194", m["candidate"], m["why"]]
                                for m in d["path_map"]]))
    sections.append("<h2>Process pairing</h2>")
    sections.append(_table(["position", "comm", "baseline pid", "candidate pid", "paired"],
                           [[p["position"], p["comm"], p["baseline_pid"], p["candidate_pid"],
                             p["paired"]] for p in d["pairs"]]))
    style = ("body{font-family:sans-serif;margin:24px;max-width:820px;color:#222}"
             "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;font-size:13px;text-align:left}.verdict{font-size:20px;"
             "font-weight:bold}.ok{color:#1a7f37}.bad{color:#c0392b}pre{background:#f5f5f5;"
             "padding:8px;overflow:auto}svg{display:block;margin:8px 0}")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>renacer compare {_e(baseline)} vs {_e(candidate)}</title>"
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n")
