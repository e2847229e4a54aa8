"""`renacerd serve`: the host daemon that traces each client's process tree on request.

The syscall probes are compiled and attached once, at start (renacerd.capture.shared): a
run is a slot of that one attachment. The front socket (bound here or handed over by
systemd) is a SpanServer configured for it (front_server) and takes only Hello, TraceMe and
StatusQuery. A TraceMe claims a slot, puts the peer's
process tree in it (a few map updates), opens the run's own span socket, owned by the
asking uid, and acks with it; the client reconnects there for its spans. Each run has its
own Tracer, run in the store, chunk writer and counters (one store connection for all,
under one lock); the one drain loop routes records by slot. The peer's pid and uid come
from SO_PEERCRED, pinned at accept (renacerd.capture.peer) and checked again before the
attach and after it, before the ack; per-uid limits keep one user from taking what others
need (docs/security.md).
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import secrets
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import psutil

from renacerd.capture.peer import Peer, PeerChanged, check_traceable
from renacerd.capture.probes.loader import ProbeError
from renacerd.capture.shared import SharedCapture, SharedRun
from renacerd.capture.tracer import Tracer
from renacerd.client.protocol import Ack, Dump, Message, ServiceStatus, StatusQuery, TraceMe
from renacerd.serve.flight import TRIM_EVERY_S, FlightPolicy, FlightRun, exit_reason
from renacerd.serve.loglimit import LimitedLog
from renacerd.serve.notify import Notifier
from renacerd.serve.span_feed import DEFAULT_SOCKET, SpanFeed
from renacerd.serve.span_server import Admit, OnMessage, PeerCred, SpanServer, bind_socket
from renacerd.store.database import Store, StoreError
from renacerd.store.flight import finish_flight, fold_events

log = logging.getLogger("renacerd.service")

GROUP = "renacer"
# A second request for a run being started waits this long for the first one's attach.
READY_TIMEOUT = 60.0
# The front only ever needs a handful of messages per connection (hello, trace_me, status).
RATE = 20.0
BURST = 40.0
IDLE_TIMEOUT = 30.0
# Per-uid limits (docs/security.md, "Limits"). Root is held to none of them, and the last
# ROOT_RESERVED front connections are root's alone: `renacer status` as root always answers.
MAX_CONNECTIONS = 256
ROOT_RESERVED = 16
MAX_CONNECTIONS_PER_UID = 32
MAX_RUNS_PER_UID = 4
STOP_GRACE = 1.8
POLL_INTERVAL = 0.5
# What a run still live when the service stops says (restart, SIGTERM).
STOPPED_LIVE = "renacerd serve stopped while the run was live"


class ServiceError(RuntimeError):
    """The service cannot start (one line, exit 2)."""


@dataclass(slots=True)
class ServiceRun:
    """One run of the service: its traced root, per-run socket, and what traces it."""

    name: str
    uid: int
    root_pid: int
    socket: str
    ready: threading.Event = field(default_factory=threading.Event)
    failed: str = ""
    started: float = field(default_factory=time.monotonic)
    shared: Optional[SharedRun] = None
    feed: Optional[SpanFeed] = None
    ack_s: float = 0.0  # request to attach done: what the client waited for
    from_exec: bool = False  # records start at the root's next execve
    flight_asked: bool = False  # the client asked for the flight recorder
    flight: Optional[FlightRun] = None  # what it keeps, when the service has one
    events: int = 0
    lost: int = 0
    rate: float = 0.0
    sampled: float = 0.0


def load_capture() -> SharedCapture:
    """Compile and attach the probes every run shares; ServiceError with BCC's message if
    the kernel or capabilities refuse them."""
    try:
        capture = SharedCapture()
    except ProbeError as e:
        raise ServiceError(f"BPF load check failed: {e}") from e
    capture.start()
    return capture


def renacer_gid(name: str = GROUP) -> Optional[int]:
    """The gid of the renacer group, None when it does not exist."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def open_runs_dir(path: str) -> None:
    """Create the per-run socket directory 0711, or check the one there: a real directory
    (O_NOFOLLOW: a symlink planted by whoever can write its parent is refused) owned by us."""
    try:
        os.mkdir(path, 0o711)
    except FileExistsError:
        pass
    except OSError as e:
        raise ServiceError(f"cannot create {path}: {e.strerror or e}") from e
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ServiceError(f"{path} is not a directory (a symlink?); not using it") from e
        raise ServiceError(f"cannot open {path}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise ServiceError(f"{path} belongs to uid {st.st_uid}, not to us; not using it")
        os.fchmod(fd, 0o711)
    finally:
        os.close(fd)


class Service:
    """The front socket, the runs it traces, and their lifecycle."""

    def __init__(self, sock: socket.socket, db_path: str, runs_dir: str,
                 notifier: Notifier, unlink_path: Optional[str] = None, group: str = GROUP,
                 capture: Optional[SharedCapture] = None,
                 flight: Optional[FlightPolicy] = None) -> None:
        """`capture`: the probes, loaded before READY=1 (loaded here when not given);
        `flight`: the flight recorder runs that ask for it get (None: every run in full)."""
        self.sock = sock
        self.flight = flight
        self.db_path = db_path
        self.runs_dir = runs_dir
        self.notifier = notifier
        self.unlink_path = unlink_path
        self.started = time.monotonic()
        self.runs: dict[str, ServiceRun] = {}
        self.lock = threading.Lock()
        # One connection for the service and every run it traces, under one lock (see
        # Tracer's `lock`).
        self.store_lock = threading.RLock()
        self.stopping = threading.Event()
        self.store = Store(db_path, create=True, group=group)
        self.store.mark_stale_runs_incomplete()
        # What the service counts; the front server counts its connections (`stats` has both).
        self.counts = {"runs_started": 0, "runs_refused": 0, "limited": 0}
        self.warnings = LimitedLog(log)
        self.front = front_server(sock, self._handle, self._over_limit, self.warnings)
        open_runs_dir(runs_dir)
        self.capture = capture if capture is not None else load_capture()
        # called when a run has ended (the retention pass of its end)
        self.on_run_end: Optional[Callable[[], None]] = None

    @property
    def stats(self) -> dict[str, int]:
        """The front server's counters (connections, refusals, protocol errors, ...) and the
        service's own (runs started and refused)."""
        with self.lock:
            return {**self.front.stats, **self.counts}

    # -- the front socket ------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Serve the front socket until stop(); this thread samples the runs meanwhile."""
        self.front.start()
        self._reap_loop()

    def _over_limit(self, peer: PeerCred) -> Optional[str]:
        """Why `peer` may not have another front connection, None if it may (called on the
        front server's thread, which alone opens and closes its connections)."""
        peers = self.front.peers()
        if peer.uid == 0:
            return None if len(peers) < MAX_CONNECTIONS else (
                f"{MAX_CONNECTIONS} connections open")
        if len(peers) >= MAX_CONNECTIONS - ROOT_RESERVED:
            return f"{len(peers)} connections open (the last {ROOT_RESERVED} are root's)"
        mine = sum(1 for p in peers if p.uid == peer.uid)
        if mine >= MAX_CONNECTIONS_PER_UID:
            return (f"limit: uid {peer.uid} has {mine} connections open (at most "
                    f"{MAX_CONNECTIONS_PER_UID} per user)")
        return None

    def _handle(self, peer: PeerCred, msg: Message) -> Optional[Message]:
        assert peer.pinned is not None  # the front server pins every peer
        if isinstance(msg, TraceMe):
            ok, reason, path = self.trace_request(peer.pinned, msg.run, msg.from_exec,
                                                  msg.flight)
            return Ack(msg.request_id, ok, reason, path)
        if isinstance(msg, Dump):
            ok, reason = self.dump(peer.pinned, msg.run)
            return Ack(msg.request_id, ok, reason)
        if isinstance(msg, StatusQuery):
            return self.status(peer.pinned)
        # Spans belong on the per-run socket; here they are well-formed but meaningless.
        return None

    # -- runs --------------------------------------------------------------------------------
    def trace_request(self, peer: Peer, name: Optional[str], from_exec: bool = False,
                      flight: bool = False) -> tuple[bool, str, Optional[str]]:
        """Trace the peer's process tree as run `name`: (ok, reason, per-run socket).
        `from_exec`: the peer is about to exec the command to trace; its records start at
        that execve. `flight`: keep only the flight recorder's window of full events."""
        if name is None:
            return False, "no run name (configure(run=...) or RENACER_RUN)", None
        if self.stopping.is_set():
            return False, "renacerd is stopping", None
        try:
            # Still the process that connected, with no uid but the peer's, dumpable.
            check_traceable(peer.pid, peer.uid, peer)
        except PeerChanged as e:
            with self.lock:
                self.counts["runs_refused"] += 1
            self.warnings.warning("peer", "refusing to trace pid %d for uid %d: %s", peer.pid,
                                  peer.uid, e)
            return False, f"not traced: {e}", None
        with self.lock:
            run = self.runs.get(name)
            if run is None:
                mine = sum(1 for r in self.runs.values() if r.uid == peer.uid)
                if peer.uid != 0 and mine >= MAX_RUNS_PER_UID:
                    self.counts["runs_refused"] += 1
                    self.counts["limited"] += 1
                    return False, (f"limit: uid {peer.uid} has {mine} runs traced (at most "
                                   f"{MAX_RUNS_PER_UID} per user)"), None
                clash = self._traced_by(peer.pid)
                if clash is not None:
                    self.counts["runs_refused"] += 1
                    return False, f"this process is already traced as run {clash.name!r}", None
                with self.store_lock:
                    exists = self.store.run_exists(name)
                if exists:
                    self.counts["runs_refused"] += 1
                    return False, f"run {name!r} already exists in the store", None
                # Unique, so a tracer left by an earlier service never holds the name.
                path = os.path.join(self.runs_dir, f"{secrets.token_hex(8)}.sock")
                run = ServiceRun(name, peer.uid, peer.pid, path, from_exec=from_exec,
                                 flight_asked=flight)
                self.runs[name] = run
                starter = True
            else:
                starter = False
                if peer.uid not in (0, run.uid):
                    self.counts["runs_refused"] += 1
                    return False, f"run {name!r} belongs to another user", None
                if not self._in_tree(peer.pid, run.root_pid):
                    self.counts["runs_refused"] += 1
                    return False, f"run {name!r} is tracing another process tree", None
        if starter:
            self._start(run, peer)
        else:
            run.ready.wait(READY_TIMEOUT)
        if not run.ready.is_set() or run.failed:
            return False, run.failed or "tracer not ready in time", None
        return True, "", run.socket

    def _traced_by(self, pid: int) -> Optional[ServiceRun]:
        for run in self.runs.values():
            if self._in_tree(pid, run.root_pid):
                return run
        return None

    @staticmethod
    def _in_tree(pid: int, root: int) -> bool:
        if pid == root:
            return True
        try:
            return any(p.pid == root for p in psutil.Process(pid).parents())
        except psutil.Error:
            return False

    def _start(self, run: ServiceRun, peer: Peer) -> None:
        """Put the peer's tree in a slot of the shared probes, open its span socket."""
        t0 = time.monotonic()
        try:
            slot = self.capture.claim(run.uid)
        except ProbeError as e:
            self._fail(run, f"not traced: {e}")
            return
        tracer = feed = None
        try:
            tracer = Tracer(slot, self.store, run.name, cmdline=[f"--pid={run.root_pid}"],
                            follow=True, owner_uid=run.uid, details=self.capture.details,
                            lock=self.store_lock)
            if run.flight_asked and self.flight is not None:
                run.flight = FlightRun(self.flight, tracer.run_id)
                with self.store_lock:
                    self.store.begin_flight(tracer.run_id, self.flight.window_ns)
                    self.store.commit()
            # Only the asking user (and root) may connect to the run's span socket.
            feed = SpanFeed(run.socket, None)
            feed.server.start()
            os.chown(run.socket, run.uid, -1)
        except (OSError, StoreError) as e:
            self.capture.discard(slot)
            self._close_parts(run, tracer, feed)
            self._fail(run, f"cannot start run {run.name!r}: {getattr(e, 'strerror', None) or e}")
            return
        run.feed = feed
        # Between two drains: the first records find the run, and no drain sees it before
        # the check after the attach has passed.
        with self.capture.lock:
            try:
                feed.attach(tracer, [run.root_pid])
                run.shared = self.capture.add(slot, tracer, self._run_ended)
                tracer.attach(run.root_pid)
                if run.from_exec:
                    # as the standalone daemon's launched child: records from its execve,
                    # and the call it is blocked in (waiting for the ack) matched, not
                    # counted as an exit without its enter
                    tracer.procs[run.root_pid].gated = True
                    slot.expect_exit(run.root_pid)
                # Attached by pid: it must still be the process that asked.
                check_traceable(run.root_pid, run.uid, peer)
                failed = None
            except (PeerChanged, psutil.Error, StoreError, ProbeError) as e:
                self.capture.discard(slot)  # no further record: what it has may be another's
                failed = f"not traced: {e}" if isinstance(e, PeerChanged) else (
                    f"cannot attach to pid {run.root_pid}: {e}")
        if failed is not None:
            self._close_parts(run, tracer, feed, forget=failed)
            self._fail(run, failed)
            return
        run.ack_s = time.monotonic() - t0
        with self.lock:
            self.counts["runs_started"] += 1
        log.info("run %s: tracing pid %d for uid %d (slot %d, attached in %.0f ms)", run.name,
                 run.root_pid, run.uid, slot.slot, 1000 * run.ack_s)
        run.ready.set()
        self._say_status()

    def _close_parts(self, run: ServiceRun, tracer: Optional[Tracer],
                     feed: Optional[SpanFeed], forget: Optional[str] = None) -> None:
        """Undo a start that failed; `forget`: also remove what the run recorded."""
        if feed is not None:
            feed.server.stop()
            try:
                os.unlink(run.socket)
            except OSError:
                pass
        try:
            if tracer is not None:
                if forget is not None:
                    tracer.writer.close()
                    with self.store_lock:
                        self.store.forget_run(tracer.run_id,
                                              f"{forget} (recorded data removed)")
                        self.store.commit()
                else:
                    tracer.finish(status="incomplete", error=run.failed or "not started")
        except StoreError as e:
            log.warning("run %s: %s", run.name, e)

    def _run_ended(self, shared: SharedRun) -> None:
        """The shared loop let go of a run (its tree exited, its store failed, or the
        service stops): end it in the store, close its socket and store connection."""
        with self.lock:
            run = next((r for r in self.runs.values() if r.shared is shared), None)
        tracer = shared.tracer
        if run is not None and run.feed is not None:
            run.feed.close()
            try:
                os.unlink(run.socket)
            except OSError:
                pass
        try:
            summary = tracer.finish(status=shared.status, error=shared.error)
            error = tracer.final_error
            if run is not None and run.flight is not None and summary is not None:
                self._flight_end(run, tracer, summary.status)
        except StoreError as e:
            summary, error = None, str(e)
        if error:
            log.error("run %s: error: %s", tracer.run_name, error)
        if summary is not None:
            log.info("run %s ended: %d processes, %d events, %d lost, status %s",
                     summary.run, summary.processes, summary.events,
                     summary.lost.get("events_lost", 0) + summary.lost.get("details_lost", 0),
                     summary.status)
        with self.lock:
            if run is not None:
                self.runs.pop(run.name, None)
        self._say_status()
        if self.on_run_end is not None:
            self.on_run_end()

    def _fail(self, run: ServiceRun, reason: str) -> None:
        log.warning("%s", reason)
        run.failed = reason
        with self.lock:
            self.counts["runs_refused"] += 1
            self.runs.pop(run.name, None)
        run.ready.set()

    def _reap_loop(self) -> None:
        while not self.stopping.wait(POLL_INTERVAL):
            self._sample()
            self._flight_tick()
            self.notifier.watchdog()

    # -- the flight recorder -----------------------------------------------------------------
    def dump(self, peer: Peer, name: str) -> tuple[bool, str]:
        """`renacer dump RUN`: keep the flight run's current window whole (owner or root)."""
        with self.lock:
            run = self.runs.get(name)
        if run is None or not run.ready.is_set() or run.shared is None:
            return False, f"no live run {name!r} in this service"
        if peer.uid not in (0, run.uid):
            return False, f"run {name!r} belongs to another user"
        if run.flight is None:
            return False, f"run {name!r} keeps every event (it is no flight recorder run)"
        try:
            with self.store_lock:
                lo, hi = run.flight.keep(self.store, f"dump by uid {peer.uid}")
                self.store.commit()
        except StoreError as e:
            return False, f"run {name!r}: {e}"
        log.info("run %s: flight window kept on request of uid %d", name, peer.uid)
        return True, (f"run {name!r}: the last {(hi - lo) / 1e9:.1f} s are kept in full, and "
                      "everything from now on")

    def _flight_tick(self) -> None:
        """Every flight run: a hung step keeps the window; what is older than the window
        (and not kept) is folded into aggregates, once a second."""
        with self.lock:
            live = [r for r in self.runs.values()
                    if r.flight is not None and r.ready.is_set() and r.shared is not None]
        now_s, now = time.monotonic(), time.monotonic_ns()
        for run in live:
            fl = run.flight
            book = run.feed.book if run.feed is not None else None
            try:
                if book is not None:
                    why = fl.hang(*book.steps(), now)
                    if why is not None:
                        with self.store_lock:
                            fl.keep(self.store, why, now)
                            self.store.commit()
                        log.warning("run %s: %s; its flight window is kept", run.name, why)
                if now_s >= fl.next_trim:
                    fl.next_trim = now_s + TRIM_EVERY_S
                    fold_events(self.store, run.name, fl.run_id, fl.cutoff(now),
                                self.store_lock, fl.strings)
            except Exception as e:  # the reaper goes on (the run too: traced in full)
                self.warnings.warning("flight", "run %s: flight recorder: %s: %s", run.name,
                                      type(e).__name__, e)

    def _flight_end(self, run: ServiceRun, tracer: Tracer, status: str) -> None:
        """The job ended: a failure (non-zero exit, a signal, a run not complete) keeps the
        window; the rest of what is not kept is folded into aggregates."""
        fl = run.flight
        st = tracer.procs.get(run.root_pid)
        why = exit_reason(st.span.exit_code, st.span.exit_signal) if st is not None else None
        if why is None and status != "complete":
            why = f"run {status}"
        end = time.monotonic_ns()
        if why is not None:
            with self.store_lock:
                fl.keep(self.store, why, end)
                self.store.commit()
            log.warning("run %s: %s; its flight window is kept", run.name, why)
        # a kept window keeps everything from its start; else every event is folded
        fold_events(self.store, run.name, fl.run_id,
                    fl.kept_from if fl.kept_from is not None else end + 1, self.store_lock,
                    fl.strings)
        with self.store_lock:
            finish_flight(self.store, run.name, fl.run_id)

    def _sample(self) -> None:
        with self.lock:
            live = [r for r in self.runs.values() if r.ready.is_set() and r.shared is not None]
        now = time.monotonic()
        for run in live:
            t = run.shared.tracer
            events = t.events
            lost = sum(t.probes.counters().get(k, 0) for k in ("events_lost", "details_lost"))
            if run.sampled:
                run.rate = (events - run.events) / max(now - run.sampled, 1e-3)
            run.events, run.lost, run.sampled = events, lost, now
        self._say_status()

    def _say_status(self) -> None:
        with self.lock:
            n = len(self.runs)
            rate = sum(r.rate for r in self.runs.values())
        self.notifier.status(f"tracing {n} run{'s' if n != 1 else ''}, {rate:.0f} events/s")

    def status(self, peer: Peer) -> ServiceStatus:
        """What is traced now; an unprivileged peer sees only its own runs."""
        now = time.monotonic()
        with self.lock:
            runs = [
                {"run": r.name, "pid": r.root_pid, "uid": r.uid,
                 # every run is traced by the service itself (one attachment for all)
                 "tracer_pid": os.getpid(),
                 "slot": r.shared.slot.slot if r.shared is not None else 0,
                 "ready": r.ready.is_set(), "events": r.events,
                 "events_per_s": round(r.rate, 1), "lost": r.lost,
                 "ack_s": round(r.ack_s, 4),
                 "uptime": round(now - r.started, 3)}
                for r in self.runs.values() if peer.uid == 0 or peer.uid == r.uid
            ]
        return ServiceStatus(round(now - self.started, 3), runs, os.getpid())

    # -- shutdown ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking requests; every live run is flushed and marked incomplete (its
        processes go on untraced), and every probe detached."""
        self.stopping.set()
        self.notifier.stopping("stopping: ending every run")
        # No request is taken, or half-served, once the runs are being closed.
        self.front.stop()
        self.capture.close(status="incomplete", error=STOPPED_LIVE, timeout=STOP_GRACE)
        self.sock.close()
        if self.unlink_path is not None:
            try:
                os.unlink(self.unlink_path)
            except FileNotFoundError:
                pass
        with self.store_lock:
            try:
                self.store.mark_stale_runs_incomplete()
                self.store.close()
            except StoreError as e:
                log.warning("closing the store: %s", e)


def front_server(sock: socket.socket, on_message: OnMessage, admit: Admit,
                 warnings: LimitedLog) -> SpanServer:
    """The front socket's server: peers pinned at accept; per-uid limits refused with an
    Ack (request id 0) that says why; a few messages a connection (RATE/s, BURST), closed
    beyond them or after IDLE_TIMEOUT s of silence; no ring, no descriptor. One thread
    serves every connection: a request is a few map updates, and only one request at a
    time starts a run."""
    return SpanServer(
        sock=sock, on_message=on_message, admit=admit,
        # Request id 0: the client reports the reason and goes on untraced.
        refusal=lambda reason: Ack(0, False, reason),
        pin_peers=True, rate=RATE, burst=BURST, close_over_rate=True,
        idle_timeout=IDLE_TIMEOUT, max_connections=None, rings=False, batch_delay=0.0,
        name="front", warnings=warnings,
    )


def listen(path: str, gid: Optional[int]) -> socket.socket:
    """Bind the front socket: 0660, group renacer (root only when the group is missing)."""
    try:
        return bind_socket(path, mode=0o660, group=gid)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EEXIST):
            raise ServiceError(str(e)) from e
        raise ServiceError(f"cannot listen on {path}: {e.strerror or e}") from e


def check_handed_socket(sock: socket.socket) -> None:
    """A systemd-passed socket must be a listening AF_UNIX SOCK_SEQPACKET socket."""
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        raise ServiceError("the socket from systemd must be AF_UNIX SOCK_SEQPACKET "
                           "(renacerd.socket: ListenSequentialPacket=, not ListenStream=)")
    name = sock.getsockname()
    if isinstance(name, str) and name:
        st = os.stat(name)
        if not stat.S_ISSOCK(st.st_mode):
            raise ServiceError(f"{name} is not a socket")


def open_front(handed: list[socket.socket], path: Optional[str], gid: Optional[int],
               group: str) -> tuple[socket.socket, Optional[str], str]:
    """The front socket: the one systemd handed over (checked), else one bound at `path`
    (default DEFAULT_SOCKET) for `gid`; (socket, path to unlink at stop or None, its path)."""
    if handed:
        sock, unlink = handed[0], None
        check_handed_socket(sock)
        path = sock.getsockname()
        path = path.decode() if isinstance(path, bytes) else path
    else:
        path = path or DEFAULT_SOCKET
        if gid is None:
            log.warning("group %r does not exist: only root can connect", group)
        sock, unlink = listen(path, gid), path
    return sock, unlink, path
