"""Which experiment span an event belongs to: the one definition of a span's syscalls.

An event belongs to the innermost span active at its CLOCK_MONOTONIC timestamp among the
spans opened by its own process or by an ancestor (DataLoader workers inherit their parent's
step): `tag_events`. From that tagging a span has two counts, both defined here:

- self (`self_events`): the events whose innermost span it is; every event counts once, in
  one span. `renacer spans`, `show --by step` and `Store.query_by_attribute` report these.
- total (`total_events`): self plus the self events of every span below it (parent_span_id
  within the same trace), i.e. what the span's subtree did. The ClickHouse and OTLP sinks
  report these, so a parent's numbers include its children's, as a tracing UI expects.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Below this many events np.searchsorted alone is fast enough.
GRID_MIN_EVENTS = 1 << 16
# Grid cells per boundary, and the most boundaries one cell may hold before the grid is
# not worth it (each one costs a pass over the events).
GRID_CELLS_PER_BOUND = 4
GRID_MAX_PASSES = 8


def span_segments(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundaries and the innermost span index (-1: none) of each constant stretch of time.

    Stretch k covers [bounds[k], bounds[k+1]) (the last one runs to +inf). Spans are half-open
    [start, end); the innermost is the latest-starting span containing the instant, ties going
    to the one that ends first, then to the higher index. Spans need not nest.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    if starts.shape != ends.shape or starts.ndim != 1:
        raise ValueError("starts and ends must be 1-D arrays of one length")
    keep = np.flatnonzero(ends > starts)
    bounds = np.unique(np.concatenate((starts[keep], ends[keep])))
    owner = np.full(bounds.size, -1, dtype=np.int64)
    if keep.size == 0:
        return bounds, owner
    order = keep[np.lexsort((keep, starts[keep]))]
    start_list = starts[order].tolist()
    end_list = ends[order].tolist()
    index_list = order.tolist()
    bound_list = bounds.tolist()
    # Max-heap on (start, -end, index) with lazy deletion of spans that have ended.
    heap: list[tuple[int, int, int, int]] = []
    nxt = 0
    total = len(start_list)
    out = owner.tolist()
    for k, t in enumerate(bound_list):
        while nxt < total and start_list[nxt] <= t:
            heapq.heappush(heap, (-start_list[nxt], end_list[nxt], -index_list[nxt],
                                  end_list[nxt]))
            nxt += 1
        while heap and heap[0][3] <= t:
            heapq.heappop(heap)
        if heap:
            out[k] = -heap[0][2]
    return bounds, np.asarray(out, dtype=np.int64)


def locate(bounds: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """np.searchsorted(bounds, ts, side="right"), faster for large unsorted `ts`.

    Binary search over unsorted keys mispredicts at every level (~100 ns an event); a uniform
    grid (power-of-two cells, so a shift finds the cell) gives each event a start index that a
    few vectorised passes refine.
    """
    n = bounds.size
    if ts.size < GRID_MIN_EVENTS or n < 2 or bool(np.all(ts[1:] >= ts[:-1])):
        return np.searchsorted(bounds, ts, side="right")
    lo, hi = int(bounds[0]), int(bounds[-1])
    shift = max(((hi - lo) // (GRID_CELLS_PER_BOUND * n)).bit_length(), 0)
    cells = ((hi - lo) >> shift) + 1
    index = np.int32 if n < 2**31 - 1 else np.int64
    table = np.searchsorted(bounds, lo + (np.arange(cells, dtype=np.int64) << shift),
                            side="right").astype(index)
    passes = int(np.diff(table, append=n).max())
    if passes > GRID_MAX_PASSES:
        return np.searchsorted(bounds, ts, side="right")
    cell = ts - lo
    cell >>= shift
    np.clip(cell, 0, cells - 1, out=cell)
    pos = table[cell]
    del cell
    pos[ts < lo] = 0
    padded = np.append(bounds, np.iinfo(np.int64).max)
    for _ in range(passes):
        pos += padded[pos] <= ts
    return pos


def innermost_span(ts: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each timestamp, the index of the innermost span containing it, or -1."""
    ts = np.asarray(ts, dtype=np.int64)
    bounds, owner = span_segments(starts, ends)
    if bounds.size == 0:
        return np.full(ts.shape, -1, dtype=np.int64)
    return _stretch_owner(bounds, owner, ts)


