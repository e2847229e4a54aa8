"""`renacer ranks RUN`: per step and rank, working and waiting; stragglers, causes, desyncs."""

from __future__ import annotations

import math
import sys

from renacerd.cli.common import Parser, add_db, fail, open_store, print_json
from renacerd.io.clickhouse_source import is_clickhouse_url
from renacerd.sinks import SinkError
from renacerd.store.database import StoreError

PROG = "renacer ranks"


def main(argv: list[str]) -> int:
    """Entry point."""
    from renacerd.reports.ranks import DEFAULT_MIN_LATE_MS, ranks_data, render_ranks

    p = Parser(prog=PROG, description="Per step and rank: step time, time waiting for the "
               "others, the straggler and what it did; where the ranks' collectives differ.")
    p.add_argument("run", help="run name, or clickhouse://HOST:8123/DB/JOB: the ranks of "
                   "job JOB on every host that pushed it, computed in ClickHouse")
    add_db(p)
    p.add_argument("--json", action="store_true", help="machine-readable (stable contract)")
    p.add_argument("--min-late-ms", type=float, default=DEFAULT_MIN_LATE_MS, metavar="MS",
                   help="a rank is a straggler when the others waited at least this long for "
                        f"it (default {DEFAULT_MIN_LATE_MS:g})")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page: "
                   "step x rank heatmaps of step time and waiting share, stragglers marked")
    a = p.parse_args(argv)
    if not math.isfinite(a.min_late_ms) or a.min_late_ms < 0:
        return fail(PROG, f"--min-late-ms must be a finite number >= 0, not {a.min_late_ms}")
    pruned = None  # what retention dropped of a stored run (a ClickHouse job: nothing)
    try:
        if is_clickhouse_url(a.run):
            from renacerd.io.clickhouse_ranks import job_ranks_data

            data = job_ranks_data(a.run, a.min_late_ms)
        else:
            store = open_store(a.db)
            info = store.run(a.run)
            pruned = info.pruned
            data = ranks_data(store, info, a.min_late_ms)
    except (StoreError, SinkError) as e:
        return fail(PROG, str(e))
    if a.html:
        from renacerd.reports.compare_html import render_ranks_html

        try:
            with open(a.html, "w", encoding="utf-8") as f:
                f.write(render_ranks_html(data))
        except OSError as e:
            return fail(PROG, f"cannot write {a.html}: {e.strerror}")
    if a.json:
        print_json(data)
    else:
        from renacerd.reports.show import pruned_line

        line = pruned_line(pruned)
        if line:
            sys.stdout.write(line)
        render_ranks(data, sys.stdout)
    return 0
