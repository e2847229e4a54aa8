"""Every example of the README runs: the quickstart's commands, then each Python block."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

from tests.conftest import ROOT, needs_root

pytestmark = needs_root
README = (ROOT / "README.md").read_text()


def _blocks(lang: str, section: str) -> list[str]:
    """The ```lang blocks of one `## section`."""
    start = README.index(f"## {section}\n")
    end = README.find("\n## ", start + 1)
    body = README[start : end if end > 0 else None]
    return re.findall(rf"```{lang}\n(.*?)```", body, re.S)


def _env(db) -> dict[str, str]:
    env = dict(os.environ, RENACER_DB=str(db), PYTHONPATH=str(ROOT))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    return env


def test_quickstart_commands_and_python_examples_run(tmp_path):
    """Each quickstart line exits 0 (compare: 0 or 1, its verdict), then each Python block of
    the README runs against the runs they made."""
    db = tmp_path / "traces.db"
    env = _env(db)
    (cmds,) = _blocks("sh", "Quickstart")
    lines = [ln.split("#", 1)[0].strip() for ln in cmds.splitlines()]
    assert len([ln for ln in lines if ln]) == 7
    for line in filter(None, lines):
        argv = shlex.split(line)
        p = subprocess.run(argv, cwd=tmp_path if argv[1] == "compare" else ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        allowed = (0, 1) if argv[:2] == ["renacer", "compare"] else (0,)
        assert p.returncode in allowed, (line, p.stdout[-2000:], p.stderr[-2000:])
    assert (tmp_path / "compare.html").read_text().startswith("<!DOCTYPE html>")
    blocks = _blocks("python", "Quickstart") + _blocks("python", "Python API")
    assert len(blocks) == 3
    for code in blocks:
        p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (code, p.stderr[-2000:])
        assert "Traceback" not in p.stderr
