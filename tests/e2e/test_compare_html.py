"""The HTML comparison report and the per-rank view render in headless Chromium (Debian
package `chromium`)."""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
import zlib

import pytest

from renacerd.compare import compare_runs
from renacerd.compare.report import report_data
from renacerd.reports.compare_html import (
    HEAT_TIME,
    HEAT_WAIT,
    MISSING,
    _mix,
    heat_columns,
    render_html,
    render_ranks_html,
)
from tests.unit.test_compare_unit import Run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = '/data/<script>alert("x")</script>&.bin'


def _run(extra: bool) -> list:
    r = Run()
    p = r.proc(10, "trainer", fds={1: "/dev/pts/0"})
    p.call("openat", ret=3, s0=HOSTILE).call("write", ret=101 if extra else 100, a0=3)
    p.call("close", a0=3)
    for _ in range(3 if extra else 2):
        p.call("read", ret=10, a0=0, dur=5000).call("write", ret=7, a0=1)
    return r.traces


def _png_pixels(data: bytes) -> bytes:
    """Decompressed scanlines of a PNG (enough to see whether anything was drawn)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    off, idat = 8, b""
    while off < len(data):
        (n,) = struct.unpack(">I", data[off:off + 4])
        kind = data[off + 4:off + 8]
        if kind == b"IDAT":
            idat += data[off + 8:off + 8 + n]
        off += 12 + n
    return zlib.decompress(idat)


def test_html_is_self_contained_and_escaped():
    page = render_html(report_data(compare_runs(_run(False), _run(True))), "<b>", "cand")
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "&lt;b&gt;" in page
    for fetch in ("http://", "https://", "src=", "@import", "url("):
        assert fetch not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert page.count("<svg") == 5  # 2 per-step plots, 2 delta plots, 1 effects plot


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render_html(report_data(compare_runs(_run(False), _run(True)))))
    png = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={png}", "--window-size=900,1400", page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert png.exists() and png.stat().st_size > 10_000
    pixels = _png_pixels(png.read_bytes())
    # a blank page decompresses to a handful of byte values; plots and text give many
    assert len(set(pixels)) > 50


# -- the per-rank view ---------------------------------------------------------------
def _cell(step_ms: float, wait_ms: float) -> dict:
    return {"step_ms": step_ms, "wait_ms": wait_ms, "work_ms": step_ms - wait_ms}


def _ranks_data() -> dict:
    """`renacer ranks --json` of 3 ranks and 4 steps: rank 2 late at step 3 (the others
    waited 300 ms for it), rank 1's trace ends before step 4."""
    steps = []
    for k in (1, 2, 3, 4):
        per = {"0": _cell(100.0, 20.0), "1": _cell(100.0, 25.0), "2": _cell(100.0, 10.0)}
        strag = None
        if k == 3:
            per = {"0": _cell(400.0, 320.0), "1": _cell(400.0, 300.0), "2": _cell(400.0, 0.0)}
            strag = {"rank": 2, "late_ms": 310.0, "causes": [
                {"syscall": "fsync", "path": HOSTILE, "ms": 298.5, "calls": 1,
                 "total_ms": 298.5}]}
        if k == 4:
            del per["1"]
        steps.append({"step": k, "ranks": per, "straggler": strag, "everyone_slow": False,
                      "after_desync": False})
    return {"run": "job<1>", "status": "complete", "min_late_ms": 10.0,
            "ranks": [{"rank": r} for r in (0, 1, 2)], "steps": steps, "stragglers": [],
            "slow_steps": [], "desync": None, "waiting": []}


