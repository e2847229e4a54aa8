"""What either tracer says a process did, in one shape, so the two can be compared."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

# mkstemp-style names differ between two runs of one program; masked before pairing
TEMP_NAME = re.compile(r"(?<=/cc)[A-Za-z0-9]{6}(?=\.\w+$)|(?<=tmp_obj_)[A-Za-z0-9]{6}")
PROC_PID = re.compile(r"^/proc/(\d+|self|thread-self)(?=/|$)")


@dataclass(slots=True)
class Proc:
    """One process (all its threads): its image, its end, its calls and its files."""

    pid: int
    parent: int | None
    argv: list[str] = field(default_factory=list)
    order: int = 0
    exit_code: int | None = None
    exit_signal: int | None = None
    calls: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    files: dict[str, list[int]] = field(default_factory=dict)

    def add_io(self, path: str, read: int, written: int) -> None:
        """Count bytes moved to or from `path` (already normalised)."""
        rw = self.files.setdefault(path, [0, 0])
        rw[0] += read
        rw[1] += written


def mask_temp(s: str) -> str:
    """`s` with mkstemp's random characters replaced by XXXXXX."""
    return TEMP_NAME.sub("XXXXXX", s)


def file_key(path: str) -> str:
    """The key two tracers' file names are compared under: temp names masked, /proc/PID
    generic, an absolute path canonical (symlinks resolved, as the kernel's d_path is)."""
    path = path.removesuffix(" (deleted)")
    if path.startswith("/proc/"):
        return PROC_PID.sub("/proc/PID", path)
    if path.startswith("/"):
        path = os.path.realpath(path)
    return mask_temp(path)


def tree_keys(procs: dict[int, Proc]) -> dict[tuple, Proc]:
    """Each process under a key made of its ancestry: (program name, n-th such sibling)
    per level, so two runs pair processes by tree position and argv, never by pid."""
    kids: dict[int | None, list[Proc]] = {}
    for p in procs.values():
        parent = p.parent if p.parent in procs else None
        kids.setdefault(parent, []).append(p)
    out: dict[tuple, Proc] = {}

    def walk(parent: int | None, prefix: tuple) -> None:
        seen: Counter = Counter()
        for p in sorted(kids.get(parent, []), key=lambda q: q.order):
            name = mask_temp(os.path.basename(p.argv[0])) if p.argv else "?"
            key = (*prefix, (name, seen[name]))
            seen[name] += 1
            out[key] = p
            walk(p.pid, key)

    walk(None, ())
    return out


def label(key: tuple) -> str:
    """A process key as text: `make/sh#1/cat`."""
    return "/".join(n if i == 0 else f"{n}#{i}" for n, i in key)
