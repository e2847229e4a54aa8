"""The process's one connection to renacerd: socket, hello, ring, backlog and fail-open.

Fail-open: without a daemon spans still work locally, one warning is logged, nothing raises or
blocks; a full ring or socket queues frames in a bounded backlog (sent by a short-lived flusher
thread once there is room) and then drops (and counts) them.
"""

from __future__ import annotations

import array
import atexit
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from typing import Any, Optional

import orjson

from renacerd.client import protocol
from renacerd.client.dist_env import from_mapping as _dist_from_env
from renacerd.client.protocol import RING_DEFAULT
from renacerd.client.ring import RingWriter
from renacerd.client.span import U32_MAX, parse_traceparent

# One logger for the whole client: users filter on this name.
log = logging.getLogger("renacerd.client.core")

RETRY_NS = 1_000_000_000
DEFAULT_TRACE_TIMEOUT = 10.0  # a service attach compiles BPF: ~2 s on a 2-core host
SEND_BUFFER = 1 << 20
# Frames kept while the socket is full, before new ones are dropped (and counted).
BACKLOG = 4096
# After the socket was found full, frames go straight to the backlog for this long instead of
# each paying a send that fails again (a syscall and an exception, ~2 us) while the daemon
# is saturated; its timestamps come from the client, so the short delay changes nothing.
FULL_RETRY_NS = 50_000
# The flusher thread sends this many backlog frames per hold of the lock, and waits at most
# this long for room before it looks at the connection again.
FLUSH_SLICE = 64
FLUSH_POLL_MS = 100
# How often span wall-clock times re-read CLOCK_REALTIME (they are CLOCK_MONOTONIC + offset).
WALL_SYNC_NS = 1_000_000_000
EXIT_FLUSH_TIMEOUT = 0.5
# A full ring is looked at again after this long (s) by the flusher thread; and whether the
# daemon is still there (a syscall) at most once per LIVENESS_NS while the ring stays full.
RING_WAIT = 0.001
LIVENESS_NS = 100_000_000
CLIENT_NAME = "renacerd.client.core/1"
_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_GONE = select.POLLHUP | select.POLLRDHUP | select.POLLERR
_monotonic_ns = time.monotonic_ns
_time_ns = time.time_ns
_dumps = orjson.dumps
_MAX_FRAME = protocol.MAX_FRAME


def _hello_dist() -> Optional[dict[str, Any]]:
    """This process's rank variables for the hello (None outside a distributed job)."""
    info = _dist_from_env(os.environ, source="hello")
    if info is None:
        return None
    d = info.to_dict()
    del d["source"]
    return {k: v for k, v in d.items() if v is not None}