# Run in the page by the test (the report itself has no script): every heatmap cell, mark
# and label as Chromium laid it out, written into the DOM that --dump-dom prints.
LAYOUT_JS = """<script>
const box = e => { const b = e.getBoundingClientRect();
  return [Math.round(b.x), Math.round(b.y), Math.round(b.width), Math.round(b.height)]; };
const out = [];
for (const svg of document.querySelectorAll("svg.heatmap")) {
  const kind = svg.dataset.kind;
  for (const c of svg.querySelectorAll("rect.cell"))
    out.push(["cell", kind, c.dataset.rank, c.dataset.step, c.dataset.value,
              c.getAttribute("fill"), ...box(c)]);
  for (const c of svg.querySelectorAll("rect.straggler"))
    out.push(["straggler", kind, c.dataset.rank, c.dataset.step, "", "", ...box(c)]);
  for (const t of svg.querySelectorAll("text.rank-label, text.step-label"))
    out.push([t.getAttribute("class"), kind, t.textContent, "", "", "", ...box(t)]);
}
const pre = document.createElement("pre");
pre.id = "layout";
pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


def test_rank_heatmap_columns_and_escaping():
    page = render_ranks_html(_ranks_data())
    assert "<script" not in page and "&lt;script&gt;" in page and "job&lt;1&gt;" in page
    assert page.count('class="heatmap"') == 2
    assert page.count('class="straggler"') == 2  # one mark in each heatmap
    assert f'fill="#{"".join(f"{c:02x}" for c in HEAT_TIME)}"' in page
    assert f'fill="{MISSING}"' in page
    # many steps: runs of steps a column, each showing its longest step and latest straggler
    d = _ranks_data()
    d["steps"] = [dict(s, step=k) for k in range(1, 251)
                  for s in [d["steps"][1 if k != 200 else 2]]]
    cols = heat_columns(d)
    assert len(cols) == 84 and cols[0].label == "1-3" and cols[-1].label == "250-250"
    assert [c.label for c in cols if c.straggler] == ["199-201"]
    assert cols[66].straggler == ("2", 200, 310.0)
    assert cols[66].cells["0"] == (200, 400.0, 0.8)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_rank_heatmap_in_headless_chromium(tmp_path):
    page = render_ranks_html(_ranks_data())
    html_file = tmp_path / "ranks.html"
    html_file.write_text(page.replace("</body>", LAYOUT_JS + "</body>"))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                        "--virtual-time-budget=5000", "--window-size=900,1400", "--dump-dom",
                        html_file.as_uri()], capture_output=True, timeout=120, check=False)
    m = re.search(r'<pre id="layout">(.*?)</pre>', r.stdout.decode())
    assert m, r.stderr[-2000:]
    rows = json.loads(html.unescape(m.group(1)))
    cells = {(k, rk, st): (v, fill, (x, y, w, h))
             for kind, k, rk, st, v, fill, x, y, w, h in rows if kind == "cell"}
    hex_ = "#" + "".join(f"{c:02x}" for c in HEAT_TIME)
    # every rank x step, with its value; rank 1 has no step 4
    assert {key: v for key, (v, _, _) in cells.items() if key[0] == "time"} == {
        ("time", r_, s): ("400" if s == "3" else "100") if (r_, s) != ("1", "4") else ""
        for r_ in "012" for s in "1234"}
    assert {key: v for key, (v, _, _) in cells.items() if key[0] == "wait"} == {
        ("wait", "0", "1"): "0.2", ("wait", "1", "1"): "0.25", ("wait", "2", "1"): "0.1",
        ("wait", "0", "2"): "0.2", ("wait", "1", "2"): "0.25", ("wait", "2", "2"): "0.1",
        ("wait", "0", "3"): "0.8", ("wait", "1", "3"): "0.75", ("wait", "2", "3"): "0",
        ("wait", "0", "4"): "0.2", ("wait", "1", "4"): "", ("wait", "2", "4"): "0.1"}
    assert cells[("time", "0", "3")][1] == hex_ and cells[("time", "0", "1")][1] == _mix(
        HEAT_TIME, 0.25)
    assert cells[("wait", "0", "3")][1] == _mix(HEAT_WAIT, 0.8)
    assert cells[("time", "1", "4")][1] == MISSING
    # laid out as a grid: a column per step left to right, a row per rank top to bottom
    for kind in ("time", "wait"):
        xs = [{cells[(kind, r_, s)][2][0] for r_ in "012"} for s in "1234"]
        ys = [{cells[(kind, r_, s)][2][1] for s in "1234"} for r_ in "012"]
        assert all(len(v) == 1 for v in [*xs, *ys])  # aligned columns and rows
        col_x = [cells[(kind, "0", s)][2][0] for s in "1234"]
        row_y = [cells[(kind, r_, "1")][2][1] for r_ in "012"]
        assert col_x == sorted(col_x) and len(set(col_x)) == 4
        assert row_y == sorted(row_y) and len(set(row_y)) == 3
        # the straggler's mark lies inside rank 2's cell of step 3, and nowhere else
        marks = [(rk, st, (x, y, w, h)) for kind_, k, rk, st, _, _, x, y, w, h in rows
                 if kind_ == "straggler" and k == kind]
        assert [(rk, st) for rk, st, _ in marks] == [("2", "3")]
        mx, my, mw, mh = marks[0][2]
        cx, cy, cw, ch = cells[(kind, "2", "3")][2]
        assert cx <= mx and cy <= my and mx + mw <= cx + cw + 1 and my + mh <= cy + ch + 1
        # the labels: ranks down the left, each on its row; steps under their columns
        labels = [(c, t, x, y, w, h) for c, k, t, _, _, _, x, y, w, h in rows
                  if k == kind and c in ("rank-label", "step-label")]
        assert [t for c, t, *_ in labels if c == "rank-label"] == ["rank 0", "rank 1",
                                                                   "rank 2"]
        assert [t for c, t, *_ in labels if c == "step-label"] == ["1", "2", "3", "4"]
        for (_, _, x, y, w, h), ry in zip([lb for lb in labels if lb[0] == "rank-label"],
                                          row_y):
            assert ry <= y + h / 2 <= ry + cells[(kind, "0", "1")][2][3]
            assert x + w <= col_x[0]
        for (_, _, x, _, w, _), cx_ in zip([lb for lb in labels if lb[0] == "step-label"],
                                           col_x):
            assert cx_ <= x + w / 2 <= cx_ + cells[(kind, "0", "1")][2][2] + 1
