"""The client library in a training job's own venv on the oldest CPython it supports (3.9).

The project is built into a wheel, pip-installed without the daemon extra into a fresh venv
of each interpreter found, and a real client scenario runs there: no daemon first (fail-open),
then against a real SpanServer started by the test, whose records are checked exactly.
CPython 3.9 is required (skipped with a reason when absent, a failure under CI=true); newer
interpreters found on the machine (3.13) run the same check.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Optional

import pytest

from renacerd.experiment_span import StatusCode
from renacerd.serve.span_server import SpanServer
from renacerd.serve.spans import SpanBook

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REQUIRED = "3.9"
OPTIONAL = ("3.13",)
# What the daemon alone needs: the client must never import any of it.
DAEMON_ONLY = ("bcc", "numpy", "psutil", "rapidfuzz", "cxxfilt", "google.protobuf",
               "opentelemetry", "torch", "renacerd.serve", "renacerd.store.database")


def find_python(version: str) -> Optional[str]:
    """A working CPython `version` executable on PATH or under pyenv, or None."""
    exe = f"python{version}"
    candidates = [shutil.which(exe), f"/usr/bin/{exe}", f"/usr/local/bin/{exe}"]
    for root in {os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv"),
                 "/root/.pyenv"}:
        if root:
            candidates += sorted(glob.glob(f"{root}/versions/{version}*/bin/{exe}"),
                                 reverse=True)
    for path in candidates:
        if not path or not os.access(path, os.X_OK):
            continue
        # A pyenv shim on PATH exists even when it cannot run this version: ask the binary.
        try:
            probe = subprocess.run(
                [path, "-c", "import sys, platform; print(platform.python_implementation(),"
                             " '%d.%d' % sys.version_info[:2])"],
                capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0 and probe.stdout.split() == ["CPython", version]:
            return path
    return None


INTERPRETERS = [REQUIRED] + [v for v in OPTIONAL if find_python(v)]


def unavailable(reason: str) -> None:
    """Skip, except under CI=true where the client's oldest CPython must be tested."""
    if IN_CI:
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project as a wheel, built from a copy of its sources (the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "renacerd", src / "renacerd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    # The running interpreter's setuptools builds it, with no download; without setuptools
    # here, pip's isolated build fetches it.
    for isolation in (["--no-build-isolation"], []):
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--no-cache-dir",
             "-q", "-w", str(out), str(src)],
            capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr
    (whl,) = out.glob("renacerd-*.whl")
    return whl


@pytest.fixture(scope="module", params=INTERPRETERS)
def venv_python(request, tmp_path_factory) -> tuple[str, str]:
    """(version, python of a fresh venv of that CPython with the client installed)."""
    version = request.param
    base = find_python(version)
    if base is None:
        unavailable(f"no CPython {version} found (PATH, pyenv): the client supports >= 3.9")
    wheel = request.getfixturevalue("wheel")
    venv = tmp_path_factory.mktemp(f"venv{version}")
    proc = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        unavailable(f"CPython {version} cannot make a venv: {proc.stderr.strip()[-300:]}")
    python = str(venv / "bin" / "python")
    # No daemon extra: the base dependencies only (orjson), from the index or the pip cache.
    proc = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        unavailable(f"pip could not install the client for CPython {version} (offline?): "
                    f"{proc.stderr.strip()[-300:]}")
    return version, python


SCENARIO = textwrap.dedent('''
    import asyncio, json, logging, os, sys
    from importlib import metadata
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import renacerd
    from renacerd.client.core import configure, current_span, experiment_span, stats

    absent, daemon, daemon_only = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    out = {"version": "%d.%d" % sys.version_info[:2], "file": renacerd.__file__,
           "pid": os.getpid(),
           "installed": sorted(d.metadata["Name"].lower() for d in metadata.distributions())}

    def ids(s):
        return {"span": s.span_id, "parent": s.parent_span_id, "trace": s.trace_id,
                "status": s.status.name, "connected": s.connected}

    # No daemon: spans work locally, one warning, nothing raised.
    configure(socket=absent)
    with experiment_span("local-outer", model_name="gpt-2", epoch=0) as lo:
        with experiment_span("local-inner", step=1, metrics={"acc": 0.5}) as li:
            li.set(loss=0.25)
            assert current_span() is li
    try:
        with experiment_span("local-error") as le:
            raise ValueError("boom")
    except ValueError:
        pass
    out["local"] = {"outer": ids(lo), "inner": ids(li), "error": ids(le),
                    "inner_md": [li.step, li.loss, li.metrics], "stats": stats()}

    # A real daemon-side span server.
    configure(socket=daemon)
    spans = {}
    with experiment_span("epoch", model_name="gpt-2", epoch=1) as outer:
        spans["epoch"] = ids(outer)
        for step in range(3):
            with experiment_span("training_step", model_name="gpt-2", epoch=1, step=step,
                                 metrics={"accuracy": 0.9, "grad_norm": 1.5}) as s:
                s.set(loss=0.5 / (step + 1))
            spans["training_step-%d" % step] = ids(s)

    @experiment_span("decorated", step=5)
    def decorated():
        return current_span()

    spans["decorated"] = ids(decorated())

    async def nested():
        async with experiment_span("async-outer") as ao:
            await asyncio.sleep(0)
            with experiment_span("async-inner") as ai:
                await asyncio.sleep(0)
        return ao, ai

    ao, ai = asyncio.run(nested())
    spans["async-outer"], spans["async-inner"] = ids(ao), ids(ai)
    try:
        with experiment_span("failing", step=9) as f:
            raise KeyError("k")
    except KeyError:
        pass
    spans["failing"] = ids(f)
    out["spans"] = spans
    out["stats"] = stats()
    out["daemon_only"] = sorted(m for m in sys.modules
                                if any(m == d or m.startswith(d + ".") for d in daemon_only))
    print(json.dumps(out))
''')


