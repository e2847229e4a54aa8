"""The daemon's Unix SOCK_SEQPACKET server for experiment-span clients (one selector thread).

Each connection's peer pid/uid/gid comes from SO_PEERCRED, never from its messages. Frames
are size-checked and decoded by renacerd.client.protocol; a connection that breaks the protocol is
closed with a logged reason and nothing else is affected. A client may hand over a
shared-memory ring (renacerd.serve.span_ring) after its hello: its frames then come that way,
read every RING_POLL s, and the ring is read to its end when the connection closes. A
per-connection token bucket (RATE messages/s, BURST messages) throttles a flooding client by
not reading it: its socket or ring fills and its own client library drops and counts
messages, which it reports later.

The host service's front socket is one of these servers too, configured for it
(renacerd.serve.service): peers pinned at accept (renacerd.capture.peer.pin), an admission
rule with a reply that says why, a flooding connection closed rather than throttled, idle
connections closed, and no descriptors taken.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from renacerd.capture.peer import Peer, peer_cred, pin
from renacerd.client import protocol
from renacerd.client.protocol import MAX_FRAME, Dropped, Hello, Message, ProtocolError, Ring
from renacerd.serve.loglimit import LimitedLog
from renacerd.serve.span_ring import REAPER, RingReader, close_untrusted

log = logging.getLogger("renacerd.span_server")

RATE = 50_000.0
BURST = 50_000.0
# Messages read from one connection per wake-up, so one busy client cannot starve the rest.
PER_WAKE = 1024
MAX_CONNECTIONS = 1024
# Pause after a busy round (s); timestamps come from the clients, so the delay costs nothing.
BATCH_DELAY = 0.002
BACKLOG = 256
# How often rings are read (s): timestamps come from the clients, so a later read changes
# nothing but memory; a 2 MiB ring holds ~60 ms of a client flooding at full speed.
RING_POLL = 0.01
# Room for every descriptor one message can carry (the kernel's SCM_MAX_FD): descriptors
# that find no room are closed by the kernel in the receiving thread, and the close of a
# TCP socket with SO_LINGER (or a FUSE file) can block it. So every one is received, and
# closed by the reaper's fixed pool of threads (span_ring.FdReaper).
SCM_MAX_FD = 253
ANCILLARY = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
# Out of descriptors (or kernel memory) at accept: stop accepting this long, doubling up to
# ACCEPT_BACKOFF_MAX, or until a connection closes and frees one.
ACCEPT_BACKOFF = 0.05
ACCEPT_BACKOFF_MAX = 1.0
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class SocketInUseError(OSError):
    """The socket path is held by a live server (or by something that is not a socket)."""


@dataclass(frozen=True, slots=True)
class PeerCred:
    """The peer of a connection, from SO_PEERCRED; conn_id tells connections apart;
    `pinned`: the process itself, pinned at accept (a server made with pin_peers=True)."""

    pid: int
    uid: int
    gid: int
    conn_id: int
    pinned: Optional[Peer] = field(default=None, compare=False, repr=False)


OnMessage = Callable[[PeerCred, Message], Optional[Message]]
# Why a new connection is refused (None: it is not); called on the server thread.
Admit = Callable[[PeerCred], Optional[str]]


@dataclass(slots=True)
class TokenBucket:
    """A connection's message allowance: `rate` tokens a second, at most `burst` held."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    refilled: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.burst  # a new connection starts with a full bucket

    def refill(self, now: float) -> None:
        """Add what accrued since the last refill, up to the burst."""
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now


@dataclass(slots=True)
class AcceptBackoff:
    """What a failed accept does: count it, say so (rate-limited) and, when descriptors or
    kernel memory ran out, how long to stop accepting (doubling up to ACCEPT_BACKOFF_MAX)."""

    warnings: LimitedLog
    delay: float = ACCEPT_BACKOFF

    def failed(self, exc: OSError, stats: dict[str, int]) -> Optional[float]:
        """Count and log `exc`; the pause before the next accept, None to go on at once."""
        stats["accept_errors"] += 1
        self.warnings.warning("accept", "accept failed: %s; %d times so far", exc,
                              stats["accept_errors"])
        if exc.errno not in _OUT_OF_FDS:
            return None
        delay = self.delay
        self.delay = min(2 * delay, ACCEPT_BACKOFF_MAX)
        return delay

    def accepted(self) -> None:
        """An accept worked: the next failure pauses for the shortest time again."""
        self.delay = ACCEPT_BACKOFF


