"""compare pairs paths that differ only in names, on REAL programs traced twice (root, BPF)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from renacerd.compare import compare_runs
from renacerd.store.database import Store
from tests.conftest import ROOT, needs_root, run_cli

pytestmark = needs_root

ARROW = "\u2194"

# argv: OUTDIR EXTRA(0/1) NBYTES: OUTDIR/a.txt (NBYTES), OUTDIR/sub/b.txt (10), and with
# EXTRA OUTDIR/extra.txt (5)
WRITER = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
static void put(const char *dir, const char *name, int n) {
    char path[4096], buf[4096];
    memset(buf, 'x', sizeof buf);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    write(fd, buf, n);
    close(fd);
}
int main(int argc, char **argv) {
    char sub[4096];
    snprintf(sub, sizeof sub, "%s/sub", argv[1]);
    mkdir(argv[1], 0755);
    mkdir(sub, 0755);
    put(argv[1], "a.txt", atoi(argv[3]));
    put(sub, "b.txt", 10);
    if (atoi(argv[2]))
        put(argv[1], "extra.txt", 5);
    return 0;
}
"""

# mkdtemp, mkstemp renamed into place, and a NamedTemporaryFile written and removed
PYTEMP = r"""
import os, sys, tempfile
d = tempfile.mkdtemp()
with open(os.path.join(d, "data.bin"), "wb") as f:
    f.write(b"x" * 1000)
fd, p = tempfile.mkstemp(suffix=".ckpt")
os.write(fd, b"y" * 200)
os.close(fd)
os.replace(p, os.path.join(d, "final.ckpt"))
with tempfile.NamedTemporaryFile(prefix="scratch-") as f:
    f.write(b"z" * 50)
    f.flush()
    name = f.name
print(d, name)
"""

ENV_WRITER = "import os; open(os.environ['OUTDIR'] + '/a.txt', 'w').write('x' * 10)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run in one store; returns (db, work dir, {run: stdout})."""
    d = tmp_path_factory.mktemp("cmppaths")
    db = d / "t.db"
    (d / "w.c").write_text(WRITER)
    subprocess.run(["gcc", "-O1", "-o", str(d / "w"), str(d / "w.c")], check=True)
    (d / "pytemp.py").write_text(PYTEMP)
    tmp = d / "tmp"
    tmp.mkdir()
    # the same TMPDIR for both runs of a program, as on one host; no .pyc written, so the
    # first run does not write bytecode caches the second one only reads
    env = {"TMPDIR": str(tmp), "PYTHONDONTWRITEBYTECODE": "1"}
    out = {}
    spec = {
        "demo-a": [sys.executable, str(ROOT / "examples" / "demo_train.py")],
        "demo-b": [sys.executable, str(ROOT / "examples" / "demo_train.py")],
        "py-a": [sys.executable, str(d / "pytemp.py")],
        "py-b": [sys.executable, str(d / "pytemp.py")],
        "c-a": [str(d / "w"), str(d / "out" / "run-a"), "0", "100"],
        "c-b": [str(d / "w"), str(d / "out" / "run-b"), "0", "100"],
        "c-extra": [str(d / "w"), str(d / "out" / "run-c"), "1", "100"],
        "c-bytes": [str(d / "w"), str(d / "out" / "run-d"), "0", "101"],
        "env-a": [sys.executable, "-c", ENV_WRITER],
        "env-b": [sys.executable, "-c", ENV_WRITER],
        "other-a": [sys.executable, "-c", ENV_WRITER],
        "other-b": [sys.executable, "-c", ENV_WRITER],
    }
    # the env runs write under their run's name, the other runs under unrelated names
    outdir = {"other-a": "left", "other-b": "right"}
    (d / "out").mkdir()
    for name in ("env-a", "env-b", "left", "right"):
        (d / "out" / name).mkdir()
    for name, cmd in spec.items():
        before = set(os.listdir(tmp))
        e = dict(env, OUTDIR=str(d / "out" / outdir.get(name, name)))
        r = run_cli("renacerd_main", "-q", "--db", str(db), "--run", name, "--", *cmd, env=e)
        assert r.returncode == 0, r.stderr
        out[name] = (r.stdout, sorted(set(os.listdir(tmp)) - before))
    return db, d, out


# These programs spend a few ms in syscalls, and a cold page cache on a shared machine can
# make one run 4x slower (timing_variance 0.75 seen): with syscall_match >= 0.875 and no
# hard difference, 0.75 is met whatever the timing, so the verdict is about names only.
THRESHOLD = "0.75"


def _cmp(db, *args):
    return run_cli("compare", *args, "--db", str(db), "--threshold", THRESHOLD)


def _probe(db, run: str, tmp: str) -> str:
    """The file Python's tempfile writes and removes in TMPDIR to check it is usable (an
    8-character random name, gone by the end of the run): as the run recorded it."""
    store = Store(db)
    names = {t.string(int(s)) for t in store.load_run(run) for s in t.columns["s0"] if s >= 0}
    (probe,) = [n for n in names if n.startswith(tmp + "/") and len(n) == len(tmp) + 9
                and "-" not in n[len(tmp):]]
    return probe


def _span_dir(db, run: str) -> str:
    """The directory of the span socket renacerd made for the run (RENACER_SOCKET, under
    TMPDIR, removed when the run ends): as the run recorded its connect."""
    t = Store(db).load_run(run)
    (sock,) = {t0.string(int(s)) for t0 in t for s in t0.columns["s0"] if s >= 0
               and (t0.string(int(s)) or "").startswith("unix:/")}
    return os.path.dirname(sock[len("unix:"):])


