"""`renacer push RUN --to clickhouse://HOST:8123/DB`: send a stored run to ClickHouse."""

from __future__ import annotations

import sys

from renacerd.cli.common import Parser, add_db, fail
from renacerd.store.database import StoreError, default_db_path

PROG = "renacer push"


def main(argv: list[str]) -> int:
    """Entry point: 0 pushed, 2 bad URL, unknown run or unreachable server."""
    p = Parser(prog=PROG, description="Push a run from the local store to ClickHouse "
               "(resumes where an earlier push or the daemon's sink stopped; no duplicates).")
    p.add_argument("run", help="run name")
    p.add_argument("--to", required=True, metavar="URL", help="clickhouse://HOST:8123/DATABASE")
    add_db(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    a = p.parse_args(argv)
    from renacerd.sinks import SinkError
    from renacerd.sinks.clickhouse import parse_url, push_run

    try:
        parse_url(a.to)
        stats = push_run(a.db or default_db_path(), a.to, a.run)
    except (SinkError, StoreError) as e:
        return fail(PROG, str(e))
    if not a.quiet:
        sys.stderr.write(f"{PROG}: {a.run}: {stats.events} events and {stats.gpu_calls} GPU calls "
                         f"in {stats.batches} batches, "
                         f"{stats.spans} spans, {stats.processes} processes, {stats.strings} "
                         f"strings -> {a.to} ({stats.bytes_sent} bytes sent)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
