"""Benchmark compare_runs on synthetic traces of 1e5..1e7 syscalls beside renacer's O(n*m) DP.

Each trace looks like a training job: steps (one experiment span each) of a fixed syscall
pattern spread over a main thread and two loader threads, plus futex/clock noise that
normalisation drops. The candidate is the baseline with a fraction of events deleted and
as many random ones inserted. Each (size, edit rate) runs in a fresh subprocess so its peak
RSS is its own. Run: PYTHONPATH=. .venv/bin/python bench/compare.py [--sizes 1e5,1e6,1e7]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

STEP_PATTERN = (
    # main thread: fetch a batch, compute, log, checkpoint bookkeeping
    [("openat", 0), ("read", 0), ("read", 0), ("close", 0), ("mmap", 0), ("ioctl", 0)] * 6
    + [("futex", 0), ("clock_gettime", 0), ("write", 0), ("lseek", 0), ("fstat", 0)]
    + [("ioctl", 0)] * 20 + [("munmap", 0), ("futex", 0), ("getrandom", 0)]
    # loader threads
    + [("openat", 1), ("pread64", 1), ("pread64", 1), ("close", 1), ("futex", 1)] * 8
    + [("openat", 2), ("read", 2), ("mmap", 2), ("close", 2), ("sched_yield", 2)] * 8
)


def build(n: int, edit: float, seed: int, table: dict[int, str], candidate: bool):
    """A UnifiedTrace of n events (candidate: with `edit` fraction edited) and its step spans."""
    from renacerd.experiment_span import SpanRecord
    from renacerd.trace.unified_trace import UnifiedTrace

    nr_of = {v: k for k, v in table.items()}
    pat_nr = np.array([nr_of[s] for s, _ in STEP_PATTERN], dtype=np.uint16)
    pat_th = np.array([t for _, t in STEP_PATTERN], dtype=np.uint32)
    reps = -(-n // len(pat_nr))
    nr = np.tile(pat_nr, reps)[:n]
    th = np.tile(pat_th, reps)[:n]
    step = (np.arange(n) // len(pat_nr)).astype(np.int64)
    rng = np.random.default_rng(seed)
    if candidate and edit:
        k = int(n * edit / 2)
        keep = np.ones(n, dtype=bool)
        keep[rng.choice(n, k, replace=False)] = False
        nr, th, step = nr[keep], th[keep], step[keep]
        at = np.sort(rng.choice(len(nr), k, replace=False))
        pool = pat_nr[np.unique(pat_nr, return_index=True)[1]]
        nr = np.insert(nr, at, rng.choice(pool, k))
        th = np.insert(th, at, th[np.minimum(at, len(th) - 1)])
        step = np.insert(step, at, step[np.minimum(at, len(step) - 1)])
    m = len(nr)
    dur = rng.integers(200, 3000, m).astype(np.uint64)
    gap = dur.astype(np.int64) + 50
    ts = 10**12 + np.cumsum(gap) - gap  # each call starts after the previous one ended
    t = UnifiedTrace(1000 + candidate, "train")
    t.process.exit_code = 0
    t.table = table
    t.columns = {
        "ts": ts, "dur": dur, "ret": np.zeros(m, np.int64), "a0": np.zeros(m, np.uint64),
        "tid": (1000 + candidate + th * 7).astype(np.uint32), "nr": nr,
        "flags": np.zeros(m, np.uint16), "s0": np.full(m, -1, np.int32),
        "s1": np.full(m, -1, np.int32),
    }
    first = np.flatnonzero(np.r_[True, np.diff(step) != 0])
    last = np.r_[first[1:] - 1, m - 1]
    t.spans = [
        SpanRecord(trace_id=b"\1" * 16, span_id=int(i + 1).to_bytes(8, "big"),
                   parent_span_id=None, span_name="training_step", span_kind=0,
                   start_time_nanos=0, end_time_nanos=0, duration_nanos=0, logical_clock=i,
                   status_code=1, status_message="",
                   attributes_json=json.dumps({"experiment.step": int(step[f])}),
                   resource_json="{}", process_id=t.pid, thread_id=t.pid,
                   start_mono_nanos=int(ts[f]), end_mono_nanos=int(ts[e] + dur[e]))
        for i, (f, e) in enumerate(zip(first, last))
    ]
    return t


def renacer_dp(a: np.ndarray, b: np.ndarray, limit_s: float) -> tuple[int | None, float]:
    """renacer's O(n*m) LCS, one numpy row at a time (O(m) memory here; renacer's holds n*m)."""
    t0 = time.perf_counter()
    prev = np.zeros(len(b) + 1, dtype=np.int32)
    for i, x in enumerate(a):
        cand = np.maximum(prev[1:], prev[:-1] + (b == x))
        cur = np.empty_like(prev)
        cur[0] = 0
        np.maximum.accumulate(cand, out=cur[1:])
        prev = cur
        if i % 256 == 0 and time.perf_counter() - t0 > limit_s:
            return None, (time.perf_counter() - t0) * len(a) / (i + 1)
    return int(prev[-1]), time.perf_counter() - t0


def one(n: int, edit: float, dp_limit: float) -> dict:
    """Build both traces, compare, report; runs inside its own process."""
    from renacerd.compare import compare_runs
    from renacerd.compare.normalize import Vocab, normalize
    from renacerd.syscall_table import syscall_table

    table = syscall_table()
    base = build(n, edit, 1, table, False)
    cand = build(n, edit, 2, table, True)
    rss_traces = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    c = compare_runs(base, cand)
    secs = time.perf_counter() - t0
    out = {
        "n": n, "edit": edit, "seconds": round(secs, 3), "lcs_seconds": round(c.lcs.seconds, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "traces_rss_mb": round(rss_traces), "syscall_match": round(c.score.syscall_match, 6),
        "exact": c.exact, "chunks": len(c.chunks), "compared": list(c.events),
    }
    if dp_limit > 0:
        v = Vocab()
        a, b = normalize(base, v).codes, normalize(cand, v).codes
        lcs, dp_s = renacer_dp(a, b, dp_limit)
        out["dp_seconds"] = round(dp_s, 2)
        out["dp_finished"] = lcs is not None
        out["dp_table_gb"] = round((len(a) + 1) * (len(b) + 1) * 8 / 2**30, 1)
        if lcs is not None:
            out["dp_syscall_match"] = round(lcs / max(len(a), len(b)), 6)
    return out


def main() -> int:
    """Run every (size, edit) case in a subprocess and print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e5,1e6,1e7")
    p.add_argument("--edits", default="0.001,0.01,0.05")
    p.add_argument("--dp-limit", type=float, default=60.0,
                   help="seconds before renacer's DP is stopped and extrapolated")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        n, edit, lim = a.one.split(",")
        print(json.dumps(one(int(float(n)), float(edit), float(lim))))
        return 0
    print(f"{'events':>9} {'edits':>6} {'compare s':>9} {'peak MB':>8} {'traces MB':>9} "
          f"{'match':>9} {'exact':>5} {'chunks':>7} | renacer O(n*m) DP")
    for n in (int(float(s)) for s in a.sizes.split(",")):
        for edit in (float(e) for e in a.edits.split(",")):
            dp = a.dp_limit if edit == 0.01 else 0
            r = subprocess.run([sys.executable, __file__, "--one", f"{n},{edit},{dp}"],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{n:>9} {edit:>6}: failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            d = json.loads(r.stdout)
            if "dp_seconds" not in d:
                dp_txt = ""
            elif d["dp_finished"]:
                dp_txt = (f"{d['dp_seconds']:.1f} s (match {d['dp_syscall_match']}); renacer's "
                          f"full table would need {d['dp_table_gb']} GB")
            else:
                dp_txt = (f"did not finish in {a.dp_limit:.0f} s (extrapolated "
                          f"{d['dp_seconds'] / 3600:.1f} h; table {d['dp_table_gb']} GB)")
            print(f"{n:>9} {edit:>6} {d['seconds']:>9.2f} {d['peak_rss_mb']:>8} "
                  f"{d['traces_rss_mb']:>9} {d['syscall_match']:>9.6f} {d['exact']!s:>5} "
                  f"{d['chunks']:>7} | {dp_txt}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
