"""A small PyTorch CPU training loop with a 2-worker DataLoader reading file shards:
median step time untraced vs traced by renacerd vs strace -f, in one run.

Usage: sudo .venv/bin/python bench/torch_loop.py [--steps 200] [--rounds 3] [--paused]
       sudo .venv/bin/python bench/torch_loop.py --windows 6 [--window-s 3]
--paused adds a third kind of round: renacerd traced, its daemon stopped (SIGSTOP) for the
timed steps, so the BPF programs run but the daemon does not (the ring buffer holds the
window's events; they are drained after SIGCONT): what the kernel side costs alone.
(needs torch: `.venv/bin/pip install torch==2.13.0` takes the local CPU wheel)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.storm import enable_bpf_stats, program_stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARD_BYTES = 64 * 1024
READ_BYTES = 256
READS_PER_ITEM = 120  # 16 items a batch: ~2,000 syscalls per step across the workers
# Step time = wall time of the timed steps / steps (throughput). Single steps are bimodal
# here (3 busy processes on 2 vCPUs: a step that shares its core with a worker takes ~3 ms
# more), which makes a median of steps jump between the modes from run to run.
STAT = "mean_step_s"


def make_shards(parent: Path) -> Path:
    """32 shard files of random bytes under parent/shards."""
    shard_dir = parent / "shards"
    shard_dir.mkdir()
    for i in range(32):
        (shard_dir / f"{i:03d}.bin").write_bytes(os.urandom(SHARD_BYTES))
    return shard_dir


def workload(shard_dir: str, steps: int, warmup: int) -> None:
    """The training loop over the shards (runs in the traced process)."""
    import torch
    from torch.utils.data import Dataset

    shards = sorted(Path(shard_dir).glob("*.bin"))

    class Shards(Dataset):
        def __len__(self) -> int:
            return 10**9  # never runs out, however long --windows runs

        def __getitem__(self, i: int):
            p = shards[i % len(shards)]
            chunks = []
            with open(p, "rb", buffering=0) as f:
                for _ in range(READS_PER_ITEM):
                    chunks.append(f.read(READ_BYTES))
            x = torch.frombuffer(bytearray(b"".join(chunks)[:1024]), dtype=torch.uint8)
            return x.float() / 255.0, torch.tensor(i % 10)

    # 2304: the regime of a loader-bound job (strace -f makes the loop 9-11x slower)
    train(Shards(), steps, warmup, batch_size=16, hidden=int(os.environ.get("BENCH_HIDDEN",
                                                                             "2304")))


def train(dataset, steps: int, warmup: int, batch_size: int, hidden: int) -> None:
    """A 1024 -> hidden -> 10 MLP trained on CPU over `dataset` (1024 floats, a label per
    item) by a 2-worker DataLoader; prints its own step times (the protocol windows()
    reads when BENCH_SECONDS is set)."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=2, persistent_workers=True)
    model = torch.nn.Sequential(torch.nn.Linear(1024, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    times = []
    it = iter(loader)
    win = [0, 0]  # CLOCK_MONOTONIC window of the timed steps: the clock of the trace
    # --windows mode: run for BENCH_SECONDS and keep every step's (start, duration)
    seconds = float(os.environ.get("BENCH_SECONDS", "0"))
    if seconds:
        steps = 10**9
    deadline = time.monotonic() + seconds
    stop: list[int] = []  # SIGUSR1: windows() is done (before the deadline, if it was early)
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
    starts: list[int] = []
    sched: list[list[str]] = []
    for step in range(steps + warmup):
        if step == warmup:
            win[0] = time.monotonic_ns()
            if os.environ.get("BENCH_READY"):
                Path(os.environ["BENCH_READY"]).write_text(str(os.getpid()))
        if seconds:
            if stop or time.monotonic() > deadline:
                break
            starts.append(time.monotonic_ns())
            # the main thread's CPU time and run-queue wait (ns), cumulative: where a
            # window's extra step time went
            sched.append(open("/proc/thread-self/schedstat").read().split()[:2])
        t0 = time.perf_counter()
        x, y = next(it)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    win[1] = time.monotonic_ns()
    if seconds:
        print(json.dumps({"starts": starts[warmup:], "times": times,
                          "sched": [[int(x) for x in v] for v in sched[warmup:]]}), flush=True)
        return
    if os.environ.get("BENCH_TIMES"):  # per-step times, to look at a run's shape
        Path(os.environ["BENCH_TIMES"]).write_text(" ".join(f"{t * 1e3:.2f}" for t in times))
    print(json.dumps({"median_step_s": statistics.median(times),
                      "mean_step_s": (win[1] - win[0]) / 1e9 / steps, "window_ns": win}),
          flush=True)


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    return json.loads(out.strip().splitlines()[-1])


def _run_paused(cmd: list[str], ready: Path) -> dict:
    """Run renacerd -- loop; stop the daemon while the loop runs its timed steps."""
    ready.unlink(missing_ok=True)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), BENCH_READY=str(ready)))
    while not ready.exists() and p.poll() is None:
        time.sleep(0.002)
    os.kill(p.pid, signal.SIGSTOP)
    try:
        line = p.stdout.readline()  # the loop prints when its timed steps are done
    finally:
        os.kill(p.pid, signal.SIGCONT)
    rest = p.communicate()[0]
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, cmd)
    return json.loads((line + rest).strip().splitlines()[0])


