"""UnifiedTrace: one process's syscall (and GPU) layers as numpy columns, plus its spans."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from renacerd.columns import SYSCALL_COLUMNS
from renacerd.records import F_DETAIL_LOST, F_NO_ENTER, F_READ_FAILED, F_TRUNCATED
from renacerd.syscall_table import RESTART_ERRNOS, errno_name, name_of, syscall_table

# syscalls whose a0 is a file descriptor (for -y style decoding and fd -> path attribution)
FD_SYSCALLS = frozenset(
    """read write pread64 pwrite64 readv writev preadv pwritev preadv2 pwritev2 close fstat
    lseek fsync fdatasync ftruncate getdents64 getdents fchmod fchown fcntl ioctl flock
    sendfile recvfrom sendto recvmsg sendmsg recvmmsg sendmmsg connect bind listen accept
    accept4 shutdown getsockname getpeername setsockopt getsockopt dup dup2 dup3
    fallocate fadvise64 readahead sync_file_range copy_file_range splice tee vmsplice
    epoll_ctl fstatfs syncfs""".split()
)
READ_FAMILY = frozenset("read pread64 readv preadv preadv2 recvfrom recvmsg".split())
WRITE_FAMILY = frozenset("write pwrite64 writev pwritev pwritev2 sendto sendmsg".split())
# where the path captured for s0/s1 lives in the argument list (for display)
PATH_ARG = {"execve": "filename", "execveat": "filename"}
# calls whose aux column holds the open flags and mode column the mode (openat2: resolve too)
OPEN_FAMILY = frozenset({"open", "openat", "openat2", "creat"})
# event flags saying an argument of the record is missing or cut
INCOMPLETE = F_NO_ENTER | F_TRUNCATED | F_READ_FAILED | F_DETAIL_LOST


@dataclass(slots=True)
class ProcessSpan:
    """The process layer: who, when, and how it ended."""

    pid: int
    ppid: int = 0
    name: str = ""
    exe: str = ""
    argv: list[str] = field(default_factory=list)
    start_mono_ns: int = 0
    end_mono_ns: int | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    nspid: int | None = None
    attached: bool = False
    initial_fds: dict[int, str] = field(default_factory=dict)
    dist: Any = None  # renacerd.client.dist_env.DistInfo: its rank in a distributed job, if any


@dataclass(slots=True)
class SyscallRecord:
    """One syscall, as renacer's syscall span layer has it."""

    name: str
    args: dict[str, Any]
    return_value: int
    timestamp_nanos: int
    duration_nanos: int
    errno: int | None
    tid: int
    partial: bool = False  # something of the call is not in the record (see INCOMPLETE)
    truncated: bool = False  # a path or argv was cut at the capture bounds


def _empty_columns() -> dict[str, np.ndarray]:
    return {name: np.empty(0, dtype=dt) for name, dt in SYSCALL_COLUMNS}


