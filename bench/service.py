"""`renacerd serve` as a host service: acknowledgement latency of `request_tracing()` for 1,
4 and 16 concurrent requests, RSS of the service's process tree with 0, 1, 4 and 16 live
runs, and the BPF programs it holds (the same for any number of runs).

Each client is a small Python process on the raw protocol: it connects, says hello, waits
for "go", sends TraceMe and times the Ack (request sent to answer read), then waits to be
released. All N clients of a round get "go" at once.

Usage: sudo .venv/bin/python bench/service.py [--rounds 20,5,3] [--json]
"""

from __future__ import annotations

import argparse
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


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of xs (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def main() -> int:
    """Print (and with --json dump) the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", default="20,5,3",
                    help="rounds of 1, 4 and 16 concurrent requests (default 20,5,3)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    a = ap.parse_args()
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
    if a.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
