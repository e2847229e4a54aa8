"""A small PyTorch CPU training loop with a 2-worker DataLoader reading file shards:
median step time untraced vs traced by renacerd vs strace -f, in one run.

Usage: sudo .venv/bin/python bench/torch_loop.py [--steps 200] [--rounds 3]
(needs torch: `.venv/bin/pip install torch==2.13.0` takes the local CPU wheel)
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARD_BYTES = 64 * 1024
READ_BYTES = 256
READS_PER_ITEM = 120  # 16 items a batch: ~2,000 syscalls per step across the workers
# Step time = wall time of the timed steps / steps (throughput). Single steps are bimodal
# here (3 busy processes on 2 vCPUs: a step that shares its core with a worker takes ~3 ms
# more), which makes a median of steps jump between the modes from run to run.
STAT = "mean_step_s"


def workload(shard_dir: str, steps: int, warmup: int) -> None:
    """The training loop (runs in the traced process); prints its own median step time."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    torch.set_num_threads(1)
    shards = sorted(Path(shard_dir).glob("*.bin"))

    class Shards(Dataset):
        def __len__(self) -> int:
            return 10**6

        def __getitem__(self, i: int):
            p = shards[i % len(shards)]
            chunks = []
            with open(p, "rb", buffering=0) as f:
                for _ in range(READS_PER_ITEM):
                    chunks.append(f.read(READ_BYTES))
            x = torch.frombuffer(bytearray(b"".join(chunks)[:1024]), dtype=torch.uint8)
            return x.float() / 255.0, torch.tensor(i % 10)

    loader = DataLoader(Shards(), batch_size=16, num_workers=2, persistent_workers=True)
    # 2304: the regime the issue describes (strace -f makes the loop 9-11x slower)
    hidden = int(os.environ.get("BENCH_HIDDEN", "2304"))
    model = torch.nn.Sequential(torch.nn.Linear(1024, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    times = []
    it = iter(loader)
    win = [0, 0]  # CLOCK_MONOTONIC window of the timed steps: the clock of the trace
    for step in range(steps + warmup):
        if step == warmup:
            win[0] = time.monotonic_ns()
        t0 = time.perf_counter()
        x, y = next(it)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    win[1] = time.monotonic_ns()
    if os.environ.get("BENCH_TIMES"):  # per-step times, to look at a run's shape
        Path(os.environ["BENCH_TIMES"]).write_text(" ".join(f"{t * 1e3:.2f}" for t in times))
    print(json.dumps({"median_step_s": statistics.median(times),
                      "mean_step_s": (win[1] - win[0]) / 1e9 / steps, "window_ns": win}),
          flush=True)


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    return json.loads(out.strip().splitlines()[-1])


def _events_in(db: Path, run: str, window: list[int]) -> int:
    """Syscalls of the whole tree (main + workers) inside the timed steps."""
    from renacerd.store import Store

    st = Store(db)
    try:
        return sum(int(((t.columns["ts"] >= window[0]) & (t.columns["ts"] < window[1])).sum())
                   for t in st.load_run(run))
    finally:
        st.close()


def main() -> int:
    """Alternate untraced / renacerd rounds; strace -f once."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-strace", dest="strace", action="store_false")
    ap.add_argument("--workload", nargs=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.workload:
        workload(a.workload[0], a.steps, a.warmup)
        return 0
    if os.geteuid() != 0:
        print("bench/torch_loop.py: must run as root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        shard_dir = Path(d) / "shards"
        shard_dir.mkdir()
        for i in range(32):
            (shard_dir / f"{i:03d}.bin").write_bytes(os.urandom(SHARD_BYTES))
        me = [sys.executable, __file__, "--steps", str(a.steps), "--warmup", str(a.warmup),
              "--workload", str(shard_dir)]
        db = Path(d) / "t.db"
        untraced, traced, events, per_step = [], [], [], []
        for r in range(a.rounds):
            untraced.append(_run(me)[STAT])
            out = _run([sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db",
                        str(db), "--run", f"r{r}", "--", *me])
            traced.append(out[STAT])
            con = sqlite3.connect(db)
            events.append(con.execute("SELECT events, events_lost FROM runs WHERE name=?",
                                      (f"r{r}",)).fetchone())
            con.close()
            per_step.append(_events_in(db, f"r{r}", out["window_ns"]) / a.steps)
        strace = (_run(["strace", "-f", "-o", "/dev/null", *me])[STAT] if a.strace
                  else float("nan"))
    u, t = statistics.median(untraced), statistics.median(traced)
    print(f"PyTorch CPU loop, DataLoader(num_workers=2), mean step time over {a.steps} timed "
          f"steps, median of {a.rounds} rounds (rounds alternate untraced / traced)")
    print(f"{'how':<22} {'step ms':>9} {'vs untraced':>12}")
    print(f"{'untraced':<22} {u * 1e3:9.2f} {1:11.3f}x")
    print(f"{'renacerd':<22} {t * 1e3:9.2f} {t / u:11.3f}x")
    print(f"{'strace -f':<22} {strace * 1e3:9.2f} {strace / u:11.3f}x")
    ratios = [y / x for x, y in zip(untraced, traced)]
    print(f"median of the per-round ratios: {statistics.median(ratios):.3f}x "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    print("per round, untraced / renacerd ms: " + ", ".join(
        f"{x * 1e3:.2f}/{y * 1e3:.2f}" for x, y in zip(untraced, traced)))
    print(f"renacerd: {statistics.median(per_step):,.0f} syscalls per timed step (whole tree), "
          f"{statistics.median([e[0] for e in events]):,.0f} events per run, "
          f"lost {sum(e[1] for e in events)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
