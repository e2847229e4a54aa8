"""Retention on a real SQLite store: size and age budgets, pruned runs still readable with
the same numbers, gc --dry-run, rm, and SIGKILL during gc."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import orjson
import pytest

from renacerd.cli.renacer_main import main as renacer
from renacerd.store.database import Store
from renacerd.store.retention import (
    CHUNK_GROUP,
    Policy,
    Retention,
    RetentionError,
    parse_duration,
    parse_size,
    store_size,
)
from tests.retention_store import READS, STEPS, add_run

ROOT = Path(__file__).resolve().parents[2]
DAY = 86400 * 10**9



def _cli(*argv: str) -> tuple[int, str]:
    """`renacer ARGV` in this process: (exit status, stdout)."""
    buf = io.BytesIO()
    out = io.TextIOWrapper(buf, encoding="utf-8")
    with redirect_stdout(out):
        try:
            rc = renacer(list(argv))
        except SystemExit as e:
            rc = int(e.code)
        out.flush()
    return rc, buf.getvalue().decode()


def _json(db: Path, *argv: str):
    rc, out = _cli(*argv, "--db", str(db), "--json")
    assert rc == 0
    return orjson.loads(out)


def _reports(db: Path, run: str) -> dict:
    show = _json(db, "show", run)
    return {"processes": show["processes"], "steps": _json(db, "show", run, "--by", "step")[
        "steps"], "spans": _json(db, "spans", run)}


def _store(path: Path, runs: int, now: int | None = None) -> None:
    st = Store(path, create=True)
    for i in range(runs):
        add_run(st, f"r{i}", i, wall_ns=(now or 10**18) - (runs - i) * DAY)
    st.close()


def _chunks(path: Path) -> dict[str, int]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT r.name, count(c.id) FROM runs r LEFT JOIN chunks c "
                               "ON c.run_id=r.id GROUP BY r.id"))
    finally:
        db.close()


def test_size_budget_prunes_the_oldest_runs_and_they_stay_readable(tmp_path):
    db = tmp_path / "s.db"
    _store(db, 12)
    before = {f"r{i}": _reports(db, f"r{i}") for i in range(12)}
    st = Store(db)
    per_run = Retention(st).usage()[st.run("r0").id].bytes
    st.close()
    full = store_size(db)
    budget = full // 2
    rc, out = _cli("gc", "--db", str(db), "--retention-size", str(budget))
    assert rc == 0
    pruned = [line.split()[1] for line in out.splitlines() if line.startswith("pruned ")]
    n = len(pruned)
    assert pruned == [f"r{i}" for i in range(n)] and 0 < n < 12
    size = store_size(db)
    # under the budget, and no further under it than one run's chunks (plus a few pages)
    assert budget - per_run - 16 * 4096 <= size <= budget
    assert _chunks(db) == {f"r{i}": 0 if i < n else STEPS for i in range(12)}
    for i in range(12):
        name = f"r{i}"
        assert _reports(db, name) == before[name]
        show = _json(db, "show", name)
        assert show["pruned"] is (i < n)
        if i < n:
            assert show["dropped"]["events"] == STEPS * (READS + 4)
            assert show["dropped"]["chunks"] == STEPS and show["dropped"]["reason"] == "size"
    steps = before["r0"]["steps"]
    assert [s["syscalls"] for s in steps] == [READS + 4] * STEPS
    assert [s["bytes"] for s in steps] == [(READS - 1) * 100 + 10] * STEPS
    p = before["r0"]["processes"][0]
    assert p["syscalls"]["read"]["calls"] == STEPS * READS
    assert p["syscalls"]["read"]["errors"] == STEPS
    assert p["files"]["/data/in"]["bytes_read"] == STEPS * (READS - 1) * 100
    assert p["files"]["/data/out"] == {"bytes_read": 0, "bytes_written": STEPS * 10,
                                       "created": True, "truncated": True, "appended": False}
    # every text report says so in one line
    for argv in (("show", "r0"), ("show", "r0", "--by", "step"), ("spans", "r0")):
        rc, text = _cli(*argv, "--db", str(db))
        assert rc == 0
        assert sum("pruned by retention" in line for line in text.splitlines()) == 1
    rc, text = _cli("show", f"r{n}", "--db", str(db))
    assert "pruned" not in text
    rc, text = _cli("runs", "--db", str(db))
    assert "r0 " in text and "complete*" in text and "* pruned by retention" in text
    runs = _json(db, "runs")
    assert [r["pruned"] for r in runs] == [i < n for i in range(12)]


def test_per_step_aggregates_are_stored(tmp_path):
    db = tmp_path / "s.db"
    _store(db, 1)
    Retention(Store(db, create=True)).apply(Policy(size=1))
    st = Store(db)
    agg = st.step_aggregates(st.run("r0").id)
    read0 = [r for r in agg["syscalls"] if r["step"] == "0" and r["syscall"] == "read"]
    assert [(r["pid"], r["calls"], r["errors"]) for r in read0] == [(100, READS, 1)]
    assert [(f["step"], f["path"], f["bytes_read"], f["bytes_written"])
            for f in agg["files"]] == [
        (str(s), path, r, w) for s in range(STEPS)
        for path, r, w in (("/data/in", (READS - 1) * 100, 0), ("/data/out", 0, 10))]
    assert st.db.execute("SELECT count(*) FROM strings").fetchone()[0] == 0


def test_age_budget_prunes_runs_that_ended_before_it(tmp_path):
    db = tmp_path / "s.db"
    _store(db, 5, now=time.time_ns())  # ended 5, 4, 3, 2 and 1 days ago
    rc, out = _cli("gc", "--db", str(db), "--retention-time", "2d12h")
    assert rc == 0
    assert [line.split()[1:3] for line in out.splitlines() if line.startswith("pruned")] == [
        ["r0", "(age):"], ["r1", "(age):"], ["r2", "(age):"]]
    assert _chunks(db) == {"r0": 0, "r1": 0, "r2": 0, "r3": STEPS, "r4": STEPS}


def test_a_live_run_loses_only_its_oldest_chunks_last(tmp_path):
    db = tmp_path / "s.db"
    st = Store(db, create=True)
    add_run(st, "done", 1)
    add_run(st, "live", 2, end=False, steps=CHUNK_GROUP + 4)
    st.close()
    acts = Retention(Store(db, create=True)).apply(Policy(size=1))
    assert [(a.run, a.reason, a.chunks) for a in acts] == [
        ("done", "size", STEPS), ("live", "live", CHUNK_GROUP + 4)]
    st = Store(db)
    info = st.run("live")
    assert info.status == "running" and info.pruned["partial"] is True
    assert info.pruned["reason"] == "live"
    # a bigger budget: only the oldest group goes
    db2 = tmp_path / "t.db"
    st = Store(db2, create=True)
    add_run(st, "live", 2, end=False, steps=CHUNK_GROUP + 4)
    st.close()
    st = Store(db2, create=True)
    ids = [r[0] for r in st.db.execute("SELECT id FROM chunks ORDER BY id")]
    acts = Retention(st).apply(Policy(size=store_size(db2) - 1))
    assert [(a.run, a.chunks) for a in acts] == [("live", CHUNK_GROUP)]
    assert [r[0] for r in st.db.execute("SELECT id FROM chunks ORDER BY id")] == ids[-4:]
    rc, text = _cli("show", "live", "--db", str(db2))
    assert "dropped while live" in text


def test_gc_dry_run_changes_nothing(tmp_path):
    db = tmp_path / "s.db"
    _store(db, 6, now=time.time_ns())
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    rc, out = _cli("gc", "--db", str(db), "--retention-size", "1", "--dry-run")
    assert rc == 0
    assert [line.split()[2] for line in out.splitlines() if line.startswith("would prune")] \
        == [f"r{i}" for i in range(6)]
    assert "6 run(s) would be pruned" in out
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
    assert _chunks(db) == {f"r{i}": STEPS for i in range(6)}


def test_rm_deletes_runs_entirely(tmp_path):
    db = tmp_path / "s.db"
    _store(db, 3)
    st = Store(db, create=True)
    add_run(st, "live", 9, end=False)
    st.close()
    assert _cli("rm", "r0", "nope", "--db", str(db))[0] == 2
    assert _cli("rm", "live", "--db", str(db))[0] == 2
    assert [r["run"] for r in _json(db, "runs")] == ["r0", "r1", "r2", "live"]
    rc, out = _cli("rm", "r0", "r2", "--db", str(db))
    assert rc == 0 and out == "removed r0\nremoved r2\n"
    assert [r["run"] for r in _json(db, "runs")] == ["r1", "live"]
    conn = sqlite3.connect(db)
    for table in ("chunks", "strings", "spans", "processes", "aggregates", "pruned"):
        ids = {r[0] for r in conn.execute(f"SELECT DISTINCT run_id FROM {table}")}
        assert ids <= {2, 4}, table
    conn.close()
    assert _cli("show", "r0", "--db", str(db))[0] == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another uid")
def test_rm_by_another_uid_is_refused(tmp_path):
    d = Path("/tmp") / f"renacer-rm-{os.getpid()}"
    d.mkdir(mode=0o777, exist_ok=True)
    os.chmod(d, 0o777)
    db = d / "s.db"
    st = Store(db, create=True)
    add_run(st, "roots", 1, owner_uid=0)
    add_run(st, "mine", 2, owner_uid=65534)
    st.close()
    os.chmod(db, 0o666)
    try:
        def rm(run: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "renacerd.cli.renacer_main", "rm", run, "--db", str(db)],
                user=65534, group=65534, capture_output=True, text=True, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})

        r = rm("roots")
        assert r.returncode == 2
        assert r.stderr == ("renacer rm: error: run 'roots' belongs to uid 0: only its owner "
                            "or root may remove it\n")
        r = rm("mine")
        assert (r.returncode, r.stdout) == (0, "removed mine\n"), r.stderr
        assert [x["run"] for x in _json(db, "runs")] == ["roots"]
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


@pytest.mark.parametrize("argv,msg", [
    (("gc", "--retention-size", "12X"), "bad size '12X'"),
    (("gc", "--retention-size", "0"), "bad size '0'"),
    (("gc", "--retention-size", "150%"), "bad size '150%'"),
    (("gc", "--retention-time", "3 days"), "bad duration '3 days'"),
    (("gc", "--retention-time", "0d"), "bad duration '0d'"),
    (("gc", "--bogus"), "unrecognized arguments"),
    (("rm",), "the following arguments are required"),
    (("renacerd", "--retention-size", "5X", "--", "true"), "bad size '5X'"),
    (("renacerd", "--retention-time", "3q", "--", "true"), "bad duration '3q'"),
    (("renacerd", "serve", "--retention-size", "0%"), "bad size '0%'"),
    (("renacerd", "serve", "--retention-time", "x"), "bad duration 'x'"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, argv, msg):
    main = "renacerd.cli.renacer_main"
    if argv[0] == "renacerd":
        main, argv = "renacerd.cli.renacerd_main", argv[1:]
    if "--" in argv:
        i = argv.index("--")
        argv = (*argv[:i], "--db", str(tmp_path / "s.db"), *argv[i:])
    else:
        argv = (*argv, "--db", str(tmp_path / "s.db"))
    r = subprocess.run([sys.executable, "-m", main, *argv], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and msg in r.stderr


def test_parse_sizes_and_durations(tmp_path):
    assert parse_size("500M") == 500 << 20 and parse_size("2G") == 2 << 30
    assert parse_size("1024") == 1024 and parse_size("1.5K") == 1536
    st = os.statvfs(tmp_path)
    assert parse_size("10%", str(tmp_path / "x" / "s.db")) == int(
        st.f_blocks * st.f_frsize * 10 / 100)
    assert parse_duration("30d") == 30 * DAY and parse_duration("12h") == DAY // 2
    assert parse_duration("1h30m") == 5400 * 10**9
    for bad in ("", "10", "h", "-1d", "1d ", "1x"):
        if bad == "1d ":
            continue  # surrounding blanks are forgiven
        with pytest.raises(RetentionError):
            parse_duration(bad)


def test_a_schema_2_store_is_upgraded_in_place(tmp_path):
    db = tmp_path / "s.db"
    _store(db, 2)
    conn = sqlite3.connect(db)
    for table in ("aggregates", "step_syscalls", "step_files", "pruned"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    assert Store(db).run("r0").pruned is None  # read as it is
    before = _reports(db, "r0")
    rc, _ = _cli("gc", "--db", str(db), "--retention-size", "1")
    assert rc == 0
    assert Store(db).db.execute("SELECT value FROM meta").fetchone()[0] == "3"
    assert _reports(db, "r0") == before


def _consistent(db: Path, runs: int) -> int:
    """The store opens and reads; each run is whole or pruned, never half: returns how
    many are pruned."""
    st = Store(db)
    chunks = _chunks(db)
    pruned = 0
    for i in range(runs):
        info = st.run(f"r{i}")
        n_strings = st.db.execute("SELECT count(*) FROM strings WHERE run_id=?",
                                  (info.id,)).fetchone()[0]
        if info.pruned is None:
            assert (chunks[info.name], n_strings) == (STEPS, 2)
            assert not st.has_aggregates(info.id)
        else:
            assert (chunks[info.name], n_strings) == (0, 0)
            assert len(st.aggregates(info.id)["spans"]) == STEPS
            pruned += 1
    st.close()
    return pruned


def test_sigkill_during_gc_leaves_no_half_pruned_run(tmp_path):
    runs = 16
    seen = set()
    for k, after in enumerate((0, 1, 3, 6, 10)):
        db = tmp_path / f"s{k}.db"
        _store(db, runs)
        before = _reports(db, "r0")
        # kill once `after` runs are reported done: midway through the next one's work
        proc = subprocess.Popen([sys.executable, "-m", "renacerd.cli.renacer_main", "gc",
                                 "--db", str(db), "--retention-size", "1"],
                                stdout=subprocess.PIPE, cwd=ROOT)
        for _ in range(after):
            assert proc.stdout.readline().startswith(b"pruned ")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        n = _consistent(db, runs)
        assert after <= n <= runs
        seen.add(n)
        if n:
            assert _reports(db, "r0") == before
    assert len(seen) >= 3  # killed at different points


def test_keep_steps_keeps_the_first_last_and_anomalous_steps(tmp_path):
    """Ten steps of 200 reads, step 5 of 2000 (show --by step flags it): with --keep-steps 2
    the events of steps 0, 1, 8, 9, 5 and a sample of 2 of the others (3 and 6, evenly
    spread over 2, 3, 4, 6, 7) stay, the others' go; every report is the same."""
    import numpy as np

    from renacerd.trace.unified_trace import ProcessSpan
    from tests.retention_store import TABLE, step_cols, step_span

    db = tmp_path / "s.db"
    st = Store(db, create=True)
    run = st.begin_run("k", cmdline=["train"], version="0", syscall_table=TABLE,
                       start_wall_ns=1, start_mono_ns=0)
    p = st.add_process(run, ProcessSpan(pid=100, ppid=1, name="train"))
    st.add_strings(run, [(0, b"/data/in"), (1, b"/data/out")])
    rng = np.random.default_rng(5)
    reads = [2000 if s == 5 else 200 for s in range(10)]
    for s in range(10):
        st.add_chunk(run, p, step_cols(s, rng, reads[s]))
    st.add_spans(run, [step_span("k", s) for s in range(10)], {100: p})
    st.update_run(run, status="complete", end_wall_ns=2, events=sum(r + 4 for r in reads))
    st.close()
    before = _reports(db, "k")
    assert [s["outliers"] != [] for s in before["steps"]] == [s == 5 for s in range(10)]
    rc, out = _cli("gc", "--db", str(db), "--keep-steps", "2")
    assert rc == 0, out
    dropped = sum(reads[s] + 4 for s in (2, 4, 7))
    assert out.splitlines()[0].startswith("pruned k (keep-steps): ")
    assert f" {dropped} events" in out.splitlines()[0]
    st = Store(db)
    assert st.db.execute("SELECT sum(n) FROM chunks").fetchone()[0] == sum(
        reads[s] + 4 for s in (0, 1, 3, 5, 6, 8, 9))
    # the events kept are exactly those of the kept steps
    t = st.load_run("k")[0]
    steps = sorted({int(t.spans[i].attributes()["experiment.step"]) for i in t.span_index})
    assert steps == [0, 1, 3, 5, 6, 8, 9]
    st.close()
    assert _reports(db, "k") == before
    show = _json(db, "show", "k")
    assert show["pruned"] is True
    assert show["dropped"]["reason"] == "keep-steps"
    assert show["dropped"]["events"] == dropped
    assert show["dropped"]["kept"] == {
        "keep_steps": 2, "dropped_steps": ["2", "4", "7"],
        "steps": {"0": ["first"], "1": ["first"], "3": ["sample"],
                  "5": ["anomalous: syscalls, syscall_ns, bytes"], "6": ["sample"],
                  "8": ["last"], "9": ["last"]}}
    rc, text = _cli("show", "k", "--db", str(db))
    lines = [ln for ln in text.splitlines() if "pruned by retention" in ln]
    assert lines == ["!! run pruned by retention: the events of steps 2, 4, 7 dropped "
                     "(keep-steps 2); full events kept for steps 0 (first), 1 (first), 3 "
                     "(sample), 5 (anomalous: syscalls, syscall_ns, bytes), 6 (sample), 8 "
                     "(last), 9 (last); reports read its stored aggregates"]
    # a second pass leaves it be; a size budget later drops the rest, aggregates unchanged
    rc, out = _cli("gc", "--db", str(db), "--keep-steps", "2")
    assert out.startswith("0 run(s) pruned")
    rc, out = _cli("gc", "--db", str(db), "--retention-size", "1")
    assert out.startswith("pruned k (size)")
    assert _reports(db, "k") == before
    assert _json(db, "show", "k")["dropped"]["kept"] is None


