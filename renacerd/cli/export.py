"""`renacer export RUN -o FILE`: golden trace file, Perfetto JSON or JSON lines."""

from __future__ import annotations

import sys

from renacerd.cli.common import Parser, add_db, fail, open_store
from renacerd.store.database import StoreError

PROG = "renacer export"


def main(argv: list[str]) -> int:
    """Entry point."""
    p = Parser(prog=PROG, description="Export a stored run.")
    p.add_argument("run", help="run name")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write")
    p.add_argument("--format", choices=["golden", "perfetto", "jsonl"], default="golden",
                   help="golden trace (default; renacer compare reads it), Chrome/Perfetto "
                        "trace JSON, or one JSON object per line")
    add_db(p)
    a = p.parse_args(argv)
    try:
        store = open_store(a.db)
        info = store.run(a.run)
        if info.status == "running":
            return fail(PROG, f"run {a.run!r} is still in progress (status running): "
                              "export it once it has finished")
        traces = store.load_run(a.run)
    except StoreError as e:
        return fail(PROG, str(e))
    try:
        if a.format == "golden":
            from renacerd.io.runfile import write_golden

            size = write_golden(a.output, info, traces)
            what = f"{size} bytes"
        elif a.format == "perfetto":
            from renacerd.io.perfetto import write_perfetto

            size = write_perfetto(a.output, traces, a.run)
            what = f"{size} bytes"
        else:
            from renacerd.io.jsonl import write_jsonl

            what = f"{write_jsonl(a.output, traces)} lines"
    except OSError as e:
        return fail(PROG, f"cannot write {a.output}: {e.strerror or e}")
    events = sum(len(t) for t in traces)
    from renacerd.escaping import escape

    if info.pruned:
        from renacerd.reports.show import pruned_line

        # the file holds the events kept
        sys.stderr.write(f"{PROG}: warning: {pruned_line(info.pruned).removeprefix('!! ')}")
    sys.stderr.write(f"{PROG}: {escape(a.run)}: {len(traces)} processes, {events} syscalls -> "
                     f"{a.output} ({a.format}, {what})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