def windows(me: list[str], db: Path, n: int, width: float, extra: list[str],
            nice: int = 0, pause: bool = False, prefix: list[str] | None = None,
            title: str = "PyTorch CPU loop, DataLoader(num_workers=2)",
            builds: list[Path] | None = None) -> int:
    """One long run of the loop; renacerd attaches (--pid, all of the tree) for every other
    window of `width` seconds. Steps inside traced windows against steps inside the untraced
    windows between them: same processes, same placement on the CPUs, so the ratio is not
    lost in the run-to-run noise of this VM. The daemon's start-up (BPF compile) and detach
    fall between the windows and are left out. An untraced window closes the run, so every
    traced window is also compared with the untraced windows on both sides of it.
    builds: source trees whose renacerd the traced windows take in turn (A, B, A, B ...),
    each reported apart: two builds compared in one run, under the same drift."""
    ready = db.parent / "ready"
    # the job's own limit, far past the windows' expected end (start-ups on a busy machine
    # take longer); windows() ends it with SIGUSR1 after the last window
    total = 3 * (4 + n * (2 * width + 6) + width)
    env = dict(os.environ, PYTHONPATH=str(ROOT), BENCH_SECONDS=str(total),
               BENCH_READY=str(ready))
    w = subprocess.Popen(me, stdout=subprocess.PIPE, text=True, env=env)
    while not ready.exists():
        time.sleep(0.05)
    pid = int(ready.read_text())
    time.sleep(1)
    tree = psutil.Process(pid)
    workers = tree.children()

    def job_cpu() -> float:
        """CPU seconds of the training process and its loader workers so far."""
        return sum(sum(p.cpu_times()[:2]) for p in (tree, *workers))

    plain, traced = [], []
    # (run, window, BPF programs' ns, their runs): the system's other processes run them
    # too (to the target test), so runs per traced syscall above 2 (enter, exit) say how much
    bpf_time: list[tuple[str, list[int], int, int]] = []
    cpu_plain, cpu_traced = [], []  # (seconds, CPU seconds) of the job per window
    for i in range(n):
        a, c = time.monotonic_ns(), job_cpu()
        time.sleep(width)
        plain.append((a, time.monotonic_ns()))
        cpu_plain.append(((plain[-1][1] - a) / 1e9, job_cpu() - c))
        rfd, wfd = os.pipe()
        d = subprocess.Popen([*(prefix or []), *(["nice", "-n", str(nice)] if nice else []),
                              sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db",
                              str(db), "--run", f"w{i}", "--pid", str(pid), "--duration",
                              str(width), "--ready-fd", str(wfd), *extra],
                             pass_fds=(wfd,), env=dict(os.environ, PYTHONPATH=str(
                                 builds[i % len(builds)] if builds else ROOT)))
        os.close(wfd)
        with os.fdopen(rfd) as f:
            f.readline()
        if pause:  # the kernel side alone: the rings hold the window, drained after it
            os.kill(d.pid, signal.SIGSTOP)
        t1, c = time.monotonic_ns(), job_cpu()
        if pause:
            # the kernel's own timing of the BPF programs over the window
            stats_fd = enable_bpf_stats()
            before = program_stats(d.pid)
            time.sleep(width)
            after = program_stats(d.pid)
            os.close(stats_fd)
            bpf_time.append((f"w{i}", [t1, time.monotonic_ns()], *(sum(
                after[k][j] - before.get(k, (0, 0))[j] for k in after) for j in (0, 1))))
            os.kill(d.pid, signal.SIGCONT)
        d.wait()
        cpu_traced.append(((time.monotonic_ns() - t1) / 1e9, job_cpu() - c))
        traced.append((t1 + 50_000_000, t1 + int(width * 1e9)))  # the drain loop is up
    # one more untraced window, so that every traced window has one on each side
    a, c = time.monotonic_ns(), job_cpu()
    time.sleep(width)
    plain.append((a, time.monotonic_ns()))
    cpu_plain.append(((plain[-1][1] - a) / 1e9, job_cpu() - c))
    os.kill(pid, signal.SIGUSR1)
    out = json.loads(w.communicate()[0].strip().splitlines()[-1])
    starts, times, sched = out["starts"], out["times"], out["sched"]

    def inside(wins):
        per, cpu, wait = [], [], []
        for a, b in wins:
            idx = [i for i, (s, t) in enumerate(zip(starts, times))
                   if a <= s and s + t * 1e9 <= b and i + 1 < len(sched)]
            if not idx:
                at = [(x - starts[0]) / 1e9 for x in (a, b, starts[-1])]
                raise RuntimeError(f"no whole step in the window {at[0]:.1f}-{at[1]:.1f} s "
                                   f"of the run ({len(starts)} steps, the last at {at[2]:.1f} s)")
            per.append(sum(times[i] for i in idx) / len(idx))
            cpu.append(sum(sched[i + 1][0] - sched[i][0] for i in idx) / len(idx) / 1e9)
            wait.append(sum(sched[i + 1][1] - sched[i][1] for i in idx) / len(idx) / 1e9)
        return per, cpu, wait

    (p, pc, pw), (t, tc, tw) = inside(plain), inside(traced)
    con = sqlite3.connect(db)
    lost, dlost = con.execute("SELECT sum(events_lost), sum(details_lost) FROM runs").fetchone()
    evs = con.execute("SELECT sum(events) FROM runs").fetchone()[0]
    lifts = sum(json.loads(c or "{}").get("priority_escalations", 0)
                for (c,) in con.execute("SELECT source_counters FROM runs"))
    con.close()
    ratios = [y / x for x, y in zip(p, t)]
    # each traced window against the mean of the untraced windows either side: a drift of
    # the VM's speed across the run cancels out to first order
    bracketed = [y / ((p[i] + p[i + 1]) / 2) for i, y in enumerate(t)]
    se = statistics.stdev(bracketed) / len(bracketed) ** 0.5 if len(bracketed) > 1 else 0.0
    print(f"{title}, one run; renacerd --pid attached for "
          f"{n} windows of {width:g} s, untraced windows of {width:g} s between them")
    print(f"untraced windows, mean step ms: {', '.join(f'{x * 1e3:.2f}' for x in p)}")
    print(f"traced windows, mean step ms:   {', '.join(f'{x * 1e3:.2f}' for x in t)}")
    print(f"traced / untraced: {statistics.mean(t) / statistics.mean(p):.3f}x over all windows; "
          f"median of the {n} window pairs {statistics.median(ratios):.3f}x "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"each traced window vs the untraced windows either side: mean "
          f"{statistics.mean(bracketed):.3f}x (standard error {se:.3f}), median "
          f"{statistics.median(bracketed):.3f}x")
    print(f"per step, main thread (untraced -> traced): on CPU "
          f"{statistics.mean(pc) * 1e3:.2f} -> {statistics.mean(tc) * 1e3:.2f} ms, waiting for "
          f"a CPU {statistics.mean(pw) * 1e3:.3f} -> {statistics.mean(tw) * 1e3:.3f} ms")
    busy_p = sum(c for _, c in cpu_plain) / sum(w for w, _ in cpu_plain)
    busy_t = sum(c for _, c in cpu_traced) / sum(w for w, _ in cpu_traced)
    print(f"the job's processes kept {busy_p:.2f} CPUs busy untraced, {busy_t:.2f} traced "
          f"(BPF runs in their syscalls), of the {os.cpu_count()} this machine has")
    counted = [(ns, runs, max(1, _events_in(db, run, win))) for run, win, ns, runs in bpf_time]
    per_call = [ns / n for ns, _, n in counted]
    if per_call:
        print(f"BPF programs' own time (the kernel's BPF stats) per traced syscall: median "
              f"{statistics.median(per_call):.0f} ns (range {min(per_call):.0f}-"
              f"{max(per_call):.0f}); program runs per traced syscall "
              f"{sum(r for _, r, _ in counted) / sum(n for _, _, n in counted):.2f}")
    for b, root in enumerate(builds or []):
        if per_call:
            mine = per_call[b :: len(builds)]
            print(f"build {root}: BPF programs' time per traced syscall median "
                  f"{statistics.median(mine):.0f} ns (range {min(mine):.0f}-{max(mine):.0f})")
        mine = bracketed[b :: len(builds)]
        err = statistics.stdev(mine) / len(mine) ** 0.5 if len(mine) > 1 else 0.0
        print(f"build {root}: {len(mine)} traced windows, either side mean "
              f"{statistics.mean(mine):.3f}x (standard error {err:.3f}), median "
              f"{statistics.median(mine):.3f}x, range {min(mine):.3f}-{max(mine):.3f}")
    print(f"renacerd: {evs:,} events in the traced windows, lost {lost} events and {dlost} "
          f"detail records; lifted from idle "
          f"to normal priority {lifts} times in {n} runs")
    return 0