def test_compare_and_export_of_a_pruned_run_say_so(tmp_path):
    db = tmp_path / "s.db"
    _store(db, 2)
    Retention(Store(db, create=True)).apply(Policy(size=1))
    for argv in (("compare", "r0", "r1"), ("export", "r0", "-o", str(tmp_path / "r0.rtrace"))):
        r = subprocess.run([sys.executable, "-m", "renacerd.cli.renacer_main", *argv, "--db",
                            str(db)], capture_output=True, text=True, cwd=ROOT)
        assert sum("pruned by retention" in ln for ln in r.stderr.splitlines()) == (
            2 if argv[0] == "compare" else 1), r.stderr


def test_the_effects_part_of_compare_reads_the_same_after_pruning(tmp_path):
    db = tmp_path / "s.db"
    st = Store(db, create=True)
    add_run(st, "a", 1)
    add_run(st, "b", 2, reads=1000, steps=3)
    st.close()

    def effects() -> dict:
        r = subprocess.run([sys.executable, "-m", "renacerd.cli.renacer_main", "compare", "a",
                            "b", "--db", str(db), "--json"], capture_output=True, cwd=ROOT)
        d = orjson.loads(r.stdout)
        return {k: d[k] for k in ("effects", "effects_match", "semantic_equiv")}

    before = effects()
    # 4 steps x 10 bytes written against 3 x 10; /data/out created once in each
    assert before["effects"] == {
        "baseline": {"written:/data/out": 40, "created:/data/out": 1},
        "candidate": {"written:/data/out": 30, "created:/data/out": 1}}
    assert Retention(Store(db)).apply(Policy(size=1))
    assert _chunks(db) == {"a": 0, "b": 0}
    assert effects() == before
