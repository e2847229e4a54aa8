"""What /proc says about a process, through psutil where it has it."""

from __future__ import annotations

import os

import psutil

from renacerd.records import AT_FDCWD
from renacerd.trace.unified_trace import ProcessSpan

PF_KTHREAD = 0x00200000


class TargetError(ValueError):
    """A pid that cannot be traced (one clear line for the user)."""


def is_kernel_thread(pid: int) -> bool:
    """PF_KTHREAD is set in /proc/PID/stat's flags field."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return bool(int(fields[6]) & PF_KTHREAD)


def check_target(pid: int) -> None:
    """Raise TargetError unless `pid` is a live user process other than ourselves."""
    if pid <= 0:
        raise TargetError(f"invalid pid {pid}")
    if pid == os.getpid():
        raise TargetError(f"pid {pid} is renacerd itself")
    if not psutil.pid_exists(pid):
        raise TargetError(f"no process with pid {pid}")
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            raise TargetError(f"process {pid} has already exited (zombie)")
    except psutil.NoSuchProcess as e:
        raise TargetError(f"no process with pid {pid}") from e
    if is_kernel_thread(pid):
        raise TargetError(f"pid {pid} is a kernel thread; only user processes can be traced")


def nspid(pid: int) -> int | None:
    """The pid inside the process's own pid namespace, when it differs."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                inner = int(ids[-1])
                return inner if inner != pid else None
    except (OSError, ValueError):
        pass
    return None


O_CLOEXEC = 0o2000000


def fd_table(pid: int, after_exec: bool = False) -> dict[int, str]:
    """Open fds and what they point to; `after_exec` leaves out the close-on-exec ones."""
    out: dict[int, str] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for n in names:
        try:
            if after_exec:
                info = open(f"/proc/{pid}/fdinfo/{n}").read()
                flags = int(info.split("flags:")[1].split()[0], 8)
                if flags & O_CLOEXEC:
                    continue
            out[int(n)] = os.readlink(f"/proc/{pid}/fd/{n}")
        except (OSError, ValueError, IndexError):
            continue
    return out


def snapshot(pid: int, start_mono_ns: int, attached: bool) -> ProcessSpan:
    """A ProcessSpan filled from /proc for a process we start tracing now."""
    p = psutil.Process(pid)
    with p.oneshot():
        try:
            exe = p.exe()
        except (psutil.AccessDenied, psutil.ZombieProcess, FileNotFoundError):
            exe = ""
        try:
            argv = p.cmdline()
        except (psutil.AccessDenied, psutil.ZombieProcess):
            argv = []
        fds = fd_table(pid, after_exec=not attached)
        try:
            # where relative paths start: fdtrack follows chdir/fchdir from here
            fds[AT_FDCWD] = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            pass
        return ProcessSpan(
            pid=pid,
            ppid=p.ppid(),
            name=p.name(),
            exe=exe,
            argv=argv,
            start_mono_ns=start_mono_ns,
            nspid=nspid(pid),
            attached=attached,
            initial_fds=fds,
        )


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of `pid`, parents before children."""
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
