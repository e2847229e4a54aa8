"""Benchmark `renacer ranks --html`: render the per-rank page of R ranks x S steps of
`renacer ranks --json`-shaped data built in memory (step_ms = 100 + (7k + r) mod 13, a
straggler every 97th step), so only the page is timed.
Run: PYTHONPATH=. .venv/bin/python bench/ranks_html.py [--ranks 8 --steps 10000]
"""

from __future__ import annotations

import argparse
import time

from renacerd.reports.compare_html import render_ranks_html


def data(ranks: int, steps: int) -> dict:
    """The synthetic report."""
    out = []
    for k in range(1, steps + 1):
        per = {str(r): {"step_ms": 100.0 + (k * 7 + r) % 13, "wait_ms": 10.0 + r,
                        "work_ms": 90.0 - r + (k * 7 + r) % 13} for r in range(ranks)}
        strag = {"rank": k % ranks, "late_ms": 12.0, "causes": []} if k % 97 == 0 else None
        out.append({"step": k, "ranks": per, "straggler": strag, "everyone_slow": False,
                    "after_desync": False})
    return {"run": "bench", "status": "complete", "min_late_ms": 10.0,
            "ranks": [{"rank": r} for r in range(ranks)], "steps": out, "stragglers": [],
            "slow_steps": [], "desync": None, "waiting": []}


def main() -> None:
    """Time one render."""
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--steps", type=int, default=10_000)
    a = p.parse_args()
    d = data(a.ranks, a.steps)
    t = time.perf_counter()
    page = render_ranks_html(d)
    dt = time.perf_counter() - t
    print(f"{a.ranks} ranks x {a.steps} steps: {dt * 1000:.0f} ms, {len(page) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
