"""The flight recorder of `renacerd serve`: runs that ask keep only the last window of full
events, every step's counts exact in the aggregates, and the window whole on a failure, a
hang or `renacer dump`."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
WINDOW_S = 1.0
STATS = 10  # os.stat calls per step: every step's count is known

JOB = r"""
import os, sys, time
from renacerd.client import core as client
sock, run, mode, marker = sys.argv[1:5]
client.configure(socket=sock, run=run, trace_timeout=60)
with open(marker, "w") as f:
    f.write("x" * 100)
fd = os.open(marker, os.O_RDONLY)  # opened before any step: its reads name it all the same
n = int(os.environ.get("STEPS", "40"))
gpu = []  # mode gpu: [runtime, kernel, the pointer of the step before]
def cuda_step(i):  # a malloc, three launches and the free of the step before's allocation
    import ctypes as C
    rt, kernel, old = gpu
    ptr = C.c_void_p()
    assert rt.cudaMalloc(C.byref(ptr), 1000 + i) == 0
    for _ in range(3):
        assert rt.cudaLaunchKernel(kernel, Dim3(2, 1, 1), Dim3(32, 1, 1), None, 0, None) == 0
    if old is not None:
        assert rt.cudaFree(old) == 0
    gpu[2] = ptr
def step(i, pause=0.05):
    with client.experiment_span("step", step=i):
        for _ in range(10):
            os.stat(marker)
        os.pread(fd, 2, 0)
        if gpu:
            cuda_step(i)
        if mode == "effects":  # bytes written under a temp name, renamed seconds later
            with open(marker + ".tmp", "a") as f:
                f.write("y" * 10)
            if i == 3:
                with open(os.fsencode(marker) + b".\xff", "wb") as f:
                    f.write(b"z" * 5)  # a name that is no UTF-8
            if i == n - 1:
                os.rename(marker + ".tmp", marker + ".out")
        if pause > 1:
            time.sleep(pause)  # inside the step: it hangs
    time.sleep(pause if pause <= 1 else 0.05)
for i in range(n):
    if mode == "gpu" and i == 1:  # the runtime opened once traced: probed within a drain
        import ctypes as C
        sys.path.insert(0, os.environ["STUBS"])
        from ctypes_app import Dim3, runtime
        rt = runtime(os.environ["CUDART"])
        rt.cudaLaunchKernel.argtypes = [C.c_void_p, Dim3, Dim3, C.c_void_p, C.c_size_t,
                                        C.c_void_p]
        time.sleep(0.3)  # then registered: its name record is seen
        rt.__cudaRegisterFunction(None, 0x10000, b"_Z4stepPf", b"_Z4stepPf", -1,
                                  None, None, None, None, None)
        gpu[:] = [rt, 0x10000, None]
    if mode == "hang" and i == 20:
        step(i, 2.0)
    else:
        step(i)
    if mode == "dump" and i == 20:
        print("ready", flush=True)
        sys.stdin.readline()
