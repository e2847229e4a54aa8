"""`renacerd -- CMD` through the running service: no compile, the command is a run of it.

Used when the service's front socket exists, `--no-service` is not given and no option
only the standalone daemon has is (standalone_reason); a service that refuses is said in
one line, and the standalone daemon traces the command instead.

The forked child asks the service itself (a process is put in a run only by itself or by
root): it connects to the front socket, sends `trace_me` marked `exec` and waits for the
ack; then it execs the command, whose records start at that execve. The service owns the
run from there; this process waits for the command and passes its exit status on.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys

from renacerd.capture.command import (
    CallerSignals,
    CommandError,
    default_run_name,
    resolve_command,
)
from renacerd.client import protocol
from renacerd.client.protocol import NOT_SERVING
from renacerd.escaping import escape

ACK_TIMEOUT = 10.0  # the client library's default wait for the service

# Options the service cannot honour for one run: with any of them, the standalone daemon.
_STANDALONE_ONLY = (
    ("db", "--db (the service writes its own store)"),
    ("sink", "--sink (the service has its own sinks)"),
    ("otlp_endpoint", "--otlp-endpoint (the service has its own sinks)"),
    ("no_follow", "--no-follow"),
    ("duration", "--duration"),
    ("owner_uid", "--owner-uid"),
    ("socket", "--socket"),
    ("cuda", "--cuda"),
    ("retention_size", "--retention-size (the service applies its own)"),
    ("retention_time", "--retention-time (the service applies its own)"),
    ("keep_steps", "--keep-steps (the service applies its own)"),
)


def standalone_reason(args) -> str | None:
    """Why this invocation cannot go through the service (None: it can)."""
    if args.pid:
        return "--pid (the service traces only a process that asks it)"
    for attr, why in _STANDALONE_ONLY:
        if getattr(args, attr, None):
            return why
    if args.ring_mb != 32 or args.detail_ring_mb != 8:
        return "ring sizes (the service's rings are shared)"
    return None


def _child(path: str, run: str, exe: str, cmd: list[str], env: dict[str, str],
           caller: CallerSignals, report: int, go: int, err: int) -> None:
    """In the forked child: ask, report the ack (a JSON line), wait for go, exec."""
    code = 0
    try:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(ACK_TIMEOUT)
            s.connect(path)
            s.send(protocol.encode(protocol.Hello(pid=os.getpid(), run=run)))
            s.send(protocol.encode(protocol.TraceMe(1, run, from_exec=True)))
            ack = protocol.decode(s.recv(protocol.MAX_FRAME))
            if not isinstance(ack, protocol.Ack):
                raise protocol.ProtocolError("schema", "no ack from the service")
            # a standalone daemon's span socket at that path answers, but is no service
            reply = {"ok": ack.ok, "reason": ack.reason, "socket": ack.socket,
                     "service": ack.reason != NOT_SERVING}
        except (OSError, protocol.ProtocolError) as e:
            reply = {"ok": False, "reason": str(e), "socket": None, "service": False}
        os.write(report, (json.dumps(reply) + "\n").encode())
        if os.read(go, 1) != b"x":
            os._exit(127)
        s.close()
        if reply["socket"]:
            env["RENACER_SOCKET"] = reply["socket"]  # the command's spans go to its run
        caller.restore()
        os.execve(exe, cmd, env)
    except OSError as e:
        code = e.errno or errno.EIO
    except BaseException:
        code = errno.EIO
    try:
        os.write(err, str(code).encode())
    finally:
        os._exit(127)


def run_through_service(args, cmd: list[str], caller: CallerSignals) -> int | None:
    """Trace `cmd` as a run of the service on args.service_socket; the command's exit
    status, or None when the standalone daemon must do it (the reason said in one line)."""
    path = args.service_socket
    if args.no_service or not os.path.exists(path):
        return None
    say = (lambda m: None) if args.quiet else (
        lambda m: sys.stderr.write(f"renacerd: {m}\n"))
    if standalone_reason(args) is not None:
        return None  # options only the standalone daemon has: it is what was asked for
    try:
        exe = resolve_command(cmd[0], os.environ)
    except CommandError:
        return None  # the standalone path says it, with its exit status
    run = args.run or default_run_name(cmd)
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for fd in (report_r, go_w, err_r):
            os.close(fd)
        _child(path, run, exe, cmd, dict(os.environ), caller, report_w, go_r, err_w)
    for fd in (report_w, go_r, err_w):
        os.close(fd)
    with os.fdopen(report_r) as f:
        line = f.readline()
    reply = json.loads(line) if line else {"ok": False, "reason": "no answer", "service": False}
    if not reply["ok"]:
        os.close(go_w)  # the child exits without exec
        os.close(err_r)
        os.waitpid(pid, 0)
        if reply["service"]:
            say(f"standalone: the service on {escape(path)} did not trace it: "
                f"{escape(reply['reason'])}")
        return None
    say(f"traced by the service on {escape(path)} as run {escape(run)}")
    # The terminal's signals reach the command itself; this process only waits for it.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.write(go_w, b"x")
        os.close(go_w)
        failed = os.read(err_r, 32)
        os.close(err_r)
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, old)
    if failed:
        sys.stderr.write(f"renacerd: error: cannot execute '{escape(cmd[0])}': "
                         f"{os.strerror(int(failed))}\n")
        return 2
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code
    say(f"run {escape(run)}: command exit status {code}; see `renacer show {escape(run)}`")
    return code
