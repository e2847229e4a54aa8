"""The daemon's CPU per event by stage, from a deterministic replay of recorded drains.

Record once (root, real BPF): the raw drains (event ring, short and long detail rings) of a
traced workload, as the daemon read them, with the time of each drain:

  sudo .venv/bin/python bench/daemon_replay.py record DRAINS.npz --workload torch --steps 600
  sudo .venv/bin/python bench/daemon_replay.py record DRAINS.npz --workload mix --samples 200000

Replay (no root, no BPF): every drain is written back into ring buffers of the kernel's
layout (a memfd mapped like a BPF ringbuf map) and taken through the daemon's real path in
one thread: RingReader (decode) -> Tracer._take_drained (per-process grouping) ->
_attach_details (detail join) -> columns.encode -> Store insert and commit, with the
tracer's flush at the recorded cadence. Process CPU time per event, per stage, min of
--repeat replays with the spread (max - min):

  .venv/bin/python bench/daemon_replay.py replay DRAINS.npz --repeat 7 [--skip-s 3]
      [--merge K] [--profile OUT.prof] [--digest] [--numpy]

--skip-s leaves out the start-up (the torch loop's imports stat thousands of distinct
paths in its first ~3 s): those drains are replayed, so the state is the real one, and
not counted. --merge K reads K consecutive drains as one: the daemon drained K times less
often (what a drain costs whatever its size, against what each event costs). --digest
prints a SHA-256 of every replay's stored chunks and strings: two builds that store the
same bytes print the same digest. --numpy replays through the numpy reference of the
compiled hot path (renacerd/_hot.c): the daemon as it runs where the extension is not built.

CPU time, not wall time: the figure holds on a busy, shared machine.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import mmap
import os
import pstats
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from renacerd.capture import tracer as tracer_mod  # noqa: E402
from renacerd.capture.probes.syscalls import (  # noqa: E402
    DEFAULT_DETAIL_MB,
    DEFAULT_EVENT_MB,
    SyscallProbes,
)
from renacerd.capture.ringbuf import RingReader  # noqa: E402
from renacerd.records import EVENT, LONG_LEN, STR_LEN, detail_dtype  # noqa: E402
from renacerd.store import writer as writer_mod  # noqa: E402
from renacerd.store.database import Store  # noqa: E402

RINGS = ("ev", "de", "dl")
STAGES = ("decode", "group", "join", "encode", "commit")

# A C loader with a known mix per sample: openat, newfstatat, 4 reads, close (6 of 7 plain
# fd calls, 2 path-carrying) and 2 getppid, over 64 files of 40-byte paths.
MIX = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    char path[256], buf[256];
    struct stat st;
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%02ld.bin", argv[2], i % 64);
        int fd = openat(AT_FDCWD, path, O_RDONLY);
        fstatat(AT_FDCWD, path, &st, 0);
        for (int k = 0; k < 4; k++) read(fd, buf, sizeof buf);
        close(fd);
        getppid(); getppid();
    }
    return 0;
}
"""