print("done", client.stats()["dropped"], flush=True)
sys.exit(3 if mode == "fail" else 0)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def flight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flight")
    os.chmod(tmp, 0o755)
    sock = str(tmp / "renacerd.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.settimeout(1)
    log = open(tmp / "service.log", "w+")
    proc = subprocess.Popen(
        [PY, "-m", "renacerd.cli.renacerd_main", "serve", "--socket", sock, "--db",
         str(tmp / "traces.db"), "--flight-recorder", f"{int(WINDOW_S * 1000)}ms",
         "--flight-hang-factor", "4"],
        env=dict(_env(), NOTIFY_SOCKET=str(tmp / "notify.sock")), stdout=log,
        stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, (
            (tmp / "service.log").read_text())
        try:
            if b"READY=1" in notify.recv(4096):
                break
        except TimeoutError:
            pass
    notify.close()
    (tmp / "job.py").write_text(JOB)
    yield tmp, sock
    proc.terminate()
    proc.wait(30)
    log.close()


def _job(tmp: Path, sock: str, run: str, mode: str, flight: bool = True,
         env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(_env(), **(env or {}))
    if flight:
        env["RENACER_FLIGHT_RECORDER"] = "1"
    return subprocess.Popen([PY, str(tmp / "job.py"), sock, run, mode, str(tmp / f"{run}.m")],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _ended(tmp: Path, run: str, timeout: float = 60) -> dict:
    """`renacer show RUN --json` once the run has ended and its flight state is final."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = _cli(tmp, "show", run, "--json")
        if r.returncode == 0:
            d = json.loads(r.stdout)
            if d["status"] != "running" and d["pruned"]:
                return d
        time.sleep(0.2)
    raise AssertionError(f"run {run} did not end: {r.stderr}\n"
                         f"{(tmp / 'service.log').read_text()}")


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "renacerd.cli.renacer_main", *args, "--db",
                           str(tmp / "traces.db")] if args[0] != "dump" else
                          [PY, "-m", "renacerd.cli.renacer_main", *args], env=_env(),
                          capture_output=True, text=True, timeout=60)


def _steps(tmp: Path, run: str) -> dict[int, int]:
    """Per step: its stat calls, from `renacer spans RUN --json`."""
    r = _cli(tmp, "spans", run, "--json")
    assert r.returncode == 0, r.stderr
    out = {}
    for s in json.loads(r.stdout):
        calls = s["syscalls"]
        out[int(s["attributes"]["experiment.step"])] = calls.get("newfstatat", 0) + calls.get(
            "statx", 0) + calls.get("stat", 0)
    return out


def _stored(tmp: Path, run: str, layer: str, what: str) -> int:
    """`what` (an aggregate over c, the run's chunks of `layer`) from the store."""
    con = sqlite3.connect(tmp / "traces.db")
    try:
        (n,) = con.execute(f"SELECT COALESCE({what}, 0) FROM chunks c JOIN runs r ON "
                           "r.id=c.run_id WHERE r.name=? AND c.layer=?", (run, layer)).fetchone()
        return n
    finally:
        con.close()


def _kept_events(tmp: Path, run: str) -> int:
    return _stored(tmp, run, "sys", "SUM(c.n)")


def _marker_reads(d: dict, tmp: Path, run: str) -> int:
    (proc,) = d["processes"]
    return proc["files"][str(tmp / f"{run}.m")]["bytes_read"]


def _finish(p: subprocess.Popen) -> tuple[int, str]:
    out, err = p.communicate(timeout=120)
    assert out.startswith("done 0"), err
    return p.returncode, out


def test_a_job_that_ends_well_keeps_aggregates_only_with_every_step_exact(flight):
    tmp, sock = flight
    code, _ = _finish(_job(tmp, sock, "fl-ok", "ok"))
    assert code == 0
    d = _ended(tmp, "fl-ok")
    fr = d["flight_recorder"]
    assert fr["window_s"] == WINDOW_S and fr["kept"] == []
    assert d["dropped"]["reason"] == "flight recorder"
    assert _kept_events(tmp, "fl-ok") == 0  # nothing went wrong: no full events kept
    # yet every step's calls are exact, folded second by second while it ran
    assert _steps(tmp, "fl-ok") == {i: STATS for i in range(40)}
    assert _marker_reads(d, tmp, "fl-ok") == 40 * 2  # 2 bytes a step, before or after a fold
    (proc,) = d["processes"]
    assert proc["syscalls"]["newfstatat"]["calls"] >= 40 * STATS
    text = _cli(tmp, "show", "fl-ok")
    assert "!! flight recorder run:" in text.stdout and "no window kept" in text.stdout


def test_a_failed_job_keeps_its_last_window(flight):
    tmp, sock = flight
    code, _ = _finish(_job(tmp, sock, "fl-fail", "fail"))
    assert code == 3  # the job's own exit status: the tracer never changes it
    d = _ended(tmp, "fl-fail")
    (w,) = d["flight_recorder"]["kept"]
    assert w["reason"] == "exit code 3"
    assert w["to_mono_ns"] - w["from_mono_ns"] == int(WINDOW_S * 1e9)
    kept = _kept_events(tmp, "fl-fail")
    # the last window (1 s of a 4 s job, plus the chunk that straddles its start) is kept
    assert 0 < kept < d["events"]
    assert _steps(tmp, "fl-fail") == {i: STATS for i in range(40)}
    assert _marker_reads(d, tmp, "fl-fail") == 40 * 2  # 2 bytes a step, before or after a fold


def test_a_hung_step_keeps_the_window(flight):
    tmp, sock = flight
    p = _job(tmp, sock, "fl-hang", "hang")
    code, _ = _finish(p)
    assert code == 0
    d = _ended(tmp, "fl-hang")
    (w,) = d["flight_recorder"]["kept"]
    assert w["reason"].startswith("hang: step 20 open "), w
    assert "over 4 x the median step" in w["reason"]
    assert _kept_events(tmp, "fl-hang") > 0
    assert _steps(tmp, "fl-hang") == {i: STATS for i in range(40)}
    assert _marker_reads(d, tmp, "fl-hang") == 40 * 2  # 2 bytes a step, before or after a fold


def test_dump_keeps_the_window_of_a_live_run(flight):
    tmp, sock = flight
    p = _job(tmp, sock, "fl-dump", "dump")
    assert p.stdout.readline() == "ready\n"
    r = _cli(tmp, "dump", "fl-dump", "--socket", sock)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("run 'fl-dump': the last 1.0 s are kept in full")
    p.stdin.write("\n")
    p.stdin.flush()
    code, _ = _finish(p)
    assert code == 0
    d = _ended(tmp, "fl-dump")
    (w,) = d["flight_recorder"]["kept"]
    assert w["reason"] == "dump by uid 0"
    assert _steps(tmp, "fl-dump") == {i: STATS for i in range(40)}
    assert _marker_reads(d, tmp, "fl-dump") == 40 * 2  # 2 bytes a step, before or after a fold


def _effects(tmp: Path, run: str) -> dict[str, int]:
    """The run's effects as compare reads them, the run's own name taken out of its paths."""
    from renacerd.store.database import Store
    from renacerd.trace.effects import run_effects

    st = Store(tmp / "traces.db")
    try:
        kept = st.stored_effects(st.run(run).id)
        items = kept if kept is not None else run_effects(st.load_run(run)).items()
    finally:
        st.close()
    # the client's own socket is the run's (its name and hello differ from run to run)
    return {k.replace(run, "RUN"): v for k, v in items.items() if "/runs/" not in k}


def test_a_flight_run_keeps_the_same_effects_as_a_full_run(flight):
    tmp, sock = flight
    full, fl = _job(tmp, sock, "fe-full", "effects", flight=False), _job(
        tmp, sock, "fe-fl", "effects")
    for p in (full, fl):
        code, _ = _finish(p)
        assert code == 0
    _ended(tmp, "fe-fl")
    assert _kept_events(tmp, "fe-fl") == 0  # every event folded, the rename seconds after
    m = str(tmp / "RUN.m")
    # tracing starts at the first step: the marker's own write is before it
    want = {f"written:{m}.out": 400, f"created:{m}.out": 1, f"written:{m}.\udcff": 5,
            f"created:{m}.\udcff": 1, "stdio:stdout": len("done 0\n")}
    got = _effects(tmp, "fe-fl")
    assert got == _effects(tmp, "fe-full")
    # the client's replies from the service (their size is the service's, not the job's)
    assert {k: v for k, v in got.items() if not k.startswith("net_recv:")} == want


def _gpu_chunks(tmp: Path, run: str) -> int:
    return _stored(tmp, run, "gpu", "count(*)")


def test_a_flight_run_folds_its_gpu_layer_with_every_count_exact(flight, tmp_path):
    import importlib.util

    stubs_dir = ROOT / "tests" / "cuda_stubs"
    spec = importlib.util.spec_from_file_location("cuda_stub_build", stubs_dir / "build.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cuda_stub_build", build)  # its dataclasses look their module up
    spec.loader.exec_module(build)
    stubs = build.build(tmp_path / "cuda")
    tmp, sock = flight
    env = {"CUDART": str(stubs.wheel_runtime), "STUBS": str(stubs_dir),
           "LD_LIBRARY_PATH": str(stubs.driver_dir)}
    full, fl = (_job(tmp, sock, "fg-full", "gpu", flight=False, env=env),
                _job(tmp, sock, "fg-fl", "gpu", env=env))
    for p in (full, fl):
        code, _ = _finish(p)
        assert code == 0
    d = _ended(tmp, "fg-fl")
    assert _gpu_chunks(tmp, "fg-fl") == 0 and _gpu_chunks(tmp, "fg-full") > 0  # all folded
    r = _cli(tmp, "show", "fg-full", "--json")
    assert r.returncode == 0, r.stderr
    (whole,) = json.loads(r.stdout)["processes"]
    (proc,) = d["processes"]
    assert proc["gpu"] == whole["gpu"]
    g = proc["gpu"]
    # steps 1-39: three launches each, a malloc each, the free of the step before's
    assert g["kernels"] == {"step(float*)": 39 * 3}
    assert g["malloc"] == {"calls": 39, "bytes": sum(1000 + i for i in range(1, 40))}
    assert g["free"] == {"calls": 38}
    assert g["outstanding"] == {"allocations": 1, "bytes": 1039}  # step 39's, across folds
    # step 1's first CUDA call opens the driver library (one more fstat): as in the full run
    assert _steps(tmp, "fg-fl") == _steps(tmp, "fg-full") == {
        i: STATS + (i == 1) for i in range(40)}


def test_dump_of_no_such_run_or_a_full_run_is_one_line_exit_2(flight):
    tmp, sock = flight
    r = _cli(tmp, "dump", "nope", "--socket", sock)
    assert r.returncode == 2
    assert r.stderr == "renacer dump: error: no live run 'nope' in this service\n"
    p = _job(tmp, sock, "fl-full", "dump", flight=False)
    assert p.stdout.readline() == "ready\n"
    r = _cli(tmp, "dump", "fl-full", "--socket", sock)
    assert r.returncode == 2
    assert r.stderr == ("renacer dump: error: run 'fl-full' keeps every event (it is no flight "
                        "recorder run)\n")
    p.stdin.write("\n")
    p.stdin.flush()
    _finish(p)
    r = _cli(tmp, "dump", "bad name!", "--socket", sock)
    assert r.returncode == 2 and r.stderr.startswith("renacer dump: error: bad run name")
    r = _cli(tmp, "dump", "x", "--socket", str(tmp / "none.sock"))
    assert r.returncode == 2 and "no renacerd service answers" in r.stderr


def test_bad_flight_flags_are_one_line_exit_2(tmp_path):
    for args, msg in ((["--flight-recorder", "soon"], "--flight-recorder: bad duration"),
                      (["--flight-hang-factor", "1"], "--flight-hang-factor must be")):
        r = subprocess.run([PY, "-m", "renacerd.cli.renacerd_main", "serve", "--socket",
                            str(tmp_path / "s"), "--db", str(tmp_path / "t.db"), *args],
                           env=_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert r.stderr.startswith(f"renacerd serve: error: {msg}"), r.stderr
        assert r.stderr.count("\n") == 1
