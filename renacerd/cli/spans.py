"""`renacer spans RUN`: the run's experiment spans with what their events did."""

from __future__ import annotations

import sys

from renacerd.cli.common import Parser, add_db, fail, print_json
from renacerd.escaping import escape
from renacerd.store.database import StoreError

PROG = "renacer spans"


def main(argv: list[str]) -> int:
    """Entry point."""
    p = Parser(prog=PROG, description="A run's experiment spans and their syscalls.")
    p.add_argument("run", help="run name")
    add_db(p)
    p.add_argument("--json", action="store_true", help="machine-readable (stable contract)")
    a = p.parse_args(argv)
    from renacerd.io.load import LoadError, RunLoader

    loader = RunLoader(a.db)
    try:
        store = loader.store()
        info = store.run(a.run)
        traces = store.load_run(a.run)
        agg = loader.aggregates(info)
    except (StoreError, LoadError) as e:
        return fail(PROG, str(e))
    from renacerd.reports.show import pruned_line
    from renacerd.reports.steps import spans_data

    data = spans_data(traces, agg)
    if a.json:
        return print_json(data)
    w = sys.stdout.write
    line = pruned_line(info.pruned)
    if line:
        w(line)
    w(f"{'span':<16} {'parent':<16} {'name':<20} {'status':<6} {'ms':>9} {'calls':>7} "
      f"{'sys ms':>8} {'read':>9} {'written':>9}  attributes / top syscalls\n")
    for s in data:
        ms = (s["end_time_nanos"] - s["start_time_nanos"]) / 1e6
        attrs = " ".join(f"{escape(k.removeprefix('experiment.'))}={escape(v)}"
                         for k, v in s["attributes"].items() if k.startswith("experiment."))
        top = " ".join(f"{k}:{v}" for k, v in list(s["syscalls"].items())[:4])
        w(f"{s['span_id']:<16} {s['parent_span_id'] or '-':<16} {escape(s['name'])[:20]:<20} "
          f"{s['status']:<6} {ms:>9.3f} {s['syscall_count']:>7} {s['syscall_ns'] / 1e6:>8.3f} "
          f"{s['bytes_read']:>9} {s['bytes_written']:>9}  {attrs}  [{top}]\n")
    return 0
