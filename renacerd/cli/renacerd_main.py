"""`renacerd`: trace a process tree (--pid / -- CMD), `serve`, or `doctor`."""

from __future__ import annotations

import argparse
import math
import os
import sys

from renacerd.capture.command import CallerSignals
from renacerd.cli.common import Parser, fail

# Before any handler is installed: the launched command gets what renacerd's caller gave it.
CALLER = CallerSignals.capture()

PROG = "renacerd"


def build_parser() -> argparse.ArgumentParser:
    """Options of the tracing mode."""
    p = Parser(
        prog=PROG,
        usage="renacerd [options] (--pid PID ... | -- CMD [ARGS...])\n"
        "       renacerd doctor",
        description="Trace every syscall of a process tree with eBPF into the renacer store.",
    )
    p.add_argument("--pid", type=int, action="append", default=[], metavar="PID",
                   help="attach to a running process (all threads); repeatable")
    p.add_argument("--run", metavar="NAME", help="run name (default: generated, printed)")
    p.add_argument("--db", metavar="PATH", help="store file (env RENACER_DB)")
    p.add_argument("--no-follow", action="store_true", help="do not follow forked children")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary")
    p.add_argument("--socket", metavar="PATH",
                   help="client socket for experiment spans (launch mode: a private one; "
                   "--pid: /run/renacer/renacerd.sock)")
    p.add_argument("--ring-mb", type=float, default=32, metavar="MB",
                   help="event ring buffer size (power of two pages)")
    p.add_argument("--detail-ring-mb", type=float, default=8, metavar="MB",
                   help=argparse.SUPPRESS)
    p.add_argument("--cuda", nargs="+", metavar="auto|off|PATH", default=None,
                   help="CUDA uprobes: auto (default), off, or only these library files")
    p.add_argument("--cuda-force", action="store_true",
                   help="CUDA uprobes on arm64 too (off there by default)")
    p.add_argument("--sink", metavar="URL", action="append", default=[],
                   help="stream the run to clickhouse://HOST:8123/DATABASE (repeatable)")
    p.add_argument("--otlp-endpoint", metavar="URL",
                   help="export spans over OTLP/HTTP (env OTEL_EXPORTER_OTLP_ENDPOINT)")
    p.add_argument("--priority", choices=("idle", "normal"), default="idle",
                   help="the daemon's CPU priority: idle (default) takes only CPU time the "
                   "job leaves idle, lifted to normal while a ring buffer fills or a commit "
                   "is late; normal competes with the job for CPU")
    p.add_argument("--print-bpf", action="store_true", help=argparse.SUPPRESS)
    # `renacerd serve` learns on this inherited pipe that the probes are attached.
    p.add_argument("--ready-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    p.add_argument("--no-service", action="store_true",
                   help="never hand the command to a running `renacerd serve`: trace it here")
    p.add_argument("--service-socket", metavar="PATH", default="/run/renacer/renacerd.sock",
                   help="the service's front socket, used for `-- CMD` when it exists "
                        "(default /run/renacer/renacerd.sock)")
    p.add_argument("--owner-uid", type=int, metavar="UID",
                   help="the user the run belongs to (default: the caller, root); for any "
                        "other, a process whose exec gains privilege stops being followed")
    from renacerd.cli.gc import add_retention

    add_retention(p, defaults=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `renacerd`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from renacerd.cli.serve import main as serve

        return serve(argv[1:])
    if argv and argv[0] == "doctor":
        from renacerd.cli.doctor import main as doctor

        return doctor(argv[1:])
    cmd: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    if args.print_bpf:
        from renacerd.capture.probes.syscalls import SyscallProbes

        sys.stdout.write(SyscallProbes(follow=not args.no_follow).source())
        return 0
    if cmd and not args.pid:
        from renacerd.serve.launch import run_through_service

        # A running service traces the command with no compile (and for a member of the
        # renacer group too); otherwise, or when it declines, the standalone daemon. Before
        # the standalone options are checked: the service path takes none of them (so it
        # does not import what checks them: a short job's start is mostly imports).
        code = run_through_service(args, cmd, CALLER)
        if code is not None:
            return code
    checked = _checked(args, cmd)
    if isinstance(checked, str):
        return fail(PROG, checked)
    config, otlp = checked
    if os.geteuid() != 0:
        return fail(PROG, "must run as root (BPF needs CAP_BPF and CAP_PERFMON); try sudo")
    from renacerd.serve.session import Session, SessionError

    try:
        session = Session(config, CALLER, start_sinks=_sinks_of(args.sink, otlp))
    except SessionError as e:
        return fail(PROG, str(e))
    return session.run()


def _checked(args: argparse.Namespace, cmd: list[str]):
    """(SessionConfig, OTLP endpoint) from valid options, or the one-line error."""
    if bool(cmd) == bool(args.pid):
        return "give either --pid PID or -- CMD (exactly one of them)"
    if args.owner_uid is not None and not 0 <= args.owner_uid < 2**32 - 1:
        return f"--owner-uid must be a uid, not {args.owner_uid}"
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        return f"--duration must be a positive number of seconds, not {args.duration}"
    for name, mb in (("--ring-mb", args.ring_mb), ("--detail-ring-mb", args.detail_ring_mb)):
        if not (math.isfinite(mb) and 0 < mb <= 4096):
            return f"{name} must be between 0 and 4096 MB, not {mb}"
    from renacerd.capture.cuda_source import CudaOptionError, CudaOptions
    from renacerd.serve.session import SessionConfig
    from renacerd.sinks import SinkError
    from renacerd.sinks.clickhouse import parse_url
    from renacerd.sinks.otlp import resolve_endpoint
    from renacerd.store.retention import RetentionError

    try:
        for u in args.sink:
            parse_url(u)
        otlp = resolve_endpoint(args.otlp_endpoint)
        cuda = CudaOptions.parse(args.cuda, args.cuda_force)
        from renacerd.cli.gc import policy_of
        from renacerd.store.database import default_db_path

        retention = policy_of(args.retention_size, args.retention_time,
                              args.db or default_db_path(), args.keep_steps)
    except (SinkError, CudaOptionError, RetentionError) as e:
        return str(e)
    config = SessionConfig(
        cmd=tuple(cmd), pids=tuple(args.pid), db=args.db, run=args.run, socket=args.socket,
        follow=not args.no_follow, duration=args.duration, quiet=args.quiet,
        ring_mb=args.ring_mb, detail_ring_mb=args.detail_ring_mb, cuda=cuda,
        priority=args.priority, owner_uid=args.owner_uid, ready_fd=args.ready_fd,
        retention=retention,
    )
    return config, otlp


def _sinks_of(urls: list[str], otlp: str | None):
    """How the session starts the sinks asked for: ClickHouse URLs and an OTLP endpoint."""

    def start(db_path, run_name):
        from renacerd.sinks.clickhouse import ClickHouseSink
        from renacerd.sinks.otlp import OtlpExporter

        sinks = [ClickHouseSink(db_path, u, run_name).start() for u in urls]
        if otlp:
            sinks.append(OtlpExporter(db_path, otlp, run_name).start())
        return sinks

    return start


if __name__ == "__main__":
    sys.exit(main())
