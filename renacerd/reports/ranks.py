"""`renacer ranks`: per step and rank, time working and waiting; each step's straggler (the
rank the others waited for) and what it did that the median rank did not."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from renacerd.client.dist_env import DistInfo
from renacerd.columns import SYSCALL_COLUMNS
from renacerd.cuda.hooks import HOOKS, SYNC
from renacerd.cuda.records import GPU_LAYOUT
from renacerd.escaping import escape
from renacerd.reports.desync import (
    COLLECTIVE_PREFIX,
    Collective,
    desync,
    nccl_collectives,
    waiting,
)
from renacerd.reports.rank_labels import label
from renacerd.store.database import RunInfo, Store
from renacerd.trace.fdtrack import (
    REPLAY_COLUMNS,
    StreamedFiles,
    fd_changes,
    fd_files,
    table_changers,
)
from renacerd.trace.gpu_trace import CommInit, comm_inits
from renacerd.trace.unified_trace import ProcessSpan, UnifiedTrace

# Calls in which a thread blocks on someone else: a lock or queue (futex), a socket or pipe
# becoming ready (poll family), data from a peer (recv family).
WAIT_SYSCALLS = frozenset("""futex futex_waitv poll ppoll select pselect6 epoll_wait epoll_pwait
    epoll_pwait2 recvfrom recvmsg recvmmsg""".split())
STEP_KEY = "experiment.step"
DEFAULT_MIN_LATE_MS = 10.0
MAX_CAUSES = 5
# A cause must explain at least this share of the lateness (and 1 ms) to be listed.
CAUSE_SHARE = 0.05
REPEAT_SHARE = 0.25  # a rank late on this share of the steps (and 2 or more) is a repeat
RESIDUAL = "(outside syscalls)"  # user-space CPU, page faults, the interpreter
_GPU_SYNC = np.array([False] + [h.kind == SYNC for h in HOOKS])
_DENSE_MAX = 1 << 25  # bins of a bincount before falling back to a sort
MAX_THREADS = 4  # ranks read at once: each holds its fd replay's input and history
# What the per-step sums read of each call (the replay reads REPLAY_COLUMNS first)
STREAM_COLUMNS = ("ts", "dur", "tid", "nr", "a0", "s0")
OWN = 1 << 40  # above any string id: where a rank's replay keeps the strings it added


@dataclass(slots=True)
class RankSteps:
    """One rank's steps: per-step totals (ns) and its per-step syscall profile."""

    rank: int
    pid: int
    dist: DistInfo
    steps: np.ndarray  # step values, in order of start
    step_ns: np.ndarray
    coll_ns: np.ndarray
    wait_sys_ns: np.ndarray
    gpu_sync_ns: np.ndarray
    syscall_ns: np.ndarray  # every call outside collectives on the step's thread
    ncoll: np.ndarray
    # sparse profile, sorted by step index: (step index, code, ns, calls); codes index `keys`
    prof_step: np.ndarray
    prof_code: np.ndarray
    prof_ns: np.ndarray
    prof_calls: np.ndarray
    keys: list[tuple[int, int]]  # code -> (syscall nr, string id of its file or -1)
    collectives: list[Collective]
    comms: list[CommInit]  # the communicators it joined (NCCL init), in order

    @property
    def wait_ns(self) -> np.ndarray:
        """Blocked on others: in collectives, waiting calls, GPU synchronisation."""
        return self.coll_ns + self.wait_sys_ns + self.gpu_sync_ns


def _attrs(sp: Any, cache: dict[str, dict]) -> dict:
    a = sp.attributes_json or "{}"
    d = cache.get(a)
    if d is None:
        d = cache[a] = orjson.loads(a)
    return d


def _step_value(v: Any) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def _factorize(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique values, code of each element), in O(n) through a bincount when keys are dense."""
    if not len(key):
        return key, np.empty(0, dtype=np.int64)
    hi = int(key.max()) + 1
    if hi <= _DENSE_MAX:
        present = np.bincount(key, minlength=hi) > 0
        uniq = np.flatnonzero(present)
        lut = np.cumsum(present) - 1
        return uniq, lut[key]
    uniq, inv = np.unique(key, return_inverse=True)
    return uniq, inv


def _latest_start(starts: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Index of the last of the sorted `starts` at or before each ts (-1: none); for sorted
    ts (the store's columns) a cumulative count of the starts passed, not a binary search
    per event."""
    if len(ts) < 2 or (ts[1:] < ts[:-1]).any():
        return np.searchsorted(starts, ts, side="right") - 1
    marks = np.bincount(np.searchsorted(ts, starts, side="left"), minlength=len(ts) + 1)
    return np.cumsum(marks[: len(ts)]) - 1


