"""Behavioural comparison of two traces or two whole runs (see docs/comparison.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from renacerd.compare.effects import EffectsDiff, compare_effects
from renacerd.compare.lcs import Budget, LcsResult, chunked_lcs
from renacerd.compare.normalize import NormTrace, Vocab, normalize
from renacerd.compare.pairing import ProcessPair, pair_processes
from renacerd.compare.pathmap import PathMap, infer_path_map
from renacerd.compare.score import (
    EQUIVALENCE_THRESHOLD,
    W_MATCH,
    W_SEMANTIC,
    W_TIMING,
    EquivalenceScore,
)
from renacerd.trace.effects import Effects, run_effects
from renacerd.trace.fdtrack import run_fd_path_ids
from renacerd.trace.unified_trace import UnifiedTrace

__all__ = ["Budget", "Chunk", "Comparison", "compare_runs", "compare_traces"]



@dataclass(slots=True)
class Chunk:
    """One unit of the LCS: a process pair's canonical thread within one step segment."""

    pair: int
    thread: int
    segment: int
    base: np.ndarray  # positions into the baseline NormTrace of the pair
    cand: np.ndarray  # positions into the candidate NormTrace


@dataclass(slots=True)
class Comparison:
    """Everything compare_runs worked out; the score plus what the reports need."""

    score: EquivalenceScore
    threshold: float
    raw: bool
    pairs: list[ProcessPair]
    norms: list[tuple[NormTrace | None, NormTrace | None]]
    chunks: list[Chunk]
    lcs: LcsResult
    effects: EffectsDiff
    vocab: Vocab
    total_ns: tuple[int, int]
    events: tuple[int, int]
    match_bounds: tuple[float, float]
    fd_ids: tuple[dict[int, np.ndarray], dict[int, np.ndarray]] = field(
        default_factory=lambda: ({}, {}))
    path_map: PathMap = field(default_factory=PathMap)

    @property
    def hard(self) -> list[str]:
        """Differences that make the runs not equivalent whatever the scores."""
        return self.effects.hard

    @property
    def exact(self) -> bool:
        """Every score is exact (no budget bound, no early-out bound)."""
        return self.lcs.exact

    def equivalent(self, threshold: float | None = None) -> bool:
        """overall >= threshold and no hard difference."""
        t = self.threshold if threshold is None else threshold
        return not self.hard and self.score.is_equivalent(t)


def _as_run(x: UnifiedTrace | Sequence[UnifiedTrace]) -> list[UnifiedTrace]:
    return [x] if isinstance(x, UnifiedTrace) else list(x)


def _chunks(pair: int, nb: NormTrace | None, nc: NormTrace | None) -> list[Chunk]:
    """Split both sides by (canonical thread, segment); keys present on either side pair up."""
    def groups(n: NormTrace | None) -> dict[tuple[int, int], np.ndarray]:
        if n is None or not len(n):
            return {}
        key = n.thread.astype(np.int64) << 32 | n.segment.astype(np.int64)
        order = np.argsort(key, kind="stable")
        ks = key[order]
        cut = np.flatnonzero(np.diff(ks)) + 1
        return {(int(k >> 32), int(k & 0xFFFFFFFF)): g
                for k, g in zip(ks[np.r_[0, cut]], np.split(order, cut))}

    gb, gc = groups(nb), groups(nc)
    empty = np.empty(0, dtype=np.int64)
    return [Chunk(pair, th, seg, gb.get((th, seg), empty), gc.get((th, seg), empty))
            for th, seg in sorted(set(gb) | set(gc))]


def compare_runs(
    baseline: UnifiedTrace | Sequence[UnifiedTrace],
    candidate: UnifiedTrace | Sequence[UnifiedTrace],
    *,
    raw: bool = False,
    threshold: float = EQUIVALENCE_THRESHOLD,
    budget: Budget | None = None,
    path_maps: Sequence[tuple[str, str]] = (),
    effects: tuple[Effects | None, Effects | None] = (None, None),
) -> Comparison:
    """Compare two traces (or two runs' lists of traces) and keep the details for reports;
    `path_maps` are (baseline prefix, candidate prefix) pairs added to the inferred ones;
    `effects` the runs' effects where the store keeps them (a pruned run's), else None:
    from their events."""

    single = isinstance(baseline, UnifiedTrace) and isinstance(candidate, UnifiedTrace)
    bl, cl = _as_run(baseline), _as_run(candidate)
    pairs = [ProcessPair("0", bl[0], cl[0])] if single else pair_processes(bl, cl)
    vocab = Vocab()
    norms: list[tuple[NormTrace | None, NormTrace | None]] = []
    for p in pairs:
        norms.append((normalize(p.baseline, vocab, raw=raw) if p.baseline else None,
                      normalize(p.candidate, vocab, raw=raw) if p.candidate else None))
    chunks = [c for i, (nb, nc) in enumerate(norms) for c in _chunks(i, nb, nc)]
    n_b = sum(len(nb) for nb, _ in norms if nb is not None)
    n_c = sum(len(nc) for _, nc in norms if nc is not None)
    seqs = [(norms[c.pair][0].codes[c.base] if len(c.base) else np.empty(0, np.int32),  # type: ignore[union-attr]
             norms[c.pair][1].codes[c.cand] if len(c.cand) else np.empty(0, np.int32))  # type: ignore[union-attr]
            for c in chunks]
    min_match = (threshold - W_TIMING - W_SEMANTIC) / W_MATCH
    lcs = chunked_lcs(seqs, max(n_b, n_c), min_match=min_match if min_match > 0 else None,
                      budget=budget)
    if n_b == 0 and n_c == 0:
        lo = hi = 1.0
    elif n_b == 0 or n_c == 0:
        lo = hi = 0.0
    else:
        lo, hi = lcs.lower / max(n_b, n_c), lcs.upper / max(n_b, n_c)
    t_b = sum(int(nb.dur().sum()) for nb, _ in norms if nb is not None)
    t_c = sum(int(nc.dur().sum()) for _, nc in norms if nc is not None)
    tv = 0.0 if t_b == 0 and t_c == 0 else min(abs(t_b - t_c) / max(t_b, t_c), 1.0)
    ids_b, ids_c = run_fd_path_ids(bl), run_fd_path_ids(cl)
    eff_b = effects[0] if effects[0] is not None else run_effects(bl, ids_b)
    eff_c = effects[1] if effects[1] is not None else run_effects(cl, ids_c)
    pmap = infer_path_map(eff_b, eff_c, pairs, path_maps,
                          (bl[0].run if bl else None, cl[0].run if cl else None))
    eff = compare_effects(eff_b, pmap.apply_effects(eff_c), pairs)
    # a hard difference is a behaviour change: it zeroes the semantic score (see the docs)
    sem = 0.0 if eff.hard else eff.score
    score = EquivalenceScore(syscall_match=hi, timing_variance=tv, semantic_equiv=sem,
                             exact=lcs.exact)
    return Comparison(score, threshold, raw, pairs, norms, chunks, lcs, eff, vocab,
                      (t_b, t_c), (n_b, n_c), (lo, hi), (ids_b, ids_c), pmap)


def compare_traces(
    baseline: UnifiedTrace | Sequence[UnifiedTrace],
    candidate: UnifiedTrace | Sequence[UnifiedTrace],
    *,
    normalize: bool = True,
) -> EquivalenceScore:
    """renacer's compare_traces: two traces or two runs -> EquivalenceScore."""
    return compare_runs(baseline, candidate, raw=not normalize).score
