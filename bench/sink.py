"""ClickHouse sink under a syscall storm: target slowdown with the sink on vs off, push rate,
and bytes per event on ClickHouse beside the local store's, measured in one run.

The storm loop (getppid + 4 KiB write to /dev/null) times itself. "sink on" runs a
ClickHouseSink thread tailing the store while the target runs (in this process, as the daemon
will run it); "push" times `renacer push` of the finished run alone.
Usage: sudo .venv/bin/python bench/sink.py [--syscalls 4000000] [--url clickhouse://...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.storm import build  # noqa: E402
from renacerd.sinks.clickhouse import (  # noqa: E402
    ClickHouseClient,
    ClickHouseSink,
    parse_url,
    push_run,
)
from renacerd.store.database import Store  # noqa: E402


def trace(exe: Path, db: Path, run: str, n: int) -> float:
    """Trace one storm; the loop's own ns per syscall."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db",
                        str(db), "--run", run, "--", str(exe), str(n)],
                       capture_output=True, text=True, env=env, check=True)
    return float(p.stdout.split()[-1])


def main() -> int:
    """Run untraced, traced with the sink off, traced with the sink on; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--syscalls", type=int, default=4_000_000)
    ap.add_argument("--url", default="clickhouse://127.0.0.1:8123/renacer_bench_"
                    + uuid.uuid4().hex[:8])
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/sink.py: must run as root", file=sys.stderr)
        return 2
    client = ClickHouseClient(parse_url(a.url), 120)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        exe = build(tmp)
        n = a.syscalls
        plain = float(subprocess.run([str(exe), str(n)], capture_output=True, text=True,
                                     check=True).stdout)
        off = trace(exe, tmp / "off.db", "off", n)
        db = tmp / "on.db"
        Store(db, create=True).close()
        sink = ClickHouseSink(str(db), a.url, "on", poll_s=0.2).start()
        on = trace(exe, db, "on", n)
        t_end = time.monotonic()
        stats = sink.stop(drain_s=300)
        lag = time.monotonic() - t_end
        st = Store(db)
        info = st.run("on")
        events = info.events
        local = st.db.execute("SELECT sum(length(data)) FROM chunks WHERE run_id=?",
                              (info.id,)).fetchone()[0]
        t0 = time.monotonic()
        pushed = push_run(str(tmp / "off.db"), a.url, "off")
        push_s = time.monotonic() - t0
    client.query("OPTIMIZE TABLE events FINAL")
    ch = client.scalar(
        f"SELECT sum(bytes_on_disk) FROM system.parts WHERE active AND database = "
        f"'{client.target.database}' AND table = 'events'")
    rows = int(client.scalar("SELECT count() FROM events"))
    per_col = client.query(
        "SELECT name, data_compressed_bytes FROM system.columns WHERE database = "
        f"'{client.target.database}' AND table = 'events' FORMAT TSV").decode().split("\n")
    print(f"storm: {n} syscalls, ClickHouse {client.scalar('SELECT version()')} at {a.url}")
    print(f"{'target ns/syscall':<34} untraced {plain:7.1f}   sink off {off:7.1f}   "
          f"sink on {on:7.1f}")
    print(f"{'slowdown, sink on vs off':<34} {on / off:.3f}x")
    print(f"{'live sink':<34} {stats.events} of {events} events in {stats.batches} batches, "
          f"caught up {lag:.2f} s after the target exited, {stats.errors} "
          f"retries (last: {stats.last_error})")
    print(f"{'push of a finished run':<34} {pushed.events} events in {push_s:.2f} s = "
          f"{pushed.events / push_s / 1e6:.2f} M events/s ({pushed.bytes_sent / pushed.events:.1f}"
          f" bytes/event on the wire)")
    print(f"{'bytes per event':<34} ClickHouse {int(ch) / rows:.2f} (both runs, {rows} rows)   "
          f"local store chunks {local / events:.2f}")
    print("ClickHouse compressed bytes per event by column: " + ", ".join(
        f"{c.split(chr(9))[0]} {int(c.split(chr(9))[1]) / rows:.2f}" for c in per_col if c))
    client.query(f"DROP DATABASE {client.target.database}", database=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
