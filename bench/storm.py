"""Syscall storm: untraced vs renacerd vs strace -f, as ratios measured in one run.

The C loop alternates getppid and a 4 KiB write to /dev/null and times itself, so the
figure is the traced program's own ns per syscall (what a training job would feel).
--paths LEN makes it path-heavy instead: every call is faccessat on an existing path of LEN
bytes (a directory chain under /tmp), so each carries a path record.
--syscall NAME makes every call NAME (raw syscall(2), so libc does not change it): getppid
(no argument read), or openat (each followed by a close), newfstatat, statx or access on
an existing path of --path-len bytes: a path call's kernel-side cost against a plain one's;
fstat is newfstatat(fd, "", AT_EMPTY_PATH), glibc's fstat (an empty path: a flag, no record).
--rounds N alternates untraced and traced runs N times and prints each, for the spread.
Usage: sudo .venv/bin/python bench/storm.py [--syscalls 20000000] [--strace-syscalls 1000000]
       [--paths LEN | --syscall NAME [--path-len 24]] [--rounds 1] [--no-strace]
       [--pause-daemon --ring-mb 128 --daemon-arg=--detail-ring-mb=128]
--pause-daemon stops the daemon (SIGSTOP) while the loop runs: the kernel side's cost alone,
and the kernel's own timing of the BPF programs (BPF_ENABLE_STATS) over the loop.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]) / 2;
    static char buf[4096];
    int fd = open("/dev/null", O_WRONLY);
    struct timespec a, b;
    if (getenv("STORM_WAIT")) { char w; if (read(0, &w, 1) != 1) return 3; }
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) { getppid(); write(fd, buf, sizeof buf); }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.1f\n", ns / (2.0 * n));
    return 0;
}
"""
# argv[2]: a path; 2n faccessat calls on it
PATHS = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    const char *p = argv[2];
    struct timespec a, b;
    if (getenv("STORM_WAIT")) { char w; if (read(0, &w, 1) != 1) return 3; }
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) faccessat(AT_FDCWD, p, F_OK, 0);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.1f\n", ns / n);
    return 0;
}
"""


# argv[2]: the call, argv[3]: a path; n calls of it (openat: n openat + n close)
ONE = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    const char *c = argv[2], *p = argv[3];
    static struct stat st;
    static char sx[256];
    struct timespec a, b;
    if (getenv("STORM_WAIT")) { char w; if (read(0, &w, 1) != 1) return 3; }
    clock_gettime(CLOCK_MONOTONIC, &a);
    if (!strcmp(c, "getppid"))
        for (long i = 0; i < n; i++) syscall(SYS_getppid);
    else if (!strcmp(c, "openat"))
        for (long i = 0; i < n; i++) syscall(SYS_close, syscall(SYS_openat, AT_FDCWD, p, O_RDONLY));
    else if (!strcmp(c, "newfstatat"))
        for (long i = 0; i < n; i++) syscall(SYS_newfstatat, AT_FDCWD, p, &st, 0);
    else if (!strcmp(c, "statx"))
        for (long i = 0; i < n; i++) syscall(SYS_statx, AT_FDCWD, p, 0, 0x7ff, sx);
    else if (!strcmp(c, "fstat")) {  /* glibc's fstat: newfstatat(fd, "", AT_EMPTY_PATH) */
        int fd = open(p, O_RDONLY);
        for (long i = 0; i < n; i++) syscall(SYS_newfstatat, fd, "", &st, AT_EMPTY_PATH);
    } else if (!strcmp(c, "access"))
        for (long i = 0; i < n; i++) syscall(SYS_access, p, F_OK);
    else
        return 2;
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.1f\n", ns / n);
    return 0;
}
"""
SYSCALLS = ("getppid", "openat", "newfstatat", "statx", "access", "fstat")


def build(tmp: Path, source: str = LOOP) -> Path:
    """Compile the loop."""
    (tmp / "storm.c").write_text(source)
    subprocess.run(["gcc", "-O2", "-o", str(tmp / "storm"), str(tmp / "storm.c")], check=True)
    return tmp / "storm"


def long_path(tmp: Path, length: int) -> str:
    """An existing directory whose path is `length` bytes (components of at most 200)."""
    p = str(tmp)
    while len(p) < length:
        p += "/" + "d" * min(200, max(1, length - len(p) - 1))
    os.makedirs(p, exist_ok=True)
    return p