class Connection:
    """The process's one connection to renacerd, its settings and counters."""

    __slots__ = (
        "path", "run", "trace_timeout", "sock", "gen", "sent", "dropped", "unreported",
        "next_attempt_ns", "warned", "lock", "trace_lock", "needs_setup", "env_parent",
        "request_id", "hello", "wall_offset_ns", "wall_due_ns", "backlog", "full_until_ns",
        "flusher", "use_ring", "flight", "moved", "ring", "rsize", "alive_due_ns",
    )

    def __init__(self) -> None:
        self.path = protocol.DEFAULT_SOCKET
        self.run: Optional[str] = None
        self.trace_timeout = DEFAULT_TRACE_TIMEOUT
        self.sock: Optional[socket.socket] = None
        # Bumped on every new or lost connection: a span ends only on the connection it began on.
        self.gen = 0
        self.sent = 0
        self.dropped = 0
        self.unreported = 0
        self.next_attempt_ns = 0
        self.warned = False
        self.lock = threading.Lock()
        self.trace_lock = threading.Lock()
        self.needs_setup = True
        self.env_parent: Optional[tuple[int, int]] = None
        self.request_id = 0
        self.hello = b""
        self.backlog: deque[bytes] = deque()
        self.full_until_ns = 0
        self.flusher: Optional[threading.Thread] = None
        # The shared-memory ring of this connection (None: frames go over the socket).
        self.use_ring = True
        self.flight = False
        self.moved = False
        self.ring: Optional[RingWriter] = None
        self.rsize = RING_DEFAULT
        self.alive_due_ns = 0
        # Wall-clock times are CLOCK_MONOTONIC plus this offset, re-read once WALL_SYNC_NS.
        self.wall_offset_ns = _time_ns() - _monotonic_ns()
        self.wall_due_ns = 0

    def setup(self, socket_path: Optional[str] = None, run: Optional[str] = None,
              trace_timeout: Optional[float] = None, ring: Optional[bool] = None,
              flight: Optional[bool] = None) -> None:
        """Read settings once (explicit values over environment over defaults)."""
        self.path = socket_path or os.environ.get("RENACER_SOCKET") or protocol.DEFAULT_SOCKET
        self.run = run or os.environ.get("RENACER_RUN") or None
        self.use_ring = ring if ring is not None else os.environ.get("RENACER_RING") != "0"
        self.flight = flight if flight is not None else (
            os.environ.get("RENACER_FLIGHT_RECORDER", "0") not in ("", "0"))
        if trace_timeout is not None:
            self.trace_timeout = trace_timeout
        self.wall_offset_ns = _time_ns() - _monotonic_ns()
        self.wall_due_ns = 0
        header = os.environ.get("TRACEPARENT")
        self.env_parent = None
        if header:
            try:
                trace_id, span_id, _ = parse_traceparent(header)
                self.env_parent = (int.from_bytes(trace_id, "big"),
                                   int.from_bytes(span_id, "big"))
            except ValueError as exc:
                log.warning("ignoring TRACEPARENT: %s", exc)
        self.hello = protocol.encode(protocol.Hello(pid=os.getpid(), run=self.run,
                                                    client=CLIENT_NAME, dist=_hello_dist()))

    def sync_wall(self, now_ns: int) -> None:
        """Re-read the offset of CLOCK_REALTIME from CLOCK_MONOTONIC (due again WALL_SYNC_NS on)."""
        # Wall times are CLOCK_MONOTONIC plus this offset: one clock read per message instead
        # of two, and a step of the wall clock shows within WALL_SYNC_NS.
        self.wall_offset_ns = _time_ns() - _monotonic_ns()
        self.wall_due_ns = now_ns + WALL_SYNC_NS
        if self.ring is not None:
            # A ring write never fails, so a dead daemon shows only here (or when the ring
            # fills): one look at the socket per WALL_SYNC_NS.
            with self.lock:
                dead = self.daemon_gone() if self.ring is not None else None
                if dead is not None:
                    self.lose(dead)

    def first_use(self) -> None:
        """Settings from the environment; in service mode, the one tracing request."""
        with self.lock:
            if not self.needs_setup:
                return
            if not self.hello:
                self.setup()
            self.needs_setup = False
            run = self.run
        if run is not None:
            self.request_tracing(self.trace_timeout)

    def request_tracing(self, timeout: float = DEFAULT_TRACE_TIMEOUT) -> bool:
        """Ask the daemon to trace this process (service mode); False on refusal or timeout."""
        c = self
        with c.lock:
            if not c.hello:
                c.setup()
            c.needs_setup = False
        with c.trace_lock:
            with c.lock:
                c.request_id = request_id = (c.request_id % U32_MAX) + 1
            payload = protocol.encode(protocol.TraceMe(request_id, c.run, flight=c.flight))
            gen = c.send_control(payload, _monotonic_ns() + RETRY_NS)
            sock = c.sock
            if not gen or sock is None:
                return False
            deadline = time.monotonic() + timeout
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000):
                    log.warning("renacerd did not confirm tracing within %.1f s; going on untraced",
                                timeout)
                    return False
                try:
                    frame = sock.recv(protocol.MAX_FRAME, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    with c.lock:
                        c.lose(exc)
                    return False
                if not frame:
                    with c.lock:
                        c.lose(ConnectionResetError("daemon closed the connection"))
                    return False
                try:
                    msg = protocol.decode(frame)
                except protocol.ProtocolError:
                    continue
                if isinstance(msg, protocol.Ack) and msg.request_id == 0 and not msg.ok:
                    # Refused at accept (a per-user limit): the service closes the connection.
                    with c.lock:
                        c.refused(msg.reason)
                        c.lose(ConnectionResetError(msg.reason))
                    return False
                if isinstance(msg, protocol.Ack) and msg.request_id == request_id:
                    if not msg.ok:
                        log.warning("renacerd refused to trace this process: %s", msg.reason)
                    elif msg.socket:
                        c.move_to(msg.socket)
                    return msg.ok

    def warn(self, what: str, exc: BaseException) -> None:
        """Log the single fail-open warning of this process tree."""
        if not self.warned:
            self.warned = True
            log.warning("renacerd %s at %s (%s); experiment spans stay local, training goes on",
                        what, self.path, exc)

    def connect(self, now_ns: int) -> bool:
        """Open the connection and say hello; call with the lock held."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            sock.connect(self.path)
            sock.send(self.hello, _FLAGS)
        except OSError as exc:
            if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                reason = refusal(sock)
                if reason is not None:
                    self.refused(reason)
            sock.close()
            # Only a failure delays the next try: a thread that finds the first connect under
            # way waits for it on the lock instead of taking the daemon for absent.
            self.next_attempt_ns = now_ns + RETRY_NS
            self.warn("not reachable", exc)
            return False
        self.sock = sock
        self.gen += 1
        self.sent += 1
        # The service's host socket only takes the tracing request; spans go to the run's own
        # socket, where the ring is set up.
        if self.use_ring and (self.run is None or self.moved):
            self.open_ring(sock)
        return True

    def open_ring(self, sock: socket.socket) -> None:
        """Hand the daemon a sealed memfd ring; frames go there from now on (lock held)."""
        try:
            ring, fd = RingWriter.create(self.rsize, self.unreported)
        except (AttributeError, OSError) as exc:
            log.debug("no span ring (%s); frames go over the socket", exc)
            return
        try:
            sock.sendmsg([protocol.encode(protocol.Ring(ring.size, ring.crc))],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                         _FLAGS)
        except OSError as exc:
            log.debug("no span ring (%s); frames go over the socket", exc)
            ring.close()
            return
        finally:
            os.close(fd)
        self.sent += 1
        self.unreported = 0
        self.ring = ring

    def close_ring(self) -> None:
        """Forget the ring (the daemon reads what is in it when the connection closes)."""
        if self.ring is not None:
            self.sent += self.ring.seq
            self.ring.close()
            self.ring = None

    def ring_put(self, payload: bytes, now_ns: int, must: bool) -> int:
        """`send` through the ring: the backlog first, then this frame, else queue or drop."""
        if self.backlog:
            self.ring_flush()
        if not self.backlog and self.ring.write(payload):
            return self.gen
        if now_ns >= self.alive_due_ns:
            self.alive_due_ns = now_ns + LIVENESS_NS
            dead = self.daemon_gone()
            if dead is not None:
                self.lose(dead, failed=1)
                return 0
        return self.queue(payload, must)

    def ring_flush(self) -> None:
        """Move backlog frames into the ring, oldest first, while it has room."""
        backlog = self.backlog
        while backlog and self.ring.write(backlog[0]):
            backlog.popleft()

    def daemon_gone(self) -> Optional[OSError]:
        """Why the connection is dead, or None while the daemon holds it (one syscall)."""
        # poll, not a peek: an unread reply queued before the close would hide the close.
        if self.sock is None:
            return ConnectionResetError("the daemon closed the connection")
        poller = select.poll()
        poller.register(self.sock, _GONE)
        try:
            events = poller.poll(0)
        except OSError as exc:
            return exc
        if events and events[0][1] & _GONE:
            return ConnectionResetError("the daemon closed the connection")
        return None

    def count_dropped(self, n: int) -> None:
        """Count dropped frames; the daemon learns of them through the ring or a message."""
        self.dropped += n
        if self.ring is not None:
            self.ring.add_dropped(n)
        else:
            self.unreported += n

    def lose(self, exc: BaseException, failed: int = 0) -> None:
        """Forget a broken connection; its backlog, `failed` frames and frames left unread in
        the ring count as dropped."""
        if self.ring is not None:
            unread = self.ring.unread()
            failed += unread
            self.ring.seq -= unread  # counted as dropped, not as sent
            self.close_ring()
        self.dropped += len(self.backlog) + failed
        self.unreported += len(self.backlog) + failed
        self.backlog.clear()
        if self.sock is not None:
            if not self.warned and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                reason = refusal(self.sock)
                if reason is not None:
                    self.refused(reason)
            self.sock.close()
            self.sock = None
            self.gen += 1
        self.next_attempt_ns = _monotonic_ns() + RETRY_NS
        self.warn("connection lost", exc)

    def refused(self, reason: str) -> None:
        """The service refused this connection (a per-user limit): say why, once, instead of
        the fail-open warning."""
        if not self.warned:
            self.warned = True
            log.warning("renacerd refused this connection: %s; going on untraced", reason)

    def flush(self, sock: socket.socket, limit: int = -1) -> None:
        """Send the drop report, then up to `limit` backlog frames oldest first (-1: all)."""
        # A full socket raises BlockingIOError; what was not sent stays queued.
        if self.unreported:
            sock.send(_dumps({"t": "dropped", "n": self.unreported}), _FLAGS)
            self.sent += 1
            self.unreported = 0
        backlog = self.backlog
        while backlog and limit:
            sock.send(backlog[0], _FLAGS)
            backlog.popleft()
            self.sent += 1
            limit -= 1

    def send(self, payload: bytes, now_ns: int, must: bool = False) -> int:
        """Send one frame without blocking; the connection generation, or 0 if dropped.

        A frame the socket cannot take now waits in a bounded backlog, sent before anything
        newer; when the backlog is full the frame is dropped and counted. `must` frames
        (ends of spans the daemon knows about) are always kept, so no span stays open there.
        """
        with self.lock:
            return self.send_locked(payload, now_ns, must)

    def send_control(self, payload: bytes, now_ns: int) -> int:
        """A request answered on the socket: sent over it, never through the ring."""
        with self.lock:
            if self.sock is None and (now_ns < self.next_attempt_ns or not self.connect(now_ns)):
                return 0
            if self.ring is None:
                return self.send_locked(payload, now_ns)
            try:
                self.sock.send(payload, _FLAGS)  # type: ignore[union-attr]
            except BlockingIOError:
                self.count_dropped(1)
                return 0
            except OSError as exc:
                self.lose(exc, failed=1)
                return 0
            self.sent += 1
            return self.gen

    def send_locked(self, payload: bytes, now_ns: int, must: bool = False) -> int:
        """`send` for a caller that holds the lock."""
        if len(payload) > _MAX_FRAME:
            # Only metric names full of characters JSON escapes get here; the daemon would
            # close the connection over it.
            self.count_dropped(1)
            return 0
        if self.sock is None and (now_ns < self.next_attempt_ns or not self.connect(now_ns)):
            return 0
        if self.ring is not None:
            return self.ring_put(payload, now_ns, must)
        if self.backlog and now_ns < self.full_until_ns:
            return self.queue(payload, must)
        sock = self.sock
        try:
            if self.backlog or self.unreported:
                self.flush(sock)
            sock.send(payload, _FLAGS)
        except OSError as exc:
            return self.unsent(payload, exc, must)
        self.sent += 1
        return self.gen

    def queue(self, payload: bytes, must: bool) -> int:
        """Keep a frame the socket cannot take now, or drop (and count) it."""
        if must or len(self.backlog) < BACKLOG:
            self.backlog.append(payload)
            if self.flusher is None:
                self.start_flusher()
            return self.gen
        self.count_dropped(1)
        return 0

    def start_flusher(self) -> None:
        """Start the thread that sends the backlog once the socket has room; lock held."""
        thread = threading.Thread(target=self.drain, name="renacerd-client-flush", daemon=True)
        try:
            thread.start()
        except RuntimeError:
            return  # at interpreter shutdown: the next send or the exit flush takes over
        self.flusher = thread

    def drain(self) -> None:
        """The flusher thread's loop: wait for room, send the backlog, end when it is empty."""
        # Without this thread, frames queued by the last spans of a burst would wait for the
        # next span (or the exit flush). It sends in slices and waits without the lock, so a
        # span never waits on it for more than a slice.
        me = threading.current_thread()
        poller = select.poll()
        while True:
            with self.lock:
                sock = self.sock
                if self.flusher is not me:
                    return
                if sock is None:  # lost or reconfigured meanwhile: nothing left to send
                    self.flusher = None
                    return
                if self.ring is not None:
                    if self.drain_ring():
                        self.flusher = None
                        return
                    fd = -1
                else:
                    try:
                        self.flush(sock, FLUSH_SLICE)
                    except BlockingIOError:
                        fd = sock.fileno()
                    except OSError as exc:
                        self.lose(exc)
                        self.flusher = None
                        return
                    else:
                        if not self.backlog:
                            self.flusher = None
                            return
                        continue
            if fd < 0:
                time.sleep(RING_WAIT)  # a ring has no readiness to wait on
                continue
            poller.register(fd, select.POLLOUT)
            poller.poll(FLUSH_POLL_MS)
            poller.unregister(fd)

    def drain_ring(self) -> bool:
        """One flusher round on a ring (lock held): True when there is nothing more to do."""
        self.ring_flush()
        if not self.backlog:
            return True
        now = _monotonic_ns()
        if now >= self.alive_due_ns:
            self.alive_due_ns = now + LIVENESS_NS
            dead = self.daemon_gone()
            if dead is not None:
                self.lose(dead)
                return True
        return False

    def unsent(self, payload: bytes, exc: OSError, must: bool) -> int:
        """A send failed with the lock held: queue the frame when the socket is full."""
        if isinstance(exc, BlockingIOError):
            self.full_until_ns = _monotonic_ns() + FULL_RETRY_NS
            return self.queue(payload, must)
        self.lose(exc, failed=1)
        return 0

    def flush_at_exit(self) -> None:
        """At interpreter exit, give the backlog a short blocking chance to reach the daemon."""
        with self.lock:
            sock = self.sock
            if sock is None or not (self.backlog or self.unreported):
                return
            deadline = time.monotonic() + EXIT_FLUSH_TIMEOUT
            if self.ring is not None:
                # The ring outlives this process: what is in it when the connection closes
                # is read. Only the backlog needs room made for it; what finds none is
                # counted, and the daemon reads the count with the rest.
                while not self.drain_ring() and time.monotonic() < deadline:
                    time.sleep(RING_WAIT)
                if self.ring is not None and self.backlog:
                    self.count_dropped(len(self.backlog))
                    self.backlog.clear()
                return
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            while self.backlog or self.unreported:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000):
                    return
                try:
                    self.flush(sock)
                except BlockingIOError:
                    continue
                except OSError:
                    return

    def reset(self, socket_path: Optional[str], run: Optional[str],
              trace_timeout: Optional[float], ring: Optional[bool],
              flight: Optional[bool] = None) -> None:
        """Apply configure(): close the connection and take the new settings."""
        with self.lock:
            self.close_ring()
            if self.sock is not None:
                self.sock.close()
                self.sock = None
                self.gen += 1
            self.next_attempt_ns = 0
            self.unreported = 0
            self.backlog.clear()
            self.moved = False
            self.setup(socket_path, run, trace_timeout, ring, flight)
            # A run name asks the service to trace this process before its first span.
            self.needs_setup = self.run is not None

    def move_to(self, path: str) -> None:
        """Service mode: this run's spans go to its own per-run socket from now on."""
        with self.lock:
            self.close_ring()
            if self.sock is not None:
                self.sock.close()
                self.sock = None
                self.gen += 1
            self.path = path
            self.moved = True
            self.connect(_monotonic_ns())

    def after_fork(self) -> None:
        """In a forked child: drop the parent's connection; the child connects on its own."""
        self.lock = threading.Lock()
        self.trace_lock = threading.Lock()
        # The mapping is shared with the parent: writing there would mix into its frames.
        self.close_ring()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.gen += 1
        self.sent = self.dropped = self.unreported = 0
        self.backlog = deque()
        self.flusher = None  # the parent's flusher thread does not exist here
        self.next_attempt_ns = 0
        if self.hello:
            self.hello = protocol.encode(protocol.Hello(pid=os.getpid(), run=self.run,
                                                        client=CLIENT_NAME,
                                                        dist=_hello_dist()))


# The process's one connection, shared by every span.
CONNECTION = Connection()
os.register_at_fork(after_in_child=CONNECTION.after_fork)
atexit.register(CONNECTION.flush_at_exit)


def refusal(sock: socket.socket) -> Optional[str]:
    """Why the service closed the connection, if it said so before (an Ack with request id
    0, sent when it refuses a connection)."""
    resets = 0
    try:
        while True:
            try:
                frame = sock.recv(protocol.MAX_FRAME, socket.MSG_DONTWAIT)
            except ConnectionResetError:
                # The reset is reported once, before the messages still queued.
                resets += 1
                if resets > 1:
                    return None
                continue
            if not frame:
                return None
            try:
                msg = protocol.decode(frame)
            except protocol.ProtocolError:
                continue
            if isinstance(msg, protocol.Ack) and msg.request_id == 0 and not msg.ok:
                return msg.reason
    except OSError:
        return None