def _step_spans(spans: list[Any], cache: dict[str, dict]) -> tuple[dict[int, Any], list[Any]]:
    """The outermost span of each step (step value -> span), and the collective spans."""
    best: dict[int, Any] = {}
    colls = []
    for sp in spans:
        if sp.start_mono_nanos is None or sp.end_mono_nanos is None:
            continue
        if sp.span_name.startswith(COLLECTIVE_PREFIX):
            colls.append(sp)
            continue
        step = _step_value(_attrs(sp, cache).get(STEP_KEY))
        if step is None:
            continue
        old = best.get(step)
        if old is None or sp.end_mono_nanos - sp.start_mono_nanos > (
                old.end_mono_nanos - old.start_mono_nanos):
            best[step] = sp  # nested spans of one step: the outermost is the step
    return best, colls


def _collectives(store: Store, run: RunInfo, proc_id: int, colls: list[Any],
                 cache: dict[str, dict]) -> tuple[list[Collective], dict[str, np.ndarray]]:
    """The process's collectives by start (c10d spans and bare NCCL calls), and its GPU
    columns."""
    colls.sort(key=lambda s: s.start_mono_nanos)
    calls = [Collective.of(s, _attrs(s, cache), None) for s in colls]
    gcols = store.columns(run.id, proc_id, "gpu", GPU_LAYOUT)
    # NCCL calls outside c10d spans (DDP's reducer, a C++ or NCCL-only program) are
    # collectives of their own; inside one, the span already is the collective.
    calls.extend(nccl_collectives(gcols, [(c.start_ns, c.end_ns) for c in calls]))
    calls.sort(key=lambda c: c.start_ns)
    return calls, gcols


def _gpu_sync_ns(gcols: dict[str, np.ndarray], n: int,
                 on_step_thread: Callable[..., tuple[np.ndarray, np.ndarray]],
                 outside_collectives: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Per step, the time its thread spent in GPU synchronisation outside collectives."""
    gpu_sync_ns = np.zeros(n, dtype=np.int64)
    if len(gcols["ts"]):
        fn = gcols["fn"].astype(np.int64)
        gk, gsel = on_step_thread(gcols["ts"], gcols["tid"])
        gsel &= _GPU_SYNC[np.minimum(fn, len(_GPU_SYNC) - 1)] & outside_collectives(gcols["ts"])
        gpu_sync_ns = np.bincount(gk[gsel], weights=gcols["dur"][gsel].astype(np.float64),
                                  minlength=n).astype(np.int64)
    return gpu_sync_ns


def _replay_input(store: Store, index: list[tuple[int, int, int, int]], t: UnifiedTrace
                  ) -> None:
    """Fill t.columns with only the calls that can change the process's fd table (and only
    the columns the replay reads), in the order Store.columns gives them: the replay of
    these is the whole trace's (fdtrack.fd_changes)."""
    changers = table_changers(t.table)
    # overlapping chunks: Store.columns sorts the whole by ts (stable) if it is out of order
    overlap = any(index[i][2] < index[i - 1][3] for i in range(1, len(index)))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in REPLAY_COLUMNS}
    last, descends = None, False
    for ch in store.stored_chunks(index):
        c = ch.columns(("ret", "nr", "ts") if overlap else ("ret", "nr"))
        if overlap and len(c["ts"]):
            descends |= bool((last is not None and c["ts"][0] < last)
                             or (np.diff(c["ts"]) < 0).any())
            last = int(c["ts"][-1])
        sel = np.flatnonzero(changers[c["nr"]] & (c["ret"] >= 0))
        if len(sel):
            c.update(ch.columns(name for name in REPLAY_COLUMNS if name not in c))
            for name in REPLAY_COLUMNS:
                parts[name].append(c[name][sel])
    dtypes = dict(SYSCALL_COLUMNS)
    t.columns = {name: np.concatenate(v) if v else np.empty(0, dtype=dtypes[name])
                 for name, v in parts.items()}
    if descends:
        order = np.argsort(t.columns["ts"], kind="stable")
        t.columns = {k: v[order] for k, v in t.columns.items()}


Calls = dict[str, np.ndarray]  # the calls kept of some chunks: k (step index) and columns


def _kept_calls(c: dict[str, np.ndarray],
                on_step_thread: Callable[..., tuple[np.ndarray, np.ndarray]],
                outside_collectives: Callable[[np.ndarray], np.ndarray]) -> Calls:
    """The calls of one chunk on a step's thread outside collectives."""
    ts = c["ts"]
    k, sel = on_step_thread(ts, c["tid"])
    sel &= outside_collectives(ts)
    idx = np.flatnonzero(sel)
    return {"k": k[idx], **{name: c[name][idx] for name in STREAM_COLUMNS if name != "tid"}}


