"""Pair the processes of two runs by position in the process tree and by exe/comm."""

from __future__ import annotations

from dataclasses import dataclass

from renacerd.trace.unified_trace import UnifiedTrace


@dataclass(slots=True)
class ProcessPair:
    """One row of the pairing: either side may be missing (an unpaired process)."""

    position: str  # tree path, e.g. "0", "0.1" (second child of the first root)
    baseline: UnifiedTrace | None
    candidate: UnifiedTrace | None

    @property
    def label(self) -> str:
        """`position comm` for reports (pids differ between runs, so they are not the key)."""
        t = self.baseline or self.candidate
        return f"{self.position} {t.process.name}" if t else self.position

    def to_json(self) -> dict:
        """The --json `pairs` entry."""
        return {
            "position": self.position,
            "comm": (self.baseline or self.candidate).process.name,  # type: ignore[union-attr]
            "baseline_pid": self.baseline.pid if self.baseline else None,
            "candidate_pid": self.candidate.pid if self.candidate else None,
            "paired": self.baseline is not None and self.candidate is not None,
        }


def _key(t: UnifiedTrace) -> str:
    """What a process is: its program, else its comm (exe paths may differ by prefix only)."""
    exe = t.process.exe.rsplit("/", 1)[-1] if t.process.exe else ""
    return exe or t.process.name


def _children(traces: list[UnifiedTrace]) -> tuple[list[UnifiedTrace], dict[int, list]]:
    pids = {t.pid for t in traces}
    roots: list[UnifiedTrace] = []
    kids: dict[int, list[UnifiedTrace]] = {}
    for t in traces:
        if t.process.ppid in pids and t.process.ppid != t.pid:
            kids.setdefault(t.process.ppid, []).append(t)
        else:
            roots.append(t)
    for v in kids.values():
        v.sort(key=lambda t: (t.process.start_mono_ns, t.pid))
    roots.sort(key=lambda t: (t.process.start_mono_ns, t.pid))
    return roots, kids


def _match(base: list[UnifiedTrace], cand: list[UnifiedTrace]) -> list[tuple]:
    """Siblings pair in order within the same exe/comm; the rest stay unpaired."""
    out: list[tuple] = []
    used: set[int] = set()
    for b in base:
        j = next((j for j, c in enumerate(cand) if j not in used and _key(c) == _key(b)), None)
        if j is None:
            out.append((b, None))
        else:
            used.add(j)
            out.append((b, cand[j]))
    out += [(None, c) for j, c in enumerate(cand) if j not in used]
    return out


def pair_processes(base: list[UnifiedTrace], cand: list[UnifiedTrace]) -> list[ProcessPair]:
    """Walk both trees from the roots down, pairing siblings; depth-first order."""
    broots, bkids = _children(base)
    croots, ckids = _children(cand)
    pairs: list[ProcessPair] = []

    def walk(bl: list, cl: list, prefix: str) -> None:
        for i, (b, c) in enumerate(_match(bl, cl)):
            pos = f"{prefix}{i}"
            pairs.append(ProcessPair(pos, b, c))
            walk(bkids.get(b.pid, []) if b else [], ckids.get(c.pid, []) if c else [], pos + ".")

    walk(broots, croots, "")
    return pairs
