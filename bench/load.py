"""Load-back speed: trace a 10M-syscall storm, then time Store.load_run into numpy columns.

Usage: sudo .venv/bin/python bench/load.py [--syscalls 10000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.storm import build  # noqa: E402
from renacerd.store.database import Store  # noqa: E402


def main() -> int:
    """Trace once, load three times, print the best."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--syscalls", type=int, default=10_000_000)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/load.py: must run as root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        exe = build(Path(d))
        db = Path(d) / "load.db"
        subprocess.run(
            [sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db", str(db), "--run",
             "load", "--", str(exe), str(a.syscalls)],
            check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        best = float("inf")
        for _ in range(3):
            store = Store(db)
            t0 = time.perf_counter()
            traces = store.load_run("load")
            best = min(best, time.perf_counter() - t0)
            n = sum(len(t) for t in traces)
            store.db.close()
        size = db.stat().st_size
    print(f"load_run: {n:,} events into numpy columns in {best:.2f} s (best of 3); "
          f"store file {size / n:.2f} bytes/event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
