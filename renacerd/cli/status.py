"""`renacer status`: what the service traces now (runs, pids, events/s, lost, uptime)."""

from __future__ import annotations

import os
import socket
import sys
from typing import Callable

import orjson

from renacerd.cli.common import Parser, fail
from renacerd.client import protocol

PROG = "renacer status"
TIMEOUT = 3.0


class Refused(Exception):
    """The service refused the connection (a per-user limit); the message says why."""


def ask(path: str, request: protocol.Message, client: str,
        answers: Callable[[protocol.Message], bool],
        timeout: float = TIMEOUT) -> protocol.Message:
    """Send hello and `request` to the service on `path`; the first message `answers`
    accepts. OSError or ProtocolError when it cannot answer, Refused when it will not."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.send(protocol.encode(protocol.Hello(pid=os.getpid(), client=client)))
            s.send(protocol.encode(request))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at accept: the reason waits to be read
        while True:
            frame = s.recv(protocol.MAX_FRAME)
            if not frame:
                raise ConnectionResetError("the service closed the connection")
            msg = protocol.decode(frame)
            if isinstance(msg, protocol.Ack) and msg.request_id == 0 and not msg.ok:
                raise Refused(msg.reason)
            if answers(msg):
                return msg


def query(path: str, timeout: float = TIMEOUT) -> protocol.ServiceStatus:
    """Ask the service on `path` what it traces (see ask)."""
    return ask(path, protocol.StatusQuery(), PROG,
               lambda m: isinstance(m, protocol.ServiceStatus), timeout)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def main(argv: list[str]) -> int:
    """Entry point."""
    p = Parser(prog=PROG, description="Runs the renacerd service is tracing now "
               "(an unprivileged user sees only their own).")
    p.add_argument("--socket", metavar="PATH",
                   help=f"service socket (env RENACER_SOCKET, default {protocol.DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    path = a.socket or os.environ.get("RENACER_SOCKET") or protocol.DEFAULT_SOCKET
    try:
        st = query(path)
    except Refused as e:
        return fail(PROG, f"the service on {path} refused: {e}")
    except (OSError, protocol.ProtocolError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        return fail(PROG, f"no renacerd service answers on {path}: {reason}")
    if a.json:
        sys.stdout.buffer.write(orjson.dumps(st.to_wire(), option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    w = sys.stdout.write
    n = len(st.runs)
    w(f"renacerd pid {st.pid}, up {_duration(st.uptime_s)}, tracing {n} "
      f"run{'s' if n != 1 else ''}\n")
    if not n:
        return 0
    w(f"{'RUN':<32} {'PID':>8} {'UID':>6} {'EVENTS':>10} {'EVENTS/S':>9} {'LOST':>6} "
      f"{'UPTIME':>9}\n")
    for r in st.runs:
        flag = "!" if r.get("lost") else " "
        state = "" if r.get("ready", True) else "  (attaching)"
        w(f"{str(r.get('run'))[:32]:<32} {r.get('pid', 0):>8} {r.get('uid', 0):>6} "
          f"{r.get('events', 0):>10} {r.get('events_per_s', 0):>9.0f} {r.get('lost', 0):>5}"
          f"{flag} {_duration(r.get('uptime', 0)):>9}{state}\n")
    return 0
