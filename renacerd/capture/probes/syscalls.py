"""The syscall + process-lifecycle probes: load bpf/syscalls.c, manage targets, read rings."""

from __future__ import annotations

import ctypes
import mmap
import platform
import time

import numpy as np

from renacerd.capture.probes.btf import BTFError, member_offset
from renacerd.capture.probes.loader import ProbeError, bpf_source, compile_bpf
from renacerd.capture.ringbuf import RingReader
from renacerd.records import (
    ARGV_ARGS,
    COUNTER_NAMES,
    EVENT,
    LONG_LEN,
    RUN_SLOTS,
    STR_LEN,
    detail_dtype,
)

DEFAULT_EVENT_MB = 32
DEFAULT_DETAIL_MB = 8
LONG_DETAIL_SHARE = 1  # the long ring is as large as the detail ring (its records are 15x)
MAX_TID_SLOTS = 1 << 18
STANDALONE_SLOT = 1  # the run slot of `renacerd -- CMD` / `--pid`: the one-run case


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
    """raw_syscalls + sched + signal tracepoints feeding the rings of every run: a target's
    value in the kernel is its run's slot, and each record carries it (records.slot_of).
    The methods that take `slot` default to the standalone daemon's one run."""

    def __init__(
        self,
        follow: bool = True,
        event_mb: float = DEFAULT_EVENT_MB,
        detail_mb: float = DEFAULT_DETAIL_MB,
        owner_uid: int = 0,
    ) -> None:
        self.owner_uid = owner_uid
        self.slot = STANDALONE_SLOT
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
            "RUN_SLOTS": RUN_SLOTS,
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
        self.priv_check_error: ProbeError | None = None
        try:
            self.defines.update(PRIV_CHECK=True, **_cred_offsets())
        except ProbeError as e:
            # without it only root's runs can be traced
            self.priv_check_error = e
            if owner_uid != 0:
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
        self.set_owner(STANDALONE_SLOT, self.owner_uid)

    def set_owner(self, slot: int, uid: int) -> None:
        """Give run slot `slot` to `uid` (its processes then never follow an exec into
        privilege unless uid is root) and zero its loss counters."""
        if uid != 0 and self.priv_check_error is not None:
            raise self.priv_check_error
        self.bpf["run_owner"][ctypes.c_int(slot)] = ctypes.c_uint32(uid)
        arr = self.bpf["counters"]
        for i in range(len(COUNTER_NAMES)):
            del arr[ctypes.c_int(slot * len(COUNTER_NAMES) + i)]  # zeroes every CPU's copy

    def add_target(self, pid: int, slot: int = STANDALONE_SLOT) -> None:
        """Trace process `pid` (all its threads) as part of run slot `slot`."""
        t = self.bpf["targets"]
        t[ctypes.c_uint32(pid)] = ctypes.c_uint32(slot)
        if self.defines["TGID_INDEX"]:
            self.bpf["target_idx"][ctypes.c_uint32(pid & (self.defines["TID_SLOTS"] - 1))] = \
                ctypes.c_uint64(pid | slot << 32)

    def expect_exit(self, tid: int, slot: int = STANDALONE_SLOT) -> None:
        """Give `tid`'s start slot an enter, so the exit of the call it is blocked in (a
        held child waiting to exec, made a target while inside read) is matched and not
        counted as an unmatched exit of the traced program; its record is dropped with the
        rest of what comes before the exec."""
        slots = self.bpf["starts"]
        s = slots.Leaf()
        s.ts = time.monotonic_ns()  # bpf_ktime_get_ns's clock
        s.tid = tid
        s.run = slot
        slots[ctypes.c_uint32(tid & (self.defines["TID_SLOTS"] - 1))] = s

    def remove_target(self, pid: int, slot: int = STANDALONE_SLOT) -> None:
        """Stop tracing `pid` (after it exited, so a reused pid is not traced), if it is
        still run slot `slot`'s: a run never untraces another's process."""
        if self.slot_of(pid) != slot:
            return
        t = self.bpf["targets"]
        try:
            del t[ctypes.c_uint32(pid)]
        except KeyError:
            pass
        if self.defines["TGID_INDEX"]:
            idx = self.bpf["target_idx"]
            k = ctypes.c_uint32(pid & (self.defines["TID_SLOTS"] - 1))
            if idx[k].value & 0xFFFFFFFF == pid:
                idx[k] = ctypes.c_uint64(0)

    def slot_of(self, pid: int) -> int:
        """The run slot of `pid` in the kernel's target map now, 0 when not traced."""
        try:
            return self.bpf["targets"][ctypes.c_uint32(pid)].value
        except KeyError:
            return 0

    def is_target(self, pid: int, slot: int = STANDALONE_SLOT) -> bool:
        """`pid` is in the kernel's target map now, as part of run slot `slot`."""
        return self.slot_of(pid) == slot

    def targets(self, slot: int | None = None) -> list[int]:
        """Pids currently traced (of run slot `slot` only, when given)."""
        return [k.value for k, v in self.bpf["targets"].items()
                if slot is None or v.value == slot]

    def counters(self, slot: int = STANDALONE_SLOT) -> dict[str, int]:
        """Loss counters of run slot `slot`, summed over CPUs."""
        return {k: sum(v) for k, v in self.counters_per_cpu(slot).items()}

    def counters_per_cpu(self, slot: int = STANDALONE_SLOT) -> dict[str, list[int]]:
        """Loss counters of run slot `slot` per CPU, as the kernel counted them."""
        arr = self.bpf["counters"]
        out = {}
        base = slot * len(COUNTER_NAMES)
        for i, name in enumerate(COUNTER_NAMES):
            vals = arr.getvalue(ctypes.c_int(base + i))
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


class RunSlot:
    """One run's share of SyscallProbes loaded once for many (`renacerd serve`): the
    targets and loss counters of its slot, with SyscallProbes' interface for a Tracer.
    The rings are read by the one drain loop of the attachment, never through this."""

    __slots__ = ("shared", "slot")

    def __init__(self, shared: SyscallProbes, slot: int) -> None:
        self.shared = shared
        self.slot = slot

    @property
    def bpf(self):
        """The shared BPF object (the CUDA probes share its target map)."""
        return self.shared.bpf

    def add_target(self, pid: int) -> None:
        """Trace `pid` as part of this run."""
        self.shared.add_target(pid, self.slot)

    def remove_target(self, pid: int) -> None:
        """Stop tracing `pid`, if it is this run's."""
        self.shared.remove_target(pid, self.slot)

    def expect_exit(self, tid: int) -> None:
        """SyscallProbes.expect_exit for this run."""
        self.shared.expect_exit(tid, self.slot)

    def slot_of(self, pid: int) -> int:
        """The run slot of `pid` now (0: not traced)."""
        return self.shared.slot_of(pid)

    def is_target(self, pid: int) -> bool:
        """`pid` is traced as part of this run now."""
        return self.shared.is_target(pid, self.slot)

    def targets(self) -> list[int]:
        """This run's pids in the kernel's map."""
        return self.shared.targets(self.slot)

    def counters(self) -> dict[str, int]:
        """This run's loss counters, summed over CPUs."""
        return self.shared.counters(self.slot)

    def counters_per_cpu(self) -> dict[str, list[int]]:
        """This run's loss counters per CPU."""
        return self.shared.counters_per_cpu(self.slot)

    def rings(self) -> list[RingReader]:
        """The shared rings."""
        return self.shared.rings()

    def capacity(self) -> tuple[int, int, int]:
        """Records the shared rings each hold."""
        return self.shared.capacity()


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
