"""`renacerd serve` as a host service: acknowledgement latency of `request_tracing()` for 1,
4 and 16 concurrent requests, RSS of the service's process tree with 0, 1, 4 and 16 live
runs, and the BPF programs it holds (the same for any number of runs). With --storm: the
per-syscall cost of a syscall storm traced through the service while 1, 4 and 16 runs are
live (the other runs trace idle sleepers), and of an untraced storm with 0 and 16 runs live.

Each client is a small Python process on the raw protocol: it connects, says hello, waits
for "go", sends TraceMe and times the Ack (request sent to answer read), then waits to be
released. All N clients of a round get "go" at once.

The storm figures alternate untraced and traced windows at each level (the VM drifts): each
window is one storm process timing its own loop (bench/storm.py's C loop); a level's ratio
is the median of its window ratios, each traced window against the mean of the untraced
windows on either side.

Usage: sudo .venv/bin/python bench/service.py [--rounds 20,5,3] [--storm]
       [--storm-syscalls 2000000] [--storm-windows 5] [--short-runs 10] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.storm import build as build_storm  # noqa: E402

LEVELS = (1, 4, 16)

CLIENT = r"""
import json, os, socket, sys, time
sys.path.insert(0, os.environ["RENACER_ROOT"])
from renacerd.client import protocol
path, run = sys.argv[1:3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)
s.send(protocol.encode(protocol.Hello(pid=os.getpid())))
print("hello", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
s.send(protocol.encode(protocol.TraceMe(1, run)))
ack = protocol.decode(s.recv(protocol.MAX_FRAME))
print(json.dumps({"ok": ack.ok, "reason": ack.reason, "ack_s": time.perf_counter() - t0}),
      flush=True)
sys.stdin.readline()
"""


def held_in_kernel(pid: int) -> tuple[int, int]:
    """(BPF programs, raw tracepoint links) the process holds, from its fdinfo."""
    progs, links = set(), 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        info = dict(ln.split(":\t", 1) for ln in text.splitlines() if ":\t" in ln)
        if info.get("link_type") == "raw_tracepoint":
            links += 1
        elif "prog_type" in info:
            progs.add(info["prog_id"])
    return len(progs), links


def tree_rss_mb(pid: int) -> float:
    """RSS of `pid` and its descendants, MB."""
    p = psutil.Process(pid)
    total = p.memory_info().rss
    for c in p.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def status(sock: str) -> dict:
    """`renacer status --json` of the service."""
    r = subprocess.run([sys.executable, "-m", "renacerd.cli.renacer_main", "status",
                        "--socket", sock, "--json"], capture_output=True, text=True,
                       env=_env(), timeout=30, check=True)
    return json.loads(r.stdout)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), RENACER_ROOT=str(ROOT))


def start_service(tmp: Path) -> tuple[subprocess.Popen, str, float]:
    """The service, up and answering; (process, front socket, seconds to READY)."""
    sock = str(tmp / "renacerd.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.settimeout(120)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "renacerd.cli.renacerd_main", "serve",
                             "--socket", sock, "--db", str(tmp / "traces.db")],
                            env=dict(_env(), NOTIFY_SOCKET=str(tmp / "notify.sock")),
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "service.log", "w"))
    while b"READY=1" not in notify.recv(4096):
        pass
    notify.close()
    return proc, sock, time.monotonic() - t0


def round_of(sock: str, tmp: Path, n: int, tag: str, service: int,
             sample: dict | None) -> list[float]:
    """n clients ask at once; their ack seconds. With `sample`, RSS and programs are
    measured while the n runs are live."""
    script = tmp / "client.py"
    script.write_text(CLIENT)
    procs = [subprocess.Popen([sys.executable, str(script), sock, f"{tag}-{i}"], env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for i in range(n)]
    try:
        for p in procs:
            assert p.stdout.readline() == "hello\n"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        acks = [json.loads(p.stdout.readline()) for p in procs]
        bad = [a for a in acks if not a["ok"]]
        if bad:
            raise RuntimeError(f"refused: {bad[0]['reason']}")
        if sample is not None:
            time.sleep(1.0)  # a flush or two: the runs' buffers and writers are up
            sample["rss_mb"] = tree_rss_mb(service)
            sample["progs"], sample["raw_tp"] = held_in_kernel(service)
    finally:
        for p in procs:
            p.communicate("\n", timeout=30)
    deadline = time.monotonic() + 30
    while status(sock)["runs"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return [a["ack_s"] for a in acks]


def storm_ns(exe: Path, n: int, sock: str | None, tmp: Path, run: str) -> float:
    """One storm window: the loop's own ns per syscall, untraced (sock None) or traced as a
    run of the service by `renacerd -- CMD`."""
    cmd = [str(exe), str(n)]
    if sock is not None:
        cmd = [sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--service-socket",
               sock, "--run", run, "--", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600,
                       check=True)
    return float(r.stdout.split()[-1])


def sleepers(sock: str, tmp: Path, k: int, tag: str) -> list[subprocess.Popen]:
    """k idle runs of the service (each `renacerd -- sleep`), live once this returns."""
    procs = [subprocess.Popen([sys.executable, "-m", "renacerd.cli.renacerd_main", "-q",
                               "--service-socket", sock, "--run", f"{tag}-{i}", "--",
                               "sleep", "3600"], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(k)]
    deadline = time.monotonic() + 120
    while len(status(sock)["runs"]) < k:
        if time.monotonic() > deadline:
            live = len(status(sock)["runs"])
            stop_all(sock, procs)
            raise RuntimeError(f"only {live} of {k} idle runs started")
        time.sleep(0.2)
    return procs


def stop_all(sock: str, procs: list[subprocess.Popen]) -> None:
    """End the idle runs (their sleep is killed; renacerd exits with it)."""
    for p in procs:
        try:
            for c in psutil.Process(p.pid).children(recursive=True):
                c.kill()
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        p.wait(60)
    deadline = time.monotonic() + 60
    while status(sock)["runs"] and time.monotonic() < deadline:
        time.sleep(0.1)


def alternate(untraced, traced, windows: int) -> dict:
    """Alternating windows u t u t ... u: each t against the mean of its two u neighbours."""
    us = [untraced()]
    ts: list[float] = []
    for _ in range(windows):
        ts.append(traced())
        us.append(untraced())
    ratios = sorted(t / ((a + b) / 2) for t, a, b in zip(ts, us, us[1:]))
    return {"untraced_ns": sorted(us)[len(us) // 2], "traced_ns": sorted(ts)[len(ts) // 2],
            "ratio": ratios[len(ratios) // 2], "ratio_min": ratios[0],
            "ratio_max": ratios[-1]}


def storm(sock: str, tmp: Path, n: int, windows: int) -> dict:
    """The storm traced with 1, 4 and 16 runs live; untraced with 0 and 16 live."""
    exe = build_storm(tmp)
    out: dict = {"syscalls": n, "windows": windows, "traced": {}}
    count = itertools.count()
    for k in LEVELS:
        idle = sleepers(sock, tmp, k - 1, f"idle{k}")
        try:
            out["traced"][k] = alternate(
                lambda: storm_ns(exe, n, None, tmp, ""),
                lambda k=k: storm_ns(exe, n, sock, tmp, f"storm{k}-{next(count)}"), windows)
        finally:
            stop_all(sock, idle)
    # an untraced process: the service's programs run for its syscalls too, and only
    # find it missing from the target map; the same with 16 entries in the map
    idle = sleepers(sock, tmp, LEVELS[-1], "idle-untraced")
    try:
        out["untraced_16"] = storm_ns(exe, n, None, tmp, "")
    finally:
        stop_all(sock, idle)
    out["untraced_0"] = storm_ns(exe, n, None, tmp, "")
    return out


def short_job(sock: str, runs: int) -> dict:
    """`renacerd -- true` end to end through the running service, `runs` times: the wall
    time, CPU (user + system) and peak RSS of the renacerd process tree, each run alone."""
    wall, cpu, rss = [], [], []
    for i in range(runs):
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "renacerd.cli.renacerd_main", "-q",
                              "--service-socket", sock, "--run", f"true-{i}", "--", "true"],
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, code, ru = os.wait4(p.pid, 0)
        wall.append(time.perf_counter() - t0)
        if code:
            raise RuntimeError(f"renacerd -- true: exit {code}: {p.stderr.read().decode()}")
        p.stderr.close()
        cpu.append(ru.ru_utime + ru.ru_stime)
        rss.append(ru.ru_maxrss / 1024)  # KiB on Linux
    return {"runs": runs, "wall_p50_s": pct(wall, 0.5), "wall_max_s": max(wall),
            "cpu_p50_s": pct(cpu, 0.5), "rss_p50_mb": pct(rss, 0.5)}


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of xs (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def main() -> int:
    """Print (and with --json dump) the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", default="20,5,3",
                    help="rounds of 1, 4 and 16 concurrent requests (default 20,5,3)")
    ap.add_argument("--storm", action="store_true",
                    help="also the syscall storm with 1, 4 and 16 runs live")
    ap.add_argument("--storm-syscalls", type=int, default=2_000_000, metavar="N",
                    help="syscalls per storm window (default 2,000,000)")
    ap.add_argument("--storm-windows", type=int, default=5, metavar="W",
                    help="traced windows per level, each between two untraced (default 5)")
    ap.add_argument("--short-runs", type=int, default=10, metavar="N",
                    help="times `renacerd -- true` runs through the service (default 10)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    a = ap.parse_args()
    if a.storm_syscalls < 1000 or a.storm_windows < 1 or a.short_runs < 1:
        print("bench/service.py: --storm-syscalls must be >= 1000, --storm-windows and "
              "--short-runs >= 1", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench/service.py: must run as root", file=sys.stderr)
        return 2
    try:
        rounds = [int(x) for x in a.rounds.split(",")]
        if len(rounds) != len(LEVELS) or min(rounds) < 1:
            raise ValueError
    except ValueError:
        print("bench/service.py: --rounds takes three positive counts, e.g. 20,5,3",
              file=sys.stderr)
        return 2
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                 "cpus": os.cpu_count(), "kernel": platform.release(), "levels": {}}
    with tempfile.TemporaryDirectory(prefix="renacer-bench-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)
        proc, sock, ready_s = start_service(tmp)
        try:
            out["ready_s"] = ready_s
            time.sleep(1.0)
            out["rss_idle_mb"] = tree_rss_mb(proc.pid)
            out["progs_idle"], out["raw_tp_idle"] = held_in_kernel(proc.pid)
            for n, r in zip(LEVELS, rounds):
                acks: list[float] = []
                sample: dict = {}
                for i in range(r):
                    acks += round_of(sock, tmp, n, f"b{n}-{i}", proc.pid,
                                     sample if i == 0 else None)
                out["levels"][n] = {"requests": len(acks), "p50_s": pct(acks, 0.5),
                                    "p99_s": pct(acks, 0.99), "max_s": max(acks), **sample}
            out["short_job"] = short_job(sock, a.short_runs)
            if a.storm:
                out["storm"] = storm(sock, tmp, a.storm_syscalls, a.storm_windows)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"renacerd serve: READY after {out['ready_s']:.2f} s; idle: RSS "
          f"{out['rss_idle_mb']:.0f} MB, {out['progs_idle']} BPF programs "
          f"({out['raw_tp_idle']} raw tracepoint links)")
    print("| concurrent requests | requests | ack p50 | ack p99 | service RSS with the runs "
          "live | BPF programs |")
    print("|---|---|---|---|---|---|")
    for n, f in out["levels"].items():
        print(f"| {n} | {f['requests']} | {1000 * f['p50_s']:.1f} ms | "
              f"{1000 * f['p99_s']:.1f} ms | {f['rss_mb']:.0f} MB | {f['progs']} |")
    sj = out["short_job"]
    print(f"\n`renacerd -- true` through the service, {sj['runs']} runs: wall "
          f"{sj['wall_p50_s']:.3f} s (median; slowest {sj['wall_max_s']:.3f} s), CPU "
          f"{sj['cpu_p50_s']:.3f} s, peak RSS {sj['rss_p50_mb']:.0f} MB")
    if a.storm:
        st = out["storm"]
        print(f"\nstorm through the service ({st['syscalls']:,} syscalls of getppid + 4 KiB "
              f"write per window, {st['windows']} traced windows per level, loop's own ns)")
        print("| runs live | untraced ns | traced ns | traced / untraced (median) | spread |")
        print("|---|---|---|---|---|")
        for k, f in st["traced"].items():
            print(f"| {k} | {f['untraced_ns']:.0f} | {f['traced_ns']:.0f} | "
                  f"{f['ratio']:.2f}x | {f['ratio_min']:.2f}-{f['ratio_max']:.2f}x |")
        print(f"untraced process: {st['untraced_0']:.0f} ns/syscall with 0 runs live, "
              f"{st['untraced_16']:.0f} ns with 16 "
              f"({st['untraced_16'] / st['untraced_0']:.2f}x)")
    if a.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