def _add_calls(acc: StepCalls, calls: Calls, files: Callable[..., np.ndarray],
               base: int | None = None) -> None:
    """Add calls to the sums, each call's file named as everywhere else (fdtrack's replay:
    `files`); with `base`, ids from `base` on are the replay's own new strings, kept apart
    (as OWN + their index) until they have ids in the run's table."""
    fdp = files(calls["nr"], calls["a0"], calls["ts"]).astype(np.int64)
    if base is not None:
        fdp = np.where(fdp >= base, fdp + (OWN - base), fdp)
    path = np.where(fdp >= 0, fdp, calls["s0"]).astype(np.int64)
    acc.add(calls["k"], calls["dur"].astype(np.int64), calls["nr"].astype(np.int64), path)


class RunStrings:
    """The run's string table, shared by the ranks' replays: each adds its new strings in
    its turn (process order), so they get the ids one replay after another would give."""

    def __init__(self, strings: list[bytes]) -> None:
        self.strings = strings
        self._ids: dict[bytes, int] = {}
        self._seen = 0

    def merge(self, new: list[bytes]) -> np.ndarray:
        """The ids in the table of `new` (strings a replay added to its copy), added to it
        where missing."""
        for i in range(self._seen, len(self.strings)):
            self._ids[self.strings[i]] = i  # the last of equal strings, as _Interner has it
        out = np.empty(len(new), dtype=np.int64)
        for j, b in enumerate(new):
            i = self._ids.get(b)
            if i is None:
                i = self._ids[b] = len(self.strings)
                self.strings.append(b)
            out[j] = i
        self._seen = len(self.strings)
        return out


def _rank_trace(run: RunInfo, p: ProcessSpan, strings: list[bytes]) -> UnifiedTrace:
    """An empty trace of the process, for fdtrack."""
    t = UnifiedTrace(p.pid, p.name)
    t.process = p
    t.strings = strings
    if run.syscall_table:
        t.table = run.syscall_table
    return t


def _step_syscalls(store: Store, run: RunInfo, proc_id: int, p: ProcessSpan,
                   strings: RunStrings, n: int, turn: AbstractContextManager,
                   on_step_thread: Callable[..., tuple[np.ndarray, np.ndarray]],
                   outside_collectives: Callable[[np.ndarray], np.ndarray]) -> StepCalls:
    """Per step, the calls on its thread outside collectives, the chunks streamed (a few
    columns each) through the fd replay; its new strings join the run's in `turn`."""
    index = store.chunk_index(run.id, proc_id)
    acc = StepCalls(n, run.syscall_table)
    if any(index[i][2] < index[i - 1][3] for i in range(1, len(index))):
        # overlapping chunks: the replay needs the calls in time order, all first
        t = _rank_trace(run, p, strings.strings)
        _replay_input(store, index, t)
        with turn:
            changes = fd_changes(t)
        t.columns = {}
        for ch in store.stored_chunks(index):
            _add_calls(acc, _kept_calls(ch.columns(STREAM_COLUMNS), on_step_thread,
                                        outside_collectives),
                       lambda nr, a0, ts: fd_files(changes, t.table, nr, a0, ts))
        return acc
    t = _rank_trace(run, p, list(strings.strings))
    base = len(t.strings)
    sf = StreamedFiles(t)
    held: list[Calls] = []
    firsts = [r[2] for r in index[1:]] + [None]
    for ch, horizon in zip(store.stored_chunks(index), firsts):
        c = ch.columns(set(STREAM_COLUMNS) | set(REPLAY_COLUMNS))
        sf.feed(c)
        calls = _kept_calls(c, on_step_thread, outside_collectives)
        if held:
            calls = {name: np.concatenate([h[name] for h in held] + [v])
                     for name, v in calls.items()}
        held = []
        if horizon is not None and len(calls["ts"]) and calls["ts"][-1] >= horizon:
            # a later chunk's change at the same ts may still name these calls' files
            late = calls["ts"] >= horizon
            held = [{name: v[late] for name, v in calls.items()}]
            calls = {name: v[~late] for name, v in calls.items()}
        _add_calls(acc, calls, sf.files, base)
    with turn:
        acc.remap(strings.merge(t.strings[base:]))
    return acc


