"""innermost_span: exact, half-open, nested and overlapping spans, and fast at 10M events."""

from __future__ import annotations

import numpy as np
import pytest

from renacerd.trace.span_tagging import innermost_span, locate, span_segments
from tests.conftest import span_record


def brute(ts, starts, ends):
    out = []
    for t in ts:
        best = -1
        for i, (s, e) in enumerate(zip(starts, ends)):
            if s <= t < e and (best < 0 or (s, -e, i) > (starts[best], -ends[best], best)):
                best = i
        out.append(best)
    return out


def test_nested_steps():
    # epoch [0, 100) holding steps [10, 20), [20, 30) and, inside step 2, a sub-span [22, 25)
    starts = np.array([0, 10, 20, 22])
    ends = np.array([100, 20, 30, 25])
    ts = np.array([-5, 0, 5, 10, 19, 20, 21, 22, 24, 25, 29, 30, 99, 100, 1000])
    assert innermost_span(ts, starts, ends).tolist() == [
        -1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 0, 0, -1, -1]


def test_half_open_and_empty_spans():
    starts = np.array([5, 7, 9])
    ends = np.array([5, 9, 8])  # empty, normal, inverted
    assert innermost_span(np.array([4, 5, 6, 7, 8, 9]), starts, ends).tolist() == [
        -1, -1, -1, 1, 1, -1]


def test_no_spans_and_no_events():
    empty = np.array([], dtype=np.int64)
    assert innermost_span(np.array([1, 2]), empty, empty).tolist() == [-1, -1]
    assert innermost_span(empty, np.array([0]), np.array([5])).tolist() == []
    assert innermost_span(empty, empty, empty).dtype == np.int64


def test_equal_starts_inner_is_the_shorter():
    starts = np.array([10, 10])
    ends = np.array([50, 20])
    assert innermost_span(np.array([10, 19, 20, 49]), starts, ends).tolist() == [1, 1, 0, 0]


def test_identical_spans_tie_to_higher_index():
    assert innermost_span(np.array([3]), np.array([0, 0]), np.array([9, 9])).tolist() == [1]


def test_overlapping_not_nested_latest_start_wins():
    # two threads' spans overlapping: [0, 10) and [5, 15)
    ts = np.arange(-1, 17)
    got = innermost_span(ts, np.array([0, 5]), np.array([10, 15]))
    assert got.tolist() == brute(ts.tolist(), [0, 5], [10, 15])


def test_unsorted_inputs_and_events():
    starts = np.array([20, 0, 10])
    ends = np.array([30, 100, 20])
    ts = np.array([25, 5, 15, 50, 20])
    assert innermost_span(ts, starts, ends).tolist() == [0, 1, 2, 1, 0]


def test_segments_are_constant_stretches():
    bounds, owner = span_segments(np.array([0, 10]), np.array([100, 20]))
    assert bounds.tolist() == [0, 10, 20, 100]
    assert owner.tolist() == [0, 1, 0, -1]


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        innermost_span(np.array([1]), np.array([1, 2]), np.array([3]))


@pytest.mark.parametrize("seed", range(30))
def test_random_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 25))
    starts = rng.integers(0, 100, n)
    ends = starts + rng.integers(-3, 40, n)
    ts = rng.integers(-5, 150, 200)
    assert innermost_span(ts, starts, ends).tolist() == brute(ts.tolist(), starts.tolist(),
                                                              ends.tolist())


@pytest.mark.parametrize("seed", range(5))
def test_grid_locate_matches_searchsorted(seed):
    rng = np.random.default_rng(seed)
    uniform = np.unique(rng.integers(0, 10**9, 3000))
    clustered = np.unique(np.concatenate((rng.integers(0, 10**12, 5000),
                                          rng.integers(0, 1000, 500))))
    for bounds in (uniform, clustered, np.array([5, 6]), np.array([7])):
        ts = rng.integers(-10**6, int(bounds[-1]) * 2 + 10, 200_000)
        assert np.array_equal(locate(bounds, ts), np.searchsorted(bounds, ts, side="right"))


@pytest.mark.parametrize("ordered", [True, False], ids=["sorted", "unsorted"])
def test_ten_million_events_tagged_exactly(ordered):
    """10M events over 40k nested spans, each tagged with its innermost span (how fast is a
    figure for bench/, not a test: this VM's speed varies)."""
    rng = np.random.default_rng(1)
    n_steps = 20_000
    step_starts = np.arange(n_steps, dtype=np.int64) * 1_000_000
    step_ends = step_starts + 900_000
    sub_starts = step_starts + 100_000
    sub_ends = sub_starts + 200_000
    starts = np.concatenate(([0], step_starts, sub_starts))
    ends = np.concatenate(([n_steps * 1_000_000], step_ends, sub_ends))
    ts = rng.integers(0, n_steps * 1_000_000 + 1000, 10_000_000)
    if ordered:
        ts.sort()
    got = innermost_span(ts, starts, ends)
    phase = ts % 1_000_000
    step = ts // 1_000_000
    expect = np.where(phase < 100_000, 1 + step,
                      np.where(phase < 300_000, 1 + n_steps + step,
                               np.where(phase < 900_000, 1 + step, 0)))
    expect[ts >= n_steps * 1_000_000] = -1
    assert np.array_equal(got, expect)


def test_self_and_total_of_nested_spans():
    """An epoch [0, 100) of pid 1 with steps [10, 20) and [20, 30); inside step 2 a
    sub-span [22, 25) opened by worker pid 2 (a child of pid 1). Self counts an event once,
    in its innermost span; total adds the subtree's."""
    from renacerd.trace.span_tagging import (
        SpanTable,
        ancestry,
        self_events,
        span_subtree,
        tag_events,
        total_events,
    )

    spans = [span_record(b"epoch", None, 1, 0, 100), span_record(b"step1", b"epoch", 1, 10, 20),
             span_record(b"step2", b"epoch", 1, 20, 30), span_record(b"load", b"step2", 2, 22, 25)]
    table = SpanTable.of(spans)
    ppid = {1: 0, 2: 1}
    assert ancestry(2, ppid) == [2, 1]
    parent_ts = np.array([5, 12, 21, 23, 40])  # events of pid 1
    worker_ts = np.array([21, 23, 24, 50])  # events of pid 2
    tags = {1: tag_events(parent_ts, table, ancestry(1, ppid)),
            2: tag_events(worker_ts, table, ancestry(2, ppid))}
    # pid 1 does not see its child's span; pid 2 sees its own and its parent's
    assert tags[1].tolist() == [0, 1, 2, 2, 0]
    assert tags[2].tolist() == [2, 3, 3, 0]
    selfs = [sum(int(self_events(t, i).sum()) for t in tags.values()) for i in range(4)]
    totals = [sum(int(total_events(t, span_subtree(table, i)).sum()) for t in tags.values())
              for i in range(4)]
    assert selfs == [3, 1, 3, 2]  # 9 events, each once
    assert totals == [9, 1, 5, 2]
    assert span_subtree(table, 2).tolist() == [2, 3]
