"""`renacer dump RUN`: keep a flight-recorder run's current window of full events whole."""

from __future__ import annotations

import os
import socket
import sys

from renacerd.cli.common import Parser, fail
from renacerd.client import protocol

PROG = "renacer dump"
TIMEOUT = 10.0


def ask(path: str, run: str, timeout: float = TIMEOUT) -> protocol.Ack:
    """Send Dump(run) to the service on `path`; its Ack (OSError or ProtocolError when no
    service answers)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.send(protocol.encode(protocol.Hello(pid=os.getpid(), client=PROG)))
            s.send(protocol.encode(protocol.Dump(1, run)))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at accept: the reason waits to be read
        while True:
            frame = s.recv(protocol.MAX_FRAME)
            if not frame:
                raise ConnectionResetError("the service closed the connection")
            msg = protocol.decode(frame)
            if isinstance(msg, protocol.Ack) and msg.request_id in (0, 1):
                return msg


def main(argv: list[str]) -> int:
    """Entry point."""
    p = Parser(prog=PROG, description="Keep the current flight-recorder window of a live "
               "run of the renacerd service whole (and everything after it); its owner or "
               "root only.")
    p.add_argument("run", help="run name")
    p.add_argument("--socket", metavar="PATH",
                   help=f"service socket (env RENACER_SOCKET, default {protocol.DEFAULT_SOCKET})")
    a = p.parse_args(argv)
    path = a.socket or os.environ.get("RENACER_SOCKET") or protocol.DEFAULT_SOCKET
    try:
        protocol.decode(protocol.encode(protocol.Dump(1, a.run)))
    except protocol.ProtocolError as e:
        return fail(PROG, f"bad run name {a.run!r}: {e}")
    try:
        ack = ask(path, a.run)
    except (OSError, protocol.ProtocolError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        return fail(PROG, f"no renacerd service answers on {path}: {reason}")
    if not ack.ok:
        return fail(PROG, ack.reason)
    sys.stdout.write(ack.reason + "\n")
    return 0