def _syscall_profile(k: np.ndarray, dur: np.ndarray, nr: np.ndarray, path: np.ndarray,
                     counts: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]],
                                int]:
    """The sparse (step, code) profile: (rows, ns, calls, keys, codes per step); `counts`:
    how many calls each element stands for (1 each when None)."""
    # (nr, file) -> code through compact path ids, then (step, code) -> profile row
    upath, cpath = _factorize(path + 1)
    span = int(nr.max()) + 1 if len(nr) else 1
    ukey, code = _factorize(cpath * span + nr)
    keys = [(int(u % span), int(upath[u // span]) - 1) for u in ukey.tolist()]
    ncode = max(len(keys), 1)
    ustep, row = _factorize(k * ncode + code)
    ns = np.bincount(row, weights=dur).astype(np.int64)
    calls = (np.bincount(row) if counts is None else np.bincount(row, weights=counts)
             ).astype(np.int64)
    return ustep, ns, calls, keys, ncode


def _profile_part(k: np.ndarray, dur: np.ndarray, nr: np.ndarray, path: np.ndarray
                  ) -> tuple[np.ndarray, ...]:
    """Some calls' (step, nr, file, ns, calls) sums, to be summed again with the others."""
    ustep, ns, calls, keys, ncode = _syscall_profile(k, dur, nr, path)
    kv = np.array(keys, dtype=np.int64).reshape(-1, 2)
    code = ustep % ncode
    return ustep // ncode, kv[code, 0], kv[code, 1], ns, calls


class StepCalls:
    """Per step, a rank's calls on the step's thread outside collectives, summed chunk by
    chunk into the (syscall, file) profile, which gives the time in all calls and in
    waiting ones."""

    def __init__(self, n: int, syscall_table: dict[int, str]) -> None:
        self.n = n
        self.wait_lut = np.zeros(max(max(syscall_table, default=0) + 1, 1 << 16), dtype=bool)
        self.wait_lut[[nr for nr, name in syscall_table.items() if name in WAIT_SYSCALLS]] = True
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, k: np.ndarray, dur: np.ndarray, nr: np.ndarray, path: np.ndarray) -> None:
        """Calls: (step index, ns, syscall nr, file's string id) of each."""
        if len(k):
            self.parts.append(_profile_part(k, dur, nr, path))

    def remap(self, ids: np.ndarray) -> None:
        """Give the replay's own strings (paths OWN + i) their ids in the run's table."""
        for part in self.parts:
            own = part[2] >= OWN
            if own.any():
                part[2][own] = ids[part[2][own] - OWN]

    def profile(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]], int]:
        """_syscall_profile of all the calls added."""
        if not self.parts:
            e = np.empty(0, dtype=np.int64)
            return _syscall_profile(e, e, e, e)
        k, nr, path, ns, calls = (np.concatenate(x) for x in zip(*self.parts))
        return _syscall_profile(k, ns, nr, path, calls)

    def totals(self, ustep: np.ndarray, ns: np.ndarray, keys: list[tuple[int, int]],
               ncode: int) -> tuple[np.ndarray, np.ndarray]:
        """(ns in waiting calls, ns in all calls) per step, from the profile (integer sums:
        what a bincount over the calls gives, exact below 2**53 ns)."""
        k, code = ustep // ncode, ustep % ncode
        nrs = np.array([nr for nr, _ in keys], dtype=np.int64)
        w = self.wait_lut[nrs[code]]
        return (np.bincount(k[w], weights=ns[w], minlength=self.n).astype(np.int64),
                np.bincount(k, weights=ns, minlength=self.n).astype(np.int64))


def _rank_steps(store: Store, run: RunInfo, proc_id: int, p: ProcessSpan, spans: list[Any],
                strings: RunStrings, cache: dict[str, dict],
                turn: AbstractContextManager) -> RankSteps | None:
    """Per-step totals and profile of one rank process (None: it has no step spans)."""
    best, colls = _step_spans(spans, cache)
    if not best:
        return None
    order = sorted(best.values(), key=lambda s: s.start_mono_nanos)
    steps = np.array([_step_value(_attrs(s, cache)[STEP_KEY]) for s in order], dtype=np.int64)
    starts = np.array([s.start_mono_nanos for s in order], dtype=np.int64)
    ends = np.array([s.end_mono_nanos for s in order], dtype=np.int64)
    tids = np.array([s.thread_id or 0 for s in order], dtype=np.int64)
    n = len(order)

    calls, gcols = _collectives(store, run, proc_id, colls, cache)
    cs = np.array([c.start_ns for c in calls], dtype=np.int64)
    ce = np.array([c.end_ns for c in calls], dtype=np.int64)
    ck = np.searchsorted(starts, cs, side="right") - 1
    cin = (ck >= 0) & (cs < ends[np.maximum(ck, 0)])
    coll_ns = np.bincount(ck[cin], weights=(ce - cs)[cin], minlength=n).astype(np.int64)
    ncoll = np.bincount(ck[cin], minlength=n).astype(np.int64)
    for c, k, ok in zip(calls, ck.tolist(), cin.tolist()):
        c.step = int(steps[k]) if ok else None
    collectives = calls
    ce_reach = np.maximum.accumulate(ce) if len(ce) else ce  # async collectives may overlap

    def outside_collectives(ts: np.ndarray) -> np.ndarray:
        if not len(cs):
            return np.ones(len(ts), dtype=bool)
        j = _latest_start(cs, ts)
        return ~((j >= 0) & (ts < ce_reach[np.maximum(j, 0)]))

    def on_step_thread(ts: np.ndarray, tid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = _latest_start(starts, ts)
        kk = np.maximum(k, 0)
        return kk, (k >= 0) & (ts < ends[kk]) & (tid.astype(np.int64) == tids[kk])

    gpu_sync_ns = _gpu_sync_ns(gcols, n, on_step_thread, outside_collectives)
    comms = comm_inits(gcols)
    del gcols

    acc = _step_syscalls(store, run, proc_id, p, strings, n, turn, on_step_thread,
                         outside_collectives)
    ustep, ns, calls, keys, ncode = acc.profile()
    wait_sys_ns, syscall_ns = acc.totals(ustep, ns, keys, ncode)
    step_ns = ends - starts
    return RankSteps(
        rank=p.dist.rank, pid=p.pid, dist=p.dist, steps=steps, step_ns=step_ns,
        coll_ns=coll_ns, wait_sys_ns=wait_sys_ns, gpu_sync_ns=gpu_sync_ns,
        syscall_ns=syscall_ns, ncoll=ncoll, prof_step=ustep // ncode,
        prof_code=ustep % ncode, prof_ns=ns, prof_calls=calls, keys=keys,
        collectives=collectives, comms=comms)


def load_ranks(store: Store, run: RunInfo, strings: list[bytes] | None = None
               ) -> list[RankSteps]:
    """Every rank process of the run that has step spans, by rank (MAX_THREADS at a time,
    each streamed chunk by chunk); files that the fd replay names are added to `strings`
    (the run's string table)."""
    procs = store.processes(run.id)
    spans = store.span_records(run.id)
    gpu = {p.pid: store.columns(run.id, pid_, "gpu", GPU_LAYOUT) for pid_, p in procs}
    label([p for _, p in procs], spans, gpu)
    del gpu
    if strings is None:
        strings = store.strings(run.id)
    by_pid: dict[int, list[Any]] = {}
    for sp in spans:
        by_pid.setdefault(sp.process_id, []).append(sp)
    cache: dict[str, dict] = {}
    todo = [(proc_id, p) for proc_id, p in procs
            if p.dist is not None and p.dist.rank is not None and p.pid in by_pid]
    turns = _Turns(len(todo))
    table = RunStrings(strings)

    def one(i: int) -> RankSteps | None:
        proc_id, p = todo[i]
        with turns.last(i):
            return _rank_steps(store, run, proc_id, p, by_pid[p.pid], table, cache,
                               turns.turn(i))

    # numpy, zstd and SQLite let go of the GIL: ranks side by side, each streamed
    workers = max(1, min(MAX_THREADS, os.cpu_count() or 1, len(todo)))
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(one, range(len(todo))))
    out: dict[int, RankSteps] = {}
    for rs in done:
        # a wrapper (sh -c) and its python share a rank: the one with more steps is the rank
        if rs is not None and (rs.rank not in out or len(rs.steps) > len(out[rs.rank].steps)):
            out[rs.rank] = rs
    return [out[r] for r in sorted(out)]


class _Turns:
    """The ranks' fd replays one at a time, in process order: they add the files they name
    to the run's one string table, whose new ids must not hang on the threads' timing."""

    def __init__(self, n: int) -> None:
        self.done = [threading.Event() for _ in range(n)]

    @contextmanager
    def turn(self, i: int) -> Iterator[None]:
        """Wait for process i-1's replay, then replay process i."""
        if i:
            self.done[i - 1].wait()
        try:
            yield
        finally:
            self.done[i].set()

    @contextmanager
    def last(self, i: int) -> Iterator[None]:
        """Around all of process i's work: its turn ends even if it never came (no step
        spans, an error)."""
        try:
            yield
        finally:
            if i:
                self.done[i - 1].wait()
            self.done[i].set()


def _ops_by_step(calls: list[Collective]) -> dict[int, dict[str, int]]:
    """step -> {op: calls} of one rank's collectives."""
    out: dict[int, dict[str, int]] = {}
    for c in calls:
        if c.step is not None:
            d = out.setdefault(c.step, {})
            d[c.op] = d.get(c.op, 0) + 1
    return out


def _ms(ns: float) -> float:
    return round(float(ns) / 1e6, 3)


Profile = dict[tuple[str, str | None], tuple[int, int]]  # (syscall, file) -> (ns, calls)
# step values -> for each rank (in the report's order), its profile of that step
ProfileSource = Callable[[list[int]], dict[int, list[Profile]]]


def _profile(rs: RankSteps, k: int, table: dict[int, str], strings: list[bytes]) -> Profile:
    """(syscall, file) -> (ns, calls) of one rank's step index k."""
    a, b = np.searchsorted(rs.prof_step, [k, k + 1])
    out: Profile = {}
    for c, ns, n in zip(rs.prof_code[a:b], rs.prof_ns[a:b], rs.prof_calls[a:b]):
        nr, sid = rs.keys[int(c)]
        path = strings[sid].decode("utf-8", "surrogateescape") if 0 <= sid < len(
            strings) else None
        out[(table.get(nr, f"syscall_{nr}"), path)] = (int(ns), int(n))
    return out


def local_profiles(ranks: list[RankSteps], table: dict[int, str], strings: list[bytes]
                   ) -> ProfileSource:
    """The ProfileSource of ranks loaded from the local store (their sparse profiles)."""
    def source(steps: list[int]) -> dict[int, list[Profile]]:
        out = {}
        for step in steps:
            profs = []
            for rs in ranks:
                k = np.flatnonzero(rs.steps == step)
                profs.append(_profile(rs, int(k[0]), table, strings) if len(k) else {})
            out[step] = profs
        return out
    return source


def _causes(profs: list[Profile], resid: list[int], s: int, late_ns: float
            ) -> list[dict[str, Any]]:
    """What rank s did in its step that the median of the others did not, largest first."""
    others = [i for i in range(len(profs)) if i != s]
    floor = max(1e6, CAUSE_SHARE * late_ns)
    out = []
    for key, (ns, calls) in profs[s].items():
        excess = ns - float(np.median([profs[i].get(key, (0, 0))[0] for i in others]))
        if excess >= floor:
            syscall, path = key
            out.append({"syscall": syscall, "path": path,
                        "ms": _ms(excess), "calls": calls, "total_ms": _ms(ns)})
    excess = resid[s] - float(np.median([resid[i] for i in others]))
    if excess >= floor:
        out.append({"syscall": RESIDUAL, "path": None, "ms": _ms(excess), "calls": 0,
                    "total_ms": _ms(resid[s])})
    out.sort(key=lambda c: -c["ms"])
    return out[:MAX_CAUSES]


def rank_entry(rs: RankSteps) -> dict[str, Any]:
    """The `ranks` item of one rank."""
    return {"rank": rs.rank, "local_rank": rs.dist.local_rank,
            "world_size": rs.dist.world_size, "pid": rs.pid, "host": rs.dist.host,
            "job_id": rs.dist.job_id, "group_rank": rs.dist.group_rank,
            "source": rs.dist.source, "steps": len(rs.steps),
            "comms": [{"comm_id": c.comm_id, "rank": c.rank, "nranks": c.nranks,
                       "group": c.group} for c in rs.comms]}


def ranks_data(store: Store, run: RunInfo, min_late_ms: float = DEFAULT_MIN_LATE_MS
               ) -> dict[str, Any]:
    """The `renacer ranks --json` contract (more keys than the contract are fine)."""
    strings = store.strings(run.id)
    ranks = load_ranks(store, run, strings)
    base = {"run": run.name, "status": run.status, "min_late_ms": min_late_ms,
            "ranks": [rank_entry(rs) for rs in ranks]}
    by_rank = {rs.rank: rs.collectives for rs in ranks}
    return steps_report(ranks, base, min_late_ms, desync(by_rank), waiting(by_rank),
                        [_ops_by_step(rs.collectives) for rs in ranks],
                        local_profiles(ranks, run.syscall_table, strings))


def _step_index(ranks: list[RankSteps], all_steps: np.ndarray) -> np.ndarray:
    """at[r, j]: index of step all_steps[j] in rank r's arrays, -1 where the rank lacks it."""
    R, S = len(ranks), len(all_steps)
    at = np.full((R, S), -1, dtype=np.int64)
    for r, rs in enumerate(ranks):
        order = np.argsort(rs.steps, kind="stable")
        pos = np.searchsorted(rs.steps[order], all_steps)
        pos = np.minimum(pos, len(order) - 1)
        hit = rs.steps[order][pos] == all_steps
        at[r, hit] = order[pos[hit]]
    return at


def _grid(ranks: list[RankSteps], at: np.ndarray, name: str) -> np.ndarray:
    """(rank, step) grid of one RankSteps array, NaN where the rank lacks the step."""
    g = np.full(at.shape, np.nan)
    for r, rs in enumerate(ranks):
        ok = at[r] >= 0
        g[r, ok] = getattr(rs, name)[at[r, ok]]
    return g


def _late_steps(ranks: list[RankSteps], at: np.ndarray, all_steps: np.ndarray,
                min_late_ms: float, ds: dict[str, Any] | None
                ) -> tuple[np.ndarray, ...]:
    """(full, straggler, late ns, is late, everyone slow, after desync), one per step."""
    R, S = at.shape
    step_g, wait_g, coll_g, ncoll_g = _grid(ranks, at, "step_ns"), _grid(ranks, at, "wait_ns"), \
        _grid(ranks, at, "coll_ns"), _grid(ranks, at, "ncoll")
    work_g = step_g - wait_g
    # The straggler: the rank that waited least in the step's collectives; the others'
    # median wait beyond its own is how late it was.
    full = (at >= 0).all(axis=0) & (np.nan_to_num(ncoll_g) > 0).all(axis=0) & (R > 1)
    strag = np.argmin(np.where(np.isnan(coll_g), np.inf, coll_g), axis=0)
    rest = coll_g.copy()
    rest[strag, np.arange(S)] = np.nan
    with np.errstate(all="ignore"):
        late = np.nanmedian(rest, axis=0) - coll_g[strag, np.arange(S)] if R > 1 else \
            np.zeros(S)
    is_late = full & (np.nan_to_num(late) >= min_late_ms * 1e6)
    # everyone slow: every rank worked longer than its own median step by min_late
    med_work = np.nanmedian(work_g, axis=1, keepdims=True)
    slow = (at >= 0).all(axis=0) & (np.nan_to_num(work_g - med_work, nan=-1) >=
                                     min_late_ms * 1e6).all(axis=0) & ~is_late
    # From a desync on, the ranks pair the wrong calls: who waited for whom means nothing.
    after = all_steps >= ds["step"] if ds is not None else np.zeros(S, dtype=bool)
    is_late &= ~after
    slow &= ~after
    return full, strag, late, is_late, slow, after


def _step_ranks(ranks: list[RankSteps], at: np.ndarray, j: int, step: int,
                ops: list[dict[int, dict[str, int]]]) -> dict[str, dict[str, Any]]:
    """The `ranks` of one step's entry: per rank, its times in the step."""
    per = {}
    for r, rs in enumerate(ranks):
        if at[r, j] < 0:
            continue
        k = int(at[r, j])
        per[str(rs.rank)] = {
            "step_ms": _ms(rs.step_ns[k]), "wait_ms": _ms(rs.wait_ns[k]),
            "work_ms": _ms(rs.step_ns[k] - rs.wait_ns[k]),
            "collective_ms": _ms(rs.coll_ns[k]), "wait_syscall_ms": _ms(rs.wait_sys_ns[k]),
            "gpu_sync_ms": _ms(rs.gpu_sync_ns[k]), "collectives": int(rs.ncoll[k]),
            "ops": ops[r].get(step, {})}
    return per


def _straggler_list(ranks: list[RankSteps], strag: np.ndarray, is_late: np.ndarray,
                    full: np.ndarray) -> list[dict[str, Any]]:
    """The `stragglers`: ranks by the number of steps they were late on."""
    R = len(ranks)
    counts = np.bincount(strag[is_late], minlength=R)
    n_full = max(int(full.sum()), 1)
    return [{"rank": ranks[r].rank, "steps": int(counts[r]),
             "share": round(float(counts[r]) / n_full, 4),
             "repeat": bool(counts[r] >= 2 and counts[r] / n_full >= REPEAT_SHARE)}
            for r in np.argsort(-counts, kind="stable").tolist() if counts[r]]


def steps_report(ranks: list[RankSteps], base: dict[str, Any], min_late_ms: float,
                 ds: dict[str, Any] | None, waits: list[dict[str, Any]],
                 ops: list[dict[int, dict[str, int]]], profiles: ProfileSource
                 ) -> dict[str, Any]:
    """Stragglers, causes and slow steps from per-step per-rank aggregates (RankSteps, from
    the local store or ClickHouse's SQL); `ds`, `waits` and `ops` (per rank: step -> {op:
    calls}) come with them, `profiles` gives the per-step syscall profiles asked for."""
    if not ranks:
        return {**base, "steps": [], "stragglers": [], "slow_steps": [], "desync": None,
                "waiting": []}
    all_steps = np.unique(np.concatenate([rs.steps for rs in ranks]))
    at = _step_index(ranks, all_steps)
    full, strag, late, is_late, slow, after = _late_steps(ranks, at, all_steps, min_late_ms,
                                                          ds)
    late_steps = [int(all_steps[j]) for j in np.flatnonzero(is_late).tolist()]
    profs = profiles(late_steps) if late_steps else {}
    steps_out = []
    for j, step in enumerate(all_steps.tolist()):
        per = _step_ranks(ranks, at, j, step, ops)
        straggler = None
        if is_late[j]:
            s = int(strag[j])
            resid = [int(rs.step_ns[k] - rs.coll_ns[k] - rs.syscall_ns[k] - rs.gpu_sync_ns[k])
                     for rs, k in zip(ranks, at[:, j].tolist())]
            straggler = {"rank": ranks[s].rank, "late_ms": _ms(late[j]),
                         "causes": _causes(profs[step], resid, s, float(late[j]))}
        steps_out.append({"step": step, "ranks": per, "straggler": straggler,
                          "everyone_slow": bool(slow[j]), "after_desync": bool(after[j])})
    stragglers = _straggler_list(ranks, strag, is_late, full)
    return {**base, "steps": steps_out, "stragglers": stragglers,
            "slow_steps": all_steps[slow].tolist(), "desync": ds, "waiting": waits}


def render_ranks(d: dict[str, Any], out) -> None:
    """Human report: ranks, then one line per step with the straggler and its causes."""
    w = out.write
    w(f"run {escape(d['run'])}  status {d['status']}: {len(d['ranks'])} ranks, "
      f"{len(d['steps'])} steps (late = others waited >= {d['min_late_ms']:g} ms)\n")
    if not d["ranks"]:
        w("no rank processes with step spans (RANK in the environment, or the client's "
          "hello, and experiment_span(..., step=N))\n")
        return
    for r in d["ranks"]:
        w(f"  rank {r['rank']}/{r['world_size']} local {r['local_rank']}  pid {r['pid']}  "
          f"host {escape(r['host'] or '?')}  job {escape(r['job_id'] or '?')}  "
          f"({r['source']}, {r['steps']} steps)\n")
    _render_offsets(d.get("clock_offsets"), w)
    names = [str(r["rank"]) for r in d["ranks"]]
    w(f"\n{'step':>8} " + " ".join(f"{'r' + n + ' ms (wait)':>18}" for n in names)
      + "  straggler\n")
    for s in d["steps"]:
        cells = []
        for n in names:
            c = s["ranks"].get(n)
            cells.append(f"{c['step_ms']:>9.1f} ({c['wait_ms']:>6.1f})" if c else f"{'-':>18}")
        tail = ""
        if s["straggler"]:
            st = s["straggler"]
            why = "; ".join(
                f"{escape(c['syscall'])}{' of ' + escape(c['path']) if c['path'] else ''} "
                f"{c['ms']:.1f} ms" + (f" across {c['calls']:,} calls" if c["calls"] > 1 else "")
                for c in st["causes"][:3]) or "no single cause"
            tail = f"rank {st['rank']} late {st['late_ms']:.1f} ms: {why}"
        elif s["everyone_slow"]:
            tail = "everyone slow (a shared cause)"
        elif s["after_desync"]:
            tail = "after the desync"
        w(f"{s['step']:>8} " + " ".join(cells) + f"  {tail}\n")
    for st in d["stragglers"]:
        if st["repeat"]:
            w(f"!! rank {st['rank']} was the straggler on {st['steps']} steps "
              f"({100 * st['share']:.0f}%)\n")
    ds = d["desync"]
    if ds:
        w(f"!! DESYNC at step {ds['step']}, collective #{ds['position']}: ")
        w("; ".join(f"rank {r}: {_call(c)}" for r, c in ds["calls"].items()) + "\n")
    for wt in d["waiting"]:
        how = "never left" if wt["unfinished"] else "failed in"
        first = (wt["status_message"] or "").split("\n", 1)[0][:160]
        w(f"!! rank {wt['rank']} {how} {wt['op']} #{wt['seq']} (step {wt['step']}): "
          f"{escape(first)}\n")


def _render_offsets(offsets: list[dict[str, Any]] | None, w: Callable[[str], Any]) -> None:
    """Per host, its clock's offset from the reference host's (a job read from ClickHouse)."""
    for o in offsets or []:
        what = "reference clock" if o["reference"] else f"clock {o['offset_ms']:+.3f} ms"
        w(f"  host {escape(o['host'])}: {what} (from {o['collectives']} collective exits)\n")


def _call(c: dict[str, Any] | None) -> str:
    if c is None:
        return "nothing"
    return f"{c['op']}({c['numel']} x {c['dtype']}, group {c['group']})"
