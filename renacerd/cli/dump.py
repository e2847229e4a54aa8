"""`renacer dump RUN`: keep a flight-recorder run's current window of full events whole."""

from __future__ import annotations

import os
import sys

from renacerd.cli.common import Parser, fail
from renacerd.cli.status import Refused, ask
from renacerd.client import protocol

PROG = "renacer dump"
TIMEOUT = 10.0


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
        ack = ask(path, protocol.Dump(1, a.run), PROG,
                  lambda m: isinstance(m, protocol.Ack) and m.request_id == 1, TIMEOUT)
    except Refused as e:
        return fail(PROG, f"the service on {path} refused: {e}")
    except (OSError, protocol.ProtocolError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        return fail(PROG, f"no renacerd service answers on {path}: {reason}")
    if not ack.ok:
        return fail(PROG, ack.reason)
    sys.stdout.write(ack.reason + "\n")
    return 0