def drain(book: SpanBook, n: int) -> list:
    """The next n records the book finishes."""
    got: list = []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        got += book.drain()
        time.sleep(0.005)
    assert len(got) == n, (got, book.counts())
    return got


def test_client_in_its_own_venv(venv_python, tmp_path):
    version, python = venv_python
    book = SpanBook(grace_ns=0)
    server = SpanServer(str(tmp_path / "d.sock"), on_message=book.handle,
                        on_disconnect=book.disconnected)
    server.start()
    try:
        script = tmp_path / "scenario.py"
        script.write_text(SCENARIO)
        # Away from the checkout and without PYTHONPATH: only the installed wheel is importable.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        proc = subprocess.run(
            [python, str(script), str(tmp_path / "absent.sock"), server.address,
             ",".join(DAEMON_ONLY)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        records = {}
        for rec in drain(book, 8):
            records.setdefault(rec.span_name, []).append(rec)
    finally:
        server.stop()

    assert out["version"] == version
    assert out["file"].startswith(str(Path(python).parent.parent)), out["file"]
    # Installed without the daemon extra: orjson is the client's one dependency.
    assert set(out["installed"]) - {"pip", "setuptools", "wheel"} == {"orjson", "renacerd"}
    assert out["daemon_only"] == []

    # Fail-open: local spans nest, the error is recorded, one warning in all.
    local = out["local"]
    assert local["inner"]["parent"] == local["outer"]["span"]
    assert local["inner"]["trace"] == local["outer"]["trace"]
    assert local["outer"]["parent"] is None
    assert [local[k]["status"] for k in ("outer", "inner", "error")] == ["OK", "OK", "ERROR"]
    assert not any(local[k]["connected"] for k in ("outer", "inner", "error"))
    assert local["inner_md"] == [1, 0.25, {"acc": 0.5}]
    assert local["stats"] == {"sent": 0, "dropped": 0, "queued": 0, "connected": False,
                              "ring": False}
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("renacerd.client.core")]
    assert len(warnings) == 1 and "not reachable" in warnings[0], proc.stderr

    # Connected: exactly the spans sent, as sent.
    spans = out["spans"]
    assert all(s["connected"] for s in spans.values())
    assert sorted(records) == ["async-inner", "async-outer", "decorated", "epoch", "failing",
                               "training_step"]
    assert all(len(v) == 1 for k, v in records.items() if k != "training_step")
    (epoch,) = records["epoch"]
    assert epoch.span_id_hex() == spans["epoch"]["span"] and epoch.parent_span_id is None
    assert epoch.attributes() == {"experiment.model_name": "gpt-2", "experiment.epoch": "1",
                                  "span.type": "experiment"}
    steps = sorted(records["training_step"], key=lambda r: r.start_mono_nanos)
    assert len(steps) == 3
    for step, rec in enumerate(steps):
        sent = spans[f"training_step-{step}"]
        assert rec.span_id_hex() == sent["span"] and rec.trace_id_hex() == sent["trace"]
        assert rec.parent_span_id == epoch.span_id and rec.trace_id == epoch.trace_id
        assert rec.attributes() == {
            "experiment.model_name": "gpt-2", "experiment.epoch": "1",
            "experiment.step": str(step), "experiment.loss": repr(0.5 / (step + 1)),
            "experiment.metrics.accuracy": "0.9", "experiment.metrics.grad_norm": "1.5",
            "span.type": "experiment"}
        assert rec.status_code is StatusCode.OK and rec.process_id == out["pid"]
        assert epoch.start_mono_nanos <= rec.start_mono_nanos <= rec.end_mono_nanos
        assert rec.end_mono_nanos <= epoch.end_mono_nanos
    (deco,) = records["decorated"]
    assert deco.parent_span_id is None and deco.attributes()["experiment.step"] == "5"
    (ao,), (ai,) = records["async-outer"], records["async-inner"]
    assert ai.parent_span_id == ao.span_id and ao.parent_span_id is None
    assert ai.span_id_hex() == spans["async-inner"]["span"]
    (failing,) = records["failing"]
    assert failing.status_code is StatusCode.ERROR and failing.status_message == "'k'"
    assert failing.attributes()["exception.type"] == "KeyError"
    assert failing.attributes()["experiment.step"] == "9"
    assert server.stats["protocol_errors"] == 0
    assert book.counts()["orphan_ends"] == 0 and book.counts()["open"] == 0
    assert out["stats"]["dropped"] == 0 and out["stats"]["connected"] and out["stats"]["ring"]
