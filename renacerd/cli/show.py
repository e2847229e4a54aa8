"""`renacer show RUN`: what a run did, per process."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from renacerd.cli.common import Parser, add_db, fail, print_json
from renacerd.escaping import escape

PROG = "renacer show"


def _tree(procs: list[dict[str, Any]]) -> list[str]:
    by_parent: dict[int, list[dict]] = {}
    pids = {p["pid"] for p in procs}
    for p in procs:
        by_parent.setdefault(p["ppid"] if p["ppid"] in pids else -1, []).append(p)
    lines: list[str] = []

    def walk(p: dict, depth: int) -> None:
        end = (
            f"exit {p['exit_code']}" if p["exit_code"] is not None
            else f"killed by signal {p['exit_signal']}" if p["exit_signal"] is not None
            else "running/unknown"
        )
        argv = " ".join(escape(a) for a in p["argv"][:6])
        r = p.get("rank") or {}
        rank = (f" rank {r['rank']}/{r['world_size']} local {r['local_rank']}"
                if r.get("rank") is not None else "")
        lines.append(f"{'  ' * depth}{p['pid']} {escape(p['comm'])} [{end}]{rank} {argv}")
        if p.get("stopped_following"):
            lines.append(f"{'  ' * depth}  stopped following: {p['stopped_following']}")
        for c in by_parent.get(p["pid"], []):
            walk(c, depth + 1)

    for r in by_parent.get(-1, []):
        walk(r, 0)
    return lines


def render_text(d: dict[str, Any], out) -> None:
    """Human report: header, losses, tree, then per process a strace -c table and files."""
    w = out.write
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((d["start_wall_ns"] or 0) / 1e9))
    w(f"run {escape(d['run'])}  status {d['status']}  host {escape(d['host'])}  "
      f"started {started}\n")
    w(f"command: {' '.join(escape(a) for a in d['cmdline'])}\n")
    lost = d["lost"]
    if d["lost_events"] or lost["failed_reads"] or lost.get("truncated"):
        w(f"!! LOSSES: {lost['events']} events and {lost['details']} argument records dropped "
          f"(ring buffer full), {lost['failed_reads']} failed argument reads, "
          f"{lost.get('truncated', 0)} records truncated (path over 4096 bytes, argv over "
          "4096 bytes or 128 arguments)\n")
    else:
        w("losses: none (0 events dropped, 0 failed reads, 0 truncated)\n")
    if d["status"] != "complete":
        w(f"!! run is {d['status']}: {escape(d.get('error') or 'trace may be partial')}\n")
    w("\nprocess tree:\n")
    for line in _tree(d["processes"]):
        w(f"  {line}\n")
    for p in d["processes"]:
        w(f"\n== pid {p['pid']} {escape(p['comm'])}: {p['events']} syscalls, "
          f"{p['threads']} thread(s)\n")
        total = sum(s["total_ns"] for s in p["syscalls"].values()) or 1
        w(f"{'% time':>6} {'seconds':>11} {'usecs/call':>11} {'calls':>9} {'errors':>9} syscall\n")
        w(f"{'-' * 6} {'-' * 11} {'-' * 11} {'-' * 9} {'-' * 9} {'-' * 16}\n")
        for name, s in p["syscalls"].items():
            w(f"{100 * s['total_ns'] / total:6.2f} {s['total_ns'] / 1e9:11.6f} "
              f"{s['total_ns'] / 1e3 / s['calls']:11.0f} {s['calls']:9d} "
              f"{s['errors'] or '':>9} {name}\n")
        calls = sum(s["calls"] for s in p["syscalls"].values())
        errs = sum(s["errors"] for s in p["syscalls"].values())
        w(f"{100:6.2f} {total / 1e9:11.6f} {'':>11} {calls:9d} {errs or '':>9} total\n")
        intr = sum(s.get("interrupted", 0) for s in p["syscalls"].values())
        if intr:
            w(f"{intr} call(s) interrupted by a signal (ERESTART*: restarted or EINTR), "
              "not counted as errors\n")
        if p["files"]:
            w("top files:                                  read      written\n")
            for path, f in list(p["files"].items())[:10]:
                how = ",".join(k for k in ("created", "truncated", "appended") if f.get(k))
                w(f"  {escape(path)[:38]:<38} {f['bytes_read']:>10} {f['bytes_written']:>12}"
                  f"{'  ' + how if how else ''}\n")
        _render_gpu(p.get("gpu") or {}, w)


def _render_gpu(g: dict[str, Any], w) -> None:
    m, al = g.get("memcpy", {}), g.get("malloc", {})
    if not (g.get("kernels") or any(m.values()) or al.get("calls") or g.get("nccl")):
        return
    w(f"GPU: H2D {m.get('h2d_bytes', 0)} B, D2H {m.get('d2h_bytes', 0)} B, "
      f"D2D {m.get('d2d_bytes', 0)} B; malloc {al.get('calls', 0)} ({al.get('bytes', 0)} B), "
      f"free {g.get('free', {}).get('calls', 0)}; sync {g.get('sync', {}).get('calls', 0)} "
      f"({g.get('sync', {}).get('time_ns', 0) / 1e6:.2f} ms)\n")
    out = g.get("outstanding", {})
    if out.get("allocations"):
        w(f"  !! {out['allocations']} allocations ({out['bytes']} B) never freed\n")
    if g.get("unresolved_kernels"):
        w(f"  {g['unresolved_kernels']} launches with unresolved kernel names (shown as hex)\n")
    for name, n in sorted(g.get("kernels", {}).items(), key=lambda kv: -kv[1])[:10]:
        w(f"  {n:>8} launches  {escape(name)[:70]}\n")
    for op, n in g.get("nccl", {}).items():
        w(f"  {n:>8} x {op}\n")


def _emit(data: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any], Any], None]
          ) -> int:
    """Print the data as JSON or through its text renderer; the exit code 0."""
    if as_json:
        print_json(data)
    else:
        render(data, sys.stdout)
    return 0


def main(argv: list[str]) -> int:
    """Entry point."""
    p = Parser(prog=PROG, description="Show a run: process tree, syscall tables, files.")
    p.add_argument("run", help="run name, or clickhouse://HOST:8123/DB/RUN")
    add_db(p)
    p.add_argument("--json", action="store_true", help="machine-readable (stable contract)")
    p.add_argument("--by", choices=["process", "step"], default="process",
                   help="group by process (default) or by experiment step, outliers flagged")
    a = p.parse_args(argv)
    from renacerd.io.load import LoadError, RunLoader

    try:
        run, traces = RunLoader(a.db).load(a.run, files=False)
    except LoadError as e:
        return fail(PROG, str(e))
    if a.by == "step":
        from renacerd.reports.steps import render_steps, steps_data

        return _emit(steps_data(run, traces), a.json, render_steps)
    from renacerd.reports.show import show_data

    return _emit(show_data(run, traces), a.json, render_text)
