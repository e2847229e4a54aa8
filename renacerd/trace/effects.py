"""Observable effects of a run: files written, created and removed, programs run, endpoints
and GPU work, with canonical names (what compare's semantic score and a pruned run keep)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from renacerd.trace.fdtrack import ProcessFiles, created_opens, file_stats, run_files
from renacerd.trace.unified_trace import UnifiedTrace

_PROC = re.compile(r"^/proc/\d+(?=/|$)")
_TASK = re.compile(r"/task/\d+(?=/|$)")
_INODE = re.compile(r"^(pipe|socket|anon_inode):\[\d+\]$")
_PORT = re.compile(r"^(inet6?:.*):(\d+)$")
EPHEMERAL_PORT_MIN = 32768  # Linux ip_local_port_range default start
TMP_DIRS = ("/tmp/", "/var/tmp/", "/dev/shm/")
NOT_FILES = ("socket:", "pipe:", "anon_inode:", "<stdout>", "<stderr>")
CREATES = frozenset("creat mkdir mkdirat mknod mknodat link linkat symlink symlinkat".split())
REMOVES = frozenset("unlink unlinkat rmdir".split())
RENAMES = frozenset("rename renameat renameat2".split())
EXECS = frozenset({"execve", "execveat"})


def canonical_path(p: str) -> str:
    """Path with /proc pids and inode numbers replaced by placeholders (generated temp
    names are paired between the two runs instead: renacerd.compare.pathmap)."""
    m = _INODE.match(p)
    if m:
        return m.group(1) + ":"
    if p.startswith("socket:"):
        return "socket:" + canonical_endpoint(p[7:]) if len(p) > 7 else p
    p = _PROC.sub("/proc/<pid>", p)
    if p.startswith("/proc/"):
        p = _TASK.sub("/task/<tid>", p)
    return p


def canonical_endpoint(addr: str) -> str:
    """A socket address with an ephemeral port replaced by '*'."""
    m = _PORT.match(addr)
    if m and int(m.group(2)) >= EPHEMERAL_PORT_MIN:
        return f"{m.group(1)}:*"
    return addr

EFFECT_KINDS = ("written", "created", "removed", "execs", "connects", "net_sent", "net_recv",
                "stdio", "gpu_kernels", "gpu_bytes")


@dataclass(slots=True)
class Effects:
    """What a run did that someone outside it could observe."""

    written: Counter = field(default_factory=Counter)  # file -> bytes written
    created: Counter = field(default_factory=Counter)  # file -> times created
    removed: Counter = field(default_factory=Counter)  # file -> times removed
    execs: Counter = field(default_factory=Counter)  # program -> times exec'd
    connects: Counter = field(default_factory=Counter)  # endpoint -> connect/bind calls
    net_sent: Counter = field(default_factory=Counter)  # endpoint -> bytes sent
    net_recv: Counter = field(default_factory=Counter)  # endpoint -> bytes received
    stdio: Counter = field(default_factory=Counter)  # "stdout"/"stderr" -> bytes
    gpu_kernels: Counter = field(default_factory=Counter)  # kernel name -> launches
    gpu_bytes: Counter = field(default_factory=Counter)  # "h2d"/"d2h"/"d2d" -> bytes

    def items(self) -> dict[str, int]:
        """Flat `kind:key -> value` view; the units of the semantic score."""
        out: dict[str, int] = {}
        for kind in EFFECT_KINDS:
            for k, v in getattr(self, kind).items():
                if v:
                    out[f"{kind}:{k}"] = int(v)
        return out

    @classmethod
    def from_items(cls, items: dict[str, int]) -> Effects:
        """The effects back from their items() (as a pruned run stores them)."""
        e = cls()
        for item, v in items.items():
            kind, _, key = item.partition(":")
            if kind not in EFFECT_KINDS:
                raise ValueError(f"unknown effect kind {kind!r} in {item!r}")
            getattr(e, kind)[key] += int(v)
        return e


def _nrs(trace: UnifiedTrace, names: frozenset[str]) -> np.ndarray:
    return np.array([nr for nr, n in trace.table.items() if n in names], dtype=np.uint16)


def _std_names(traces: list[UnifiedTrace]) -> dict[str, str]:
    """What the run's root processes started with as stdout and stderr -> "stdout"/"stderr"."""
    pids = {t.pid for t in traces}
    std: dict[str, str] = {}
    for t in traces:
        if t.process.ppid not in pids:
            for fd, name in ((2, "stderr"), (1, "stdout")):
                if fd in t.process.initial_fds:
                    std[t.process.initial_fds[fd]] = name
    return std


def _file_effects(e: Effects, t: UnifiedTrace, pf: ProcessFiles, made: set,
                  std: dict[str, str]) -> None:
    """Bytes one process wrote to files, sockets and stdio, and the files it created."""
    for path, fs in file_stats(t, pf, made).items():
        got, wrote = fs.bytes_read, fs.bytes_written
        if fs.created:
            e.created[canonical_path(path)] += 1
        if path.startswith("socket:") and got:
            e.net_recv[_endpoint(path)] += got
        if path in std:
            e.stdio[std[path]] += wrote
        elif path.startswith("socket:"):
            e.net_sent[_endpoint(path)] += wrote
        elif wrote:
            e.written[canonical_path(path)] += wrote


