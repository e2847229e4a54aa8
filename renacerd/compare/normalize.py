"""Normalisation before comparing: drop nondeterministic calls, canonical threads, step segments.

What is dropped (on by default, `--raw` turns it off), and why:
- futex, sched_yield: lock contention and scheduling, not program logic;
- clock_* (gettime, getres, nanosleep, ...), time, gettimeofday: reading or waiting on
  the clock, repeated as often as the scheduler and the vDSO fallback decide;
- getrandom: how often the C library refills its pool depends on timing;
- poll, ppoll, epoll_wait, epoll_pwait, epoll_pwait2, select, pselect6: how many times a
  wait loop spins depends on when data arrives;
- restart_syscall: the kernel's re-entry of an interrupted sleep;
- calls failing with EAGAIN/EWOULDBLOCK or EINTR (and the kernel-internal ERESTART*
  codes seen at sys_exit): retries whose count depends on timing.
Threads are renamed 0, 1, 2... in order of their first syscall (creation order), never by tid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from renacerd.records import LIFECYCLE_MIN
from renacerd.trace.unified_trace import UnifiedTrace

NONDETERMINISTIC = frozenset(
    """futex futex_wait futex_wake futex_requeue futex_waitv sched_yield time gettimeofday
    getrandom poll ppoll epoll_wait epoll_pwait epoll_pwait2 select pselect6
    restart_syscall""".split()
)
# -EAGAIN, -EINTR, and ERESTARTSYS/ERESTARTNOINTR/ERESTARTNOHAND/ERESTART_RESTARTBLOCK
RETRY_ERRNOS = (11, 4, 512, 513, 514, 516)


def is_nondeterministic(name: str) -> bool:
    """The call is dropped by normalisation whatever it returned."""
    return name in NONDETERMINISTIC or name.startswith("clock_")


class Vocab:
    """Syscall name -> small int code, shared by both sides so kernels' numbering never matters."""

    __slots__ = ("codes", "names")

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.names: list[str] = []

    def code(self, name: str) -> int:
        """The code of `name`, assigned on first sight (codes start at 1)."""
        c = self.codes.get(name)
        if c is None:
            self.names.append(name)
            c = self.codes[name] = len(self.names)
        return c

    def name(self, code: int) -> str:
        """Inverse of code()."""
        return self.names[code - 1]

    def lut(self, table: dict[int, str]) -> np.ndarray:
        """nr -> code for a run's syscall table (unknown numbers get `syscall_<nr>` codes)."""
        lut = np.zeros(0x10000, dtype=np.int32)
        for nr, name in table.items():
            if 0 <= nr < LIFECYCLE_MIN:
                lut[nr] = self.code(name)
        return lut


@dataclass(slots=True)
class NormTrace:
    """One process's events as compared: indices into the trace and their keys."""

    trace: UnifiedTrace
    idx: np.ndarray  # int64 indices of kept events into trace.columns
    codes: np.ndarray  # int32 name codes
    thread: np.ndarray  # int32 canonical thread (creation order), 0 when raw
    segment: np.ndarray  # int32 step segment: 0 before the first step, 2k+1 inside step k
    steps: list[str]  # label of step k (its experiment.step, or its ordinal)
    step_bounds: np.ndarray  # int64 [start0, end0, start1, end1, ...]
    dropped: int  # events removed by normalisation

    def __len__(self) -> int:
        return len(self.idx)

    def dur(self) -> np.ndarray:
        """Duration of each kept event (ns)."""
        return self.trace.columns["dur"][self.idx]


def step_spans(trace: UnifiedTrace) -> tuple[np.ndarray, list[str]]:
    """Top-level spans of this process as flat [start, end, ...] bounds plus their labels."""
    pids = {trace.pid, trace.process.nspid}
    # a zero monotonic start means the span came without CLOCK_MONOTONIC bounds
    spans = [s for s in trace.spans if getattr(s, "process_id", None) in pids
             and getattr(s, "start_mono_nanos", 0)]
    ids = {s.span_id for s in spans}
    top = sorted((s for s in spans if s.parent_span_id not in ids),
                 key=lambda s: (s.start_mono_nanos, s.span_id))
    bounds: list[int] = []
    labels: list[str] = []
    last_end = -1
    for i, s in enumerate(top):
        start = int(s.start_mono_nanos)
        end = int(s.end_mono_nanos or np.iinfo(np.int64).max)  # 0: never ended
        if start < last_end:
            # overlapping top-level spans (e.g. two threads): the later one starts a new step
            start = last_end
        if end <= start:
            end = start + 1
        bounds += [start, end]
        last_end = end
        labels.append(_step_label(s, i))
    return np.array(bounds, dtype=np.int64), labels


def _step_label(span, ordinal: int) -> str:
    try:
        attrs = orjson.loads(span.attributes_json or "{}")
    except orjson.JSONDecodeError:
        attrs = {}
    step = attrs.get("experiment.step") if isinstance(attrs, dict) else None
    name = span.span_name or "span"
    return f"{name} step {step}" if step is not None else f"{name} #{ordinal}"


def canonical_threads(tid: np.ndarray) -> np.ndarray:
    """Thread index by order of first syscall: the main thread is 0, the next one created 1..."""
    if not len(tid):
        return np.empty(0, dtype=np.int32)
    uniq, first, inv = np.unique(tid, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int32)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq), dtype=np.int32)
    return rank[inv]


def normalize(trace: UnifiedTrace, vocab: Vocab, *, raw: bool = False) -> NormTrace:
    """The events of `trace` that take part in the comparison, with their chunk keys."""
    c = trace.columns
    n = len(trace)
    lut = vocab.lut(trace.table)
    nr = c["nr"]
    keep = nr < LIFECYCLE_MIN
    if not raw and n:
        drop_nrs = [k for k, name in trace.table.items() if is_nondeterministic(name)]
        keep &= ~np.isin(nr, np.array(drop_nrs, dtype=nr.dtype))
        keep &= ~np.isin(c["ret"], -np.array(RETRY_ERRNOS, dtype=np.int64))
    idx = np.flatnonzero(keep)
    # numbers missing from the table still compare by number, never as one shared code
    missing = np.unique(nr[idx][lut[nr[idx]] == 0])
    for m in missing:
        lut[m] = vocab.code(f"syscall_{int(m)}")
    codes = lut[nr[idx]]
    thread = (np.zeros(len(idx), dtype=np.int32) if raw
              else canonical_threads(c["tid"])[idx])
    bounds, labels = step_spans(trace)
    segment = np.searchsorted(bounds, c["ts"][idx], side="right").astype(np.int32)
    return NormTrace(trace, idx, codes, thread, segment, labels, bounds, n - len(idx))
