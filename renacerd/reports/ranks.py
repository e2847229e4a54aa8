"""`renacer ranks`: per step and rank, time working and waiting; each step's straggler (the
rank the others waited for) and what it did that the median rank did not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from renacerd.client.dist_env import DistInfo
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
from renacerd.trace.fdtrack import fd_path_ids
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


def _step_spans(spans: list[Any], cache: dict[str, dict]) -> tuple[list[Any], list[Any]]:
    """(the step spans in order of start, the collective spans) of one rank's spans."""
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
    return sorted(best.values(), key=lambda s: s.start_mono_nanos), colls


@dataclass(slots=True)
class _Windows:
    """A rank's step spans and collective calls, to place its events in them."""

    starts: np.ndarray
    ends: np.ndarray
    tids: np.ndarray
    coll_starts: np.ndarray
    coll_reach: np.ndarray  # the latest end of a collective so far: async ones may overlap

    def outside_collectives(self, ts: np.ndarray) -> np.ndarray:
        """Which of the sorted ts fall outside every collective call."""
        if not len(self.coll_starts):
            return np.ones(len(ts), dtype=bool)
        j = _latest_start(self.coll_starts, ts)
        return ~((j >= 0) & (ts < self.coll_reach[np.maximum(j, 0)]))

    def on_step_thread(self, ts: np.ndarray, tid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(step index, inside that step on its own thread) of each event."""
        k = _latest_start(self.starts, ts)
        kk = np.maximum(k, 0)
        return kk, (k >= 0) & (ts < self.ends[kk]) & (tid.astype(np.int64) == self.tids[kk])


def _collectives(colls: list[Any], gcols: dict[str, np.ndarray], cache: dict[str, dict],
                 steps: np.ndarray, starts: np.ndarray, ends: np.ndarray
                 ) -> tuple[list[Collective], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(the rank's collectives with their steps set, their starts, their reach, time in
    collectives per step, collectives per step)."""
    n = len(steps)
    colls.sort(key=lambda s: s.start_mono_nanos)
    calls = [Collective.of(s, _attrs(s, cache), None) for s in colls]
    # NCCL calls outside c10d spans (DDP's reducer, a C++ or NCCL-only program) are
    # collectives of their own; inside one, the span already is the collective.
    calls.extend(nccl_collectives(gcols, [(c.start_ns, c.end_ns) for c in calls]))
    calls.sort(key=lambda c: c.start_ns)
    cs = np.array([c.start_ns for c in calls], dtype=np.int64)
    ce = np.array([c.end_ns for c in calls], dtype=np.int64)
    ck = np.searchsorted(starts, cs, side="right") - 1
    cin = (ck >= 0) & (cs < ends[np.maximum(ck, 0)])
    coll_ns = np.bincount(ck[cin], weights=(ce - cs)[cin], minlength=n).astype(np.int64)
    ncoll = np.bincount(ck[cin], minlength=n).astype(np.int64)
    for c, k, ok in zip(calls, ck.tolist(), cin.tolist()):
        c.step = int(steps[k]) if ok else None
    ce_reach = np.maximum.accumulate(ce) if len(ce) else ce  # async collectives may overlap
    return calls, cs, ce_reach, coll_ns, ncoll


def _gpu_sync_ns(gcols: dict[str, np.ndarray], win: _Windows, n: int) -> np.ndarray:
    """Time per step in GPU synchronisation calls on the step's thread, outside collectives."""
    if not len(gcols["ts"]):
        return np.zeros(n, dtype=np.int64)
    fn = gcols["fn"].astype(np.int64)
    gk, gsel = win.on_step_thread(gcols["ts"], gcols["tid"])
    gsel &= _GPU_SYNC[np.minimum(fn, len(_GPU_SYNC) - 1)] & win.outside_collectives(gcols["ts"])
    return np.bincount(gk[gsel], weights=gcols["dur"][gsel].astype(np.float64),
                       minlength=n).astype(np.int64)


def _step_syscalls(store: Store, run: RunInfo, proc_id: int, p: ProcessSpan,
                   strings: list[bytes], win: _Windows
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(step index, duration, syscall nr, file or string id) of each call on a step's
    thread outside collectives."""
    t = UnifiedTrace(p.pid, p.name)
    t.process = p
    t.columns = store.columns(run.id, proc_id)
    t.strings = strings
    if run.syscall_table:
        t.table = run.syscall_table
    c = t.columns
    ts, dur = c["ts"], c["dur"].astype(np.int64)
    k, sel = win.on_step_thread(ts, c["tid"])
    sel &= win.outside_collectives(ts)
    idx = np.flatnonzero(sel)
    nr = c["nr"][idx].astype(np.int64)
    fdp = fd_path_ids(t)[idx]  # files named as everywhere else: fdtrack's replay
    path = np.where(fdp >= 0, fdp, c["s0"][idx]).astype(np.int64)
    return k[idx], dur[idx], nr, path


def _wait_lut(table: dict[int, str], nr: np.ndarray) -> np.ndarray:
    """Per syscall nr (every one in the table or in nr): is it a waiting call?"""
    lut = np.zeros(max(max(table, default=0), int(nr.max(initial=0))) + 1, dtype=bool)
    lut[[n_ for n_, name in table.items() if name in WAIT_SYSCALLS]] = True
    return lut


def _sparse_profile(k: np.ndarray, dur: np.ndarray, nr: np.ndarray, path: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                               list[tuple[int, int]]]:
    """(step index, code, ns, calls) rows of the per-step profile, and the codes' keys."""
    # (nr, file) -> code through compact path ids, then (step, code) -> profile row
    upath, cpath = _factorize(path + 1)
    span = int(nr.max()) + 1 if len(nr) else 1
    ukey, code = _factorize(cpath * span + nr)
    keys = [(int(u % span), int(upath[u // span]) - 1) for u in ukey.tolist()]
    ncode = max(len(keys), 1)
    ustep, row = _factorize(k * ncode + code)
    ns = np.bincount(row, weights=dur).astype(np.int64)
    calls = np.bincount(row).astype(np.int64)
    return ustep // ncode, ustep % ncode, ns, calls, keys


def _rank_steps(store: Store, run: RunInfo, proc_id: int, p: ProcessSpan, spans: list[Any],
                strings: list[bytes], cache: dict[str, dict]) -> RankSteps | None:
    """Per-step totals and profile of one rank process (None: it has no step spans)."""
    order, colls = _step_spans(spans, cache)
    if not order:
        return None
    steps = np.array([_step_value(_attrs(s, cache)[STEP_KEY]) for s in order], dtype=np.int64)
    starts = np.array([s.start_mono_nanos for s in order], dtype=np.int64)
    ends = np.array([s.end_mono_nanos for s in order], dtype=np.int64)
    tids = np.array([s.thread_id or 0 for s in order], dtype=np.int64)
    n = len(order)
    gcols = store.columns(run.id, proc_id, "gpu", GPU_LAYOUT)
    collectives, cs, ce_reach, coll_ns, ncoll = _collectives(colls, gcols, cache, steps,
                                                             starts, ends)
    win = _Windows(starts, ends, tids, cs, ce_reach)
    gpu_sync_ns = _gpu_sync_ns(gcols, win, n)
    comms = comm_inits(gcols)
    del gcols
    k, dur, nr, path = _step_syscalls(store, run, proc_id, p, strings, win)
    is_wait = _wait_lut(run.syscall_table, nr)[nr]
    wait_sys_ns = np.bincount(k[is_wait], weights=dur[is_wait], minlength=n).astype(np.int64)
    syscall_ns = np.bincount(k, weights=dur, minlength=n).astype(np.int64)
    prof_step, prof_code, prof_ns, prof_calls, keys = _sparse_profile(k, dur, nr, path)
    return RankSteps(
        rank=p.dist.rank, pid=p.pid, dist=p.dist, steps=steps, step_ns=ends - starts,
        coll_ns=coll_ns, wait_sys_ns=wait_sys_ns, gpu_sync_ns=gpu_sync_ns,
        syscall_ns=syscall_ns, ncoll=ncoll, prof_step=prof_step,
        prof_code=prof_code, prof_ns=prof_ns, prof_calls=prof_calls, keys=keys,
        collectives=collectives, comms=comms)


def load_ranks(store: Store, run: RunInfo) -> list[RankSteps]:
    """Every rank process of the run that has step spans, one at a time, by rank."""
    procs = store.processes(run.id)
    spans = store.span_records(run.id)
    gpu = {p.pid: store.columns(run.id, pid_, "gpu", GPU_LAYOUT) for pid_, p in procs}
    label([p for _, p in procs], spans, gpu)
    del gpu
    strings = store.strings(run.id)
    by_pid: dict[int, list[Any]] = {}
    for sp in spans:
        by_pid.setdefault(sp.process_id, []).append(sp)
    cache: dict[str, dict] = {}
    out: dict[int, RankSteps] = {}
    for proc_id, p in procs:
        if p.dist is None or p.dist.rank is None or p.pid not in by_pid:
            continue
        rs = _rank_steps(store, run, proc_id, p, by_pid[p.pid], strings, cache)
        # a wrapper (sh -c) and its python share a rank: the one with more steps is the rank
        if rs is not None and (rs.rank not in out or len(rs.steps) > len(out[rs.rank].steps)):
            out[rs.rank] = rs
    return [out[r] for r in sorted(out)]


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


def _profile(rs: RankSteps, k: int) -> dict[tuple[int, int], tuple[int, int]]:
    """(nr, file) -> (ns, calls) of one rank's step index k."""
    a, b = np.searchsorted(rs.prof_step, [k, k + 1])
    return {rs.keys[int(c)]: (int(ns), int(n)) for c, ns, n in
            zip(rs.prof_code[a:b], rs.prof_ns[a:b], rs.prof_calls[a:b])}


def _causes(ranks: list[RankSteps], at: list[int], s: int, late_ns: float,
            table: dict[int, str], strings: list[bytes]) -> list[dict[str, Any]]:
    """What rank s did in its step that the median of the others did not, largest first."""
    profs = [_profile(rs, k) for rs, k in zip(ranks, at)]
    resid = [int(rs.step_ns[k] - rs.coll_ns[k] - rs.syscall_ns[k] - rs.gpu_sync_ns[k])
             for rs, k in zip(ranks, at)]
    others = [i for i in range(len(ranks)) if i != s]
    floor = max(1e6, CAUSE_SHARE * late_ns)
    out = []
    for key, (ns, calls) in profs[s].items():
        excess = ns - float(np.median([profs[i].get(key, (0, 0))[0] for i in others]))
        if excess >= floor:
            nr, sid = key
            path = strings[sid].decode("utf-8", "surrogateescape") if 0 <= sid < len(
                strings) else None
            out.append({"syscall": table.get(nr, f"syscall_{nr}"), "path": path,
                        "ms": _ms(excess), "calls": calls, "total_ms": _ms(ns)})
    excess = resid[s] - float(np.median([resid[i] for i in others]))
    if excess >= floor:
        out.append({"syscall": RESIDUAL, "path": None, "ms": _ms(excess), "calls": 0,
                    "total_ms": _ms(resid[s])})
    out.sort(key=lambda c: -c["ms"])
    return out[:MAX_CAUSES]


def _rank_entry(rs: RankSteps) -> dict[str, Any]:
    """Who one rank is: its place in the job, its process, its communicators."""
    return {"rank": rs.rank, "local_rank": rs.dist.local_rank,
            "world_size": rs.dist.world_size, "pid": rs.pid, "host": rs.dist.host,
            "job_id": rs.dist.job_id, "group_rank": rs.dist.group_rank,
            "source": rs.dist.source, "steps": len(rs.steps),
            "comms": [{"comm_id": c.comm_id, "rank": c.rank, "nranks": c.nranks,
                       "group": c.group} for c in rs.comms]}


def _step_index(ranks: list[RankSteps], all_steps: np.ndarray) -> np.ndarray:
    """at[r, j]: index of step all_steps[j] in rank r's arrays, -1 where the rank lacks it."""
    at = np.full((len(ranks), len(all_steps)), -1, dtype=np.int64)
    for r, rs in enumerate(ranks):
        order = np.argsort(rs.steps, kind="stable")
        pos = np.searchsorted(rs.steps[order], all_steps)
        pos = np.minimum(pos, len(order) - 1)
        hit = rs.steps[order][pos] == all_steps
        at[r, hit] = order[pos[hit]]
    return at


def _grid(ranks: list[RankSteps], at: np.ndarray, name: str) -> np.ndarray:
    """One per-step field of every rank as a (rank, step) grid, NaN where a rank lacks it."""
    g = np.full(at.shape, np.nan)
    for r, rs in enumerate(ranks):
        ok = at[r] >= 0
        g[r, ok] = getattr(rs, name)[at[r, ok]]
    return g


def _late_and_slow(ranks: list[RankSteps], at: np.ndarray, min_late_ms: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per step: (every rank has it with collectives, the straggler's row, how late it was,
    is it late enough to tell, was everyone slow)."""
    R, S = at.shape
    step_g, wait_g, coll_g, ncoll_g = (_grid(ranks, at, name) for name in
                                       ("step_ns", "wait_ns", "coll_ns", "ncoll"))
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
    return full, strag, late, is_late, slow


def _step_cells(rs: RankSteps, k: int, ops: dict[str, int]) -> dict[str, Any]:
    """One rank's figures for its step index k."""
    return {"step_ms": _ms(rs.step_ns[k]), "wait_ms": _ms(rs.wait_ns[k]),
            "work_ms": _ms(rs.step_ns[k] - rs.wait_ns[k]),
            "collective_ms": _ms(rs.coll_ns[k]), "wait_syscall_ms": _ms(rs.wait_sys_ns[k]),
            "gpu_sync_ms": _ms(rs.gpu_sync_ns[k]), "collectives": int(rs.ncoll[k]),
            "ops": ops}


def _stragglers(ranks: list[RankSteps], strag: np.ndarray, is_late: np.ndarray,
                full: np.ndarray) -> list[dict[str, Any]]:
    """The ranks that were stragglers, most often first, and whether it repeats."""
    counts = np.bincount(strag[is_late], minlength=len(ranks))
    n_full = max(int(full.sum()), 1)
    return [{"rank": ranks[r].rank, "steps": int(counts[r]),
             "share": round(float(counts[r]) / n_full, 4),
             "repeat": bool(counts[r] >= 2 and counts[r] / n_full >= REPEAT_SHARE)}
            for r in np.argsort(-counts, kind="stable").tolist() if counts[r]]


def ranks_data(store: Store, run: RunInfo, min_late_ms: float = DEFAULT_MIN_LATE_MS
               ) -> dict[str, Any]:
    """The `renacer ranks --json` contract (more keys than the contract are fine)."""
    ranks = load_ranks(store, run)
    strings = store.strings(run.id)
    table = run.syscall_table
    base = {"run": run.name, "status": run.status, "min_late_ms": min_late_ms,
            "ranks": [_rank_entry(rs) for rs in ranks]}
    if not ranks:
        return {**base, "steps": [], "stragglers": [], "slow_steps": [], "desync": None,
                "waiting": []}
    all_steps = np.unique(np.concatenate([rs.steps for rs in ranks]))
    at = _step_index(ranks, all_steps)
    full, strag, late, is_late, slow = _late_and_slow(ranks, at, min_late_ms)
    by_rank = {rs.rank: rs.collectives for rs in ranks}
    ds = desync(by_rank)
    # From a desync on, the ranks pair the wrong calls: who waited for whom means nothing.
    after = all_steps >= ds["step"] if ds is not None else np.zeros(len(all_steps), dtype=bool)
    is_late &= ~after
    slow &= ~after
    ops = [_ops_by_step(rs.collectives) for rs in ranks]
    steps_out = []
    for j, step in enumerate(all_steps.tolist()):
        per = {str(rs.rank): _step_cells(rs, int(at[r, j]), ops[r].get(step, {}))
               for r, rs in enumerate(ranks) if at[r, j] >= 0}
        straggler = None
        if is_late[j]:
            s = int(strag[j])
            straggler = {"rank": ranks[s].rank, "late_ms": _ms(late[j]),
                         "causes": _causes(ranks, at[:, j].tolist(), s, float(late[j]),
                                           table, strings)}
        steps_out.append({"step": step, "ranks": per, "straggler": straggler,
                          "everyone_slow": bool(slow[j]), "after_desync": bool(after[j])})
    return {**base, "steps": steps_out, "stragglers": _stragglers(ranks, strag, is_late, full),
            "slow_steps": all_steps[slow].tolist(), "desync": ds, "waiting": waiting(by_rank)}


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


def _call(c: dict[str, Any] | None) -> str:
    if c is None:
        return "nothing"
    return f"{c['op']}({c['numel']} x {c['dtype']}, group {c['group']})"
