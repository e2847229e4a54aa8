"""`renacerd serve`: the host daemon that starts one tracer per run on a client's request.

The front socket (bound here or handed over by systemd) takes only Hello, TraceMe and
StatusQuery. A TraceMe starts `renacerd --pid <peer> --run <name> --socket <per-run>` as a
child, waits until it reports its probes attached (--ready-fd), and acks with the per-run
socket, to which the client reconnects for its spans. Each run is therefore the tested
one-shot session, isolated in its own process; the peer's pid and uid come from SO_PEERCRED.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import psutil

from renacerd import protocol
from renacerd.daemon.notify import Notifier
from renacerd.daemon.span_server import bind_socket
from renacerd.protocol import (
    MAX_FRAME,
    Ack,
    Hello,
    Message,
    ProtocolError,
    ServiceStatus,
    StatusQuery,
    TraceMe,
)
from renacerd.store import Store, StoreError

log = logging.getLogger("renacerd.service")

GROUP = "renacer"
# Compiling and attaching the syscall probes takes ~2.5 s on a 2-core VM; leave headroom.
READY_TIMEOUT = 60.0
# The front only ever needs a handful of messages per connection (hello, trace_me, status).
RATE = 20.0
BURST = 40.0
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 256
STOP_GRACE = 1.8
POLL_INTERVAL = 0.5
_PEERCRED = struct.Struct("3i")

BPF_CHECK = """
from renacerd.probes.loader import compile_bpf
from bcc import BPF
b = compile_bpf("int renacer_load_check(void *ctx) { return 0; }")
b.load_func("renacer_load_check", BPF.KPROBE)
b.cleanup()
"""


class ServiceError(RuntimeError):
    """The service cannot start (one line, exit 2)."""


@dataclass(slots=True)
class Peer:
    """A front connection's SO_PEERCRED."""

    pid: int
    uid: int
    gid: int


@dataclass(slots=True)
class RunChild:
    """One run of the service: its traced root, its tracer process and per-run socket."""

    name: str
    uid: int
    root_pid: int
    socket: str
    proc: Optional[subprocess.Popen] = None
    ready: threading.Event = field(default_factory=threading.Event)
    failed: str = ""
    started: float = field(default_factory=time.monotonic)
    events: int = 0
    lost: int = 0
    rate: float = 0.0
    sampled: float = 0.0


def bpf_load_check(python: str = sys.executable, timeout: float = 120.0) -> None:
    """Compile and load a trivial kprobe program in a child (so LLVM never stays resident
    here); ServiceError with BCC's message if the kernel or capabilities refuse it."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        r = subprocess.run([python, "-c", BPF_CHECK], env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ServiceError(f"BPF load check did not finish in {timeout:.0f} s") from e
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ServiceError(f"BPF load check failed: {last}")


def renacer_gid(name: str = GROUP) -> Optional[int]:
    """The gid of the renacer group, None when it does not exist."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def secure_store(db_path: str, gid: Optional[int], directory: bool) -> None:
    """Store files 0640 and (when it is ours) their directory 0750, group renacer."""
    paths = [(p, 0o640) for p in (db_path, db_path + "-wal", db_path + "-shm")]
    if directory:
        paths.insert(0, (os.path.dirname(os.path.abspath(db_path)), 0o750))
    for path, mode in paths:
        try:
            os.chmod(path, mode)
            if gid is not None:
                os.chown(path, -1, gid)
        except FileNotFoundError:
            continue


