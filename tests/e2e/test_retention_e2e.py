"""Retention on real runs: the daemon's pass prunes them, and their reports stay the same."""

from __future__ import annotations

import json
import sys

from renacerd.store.database import Store
from renacerd.store.retention import store_size
from tests.conftest import needs_root
from tests.e2e.test_spans_e2e import STEPS

pytestmark = needs_root


def _reports(renacer, run: str) -> dict:
    show = json.loads(renacer("show", run, "--json").stdout)
    steps = json.loads(renacer("show", run, "--by", "step", "--json").stdout)
    spans = json.loads(renacer("spans", run, "--json").stdout)
    return {"show": show, "processes": show["processes"], "steps": steps["steps"],
            "spans": spans}


def test_the_daemon_prunes_to_its_budget_and_pruned_runs_read_the_same(renacerd, renacer, db,
                                                                       tmp_path):
    script = tmp_path / "steps.py"
    script.write_text(STEPS)
    for run in ("a", "b"):
        r = renacerd("-q", "--run", run, "--", sys.executable, str(script),
                     str(tmp_path / f"{run}.bin"))
        assert r.returncode == 0, r.stderr
    before = {run: _reports(renacer, run) for run in ("a", "b")}
    assert before["a"]["show"]["pruned"] is False
    full = store_size(db)
    # a budget of one byte: the pass at the start prunes a and b, the one at the end c too
    r = renacerd("-q", "--run", "c", "--retention-size", "1", "--", "true")
    assert r.returncode == 0, r.stderr
    st = Store(db)
    assert [(x.name, x.status, bool(x.pruned)) for x in st.runs()] == [
        ("a", "complete", True), ("b", "complete", True), ("c", "complete", True)]
    assert st.db.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
    st.close()
    assert store_size(db) < full
    for run in ("a", "b"):
        after = _reports(renacer, run)
        assert after["processes"] == before[run]["processes"]
        assert after["steps"] == before[run]["steps"]
        assert after["spans"] == before[run]["spans"]
        assert after["show"]["pruned"] is True
        assert after["show"]["dropped"]["reason"] == "size"
        assert after["show"]["dropped"]["events"] == before[run]["show"]["events"]
        assert [s["syscalls"]["write"] for s in after["spans"]] == [10, 20, 30, 40, 50]
        text = renacer("show", run).stdout
        assert sum("pruned by retention" in ln for ln in text.splitlines()) == 1
    runs = renacer("runs").stdout
    assert "complete*" in runs and "* pruned by retention" in runs


def test_keep_steps_on_a_real_run_keeps_first_and_last_steps_events(renacerd, renacer, db,
                                                                     tmp_path):
    script = tmp_path / "steps.py"
    script.write_text(STEPS)
    r = renacerd("-q", "--run", "k", "--", sys.executable, str(script), str(tmp_path / "k.bin"))
    assert r.returncode == 0, r.stderr
    before = _reports(renacer, "k")
    flagged = {str(s["step"]) for s in before["steps"] if s["outliers"]}
    r = renacer("gc", "--keep-steps", "1")
    assert r.returncode == 0 and r.stdout.startswith("pruned k (keep-steps)"), r.stdout
    after = _reports(renacer, "k")
    for key in ("processes", "steps", "spans"):
        assert after[key] == before[key]
    kept = after["show"]["dropped"]["kept"]
    assert kept["steps"]["1"][0] == "first" and kept["steps"]["5"][0] == "last"
    # and one sample: the middle one of the ordinary steps between them
    rest = [k for k in ("2", "3", "4") if k not in flagged]
    sample = {rest[len(rest) // 2]} if rest else set()
    assert set(kept["steps"]) == {"1", "5"} | flagged | sample
    assert set(kept["dropped_steps"]) == {"2", "3", "4"} - flagged - sample
    # the writes of the dropped steps are gone from the events, the kept ones all there
    t = Store(db).load_run("k")[0]
    writes = t.names() == "write"
    per_step = {}
    for i in set(t.span_index[writes].tolist()) - {-1}:
        step = t.spans[i].attributes()["experiment.step"]
        per_step[step] = int((writes & (t.span_index == i)).sum())
    assert per_step == {k: int(k) * 10 for k in kept["steps"]}
