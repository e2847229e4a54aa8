"""Captured strings are data: terminal escapes and newlines never reach output raw."""

from __future__ import annotations

import json
import sys

from tests.conftest import needs_root

pytestmark = needs_root

HOSTILE = "evil\x1b[31mRED\nnext\x07line.txt"
SCRIPT = f"""
import os, sys
open(os.path.join(sys.argv[1], {HOSTILE!r}), "w").write("x" * 10_000_000)
"""


def test_hostile_file_names_are_escaped_everywhere(renacerd, renacer, tmp_path):
    script = tmp_path / "hostile.py"
    script.write_text(SCRIPT)
    for run in ("a", "b"):
        r = renacerd("-q", "--run", run, "--", sys.executable, str(script), str(tmp_path))
        assert r.returncode == 0, r.stderr
    text = renacer("show", "a").stdout
    assert "\x1b" not in text and "\x07" not in text
    data = json.loads(renacer("show", "a", "--json").stdout)
    assert str(tmp_path / HOSTILE) in data["processes"][0]["files"]  # JSON keeps the real name
    cmp = renacer("compare", "a", "b")
    assert "\x1b" not in cmp.stdout and "\x07" not in cmp.stdout
    html = tmp_path / "r.html"
    renacer("compare", "a", "b", "--html", str(html))
    page = html.read_text()
    assert "\x1b" not in page and "\x07" not in page
