"""The priority guard: a real process lifted from SCHED_IDLE while a ring fills or its
flushes stop, lowered again when the ring drains; and the daemon's own policy in a run."""

import json
import mmap
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time

import psutil
import pytest

from renacerd.capture.priority import _RingFill, guard, set_process_policy
from tests.conftest import ROOT, needs_root

PAGE = mmap.PAGESIZE
SIZE = 16 * PAGE


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def idle_child():
    p = subprocess.Popen(["sleep", "60"])
    set_process_policy(p.pid, idle=True)
    yield p
    p.kill()
    p.wait()


def test_guard_lifts_on_a_filling_ring_or_late_flushes(idle_child):
    fd = os.memfd_create("ring")
    os.ftruncate(fd, 2 * PAGE)
    ring = mmap.mmap(fd, 2 * PAGE)
    counter = mmap.mmap(-1, PAGE)
    beat = threading.Event()

    def heartbeat():  # the daemon's flushes, on time
        while not beat.is_set():
            struct.pack_into("<Q", counter, 8, time.monotonic_ns())
            time.sleep(0.05)

    hb = threading.Thread(target=heartbeat)
    hb.start()
    stop = threading.Event()
    t = threading.Thread(target=guard, args=(idle_child.pid, [_RingFill(fd, SIZE)], counter),
                         kwargs=dict(alive=lambda: not stop.is_set(), calm_s=0.2))
    t.start()
    try:
        policy = lambda: os.sched_getscheduler(idle_child.pid)  # noqa: E731
        assert policy() == os.SCHED_IDLE
        struct.pack_into("<Q", ring, PAGE, SIZE // 8)  # producer 1/8 ahead: keeping up
        time.sleep(0.2)
        assert policy() == os.SCHED_IDLE
        struct.pack_into("<Q", ring, PAGE, SIZE // 2)  # half full: falling behind
        assert wait_for(lambda: policy() == os.SCHED_OTHER)
        assert struct.unpack_from("<Q", counter)[0] == 1
        struct.pack_into("<Q", ring, 0, SIZE // 2)  # consumer caught up
        assert wait_for(lambda: policy() == os.SCHED_IDLE)
        assert struct.unpack_from("<Q", counter)[0] == 1
        beat.set()  # the daemon stops flushing: starved
        hb.join()
        assert wait_for(lambda: policy() == os.SCHED_OTHER)
        assert struct.unpack_from("<Q", counter)[0] == 2
    finally:
        beat.set()
        stop.set()
        hb.join()
        t.join()
        ring.close()
        os.close(fd)


@needs_root
def test_daemon_runs_idle_and_the_command_does_not(tmp_path):
    """The launched command keeps its normal policy; the daemon's threads run SCHED_IDLE
    and a guard process watches the rings; the run records 0 escalations."""
    prog = tmp_path / "policy.py"
    prog.write_text("import os, time\nprint(os.sched_getscheduler(0), flush=True)\n"
                    "time.sleep(1.5)\n")
    db = tmp_path / "t.db"
    d = subprocess.Popen(
        [sys.executable, "-m", "renacerd.cli.renacerd_main", "--db", str(db), "--run", "p",
         "--cuda", "off", "--priority", "idle", "--", sys.executable, str(prog)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    seen = {}

    def sample():
        if not any(f"renacerd.capture.priority --pid {d.pid} " in
                   " ".join(p.info["cmdline"] or []) + " "
                   for p in psutil.process_iter(["cmdline"])):
            return False
        seen["policies"] = _policies(d.pid)
        return seen["policies"] == {os.SCHED_IDLE}  # lowered just after the guard starts

    assert wait_for(sample), seen
    out, err = d.communicate(timeout=60)
    assert d.returncode == 0, err
    assert out.strip() == str(os.SCHED_OTHER)
    con = sqlite3.connect(db)
    counters = json.loads(
        con.execute("SELECT source_counters FROM runs WHERE name='p'").fetchone()[0])
    con.close()
    assert counters["priority_escalations"] == 0


def _policies(pid: int) -> set[int]:
    try:
        return {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}
    except OSError:
        return set()


def _wait_for_marker(tmp_path) -> tuple[str, str]:
    """A command that runs until the test creates its marker file."""
    marker = tmp_path / "go"
    prog = tmp_path / "wait.py"
    prog.write_text(f"import os, time\nwhile not os.path.exists({str(marker)!r}):\n"
                    "    time.sleep(0.05)\n")
    return str(prog), str(marker)


@needs_root
def test_a_stopped_daemon_is_lifted_then_lowered_again(tmp_path):
    """SIGSTOP the daemon: its flushes stop, the guard lifts every thread to SCHED_OTHER;
    once it flushes on time again the guard lowers it; the run counts one lift."""
    prog, marker = _wait_for_marker(tmp_path)
    db = tmp_path / "t.db"
    d = subprocess.Popen(
        [sys.executable, "-m", "renacerd.cli.renacerd_main", "--db", str(db), "--run", "s",
         "--cuda", "off", "--priority", "idle", "--", sys.executable, prog],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert wait_for(lambda: _policies(d.pid) == {os.SCHED_IDLE}, 60), d.pid
        os.kill(d.pid, signal.SIGSTOP)
        try:
            assert wait_for(lambda: _policies(d.pid) == {os.SCHED_OTHER}, 5)
        finally:
            os.kill(d.pid, signal.SIGCONT)
        assert wait_for(lambda: _policies(d.pid) == {os.SCHED_IDLE}, 10)
    finally:
        open(marker, "w").close()
    out, err = d.communicate(timeout=60)
    assert d.returncode == 0, err
    assert "priority: lifted to normal 1 times" in err, err
    con = sqlite3.connect(db)
    counters = json.loads(
        con.execute("SELECT source_counters FROM runs WHERE name='s'").fetchone()[0])
    con.close()
    assert (counters["priority_escalations"], counters["priority_guard_died"]) == (1, 0)


@needs_root
def test_a_daemon_that_could_not_be_lifted_stays_normal(tmp_path):
    """Without CAP_SYS_NICE and with RLIMIT_NICE 0 the kernel refuses SCHED_IDLE ->
    SCHED_OTHER: the daemon says so in one line and never lowers itself."""
    prog, marker = _wait_for_marker(tmp_path)
    db = tmp_path / "t.db"
    d = subprocess.Popen(
        ["prlimit", "--nice=0:0", "setpriv",
         "--bounding-set=-all,+bpf,+perfmon,+sys_ptrace,+chown", "--inh-caps=-all", "--",
         sys.executable, "-m", "renacerd.cli.renacerd_main", "--db", str(db), "--run", "n",
         "--cuda", "off", "--priority", "idle", "--", sys.executable, prog],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    said = []
    try:
        while not said or said[-1].startswith("renacerd: tracing run"):
            said.append(d.stderr.readline())
        assert _policies(d.pid) == {os.SCHED_OTHER}  # where it would have lowered itself
    finally:
        open(marker, "w").close()
    out, err = d.communicate(timeout=60)
    assert d.returncode == 0, err
    assert said[-1] == ("renacerd: priority stays normal: an idle daemon could not be lifted "
                        "back to normal priority (needs CAP_SYS_NICE, or CAP_SYS_RESOURCE to "
                        "raise RLIMIT_NICE to 20)\n"), said
    assert "priority: lifted" not in err
