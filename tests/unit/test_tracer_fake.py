"""The tracer's decode on a fake kernel (tests/unit/fake_probes.py), no root: lifecycle
order, pid reuse, two execs in one drain, the held child before its exec."""

from __future__ import annotations

import subprocess

import pytest

from renacerd.capture.tracer import Tracer
from renacerd.store.database import Store
from renacerd.syscall_table import syscall_table
from tests.unit.fake_probes import PID, Drain, FakeProbes

NR = {name: nr for nr, name in syscall_table().items()}
P, C, D, E = PID, PID + 1, PID + 2, PID + 3


@pytest.fixture
def run(tmp_path):
    """(probes, tracer, store) of a run "r" in a fresh store."""
    store = Store(tmp_path / "t.db", create=True)
    probes = FakeProbes()
    probes.add_target(P)
    tracer = Tracer(probes, store, "r", cmdline=["fake"])
    yield probes, tracer, store
    store.close()


def _finish(tracer: Tracer, store: Store) -> dict[int, list]:
    """End the run; {pid: [(proc span, [syscall records])] in order of appearance}."""
    assert tracer.finish().status == "complete"
    out: dict[int, list] = {}
    for trace in store.load_run("r"):
        out.setdefault(trace.process.pid, []).append((trace.process, list(trace.syscalls())))
    return out


def test_fork_exec_exit_in_one_drain_in_any_record_order(run):
    probes, tracer, store = run
    d = Drain()
    probes.event(d, 50, P, NR["write"], ret=5)
    probes.fork(d, 100, P, C, comm=b"worker")
    probes.execve(d, 150, 100, C, b"/bin/true", [b"true", b"x"])
    probes.exec(d, 200, C, b"/usr/bin/true", [b"true", b"x"], comm=b"true")
    probes.event(d, 300, C, NR["read"], ret=7)
    probes.exit_group(d, 400, C, 3)
    probes.exit(d, 410, C, status=-1)  # the kernel did not say: the exit_group's code
    # Several CPUs' records: the ring holds them in no time order.
    d.events.reverse()
    probes.queue(d)
    tracer.drain_once()
    st = tracer.procs[C]
    assert (st.span.ppid, st.span.name, st.span.exe, st.span.argv) == (
        P, "true", "/usr/bin/true", ["true", "x"])
    assert (st.span.start_mono_ns, st.span.end_mono_ns, st.span.exit_code, st.ended) == (
        100, 410, 3, True)
    assert probes.targets == {P}  # the exited child is no longer traced
    assert (tracer.procs[P].events, st.events, tracer.events) == (1, 3, 4)
    assert probes.releases == probes.drains == 1
    got = _finish(tracer, store)
    [(proc, calls)] = got[C]
    assert [(c.name, c.timestamp_nanos, c.return_value) for c in calls] == [
        ("execve", 150, 0), ("read", 300, 7), ("exit_group", 400, 0)]
    assert calls[0].args["path"] == "/bin/true" and calls[0].args["argv"] == ["true", "x"]
    assert (proc.exit_code, proc.exit_signal, proc.end_mono_ns) == (3, None, 410)
    assert [c.name for c in got[P][0][1]] == ["write"]


def test_how_a_process_ended_follows_record_time_not_ring_order(run):
    probes, tracer, store = run
    d = Drain()
    for child in (C, D, E):
        probes.fork(d, 100, P, child)
    probes.signal(d, 300, C, 9)  # killed: no exit_group
    probes.exit(d, 310, C)
    probes.exit_group(d, 300, D, 5)  # exit_group(5), then a signal while it exits
    probes.signal(d, 305, D, 11)
    probes.exit(d, 320, D)
    probes.exit_group(d, 300, E, 4)  # the kernel's wait status beats both
    probes.exit(d, 330, E, status=9)
    d.events.reverse()  # each exit record now comes before what preceded it
    probes.queue(d)
    tracer.drain_once()
    ends = {pid: (tracer.procs[pid].span.exit_code, tracer.procs[pid].span.exit_signal,
                  tracer.procs[pid].span.end_mono_ns) for pid in (C, D, E)}
    assert ends == {C: (None, 9, 310), D: (5, None, 320), E: (None, 9, 330)}
    assert probes.targets == {P}


