"""Experiment spans end to end: real daemon, real client processes, exact tagging."""

from __future__ import annotations

import json
import sys

from renacerd.store.database import Store
from tests.conftest import needs_root

pytestmark = needs_root

STEPS = r"""
import os, sys
from renacerd.client.core import experiment_span
out = sys.argv[1]
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for k in range(1, 6):
    with experiment_span("training_step", model_name="m", epoch=1, step=k) as span:
        for _ in range(k * 10):
            os.write(fd, b"x")
        span.set(loss=1.0 / k, metrics={"acc": 0.5})
os.write(fd, b"outside")
os.close(fd)
"""


def _write_count(trace, span_idx: int) -> int:
    names = trace.names()
    return int(((names == "write") & (trace.span_index == span_idx)).sum())


def test_step_k_has_exactly_k_times_10_writes(renacerd, renacer, db, tmp_path):
    script = tmp_path / "steps.py"
    script.write_text(STEPS)
    out = tmp_path / "out.bin"
    r = renacerd("-q", "--run", "steps", "--", sys.executable, str(script), str(out))
    assert r.returncode == 0, r.stderr
    traces = Store(db).load_run("steps")
    t = traces[0]
    assert len(t.spans) == 5
    for i, sp in enumerate(t.spans):
        attrs = sp.attributes()
        assert attrs["experiment.step"] == str(i + 1)
        assert attrs["experiment.model_name"] == "m"
        assert sp.status_code == 1
        assert _write_count(t, i) == (i + 1) * 10
    # the write after the last span belongs to none
    writes = t.names() == "write"
    assert int((writes & (t.span_index == -1)).sum()) == 1
    d = json.loads(renacer("spans", "steps", "--json").stdout)
    assert [s["syscalls"]["write"] for s in d] == [10, 20, 30, 40, 50]
    assert [s["attributes"]["experiment.loss"] for s in d] == ["1", "0.5", "0.3333333333333333",
                                                              "0.25", "0.2"]
    by_step = Store(db).query_by_attribute("experiment.step", "steps")
    assert sorted(by_step) == ["1", "2", "3", "4", "5"]
    assert by_step["3"][0][1]["calls"]["write"] == 30
    st = json.loads(renacer("show", "steps", "--by", "step", "--json").stdout)
    assert [s["step"] for s in st["steps"]] == ["1", "2", "3", "4", "5"]


NESTED_FORK = r"""
import os, sys
from renacerd.client.core import experiment_span
with experiment_span("epoch", model_name="m", epoch=3):
    with experiment_span("training_step", model_name="m", epoch=3, step=7):
        pid = os.fork()
        if pid == 0:
            with experiment_span("worker", model_name="m"):
                for _ in range(4):
                    os.getppid()
            os._exit(0)
        os.waitpid(pid, 0)
        for _ in range(3):
            os.getppid()
"""


def test_nested_spans_and_forked_child(renacerd, db, tmp_path):
    script = tmp_path / "nested.py"
    script.write_text(NESTED_FORK)
    r = renacerd("-q", "--run", "nested", "--", sys.executable, str(script))
    assert r.returncode == 0, r.stderr
    parent, child = Store(db).load_run("nested")
    spans = {s.span_name: (i, s) for i, s in enumerate(parent.spans)}
    (_, epoch), (it, step), (iw, worker) = spans["epoch"], spans["training_step"], spans["worker"]
    assert step.parent_span_id == epoch.span_id and step.trace_id == epoch.trace_id
    assert worker.process_id == child.pid and worker.parent_span_id == step.span_id
    names_p, names_c = parent.names(), child.names()
    assert int(((names_p == "getppid") & (parent.span_index == it)).sum()) == 3
    assert int(((names_c == "getppid") & (child.span_index == iw)).sum()) == 4


KILLED = r"""
import os, signal
from renacerd.client.core import experiment_span
with experiment_span("training_step", model_name="m", step=1):
    os.getppid()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_client_killed_mid_span(renacerd, db, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    r = renacerd("-q", "--run", "killed", "--", sys.executable, str(script))
    assert r.returncode == 128 + 9
    (t,) = Store(db).load_run("killed")
    assert t.process.exit_signal == 9 and t.process.exit_code is None
    (sp,) = t.spans
    assert sp.status_code == 2
    assert "exited" in sp.status_message
    assert sp.end_mono_nanos == t.process.end_mono_ns
