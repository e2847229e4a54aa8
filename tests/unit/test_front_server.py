"""The service's front socket is a SpanServer configured by service.front_server: pinned
peers, refusals that say why, a flood closed, no descriptors (real sockets, no root)."""

from __future__ import annotations

import logging
import os
import socket

from renacerd.client import protocol
from renacerd.client.protocol import Ack, Hello, ServiceStatus, StatusQuery, encode
from renacerd.serve import service as svcmod
from renacerd.serve.loglimit import LimitedLog
from renacerd.serve.span_server import bind_socket
from tests.conftest import wait_for


def _front(sock_dir: str, admit=lambda peer: None):
    seen = []

    def handle(peer, msg):
        seen.append((peer, msg))
        return ServiceStatus(1.0, [], os.getpid()) if isinstance(msg, StatusQuery) else None

    path = os.path.join(sock_dir, "front.sock")
    warnings = LimitedLog(logging.getLogger("renacerd.service"))
    server = svcmod.front_server(bind_socket(path), handle, admit, warnings)
    return server, path, seen, warnings


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(path)
    return s


def _closed(s: socket.socket) -> bool:
    try:
        while s.recv(protocol.MAX_FRAME):
            pass
        return True
    except ConnectionResetError:
        return True


def test_status_is_answered_to_a_pinned_peer(sock_dir):
    server, path, seen, _ = _front(sock_dir)
    with server:
        s = _connect(path)
        s.send(encode(Hello()))
        s.send(encode(StatusQuery()))
        reply = protocol.decode(s.recv(protocol.MAX_FRAME))
        assert isinstance(reply, ServiceStatus) and reply.pid == os.getpid()
        peer = seen[0][0]
        assert (peer.pid, peer.uid) == (os.getpid(), os.getuid())
        assert peer.pinned is not None and peer.pinned.pid == os.getpid()
        assert peer.pinned.start_time > 0
        s.close()
        assert wait_for(lambda: server.stats["open"] == 0)
        assert peer.pinned.pidfd is None  # released with the connection


def test_a_refusal_is_an_ack_with_request_id_0_then_the_close(sock_dir):
    server, path, seen, warnings = _front(sock_dir, admit=lambda peer: "limit: too many")
    with server:
        s = _connect(path)
        assert protocol.decode(s.recv(protocol.MAX_FRAME)) == Ack(0, False, "limit: too many")
        assert _closed(s)
        assert wait_for(lambda: server.stats["rejected"] == 1)
        s.close()
    assert seen == [] and warnings.counts == {"refused": 1}


def test_a_flood_is_closed_not_throttled(sock_dir):
    server, path, seen, warnings = _front(sock_dir)
    with server:
        s = _connect(path)
        s.send(encode(Hello()))
        n = int(svcmod.BURST) + 20  # the bucket holds BURST; RATE/s refill meanwhile is < 20
        for _ in range(n - 1):
            try:
                s.send(encode(Ack(1, True)))
            except (BrokenPipeError, ConnectionResetError):
                break
        assert _closed(s)
        assert wait_for(lambda: server.stats["open"] == 0)
        s.close()
    assert int(svcmod.BURST) <= len(seen) < n
    assert warnings.counts == {"client": 1}


def test_descriptors_are_a_protocol_error(sock_dir):
    server, path, seen, warnings = _front(sock_dir)
    with server:
        s = _connect(path)
        s.send(encode(Hello()))
        r, w = os.pipe()
        socket.send_fds(s, [encode(StatusQuery())], [r, w])
        os.close(r)
        os.close(w)
        assert _closed(s)
        assert wait_for(lambda: server.stats["descriptors_refused"] == 2)
        assert server.stats["protocol_errors"] == 1
        s.close()
    assert [type(m) for _, m in seen] == [Hello] and warnings.counts == {"client": 1}
