"""The HTML comparison report renders in headless Chromium (Debian package `chromium`)."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib

import pytest

from renacerd.compare import compare_runs
from renacerd.compare.report import report_data
from renacerd.reports.compare_html import render_html
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
    html = tmp_path / "report.html"
    html.write_text(render_html(report_data(compare_runs(_run(False), _run(True)))))
    png = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={png}", "--window-size=900,1400", html.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert png.exists() and png.stat().st_size > 10_000
    pixels = _png_pixels(png.read_bytes())
    # a blank page decompresses to a handful of byte values; plots and text give many
    assert len(set(pixels)) > 50
