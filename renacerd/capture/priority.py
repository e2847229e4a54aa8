"""The daemon's CPU priority: idle while it keeps up, normal while a ring fills.

The traced job comes first. At SCHED_IDLE the daemon only takes CPU time the job leaves
idle, so its work no longer lengthens the job's steps. On a host the job saturates, an idle
daemon would starve: the rings would overflow and the store would not be committed every
second. A guard process watches how full the rings are and when the daemon last flushed,
lifts the daemon to SCHED_OTHER before either goes wrong, and lowers it again once the rings
stay under a quarter full and the flushes come on time.

The guard is a separate process: a thread of the daemon would need the GIL, which a starved
idle thread may be holding.
"""

from __future__ import annotations

import argparse
import errno
import logging
import mmap
import os
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable

log = logging.getLogger("renacerd")

HIGH = 0.25  # a ring this full: the daemon is not keeping up, lift it
LATE_NS = 750_000_000  # no flush for this long (it flushes every 0.5 s): lift it
# rings never past HIGH and flushes on time for CALM_S: lower it again (a drained ring
# refills to a few % between drains, so a lower bar would keep the daemon lifted for good)
CALM_S = 2.0
POLL_S = 0.1  # a ring a quarter full takes ~0.3 s at 480k events/s (32 MB), full 1.2 s;
# each poll wakes the guard at normal priority on the job's CPUs: few, not 50 a second
_IDLE = (os.SCHED_IDLE, os.sched_param(0))
_NORMAL = (os.SCHED_OTHER, os.sched_param(0))


def set_process_policy(pid: int, idle: bool) -> None:
    """Every thread of `pid` to SCHED_IDLE or SCHED_OTHER (threads started later inherit
    it; start the traced command before lowering the daemon). PermissionError when the
    kernel refuses (see ensure_liftable)."""
    policy, param = _IDLE if idle else _NORMAL
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setscheduler(int(tid), policy, param)
        except ProcessLookupError:
            pass  # a thread that just ended


CAP_SYS_NICE = 23


def _can_lift() -> bool:
    """The kernel's rule for leaving SCHED_IDLE (sched_setscheduler(2)): CAP_SYS_NICE, or
    an RLIMIT_NICE that allows nice 0 (20)."""
    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    if soft == resource.RLIM_INFINITY or soft >= 20:
        return True
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    return False


def ensure_liftable() -> None:
    """Make sure the daemon can be lifted from SCHED_IDLE before it is lowered: the kernel
    allows that with CAP_SYS_NICE or with RLIMIT_NICE >= 20 (nice 0). The systemd unit sets
    LimitNICE=20; elsewhere this raises the limit where CAP_SYS_RESOURCE allows."""
    if _can_lift():
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NICE)
    try:
        resource.setrlimit(resource.RLIMIT_NICE, (max(soft, 20), max(hard, 20)))
    except (OSError, ValueError):
        pass
    if not _can_lift():
        raise PermissionError(errno.EPERM, "an idle daemon could not be lifted back to "
                              "normal priority (needs CAP_SYS_NICE, or CAP_SYS_RESOURCE "
                              "to raise RLIMIT_NICE to 20)")


