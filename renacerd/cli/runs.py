"""`renacer runs`: the runs in the store."""

from __future__ import annotations

import sys
import time

from renacerd.cli.common import Parser, add_db, fail, open_store, print_json
from renacerd.escaping import escape
from renacerd.store.database import StoreError

PROG = "renacer runs"


def main(argv: list[str]) -> int:
    """Entry point."""
    p = Parser(prog=PROG, description="List the runs in the store.")
    add_db(p)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        runs = open_store(a.db).runs()
    except StoreError as e:
        return fail(PROG, str(e))
    if a.json:
        rows = [
            {"run": r.name, "status": r.status, "host": r.host, "events": r.events,
             "lost": r.lost, "truncated": r.truncated, "start_wall_ns": r.start_wall_ns,
             "end_wall_ns": r.end_wall_ns,
             "cmdline": r.cmdline, "pruned": bool(r.pruned)}
            for r in runs
        ]
        return print_json(rows)
    w = sys.stdout.write
    w(f"{'RUN':<44} {'STATUS':<11} {'STARTED':<19} {'SECONDS':>8} {'EVENTS':>10} {'LOST':>6}"
      f" {'TRUNC':>6}  COMMAND\n")
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S",
                                time.localtime((r.start_wall_ns or 0) / 1e9))
        secs = ((r.end_wall_ns or time.time_ns()) - (r.start_wall_ns or 0)) / 1e9
        flag = "!" if r.lost else ""
        cmd = " ".join(escape(a) for a in r.cmdline)[:60]
        # a pruned run's status carries a '*' (its events dropped: see the footnote)
        status = r.status + ("*" if r.pruned else "")
        w(f"{escape(r.name):<44} {status:<11} {started:<19} {secs:8.2f} {r.events:>10} "
          f"{r.lost:>5}{flag or ' '} {r.truncated:>6}  {cmd}\n")
    if any(r.pruned for r in runs):
        w("* pruned by retention: events dropped, metadata, spans and per-step aggregates "
          "kept\n")
    return 0
