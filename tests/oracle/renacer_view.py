"""Read a renacerd run back as the user does (`renacer show RUN --json`) into Procs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.oracle.model import Proc, file_key

ROOT = Path(__file__).resolve().parents[2]
# `files` keys that name no file: sockets, pipes, and fds renacerd could not name
NOT_FILES = ("socket:", "pipe:", "anon_inode:", "?", "<")


def show_json(db: Path, run: str) -> dict:
    """`renacer show RUN --json` on the store `db`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "renacerd.cli.renacer_main", "show", run,
                        "--json", "--db", str(db)], capture_output=True, text=True, env=env,
                       timeout=120, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"renacer show {run} failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


def processes(shown: dict) -> dict[int, Proc]:
    """Per-process views of a `show --json` document."""
    procs: dict[int, Proc] = {}
    for d in shown["processes"]:
        p = Proc(pid=d["pid"], parent=d["ppid"], argv=list(d["argv"]),
                 order=d["start_mono_ns"] or 0, exit_code=d["exit_code"],
                 exit_signal=d["exit_signal"])
        for name, s in d["syscalls"].items():
            p.calls[name] = s["calls"]
            if s["errors"]:
                p.errors[name] = s["errors"]
        for path, f in d["files"].items():
            if not path.startswith(NOT_FILES):
                p.add_io(file_key(path), f["bytes_read"], f["bytes_written"])
        procs[p.pid] = p
    return procs


def losses(shown: dict) -> int:
    """Everything the run says it lost or cut: events, argument records, failed reads,
    truncated records (strace loses and cuts nothing at this -s)."""
    lost = shown["lost"]
    cut = lost.get("truncated", 0)
    cut = sum(cut.values()) if isinstance(cut, dict) else cut
    return shown["lost_events"] + lost["failed_reads"] + cut
