"""renacer ranks on real torchrun jobs (gloo on CPU, 3 ranks, 20 steps) traced by renacerd:
one rank made late at chosen steps by a chosen cause, and a desync."""

from __future__ import annotations

import os
import re
import socket
import sys

import orjson
import pytest

from tests.conftest import ROOT, needs_root, run_cli

pytestmark = needs_root

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3"]
JOB = str(ROOT / "tests" / "e2e" / "torch_dist_job.py")
# Scheduling noise on a loaded 2-CPU machine delays a rank by tens of ms at most; each cause
# below makes its rank late by 250 ms or more, so 100 ms tells the two apart.
MIN_LATE = "100"
SLEEP, READ, FSYNC = 5, 9, 13  # the steps made late, by rank 2, 1 and 0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trace(db, run: str, *job_args: str, port: int):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return run_cli("renacerd_main", "--db", str(db), "--run", run, "-q", "--", *TORCHRUN,
                   "--master-port", str(port), JOB, *job_args, env=env, timeout=300)


@pytest.fixture(scope="module")
def late_job(tmp_path_factory):
    d = tmp_path_factory.mktemp("late")
    db = d / "t.db"
    fifo, ckpt = d / "slow.fifo", d / "ckpt-0.bin"
    port = _port()
    r = _trace(db, "late", "--steps", "20", "--late", f"{SLEEP}:2:sleep:400",
               "--late", f"{READ}:1:read:{fifo}", "--late", f"{FSYNC}:0:fsync:{ckpt}",
               port=port)
    assert r.returncode == 0, r.stderr
    ckpt.unlink()
    ranks = run_cli("renacer_main", "ranks", "late", "--db", str(db), "--json",
                    "--min-late-ms", MIN_LATE)
    assert ranks.returncode == 0, ranks.stderr
    return SimpleJob(db, orjson.loads(ranks.stdout), port, fifo, ckpt)


class SimpleJob:
    """A traced job: its store, `renacer ranks --json`, its master port and files."""

    def __init__(self, db, data, port, fifo, ckpt) -> None:
        self.db, self.data, self.port, self.fifo, self.ckpt = db, data, port, fifo, ckpt


def _workers(db, run: str) -> list[dict]:
    show = run_cli("renacer_main", "show", run, "--db", str(db), "--json")
    assert show.returncode == 0, show.stderr
    procs = orjson.loads(show.stdout)["processes"]
    return [p for p in procs if JOB in p["argv"] and "torch.distributed.run" not in p["argv"]]


def test_every_rank_process_is_labelled(late_job):
    d = late_job.data
    workers = {p["pid"]: p for p in _workers(late_job.db, "late")}
    assert len(workers) == 3
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in d["ranks"]] == [
        (0, 0, 3), (1, 1, 3), (2, 2, 3)]
    assert {r["pid"] for r in d["ranks"]} == set(workers)
    host = socket.gethostname()
    for r in d["ranks"]:
        assert (r["host"], r["source"], r["steps"]) == (host, "env", 20)
        # torchrun's standalone rendezvous: MASTER_ADDR 127.0.0.1 and our port name the job
        assert r["job_id"] == f"127.0.0.1:{late_job.port}"
        assert workers[r["pid"]]["rank"]["rank"] == r["rank"]
    # `renacer show` lists them; the launcher itself has no rank
    text = run_cli("renacer_main", "show", "late", "--db", str(late_job.db)).stdout
    for r in d["ranks"]:
        (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(f"{r['pid']} ")]
        assert f" [exit 0] rank {r['rank']}/3 local {r['rank']} " in line
    show = orjson.loads(run_cli("renacer_main", "show", "late", "--db", str(late_job.db),
                                "--json").stdout)
    assert [p["rank"] for p in show["processes"] if p["pid"] not in workers] == [None]


def test_step_times_per_rank(late_job):
    steps = late_job.data["steps"]
    assert [s["step"] for s in steps] == list(range(20))
    for s in steps:
        assert sorted(s["ranks"]) == ["0", "1", "2"]
        for c in s["ranks"].values():
            # two all_reduce calls per step; the parts are rounded to the microsecond
            assert c["collectives"] == 2
            assert abs(c["wait_ms"] + c["work_ms"] - c["step_ms"]) <= 0.002
            assert c["wait_ms"] >= c["collective_ms"] > 0


