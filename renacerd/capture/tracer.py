"""The capture loop: drain the rings, assemble one trace per process, stream it to the store."""

from __future__ import annotations

import logging
import os
import signal
import socket as _socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from renacerd import __version__
from renacerd.capture import assembly
from renacerd.capture.details import DetailRings, Joined, detail_bytes, split_argv
from renacerd.capture.peer import PeerChanged, check_traceable
from renacerd.capture.procfs import descendants, snapshot
from renacerd.client.dist_env import read_environ
from renacerd.escaping import decode
from renacerd.records import (
    EV_EXEC,
    EV_EXIT,
    EV_FORK,
    EV_SIGNAL,
    F_DETAIL,
    F_EMPTY_PATH0,
    F_EMPTY_PATH1,
    F_READ_FAILED,
    F_THREAD,
    F_TRUNCATED,
    F_UNFOLLOWED,
    LIFECYCLE_MIN,
    LONG_LEN,
    RECORD_FLAGS,
    SLOT_ADDR,
    SLOT_ARGV_BLOB,
    SLOT_COMM,
    SLOT_PATH0,
    SLOT_PATH1,
    STR_LEN,
    detail_dtype,
    take,
)
from renacerd.store.database import Store, StoreError
from renacerd.store.writer import ChunkWriter
from renacerd.syscall_table import (
    NR_EXECVE,
    NR_EXECVEAT,
    NR_EXIT,
    NR_EXIT_GROUP,
    syscall_table,
)
from renacerd.trace.sockaddr import format_sockaddr
from renacerd.trace.unified_trace import ProcessSpan

log = logging.getLogger("renacerd")

# Signals whose default action ends the process (signal(7)).
FATAL_BY_DEFAULT = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 25,
                              26, 27, 29, 30, 31, *range(34, 65)})

MIN_DRAIN_INTERVAL = 0.005
# Why a process stopped being followed before it ended (renacer show prints it).
STOPPED_PRIVILEGE = "privilege gained at exec"


@dataclass(slots=True)
class ProcState:
    """A traced process while the run is live."""

    proc_id: int
    span: ProcessSpan
    buf: bytearray | list[dict[str, np.ndarray]] = field(
        default_factory=assembly.new_buffer)  # rows, or column slices (numpy path)
    buffered: int = 0
    events: int = 0
    gated: bool = False
    exit_group: tuple[int, int] | None = None  # (ts, code)
    fatal_signal: tuple[int, int] | None = None  # (ts, sig)
    thread_exit_code: int | None = None
    wait_status: int | None = None  # the kernel's, from the last thread's exit
    ended: bool = False
    dirty: bool = False
    missing_since: float | None = None
    # the kernel's copy of each exec not yet matched to its execve record:
    # (ts, path, argv, argv truncated)
    execs: list[tuple[int, bytes | None, bytes | None, bool]] = field(default_factory=list)


def _take_exec(st: ProcState, start: int,
               end: int) -> tuple[int, bytes | None, bytes | None, bool]:
    """The kernel's copy of the exec made inside the execve call running start..end (one
    drain may hold several execs of a process); older unmatched copies are dropped."""
    while st.execs and st.execs[0][0] < start:
        st.execs.pop(0)
    if st.execs and st.execs[0][0] <= end:
        return st.execs.pop(0)
    return (0, None, None, False)


class StringTable:
    """Interns byte strings of one run; new ones are written with the next flush."""

    __slots__ = ("ids", "by_id", "pending")

    def __init__(self) -> None:
        self.ids: dict[bytes, int] = {}
        self.by_id: list[bytes] = []
        self.pending: list[tuple[int, bytes]] = []

    def intern(self, s: bytes) -> int:
        """The id of `s`, allocating one on first sight."""
        i = self.ids.get(s)
        if i is None:
            i = self.ids[s] = len(self.by_id)
            self.by_id.append(s)
            self.pending.append((i, s))
        return i

    def get(self, sid: int) -> bytes:
        """The string with id `sid` (b"" if none)."""
        return self.by_id[sid] if 0 <= sid < len(self.by_id) else b""


@dataclass(slots=True)
class Summary:
    """What a finished run prints."""

    run: str
    db: str
    processes: int
    events: int
    lost: dict[str, int]
    wall_s: float
    exit_status: int | None
    status: str