def _stretch_owner(bounds: np.ndarray, owner: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """The owner of each timestamp's stretch (span_segments'), -1 before the first."""
    pos = locate(bounds, ts) - 1
    result = owner[np.maximum(pos, 0)]
    result[pos < 0] = -1
    return result


def ancestry(pid: int, ppid_of: Mapping[int, int]) -> list[int]:
    """`pid` and its ancestors among the known processes (`ppid_of`: pid -> parent pid)."""
    chain, seen = [], set()
    p = pid
    while p in ppid_of and p not in seen:
        seen.add(p)
        chain.append(p)
        p = ppid_of[p]
    return chain


@dataclass(frozen=True, slots=True)
class SpanTable:
    """A run's spans as arrays, built once: who opened each, its window, its children."""

    pids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    children: dict[int, list[int]]

    @classmethod
    def of(cls, spans: Sequence[Any]) -> SpanTable:
        """The table of SpanRecords `spans` (children by parent_span_id, same trace)."""
        at = {(sp.trace_id, sp.span_id): i for i, sp in enumerate(spans)}
        children: dict[int, list[int]] = {}
        for j, sp in enumerate(spans):
            parent = at.get((sp.trace_id, sp.parent_span_id)) if sp.parent_span_id else None
            if parent is not None and parent != j:
                children.setdefault(parent, []).append(j)
        return cls(np.array([sp.process_id for sp in spans], dtype=np.int64),
                   np.array([sp.start_mono_nanos for sp in spans], dtype=np.int64),
                   np.array([sp.end_mono_nanos for sp in spans], dtype=np.int64), children)


def tag_events(ts: np.ndarray, table: SpanTable, pids: Iterable[int]) -> np.ndarray:
    """For each timestamp, the index of the innermost span opened by one of `pids` (an
    event's process and its ancestors) that contains it, or -1."""
    return WindowTagger(table).tag(ts, tuple(pids))


class WindowTagger:
    """tag_events over many chunks: each process chain's stretches built once. With a window
    [lo, hi), from the spans that overlap it only (only those can contain its events, so the
    tags of its events are tag_events' own)."""

    __slots__ = ("table", "lo", "hi", "_chains")

    def __init__(self, table: SpanTable, lo: int | None = None, hi: int | None = None) -> None:
        self.table, self.lo, self.hi = table, lo, hi
        self._chains: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def tag(self, ts: np.ndarray, pids: Sequence[int]) -> np.ndarray:
        """tag_events(ts, table, pids) for the timestamps in the window (others: undefined)."""
        key = tuple(pids)
        seg = self._chains.get(key)
        if seg is None:
            t = self.table
            keep = np.isin(t.pids, np.array(key, dtype=np.int64))
            if self.lo is not None:
                keep &= (t.ends > self.lo) & (t.starts < self.hi)
            idx = np.flatnonzero(keep)
            seg = self._chains[key] = (idx, *span_segments(t.starts[idx], t.ends[idx]))
        idx, bounds, owner = seg
        if not len(bounds) or not len(ts):
            return np.full(len(ts), -1, dtype=np.int64)
        local = _stretch_owner(bounds, owner, np.asarray(ts, dtype=np.int64))
        return np.where(local >= 0, idx[np.maximum(local, 0)], -1)


def span_subtree(table: SpanTable, i: int) -> np.ndarray:
    """Index `i` and the indices of every span below it."""
    out, todo, seen = [], [i], set()
    while todo:
        j = todo.pop()
        if j in seen:
            continue
        seen.add(j)
        out.append(j)
        todo.extend(table.children.get(j, ()))
    return np.array(sorted(out), dtype=np.int64)
def self_events(tags: np.ndarray, i: int) -> np.ndarray:
    """Mask of the events (tagged by tag_events) that count for span `i` itself."""
    return tags == i


def total_events(tags: np.ndarray, subtree: np.ndarray) -> np.ndarray:
    """Mask of the events that count for a span's total: its own and its subtree's
    (`subtree` from span_subtree)."""
    return np.isin(tags, subtree)