def test_straggler_rank_step_and_cause(late_job):
    by_step = {s["step"]: s["straggler"] for s in late_job.data["steps"]}
    sleep, read, fsync = by_step[SLEEP], by_step[READ], by_step[FSYNC]
    assert (sleep["rank"], read["rank"], fsync["rank"]) == (2, 1, 0)
    top = sleep["causes"][0]
    assert (top["syscall"], top["path"], top["calls"]) == ("clock_nanosleep", None, 1)
    assert top["total_ms"] >= 400  # a 400 ms sleep takes at least that
    top = read["causes"][0]
    # one read of the writer's 4,096 bytes (a pipe write of PIPE_BUF is atomic), one of EOF
    assert (top["syscall"], top["path"], top["calls"]) == ("read", str(late_job.fifo), 2)
    assert top["total_ms"] >= 400  # the writer waits 400 ms before it writes
    top = fsync["causes"][0]
    assert (top["syscall"], top["path"], top["calls"]) == ("fsync", str(late_job.ckpt), 1)
    for s in (sleep, read, fsync):
        assert s["late_ms"] >= float(MIN_LATE)


def test_no_straggler_on_normal_steps(late_job):
    normal = [s for s in late_job.data["steps"] if s["step"] not in (SLEEP, READ, FSYNC)]
    assert [s["step"] for s in normal if s["straggler"] is not None] == []
    # each rank was late once in 20 steps: none is a repeat straggler
    assert [(s["rank"], s["steps"], s["repeat"]) for s in late_job.data["stragglers"]] == [
        (0, 1, False), (1, 1, False), (2, 1, False)]
    assert late_job.data["desync"] is None and late_job.data["waiting"] == []


def test_text_report_names_the_cause(late_job):
    r = run_cli("renacer_main", "ranks", "late", "--db", str(late_job.db), "--min-late-ms",
                MIN_LATE)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.split()[:1] == [str(FSYNC)])
    assert "rank 0 late " in line and f"fsync of {late_job.ckpt} " in line


def test_html_heatmap_marks_the_stragglers(late_job, tmp_path):
    page = tmp_path / "ranks.html"
    r = run_cli("renacer_main", "ranks", "late", "--db", str(late_job.db), "--min-late-ms",
                MIN_LATE, "--html", str(page))
    assert r.returncode == 0, r.stderr
    text = page.read_text()
    # two heatmaps (time, waiting share), each 3 ranks x 20 steps, each straggler outlined
    assert text.count('<rect class="cell"') == 2 * 3 * 20
    marks = re.findall(r'class="straggler" data-rank="(\d+)" data-step="(\d+)"', text)
    assert marks == [("2", str(SLEEP)), ("1", str(READ)), ("0", str(FSYNC))] * 2
    bad = run_cli("renacer_main", "ranks", "late", "--db", str(late_job.db), "--html",
                  str(tmp_path / "no" / "such" / "dir.html"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


def test_desync_step_position_and_ranks(tmp_path):
    # At step 7 rank 1's loss all_reduce has 5 elements, the others' 1: gloo fails or times
    # out (3 s), torchrun stops the job, and the trace holds what each rank called.
    db = tmp_path / "t.db"
    r = _trace(db, "desync", "--steps", "20", "--desync", "7:1:5", "--timeout", "3",
               port=_port())
    assert r.returncode != 0
    out = run_cli("renacer_main", "ranks", "desync", "--db", str(db), "--json")
    assert out.returncode == 0, out.stderr
    d = orjson.loads(out.stdout)
    ds = d["desync"]
    assert (ds["step"], ds["position"], ds["ranks"]) == (7, 1, [1])
    # the group's calls: one barrier, then two per step: step 7's second is number 17
    call = {"op": "all_reduce", "dtype": "float32", "group": 0, "seq": 17}
    assert ds["calls"] == {"0": {**call, "numel": 1}, "1": {**call, "numel": 5},
                           "2": {**call, "numel": 1}}
    assert all(s["straggler"] is None for s in d["steps"] if s["step"] >= 7)
    assert [s["after_desync"] for s in d["steps"]] == [s["step"] >= 7 for s in d["steps"]]
    # every rank failed in, or never left, a collective at step 7 or after
    assert {w["rank"] for w in d["waiting"]} == {0, 1, 2}
    assert all(w["step"] >= 7 for w in d["waiting"])


def test_bad_arguments_exit_2(late_job):
    for args in (["ranks", "nope"], ["ranks", "late", "--min-late-ms", "nan"],
                 ["ranks", "late", "--min-late-ms", "-1"]):
        r = run_cli("renacer_main", *args, "--db", str(late_job.db))
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert os.path.exists(late_job.db)