class Service:
    """The front socket, the runs it started, and their lifecycle."""

    def __init__(self, sock: socket.socket, db_path: str, runs_dir: str,
                 notifier: Notifier, python: str = sys.executable,
                 unlink_path: Optional[str] = None) -> None:
        self.sock = sock
        self.db_path = db_path
        self.runs_dir = runs_dir
        self.notifier = notifier
        self.python = python
        self.unlink_path = unlink_path
        self.started = time.monotonic()
        self.runs: dict[str, RunChild] = {}
        self.ended: list[RunChild] = []
        self.lock = threading.Lock()
        self.store_lock = threading.Lock()
        self.stopping = threading.Event()
        self.store = Store(db_path, create=True)
        self.store.mark_stale_runs_incomplete()
        self.conns: dict[int, socket.socket] = {}
        self.next_socket = 0
        self.stats = {"connections": 0, "rejected": 0, "protocol_errors": 0, "messages": 0,
                      "runs_started": 0, "runs_refused": 0}
        os.makedirs(runs_dir, mode=0o711, exist_ok=True)
        os.chmod(runs_dir, 0o711)

    # -- the front socket ------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Accept front connections until stop(); each gets a thread (the traffic is tiny)."""
        self.sock.setblocking(True)
        self.sock.settimeout(POLL_INTERVAL)
        reaper = threading.Thread(target=self._reap_loop, name="renacerd-reaper", daemon=True)
        reaper.start()
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self.stopping.is_set():
                    break
                # EMFILE and friends: keep serving what is open, retry shortly.
                log.warning("accept failed: %s", e)
                time.sleep(0.1)
                continue
            pid, uid, gid = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            with self.lock:
                if len(self.conns) >= MAX_CONNECTIONS:
                    self.stats["rejected"] += 1
                    log.warning("refusing pid %d uid %d: %d connections open", pid, uid,
                                len(self.conns))
                    conn.close()
                    continue
                self.conns[conn.fileno()] = conn
                self.stats["connections"] += 1
            threading.Thread(target=self._serve_conn, args=(conn, Peer(pid, uid, gid)),
                             name=f"renacerd-front-{pid}", daemon=True).start()
        reaper.join(2 * POLL_INTERVAL)

    def _serve_conn(self, conn: socket.socket, peer: Peer) -> None:
        fd = conn.fileno()
        reason = "closed by peer"
        level = logging.DEBUG
        tokens, refilled = BURST, time.monotonic()
        greeted = False
        conn.settimeout(IDLE_TIMEOUT)
        try:
            while not self.stopping.is_set():
                try:
                    frame = conn.recv(MAX_FRAME + 1)
                except TimeoutError:
                    reason = f"idle for {IDLE_TIMEOUT:.0f} s"
                    break
                except OSError as e:
                    reason = f"receive failed: {e}"
                    break
                if not frame:
                    break
                now = time.monotonic()
                tokens = min(BURST, tokens + (now - refilled) * RATE) - 1
                refilled = now
                if tokens < 0:
                    reason, level = f"rate limit ({RATE:.0f} messages/s)", logging.WARNING
                    break
                with self.lock:
                    self.stats["messages"] += 1
                try:
                    msg = protocol.decode(frame)
                    if not greeted and not isinstance(msg, Hello):
                        raise ProtocolError("schema", "first message must be hello")
                except ProtocolError as e:
                    with self.lock:
                        self.stats["protocol_errors"] += 1
                    reason, level = f"protocol error ({e})", logging.WARNING
                    break
                greeted = True
                reply = self._handle(peer, msg)
                if reply is not None:
                    try:
                        conn.send(protocol.encode(reply), socket.MSG_NOSIGNAL)
                    except OSError as e:
                        reason = f"reply failed: {e}"
                        break
        finally:
            log.log(level, "front client pid %d uid %d disconnected: %s", peer.pid, peer.uid,
                    reason)
            with self.lock:
                self.conns.pop(fd, None)
            conn.close()

    def _handle(self, peer: Peer, msg: Message) -> Optional[Message]:
        if isinstance(msg, TraceMe):
            ok, reason, path = self.trace_request(peer, msg.run)
            return Ack(msg.request_id, ok, reason, path)
        if isinstance(msg, StatusQuery):
            return self.status(peer)
        # Spans belong on the per-run socket; here they are well-formed but meaningless.
        return None

    # -- runs --------------------------------------------------------------------------------
    def trace_request(self, peer: Peer, name: Optional[str]) -> tuple[bool, str, Optional[str]]:
        """Trace the peer's process tree as run `name`: (ok, reason, per-run socket)."""
        if name is None:
            return False, "no run name (configure(run=...) or RENACER_RUN)", None
        if self.stopping.is_set():
            return False, "renacerd is stopping", None
        with self.lock:
            run = self.runs.get(name)
            if run is None:
                clash = self._traced_by(peer.pid)
                if clash is not None:
                    self.stats["runs_refused"] += 1
                    return False, f"this process is already traced as run {clash.name!r}", None
                with self.store_lock:
                    exists = self.store.run_exists(name)
                if exists:
                    self.stats["runs_refused"] += 1
                    return False, f"run {name!r} already exists in the store", None
                self.next_socket += 1
                path = os.path.join(self.runs_dir, f"{self.next_socket}.sock")
                run = RunChild(name, peer.uid, peer.pid, path)
                self.runs[name] = run
                starter = True
            else:
                starter = False
                if peer.uid not in (0, run.uid):
                    self.stats["runs_refused"] += 1
                    return False, f"run {name!r} belongs to another user", None
                if not self._in_tree(peer.pid, run.root_pid):
                    self.stats["runs_refused"] += 1
                    return False, f"run {name!r} is tracing another process tree", None
        if starter:
            self._start(run)
        else:
            run.ready.wait(READY_TIMEOUT)
        if not run.ready.is_set() or run.failed:
            return False, run.failed or "tracer not ready in time", None
        return True, "", run.socket

    def _traced_by(self, pid: int) -> Optional[RunChild]:
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

    def _start(self, run: RunChild) -> None:
        ready_r, ready_w = os.pipe()
        cmd = [self.python, "-m", "renacerd.cli.renacerd_main", "-q", "--pid",
               str(run.root_pid), "--run", run.name, "--socket", run.socket, "--db",
               self.db_path, "--ready-fd", str(ready_w)]
        try:
            run.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=(ready_w,),
                                        env=self._child_env())
        except OSError as e:
            os.close(ready_r)
            os.close(ready_w)
            self._fail(run, f"cannot start the tracer: {e}")
            return
        finally:
            if run.proc is not None:
                os.close(ready_w)
        try:
            r, _, _ = select.select([ready_r], [], [], READY_TIMEOUT)
            line = os.read(ready_r, 64) if r else b""
        finally:
            os.close(ready_r)
        if line != b"ready\n":
            code = run.proc.poll()
            if code is None:
                run.proc.terminate()
                self._fail(run, f"tracer for run {run.name!r} not ready in "
                                f"{READY_TIMEOUT:.0f} s")
            else:
                self._fail(run, f"tracer for run {run.name!r} failed (exit status {code}; "
                                "see the service log)")
            return
        try:
            # Only the asking user (and root) may connect to the run's span socket.
            os.chown(run.socket, run.uid, -1)
            with self.store_lock:
                self.store.update_run(self.store.run(run.name).id, owner_uid=run.uid)
                self.store.commit()
        except (OSError, StoreError) as e:
            log.warning("run %s: %s", run.name, e)
        with self.lock:
            self.stats["runs_started"] += 1
        log.info("run %s: tracing pid %d for uid %d (tracer pid %d)", run.name, run.root_pid,
                 run.uid, run.proc.pid)
        run.ready.set()

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                            "LISTEN_PID", "LISTEN_FDNAMES")}
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    def _fail(self, run: RunChild, reason: str) -> None:
        log.warning("%s", reason)
        run.failed = reason
        with self.lock:
            self.stats["runs_refused"] += 1
            self.runs.pop(run.name, None)
        if run.proc is not None:
            try:
                run.proc.wait(5)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait()
        run.ready.set()

    def _reap_loop(self) -> None:
        while not self.stopping.wait(POLL_INTERVAL):
            self.reap()
            self._sample()
            self.notifier.watchdog()

    def reap(self) -> None:
        """Forget runs whose tracer has exited (it ended the run in the store itself)."""
        with self.lock:
            done = [r for r in self.runs.values()
                    if r.proc is not None and r.ready.is_set() and r.proc.poll() is not None]
            for run in done:
                del self.runs[run.name]
        for run in done:
            log.info("run %s ended (tracer exit status %d)", run.name, run.proc.returncode)
        if any(run.proc.returncode != 0 for run in done):
            # A tracer that died (killed, disk full) could not end its run: mark it now.
            with self.store_lock:
                try:
                    self.store.mark_stale_runs_incomplete()
                except StoreError as e:
                    log.warning("marking ended runs: %s", e)
        if done:
            self._say_status()

    def _sample(self) -> None:
        with self.lock:
            live = [r for r in self.runs.values() if r.ready.is_set()]
        now = time.monotonic()
        for run in live:
            try:
                with self.store_lock:
                    info = self.store.run(run.name)
            except StoreError:
                continue
            if run.sampled:
                run.rate = (info.events - run.events) / max(now - run.sampled, 1e-3)
            run.events, run.lost, run.sampled = info.events, info.lost, now
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
                 "tracer_pid": r.proc.pid if r.proc is not None else 0,
                 "ready": r.ready.is_set(), "events": r.events,
                 "events_per_s": round(r.rate, 1), "lost": r.lost,
                 "uptime": round(now - r.started, 3)}
                for r in self.runs.values() if peer.uid == 0 or peer.uid == r.uid
            ]
        return ServiceStatus(round(now - self.started, 3), runs, os.getpid())

    # -- shutdown ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking requests; every tracer flushes, detaches and ends its run."""
        self.stopping.set()
        self.notifier.stopping("stopping: ending every run")
        with self.lock:
            runs = list(self.runs.values())
            conns = list(self.conns.values())
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for run in runs:
            if run.proc is not None and run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for run in runs:
            if run.proc is None:
                continue
            try:
                run.proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                log.warning("run %s: tracer did not stop in %.1f s; killed", run.name,
                            STOP_GRACE)
                run.proc.kill()
                run.proc.wait()
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
