"""Exact LCS of syscall-name sequences, chunk by chunk, with an early-out and a time budget.

Each chunk is one (process pair, canonical thread, step segment). Per chunk the LCS comes
from rapidfuzz's bit-parallel Indel distance (LCS = (n + m - d) / 2) with a score cutoff,
which bands the computation: the cutoff starts small and grows 4x until the distance fits,
so a chunk with d edits costs about O(max(n, m) * d / 64) word operations. Before running a
try, its cost is estimated; if it would overrun the budget, the chunk keeps an upper bound
and the result says exact=False. The sum of per-chunk LCS is a lower bound of the whole-trace
LCS (a common subsequence of each chunk pair concatenates into one of the whole).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from rapidfuzz.distance import Indel

# seconds per (longer length x cutoff) unit, measured on this machine class (3.8e-11) + margin
COST_PER_CELL = 5e-11
COST_FIXED = 2e-5


@dataclass(slots=True)
class Budget:
    """Limits on exact work: wall-clock seconds for all LCS calls together."""

    seconds: float = 60.0


@dataclass(slots=True)
class ChunkLcs:
    """LCS of one chunk pair: exact, or bounded by [lower, upper]."""

    n_base: int
    n_cand: int
    lower: int
    upper: int

    @property
    def exact(self) -> bool:
        """The LCS is known exactly."""
        return self.lower == self.upper


@dataclass(slots=True)
class LcsResult:
    """Per-chunk results plus totals; `lower == upper` everywhere when exact."""

    chunks: list[ChunkLcs] = field(default_factory=list)
    early_out: bool = False
    over_budget: bool = False
    seconds: float = 0.0

    @property
    def lower(self) -> int:
        """Sum of per-chunk lower bounds."""
        return sum(c.lower for c in self.chunks)

    @property
    def upper(self) -> int:
        """Sum of per-chunk upper bounds."""
        return sum(c.upper for c in self.chunks)

    @property
    def exact(self) -> bool:
        """Every chunk is exact."""
        return all(c.exact for c in self.chunks)


def as_text(codes: np.ndarray) -> str | bytes:
    """Pack int codes into something rapidfuzz compares natively (bytes when they fit)."""
    if not len(codes) or int(codes.max()) < 256:
        return codes.astype(np.uint8).tobytes()
    return codes.astype("<u4").tobytes().decode("utf-32-le")


def histogram_bound(a: np.ndarray, b: np.ndarray) -> int:
    """Sum over names of min(count in a, count in b): an upper bound of the LCS."""
    if not len(a) or not len(b):
        return 0
    size = int(max(a.max(), b.max())) + 1
    return int(np.minimum(np.bincount(a, minlength=size), np.bincount(b, minlength=size)).sum())


def common_affix(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Lengths of the common prefix and (non-overlapping) common suffix."""
    k = min(len(a), len(b))
    if not k:
        return 0, 0
    ne = np.flatnonzero(a[:k] != b[:k])
    pre = int(ne[0]) if len(ne) else k
    if pre == k:
        return pre, 0
    ra, rb = a[::-1][: k - pre], b[::-1][: k - pre]
    ne = np.flatnonzero(ra != rb)
    return pre, int(ne[0]) if len(ne) else k - pre


def chunked_lcs(
    pairs: list[tuple[np.ndarray, np.ndarray]],
    denominator: int,
    *,
    min_match: float | None = 0.625,
    budget: Budget | None = None,
) -> LcsResult:
    """LCS per chunk pair; stops once sum/denominator provably stays below `min_match`."""
    budget = budget or Budget()
    t0 = time.monotonic()
    deadline = t0 + budget.seconds
    res = LcsResult()
    todo: list[int] = []
    for a, b in pairs:
        n, m = len(a), len(b)
        if n == m and (n == 0 or np.array_equal(a, b)):
            res.chunks.append(ChunkLcs(n, m, n, n))
            continue
        pre, suf = common_affix(a, b)
        res.chunks.append(ChunkLcs(n, m, pre + suf, histogram_bound(a, b)))
        if res.chunks[-1].lower < res.chunks[-1].upper:
            todo.append(len(res.chunks) - 1)
    target = math.ceil(min_match * denominator) if min_match and min_match > 0 else 0
    # biggest uncertainty first: it decides an early-out soonest
    todo.sort(key=lambda i: -(res.chunks[i].upper - res.chunks[i].lower))
    hi = res.upper
    for i in todo:
        if hi < target:
            res.early_out = True
            break
        ch = res.chunks[i]
        a, b = pairs[i]
        need = target - (hi - ch.upper)  # this chunk's LCS below `need` sinks the total
        before = ch.upper
        if _solve(ch, a, b, need, deadline) == "budget":
            res.over_budget = True
        hi += ch.upper - before
    if hi < target and not res.exact:
        res.early_out = True
    res.seconds = time.monotonic() - t0
    return res


def _solve(ch: ChunkLcs, a: np.ndarray, b: np.ndarray, need: int, deadline: float) -> str:
    n, m = ch.n_base, ch.n_cand
    # d = n + m - 2 LCS: a distance above `cap` proves LCS < need
    cap = n + m - 2 * max(need, 0)
    floor_d = n + m - 2 * ch.upper  # the histogram bound already rules out smaller distances
    k = max(floor_d, abs(n - m), 64)
    sa = sb = None
    while True:
        k = min(k, cap, n + m)
        if time.monotonic() + COST_FIXED + COST_PER_CELL * max(n, m) * (k + 64) > deadline:
            return "budget"
        if sa is None:
            sa, sb = as_text(a), as_text(b)
        d = Indel.distance(sa, sb, score_cutoff=k)
        if d <= k:
            ch.lower = ch.upper = (n + m - d) // 2
            return "exact"
        ch.upper = min(ch.upper, (n + m - k - 1) // 2)
        if k >= cap:
            return "bound"
        k *= 4
