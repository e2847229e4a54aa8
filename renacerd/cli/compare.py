"""`renacer compare BASELINE CANDIDATE`: are two runs or golden traces behaviourally equivalent?"""

from __future__ import annotations

import sys

import orjson

from renacerd.cli.common import Parser, add_db, fail
from renacerd.io.load import LoadError, RunLoader
from renacerd.store.database import RunInfo

PROG = "renacer compare"
EXIT_EQUIVALENT, EXIT_DIFFERENT = 0, 1


def _finished(info: RunInfo) -> None:
    """Refuse a run that is still being traced."""
    if info.status == "running":
        raise LoadError(f"run {info.name!r} is still in progress (status running): "
                        "compare it once it has finished")


def _notes(what: str, info: RunInfo | dict) -> list[str]:
    """What is worth a line on stderr about a run from the store."""
    if not isinstance(info, RunInfo):
        return []
    notes = []
    if info.status != "complete":
        notes.append(f"run {what!r} is {info.status}: "
                     f"{info.error or 'its trace may be partial'}")
    if info.lost:
        notes.append(f"run {what!r} lost {info.lost} events/arguments while tracing")
    if info.pruned:
        from renacerd.reports.show import pruned_line

        # its syscalls compared on the events it kept, its effects from its aggregates
        notes.append(f"run {what!r}: " + pruned_line(info.pruned).removeprefix("!! ").rstrip())
    return notes


def _parser() -> Parser:
    """The command line of `renacer compare`."""
    p = Parser(prog=PROG, description="Compare two runs for behavioural equivalence "
               "(run names in the store, or golden trace files).")
    p.add_argument("baseline", help="run name or golden trace file")
    p.add_argument("candidate", help="run name or golden trace file")
    add_db(p)
    p.add_argument("--threshold", type=float, default=0.85,
                   help="overall score needed to call them equivalent (default 0.85)")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    p.add_argument("--raw", action="store_true",
                   help="no normalisation: keep futex/clock/poll/... and compare tids as seen")
    p.add_argument("--budget", type=float, default=60.0, metavar="SECONDS",
                   help="time for exact LCS work before answering with a bound (default 60)")
    p.add_argument("--map", action="append", default=[], metavar="OLD=NEW",
                   help="pair the baseline's path OLD (and everything under it) with the "
                   "candidate's NEW; repeatable")
    return p


def _write(data: dict, baseline: str, candidate: str, html: str | None,
           as_json: bool) -> int | None:
    """Write the HTML report (if asked) and the result to stdout; an exit code on failure."""
    if html:
        from renacerd.reports.compare_html import render_html

        try:
            with open(html, "w", encoding="utf-8") as f:
                f.write(render_html(data, baseline, candidate))
        except OSError as e:
            return fail(PROG, f"cannot write {html}: {e.strerror}")
    if as_json:
        from renacerd.escaping import json_safe

        sys.stdout.buffer.write(orjson.dumps(json_safe(data), option=orjson.OPT_INDENT_2)
                                + b"\n")
    else:
        from renacerd.reports.compare_text import render_text

        render_text(data, sys.stdout, baseline, candidate)
    return None


def main(argv: list[str]) -> int:
    """Entry point: 0 equivalent, 1 not equivalent, 2 usage or input error."""
    a = _parser().parse_args(argv)
    if not 0.0 <= a.threshold <= 1.0:
        return fail(PROG, f"--threshold must be between 0 and 1, not {a.threshold}")
    if a.budget <= 0:
        return fail(PROG, f"--budget must be positive, not {a.budget}")
    from renacerd.compare.pathmap import MapError, parse_map

    try:
        maps = [parse_map(m) for m in a.map]
    except MapError as e:
        return fail(PROG, str(e))
    loader = RunLoader(a.db)
    try:
        info_b, base = loader.load(a.baseline, check=_finished)
        info_c, cand = loader.load(a.candidate, check=_finished)
    except LoadError as e:
        return fail(PROG, str(e))
    for n in _notes(a.baseline, info_b) + _notes(a.candidate, info_c):
        sys.stderr.write(f"{PROG}: warning: {n}\n")
    if not base or not cand:
        empty = a.baseline if not base else a.candidate
        return fail(PROG, f"{empty!r} has no processes to compare")
    from renacerd.compare import Budget, compare_runs
    from renacerd.compare.report import report_data

    try:
        kept = (loader.effects(info_b), loader.effects(info_c))
    except LoadError as e:
        return fail(PROG, str(e))
    for what, info, eff in ((a.baseline, info_b, kept[0]), (a.candidate, info_c, kept[1])):
        if eff is None and isinstance(info, RunInfo) and loader.aggregates(info) is not None:
            sys.stderr.write(f"{PROG}: warning: run {what!r} was pruned before its effects "
                             "were kept: they come from its remaining events\n")
    comp = compare_runs(base, cand, raw=a.raw, threshold=a.threshold,
                        budget=Budget(seconds=a.budget), path_maps=maps, effects=kept)
    data = report_data(comp)
    for side, n in (("baseline", comp.events[0]), ("candidate", comp.events[1])):
        if n == 0:
            sys.stderr.write(f"{PROG}: note: the {side} has no syscalls to compare\n")
    failed = _write(data, a.baseline, a.candidate, a.html, a.json)
    if failed is not None:
        return failed
    return EXIT_EQUIVALENT if data["equivalent"] else EXIT_DIFFERENT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
