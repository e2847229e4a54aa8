"""Benchmark `renacer ranks` on a synthetic store: R ranks x S steps x E syscalls per step per
rank on the step's thread (a file read, futex waits, ioctls, a collective's futex), two
collective spans per step, rank 3 late on every 10th step by an fsync of its shard.

Builds the store once (--db, kept), then times ranks_data in a fresh subprocess so its peak
RSS is its own. Run: PYTHONPATH=. .venv/bin/python bench/ranks.py [--ranks 8 --steps 10000
--per-step 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

CHUNK = 1 << 16
PATTERN = ["openat", "read", "read", "close"] + ["ioctl"] * 6 + ["futex", "clock_gettime"]


def build(path: str, ranks: int, steps: int, per_step: int) -> None:
    """Write the synthetic run "bench" into a new store at `path`."""
    from renacerd.client.dist_env import DistInfo
    from renacerd.experiment_span import SpanRecord
    from renacerd.store.database import Store
    from renacerd.syscall_table import syscall_table
    from renacerd.trace.unified_trace import ProcessSpan

    table = syscall_table()
    nr_of = {v: k for k, v in table.items()}
    s = Store(path, create=True)
    rid = s.begin_run("bench", cmdline=["bench"], version="bench", syscall_table=table,
                      start_wall_ns=0, start_mono_ns=0)
    s.add_strings(rid, [(0, b"/data/part-0001"), (1, b"/ckpt/shard-3.pt")])
    pat = np.array([nr_of[n] for n in PATTERN], dtype=np.uint16)
    base = np.tile(pat, -(-per_step // len(pat)))[:per_step]
    base[-2:] = nr_of["futex"]  # the collective's wait: the last two calls of each step
    step_ns = 20_000 * per_step  # a call every 20 us
    rng = np.random.default_rng(0)
    for r in range(ranks):
        pid = 1000 + r
        proc_id = s.add_process(rid, ProcessSpan(pid=pid, name="python", start_mono_ns=0))
        s.set_process_dist(proc_id, DistInfo(rank=r, local_rank=r, world_size=ranks,
                                             job_id="bench", host="h"))
        # the shard opened once before the steps as fd 7
        s.add_chunk(rid, proc_id, {
            "ts": np.array([10**12 - 10], np.int64), "dur": np.ones(1, np.uint64),
            "ret": np.array([7], np.int64), "a0": np.zeros(1, np.uint64),
            "tid": np.array([pid], np.uint32), "nr": np.array([nr_of["openat"]], np.uint16),
            "flags": np.zeros(1, np.uint16), "s0": np.array([1], np.int32),
            "s1": np.full(1, -1, np.int32)})
        spans = []
        per_chunk = max(CHUNK // per_step, 1)
        for k0 in range(0, steps, per_chunk):
            ks = np.arange(k0, min(k0 + per_chunk, steps))
            n = len(ks) * per_step
            nr = np.tile(base, len(ks))
            t0 = np.repeat(ks.astype(np.int64) * step_ns, per_step)
            off = np.tile(np.arange(per_step, dtype=np.int64) * (step_ns // per_step),
                          len(ks))
            dur = rng.integers(200, 1500, n).astype(np.uint64)
            late = (r == 3) & (ks % 10 == 5)
            cols = {
                "ts": 10**12 + t0 + off, "dur": dur, "ret": np.zeros(n, np.int64),
                "a0": np.full(n, 3, np.uint64), "tid": np.full(n, pid, np.uint32), "nr": nr,
                "flags": np.zeros(n, np.uint16), "s0": np.full(n, -1, np.int32),
                "s1": np.full(n, -1, np.int32),
            }
            cols["s0"][nr == nr_of["openat"]] = 0
            cols["ret"][nr == nr_of["openat"]] = 3
            # a late step: its ioctl #5 becomes an fsync of the shard, 30% of the step
            for k in ks[late]:
                i = (k - k0) * per_step + 5
                cols["nr"][i] = nr_of["fsync"]
                cols["dur"][i] = step_ns * 3 // 10
                cols["a0"][i] = 7
            s.add_chunk(rid, proc_id, cols)
            for k in ks.tolist():
                st = 10**12 + k * step_ns
                extra = step_ns * 3 // 10 if (r == 3 and k % 10 == 5) else 0
                wait = 50_000 + (0 if extra else step_ns * 3 // 10 if k % 10 == 5 else 0)
                end = st + step_ns
                c1 = end - wait - 20_000
                spans.append(_span(pid, "train_step", k, st, end, 3 * k))
                spans.append(_span(pid, "c10d.all_reduce", k, c1, c1 + wait, 3 * k + 1, 1000))
                spans.append(_span(pid, "c10d.all_reduce", k, end - 15_000, end - 5_000,
                                   3 * k + 2, 1))
        s.add_spans(rid, [SpanRecord(**sp) for sp in spans], {pid: proc_id})
        s.commit()
    s.update_run(rid, status="complete", events=ranks * steps * per_step)
    s.close()


def _span(pid: int, name: str, step: int, start: int, end: int, i: int, numel: int = 0):
    attrs = {"experiment.step": str(step), "experiment.model_name": "float32"}
    if numel:
        attrs["experiment.metrics.c10d.numel"] = str(numel)
        attrs["experiment.metrics.c10d.group"] = "0"
    return dict(trace_id=b"\1" * 16, span_id=(pid << 32 | i + 1).to_bytes(8, "big"),
                parent_span_id=None, span_name=name, span_kind=0, start_time_nanos=start,
                end_time_nanos=end, duration_nanos=end - start, logical_clock=i,
                status_code=1, status_message="", attributes_json=json.dumps(attrs),
                resource_json="{}", process_id=pid, thread_id=pid, start_mono_nanos=start,
                end_mono_nanos=end)


def measure(path: str) -> dict:
    """Time ranks_data on the store (in this process) and check its answer."""
    from renacerd.reports.ranks import ranks_data
    from renacerd.store.database import Store

    s = Store(path)
    t = time.perf_counter()
    d = ranks_data(s, s.run("bench"))
    wall = time.perf_counter() - t
    late = [x["step"] for x in d["steps"] if x["straggler"]]
    causes = {(c["syscall"], c["path"]) for x in d["steps"] if x["straggler"]
              for c in x["straggler"]["causes"][:1]}
    return {"wall_s": round(wall, 2),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "late_steps": len(late), "stragglers": [x["rank"] for x in d["stragglers"]],
            "causes": sorted(map(list, causes))}


def main() -> None:
    """Build (unless the store exists) and measure."""
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--per-step", type=int, default=2000)
    p.add_argument("--db", default="/tmp/renacer-bench-ranks.db")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(a.db)))
        return
    if not os.path.exists(a.db):
        t = time.perf_counter()
        build(a.db, a.ranks, a.steps, a.per_step)
        print(f"built {a.ranks} x {a.steps} x {a.per_step} = "
              f"{a.ranks * a.steps * a.per_step:,} events in {time.perf_counter() - t:.1f} s,"
              f" {os.path.getsize(a.db) / 2**20:.0f} MiB", flush=True)
    out = subprocess.run([sys.executable, __file__, "--measure", "--db", a.db],
                         capture_output=True, text=True, check=True)
    print(out.stdout.strip())


if __name__ == "__main__":
    main()