def _call_effects(e: Effects, t: UnifiedTrace, pf: ProcessFiles,
                  renames: list[tuple[int, str, str]]) -> None:
    """Creates, removes, execs, connects and sends of one process; its renames to renames."""
    c = t.columns
    ok = c["ret"] >= 0
    nr = c["nr"]

    def path(col: np.ndarray, i: int) -> str:
        return t.string(int(col[i])) or ""

    for i in np.flatnonzero(ok & np.isin(nr, _nrs(t, CREATES))):
        e.created[canonical_path(path(pf.path1 if _two(t, i) else pf.path0, i))] += 1
    for i in np.flatnonzero(ok & np.isin(nr, _nrs(t, REMOVES))):
        e.removed[canonical_path(path(pf.path0, i))] += 1
    for i in np.flatnonzero(ok & np.isin(nr, _nrs(t, RENAMES))):
        renames.append((int(c["ts"][i]), path(pf.path0, i), path(pf.path1, i)))
    for i in np.flatnonzero(ok & np.isin(nr, _nrs(t, EXECS))):
        e.execs[canonical_path(path(pf.path0, i) or "?")] += 1
    # connect may legitimately return -EINPROGRESS on a non-blocking socket
    cok = ok | (c["ret"] == -115)
    for i in np.flatnonzero(cok & np.isin(nr, _nrs(t, frozenset({"connect", "bind"})))):
        if c["s0"][i] >= 0:
            e.connects[canonical_endpoint(t.string(int(c["s0"][i])) or "")] += 1
    for i in np.flatnonzero((c["ret"] > 0) & np.isin(nr, _nrs(t, frozenset({"sendto"})))
                            & (c["s0"] >= 0)):
        e.net_sent[canonical_endpoint(t.string(int(c["s0"][i])) or "")] += int(c["ret"][i])


def apply_renames(e: Effects, renames: list[tuple[int, str, str]]) -> None:
    """Move written and created counts to each file's final name, renames in time order."""
    for _, old, new in sorted(renames):
        # write-to-temp-then-rename: the bytes end up under the final name
        o, n = canonical_path(old), canonical_path(new)
        if o in e.written:
            e.written[n] += e.written.pop(o)
        if o in e.created:
            e.created[n] += e.created.pop(o)


def run_effects(traces: list[UnifiedTrace], ids: dict[int, np.ndarray] | None = None, *,
                files: dict[int, ProcessFiles] | None = None,
                renames: list[tuple[int, str, str]] | None = None,
                made: dict[int, set[int]] | None = None) -> Effects:
    """Effects of a whole run (every process), with canonical names. `files`: the run's
    resolved files when the caller has them already; `renames`: a list that takes the
    run's renames (ts, old, new) instead of applying them (a run folded part by part
    applies them all at its end: apply_renames); `made`: its created_opens when known."""
    e = Effects()
    if not traces:
        return e
    if files is None:
        files = _files(traces, ids)
    if made is None:
        made = created_opens(traces, files)
    std = _std_names(traces)
    pending: list[tuple[int, str, str]] = [] if renames is None else renames
    for t in traces:
        _file_effects(e, t, files[t.pid], made.get(t.pid, set()), std)
        if not len(t):
            continue
        _call_effects(e, t, files[t.pid], pending)
        if t.gpu:
            _gpu(t, e)
    if renames is None:
        apply_renames(e, pending)
    return e


def _files(traces: list[UnifiedTrace],
           ids: dict[int, np.ndarray] | None) -> dict[int, ProcessFiles]:
    """The run's resolved files: those run_fd_path_ids left on the traces, else replayed."""
    have = {t.pid: t.files for t in traces if isinstance(t.files, ProcessFiles)}
    if len(have) == len(traces) and (ids is None or all(ids[p] is f.fd
                                                         for p, f in have.items())):
        return have
    return run_files(traces)


def _endpoint(path: str) -> str:
    """The peer of a socket file; both ends of a socketpair are one local endpoint."""
    if _INODE.match(path):
        return "socketpair"
    return canonical_endpoint(path[7:]) or "?"


def _two(t: UnifiedTrace, i: int) -> bool:
    """link/symlink create their second path."""
    return t.table.get(int(t.columns["nr"][i]), "") in ("link", "linkat", "symlink", "symlinkat")


def _gpu(t: UnifiedTrace, e: Effects) -> None:
    from renacerd.trace.gpu_trace import gpu_summary

    # a precomputed summary (e.g. built by hand or carried by an exporter) wins
    summary = t.gpu["summary"] if "summary" in t.gpu else gpu_summary(t)
    for name, n in (summary.get("kernels") or {}).items():
        e.gpu_kernels[str(name)] += int(n)
    mem = summary.get("memcpy") or {}
    for d in ("h2d", "d2h", "d2d"):
        if mem.get(f"{d}_bytes"):
            e.gpu_bytes[d] += int(mem[f"{d}_bytes"])