def enable_bpf_stats() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): the kernel times every BPF program run while
    the returned fd is open (without touching the system-wide sysctl)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(128)  # union bpf_attr; enable_stats.type = 0
    fd = libc.syscall(321, 32, attr, 128)  # SYS_bpf, BPF_ENABLE_STATS
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS")
    return fd


def program_stats(pid: int) -> dict[int, tuple[int, int]]:
    """prog id -> (run_time_ns, run_cnt) of every BPF program process `pid` holds."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            info = dict(line.split(":\t", 1) for line in
                        open(f"/proc/{pid}/fdinfo/{fd}").read().splitlines() if ":\t" in line)
        except OSError:
            continue
        if "prog_id" in info and "run_cnt" in info:
            out[int(info["prog_id"])] = (int(info["run_time_ns"]), int(info["run_cnt"]))
    return out


def traced_run(exe: Path, args: list[str], db: Path, run: str, ring_mb: str,
               extra: list[str], pause: bool = False) -> tuple[float, dict]:
    """The loop's ns per call under renacerd, and its run's counts from the store. pause:
    the daemon is stopped (SIGSTOP) while the loop runs, so only the BPF programs work
    (the rings must hold the loop's records; they are drained after SIGCONT)."""
    cmd = [sys.executable, "-m", "renacerd.cli.renacerd_main", "--db", str(db), "--run",
           run, "--ring-mb", ring_mb, *extra, "--", str(exe), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bpf_ns = None  # the programs' own run time, measured when the daemon is stopped
    if not pause:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        out, err = r.stdout, r.stderr
    else:
        rfd, wfd = os.pipe()
        p = subprocess.Popen(cmd, stdin=rfd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(env, STORM_WAIT="1"))
        os.close(rfd)
        loop = None
        while loop is None or loop.status() != psutil.STATUS_SLEEPING:
            time.sleep(0.01)  # the daemon starts the loop once attached; it waits on stdin
            kids = [c for c in psutil.Process(p.pid).children() if c.name() == exe.name]
            loop = kids[0] if kids else None
            if p.poll() is not None:
                raise RuntimeError(f"renacerd ended: {p.stderr.read()}")
        os.kill(p.pid, signal.SIGSTOP)
        stats_fd = enable_bpf_stats()
        try:
            before = program_stats(p.pid)
            os.write(wfd, b"g")
            out = p.stdout.readline()
            after = program_stats(p.pid)
        finally:
            os.close(stats_fd)
            os.kill(p.pid, signal.SIGCONT)
            os.close(wfd)
        # every program's time in the loop (the system's other syscalls run them too, and
        # return at the target test: a few ns each, a small share at the loop's rate)
        bpf_ns = sum(after[k][0] - before.get(k, (0, 0))[0] for k in after)
        rest, err = p.communicate()
        out += rest
        if p.returncode:
            raise subprocess.CalledProcessError(p.returncode, cmd, out, err)
    rss = re.search(r"peak RSS (\d+) MB", err)
    con = sqlite3.connect(db)
    events, lost, dlost, cut = con.execute(
        "SELECT events, events_lost, details_lost, truncated FROM runs WHERE name=?", (run,)
    ).fetchone()
    paths = con.execute("SELECT max(length(s)) FROM strings").fetchone()[0] or 0
    size = con.execute("SELECT sum(length(c.data)) FROM chunks c JOIN runs r ON "
                       "c.run_id = r.id WHERE r.name=?", (run,)).fetchone()[0]
    con.close()
    return float(out), dict(events=events, lost=lost, dlost=dlost, cut=cut, paths=paths,
                                 size=size, rss=rss.group(1) if rss else "?", bpf_ns=bpf_ns)


def main() -> int:
    """Run the configurations and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--syscalls", type=int, default=20_000_000)
    ap.add_argument("--strace-syscalls", type=int, default=1_000_000)
    ap.add_argument("--no-strace", dest="strace", action="store_false")
    ap.add_argument("--ring-mb", default="32")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="passed to renacerd (e.g. --daemon-arg=--detail-ring-mb=32)")
    ap.add_argument("--paths", type=int, metavar="LEN",
                    help="path-heavy: faccessat on a path of LEN bytes")
    ap.add_argument("--syscall", choices=SYSCALLS, help="every call is this one")
    ap.add_argument("--path-len", type=int, default=24,
                    help="--syscall: bytes of the path the path calls name")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pause-daemon", action="store_true",
                    help="stop the daemon while the loop runs: the BPF programs alone (give it "
                         "rings that hold the loop: --ring-mb, --daemon-arg=--detail-ring-mb)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/storm.py: must run as root", file=sys.stderr)
        return 2
    if a.paths and a.syscall:
        print("bench/storm.py: --paths and --syscall exclude each other", file=sys.stderr)
        return 2
    if a.rounds < 1 or a.syscalls < 2 or a.path_len < len(tempfile.gettempdir()) + 16:
        print("bench/storm.py: --rounds, --syscalls or --path-len too small", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        n = a.syscalls
        if a.syscall:
            exe = build(tmp, ONE)
            target = long_path(tmp, a.path_len - 2) + "/f"  # a file: openat reads it
            Path(target).write_bytes(b"")
            extra = [a.syscall, target]
        else:
            exe = build(tmp, PATHS if a.paths else LOOP)
            extra = [long_path(tmp, a.paths)] if a.paths else []
        args = [str(n), *extra]
        db = tmp / "storm.db"
        plain, traced, bpf, info = [], [], [], {}
        for r in range(a.rounds):
            plain.append(float(subprocess.run([str(exe), *args], capture_output=True, text=True,
                                              check=True).stdout))
            t, info = traced_run(exe, args, db, f"storm{r}", a.ring_mb, a.daemon_arg,
                                 a.pause_daemon)
            traced.append(t)
            if info["bpf_ns"] is not None:
                bpf.append(info["bpf_ns"] / n)
        ns = a.strace_syscalls
        strace = float("nan")
        if a.strace:
            strace = float(subprocess.run(["strace", "-f", "-o", "/dev/null", str(exe), str(ns),
                                           *extra], capture_output=True, text=True,
                                          check=True).stdout)
    untraced = statistics.median(plain)
    if a.syscall:
        what = a.syscall + (f" on a {a.path_len}-byte path" if a.syscall not in
                            ("getppid", "fstat") else "")
        if a.syscall == "openat":
            what += " (+ close: ns per pair)"
    elif a.paths:
        what = f"faccessat on a {a.paths}-byte path"
    else:
        what = "getppid + 4 KiB write to /dev/null"
    print(f"syscall storm: {n:,} calls ({what}), loop's own ns")
    print(f"{'how':<28} {'ns/syscall':>11} {'vs untraced':>12}")
    print(f"{'untraced':<28} {untraced:11.0f} {1:11.2f}x")
    how = "renacerd, daemon stopped" if a.pause_daemon else "renacerd (full capture)"
    print(f"{how:<28} {statistics.median(traced):11.0f} "
          f"{statistics.median(traced) / untraced:11.2f}x")
    if a.strace:
        print(f"{'strace -f (' + format(ns, ',') + ')':<28} {strace:11.0f} "
              f"{strace / untraced:11.2f}x")
    print("rounds, untraced -> traced ns (added): " + ", ".join(
        f"{p:.0f} -> {t:.0f} (+{t - p:.0f})" for p, t in zip(plain, traced)))
    added = sorted(t - p for p, t in zip(plain, traced))
    print(f"added by renacerd: median {statistics.median(added):.0f} ns a call (range "
          f"{added[0]:.0f}-{added[-1]:.0f})")
    if bpf:
        print(f"BPF programs' own run time (the kernel's BPF stats): median "
              f"{statistics.median(bpf):.0f} ns a loop call; rounds: "
              + ", ".join(f"{x:.0f}" for x in bpf))
    expected = n * (2 if a.syscall == "openat" else 1)
    print(f"renacerd events captured (last round): {info['events']:,} (loop issues "
          f"{expected:,}; the rest is process start-up), lost: {info['lost']} events, "
          f"{info['dlost']} argument records, {info['cut']} truncated")
    if a.paths or (a.syscall and a.syscall != "getppid"):
        print(f"longest path stored: {info['paths']} bytes")
    print(f"store: {info['size'] / info['events']:.2f} bytes per syscall event on disk; "
          f"daemon peak RSS {info['rss']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