# -- recording ---------------------------------------------------------------------------
def record(out: Path, workload: str, steps: int, samples: int) -> int:
    """Trace the workload with the real daemon (in this process), keeping a copy of
    every drain."""
    from renacerd.cli import renacerd_main

    drains: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    real = SyscallProbes.drain

    def keep(self):
        ev, de, dl = real(self)
        drains.append((time.monotonic_ns(), ev.copy(), de.copy(), dl.copy()))
        return ev, de, dl

    SyscallProbes.drain = keep
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if workload == "torch":
            from bench.torch_loop import make_shards

            cmd = [sys.executable, str(ROOT / "bench" / "torch_loop.py"), "--steps",
                   str(steps), "--warmup", "10", "--workload", str(make_shards(tmp))]
        else:
            (tmp / "mix.c").write_text(MIX)
            subprocess.run(["gcc", "-O2", "-o", str(tmp / "mix"), str(tmp / "mix.c")],
                           check=True)
            files = tmp / ("f" * 30)
            files.mkdir()
            for i in range(64):
                (files / f"{i:02d}.bin").write_bytes(os.urandom(4096))
            cmd = [str(tmp / "mix"), str(samples), str(files)]
        os.environ["PYTHONPATH"] = str(ROOT)
        rc = renacerd_main.main(["--db", str(tmp / "rec.db"), "--run", "rec",
                                 "--priority", "normal", "--", *cmd])
    SyscallProbes.drain = real
    if rc != 0:
        print(f"bench/daemon_replay.py: renacerd exited {rc}", file=sys.stderr)
        return 2
    arrays: dict[str, np.ndarray] = {"t": np.array([t for t, *_ in drains], np.int64)}
    for k, name in enumerate(RINGS):
        parts = [dr[k + 1] for dr in drains]
        arrays[name] = np.concatenate(parts)
        arrays[name + "_n"] = np.array([len(p) for p in parts], np.int64)
    np.savez(out, **arrays)
    print(f"{out}: {len(drains)} drains, {len(arrays['ev']):,} events, "
          f"{len(arrays['de']):,} + {len(arrays['dl']):,} details")
    return 0


# -- replay ------------------------------------------------------------------------------
class MemRing:
    """A memfd laid out like a BPF ringbuf map (consumer page, producer page, data twice)
    that a real RingReader reads; fill() plays the kernel's part."""

    def __init__(self, data_size: int, payload: np.dtype) -> None:
        page = mmap.PAGESIZE
        self.fd = os.memfd_create("ring")
        os.ftruncate(self.fd, 2 * page + 2 * data_size)
        self.reader = RingReader(self.fd, data_size, payload)
        self._map = mmap.mmap(self.fd, 2 * page + 2 * data_size)
        self._prod = np.frombuffer(self._map, "<u8", count=1, offset=page)
        self._lo = np.frombuffer(self._map, np.uint8, count=data_size, offset=2 * page)
        self._hi = np.frombuffer(self._map, np.uint8, count=data_size, offset=2 * page
                                 + data_size)
        self.data_size, self.payload = data_size, payload
        self.rec_size = self.reader.rec_size

    def fill(self, recs: np.ndarray) -> None:
        """Commit `recs` as the kernel would (headers, payloads, producer position)."""
        n = len(recs)
        if not n:
            return
        if n * self.rec_size > self.data_size:
            raise ValueError("a recorded drain exceeds the replay ring")
        prod = int(self._prod[0])
        rows = np.zeros(n, dtype=self.reader._rec)
        rows["hdr_len"] = self.payload.itemsize
        rows["p"] = recs
        raw = rows.view(np.uint8)
        off = prod & (self.data_size - 1)
        first = min(len(raw), self.data_size - off)
        self._lo[off:off + first] = raw[:first]
        self._lo[:len(raw) - first] = raw[first:]
        # the kernel maps the data area twice: a record that wraps reads on contiguously
        self._hi[:len(raw) - first] = raw[first:]
        self._prod[0] = prod + n * self.rec_size


