"""Compare what strace saw with what renacerd recorded: per process, per syscall, per file."""

from __future__ import annotations

import fnmatch
import signal
from dataclasses import dataclass, field

from tests.oracle.model import Proc, label, mask_temp, tree_keys


@dataclass(frozen=True, slots=True)
class Slack:
    """A count that may legitimately differ between the two runs: which, why, how much.

    It covers the calls (and errors) of `syscalls` in processes whose program name matches
    `program` (fnmatch); the counts may differ by up to `most` (absolute), or by any amount
    when `most` is None (said so in `reason`)."""

    syscalls: frozenset[str]
    reason: str
    most: int | None
    program: str = "*"

    def covers(self, program: str, syscall: str) -> bool:
        """Whether this slack applies to `syscall` in a process running `program`."""
        return syscall in self.syscalls and fnmatch.fnmatch(program, self.program)

    def allows(self, a: int, b: int) -> bool:
        """Whether counts `a` and `b` are within this slack."""
        return self.most is None or abs(a - b) <= self.most


# strace stops every thread at every call: how often threads meet on a lock (futex),
# yield or spin differs between the two runs, by as much as the contention does.
FUTEX = Slack(frozenset({"futex", "sched_yield"}),
              "lock contention between threads depends on their timing, which strace's "
              "stop at every call changes", None)


@dataclass(slots=True)
class Row:
    """One compared value."""

    process: str
    what: str
    strace: object
    renacer: object
    verdict: str  # "equal", "slack" or "differs"
    reason: str = ""


@dataclass(slots=True)
class Outcome:
    """A case's comparison: every row, and how many calls strace saw."""

    case: str
    calls: int = 0
    rows: list[Row] = field(default_factory=list)

    def differing(self) -> list[Row]:
        """Rows that differ beyond any stated slack."""
        return [r for r in self.rows if r.verdict == "differs"]

    def add(self, process: str, what: str, s: object, r: object, slack: Slack | None = None,
            reason: str = "") -> None:
        """Record one value pair; equal, within `slack`, or a difference."""
        if s == r:
            verdict = "equal"
        elif slack is not None and isinstance(s, int) and isinstance(r, int) and \
                slack.allows(s, r):
            verdict, reason = "slack", slack.reason
        else:
            verdict = "differs"
        self.rows.append(Row(process, what, s, r, verdict, reason))


def _end(p: Proc) -> str:
    if p.exit_signal is not None:
        return f"killed by {signal.Signals(p.exit_signal).name}"
    return f"exit {p.exit_code}" if p.exit_code is not None else "no exit seen"


def compare(out: Outcome, strace: dict[int, Proc], renacer: dict[int, Proc],
            slacks: tuple[Slack, ...] = ()) -> None:
    """Add to `out` every difference between the two tracers' views of one run."""
    a, b = tree_keys(strace), tree_keys(renacer)
    out.calls += sum(sum(p.calls.values()) for p in strace.values())
    for key in sorted(set(a) | set(b), key=lambda k: (len(k), k)):
        name = label(key)
        sp, rp = a.get(key), b.get(key)
        if sp is None or rp is None:
            out.add(name, "process", "present" if sp else "absent",
                    "present" if rp else "absent")
            continue
        program = key[-1][0]
        out.add(name, "argv", [mask_temp(x) for x in sp.argv], [mask_temp(x) for x in rp.argv])
        out.add(name, "end", _end(sp), _end(rp))
        for sc in sorted(set(sp.calls) | set(rp.calls)):
            slack = next((s for s in slacks if s.covers(program, sc)), None)
            out.add(name, f"{sc} calls", sp.calls[sc], rp.calls[sc], slack)
            out.add(name, f"{sc} errors", sp.errors[sc], rp.errors[sc], slack)
        for path in sorted(set(sp.files) | set(rp.files)):
            s_rw, r_rw = sp.files.get(path, [0, 0]), rp.files.get(path, [0, 0])
            out.add(name, f"bytes read {path}", s_rw[0], r_rw[0])
            out.add(name, f"bytes written {path}", s_rw[1], r_rw[1])
