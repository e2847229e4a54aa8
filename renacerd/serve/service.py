"""`renacerd serve`: the host daemon that starts one tracer per run on a client's request.

The front socket (bound here or handed over by systemd) takes only Hello, TraceMe and
StatusQuery. A TraceMe starts `renacerd --pid <peer> --run <name> --socket <per-run>` as a
child, waits until it reports its probes attached (--ready-fd), and acks with the per-run
socket, to which the client reconnects for its spans. Each run is therefore the tested
one-shot session, isolated in its own process. The peer's pid and uid come from SO_PEERCRED,
pinned at accept (renacerd.capture.peer) and checked again before a tracer starts and before
the ack; per-uid limits keep one user from taking what others need (docs/security.md).
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import secrets
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import psutil

from renacerd.capture.peer import Peer, PeerChanged, check_traceable, pin
from renacerd.client import protocol
from renacerd.client.protocol import (
    MAX_FRAME,
    Ack,
    Hello,
    Message,
    ProtocolError,
    ServiceStatus,
    StatusQuery,
    TraceMe,
)
from renacerd.serve.loglimit import LimitedLog
from renacerd.serve.notify import Notifier
from renacerd.serve.span_ring import close_untrusted
from renacerd.serve.span_server import (
    ACCEPT_BACKOFF,
    ACCEPT_BACKOFF_MAX,
    ANCILLARY,
    _close_unread,
    _descriptors,
    bind_socket,
)
from renacerd.store.database import Store, StoreError

log = logging.getLogger("renacerd.service")

GROUP = "renacer"
# Compiling and attaching the syscall probes takes ~2.5 s on a 2-core VM; leave headroom.
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
# Out of descriptors at accept: wait this long before the next accept, doubling to the max.
TRACER_MODULE = "renacerd.cli.renacerd_main"

BPF_CHECK = """
from renacerd.capture.probes.loader import compile_bpf
from bcc import BPF
b = compile_bpf("int renacer_load_check(void *ctx) { return 0; }")
b.load_func("renacer_load_check", BPF.KPROBE)
b.cleanup()
"""


class ServiceError(RuntimeError):
    """The service cannot start (one line, exit 2)."""


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


def _is_service(cmdline: list[str]) -> bool:
    return "serve" in cmdline and any("renacerd" in a for a in cmdline)


def stop_orphans(runs_dir: str, grace: float = STOP_GRACE) -> list[int]:
    """SIGTERM tracers left by a service that died (SIGKILL outside systemd): they end their
    runs and free their sockets. Returns their pids."""
    prefix = os.path.join(os.path.abspath(runs_dir), "")
    orphans = []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        cmd = p.info["cmdline"] or []
        if TRACER_MODULE not in cmd or "--ready-fd" not in cmd or "--socket" not in cmd:
            continue
        i = cmd.index("--socket")
        if i + 1 >= len(cmd) or not os.path.abspath(cmd[i + 1]).startswith(prefix):
            continue
        try:
            parent = psutil.Process(p.info["ppid"]).cmdline() if p.info["ppid"] > 1 else []
        except psutil.Error:
            parent = []
        if _is_service(parent):
            continue
        log.warning("stopping orphaned tracer pid %d (%s) left by an earlier service",
                    p.pid, cmd[i + 1])
        try:
            p.terminate()
            orphans.append(p)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(orphans, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)
    return [p.pid for p in orphans]


class Service:
    """The front socket, the runs it started, and their lifecycle."""

    def __init__(self, sock: socket.socket, db_path: str, runs_dir: str,
                 notifier: Notifier, python: str = sys.executable,
                 unlink_path: Optional[str] = None, group: str = GROUP) -> None:
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
        self.store = Store(db_path, create=True, group=group)
        self.store.mark_stale_runs_incomplete()
        self.conns: dict[int, tuple[socket.socket, Peer]] = {}
        self.stats = {"connections": 0, "rejected": 0, "protocol_errors": 0, "messages": 0,
                      "runs_started": 0, "runs_refused": 0, "accept_errors": 0,
                      "descriptors_refused": 0, "limited": 0}
        self.warnings = LimitedLog(log)
        open_runs_dir(runs_dir)
        stop_orphans(runs_dir)

    # -- the front socket ------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Accept front connections until stop(); each gets a thread (the traffic is tiny)."""
        self.sock.setblocking(True)
        self.sock.settimeout(POLL_INTERVAL)
        reaper = threading.Thread(target=self._reap_loop, name="renacerd-reaper", daemon=True)
        reaper.start()
        backoff = ACCEPT_BACKOFF
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self.stopping.is_set():
                    break
                # EMFILE and friends: keep serving what is open; wait before trying again
                # (the pending connection is still there) and say so once in a while.
                with self.lock:
                    self.stats["accept_errors"] += 1
                    n = self.stats["accept_errors"]
                self.warnings.warning("accept", "accept failed: %s; %d times so far", e, n)
                self.stopping.wait(backoff)
                backoff = min(2 * backoff, ACCEPT_BACKOFF_MAX)
                continue
            backoff = ACCEPT_BACKOFF
            try:
                peer = pin(conn)
            except OSError as e:
                self.warnings.warning("accept", "accepted connection unusable: %s", e)
                _close_unread(conn)
                continue
            with self.lock:
                refusal = self._over_limit(peer)
                if refusal is None:
                    self.conns[conn.fileno()] = (conn, peer)
                    self.stats["connections"] += 1
                else:
                    self.stats["rejected"] += 1
            if refusal is not None:
                self.warnings.warning("limit", "refusing pid %d uid %d: %s", peer.pid,
                                      peer.uid, refusal)
                try:
                    # Request id 0: the client reports the reason and goes on untraced.
                    conn.send(protocol.encode(Ack(0, False, refusal)),
                              socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                except OSError:
                    pass
                peer.close()
                _close_unread(conn)
                continue
            threading.Thread(target=self._serve_conn, args=(conn, peer),
                             name=f"renacerd-front-{peer.pid}", daemon=True).start()
        reaper.join(2 * POLL_INTERVAL)

    def _over_limit(self, peer: Peer) -> Optional[str]:
        """Why `peer` may not have another front connection, None if it may (lock held)."""
        if peer.uid == 0:
            return None if len(self.conns) < MAX_CONNECTIONS else (
                f"{MAX_CONNECTIONS} connections open")
        if len(self.conns) >= MAX_CONNECTIONS - ROOT_RESERVED:
            return f"{len(self.conns)} connections open (the last {ROOT_RESERVED} are root's)"
        mine = sum(1 for _, p in self.conns.values() if p.uid == peer.uid)
        if mine >= MAX_CONNECTIONS_PER_UID:
            return (f"limit: uid {peer.uid} has {mine} connections open (at most "
                    f"{MAX_CONNECTIONS_PER_UID} per user)")
        return None

    def _serve_conn(self, conn: socket.socket, peer: Peer) -> None:
        fd = conn.fileno()
        reason = "closed by peer"
        level = logging.DEBUG
        clean = False  # read to its end (EOF): nothing can be queued on it
        tokens, refilled = BURST, time.monotonic()
        greeted = False
        conn.settimeout(IDLE_TIMEOUT)
        try:
            while not self.stopping.is_set():
                try:
                    # Room for every descriptor a message may carry (span_server.ANCILLARY):
                    # none that a client adds is closed by the kernel on this thread.
                    frame, ancillary, flags, _ = conn.recvmsg(MAX_FRAME + 1, ANCILLARY,
                                                              socket.MSG_CMSG_CLOEXEC)
                except TimeoutError:
                    reason = f"idle for {IDLE_TIMEOUT:.0f} s"
                    break
                except OSError as e:
                    reason = f"receive failed: {e}"
                    break
                fds = _descriptors(ancillary) if ancillary else []
                if fds or flags & socket.MSG_CTRUNC:
                    for d in fds:
                        close_untrusted(d)
                    with self.lock:
                        self.stats["descriptors_refused"] += len(fds)
                        self.stats["protocol_errors"] += 1
                    reason = "protocol error (descriptors on the front socket)"
                    level = logging.WARNING
                    break
                if not frame:
                    clean = True
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
            if level >= logging.WARNING:
                self.warnings.warning("client", "front client pid %d uid %d disconnected: %s",
                                      peer.pid, peer.uid, reason)
            else:
                log.log(level, "front client pid %d uid %d disconnected: %s", peer.pid,
                        peer.uid, reason)
            with self.lock:
                self.conns.pop(fd, None)
            peer.close()
            if clean:
                conn.close()
            else:
                _close_unread(conn)  # unread messages may hold descriptors

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
        try:
            # Still the process that connected, with no uid but the peer's, dumpable.
            check_traceable(peer.pid, peer.uid, peer)
        except PeerChanged as e:
            with self.lock:
                self.stats["runs_refused"] += 1
            self.warnings.warning("peer", "refusing to trace pid %d for uid %d: %s", peer.pid,
                                  peer.uid, e)
            return False, f"not traced: {e}", None
        with self.lock:
            run = self.runs.get(name)
            if run is None:
                mine = sum(1 for r in self.runs.values() if r.uid == peer.uid)
                if peer.uid != 0 and mine >= MAX_RUNS_PER_UID:
                    self.stats["runs_refused"] += 1
                    self.stats["limited"] += 1
                    return False, (f"limit: uid {peer.uid} has {mine} runs traced (at most "
                                   f"{MAX_RUNS_PER_UID} per user)"), None
                clash = self._traced_by(peer.pid)
                if clash is not None:
                    self.stats["runs_refused"] += 1
                    return False, f"this process is already traced as run {clash.name!r}", None
                with self.store_lock:
                    exists = self.store.run_exists(name)
                if exists:
                    self.stats["runs_refused"] += 1
                    return False, f"run {name!r} already exists in the store", None
                # Unique, so a tracer left by an earlier service never holds the name.
                path = os.path.join(self.runs_dir, f"{secrets.token_hex(8)}.sock")
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
            self._start(run, peer)
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

    def _start(self, run: RunChild, peer: Peer) -> None:
        ready_r, ready_w = os.pipe()
        cmd = [self.python, "-m", TRACER_MODULE, "-q", "--pid",
               str(run.root_pid), "--run", run.name, "--socket", run.socket, "--db",
               self.db_path, "--owner-uid", str(run.uid), "--ready-fd", str(ready_w)]
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
            # The tracer attached by pid: it must have found the process that asked.
            check_traceable(run.root_pid, run.uid, peer)
        except PeerChanged as e:
            run.proc.kill()  # no further write: what it recorded may be another's
            run.proc.wait()
            with self.store_lock:
                try:
                    self.store.forget_run(self.store.run(run.name).id,
                                          f"not traced: {e} (recorded data removed)")
                    self.store.commit()
                except StoreError as err:
                    log.warning("run %s: %s", run.name, err)
            self._fail(run, f"not traced: {e}")
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
            conns = [conn for conn, _ in self.conns.values()]
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