class PriorityGuard:
    """Lowers the daemon to SCHED_IDLE and runs the guard process; hooked to a tracer by
    attach() (a heartbeat at each flush, its counters with the run's)."""

    def __init__(self, rings: list[tuple[int, int]]) -> None:
        """`rings`: (map fd, data size) of each BPF ring buffer to watch. Start the traced
        command first: a process forked from here later would inherit SCHED_IDLE.
        PermissionError where the daemon could not be lifted again: it then stays normal."""
        ensure_liftable()
        self._counter_fd = os.memfd_create("renacerd-escalations")
        os.ftruncate(self._counter_fd, mmap.PAGESIZE)
        self._counter_map = mmap.mmap(self._counter_fd, mmap.PAGESIZE)
        self._final = 0
        self.heartbeat()
        fds = [fd for fd, _ in rings]
        spec = ",".join(f"{fd}:{size}" for fd, size in rings)
        # started before the daemon lowers itself: the guard runs at normal priority
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "renacerd.capture.priority", "--pid", str(os.getpid()),
                 "--rings", spec, "--counter-fd", str(self._counter_fd)],
                pass_fds=(*fds, self._counter_fd), stdin=subprocess.DEVNULL,
            )
        except OSError:
            self._counter_map.close()
            os.close(self._counter_fd)
            raise
        self.guard_died = self._stopped = False
        set_process_policy(os.getpid(), idle=True)

    def heartbeat(self) -> None:
        """Tell the guard the daemon is flushing (CLOCK_MONOTONIC ns, as the guard reads);
        nothing once closed (the run's last flush comes after)."""
        if self._counter_map.closed:
            return
        struct.pack_into("<Q", self._counter_map, 8, time.monotonic_ns())

    def _normal(self) -> None:
        try:
            set_process_policy(os.getpid(), idle=False)
        except PermissionError as e:  # ensure_liftable found it could: a limit changed since
            log.warning("renacerd: cannot return to normal priority: %s", e.strerror)

    def escalations(self) -> int:
        """How many times the guard lifted the daemon to normal priority."""
        if self._counter_map.closed:
            return self._final
        self._final = struct.unpack_from("<Q", self._counter_map)[0]
        return self._final

    def attach(self, tracer) -> None:
        """Beat at each of the tracer's flushes; count with its run."""
        tracer.on_flush.append(self.beat)
        tracer.counter_sources.append(self.counters)

    def beat(self) -> None:
        """A heartbeat for the guard (at each flush). Never idle without a guard: if it
        died, back to normal priority for good."""
        self.heartbeat()
        if not (self.guard_died or self._stopped) and self._proc.poll() is not None:
            self.guard_died = True
            self._normal()
            log.warning("renacerd: the priority guard exited (status %s); the daemon runs "
                        "at normal priority from now on", self._proc.returncode)

    def counters(self) -> dict[str, int]:
        """Escalations to normal priority, persisted with the run."""
        return {"priority_escalations": self.escalations(),
                "priority_guard_died": int(self.guard_died)}

    def stop(self) -> None:
        """Back to normal priority (the final flush and detach must not starve) and stop
        the guard; the count stays readable."""
        self._stopped = True
        self._normal()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def close(self) -> None:
        """stop(), and release the counter (its last value stays readable)."""
        self.stop()
        if not self._counter_map.closed:
            self.escalations()
            self._counter_map.close()
            os.close(self._counter_fd)


class _RingFill:
    """Producer and consumer positions of one BPF ring buffer, mapped read-only: what
    RingReader.pending_bytes reads, without mapping the data area or knowing the records."""

    def __init__(self, fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self.size = size
        self._cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ)
        self._prod = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)

    def fill(self) -> float:
        """Fraction of the ring produced and not yet consumed."""
        return (struct.unpack_from("<Q", self._prod)[0]
                - struct.unpack_from("<Q", self._cons)[0]) / self.size


def guard(pid: int, rings: list[_RingFill], counter: mmap.mmap,
          alive: Callable[[], bool], calm_s: float = CALM_S) -> None:
    """Lift `pid` to normal priority when a ring passes HIGH or its last flush (the
    heartbeat at counter[8:16]) is LATE_NS old; lower it after `calm_s` with neither.
    counter[0:8] counts the lifts. Ends when alive() turns false."""
    lifted = False
    calm_since: float | None = None
    while alive():
        fill = max(r.fill() for r in rings)
        now = time.monotonic_ns()
        late = now - struct.unpack_from("<Q", counter, 8)[0] > LATE_NS
        if not lifted and (fill > HIGH or late):
            set_process_policy(pid, idle=False)
            lifted, calm_since = True, None
            struct.pack_into("<Q", counter, 0, struct.unpack_from("<Q", counter)[0] + 1)
        elif lifted:
            if fill > HIGH or late:
                calm_since = None
            elif calm_since is None:
                calm_since = now
            elif now - calm_since >= calm_s * 1e9:
                set_process_policy(pid, idle=True)
                lifted, calm_since = False, None
        time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    """The guard process (started by PriorityGuard)."""
    ap = argparse.ArgumentParser(prog="renacerd-priority-guard")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--rings", required=True, help="FD:SIZE,...")
    ap.add_argument("--counter-fd", type=int, required=True)
    a = ap.parse_args(argv)
    rings = [_RingFill(int(fd), int(size))
             for fd, size in (r.split(":") for r in a.rings.split(","))]
    counter = mmap.mmap(a.counter_fd, mmap.PAGESIZE)
    try:
        guard(a.pid, rings, counter, alive=lambda: os.getppid() == a.pid)
    except KeyboardInterrupt:
        pass
    except PermissionError as e:  # the daemon sees the guard gone and returns to normal
        print(f"renacerd priority guard: cannot lift pid {a.pid}: {e.strerror}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
