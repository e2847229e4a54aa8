"""`renacerd serve`: the per-host service that traces training processes on request."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import math
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

from renacerd.cli.common import Parser, fail
from renacerd.serve.flight import DEFAULT_HANG_FACTOR, FlightPolicy
from renacerd.serve.span_feed import DEFAULT_SOCKET

if TYPE_CHECKING:  # imported where used: the CLI starts fast
    from renacerd.serve.notify import Notifier
    from renacerd.serve.service import Service
    from renacerd.store.retention import Policy

PROG = "renacerd serve"


def _parser() -> Parser:
    """The options of `renacerd serve`."""
    p = Parser(prog=PROG, description="Serve trace requests of experiment-span clients: "
               "the probes are attached once, and each run is a slot of them "
               "(see docs/security.md).")
    p.add_argument("--socket", metavar="PATH",
                   help=f"front socket (default {DEFAULT_SOCKET}; systemd's LISTEN_FDS wins)")
    p.add_argument("--db", metavar="PATH",
                   help="store file (default $RENACER_DB or /var/lib/renacer/traces.db)")
    p.add_argument("--group", default="renacer",
                   help="group allowed to connect and to read the store (default renacer)")
    p.add_argument("--runs-dir", metavar="DIR", help="per-run sockets (default: next to "
                   "the front socket, in runs/)")
    p.add_argument("--sink", metavar="URL", action="append", default=[],
                   help="stream every run to clickhouse://HOST:8123/DATABASE (repeatable)")
    p.add_argument("--otlp-endpoint", metavar="URL",
                   help="export spans over OTLP/HTTP (env OTEL_EXPORTER_OTLP_ENDPOINT)")
    p.add_argument("--flight-recorder", metavar="DURATION",
                   help="for runs that ask (configure(flight_recorder=True) or "
                        "RENACER_FLIGHT_RECORDER=1): keep only the last DURATION (e.g. 10m) "
                        "of full events plus per-step aggregates, and the window whole when "
                        "the job fails, a step hangs or on `renacer dump RUN`")
    p.add_argument("--flight-hang-factor", type=float, default=DEFAULT_HANG_FACTOR,
                   metavar="F", help="a step open F times the median step is a hang "
                   f"(default {DEFAULT_HANG_FACTOR:g})")
    from renacerd.cli.gc import add_retention

    add_retention(p, defaults=True)
    return p


def _settings(a: argparse.Namespace) -> tuple[FlightPolicy | None, str | None, Policy] | int:
    """(flight recorder policy, OTLP endpoint, retention policy) of the options, or the exit
    status of a bad one."""
    from renacerd.cli.gc import policy_of

    flight = None
    if not math.isfinite(a.flight_hang_factor) or a.flight_hang_factor <= 1:
        return fail(PROG, f"--flight-hang-factor must be a number above 1, not "
                    f"{a.flight_hang_factor}")
    if a.flight_recorder is not None:
        from renacerd.store.retention import RetentionError, parse_duration

        try:
            flight = FlightPolicy(parse_duration(a.flight_recorder), a.flight_hang_factor)
        except RetentionError as e:
            return fail(PROG, f"--flight-recorder: {e}")
    from renacerd.sinks import SinkError
    from renacerd.sinks.clickhouse import parse_url
    from renacerd.sinks.otlp import resolve_endpoint
    from renacerd.store.database import default_db_path
    from renacerd.store.retention import DEFAULT_SIZE, DEFAULT_TIME, RetentionError

    try:
        for u in a.sink:
            parse_url(u)
        otlp = resolve_endpoint(a.otlp_endpoint)
        policy = policy_of(a.retention_size or DEFAULT_SIZE, a.retention_time or DEFAULT_TIME,
                           a.db or default_db_path(), a.keep_steps)
    except (SinkError, RetentionError) as e:
        return fail(PROG, str(e))
    return flight, otlp, policy


def _start(a: argparse.Namespace, flight: FlightPolicy | None, notifier: Notifier, db: str
           ) -> tuple[Service, str] | int:
    """(the service, its front socket's path): the probes loaded and the front socket open,
    or the exit status of a failure."""
    from renacerd.serve.service import (
        Service,
        ServiceError,
        load_capture,
        open_front,
        renacer_gid,
    )
    from renacerd.serve.span_server import sockets_from_systemd
    from renacerd.store.database import StoreError

    gid = renacer_gid(a.group)
    # Sockets and anything else made here: never open to every user. (The store sets its
    # own modes whatever the umask: renacerd.store.database.)
    os.umask(0o027)
    handed = sockets_from_systemd()
    capture = None
    try:
        if len(handed) > 1:
            raise ServiceError(f"systemd passed {len(handed)} sockets; expected one")
        # The one compile: every run is a slot of these probes.
        notifier.status("checking that BPF programs load")
        capture = load_capture()
        sock, unlink, path = open_front(handed, a.socket, gid, a.group)
        runs_dir = a.runs_dir or os.path.join(os.path.dirname(path) or ".", "runs")
        service = Service(sock, db, runs_dir, notifier, unlink_path=unlink, group=a.group,
                          capture=capture, flight=flight)
    except (ServiceError, StoreError, OSError) as e:
        if capture is not None:
            capture.close()
        notifier.status(f"failed: {e}")
        if isinstance(e, OSError) and not isinstance(e, ServiceError):
            return fail(PROG, f"{e.strerror or e}: {getattr(e, 'filename', '') or ''}"
                        .rstrip(": "))
        return fail(PROG, str(e))
    return service, path


def _serve(service: Service, a: argparse.Namespace, db: str, otlp: str | None,
           policy: Policy, notifier: Notifier, path: str) -> int:
    """Serve until SIGTERM or SIGINT, with the sinks and the retention loop alongside."""
    from renacerd.sinks.clickhouse import ClickHouseSink
    from renacerd.sinks.otlp import OtlpExporter
    from renacerd.store.retention import RetentionLoop

    def _stop(signum: int, frame: object) -> None:
        # The handler runs in the main thread; stopping joins children, so do it elsewhere.
        threading.Thread(target=service.stop, name="renacerd-stop").start()

    # `kill -USR1` dumps every thread's stack to the journal: a stuck service explains itself.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # One tailer per target for the whole store: every run.
    sinks = [ClickHouseSink(db, u).start() for u in a.sink]
    if otlp:
        sinks.append(OtlpExporter(db, otlp).start())
    # every minute and at each run's end, on its own connection
    retention = RetentionLoop(db, policy).start()
    service.on_run_end = retention.poke
    notifier.ready(f"listening on {path}; store {db}")
    logging.info("serving on %s (store %s)", path, db)
    try:
        service.serve_forever()
    finally:
        retention.stop()
        for sink in sinks:
            sink.stop(drain_s=5)
    for t in threading.enumerate():
        if t.name == "renacerd-stop":
            t.join()
    logging.info("stopped")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of `renacerd serve`."""
    a = _parser().parse_args(argv)
    settings = _settings(a)
    if isinstance(settings, int):
        return settings
    flight, otlp, policy = settings
    if os.geteuid() != 0:
        return fail(PROG, "must run as root (BPF needs CAP_BPF and CAP_PERFMON); try sudo")
    from renacerd.serve.notify import Notifier
    from renacerd.store.database import default_db_path

    logging.basicConfig(level=logging.INFO, format="renacerd: %(message)s")
    notifier = Notifier.from_environment()
    db = a.db or default_db_path()
    started = _start(a, flight, notifier, db)
    if isinstance(started, int):
        return started
    service, path = started
    return _serve(service, a, db, otlp, policy, notifier, path)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
