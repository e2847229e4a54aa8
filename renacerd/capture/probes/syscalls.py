"""The syscall + process-lifecycle probes: load bpf/syscalls.c, manage targets, read rings."""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import time

import numpy as np

from renacerd.capture.probes.btf import BTFError, member_offset
from renacerd.capture.probes.loader import ProbeError, bpf_source, compile_bpf
from renacerd.capture.ringbuf import RingReader
from renacerd.records import ARGV_ARGS, COUNTER_NAMES, EVENT, LONG_LEN, STR_LEN, detail_dtype

DEFAULT_EVENT_MB = 32
DEFAULT_DETAIL_MB = 8
LONG_DETAIL_SHARE = 1  # the long ring is as large as the detail ring (its records are 15x)
MAX_TID_SLOTS = 1 << 18


def _pages(mb: float) -> int:
    """Ring size in pages: a power of two, at least one page."""
    want = max(1, int(mb * 1024 * 1024) // mmap.PAGESIZE)
    return 1 << (want - 1).bit_length()


def pid_max() -> int:
    """The kernel's pid_max (the largest on 64-bit when unreadable)."""
    try:
        return int(open("/proc/sys/kernel/pid_max").read())
    except (OSError, ValueError):
        return 1 << 22


def tid_slots() -> int:
    """Start-array slots: pid_max rounded up to a power of two, capped (slots then hash by mask)."""
    return min(1 << (pid_max() - 1).bit_length(), MAX_TID_SLOTS)


class SyscallProbes:
    """raw_syscalls + sched + signal tracepoints feeding two ring buffers."""

    def __init__(
        self,
        follow: bool = True,
        event_mb: float = DEFAULT_EVENT_MB,
        detail_mb: float = DEFAULT_DETAIL_MB,
        owner_uid: int = 0,
    ) -> None:
        self.owner_uid = owner_uid
        self.event_pages = _pages(event_mb)
        self.detail_pages = _pages(detail_mb)
        # at least two records of LONG_LEN: a tiny --detail-ring-mb still holds one exec
        self.long_pages = max(_pages(detail_mb / LONG_DETAIL_SHARE), _pages(2 * LONG_LEN / 2**20))
        slots = tid_slots()
        self.defines: dict[str, object] = {
            "TID_SLOTS": slots,
            # pid_max can grow at run time (sysctl), but not past this check's use: a pid
            # above the slots would be missed, so the index is used only when all fit
            "TGID_INDEX": pid_max() <= slots,
            "EVENT_PAGES": self.event_pages,
            "DETAIL_PAGES": self.detail_pages,
            "LONG_PAGES": self.long_pages,
            "STR_LEN": STR_LEN,
            "LONG_LEN": LONG_LEN,
            "ARGV_ARGS": ARGV_ARGS,
            "FOLLOW": follow,
            # raw tracepoints read arguments from pt_regs, whose layout is per arch
            "RAW_TP": platform.machine() == "x86_64",
        }
        try:
            self.defines.update(
                TASK_MM_OFF=member_offset("task_struct", "mm"),
                MM_ARG_START_OFF=member_offset("mm_struct", "arg_start"),
                MM_ARG_END_OFF=member_offset("mm_struct", "arg_end"),
            )
        except BTFError:
            pass  # argv then comes from execve's arguments alone
        try:
            self.defines["TASK_EXIT_CODE_OFF"] = member_offset("task_struct", "exit_code")
        except BTFError:
            pass  # exit statuses then come from exit_group and signal_deliver alone
        self._setup_error: ProbeError | None = None
        if owner_uid != 0:
            try:
                self.defines.update(OWNER_UID=owner_uid, **_cred_offsets())
            except ProbeError as e:
                self._setup_error = e  # raised by load(), where probe errors are handled
        self.bpf = None
        self.events: RingReader | None = None
        self.details: RingReader | None = None
        self.details_long: RingReader | None = None

    def source(self) -> str:
        """The generated C (what --print-bpf shows)."""
        return bpf_source("syscalls.c", self.defines)

    def load(self) -> None:
        """Compile, load and attach every tracepoint (BCC attaches TRACEPOINT_PROBEs itself)."""
        if self._setup_error is not None:
            raise self._setup_error
        self.bpf = compile_bpf(self.source())
        try:
            self.events = RingReader(
                self.bpf["events"].map_fd, self.event_pages * mmap.PAGESIZE, EVENT
            )
            self.details = RingReader(
                self.bpf["details"].map_fd,
                self.detail_pages * mmap.PAGESIZE,
                detail_dtype(STR_LEN),
            )
            self.details_long = RingReader(
                self.bpf["details_long"].map_fd,
                self.long_pages * mmap.PAGESIZE,
                detail_dtype(LONG_LEN),
            )
        except (OSError, ValueError) as e:
            self.close()
            raise ProbeError(f"cannot map the BPF ring buffers: {e}") from e

    def add_target(self, pid: int) -> None:
        """Trace process `pid` (all its threads)."""
        t = self.bpf["targets"]
        t[ctypes.c_uint32(pid)] = ctypes.c_uint32(1)
        if self.defines["TGID_INDEX"]:
            self.bpf["target_idx"][ctypes.c_uint32(pid & (self.defines["TID_SLOTS"] - 1))] = \
                ctypes.c_uint32(pid)

    def expect_exit(self, tid: int) -> None:
        """Give `tid`'s start slot an enter, so the exit of the call it is blocked in (a
        held child waiting to exec, made a target while inside read) is matched and not
        counted as an unmatched exit of the traced program; its record is dropped with the
        rest of what comes before the exec."""
        slots = self.bpf["starts"]
        s = slots.Leaf()
        s.ts = time.monotonic_ns()  # bpf_ktime_get_ns's clock
        s.tid = tid
        slots[ctypes.c_uint32(tid & (self.defines["TID_SLOTS"] - 1))] = s

    def remove_target(self, pid: int) -> None:
        """Stop tracing `pid` (after it exited, so a reused pid is not traced)."""
        t = self.bpf["targets"]
        try:
            del t[ctypes.c_uint32(pid)]
        except KeyError:
            pass
        if self.defines["TGID_INDEX"]:
            idx = self.bpf["target_idx"]
            k = ctypes.c_uint32(pid & (self.defines["TID_SLOTS"] - 1))
            if idx[k].value == pid:
                idx[k] = ctypes.c_uint32(0)

    def is_target(self, pid: int) -> bool:
        """`pid` is in the kernel's target map now."""
        try:
            self.bpf["targets"][ctypes.c_uint32(pid)]
        except KeyError:
            return False
        return True

    def targets(self) -> list[int]:
        """Pids currently traced."""
        return [k.value for k in self.bpf["targets"]]

    def counters(self) -> dict[str, int]:
        """Loss counters summed over CPUs."""
        return {k: sum(v) for k, v in self.counters_per_cpu().items()}

    def counters_per_cpu(self) -> dict[str, list[int]]:
        """Loss counters per CPU, as the kernel counted them."""
        arr = self.bpf["counters"]
        out = {}
        for i, name in enumerate(COUNTER_NAMES):
            vals = arr.getvalue(ctypes.c_int(i))
            out[name] = [int(v) for v in vals]
        return out

    def rings(self) -> list[RingReader]:
        """The event and detail rings (for the priority guard's fill test)."""
        return [self.events, self.details, self.details_long]

    def capacity(self) -> tuple[int, int, int]:
        """Records the event ring and the two detail rings each hold."""
        return tuple(r.data_size // r.rec_size for r in self.rings())

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Events first, then details (short, long): every drained event's details are then
        drained too. The events are a view of the ring (no copy), valid until release(); the
        details are copies (they may wait for their events)."""
        ev = self.events.peek()
        de = self.details.drain()
        dl = self.details_long.drain()
        return ev, de, dl

    def release(self) -> None:
        """Hand the events of the last drain() back to the kernel."""
        self.events.release()

    def close(self) -> None:
        """Unmap the rings and detach every probe (nothing stays in the kernel)."""
        for r in (self.events, self.details, self.details_long):
            if r is not None:
                r.close()
        self.events = self.details = self.details_long = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


def _cred_offsets() -> dict[str, int]:
    """Offsets of the credentials the privilege-at-exec check reads (from the kernel's BTF);
    without them a non-root run cannot be traced safely, so that is an error."""
    try:
        return {
            "TASK_CRED_OFF": member_offset("task_struct", "cred"),
            "CRED_UID_OFF": member_offset("cred", "uid"),
            "CRED_GID_OFF": member_offset("cred", "gid"),
            "CRED_EUID_OFF": member_offset("cred", "euid"),
            "CRED_EGID_OFF": member_offset("cred", "egid"),
            "CRED_CAPP_OFF": member_offset("cred", "cap_permitted"),
        }
    except BTFError as e:
        raise ProbeError(f"a run of a non-root user needs the kernel's BTF: {e}") from e


def own_pid_guard(pid: int) -> None:
    """Refuse to trace ourselves: every syscall we make to drain would feed back."""
    if pid == os.getpid():
        raise ProbeError(f"pid {pid} is renacerd itself")