def require_hello(greeted: bool, msg: Message) -> None:
    """The hello rule: a connection's first message must be Hello (ProtocolError if not)."""
    if not greeted and not isinstance(msg, Hello):
        raise ProtocolError("schema", "first message must be hello")


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    peer: PeerCred
    bucket: TokenBucket
    greeted: bool = False
    throttled_until: float = 0.0
    ring: Optional[RingReader] = None
    heard: float = field(default_factory=time.monotonic)  # last message, for idle_timeout


def sockets_from_systemd(unset_environment: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS, fds from 3)."""
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid.isdigit() or not count.isdigit() or int(pid) != os.getpid():
        return []
    socks = []
    for fd in range(3, 3 + int(count)):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def _probe(path: str) -> None:
    """Raise SocketInUseError if something live answers on `path`; unlink a stale socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUseError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    except OSError as exc:
        if exc.errno != errno.EPROTOTYPE:
            raise
        raise SocketInUseError(
            errno.EADDRINUSE, f"{path} is in use by a live server of another socket type"
        ) from None
    finally:
        probe.close()
    raise SocketInUseError(errno.EADDRINUSE, f"a live renacerd already listens on {path}")


def bind_socket(path: str, mode: int = 0o660, group: Union[int, str, None] = None) -> socket.socket:
    """Bind and listen on `path`, refusing a live owner and replacing a stale socket file."""
    _probe(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SocketInUseError(errno.EADDRINUSE,
                                       f"{path} was bound by another server meanwhile") from None
            raise
        os.chmod(path, mode)
        if group is not None:
            if isinstance(group, str):
                import grp

                group = grp.getgrnam(group).gr_gid
            os.chown(path, -1, group)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class SpanServer:
    """Accepts span clients, decodes their frames and hands messages to `on_message`.

    For the front socket: `pin_peers` pins each peer's process at accept (PeerCred.pinned);
    `admit` may refuse a connection with a reason, which `refusal` turns into the message
    sent before the close; `close_over_rate` closes a connection that outruns its bucket
    instead of pausing it; `idle_timeout` closes one silent that long; `rings=False` takes
    no ring and no descriptor (a message carrying one is a protocol error); `name` and
    `warnings` say whose lines these are ("front client pid P ...")."""

    def __init__(
        self,
        path: Optional[str] = None,
        *,
        sock: Optional[socket.socket] = None,
        on_message: OnMessage,
        authorize: Optional[Callable[[PeerCred], bool]] = None,
        on_disconnect: Optional[Callable[[PeerCred], None]] = None,
        mode: int = 0o660,
        group: Union[int, str, None] = None,
        rate: float = RATE,
        burst: float = BURST,
        max_connections: Optional[int] = MAX_CONNECTIONS,
        batch_delay: float = BATCH_DELAY,
        pin_peers: bool = False,
        admit: Optional[Admit] = None,
        refusal: Optional[Callable[[str], Message]] = None,
        close_over_rate: bool = False,
        idle_timeout: Optional[float] = None,
        rings: bool = True,
        name: str = "span",
        warnings: Optional[LimitedLog] = None,
    ) -> None:
        if (path is None) == (sock is None):
            raise ValueError("give exactly one of path= or sock=")
        if sock is not None and sock.type != socket.SOCK_SEQPACKET:
            raise ValueError("the span socket must be SOCK_SEQPACKET "
                             "(systemd: ListenSequentialPacket=, not ListenStream=)")
        self._path = path
        self._sock = sock
        self._owns_path = False
        self._inode = 0
        self._mode = mode
        self._group = group
        self._on_message = on_message
        self._authorize = authorize
        self._on_disconnect = on_disconnect
        self._rate = rate
        self._burst = burst
        self._max_connections = max_connections
        self._batch_delay = batch_delay
        self._pin_peers = pin_peers
        self._admit = admit
        self._refusal = refusal
        self._close_over_rate = close_over_rate
        self._idle_timeout = idle_timeout
        self._take_rings = rings
        self.name = name
        self._init_state(path, warnings)

    def _init_state(self, path: Optional[str], warnings: Optional[LimitedLog]) -> None:
        """The connections, selector, buffers and counters of a server not started yet."""
        self._conns: dict[int, _Conn] = {}
        self._rings: dict[int, _Conn] = {}
        self._next_ring_poll = 0.0
        self._next_conn_id = 0
        self._selector: Optional[selectors.BaseSelector] = None
        self._wake_r = self._wake_w = -1
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._buf = bytearray(MAX_FRAME + 1)
        self._view = memoryview(self._buf)
        self._address = path or ""
        self._accept_paused_until = 0.0
        self.warnings = warnings if warnings is not None else LimitedLog(log)
        self._accept_backoff = AcceptBackoff(self.warnings)
        self.stats = {
            "connections": 0, "open": 0, "rejected": 0, "protocol_errors": 0,
            "messages": 0, "replies": 0, "throttled": 0, "callback_errors": 0, "rings": 0,
            "accept_errors": 0, "descriptors_refused": 0,
        }

    @property
    def address(self) -> str:
        """The socket path this server listens on."""
        if not self._address and self._sock is not None:
            name = self._sock.getsockname()
            self._address = name.decode() if isinstance(name, bytes) else name
        return self._address

    def start(self) -> None:
        """Bind (or take the given socket) and start the server thread."""
        if self._thread is not None:
            raise RuntimeError("span server already started")
        if self._sock is None:
            assert self._path is not None
            self._sock = bind_socket(self._path, self._mode, self._group)
            self._owns_path = True
            self._inode = os.stat(self._path).st_ino
        self._sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"renacerd-server-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, disconnect every client (on_disconnect each) and close all fds."""
        if self._thread is None:
            return
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass
        self._thread.join(timeout)
        self._thread = None
        for conn in list(self._conns.values()):
            self._close(conn, "daemon stopping", level=logging.DEBUG)
        assert self._selector is not None
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._sock is not None:
            self.address  # noqa: B018 - remember the name before the socket goes
            self._sock.close()
            self._sock = None
        if self._owns_path and self._path is not None:
            try:
                if os.stat(self._path).st_ino == self._inode:
                    os.unlink(self._path)
            except FileNotFoundError:
                pass

    def peers(self) -> list[PeerCred]:
        """The peers of the open connections (for `admit`, which runs on the server thread)."""
        return [c.peer for c in self._conns.values()]

    def __enter__(self) -> SpanServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        assert self._selector is not None
        select = self._selector.select
        while not self._stopping:
            busy = False
            for key, _ in select(self._wake_delay()):
                conn = key.data
                if conn is None:
                    self._accept()
                elif isinstance(conn, _Conn):
                    try:
                        self._read(conn)
                    except Exception as exc:  # one client's fault must not end this thread
                        self._fault(conn, exc)
                    busy = True
                else:
                    try:
                        os.read(self._wake_r, 512)
                    except BlockingIOError:
                        pass
            self._wake_throttled()
            if self._idle_timeout is not None:
                self._close_idle()
            if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
                self._resume_accept()
            if self._rings and time.monotonic() >= self._next_ring_poll:
                self._next_ring_poll = time.monotonic() + RING_POLL
                for conn in list(self._rings.values()):
                    try:
                        self._read_ring(conn)
                    except Exception as exc:
                        self._fault(conn, exc)
            if busy and self._batch_delay:
                # Let messages pile up: a client whose server is not parked in epoll_wait
                # pays no wake-up per send, and the next round reads many at once.
                time.sleep(self._batch_delay)

    def _wake_delay(self) -> Optional[float]:
        waits = [c.throttled_until for c in self._conns.values() if c.throttled_until]
        if self._rings:
            waits.append(self._next_ring_poll)
        if self._accept_paused_until:
            waits.append(self._accept_paused_until)
        if self._idle_timeout is not None and self._conns:
            waits.append(min(c.heard for c in self._conns.values()) + self._idle_timeout)
        if not waits:
            return None
        return max(min(waits) - time.monotonic(), 0.0)

    def _wake_throttled(self) -> None:
        now = time.monotonic()
        assert self._selector is not None
        for conn in self._conns.values():
            if conn.throttled_until and conn.throttled_until <= now:
                conn.throttled_until = 0.0
                self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _accept(self) -> None:
        assert self._sock is not None and self._selector is not None
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: keep serving the connections we have, and stop
                # accepting for a while (the pending connection would wake us at once).
                delay = self._accept_backoff.failed(exc, self.stats)
                if delay is not None:
                    self._pause_accept(delay)
                return
            self._accept_backoff.accepted()
            sock.setblocking(False)
            try:
                pinned = pin(sock) if self._pin_peers else None
                pid, uid, gid = (pinned.pid, pinned.uid, pinned.gid) if pinned else peer_cred(sock)
            except OSError as exc:
                self.warnings.warning("accept", "accepted connection unusable: %s", exc)
                _close_unread(sock)
                continue
            self._next_conn_id += 1
            peer = PeerCred(pid, uid, gid, self._next_conn_id, pinned)
            refusal = self._refuse(peer)
            if refusal is not None:
                self.warnings.warning("refused", "refusing pid %d uid %d: %s", pid, uid,
                                      refusal)
                self.stats["rejected"] += 1
                if self._refusal is not None:
                    try:
                        sock.send(protocol.encode(self._refusal(refusal)),
                                  socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                    except OSError:
                        pass
                if pinned is not None:
                    pinned.close()
                _close_unread(sock)
                continue
            conn = _Conn(sock, peer, TokenBucket(self._rate, self._burst))
            self._conns[peer.conn_id] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self.stats["connections"] += 1
            self.stats["open"] = len(self._conns)

    def _refuse(self, peer: PeerCred) -> Optional[str]:
        """Why a new connection may not stay open, None if it may."""
        if self._max_connections is not None and len(self._conns) >= self._max_connections:
            return f"{len(self._conns)} connections open"
        if self._admit is not None:
            reason = self._admit(peer)
            if reason is not None:
                return reason
        if self._authorize is not None and not self._authorize(peer):
            return "not authorized"
        return None

    def _close_idle(self) -> None:
        assert self._idle_timeout is not None
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if now - c.heard >= self._idle_timeout]:
            self._close(conn, f"idle for {self._idle_timeout:.0f} s", level=logging.DEBUG)

    def _pause_accept(self, delay: float) -> None:
        assert self._selector is not None and self._sock is not None
        if not self._accept_paused_until:
            self._selector.unregister(self._sock)
        self._accept_paused_until = time.monotonic() + delay

    def _resume_accept(self) -> None:
        assert self._selector is not None and self._sock is not None
        if self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self._sock, selectors.EVENT_READ, None)

    def _refill(self, conn: _Conn) -> float:
        now = time.monotonic()
        conn.bucket.refill(now)
        return now

    def _read(self, conn: _Conn) -> None:
        now = conn.heard = self._refill(conn)
        bucket = conn.bucket
        # Closing over the rate: read what is there and count each message against it.
        budget = PER_WAKE if self._close_over_rate else min(int(bucket.tokens), PER_WAKE)
        buf = [self._buf]
        view = self._view
        recvmsg_into = conn.sock.recvmsg_into
        done = 0
        try:
            while done < budget:
                try:
                    # Every message with room for all it may carry: see ANCILLARY.
                    size, ancillary, flags, _ = recvmsg_into(buf, ANCILLARY,
                                                             socket.MSG_CMSG_CLOEXEC)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._close(conn, f"receive failed: {exc}", level=logging.DEBUG)
                    return
                fds = _descriptors(ancillary) if ancillary else []
                if size == 0 and not fds:
                    self._close(conn, "closed by peer", level=logging.DEBUG)
                    return
                done += 1
                try:
                    if flags & socket.MSG_CTRUNC:
                        raise ProtocolError("schema", "ancillary data truncated")
                    if fds and not self._take_rings:
                        raise ProtocolError("schema", f"descriptors on the {self.name} socket")
                    if self._close_over_rate:
                        bucket.tokens -= 1
                        if bucket.tokens < 0:
                            self.stats["messages"] += done - 1
                            self._drop(conn, f"rate limit ({self._rate:.0f} messages/s)")
                            return
                    msg = protocol.decode(view[:size])
                    if isinstance(msg, Ring) and self._take_rings:
                        self._take_ring(conn, msg, fds)
                        fds = []
                        continue
                    if fds:
                        raise ProtocolError("schema", "descriptors come only with a ring message")
                finally:
                    if fds:
                        self.stats["descriptors_refused"] += len(fds)
                        for fd in fds:
                            close_untrusted(fd)
                self._deliver(conn, msg)
        except ProtocolError as exc:
            self.stats["protocol_errors"] += 1
            self.stats["messages"] += done
            self._drop(conn, f"protocol error ({exc})")
            return
        self.stats["messages"] += done
        if not self._close_over_rate:
            self._spend(conn, done, now)

    def _drop(self, conn: _Conn, reason: str) -> None:
        """Close a connection for its client's fault, with a (rate-limited) line saying why."""
        self.warnings.warning("client", "%s client pid %d uid %d disconnected: %s", self.name,
                              conn.peer.pid, conn.peer.uid, reason)
        self._close(conn, reason, level=logging.DEBUG)

    def _fault(self, conn: _Conn, exc: Exception) -> None:
        """An unexpected error serving one connection: log it, close that connection only."""
        self.stats["callback_errors"] += 1
        log.error("span client pid %d: %s: %s; connection closed", conn.peer.pid,
                  type(exc).__name__, exc)
        if self._conns.get(conn.peer.conn_id) is conn:
            try:
                self._close(conn, f"{type(exc).__name__}: {exc}", level=logging.DEBUG,
                            drain=False)
            except Exception:
                log.exception("closing span client pid %d failed", conn.peer.pid)

    def _deliver(self, conn: _Conn, msg: Message) -> None:
        """Check the hello rule, hand `msg` to on_message and send its reply, if any."""
        require_hello(conn.greeted, msg)
        conn.greeted = True
        try:
            reply = self._on_message(conn.peer, msg)
        except Exception:
            self.stats["callback_errors"] += 1
            log.exception("span message handler failed for pid %d", conn.peer.pid)
            return
        if reply is not None:
            self._reply(conn, reply)

    def _take_ring(self, conn: _Conn, msg: Ring, fds: list[int]) -> None:
        """Map the ring a client hands over with its Ring message."""
        require_hello(conn.greeted, msg)
        if conn.ring is not None:
            raise ProtocolError("schema", "a connection sets up one ring")
        if len(fds) != 1:
            raise ProtocolError("schema", f"a ring message carries one descriptor, not {len(fds)}")
        fd = fds.pop()
        try:
            conn.ring = RingReader(fd, msg.size, msg.checked)  # closes fd if it refuses it
        except ProtocolError:
            self.stats["descriptors_refused"] += 1
            raise
        self._rings[conn.peer.conn_id] = conn
        self.stats["rings"] += 1

    def _read_ring(self, conn: _Conn, drain: bool = False) -> bool:
        """Decode and deliver what the client wrote in its ring; False if that closed it."""
        ring = conn.ring
        assert ring is not None
        now = self._refill(conn)
        until = None
        if drain:
            # Up to the head published now: a client that goes on writing after its close
            # cannot keep this thread here.
            budget = ring.size // 16
            until = ring.head
        elif conn.throttled_until:
            return True
        else:
            budget = min(int(conn.bucket.tokens), PER_WAKE)
        done = 0
        try:
            while budget > done:
                frames = ring.read(budget - done, until)
                if not frames:
                    break
                for frame in frames:
                    done += 1
                    self._deliver(conn, protocol.decode(frame))
            dropped = ring.dropped()
            if dropped:
                self._deliver(conn, Dropped(dropped))
        except ProtocolError as exc:
            self.stats["protocol_errors"] += 1
            self.stats["messages"] += done
            if not drain:
                self._close(conn, f"protocol error ({exc})", level=logging.WARNING, drain=False)
            else:
                log.warning("span client pid %d uid %d: protocol error (%s)", conn.peer.pid,
                            conn.peer.uid, exc)
            return False
        self.stats["messages"] += done
        if not drain:
            self._spend(conn, done, now)
        return True

    def _spend(self, conn: _Conn, done: int, now: float) -> None:
        """Take `done` tokens; an empty bucket stops reading the client for a while."""
        bucket = conn.bucket
        bucket.tokens -= done
        if bucket.tokens < 1.0:
            # Stop reading this client until its bucket holds a token again.
            conn.throttled_until = now + (1.0 - bucket.tokens) / self._rate
            self.stats["throttled"] += 1
            assert self._selector is not None
            self._selector.unregister(conn.sock)

    def _close(self, conn: _Conn, reason: str, level: int, drain: bool = True) -> None:
        peer = conn.peer
        ring = conn.ring
        if ring is not None:
            # What the client wrote before it went is still there: read it all first.
            if drain:
                self._read_ring(conn, drain=True)
            ring.close()
            conn.ring = None
            del self._rings[peer.conn_id]
        log.log(level, "%s client pid %d uid %d disconnected: %s", self.name, peer.pid, peer.uid,
                reason)
        assert self._selector is not None
        if not conn.throttled_until:
            self._selector.unregister(conn.sock)
        if reason == "closed by peer":
            conn.sock.close()  # read to its end: nothing queued on it
        else:
            _close_unread(conn.sock)
        del self._conns[peer.conn_id]
        if peer.pinned is not None:
            peer.pinned.close()
        self.stats["open"] = len(self._conns)
        # A descriptor is free again: try the pending connections now.
        self._resume_accept()
        if self._on_disconnect is not None:
            try:
                self._on_disconnect(peer)
            except Exception:
                self.stats["callback_errors"] += 1
                log.exception("span disconnect handler failed for pid %d", peer.pid)

    def _reply(self, conn: _Conn, reply: Message) -> None:
        try:
            conn.sock.send(protocol.encode(reply), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            self.stats["replies"] += 1
        except OSError as exc:
            log.debug("reply to pid %d lost: %s", conn.peer.pid, exc)


def _close_unread(sock: socket.socket) -> None:
    """Close a connection that may still hold unread messages: descriptors queued on them
    are released by this close, so it happens on the reaper's threads."""
    REAPER.defer(sock.detach())


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The file descriptors passed in a message's ancillary data (SCM_RIGHTS)."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return fds.tolist()