class UnifiedTrace:
    """All layers of one traced process.

    `columns` holds the syscall layer (ts, dur, ret, a0, tid, nr, flags, s0, s1), sorted by
    enter time; s0/s1 index `strings` (paths, addresses, argv; -1 = none).
    """

    __slots__ = (
        "pid",
        "name",
        "process",
        "columns",
        "strings",
        "table",
        "spans",
        "span_index",
        "gpu",
        "run",
        "files",
    )

    def __init__(self, pid: int, name: str) -> None:
        self.pid = pid
        self.name = name
        self.process = ProcessSpan(pid=pid, name=name)
        self.columns: dict[str, np.ndarray] = _empty_columns()
        self.strings: list[bytes] = []
        self.table: dict[int, str] = syscall_table()
        self.spans: list[Any] = []
        self.span_index = np.empty(0, dtype=np.int64)
        self.gpu: dict[str, Any] = {}
        self.run: str | None = None
        # fdtrack.ProcessFiles once fdtrack.run_files has resolved the run's files
        self.files: Any = None

    def __len__(self) -> int:
        return len(self.columns["ts"])

    # -- columns ---------------------------------------------------------------------
    def names(self) -> np.ndarray:
        """Syscall name per event (object array)."""
        nr = self.columns["nr"]
        uniq, inv = np.unique(nr, return_inverse=True)
        lut = np.array([name_of(int(u), self.table) for u in uniq], dtype=object)
        return lut[inv] if len(nr) else np.empty(0, dtype=object)

    def nr_of(self, name: str) -> int | None:
        """The number of syscall `name` in this trace's table."""
        for nr, n in self.table.items():
            if n == name:
                return nr
        return None

    def string(self, sid: int) -> str | None:
        """The string with id `sid` as text (bytes that are not UTF-8 as surrogate escapes,
        renacerd.escaping), or None."""
        if sid < 0 or sid >= len(self.strings):
            return None
        return self.strings[sid].decode("utf-8", "surrogateescape")

    def texts(self) -> list[str]:
        """The whole string table as text for UTF-8 formats (renacerd.escaping.json_text:
        bytes that are not UTF-8 as \\xNN), indexed by id."""
        from renacerd.escaping import json_text

        return [json_text(s.decode("utf-8", "surrogateescape")) for s in self.strings]

    def errors(self) -> np.ndarray:
        """Boolean mask: the call failed (-4095 <= ret < 0), interrupted calls excepted."""
        r = self.columns["ret"]
        return (r < 0) & (r >= -4095) & ~self.interrupted()

    def interrupted(self) -> np.ndarray:
        """Boolean mask: a signal interrupted the call (ERESTART*): the kernel restarts it
        or turns it into EINTR, and the program never sees this value."""
        return np.isin(self.columns["ret"], -np.array(sorted(RESTART_ERRNOS), dtype=np.int64))

    # -- records ---------------------------------------------------------------------
    def syscalls(self) -> Iterator[SyscallRecord]:
        """Iterate over syscall records (convenient, not fast: use the columns for bulk work)."""
        c = self.columns
        names = self.names()
        files = self.files
        for i in range(len(self)):
            ret = int(c["ret"][i])
            name = names[i]
            args: dict[str, Any] = {}
            if name in FD_SYSCALLS:
                args["fd"] = int(np.int64(c["a0"][i]))
            elif name in ("exit", "exit_group"):
                args["status"] = int(c["a0"][i]) & 0xFF
            s0, s1 = int(c["s0"][i]), int(c["s1"][i])
            if s0 >= 0:
                args["path" if name not in ("connect", "bind", "sendto", "accept", "accept4",
                                            "getpeername", "getsockname") else "addr"] = (
                    self.string(s0)
                )
            if s1 >= 0:
                if name in ("execve", "execveat"):
                    args["argv"] = [
                        a.decode("utf-8", "surrogateescape")
                        for a in self.strings[s1].split(b"\0")
                    ]
                else:
                    args["path2"] = self.string(s1)
            if files is not None:
                # the raw arguments stay in path/path2; these are the files they named
                for key, col in (("abs_path", files.path0), ("abs_path2", files.path1),
                                 ("file", files.fd)):
                    sid = int(col[i])
                    if sid >= 0 and not (key == "file" and "fd" not in args):
                        args[key] = self.string(sid)
            if name in OPEN_FAMILY:
                args["flags"] = int(c["aux"][i])
                m = int(c["mode"][i])
                args["mode"] = m & 0xFFFF
                if name == "openat2":
                    args["resolve"] = m >> 16
            fl = int(c["flags"][i])
            err = -ret if -4095 <= ret < 0 else None
            yield SyscallRecord(
                name=name,
                args=args,
                return_value=ret,
                timestamp_nanos=int(c["ts"][i]),
                duration_nanos=int(c["dur"][i]),
                errno=err,
                tid=int(c["tid"][i]),
                partial=bool(fl & INCOMPLETE),
                truncated=bool(fl & F_TRUNCATED),
            )

    __iter__ = syscalls

    def errno_name(self, err: int | None) -> str:
        """E-name of an errno value, the kernel's internal ones (ERESTARTSYS...) included."""
        return errno_name(err)