class ReplayProbes:
    """What Tracer needs of SyscallProbes, fed from a recording through real ring readers."""

    def __init__(self, pids: set[int]) -> None:
        self.rings_ = (MemRing(DEFAULT_EVENT_MB << 20, EVENT),
                       MemRing(DEFAULT_DETAIL_MB << 20, detail_dtype(STR_LEN)),
                       MemRing(DEFAULT_DETAIL_MB << 20, detail_dtype(LONG_LEN)))
        self.pids = pids  # every process the recorded kernel traced
        self.cpu_ns = 0

    def add_target(self, pid: int) -> None:
        self.pids.add(pid)

    def remove_target(self, pid: int) -> None:
        pass  # a late record of an exited process is the recording's, kept as it was

    def expect_exit(self, tid: int) -> None:
        pass

    def is_target(self, pid: int) -> bool:
        return pid in self.pids

    def counters(self) -> dict[str, int]:
        return {k: sum(v) for k, v in self.counters_per_cpu().items()}

    def counters_per_cpu(self) -> dict[str, list[int]]:
        from renacerd.records import COUNTER_NAMES

        return {k: [0, 0] for k in COUNTER_NAMES}

    def rings(self) -> list[RingReader]:
        return [r.reader for r in self.rings_]

    def capacity(self) -> tuple[int, int, int]:
        return tuple(r.data_size // r.rec_size for r in self.rings_)

    def drain(self):
        t0 = time.thread_time_ns()
        ev, de, dl = self.rings_[0].reader, self.rings_[1].reader, self.rings_[2].reader
        out = ev.peek(), de.drain(), dl.drain()
        self.cpu_ns += time.thread_time_ns() - t0
        return out

    def release(self) -> None:
        self.rings_[0].reader.release()


class Clock:
    """CPU ns spent inside wrapped calls, exclusive of the wrapped calls they make."""

    def __init__(self) -> None:
        self.ns = dict.fromkeys(STAGES, 0)
        self._stack: list[list] = []

    def wrap(self, stage: str, fn):
        def timed(*a, **k):
            frame = [time.thread_time_ns(), 0]
            self._stack.append(frame)
            try:
                return fn(*a, **k)
            finally:
                self._stack.pop()
                spent = time.thread_time_ns() - frame[0]
                self.ns[stage] += spent - frame[1]
                if self._stack:
                    self._stack[-1][1] += spent
        return timed


def replay_once(rec: dict[str, np.ndarray], db: Path, profile: cProfile.Profile | None,
                skip_s: float):
    """One replay in a fresh store and tracer: (events, total CPU ns, ns per stage) of the
    drains from `skip_s` seconds on (the earlier ones replayed, not counted: start-up)."""
    clock = Clock()
    store = Store(db, create=True)
    probes = ReplayProbes(set(np.unique(rec["ev"]["pid"]).tolist()))
    saved = (tracer_mod.Tracer._attach_details, writer_mod.encode,
             writer_mod.ChunkWriter.submit, writer_mod.encode_rows)
    # the writer inline (its thread's CPU counted in this one's) and every stage timed
    tracer_mod.Tracer._attach_details = clock.wrap("join", saved[0])
    writer_mod.encode = clock.wrap("encode", saved[1])
    writer_mod.encode_rows = clock.wrap("encode", saved[3])
    writer_mod.ChunkWriter.submit = lambda self, pid, cols: self._write(pid, cols)
    try:
        tr = tracer_mod.Tracer(probes, store, "replay", cmdline=["replay"])
        store.add_encoded_chunk = clock.wrap("commit", store.add_encoded_chunk)
        store.commit = clock.wrap("commit", store.commit)
        flush = clock.wrap("commit", tr.flush)
        drain = clock.wrap("group", tr.drain_once)
        offs = {k: np.concatenate(([0], np.cumsum(rec[k + "_n"]))) for k in RINGS}
        t = rec["t"]
        last_flush = t[0]
        start = int(np.searchsorted(t, t[0] + skip_s * 1e9))
        counted_from = 0
        for i in range(len(t)):
            if i == start:
                flush()  # what start-up left buffered is written outside the count
                clock.ns = dict.fromkeys(STAGES, 0)
                probes.cpu_ns, counted_from = 0, tr.events
                if profile is not None:
                    profile.enable()
            for k, ring in zip(RINGS, probes.rings_):
                ring.fill(rec[k][offs[k][i]:offs[k][i + 1]])  # the kernel's part: not timed
            drain()
            if t[i] - last_flush >= tr.flush_interval * 1e9:
                flush()
                last_flush = t[i]
        tr.finish()
        if profile is not None:
            profile.disable()
    finally:
        (tracer_mod.Tracer._attach_details, writer_mod.encode,
         writer_mod.ChunkWriter.submit, writer_mod.encode_rows) = saved
    clock.ns["decode"] = probes.cpu_ns
    clock.ns["group"] -= probes.cpu_ns  # drain_once's own time included the ring reads
    store.close()
    return tr.events - counted_from, sum(clock.ns.values()), clock.ns


def store_digest(db: Path) -> str:
    """SHA-256 of a store's chunks (process, layer, count, time range, bytes) and strings,
    in the order they were written."""
    h = hashlib.sha256()
    con = sqlite3.connect(db)
    try:
        for row in con.execute("SELECT proc_id, layer, n, first_ts, last_ts, data FROM chunks "
                               "ORDER BY id"):
            h.update(repr(row[:5]).encode() + bytes(row[5]))
        for sid, s in con.execute("SELECT id, s FROM strings ORDER BY id"):
            h.update(repr(sid).encode() + bytes(s))
    finally:
        con.close()
    return h.hexdigest()


def merged(rec: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """The recording as if drained every k-th time: k consecutive drains read as one."""
    out = dict(rec)
    out["t"] = rec["t"][k - 1 :: k] if len(rec["t"]) % k == 0 else np.append(
        rec["t"][k - 1 :: k], rec["t"][-1])
    for name in RINGS:
        out[name + "_n"] = np.add.reduceat(rec[name + "_n"], np.arange(0, len(rec["t"]), k))
    return out


def replay(path: Path, repeat: int, profile_out: Path | None, skip_s: float,
           merge: int, digest: bool = False) -> int:
    """Replay `repeat` times; print ns per event per stage (min, spread)."""
    with np.load(path) as z:
        rec = {k: z[k] for k in z.files}
    if merge > 1:
        rec = merged(rec, merge)
    nev = len(rec["ev"])
    print(f"{path}: {len(rec['t'])} drains, {nev:,} records, {len(rec['de']):,} short + "
          f"{len(rec['dl']):,} long details")
    runs = []
    digests: set[str] = set()
    prof = cProfile.Profile() if profile_out else None
    with tempfile.TemporaryDirectory() as d:
        for r in range(repeat):
            db = Path(d) / f"r{r}.db"
            events, total, ns = replay_once(rec, db, prof if r == 0 else None, skip_s)
            runs.append((total, ns))
            if digest:
                digests.add(store_digest(db))
            os.unlink(db)
    print(f"{events:,} events stored; CPU ns per event, min of {repeat} (spread max-min):")
    for stage in STAGES:
        v = np.array([ns[stage] for _, ns in runs]) / events
        print(f"  {stage:7s} {v.min():7.1f}  ({v.max() - v.min():.1f})")
    tot = np.array([t for t, _ in runs]) / events
    print(f"  {'total':7s} {tot.min():7.1f}  ({tot.max() - tot.min():.1f})")
    if digest:
        print(f"store digest: {' '.join(sorted(digests))}")
    if prof is not None:
        prof.dump_stats(str(profile_out))
        pstats.Stats(str(profile_out)).sort_stats("tottime").print_stats(25)
    return 0


def main() -> int:
    """record or replay."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--workload", choices=("torch", "mix"), default="torch")
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--samples", type=int, default=200_000)
    p = sub.add_parser("replay")
    p.add_argument("recording", type=Path)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--profile", type=Path, metavar="OUT.prof")
    p.add_argument("--skip-s", type=float, default=0.0,
                   help="replay the drains of the first SKIP_S s uncounted (start-up)")
    p.add_argument("--merge", type=int, default=1,
                   help="read MERGE recorded drains as one (a longer drain interval)")
    p.add_argument("--numpy", action="store_true",
                   help="the numpy path instead of the compiled one (renacerd/_hot.c)")
    p.add_argument("--digest", action="store_true",
                   help="print a SHA-256 of each replay's stored chunks and strings")
    a = ap.parse_args()
    if a.cmd == "record":
        if os.geteuid() != 0:
            print("bench/daemon_replay.py: record must run as root", file=sys.stderr)
            return 2
        return record(a.out, a.workload, a.steps, a.samples)
    if a.numpy:
        from renacerd.capture import assembly

        assembly.hot = None
    if a.merge < 1:
        print("bench/daemon_replay.py: --merge must be at least 1", file=sys.stderr)
        return 2
    return replay(a.recording, a.repeat, a.profile, a.skip_s, a.merge, a.digest)


if __name__ == "__main__":
    sys.exit(main())
