"""Syscall storm: untraced vs renacerd vs strace -f, as ratios measured in one run.

The C loop alternates getppid and a 4 KiB write to /dev/null and times itself, so the
figure is the traced program's own ns per syscall (what a training job would feel).
--paths LEN makes it path-heavy instead: every call is faccessat on an existing path of LEN
bytes (a directory chain under /tmp), so each carries a path record.
Usage: sudo .venv/bin/python bench/storm.py [--syscalls 20000000] [--strace-syscalls 1000000]
       [--paths LEN]
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

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
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) faccessat(AT_FDCWD, p, F_OK, 0);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.1f\n", ns / n);
    return 0;
}
"""


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


def main() -> int:
    """Run the three configurations and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--syscalls", type=int, default=20_000_000)
    ap.add_argument("--strace-syscalls", type=int, default=1_000_000)
    ap.add_argument("--ring-mb", default="32")
    ap.add_argument("--paths", type=int, metavar="LEN",
                    help="path-heavy: faccessat on a path of LEN bytes")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/storm.py: must run as root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        exe = build(tmp, PATHS if a.paths else LOOP)
        n = a.syscalls
        extra = [long_path(tmp, a.paths)] if a.paths else []
        untraced = float(subprocess.run([str(exe), str(n), *extra], capture_output=True, text=True,
                                        check=True).stdout)
        db = tmp / "storm.db"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        r = subprocess.run(
            [sys.executable, "-m", "renacerd.cli.renacerd_main", "--db", str(db), "--run",
             "storm", "--ring-mb", a.ring_mb, "--", str(exe), str(n), *extra],
            capture_output=True, text=True, env=env, check=True,
        )
        traced = float(r.stdout)
        rss = re.search(r"peak RSS (\d+) MB", r.stderr)
        con = sqlite3.connect(db)
        events, lost, dlost, cut = con.execute(
            "SELECT events, events_lost, details_lost, truncated FROM runs WHERE name='storm'"
        ).fetchone()
        paths = con.execute("SELECT max(length(s)) FROM strings").fetchone()[0] or 0
        size = con.execute("SELECT sum(length(data)) FROM chunks").fetchone()[0]
        ns = a.strace_syscalls
        s = subprocess.run(["strace", "-f", "-o", "/dev/null", str(exe), str(ns), *extra],
                           capture_output=True, text=True, check=True)
        strace = float(s.stdout)
    what = (f"faccessat on a {a.paths}-byte path" if a.paths
            else "getppid + 4 KiB write to /dev/null")
    print(f"syscall storm: {n:,} syscalls ({what}), loop's own ns")
    print(f"{'how':<28} {'ns/syscall':>11} {'vs untraced':>12}")
    print(f"{'untraced':<28} {untraced:11.0f} {1:11.2f}x")
    print(f"{'renacerd (full capture)':<28} {traced:11.0f} {traced / untraced:11.2f}x")
    print(f"{'strace -f (' + format(ns, ',') + ')':<28} {strace:11.0f} {strace / untraced:11.2f}x")
    expected = n + 0  # the loop's syscalls; startup calls come on top
    print(f"renacerd events captured: {events:,} (loop issues {expected:,}; the rest is "
          f"process start-up), lost: {lost} events, {dlost} argument records, {cut} "
          "truncated")
    if a.paths:
        print(f"longest path stored: {paths} bytes")
    print(f"store: {size / events:.2f} bytes per syscall event on disk; daemon peak RSS "
          f"{rss.group(1) if rss else '?'} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
