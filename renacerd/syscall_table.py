"""Syscall number -> name for x86-64, complete for the running kernel (bcc's stops at 334)."""

from __future__ import annotations

import errno as _errno
import functools
import platform
import re
from pathlib import Path

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
UNISTD_HEADERS = (
    "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
    "/usr/include/asm/unistd_64.h",
)

# The x86-64 numbers the daemon itself acts on (process exit, exec, library opens).
NR_OPEN, NR_OPENAT, NR_OPENAT2 = 2, 257, 437
NR_EXECVE, NR_EXECVEAT = 59, 322
NR_EXIT, NR_EXIT_GROUP = 60, 231

# x86-64 numbers are append-only. The distribution's uapi header lags the running kernel
# (Debian 12 ships 6.1's, ending at 450), so numbers added since are listed here, with the
# kernel release that added them. Tracefs gives names but not numbers (its `id` files are
# trace-event ids), so `missing_from_table()` cross-checks this table against tracefs.
NEWER_X86_64 = {
    335: "uretprobe",  # 6.11
    336: "uprobe",  # 6.16
    451: "cachestat",  # 6.5
    452: "fchmodat2",  # 6.6
    453: "map_shadow_stack",  # 6.6
    454: "futex_wake",  # 6.7
    455: "futex_wait",  # 6.7
    456: "futex_requeue",  # 6.7
    457: "statmount",  # 6.8
    458: "listmount",  # 6.8
    459: "lsm_get_self_attr",  # 6.8
    460: "lsm_set_self_attr",  # 6.8
    461: "lsm_list_modules",  # 6.8
    462: "mseal",  # 6.10
    463: "setxattrat",  # 6.13
    464: "getxattrat",  # 6.13
    465: "listxattrat",  # 6.13
    466: "removexattrat",  # 6.13
    467: "open_tree_attr",  # 6.15
    468: "file_getattr",  # 6.17
    469: "file_setattr",  # 6.17
}

# tracefs event names that differ from the syscall's user-visible name
TRACEFS_ALIASES = {
    "newfstat": "fstat",
    "newstat": "stat",
    "newlstat": "lstat",
    "newuname": "uname",
    "sendfile64": "sendfile",
    "umount": "umount2",
}


# Error codes internal to the kernel (include/linux/errno.h), named as strace names them.
# A syscall's exit tracepoint sees them before the kernel turns them into what the program
# gets: ERESTART* mean a signal interrupted the call, which is then restarted (on
# ERESTART_RESTARTBLOCK through restart_syscall) or fails with EINTR.
KERNEL_ERRNOS = {
    512: "ERESTARTSYS",
    513: "ERESTARTNOINTR",
    514: "ERESTARTNOHAND",
    515: "ENOIOCTLCMD",
    516: "ERESTART_RESTARTBLOCK",
    517: "EPROBE_DEFER",
    518: "EOPENSTALE",
    519: "ENOPARAM",
    521: "EBADHANDLE",
    522: "ENOTSYNC",
    523: "EBADCOOKIE",
    524: "ENOTSUPP",
    525: "ETOOSMALL",
    526: "ESERVERFAULT",
    527: "EBADTYPE",
    528: "EJUKEBOX",
    529: "EIOCBQUEUED",
    530: "ERECALLCONFLICT",
    531: "ENOGRACE",
}
# Interrupted, not failed: the program never sees these.
RESTART_ERRNOS = frozenset({512, 513, 514, 516})


def errno_name(err: int | None) -> str:
    """E-name of an errno value (the kernel's internal ones too); the number when unknown."""
    e = err or 0
    return _errno.errorcode.get(e) or KERNEL_ERRNOS.get(e) or str(err)


def tracefs_root() -> Path | None:
    """The mounted tracefs, or None."""
    for d in TRACEFS_DIRS:
        p = Path(d)
        if (p / "events").is_dir():
            return p
    return None


def from_header(path: str) -> dict[int, str]:
    """Parse `#define __NR_name nr` lines of an asm/unistd header."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    return {int(nr): name for name, nr in re.findall(r"#define __NR_(\w+)\s+(\d+)", text)}


@functools.lru_cache(maxsize=1)
def syscall_table() -> dict[int, str]:
    """The complete number -> name table for this machine."""
    table: dict[int, str] = {}
    for h in UNISTD_HEADERS:
        table = from_header(h)
        if table:
            break
    if platform.machine() == "x86_64":
        for nr, name in NEWER_X86_64.items():
            table.setdefault(nr, name)
    return table


def kernel_syscall_names() -> set[str]:
    """Names of the syscalls the running kernel has tracepoints for (user-visible names)."""
    root = tracefs_root()
    if root is None:
        return set()
    names = set()
    for d in (root / "events" / "syscalls").glob("sys_enter_*"):
        n = d.name[len("sys_enter_") :]
        names.add(TRACEFS_ALIASES.get(n, n))
    return names


def missing_from_table() -> list[str]:
    """Syscalls the kernel has that the table cannot number."""
    known = set(syscall_table().values())
    return sorted(kernel_syscall_names() - known)


def name_of(nr: int, table: dict[int, str] | None = None) -> str:
    """The name of syscall `nr`, or `syscall_<nr>` as strace prints unknown ones."""
    t = syscall_table() if table is None else table
    return t.get(nr, f"syscall_{nr}")
