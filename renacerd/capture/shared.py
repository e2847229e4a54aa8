"""One attachment of the syscall probes for every run of a host (`renacerd serve`).

The probes are compiled and attached once. A run is a slot: its processes are entries of
the kernel's target map whose value is the slot, a forked child inherits its parent's, and
every record carries the slot of its process (records.RUN_SHIFT). One drain loop reads the
rings and hands each run's records to that run's Tracer (its own run in the store, chunk
writer, strings and counters); the detail queues are shared, and each run takes only the
details of its own events (they join on tid and enter time). Starting or ending a run is a
few map updates, never a compile.

The CUDA uprobes are loaded once too, on the same target map: each library file is probed
once, whichever run maps it first, and stays probed for every later run until the service
stops. GPU records carry the pid; each drain hands them to the run that pid belongs to.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from renacerd.capture.cuda_source import CudaOptions, CudaSource
from renacerd.capture.details import DetailRings
from renacerd.capture.probes.cuda import CudaProbes, ProbedObject
from renacerd.capture.probes.loader import ProbeError
from renacerd.capture.probes.syscalls import (
    DEFAULT_DETAIL_MB,
    DEFAULT_EVENT_MB,
    RunSlot,
    SyscallProbes,
)
from renacerd.capture.ringbuf import RingReader
from renacerd.capture.tracer import Tracer, drain_wait
from renacerd.cuda.records import GPU_EVENT, NAME_REC
from renacerd.records import EVENT, LONG_LEN, RUN_SHIFT, RUN_SLOTS, STR_LEN, detail_dtype
from renacerd.store.database import StoreError

log = logging.getLogger("renacerd")

DRAIN_INTERVAL = 0.04  # the longest sleep between drains (Tracer's default)
MAX_DETAILS = 100_000  # queued details whose events never came (lost): dropped beyond this
_NO_EVENTS = np.empty(0, dtype=EVENT)
_NO_GPU = np.empty(0, dtype=GPU_EVENT)
_NO_NAMES = np.empty(0, dtype=NAME_REC)


class CaptureFull(ProbeError):
    """Every run slot is taken."""


class CudaRunProbes:
    """One run's share of the CUDA probes: CudaProbes' interface for a CudaSource, fed the
    run's GPU records by the shared drain loop; probing goes to the one attachment."""

    __slots__ = ("shared", "events", "names")

    def __init__(self, shared: CudaProbes) -> None:
        self.shared = shared
        self.events = _NO_GPU
        self.names = _NO_NAMES

    def add_target(self, pid: int) -> None:
        """Nothing: the syscall probes' target map is the CUDA probes' too."""

    def remove_target(self, pid: int) -> None:
        """Nothing (see add_target)."""

    def probed(self) -> list[ProbedObject]:
        """Every object the attachment has probes on (for any run)."""
        return self.shared.probed()

    def probe_object(self, path: str) -> ProbedObject | None:
        """Probe `path` unless some run already had it probed."""
        return self.shared.probe_object(path)

    def probe_process(self, pid: int) -> list[ProbedObject]:
        """Probe the CUDA copies `pid` maps that no run had probed yet."""
        return self.shared.probe_process(pid)

    def _may_hold_runtime(self, path: str) -> bool:
        return self.shared._may_hold_runtime(path)

    def rings(self) -> list[RingReader]:
        """The shared rings."""
        return self.shared.rings()

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """The run's GPU records and kernel names of this drain."""
        ev, names = self.events, self.names
        self.events, self.names = _NO_GPU, _NO_NAMES
        return ev, names

    def counters(self) -> dict[str, int]:
        """The attachment's kernel counters: the rings are shared, so a loss is the host's
        (not split per run)."""
        return self.shared.counters()

    def close(self) -> None:
        """Nothing: the probes stay for the other runs (detached at the service's stop)."""


@dataclass(slots=True)
class SharedRun:
    """A run fed by the shared drain loop."""

    slot: RunSlot
    tracer: Tracer
    # called on a thread of its own once the run is out of the loop: end it (finish the
    # tracer, close what it owns); the slot is freed after it returns
    on_end: Callable[[SharedRun], None]
    cuda: CudaRunProbes | None = None
    status: str = "complete"
    error: str | None = None
    stop_requested: bool = False
    # how the run ends if stop_requested finds its tree still live
    stop_status: tuple[str, str | None] = ("complete", None)


