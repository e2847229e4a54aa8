"""How much two runs' effects agree (semantic_equiv); the effects: renacerd.trace.effects."""

from __future__ import annotations

from dataclasses import dataclass

from renacerd.compare.pairing import ProcessPair
from renacerd.trace.effects import NOT_FILES, Effects
from renacerd.trace.unified_trace import UnifiedTrace


@dataclass(slots=True)
class EffectsDiff:
    """Both runs' effects side by side, the hard differences and the soft score."""

    baseline: dict[str, int]
    candidate: dict[str, int]
    hard: list[str]
    score: float

    def differing(self) -> list[tuple[str, int, int]]:
        """(item, baseline value, candidate value) for every item that differs."""
        keys = sorted(set(self.baseline) | set(self.candidate))
        return [(k, self.baseline.get(k, 0), self.candidate.get(k, 0)) for k in keys
                if self.baseline.get(k, 0) != self.candidate.get(k, 0)]


def _exit(t: UnifiedTrace) -> str:
    p = t.process
    if p.exit_signal is not None:
        return f"signal {p.exit_signal}"
    return "unknown" if p.exit_code is None else f"exit {p.exit_code}"


def compare_effects(base: Effects, cand: Effects, pairs: list[ProcessPair]) -> EffectsDiff:
    """semantic score = mean over effect items of min/max agreement; see docs/comparison.md."""
    bi, ci = base.items(), cand.items()
    hard: list[str] = []
    scores: list[float] = []
    for k in set(bi) | set(ci):
        b, c = bi.get(k, 0), ci.get(k, 0)
        scores.append(min(b, c) / max(b, c))
        kind, _, name = k.partition(":")
        if kind == "written" and not name.startswith(NOT_FILES):
            if not (b and c):
                hard.append(f"file {name} written only in the "
                            f"{'baseline' if b else 'candidate'}")
            elif b != c:
                hard.append(f"file {name}: {b} bytes written in the baseline, {c} in the "
                            "candidate")
        if kind == "execs" and not (b and c):
            hard.append(f"program {name} exec'd only in the {'baseline' if b else 'candidate'}")
    for p in pairs:
        if p.baseline is None or p.candidate is None:
            scores.append(0.0)
            continue
        eb, ec = _exit(p.baseline), _exit(p.candidate)
        scores.append(1.0 if eb == ec else 0.0)
        if eb != ec:
            hard.append(f"process {p.label}: baseline {eb}, candidate {ec}")
    score = sum(scores) / len(scores) if scores else 1.0
    return EffectsDiff(bi, ci, sorted(hard), score)