def _lines(stdout: str) -> list[str]:
    """The mapping lines of the text report."""
    text = stdout.split("paths paired (baseline \u2194 candidate):\n", 1)
    if len(text) == 1:
        return []
    return [x.strip() for x in text[1].split("\n\n", 1)[0].splitlines()]


def test_demo_twice_is_equivalent(runs):
    db, d, out = runs
    # each run left one mkdtemp directory behind: its name is the oracle
    (da,), (db_,) = out["demo-a"][1], out["demo-b"][1]
    assert da.startswith("renacer-demo-") and db_.startswith("renacer-demo-") and da != db_
    r = _cmp(db, "demo-a", "demo-b")
    assert r.returncode == 0, r.stdout
    assert "->  EQUIVALENT" in r.stdout
    assert sorted(_lines(r.stdout)) == sorted([
        f"{d}/tmp/{da}/** {ARROW} {d}/tmp/{db_}/**   (temp name)",
        f"{_probe(db, 'demo-a', f'{d}/tmp')} {ARROW} {_probe(db, 'demo-b', f'{d}/tmp')}"
        "   (temp name)",
        f"{_span_dir(db, 'demo-a')}/** {ARROW} {_span_dir(db, 'demo-b')}/**   (temp name)"])
    c = compare_runs(Store(db).load_run("demo-a"), Store(db).load_run("demo-b"))
    assert c.hard == [] and c.score.semantic_equiv == 1.0
    # 8 shards of 64 KiB plus the checkpoint, under the baseline's name on both sides
    shards = {k: v for k, v in c.effects.candidate.items() if "/shard-" in k}
    assert shards == {f"{kind}:{d}/tmp/{da}/shard-{i:03d}.bin": n for i in range(8)
                      for kind, n in (("written", 65536), ("created", 1))}


def test_python_tempfile_twice_is_equivalent(runs):
    db, d, out = runs
    (dir_a, name_a), (dir_b, name_b) = (out[r][0].split() for r in ("py-a", "py-b"))
    r = _cmp(db, "py-a", "py-b", "--json")
    j = json.loads(r.stdout)
    assert r.returncode == 0 and j["equivalent"] is True and j["hard_differences"] == []
    assert sorted((m["baseline"], m["candidate"], m["why"]) for m in j["path_map"]) == sorted([
        (f"{dir_a}/**", f"{dir_b}/**", "temp name"),
        (name_a, name_b, "temp name"),
        (_probe(db, "py-a", f"{d}/tmp"), _probe(db, "py-b", f"{d}/tmp"), "temp name"),
    ])
    assert j["effects"]["candidate"][f"written:{dir_a}/final.ckpt"] == 200


def test_other_output_dir_on_the_command_line_is_equivalent(runs, tmp_path):
    db, d, _ = runs
    r = _cmp(db, "c-a", "c-b")
    assert r.returncode == 0 and "->  EQUIVALENT" in r.stdout, r.stdout
    assert _lines(r.stdout) == [f"{d}/out/run-a/** {ARROW} {d}/out/run-b/**   (argv)"]
    html = tmp_path / "r.html"
    assert _cmp(db, "c-a", "c-b", "--html", str(html)).returncode == 0
    page = html.read_text()
    assert (f"<td>{d}/out/run-a/**</td><td>{ARROW}</td><td>{d}/out/run-b/**</td>"
            "<td>argv</td>") in page


def test_extra_file_stays_a_hard_difference(runs):
    db, d, _ = runs
    j = json.loads(_cmp(db, "c-a", "c-extra", "--json").stdout)
    assert j["equivalent"] is False
    assert j["hard_differences"] == [f"file {d}/out/run-a/extra.txt written only in the candidate"]
    assert [m["candidate"] for m in j["path_map"]] == [f"{d}/out/run-c/**"]


def test_other_byte_count_stays_a_hard_difference(runs):
    db, d, _ = runs
    r = _cmp(db, "c-a", "c-bytes")
    assert r.returncode == 1 and "NOT EQUIVALENT" in r.stdout
    j = json.loads(_cmp(db, "c-a", "c-bytes", "--json").stdout)
    assert j["hard_differences"] == [
        f"file {d}/out/run-a/a.txt: 100 bytes written in the baseline, 101 in the candidate"]


def test_directory_named_after_the_run_is_paired(runs):
    db, d, _ = runs
    r = _cmp(db, "env-a", "env-b")
    assert r.returncode == 0 and "->  EQUIVALENT" in r.stdout, r.stdout
    assert _lines(r.stdout) == [f"{d}/out/env-a/** {ARROW} {d}/out/env-b/**   (run name)"]


def test_output_dir_from_the_environment_needs_map(runs):
    db, d, _ = runs
    # the environment is not recorded with a run: a directory the program took from it is
    # a hard difference until the user pairs it
    j = json.loads(_cmp(db, "other-a", "other-b", "--json").stdout)
    assert j["equivalent"] is False and j["path_map"] == []
    assert j["hard_differences"] == [f"file {d}/out/left/a.txt written only in the baseline",
                                     f"file {d}/out/right/a.txt written only in the candidate"]
    r = _cmp(db, "other-a", "other-b", "--map", f"{d}/out/left/**={d}/out/right/**")
    assert r.returncode == 0 and "->  EQUIVALENT" in r.stdout, r.stdout
    assert _lines(r.stdout) == [f"{d}/out/left/** {ARROW} {d}/out/right/**   (--map)"]


@pytest.mark.parametrize("bad", ["nonsense", "/x", "/x=/x", "rel=/y", "/x=rel", "/a=/b=/c"])
def test_bad_map_is_one_line_exit_2(runs, bad):
    r = _cmp(runs[0], "c-a", "c-b", "--map", bad)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("renacer compare: error: --map needs ")