def test_a_reused_pid_is_a_new_process(run):
    probes, tracer, store = run
    first, second = Drain(), Drain()
    probes.fork(first, 100, P, C, comm=b"one")
    probes.event(first, 150, C, NR["getpid"], ret=C)
    probes.exit(first, 200, C, status=0)
    probes.fork(second, 300, P, C, comm=b"two")
    probes.event(second, 350, C, NR["getppid"], ret=P)
    probes.event(second, 360, C, NR["getppid"], ret=P)
    probes.exit(second, 400, C, status=1 << 8)
    probes.queue(first, second)
    tracer.drain_once()
    tracer.drain_once()
    got = _finish(tracer, store)
    assert [(p.name, p.start_mono_ns, p.end_mono_ns, p.exit_code, [c.name for c in calls])
            for p, calls in got[C]] == [
        ("one", 100, 200, 0, ["getpid"]),
        ("two", 300, 400, 1, ["getppid", "getppid"]),
    ]


def test_a_reused_pid_whose_exit_record_was_lost_ends_the_old_process_at_the_fork(run):
    probes, tracer, store = run
    d = Drain()
    probes.fork(d, 100, P, C, comm=b"one")
    probes.fork(d, 300, P, C, comm=b"two")  # the first one's exit record never came
    probes.queue(d)
    tracer.drain_once()
    assert C in probes.targets  # ending the old process does not untrace the new one
    d = Drain()
    probes.exit(d, 400, C, status=0)
    probes.queue(d)
    tracer.drain_once()
    assert C not in probes.targets
    got = _finish(tracer, store)
    assert [(p.name, p.start_mono_ns, p.end_mono_ns) for p, _ in got[C]] == [
        ("one", 100, 300), ("two", 300, 400)]


def test_two_execs_in_one_drain_each_get_their_own_kernel_argv(run):
    probes, tracer, store = run
    d = Drain()
    # The caller's argv (read at enter) and the kernel's copy differ: the kernel's wins,
    # and each execve call must take the copy of the exec made inside it.
    probes.execve(d, 100, 50, P, b"/bin/a", [b"a", b"caller"])
    probes.exec(d, 120, P, b"/bin/a", [b"a", b"kernel-1"], comm=b"a")
    probes.execve(d, 200, 50, P, b"/bin/b", [b"b", b"caller"])
    probes.exec(d, 230, P, b"/bin/b", [b"b", b"kernel-2"], comm=b"b")
    probes.queue(d)
    tracer.drain_once()
    span = tracer.procs[P].span
    assert (span.name, span.exe, span.argv) == ("b", "/bin/b", ["b", "kernel-2"])
    assert tracer.procs[P].execs == []  # both copies matched
    got = _finish(tracer, store)
    [(_, calls)] = got[P]
    assert [(c.name, c.args["path"], c.args["argv"]) for c in calls] == [
        ("execve", "/bin/a", ["a", "kernel-1"]),
        ("execve", "/bin/b", ["b", "kernel-2"]),
    ]


def test_the_held_child_is_traced_from_its_execve(tmp_path):
    store = Store(tmp_path / "t.db", create=True)
    probes = FakeProbes()
    child = subprocess.Popen(["sleep", "60"])  # stands for the child held before exec
    try:
        tracer = Tracer(probes, store, "r", cmdline=["sleep"])
        tracer.adopt_launched(child.pid)
        assert probes.targets == {child.pid} and probes.expected_exits == [child.pid]
        held, after = Drain(), Drain()
        probes.event(held, 10, child.pid, NR["read"], ret=1)  # the wait for the go
        probes.event(after, 20, child.pid, NR["close"], ret=0)  # still before the exec
        probes.execve(after, 100, 50, child.pid, b"/bin/prog", [b"prog"])
        probes.exec(after, 120, child.pid, b"/bin/prog", [b"prog"], comm=b"prog")
        probes.event(after, 200, child.pid, NR["getpid"], ret=child.pid)
        probes.queue(held, after)
        tracer.drain_once()
        assert tracer.events == 0 and tracer.procs[child.pid].gated
        tracer.drain_once()
        assert tracer.events == 2 and not tracer.procs[child.pid].gated
    finally:
        child.kill()
        child.wait()
    got = _finish(tracer, store)
    [(proc, calls)] = got[child.pid]
    assert [(c.name, c.timestamp_nanos) for c in calls] == [("execve", 100), ("getpid", 200)]
    assert (proc.name, proc.exe, proc.argv) == ("prog", "/bin/prog", ["prog"])
    store.close()


def test_a_drain_of_one_event_keeps_it_after_the_ring_is_released(run):
    probes, tracer, store = run
    d = Drain()
    probes.event(d, 100, P, NR["getpid"], ret=P)
    probes.queue(d)
    tracer.drain_once()  # released: the kernel may write over the record now
    got = _finish(tracer, store)
    [(_, calls)] = got[P]
    assert [(c.name, c.timestamp_nanos, c.return_value) for c in calls] == [
        ("getpid", 100, P)]
