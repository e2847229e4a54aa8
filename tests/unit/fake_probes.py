"""A fake kernel for the tracer: SyscallProbes' interface, with drains the test writes.

Records are built from the layouts in renacerd/records.py (the ones tests/unit/
test_record_layout.py checks against bpf/syscalls.c) and filled the way the probes fill
them: lifecycle records as the sched tracepoints write them, the run slot in the top bits
of the flags, details keyed by (tid, ts) of their event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from renacerd.records import (
    EV_EXEC,
    EV_EXIT,
    EV_FORK,
    EV_SIGNAL,
    EVENT,
    F_DETAIL,
    F_THREAD,
    LONG_LEN,
    RUN_SHIFT,
    SLOT_ARGV_BLOB,
    SLOT_COMM,
    SLOT_PATH0,
    STR_LEN,
    detail_dtype,
)
from renacerd.syscall_table import NR_EXECVE, NR_EXIT_GROUP

COUNTERS = ("events_lost", "details_lost", "failed_reads", "unmatched_exits", "truncated")
SHORT = detail_dtype(STR_LEN)
LONG = detail_dtype(LONG_LEN)
# No process has a pid this high (pid_max is at most 2^22): /proc never answers for these.
PID = 5_000_000


@dataclass(slots=True)
class Drain:
    """What one drain returns: event records and their short and long details."""

    events: list[tuple] = field(default_factory=list)
    short: list[tuple] = field(default_factory=list)
    long: list[tuple] = field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three record arrays, as SyscallProbes.drain returns them."""
        return (np.array(self.events, dtype=EVENT), np.array(self.short, dtype=SHORT),
                np.array(self.long, dtype=LONG))


class FakeProbes:
    """Targets in a set, counters at zero, and the drains queued by the test in order."""

    def __init__(self, slot: int = 1) -> None:
        self.slot = slot
        self.targets: set[int] = set()
        self.expected_exits: list[int] = []
        self.queued: list[Drain] = []
        self.ring = bytearray()
        self.drains = self.releases = 0

    # -- SyscallProbes' interface, as the Tracer uses it --------------------------------
    def add_target(self, pid: int) -> None:
        """Trace `pid` (the kernel map update)."""
        self.targets.add(pid)

    def remove_target(self, pid: int) -> None:
        """Stop tracing `pid`."""
        self.targets.discard(pid)

    def expect_exit(self, tid: int) -> None:
        """Remembered only: the fake kernel writes no record the test did not."""
        self.expected_exits.append(tid)

    def slot_of(self, pid: int) -> int:
        """This run's slot for a target, 0 otherwise."""
        return self.slot if pid in self.targets else 0

    def is_target(self, pid: int) -> bool:
        """`pid` is traced now."""
        return pid in self.targets

    def capacity(self) -> tuple[int, int, int]:
        """Records each ring would hold."""
        return (1 << 16, 1 << 14, 1 << 10)

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next queued drain, or empty rings. The events are a view of one ring buffer,
        as SyscallProbes' are: valid until release()."""
        self.drains += 1
        ev, de, dl = (self.queued.pop(0) if self.queued else Drain()).arrays()
        self.ring = bytearray(ev.tobytes())
        return np.frombuffer(self.ring, dtype=EVENT), de, dl

    def release(self) -> None:
        """Hand the events back: the kernel writes new records over them."""
        self.releases += 1
        self.ring[:] = b"\xff" * len(self.ring)

    def counters(self) -> dict[str, int]:
        """No loss."""
        return dict.fromkeys(COUNTERS, 0)

    def counters_per_cpu(self) -> dict[str, list[int]]:
        """No loss, on one CPU."""
        return {k: [0] for k in COUNTERS}

    # -- writing records -------------------------------------------------------------------
    def queue(self, *drains: Drain) -> None:
        """Drains for the next drain() calls, in order."""
        self.queued.extend(drains)

    def event(self, d: Drain, ts: int, pid: int, nr: int, *, tid: int | None = None,
              dur: int = 0, ret: int = 0, a0: int = 0, flags: int = 0, aux: int = 0) -> None:
        """One struct event, with the run slot in its flags."""
        d.events.append((ts, dur, ret, a0, pid, pid if tid is None else tid, nr,
                         flags | self.slot << RUN_SHIFT, aux))

    def detail(self, d: Drain, ts: int, tid: int, nr: int, slot: int, data: bytes,
               long: bool = False, flags: int = F_DETAIL) -> None:
        """One struct detail (a string: its length counts the NUL; the argv blob: bytes)."""
        n = len(data) if slot == SLOT_ARGV_BLOB else len(data) + 1
        (d.long if long else d.short).append((ts, tid, nr, slot, flags, n, 0, data))

    def fork(self, d: Drain, ts: int, parent: int, child: int, comm: bytes = b"",
             thread: bool = False) -> None:
        """sched_process_fork: EV_FORK from the parent, a0 and aux the child, its comm."""
        if comm:
            self.detail(d, ts, child, EV_FORK, SLOT_COMM, comm)
        self.event(d, ts, parent, EV_FORK, a0=child, aux=child,
                   flags=F_THREAD if thread else 0)
        if not thread:
            self.targets.add(child)  # FOLLOW: the kernel adds the child at fork

    def exec(self, d: Drain, ts: int, pid: int, path: bytes, argv: list[bytes],
             comm: bytes) -> None:
        """sched_process_exec: EV_EXEC, with the path, comm and the kernel's argv blob."""
        self.detail(d, ts, pid, EV_EXEC, SLOT_PATH0, path)
        self.detail(d, ts, pid, EV_EXEC, SLOT_COMM, comm)
        self.detail(d, ts, pid, EV_EXEC, SLOT_ARGV_BLOB, b"\0".join(argv) + b"\0", long=True)
        self.event(d, ts, pid, EV_EXEC, a0=pid, flags=F_DETAIL)

    def execve(self, d: Drain, ts: int, dur: int, pid: int, path: bytes,
               argv: list[bytes]) -> None:
        """A successful execve call: its path and the caller's argv as details."""
        self.detail(d, ts, pid, NR_EXECVE, SLOT_PATH0, path)
        self.detail(d, ts, pid, NR_EXECVE, SLOT_ARGV_BLOB, b"\0".join(argv) + b"\0",
                    long=True)
        self.event(d, ts, pid, NR_EXECVE, dur=dur, flags=F_DETAIL)

    def exit_group(self, d: Drain, ts: int, pid: int, code: int) -> None:
        """The exit_group call (its record has no exit: only the enter's ts)."""
        self.event(d, ts, pid, NR_EXIT_GROUP, a0=code)

    def exit(self, d: Drain, ts: int, pid: int, status: int = -1, tid: int | None = None,
             group_dead: bool = True) -> None:
        """sched_process_exit: EV_EXIT, ret the wait status (-1: unknown), a0 group_dead."""
        self.event(d, ts, pid, EV_EXIT, tid=tid, ret=status, a0=int(group_dead))

    def signal(self, d: Drain, ts: int, pid: int, sig: int) -> None:
        """signal_deliver of a signal that may end the process: EV_SIGNAL, aux the signal."""
        self.event(d, ts, pid, EV_SIGNAL, aux=sig)
