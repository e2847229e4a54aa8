"""renacer compare and export on REAL traced programs (the renacerd CLI, real BPF, as root)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from renacerd.compare import compare_runs
from renacerd.io.runfile import load_golden_trace
from renacerd.store.database import Store
from renacerd.trace.effects import canonical_path
from tests.conftest import needs_root, run_cli

pytestmark = needs_root

# argv: OUTDIR EXTRA_FILE(0/1) EXIT_CODE DELAY_MS
# A child writes 5 bytes into a pipe, sleeping DELAY_MS before each; the parent blocks in
# read() for each byte, so the parent's read time scales with DELAY_MS.
PROGRAM = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char path[4096], buf[100];
    int extra = atoi(argv[2]), code = atoi(argv[3]);
    long delay = atol(argv[4]);
    memset(buf, 'x', sizeof buf);
    int p[2];
    pipe(p);
    pid_t pid = fork();
    if (pid == 0) {
        close(p[0]);
        struct timespec d = {delay / 1000, (delay % 1000) * 1000000L};
        for (int i = 0; i < 5; i++) { nanosleep(&d, 0); write(p[1], "z", 1); }
        _exit(0);
    }
    close(p[1]);
    strcpy(path, argv[1]); strcat(path, "/a.txt");
    int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    write(fd, buf, 100);
    close(fd);
    if (extra) {
        strcpy(path, argv[1]); strcat(path, "/b.txt");
        fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
        write(fd, buf, 10);
        close(fd);
    }
    for (int i = 0; i < 5; i++) read(p[0], buf, 1);
    int st;
    waitpid(pid, &st, 0);
    write(1, "done\n", 5);
    return code;
}
"""


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    import subprocess

    d = tmp_path_factory.mktemp("cmpbuild")
    (d / "p.c").write_text(PROGRAM)
    subprocess.run(["gcc", "-O1", "-o", str(d / "p"), str(d / "p.c")], check=True)
    return d / "p"


@pytest.fixture(scope="module")
def runs(prog, tmp_path_factory):
    """Five traced runs in one store: same x2, extra file, doubled blocking, other exit code."""
    d = tmp_path_factory.mktemp("cmpruns")
    db = d / "t.db"
    out = d / "out"
    out.mkdir()
    spec = {"base": ("0", "0", "40"), "same": ("0", "0", "40"), "extra": ("1", "0", "40"),
            "slow": ("0", "0", "80"), "exit": ("0", "4", "40")}
    for name, (extra, code, delay) in spec.items():
        r = run_cli("renacerd_main", "-q", "--db", str(db), "--run", name, "--",
                    str(prog), str(out), extra, code, delay)
        assert r.returncode == int(code), r.stderr
    return db


def _cmp(db, *args):
    return run_cli("compare", *args, "--db", str(db))


def test_same_program_twice_is_equivalent(runs):
    s = Store(runs)
    c = compare_runs(s.load_run("base"), s.load_run("same"))
    assert c.score.syscall_match == 1.0 and c.score.semantic_equiv == 1.0
    assert c.hard == [] and c.equivalent() and c.exact
    assert [p.to_json()["paired"] for p in c.pairs] == [True, True]
    # under /tmp, generated-looking directory names (pytest's) are canonicalised too
    assert c.effects.baseline[f"written:{canonical_path(f'{runs.parent}/out/a.txt')}"] == 100
    assert c.effects.baseline["stdio:stdout"] == 5


def test_extra_file_is_not_equivalent(runs):
    s = Store(runs)
    c = compare_runs(s.load_run("base"), s.load_run("extra"))
    b_txt = canonical_path(f"{runs.parent}/out/b.txt")
    assert c.hard == [f"file {b_txt} written only in the candidate"]
    assert not c.equivalent() and not c.score.is_equivalent()
    assert c.score.syscall_match == pytest.approx(c.events[0] / c.events[1])


def test_doubled_blocking_time_is_equivalent_with_timing_half(runs):
    s = Store(runs)
    c = compare_runs(s.load_run("base"), s.load_run("slow"))
    assert c.score.syscall_match == 1.0 and c.hard == []
    assert 0.4 <= c.score.timing_variance <= 0.6
    assert c.equivalent()


