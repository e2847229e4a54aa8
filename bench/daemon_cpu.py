"""renacerd's own CPU per captured event, steady state: the PyTorch loop of torch_loop.py
traced twice, short and long; (CPU long - CPU short) / (events long - events short) leaves
out start-up (BPF compile, imports) and shut-down.

Usage: sudo .venv/bin/python bench/daemon_cpu.py [--short 100] [--long 1600] [--repeat 2]
(needs torch, like torch_loop.py)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"(\d+) events,.*?CPU ([\d.]+) s", re.S)


def traced(db: Path, shards: Path, steps: int, run: str) -> tuple[int, float]:
    """(events, daemon CPU seconds) of one traced run of `steps` steps."""
    out = subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacerd_main", "--db", str(db), "--run", run,
         "--", sys.executable, str(ROOT / "bench" / "torch_loop.py"), "--steps", str(steps),
         "--warmup", "10", "--workload", str(shards)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    ).stdout
    m = SUMMARY.search(out)
    if m is None:
        raise RuntimeError(f"no summary in renacerd's output:\n{out}")
    return int(m[1]), float(m[2])


def main() -> int:
    """Print ns of daemon CPU per event for each repeat."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=100)
    ap.add_argument("--long", type=int, default=1600)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/daemon_cpu.py: must run as root", file=sys.stderr)
        return 2
    if a.long <= a.short:
        print("bench/daemon_cpu.py: --long must exceed --short", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from bench.torch_loop import make_shards

    with tempfile.TemporaryDirectory() as d:
        shards = make_shards(Path(d))
        db = Path(d) / "t.db"
        for r in range(a.repeat):
            e1, c1 = traced(db, shards, a.short, f"s{r}")
            e2, c2 = traced(db, shards, a.long, f"l{r}")
            print(f"{a.short} steps: {e1:,} events, daemon CPU {c1:.2f} s; {a.long} steps: "
                  f"{e2:,} events, {c2:.2f} s => {(c2 - c1) / (e2 - e1) * 1e9:.0f} ns of "
                  f"daemon CPU per event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
