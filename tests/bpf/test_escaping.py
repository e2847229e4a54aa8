"""Captured strings are data: terminal escapes and newlines never reach output raw."""

from __future__ import annotations

import json
import os
import subprocess
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


def test_escape_and_json_text_exact():
    from renacerd.escaping import decode, escape, json_safe, json_text

    name = decode(b"caf\xc3\xa9 \xe9\xff\x1b[2J\n\\x\x9b")  # UTF-8 é, two stray bytes
    assert escape(name) == "café \\xe9\\xff\\x1b[2J\\n\\\\x\\x9b"
    assert escape("plain/path.txt") == "plain/path.txt"
    assert escape("a\u200bb\u0085") == "a\\u200bb\\u0085"  # \x only ever means a byte
    assert json_text(name) == "café \\xe9\\xff\x1b[2J\n\\x\\x9b"
    assert json_safe({name: [name, 1]}) == {json_text(name): [json_text(name), 1]}
    assert name.encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xe9\xff\x1b[2J\n\\x\x9b"


def _run_b(args: list[bytes], cwd) -> subprocess.CompletedProcess:
    from tests.conftest import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable.encode(), b"-m", b"renacerd.cli.renacer_main", *args],
                          capture_output=True, env=env, cwd=cwd, timeout=120)


def test_non_utf8_argv_paths_and_run_names_everywhere(tmp_path, db):
    """`renacerd -- sh -c "echo x > \\xe9\\x1b.txt"` with a run name holding \\xe9: no crash,
    every byte kept in the store, and each output shows them escaped, exactly."""
    from renacerd.io.runfile import read_golden
    from renacerd.store.database import Store
    from tests.conftest import ROOT

    target = os.fsencode(tmp_path) + b"/\xe9\x1b.txt"
    script = b"echo x > " + target
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for run in (b"r\xe9", b"b\xe9"):
        r = subprocess.run([sys.executable.encode(), b"-m", b"renacerd.cli.renacerd_main",
                            b"--db", os.fsencode(db), b"--run", run, b"--", b"sh", b"-c", script],
                           capture_output=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
    assert b"renacerd: tracing run b\\xe9 (store " in r.stderr
    assert open(target, "rb").read() == b"x\n"
    esc_target = str(tmp_path) + "/\\xe9\\x1b.txt"  # escape(): text outputs
    json_target = str(tmp_path) + "/\\xe9\x1b.txt"  # json_text(): control chars left to JSON
    d = os.fsencode(db)

    # the store keeps the bytes
    st = Store(db)
    assert [x.name for x in st.runs()] == ["r\udce9", "b\udce9"]
    ((_, proc),) = st.processes(st.run("r\udce9").id)
    assert [os.fsencode(a) for a in proc.argv] == [b"sh", b"-c", script]
    assert os.fsencode(st.run("r\udce9").cmdline[2]) == script
    assert target in st.strings(st.run("r\udce9").id)

    # text
    out = _run_b([b"show", b"r\xe9", b"--db", d], tmp_path).stdout.decode()
    assert out.startswith("run r\\xe9  status complete")
    assert f"command: sh -c echo x > {esc_target}\n" in out
    assert f" sh [exit 0] sh -c echo x > {esc_target}\n" in out
    assert f"  {esc_target[:38]:<38}          0            2  created,truncated\n" in out
    runs = _run_b([b"runs", b"--db", d], tmp_path).stdout.decode()
    assert f"sh -c echo x > {esc_target}"[:60] in runs
    assert [ln.split()[0] for ln in runs.splitlines()[1:]] == ["r\\xe9", "b\\xe9"]
    cmp = _run_b([b"compare", b"r\xe9", b"b\xe9", b"--db", d], tmp_path).stdout.decode()
    assert cmp.startswith("compare r\\xe9 (baseline) vs b\\xe9 (candidate)\n")

    # JSON
    js = json.loads(_run_b([b"show", b"r\xe9", b"--db", d, b"--json"], tmp_path).stdout)
    assert js["run"] == "r\\xe9"
    assert js["cmdline"] == js["processes"][0]["argv"] == ["sh", "-c", f"echo x > {json_target}"]
    f = js["processes"][0]["files"][json_target]
    assert (f["bytes_read"], f["bytes_written"]) == (0, 2)
    rj = json.loads(_run_b([b"runs", b"--db", d, b"--json"], tmp_path).stdout)
    assert [x["run"] for x in rj] == ["r\\xe9", "b\\xe9"]
    cj = json.loads(_run_b([b"compare", b"r\xe9", b"b\xe9", b"--db", d, b"--json"],
                           tmp_path).stdout)
    assert cj["equivalent"] is True

    # HTML
    page = tmp_path / "c.html"
    _run_b([b"compare", b"r\xe9", b"b\xe9", b"--db", d, b"--html", os.fsencode(page)], tmp_path)
    html = page.read_text(encoding="utf-8")
    assert "<title>renacer compare r\\xe9 vs b\\xe9</title>" in html
    assert "\x1b" not in html

    # exports
    for fmt in (b"jsonl", b"perfetto", b"golden"):
        r = _run_b([b"export", b"r\xe9", b"--db", d, b"--format", fmt, b"-o",
                    os.fsencode(tmp_path / f"x.{fmt.decode()}")], tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stderr.startswith(b"renacer export: r\\xe9: 1 processes")
    lines = [json.loads(x) for x in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert lines[0]["argv"] == ["sh", "-c", f"echo x > {json_target}"]
    assert any(x.get("name") == "openat" and x.get("path") == json_target for x in lines)
    trace = json.loads((tmp_path / "x.perfetto").read_text())
    assert any(e.get("args", {}).get("path") == json_target for e in trace["traceEvents"])
    assert trace["otherData"] == {"run": "r\\xe9"}
    info, traces = read_golden(tmp_path / "x.golden")  # lossless: the bytes come back
    assert [os.fsencode(a) for a in traces[0].process.argv] == [b"sh", b"-c", script]
    assert os.fsencode(info["name"]) == b"r\xe9"


def test_span_names_and_metric_keys_are_escaped(renacerd, renacer, tmp_path):
    prog = tmp_path / "spans.py"
    prog.write_text(
        "from renacerd.client.core import experiment_span\n"
        "with experiment_span('st\\x1b]0;pwned\\x07\\x1b[2J', step=1,\n"
        "                     metrics={'lr\\x1b[31m': 0.5}):\n"
        "    pass\n")
    r = renacerd("-q", "--run", "sp", "--", sys.executable, str(prog))
    assert r.returncode == 0, r.stderr
    out = renacer("spans", "sp").stdout
    assert "\x1b" not in out and "\x07" not in out
    (row,) = out.splitlines()[1:]
    assert " st\\x1b]0;pwned\\x07\\x " in row  # the name column: 20 characters of the escape
    assert " metrics.lr\\x1b[31m=0.5 " in row
    data = json.loads(renacer("spans", "sp", "--json").stdout)
    assert data[0]["name"] == "st\x1b]0;pwned\x07\x1b[2J"  # JSON keeps the real name