def _events_in(db: Path, run: str, window: list[int]) -> int:
    """Syscalls of the whole tree (main + workers) inside the timed steps."""
    from renacerd.store.database import Store

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
    ap.add_argument("--paused", action="store_true",
                    help="also rounds with the daemon stopped for the timed steps")
    ap.add_argument("--windows", type=int, default=0,
                    help="one long run, renacerd attached in N alternate windows")
    ap.add_argument("--window-s", type=float, default=3.0)
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="passed to renacerd in --windows mode (e.g. --daemon-arg=--cuda=off)")
    ap.add_argument("--daemon-nice", type=int, default=0,
                    help="--windows mode: run renacerd under nice -n N")
    ap.add_argument("--daemon-prefix", default="",
                    help="--windows mode: a command line renacerd runs under (e.g. 'chrt -i 0')")
    ap.add_argument("--pause-daemon", action="store_true",
                    help="--windows mode: stop the daemon (SIGSTOP) for each traced window, so "
                         "only the BPF programs run in it; give it rings that hold a window "
                         "(e.g. --daemon-arg=--ring-mb=128 --daemon-arg=--detail-ring-mb=32)")
    ap.add_argument("--workload", nargs=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.workload:
        workload(a.workload[0], a.steps, a.warmup)
        return 0
    if os.geteuid() != 0:
        print("bench/torch_loop.py: must run as root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        shard_dir = make_shards(Path(d))
        me = [sys.executable, __file__, "--steps", str(a.steps), "--warmup", str(a.warmup),
              "--workload", str(shard_dir)]
        db = Path(d) / "t.db"
        if a.windows:
            return windows(me, db, a.windows, a.window_s, a.daemon_arg, a.daemon_nice,
                           a.pause_daemon, a.daemon_prefix.split())
        untraced, traced, paused, events, per_step = [], [], [], [], []
        for r in range(a.rounds):
            untraced.append(_run(me)[STAT])
            out = _run([sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db",
                        str(db), "--run", f"r{r}", "--", *me])
            traced.append(out[STAT])
            if a.paused:
                paused.append(_run_paused(
                    [sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db", str(db),
                     "--run", f"p{r}", "--", *me], Path(d) / "ready")[STAT])
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
    if paused:
        pz = statistics.median(paused)
        print(f"{'renacerd, daemon paused':<22} {pz * 1e3:9.2f} {pz / u:11.3f}x  "
              f"(BPF on, daemon stopped in the timed steps)")
    print(f"{'strace -f':<22} {strace * 1e3:9.2f} {strace / u:11.3f}x")
    ratios = [y / x for x, y in zip(untraced, traced)]
    print(f"median of the per-round ratios: {statistics.median(ratios):.3f}x "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    print("per round, untraced / renacerd ms: " + ", ".join(
        f"{x * 1e3:.2f}/{y * 1e3:.2f}" for x, y in zip(untraced, traced)))
    if paused:
        pr = [y / x for x, y in zip(untraced, paused)]
        print(f"daemon paused: median of the per-round ratios {statistics.median(pr):.3f}x "
              f"(range {min(pr):.3f}-{max(pr):.3f}); per round ms: "
              + ", ".join(f"{y * 1e3:.2f}" for y in paused))
    print(f"renacerd: {statistics.median(per_step):,.0f} syscalls per timed step (whole tree), "
          f"{statistics.median([e[0] for e in events]):,.0f} events per run, "
          f"lost {sum(e[1] for e in events)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