class SharedCapture:
    """The syscall probes of every run, their slots and the one drain loop."""

    def __init__(self, event_mb: float = DEFAULT_EVENT_MB,
                 detail_mb: float = DEFAULT_DETAIL_MB,
                 drain_interval: float = DRAIN_INTERVAL, cuda: bool = True) -> None:
        """Compile, load and attach (ProbeError when the kernel refuses the syscall
        probes; without CUDA probes, with a line, when only those fail)."""
        self.probes = SyscallProbes(follow=True, event_mb=event_mb, detail_mb=detail_mb)
        self.probes.load()
        self.cuda: CudaProbes | None = None
        if cuda:
            try:
                self.cuda = CudaProbes(targets_fd=self.probes.bpf["targets"].map_fd)
                self.cuda.load()
            except ProbeError as e:
                log.warning("renacerd: CUDA probes off: %s", e)
                self.cuda = None
        self.details = DetailRings(detail_dtype(STR_LEN), detail_dtype(LONG_LEN))
        self.drain_interval = drain_interval
        # slots freed go to the back: a slot is reused as late as possible, so records of
        # an ended run still in flight meet no new owner (and are counted as unrouted)
        self._free: deque[int] = deque(range(1, RUN_SLOTS))
        self._claimed: dict[int, RunSlot] = {}
        self.runs: dict[int, SharedRun] = {}
        # held by each drain cycle, and while a run is added or removed: a run's Tracer is
        # only ever used by one thread at a time
        self.lock = threading.RLock()
        self.unrouted = 0  # records of a slot no run holds (late records of an ended run)
        self.cycles = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._enders: list[threading.Thread] = []

    # -- slots -------------------------------------------------------------------------
    def claim(self, uid: int) -> RunSlot:
        """A free slot for a run of `uid` (CaptureFull when none is left; ProbeError when
        a non-root run cannot be traced safely on this kernel)."""
        with self.lock:
            if not self._free:
                raise CaptureFull(f"all {RUN_SLOTS - 1} run slots are in use")
            slot = self._free.popleft()
            view = self._claimed[slot] = RunSlot(self.probes, slot)
        try:
            self.probes.set_owner(slot, uid)
        except ProbeError:
            with self.lock:
                del self._claimed[slot]
                self._free.appendleft(slot)
            raise
        return view

    def add(self, slot: RunSlot, tracer: Tracer,
            on_end: Callable[[SharedRun], None]) -> SharedRun:
        """Feed `tracer` the records of `slot` from the next drain on (call with the lock
        held, before the tracer attaches: its first records must find it); with the CUDA
        probes, its CUDA source too."""
        run = SharedRun(slot, tracer, on_end)
        if self.cuda is not None:
            run.cuda = CudaRunProbes(self.cuda)
            tracer.sources.append(CudaSource(run.cuda, CudaOptions(), shared_targets=True))
        with self.lock:
            self.runs[slot.slot] = run
        return run

    def discard(self, slot: RunSlot) -> None:
        """Take a run out of the loop now, untrace its processes and free its slot (a run
        that must not have been traced; its tracer is the caller's to close)."""
        with self.lock:
            self.runs.pop(slot.slot, None)
            self._free_slot(slot)

    def _free_slot(self, slot: RunSlot) -> None:
        """Untrace the slot's processes and free it, once per claim."""
        with self.lock:
            if self._claimed.get(slot.slot) is not slot:
                return
            for pid in slot.targets():
                slot.remove_target(pid)
            del self._claimed[slot.slot]
            self._free.append(slot.slot)

    def live_slots(self) -> int:
        """Slots in use (runs being traced or ending)."""
        with self.lock:
            return RUN_SLOTS - 1 - len(self._free)

    # -- the loop ----------------------------------------------------------------------
    def start(self) -> None:
        """Run the drain loop on a thread of its own."""
        self._thread = threading.Thread(target=self._loop, name="renacerd-drain", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        capacity = self.probes.capacity()
        last = time.monotonic()
        while not self._stopping.is_set():
            t0 = time.monotonic()
            with self.lock:
                drained = self.cycle(t0)
            wait = drain_wait(drained, capacity, t0 - last, self.drain_interval)
            last = t0
            spent = time.monotonic() - t0
            if spent < wait:
                self._stopping.wait(wait - spent)

    def cycle(self, t0: float) -> tuple[int, int, int]:
        """One drain: route every record to its run, then each run's flush, liveness and
        end (call with the lock held). Returns the records drained from each ring."""
        ev, de, dl = self.probes.drain()
        try:
            # before any run ends a process (and untraces its pid): GPU records go by pid
            self._route_cuda()
            self.details.add(de, dl)
            groups = self._route(ev)
            for slot, run in list(self.runs.items()):
                self._guard(run, run.tracer.take_events, groups.pop(slot, _NO_EVENTS))
            self.unrouted += sum(len(g) for g in groups.values())
        finally:
            self.probes.release()  # ev viewed the ring: nothing may keep it past here
        for run in list(self.runs.values()):
            for step, args in ((run.tracer.check_writer, ()), (run.tracer.tick, (t0,))):
                if self.runs.get(run.slot.slot) is run:  # not ended (failed) meanwhile
                    self._guard(run, step, *args)
            if self.runs.get(run.slot.slot) is not run:
                continue
            if not run.tracer.any_alive_or_unreaped():
                self._end(run)
            elif run.stop_requested:
                run.status, run.error = run.stop_status
                self._end(run)
        if len(self.details) > MAX_DETAILS:
            self.details.clear()
        self.cycles += 1
        return len(ev), len(de), len(dl)

    @staticmethod
    def _route(ev: np.ndarray) -> dict[int, np.ndarray]:
        """The records of each slot, in ring order."""
        if not len(ev):
            return {}
        slot = ev["flags"] >> RUN_SHIFT
        first = slot[0]
        if (slot == first).all():  # one busy run: its records as they lie in the ring
            return {int(first): ev}
        order = np.argsort(slot, kind="stable")
        ss = slot.take(order)
        ev = ev.take(order)
        cuts = np.flatnonzero(ss[1:] != ss[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(ev)]
        return {int(ss[a]): ev[a:b] for a, b in zip(bounds[:-1], bounds[1:])}

    def _route_cuda(self) -> None:
        """Hand each run its GPU records and kernel names of this drain (by the run slot
        of their pid; a process already ended goes by the run that knew it)."""
        if self.cuda is None:
            return
        ev, names = self.cuda.drain()
        if not len(ev) and not len(names):
            return
        slot_of: dict[int, int] = {}
        for arr, field_name in ((ev, "events"), (names, "names")):
            if not len(arr):
                continue
            pids = arr["pid"]
            for p in np.unique(pids).tolist():
                if p not in slot_of:
                    slot_of[p] = self.probes.slot_of(p) or next(
                        (s for s, r in self.runs.items() if p in r.tracer.procs), 0)
                run = self.runs.get(slot_of[p])
                if run is None or run.cuda is None:
                    self.unrouted += int(np.count_nonzero(pids == p))
                    continue
                mine = arr[pids == p]
                have = getattr(run.cuda, field_name)
                setattr(run.cuda, field_name, mine if not len(have) else
                        np.concatenate([have, mine]))

    def _guard(self, run: SharedRun, fn: Callable, *args) -> None:
        """A run whose store fails, or whose decoding raises, ends alone (incomplete, with
        the reason): the other runs go on."""
        try:
            fn(*args)
        except StoreError as e:
            self._fail(run, str(e))
        except Exception as e:
            log.exception("run %s: capture failed", run.tracer.run_name)
            self._fail(run, f"{type(e).__name__}: {e}")

    def _fail(self, run: SharedRun, error: str) -> None:
        run.status, run.error = "incomplete", error
        if run.slot.slot in self.runs:
            self._end(run)

    def _end(self, run: SharedRun) -> None:
        """Out of the loop now; finished on a thread of its own (the final flush and the
        writer's last chunks must not hold the other runs' drains)."""
        self.runs.pop(run.slot.slot, None)
        t = threading.Thread(target=self._finish, args=(run,),
                             name=f"renacerd-end-{run.slot.slot}", daemon=True)
        self._enders = [e for e in self._enders if e.is_alive()]
        self._enders.append(t)
        t.start()

    def _finish(self, run: SharedRun) -> None:
        try:
            run.on_end(run)
        except Exception:
            log.exception("run %s: ending it failed", run.tracer.run_name)
        finally:
            self._free_slot(run.slot)


    # -- shutdown ------------------------------------------------------------------------
    def close(self, status: str = "incomplete", error: str | None = None,
              timeout: float = 5.0) -> None:
        """Stop the loop; a last drain, every run whose tree is still live ended with
        `status` and `error`; detach every probe (nothing stays in the kernel)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self.lock:
            for run in self.runs.values():
                run.stop_requested = True
                run.stop_status = (status, error)
            try:
                self.cycle(time.monotonic())
            except Exception:
                log.exception("the last drain failed")
                for run in list(self.runs.values()):
                    self._end(run)
        deadline = time.monotonic() + timeout
        for t in list(self._enders):
            t.join(max(deadline - time.monotonic(), 0.01))
        if self.cuda is not None:
            self.cuda.close()
        self.probes.close()