def test_other_exit_code_is_not_equivalent(runs):
    s = Store(runs)
    c = compare_runs(s.load_run("base"), s.load_run("exit"))
    assert any("baseline exit 0, candidate exit 4" in h for h in c.hard)
    assert not c.equivalent()


def test_cli_exit_codes_and_json(runs, tmp_path):
    assert _cmp(runs, "base", "same").returncode == 0
    r = _cmp(runs, "base", "extra")
    assert r.returncode == 1 and "NOT EQUIVALENT" in r.stdout and "b.txt" in r.stdout
    r = _cmp(runs, "base", "nosuchrun")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nosuchrun" in r.stderr
    assert _cmp(runs, "base", "same", "--threshold", "7").returncode == 2
    r = _cmp(runs, "base", "base", "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 0
    assert {"syscall_match", "timing_variance", "semantic_equiv", "overall", "equivalent",
            "exact", "pairs", "differences"} <= set(d)
    assert (d["syscall_match"], d["timing_variance"], d["semantic_equiv"]) == (1.0, 0.0, 1.0)
    assert d["overall"] == pytest.approx(1.0) and d["equivalent"] is True and d["exact"] is True
    d = json.loads(_cmp(runs, "base", "extra", "--json").stdout)
    assert d["equivalent"] is False
    b_txt = canonical_path(f"{runs.parent}/out/b.txt")
    assert {"kind": "effect", "item": f"written:{b_txt}", "baseline": 0,
            "candidate": 10} in d["differences"]
    bad = tmp_path / "bad.rgt"
    bad.write_bytes(b"RENACERG\x01")
    r = _cmp(runs, str(bad), "base")
    assert r.returncode == 2 and "truncated" in r.stderr


def test_running_run_is_refused(runs, tmp_path):
    import shutil
    import sqlite3

    db = tmp_path / "copy.db"
    shutil.copy(runs, db)
    con = sqlite3.connect(db)
    con.execute("UPDATE runs SET status='running', daemon_pid=1, boot_id="
                "(SELECT boot_id FROM runs WHERE name='base') WHERE name='same'")
    con.commit()
    con.close()
    r = _cmp(db, "base", "same")
    assert r.returncode == 2 and "still in progress" in r.stderr


def test_golden_round_trip(runs, tmp_path):
    g = tmp_path / "base.rgt"
    r = run_cli("export", "base", "-o", str(g), "--db", str(runs))
    assert r.returncode == 0, r.stderr
    traces = load_golden_trace(g)
    stored = Store(runs).load_run("base")
    assert [t.pid for t in traces] == [t.pid for t in stored]
    c = compare_runs(stored, traces)
    s = c.score
    assert (s.syscall_match, s.timing_variance, s.semantic_equiv) == (1.0, 0.0, 1.0)
    d = json.loads(_cmp(runs, str(g), "base", "--json").stdout)
    assert d["overall"] == pytest.approx(1.0) and d["equivalent"]


def test_perfetto_is_well_formed_and_nested(runs, tmp_path):
    out = tmp_path / "t.json"
    r = run_cli("export", "base", "-o", str(out), "--format", "perfetto", "--db", str(runs))
    assert r.returncode == 0, r.stderr
    ev = json.loads(out.read_bytes())["traceEvents"]
    stored = Store(runs).load_run("base")
    names = {e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {f"{t.process.name} ({t.pid})" for t in stored}
    slices = [e for e in ev if e["ph"] == "X"]
    assert len(slices) == sum(len(t) for t in stored)
    by_track = defaultdict(list)
    for e in slices:
        assert e["dur"] >= 0
        by_track[(e["pid"], e["tid"])].append(e)
    for track in by_track.values():
        stack: list[float] = []
        for e in sorted(track, key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1] <= e["ts"]:
                stack.pop()
            assert not stack or e["ts"] + e["dur"] <= stack[-1]  # properly nested
            stack.append(e["ts"] + e["dur"])
    r = run_cli("export", "base", "-o", str(tmp_path / "t.jsonl"), "--format", "jsonl",
                "--db", str(runs))
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert sum(x["type"] == "syscall" for x in lines) == sum(len(t) for t in stored)
