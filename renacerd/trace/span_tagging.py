"""Tag events with the innermost experiment span active at their CLOCK_MONOTONIC timestamp."""

from __future__ import annotations

import heapq

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
    pos = locate(bounds, ts) - 1
    result = owner[np.maximum(pos, 0)]
    result[pos < 0] = -1
    return result