class Tracer:
    """Owns the probes and the store for one run."""

    def __init__(
        self,
        probes,
        store: Store,
        run_name: str,
        *,
        cmdline: list[str],
        follow: bool = True,
        flush_interval: float = 0.5,
        drain_interval: float = 0.04,
        owner_uid: int | None = None,
        details: DetailRings | None = None,
        lock: threading.RLock | None = None,
    ) -> None:
        """`details`: the detail queues, when shared with other runs of one attachment
        (each run takes only the details of its own events: they join on tid and ts);
        `lock`: the lock of `store`'s connection, when other runs write through it too (one
        connection for all: a thread holding one connection's write transaction open
        would otherwise wait on another's that only it can commit)."""
        self.probes = probes
        self.store = store
        self.run_name = run_name
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        self.follow = follow
        self.flush_interval = flush_interval
        self.drain_interval = drain_interval  # the longest sleep between drains
        self.procs: dict[int, ProcState] = {}
        self.strings = StringTable()
        self.own_details = details is None
        self.details = details if details is not None else DetailRings(
            detail_dtype(STR_LEN), detail_dtype(LONG_LEN))
        self._addr_ids: dict[tuple[int, bytes], int] = {}
        self._strings_cached: Any = None
        self.events = 0
        self.stop_requested = False
        self.root_pid: int | None = None
        self.root_status: int | None = None
        self.start_mono = time.monotonic_ns()
        self.start_wall = time.time_ns()
        # Every kernel record stamped before this has been read (set as a drain begins):
        # the tracer's own "now", which lags the clock when the daemon is starved.
        self.read_through_mono = self.start_mono
        self.table = syscall_table()
        self.lock = lock if lock is not None else threading.RLock()
        with self.lock:
            self.run_id = store.begin_run(
                run_name,
                cmdline=cmdline,
                version=__version__,
                syscall_table=self.table,
                start_wall_ns=self.start_wall,
                start_mono_ns=self.start_mono,
                owner_uid=self.owner_uid,
            )
        self._last_flush = self._last_check = time.monotonic()
        self.writer = ChunkWriter(store, self.run_id, self.lock)
        self._init_counters()

    def _init_counters(self) -> None:
        """The callbacks, other event sources, the counters of what was lost or left, the host."""
        self.on_process_exit: list[Callable[[ProcState], None]] = []
        self.on_flush: list[Callable[[], None]] = []
        # counters kept by others (the priority guard), persisted with the run's
        self.counter_sources: list[Callable[[], dict[str, int]]] = []
        # Other event sources (CUDA uprobes, ...): see the Source protocol below.
        self.sources: list[Source] = []
        self.source_errors: list[str] = []
        self.foreign_events = 0
        self.final_error: str | None = None
        self.paths_lost = 0
        # execve arguments cut or unreadable in the caller's copy, kept for want of the
        # kernel's copy (the probe leaves these to the daemon): added to the kernel counters
        self.exec_counts = {"truncated": 0, "failed_reads": 0}
        self.unfollowed = 0  # processes no longer followed: privilege gained at exec
        # /proc could not be read (EMFILE, ...): liveness unknown, so nothing was ended.
        self.liveness_errors = 0
        # exec'd processes gone before their environment (rank variables) could be read
        self.environ_unread = 0
        self._host = _socket.gethostname()
        self._dead_counters: dict[str, int] = {}

    # -- targets -----------------------------------------------------------------------
    def _new_proc(self, span: ProcessSpan) -> ProcState:
        old = self.procs.get(span.pid)
        if old is not None:
            # The pid was reused within the run: persist the old process before replacing it.
            if not old.ended:
                # Its exit record was lost. The pid now names the new process, which the
                # kernel already traces (fork) or we just made a target: keep it traced.
                self._end_process(old, span.start_mono_ns, untrace=False)
            self._flush_proc(old)
            with self.lock:
                self.store.update_process(old.proc_id, old.span)
        with self.lock:
            proc_id = self.store.add_process(self.run_id, span)
        st = ProcState(proc_id=proc_id, span=span)
        self.procs[span.pid] = st
        return st

    def attach(self, pid: int) -> None:
        """Trace a running process (and, when following, its existing descendants)."""
        if pid in self.procs:
            return
        self.probes.add_target(pid)
        self._read_dist(self._new_proc(snapshot(pid, time.monotonic_ns(), attached=True)))
        if self.follow:
            for child in descendants(pid):
                if child in self.procs or child == os.getpid():
                    continue  # never trace ourselves: our own drain calls would feed back
                if self.probes.slot_of(child) not in (0, self.probes.slot):
                    # a run of its own (it asked the service itself): it stays there
                    log.info("not following process %d: traced by another run", child)
                    continue
                if self.owner_uid != 0:
                    # the rule the service applies to the asking process, for each running
                    # descendant: a setuid program already running below it is not traced
                    try:
                        check_traceable(child, self.owner_uid)
                    except PeerChanged as e:
                        log.warning("not following process %d: %s", child, e)
                        self.unfollowed += 1
                        continue
                self.probes.add_target(child)
                try:
                    self._read_dist(
                        self._new_proc(snapshot(child, time.monotonic_ns(), attached=True)))
                except Exception:  # gone since we listed it
                    self.probes.remove_target(child)
        with self.lock:
            self.store.commit()

    def adopt_launched(self, pid: int) -> None:
        """Trace a child we forked and hold before exec: its events start at execve."""
        self.probes.add_target(pid)
        self.probes.expect_exit(pid)
        st = self._new_proc(snapshot(pid, time.monotonic_ns(), attached=False))
        st.gated = True
        self.root_pid = pid
        with self.lock:
            self.store.commit()

    # -- the loop ----------------------------------------------------------------------
    def any_traced_alive(self) -> bool:
        """Some traced process has not exited (the unreaped launched command not counted)."""
        return any(not p.ended for p in self.procs.values())

    def any_alive_or_unreaped(self) -> bool:
        """The launched command is not reaped yet, or some traced process has not exited."""
        if self.root_pid is not None and self.root_status is None:
            return True
        return self.any_traced_alive()

    def run(self, duration: float | None = None) -> None:
        """Drain until every target exits, stop() is called, or `duration` passes."""
        deadline = None if duration is None else time.monotonic() + duration
        last_drain = time.monotonic()
        capacity = self.probes.capacity()
        while not self.stop_requested:
            t0 = time.monotonic()
            self.check_writer()
            drained = self.drain_once()
            self.tick(t0)
            if not self.any_alive_or_unreaped():
                break
            if deadline is not None and t0 >= deadline:
                self.stop_requested = True
                break
            wait = drain_wait(drained, capacity, t0 - last_drain, self.drain_interval)
            last_drain = t0
            spent = time.monotonic() - t0
            if spent < wait:
                time.sleep(wait - spent)
        self.drain_once()

    def check_writer(self) -> None:
        """Raise the store's refusal, if writing failed: the run stops, the job goes on."""
        if self.writer.error is not None:
            raise self.writer.error

    def tick(self, t0: float) -> None:
        """A drain cycle's work besides reading the rings: the launched command's exit,
        processes gone without an exit record, the flush when due."""
        if self.root_pid is not None and self.root_status is None:
            self._reap_root(block=False)
        if t0 - self._last_check > 0.2:
            self._check_liveness()
            self._last_check = t0
        if t0 - self._last_flush >= self.flush_interval:
            self.flush()

    def stop(self) -> None:
        """Ask the loop to finish (signal handlers call this)."""
        self.stop_requested = True

    def _reap_root(self, block: bool) -> None:
        try:
            pid, status = os.waitpid(self.root_pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            self.root_status = self.root_status if self.root_status is not None else 0
            return
        if pid == 0:
            return
        self.root_status = status
        st = self.procs.get(self.root_pid)
        if st is not None:
            # The kernel's own wait status is authoritative for the launched command.
            if os.WIFSIGNALED(status):
                st.span.exit_signal, st.span.exit_code = os.WTERMSIG(status), None
            elif os.WIFEXITED(status):
                st.span.exit_code, st.span.exit_signal = os.WEXITSTATUS(status), None
            st.dirty = True

    def _check_liveness(self) -> None:
        """A process whose exit record was lost must still end (counted, never silent)."""
        now = time.monotonic()
        for pid, st in self.procs.items():
            if st.ended:
                continue
            alive = _proc_alive(pid)
            if alive is None:
                self.liveness_errors += 1
                st.missing_since = None
                continue
            if alive:
                st.missing_since = None
            elif st.missing_since is None:
                st.missing_since = now
            elif now - st.missing_since > 0.3:
                log.warning("process %d ended without an exit record", pid)
                self._end_process(st, time.monotonic_ns())

    # -- decoding ----------------------------------------------------------------------
    def drain_once(self) -> tuple[int, int, int]:
        """Move everything in the rings into per-process buffers; returns the records
        drained from the event ring and from the two detail rings."""
        read_through = time.monotonic_ns()
        ev, de, dl = self.probes.drain()
        self.read_through_mono = read_through
        try:
            self._take_drained(ev, de, dl)
            return len(ev), len(de), len(dl)
        finally:
            self.probes.release()  # ev viewed the ring: nothing may keep it past here

    def _take_drained(self, ev: np.ndarray, de: np.ndarray, dl: np.ndarray) -> None:
        """Lifecycle records, per-process assembly and every source's turn for one drain."""
        self.details.add(de, dl)
        self.take_events(ev)

    def take_events(self, ev: np.ndarray) -> None:
        """This run's events of one drain (their details already queued), then every
        source's turn."""
        if not len(ev):
            for src in list(self.sources):
                self._guard(src, src.drain, self)
            return
        nr = ev["nr"]
        life = nr >= LIFECYCLE_MIN
        special = life | (nr == NR_EXIT_GROUP) | (nr == NR_EXIT)
        if special.any():
            # In time order: an exit_group call precedes its process's exit record.
            sp = ev[special]
            for e in sp[np.argsort(sp["ts"], kind="stable")]:
                if int(e["nr"]) >= LIFECYCLE_MIN:
                    self._lifecycle(e)
                else:
                    self._exit_call(e)
            if life.any():
                ev = take(ev, np.flatnonzero(~life))
        if len(ev):
            s0 = self._assemble(ev)
            for src in list(self.sources):
                self._guard(src, src.on_syscalls, self, ev, s0)
        for src in list(self.sources):
            self._guard(src, src.drain, self)

    def _guard(self, src: Source, fn: Callable, *args) -> None:
        """A failing source is dropped with a logged, persisted reason: syscall capture and
        the traced job go on."""
        try:
            fn(*args)
        except Exception as e:
            log.error("renacerd: %s failed and is detached: %s: %s", type(src).__name__,
                      type(e).__name__, e)
            self.source_errors.append(f"{type(src).__name__}: {type(e).__name__}: {e}")
            try:
                self._dead_counters.update(src.counters())
            except Exception:
                pass
            self.sources.remove(src)
            try:
                src.close()
            except Exception:
                pass

    def strings_by_id(self, sid: int) -> bytes:
        """The interned string `sid`."""
        return self.strings.get(sid)

    def _details_for(self, tid: int, ts: int) -> list[tuple[int, int, bytes]]:
        return self.details.pop(tid, ts)

    def _proc(self, pid: int, ts: int, read_dist: bool = True) -> ProcState | None:
        st = self.procs.get(pid)
        if st is None:
            if not self.probes.is_target(pid):
                # A stale start slot matched an unrelated thread: not ours, counted.
                self.foreign_events += 1
                return None
            # A process whose fork record we never saw (lost, or raced attach).
            try:
                span = snapshot(pid, ts, attached=True)
            except Exception:
                span = ProcessSpan(pid=pid, start_mono_ns=ts)
            st = self._new_proc(span)
            if read_dist:  # an exec reads it itself, once, and only when still followed
                self._read_dist(st)
        return st

    def _lifecycle(self, e: np.void) -> None:
        kind = int(e["nr"])
        pid, tid, ts = int(e["pid"]), int(e["tid"]), int(e["ts"])
        if kind == EV_FORK:
            self._on_fork(e, pid, ts)
        elif kind == EV_EXEC:
            self._on_exec(e, pid, tid, ts)
        elif kind == EV_EXIT:
            self._on_exit(e, pid, ts)
        elif kind == EV_SIGNAL:
            self._on_signal(e, pid, ts)

    def _on_fork(self, e: np.void, pid: int, ts: int) -> None:
        """A fork record: the child process, named after the parent until its exec."""
        child = int(e["a0"])
        det = self._details_for(child, ts)
        if int(e["flags"]) & F_THREAD or not self.follow:
            return
        parent = self._proc(pid, ts)
        if parent is None:
            return
        comm = decode(next((d for s, _, d in det if s == SLOT_COMM), b""))
        span = ProcessSpan(
            pid=child,
            ppid=pid,
            name=comm or parent.span.name,
            exe=parent.span.exe,
            argv=list(parent.span.argv),
            start_mono_ns=ts,
            nspid=None,
        )
        self._new_proc(span)

    def _on_exec(self, e: np.void, pid: int, tid: int, ts: int) -> None:
        """An exec record: the new image's path, name and argv, or the end of following."""
        st = self._proc(pid, ts, read_dist=False)
        if st is None:
            return
        # exec kills the other threads with SIGKILL: that is not how the process ends
        st.fatal_signal = st.exit_group = st.thread_exit_code = None
        path = argv = None
        for slot, _, data in self._details_for(tid, ts):
            if slot == SLOT_PATH0:
                st.span.exe = decode(data)
                path = data
            elif slot == SLOT_COMM:
                st.span.name = decode(data)
            elif slot == SLOT_ARGV_BLOB and data:
                args = split_argv(data)
                argv = b"\0".join(args)
                st.span.argv = [decode(a) for a in args]
        flags = int(e["flags"])
        st.execs.append((ts, path, argv, bool(flags & F_TRUNCATED)))
        st.dirty = True
        if flags & F_UNFOLLOWED:
            # The kernel stopped following it at this exec: it ends here for the run.
            log.warning("process %d: stopped following: %s", pid, STOPPED_PRIVILEGE)
            self.unfollowed += 1
            self._end_process(st, ts)
        else:
            self._read_dist(st)

    def _on_exit(self, e: np.void, pid: int, ts: int) -> None:
        """An exit record: the process ends when its last thread does (a0 set)."""
        st = self.procs.get(pid)
        if st is None:
            return
        if int(e["a0"]) and not st.ended:
            if int(e["ret"]) >= 0:
                st.wait_status = int(e["ret"])
            self._end_process(st, ts)

    def _on_signal(self, e: np.void, pid: int, ts: int) -> None:
        """A signal record: the first fatal-by-default signal delivered is kept."""
        st = self.procs.get(pid)
        sig = int(e["aux"])
        if st is not None and sig in FATAL_BY_DEFAULT and st.fatal_signal is None:
            st.fatal_signal = (ts, sig)

    def _read_dist(self, st: ProcState) -> None:
        """The rank variables of a new process image (once per exec or attach, never per
        event); a process gone before this read keeps the rank its hello gives, if any."""
        info, ok = read_environ(st.span.pid, self._host)
        if not ok:
            self.environ_unread += 1
        elif info is not None:
            st.span.dist = info
            with self.lock:
                self.store.set_process_dist(st.proc_id, info)

    def _exit_call(self, e: np.void) -> None:
        st = self.procs.get(int(e["pid"]))
        if st is None:
            return
        code = int(e["a0"]) & 0xFF
        if int(e["nr"]) == NR_EXIT_GROUP:
            if st.exit_group is None:
                st.exit_group = (int(e["ts"]), code)
        else:
            st.thread_exit_code = code

    def _end_process(self, st: ProcState, ts: int, untrace: bool = True) -> None:
        st.ended = True
        st.span.end_mono_ns = ts
        if st.span.pid != self.root_pid or self.root_status is None:
            sig, grp = st.fatal_signal, st.exit_group
            if st.wait_status is not None:
                w = st.wait_status
                st.span.exit_signal, st.span.exit_code = (
                    (w & 0x7F, None) if w & 0x7F else (None, w >> 8 & 0xFF))
            elif sig is not None and (grp is None or sig[0] < grp[0]):
                st.span.exit_signal, st.span.exit_code = sig[1], None
            elif grp is not None:
                st.span.exit_code = grp[1]
            elif st.thread_exit_code is not None:
                st.span.exit_code = st.thread_exit_code
        st.dirty = True
        if untrace:
            self.probes.remove_target(st.span.pid)
        for cb in self.on_process_exit:
            cb(st)

    def _assemble(self, ev: np.ndarray) -> np.ndarray:
        n = len(ev)
        s0 = np.full(n, -1, dtype=np.int32)
        s1 = np.full(n, -1, dtype=np.int32)
        mode = np.zeros(n, dtype=np.uint32)
        flags = ev["flags"] & RECORD_FLAGS  # the run slot above them routed the record
        if (flags & (F_EMPTY_PATH0 | F_EMPTY_PATH1)).any():
            empty = self.strings.intern(b"")
            s0[(flags & F_EMPTY_PATH0) != 0] = empty
            s1[(flags & F_EMPTY_PATH1) != 0] = empty
        has = np.flatnonzero(flags & F_DETAIL)
        fixed = flags
        if len(has):
            fixed = self._attach_details(ev, has, s0, s1, mode, flags)
        # Each process's events appended to its buffer in ring order; the writer sorts each
        # chunk by enter ts once (calls that cross a drain need that anyway).
        assembly.group(self, ev, fixed, s0, s1, mode)
        return s0

    def _attach_details(self, ev: np.ndarray, has: np.ndarray, s0: np.ndarray,
                        s1: np.ndarray, mode: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """String ids of the paths and addresses of events `has`, from their details, and
        the mode of open calls; returns the events' flags (`flags`, execs may change them)."""
        j = self.details.join(ev["tid"][has], ev["ts"][has], self._string_cache())
        pos = has[j.event]
        # an event flagged with details that has none: its detail sits behind a busy record
        # in the ring, or was dropped
        joined = np.zeros(len(has), dtype=bool)
        joined[j.event] = True
        self.paths_lost += len(has) - int(np.count_nonzero(joined))
        if not len(j):
            return flags
        slot = j.slot
        ids = j.ids if j.ids is not None else self._detail_ids(j)
        at0 = (slot == SLOT_PATH0) | (slot == SLOT_ADDR)
        s0[pos[at0]] = ids[at0]
        at1 = slot == SLOT_PATH1
        s1[pos[at1]] = ids[at1]
        # the probe sets pad only on the first path of the open family
        mode[pos[slot == SLOT_PATH0]] = j.pad[slot == SLOT_PATH0]
        nr = ev["nr"][pos]
        execs = np.flatnonzero((nr == NR_EXECVE) | (nr == NR_EXECVEAT))
        if len(execs):
            return self._exec_details(ev, pos[execs], j, execs, s0, s1, flags)
        return flags

    def _detail_ids(self, j: Joined) -> np.ndarray:
        """The string id of each detail of a numpy join (-1: a slot with none): a dict
        lookup per distinct detail of the drain, found in bulk."""
        intern, addr = self.strings.intern, self._addr_id
        inv, keys = j.distinct()
        return np.array([
            (intern(raw[: n - 1] if n > 0 else b"") if sl <= SLOT_PATH1
             else addr(raw, n) if sl == SLOT_ADDR else -1)
            for sl, n, raw in keys
        ], dtype=np.int32)[inv]

    def _string_cache(self) -> Any:
        """The compiled join's string cache (kept across drains), or None: the numpy join
        (where the extension is missing, or tests compare the two)."""
        if assembly.hot is None:
            return None
        if self._strings_cached is None:
            self._strings_cached = assembly.hot.StringCache(self._new_detail_string)
        return self._strings_cached

    def _new_detail_string(self, slot: int, n: int, payload: bytes) -> int:
        """The id of a detail's payload the compiled join has not seen: a path's bytes, or
        an address's first n bytes."""
        return self.strings.intern(payload) if slot <= SLOT_PATH1 else self._addr_id(payload, n)

    def _addr_id(self, raw: bytes, n: int) -> int:
        """String id of a socket address as text (formatted once per distinct address)."""
        # the field drops trailing NULs: the length tells them apart (a failed read, n < 0,
        # left no bytes worth keying on)
        key = (n, raw[:n] if n > 0 else b"")
        sid = self._addr_ids.get(key)
        if sid is None:
            sid = self._addr_ids[key] = self.strings.intern(
                format_sockaddr(detail_bytes(SLOT_ADDR, n, raw)).encode())
        return sid

    def _exec_details(self, ev: np.ndarray, pos: np.ndarray, j: Joined, which: np.ndarray,
                      s0: np.ndarray, s1: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """argv of execve calls (details `which` of `j`, events `pos`); a successful one
        also names its process. Returns the events' flags (`flags`, changed in place where
        an exec changed them: it is this drain's own copy)."""
        blobs: dict[int, bytes] = {}
        bits: dict[int, int] = {}  # the detail flags of each execve, or-ed
        for i, k in zip(pos.tolist(), which.tolist()):
            bits[i] = bits.get(i, 0) | int(j.flags[k])
            if int(j.slot[k]) == SLOT_ARGV_BLOB:
                blobs[i] = detail_bytes(SLOT_ARGV_BLOB, int(j.length[k]), j.raw(k))
        for i, fl in bits.items():
            argv = split_argv(blobs.get(i, b""))
            e = ev[i]
            if int(e["ret"]) == 0:
                t = int(e["ts"])
                st = self._proc(int(e["pid"]), t)
                if st is None:
                    continue
                _, path, kargv, kcut = _take_exec(st, t, t + int(e["dur"]))
                if kargv is not None:
                    # the kernel's copy beats a failed or cut user read; the record says
                    # what that copy is (its own cut was counted by the probe)
                    argv = [kargv]
                    flags[i] = (int(flags[i]) & ~(F_TRUNCATED | F_READ_FAILED)
                                | (F_TRUNCATED if kcut else 0))
                    fl = 0
                else:
                    st.span.argv = [decode(a) for a in argv]
                    st.dirty = True
                if path and (s0[i] < 0 or not self.strings_by_id(int(s0[i]))):
                    s0[i] = self.strings.intern(path)
            if fl & F_TRUNCATED:
                self.exec_counts["truncated"] += 1
            if fl & F_READ_FAILED:
                self.exec_counts["failed_reads"] += 1
            if argv:
                s1[i] = self.strings.intern(b"\0".join(argv))
        return flags

    # -- persistence -------------------------------------------------------------------
    def _flush_proc(self, st: ProcState) -> None:
        if not st.buffered:
            return
        self.writer.submit(st.proc_id, assembly.take_chunk(st))

    def counters(self) -> dict[str, int]:
        """Kernel-side loss counters of the syscall probes and of every other source."""
        c = self._probe_counters()
        c.update(self._source_counters())
        return c

    def _probe_counters(self) -> dict[str, int]:
        """The syscall probes' counters, with the truncations only the daemon can tell
        (an execve's argv cut in the caller's copy, with no whole kernel copy)."""
        c = self.probes.counters()
        for k, v in self.exec_counts.items():
            c[k] = c.get(k, 0) + v
        return c

    def _source_counters(self) -> dict[str, int]:
        out: dict[str, int] = {
            **self._dead_counters,
            "source_errors": len(self.source_errors),
            "paths_lost": self.paths_lost,
            "environ_unread": self.environ_unread,
            "foreign_events": self.foreign_events,
            "unfollowed_privileged": self.unfollowed,
            "liveness_errors": self.liveness_errors,
        }
        for src in self.sources:
            out.update(src.counters())
        for counters in self.counter_sources:
            out.update(counters())
        return out

    def flush(self) -> None:
        """Write every buffer, process change and counter; commit."""
        for st in self.procs.values():
            self._flush_proc(st)
        for src in list(self.sources):
            self._guard(src, src.flush, self)
        for cb in self.on_flush:
            cb()
        per_cpu = self.probes.counters_per_cpu()
        with self.lock:
            if self.strings.pending:
                self.store.add_strings(self.run_id, self.strings.pending)
                self.strings.pending = []
            for st in self.procs.values():
                if st.dirty:
                    self.store.update_process(st.proc_id, st.span)
                    st.dirty = False
            self.store.update_run(
                self.run_id,
                events=self.events,
                lost_per_cpu=per_cpu,
                source_counters=self._source_counters(),
                **{k: sum(v) + self.exec_counts.get(k, 0) for k, v in per_cpu.items()},
            )
            self.store.commit()
        self._last_flush = time.monotonic()
        # Details whose event never came (its record was lost) must not pile up (shared
        # queues are bounded by their owner).
        if self.own_details and len(self.details) > 100_000:
            self.details.clear()

    def finish(self, status: str = "complete", error: str | None = None) -> Summary:
        """Final flush; mark the run ended."""
        if self.root_pid is not None and self.root_status is None:
            # Stopped early (signal, --duration): never wait for, or harm, the command.
            self._reap_root(block=not self.stop_requested and not self.any_traced_alive())
        write_error: str | None = None
        try:
            self.flush()
        except StoreError as e:
            write_error = str(e)
        try:
            self.writer.close()
        except StoreError as e:
            write_error = write_error or str(e)
        if write_error is not None:
            # The disk refused data: say so in the run (if it can still be written at all).
            status, error = "incomplete", error or write_error
        exit_code = None
        if self.root_status is not None:
            s = self.root_status
            exit_code = os.WEXITSTATUS(s) if os.WIFEXITED(s) else 128 + os.WTERMSIG(s)
        end_wall, end_mono = time.time_ns(), time.monotonic_ns()
        try:
            with self.lock:
                self.store.update_run(
                    self.run_id, events=self.events, source_counters=self._source_counters(),
                    status=status, end_wall_ns=end_wall, end_mono_ns=end_mono,
                    exit_code=exit_code,
                    error=error or ("; ".join(self.source_errors) or None),
                    **self._probe_counters(),
                )
                self.store.commit()
        except StoreError as e:
            # Left 'running' in the file: readers and the next start show it incomplete.
            status, error = "incomplete", error or str(e)
        self.final_error = error if status != "complete" else None
        lost = self.counters()
        return Summary(
            run=self.run_name,
            db=self.store.path,
            processes=len(self.procs),
            events=self.events,
            lost=lost,
            wall_s=(end_mono - self.start_mono) / 1e9,
            exit_status=exit_code,
            status=status,
        )


class Source(Protocol):
    """Another event source feeding the same run (e.g. CUDA uprobes)."""

    def on_syscalls(self, tracer: Tracer, ev: np.ndarray, s0: np.ndarray) -> None:
        """A decoded batch of syscall events (s0: string ids of their paths), in arrival order."""

    def drain(self, tracer: Tracer) -> None:
        """Called every drain cycle: read your ring buffers."""

    def flush(self, tracer: Tracer) -> None:
        """Called before each commit: write chunks (store.add_chunk(..., layer=...))."""

    def counters(self) -> dict[str, int]:
        """Loss counters (names ending in _lost count dropped events), persisted with the run."""

    def close(self) -> None:
        """Detach everything."""


def drain_wait(drained: tuple[int, int], capacity: tuple[int, int], elapsed: float,
               longest: float) -> float:
    """Seconds to sleep before the next drain. A drain costs numpy call overheads whatever
    its size: drain big batches, but often enough that at the rate just seen (`drained`
    records of each ring in `elapsed` s) no ring is more than an eighth full (the priority
    guard lifts an idle daemon at a quarter)."""
    fill = max((n / cap for n, cap in zip(drained, capacity) if cap), default=0.0)
    if fill <= 0:
        return longest
    return min(longest, max(0.125 * elapsed / fill, MIN_DRAIN_INTERVAL))


def _proc_alive(pid: int) -> bool | None:
    """True while `pid` runs; False once it is gone or a zombie (a zombie leader whose other
    threads still run is alive); None when /proc cannot tell (EMFILE, ...): never death."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        if stat[stat.rindex(")") + 2] not in "ZX":
            return True
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1]) > 1
    except (FileNotFoundError, ProcessLookupError):
        return False
    except (OSError, ValueError):
        # stat needs no descriptor: a gone process is known gone even at EMFILE.
        return False if not os.path.exists(f"/proc/{pid}") else None
    return False


def install_signal_handlers(tracer: Tracer) -> None:
    """SIGINT/SIGTERM end the run cleanly."""

    def _h(signum, frame):
        tracer.stop()

    signal.signal(signal.SIGINT, _h)
    signal.signal(signal.SIGTERM, _h)
