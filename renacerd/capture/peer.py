"""Who is on the other end of a front connection, pinned at accept and checked before tracing.

SO_PEERCRED names the pid that connected, but a pid is only a number: the process may exit
and its pid go to another user's job, or exec a setuid program, before it asks to be traced.
So the service pins the process itself at accept (a pidfd from SO_PEERPIDFD, and its start
time from /proc/PID/stat either way) and, before a tracer is started for it and again before
the ack, checks that the pid is still that process, that its real, effective, saved and
filesystem uids all equal the uid that connected, and that it is dumpable (a process made
non-dumpable by a privilege change has the files of its /proc directory owned by root).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import Optional

# Linux 6.5+; Python 3.11's socket module does not name it (asm-generic value, x86-64 too).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_PEERCRED = struct.Struct("3i")


class PeerChanged(Exception):
    """The pinned process is gone or no longer runs with the credentials that connected."""


@dataclass(slots=True)
class Peer:
    """A front connection's SO_PEERCRED, pinned: its pidfd (None where the kernel has none)
    and start time (clock ticks after boot; 0 when the process was gone at accept)."""

    pid: int
    uid: int
    gid: int
    pidfd: Optional[int] = None
    start_time: int = 0

    def close(self) -> None:
        """Release the pidfd."""
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat; ProcessLookupError when the process is gone, OSError
    (e.g. EMFILE) when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
    # The name (field 2) may hold spaces and parentheses: count from the last ')'.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def peer_cred(conn: socket.socket) -> tuple[int, int, int]:
    """The (pid, uid, gid) the kernel recorded for a connection's peer (SO_PEERCRED)."""
    pid, uid, gid = _PEERCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid, gid


def pin(conn: socket.socket) -> Peer:
    """The peer of an accepted connection, pinned to the process that connected."""
    peer = Peer(*peer_cred(conn))
    try:
        peer.pidfd = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        os.set_inheritable(peer.pidfd, False)
    except OSError as e:
        # ENOPROTOOPT: a kernel before 6.5 (the start time alone pins it); ESRCH: already
        # reaped, so nothing it asks for can be traced (start_time stays 0).
        if e.errno == errno.ESRCH:
            return peer
    try:
        peer.start_time = start_time(peer.pid)
    except (OSError, ValueError, IndexError):
        peer.start_time = 0
    return peer


def _pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to now: -1 once that process has been reaped."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise PeerChanged("the kernel's pidfd information has no Pid line")


def _uids(pid: int) -> tuple[list[int], list[int]]:
    """Real, effective, saved and fs uids and gids of `pid` from /proc/PID/status."""
    uids: list[int] = []
    gids: list[int] = []
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uids = [int(x) for x in line.split()[1:5]]
            elif line.startswith("Gid:"):
                gids = [int(x) for x in line.split()[1:5]]
                break
    return uids, gids


def check_traceable(pid: int, uid: int, pinned: Optional[Peer] = None) -> None:
    """PeerChanged unless `pid` may be traced for `uid`: every uid of the process is `uid`,
    it is dumpable and (when `pinned`) it is still the process pinned at accept. Root's
    requests (uid 0) need only the pin."""
    try:
        if pinned is not None:
            if not pinned.start_time:
                raise PeerChanged(f"process {pid} exited before it asked")
            if start_time(pid) != pinned.start_time:
                raise PeerChanged(f"process {pid} exited; its pid now belongs to another "
                                  "process")
        if uid != 0:
            uids, _ = _uids(pid)
            if uids != [uid] * 4:
                raise PeerChanged(f"process {pid} runs with uids {uids} (real, effective, "
                                  f"saved, fs), not uid {uid} alone")
            # A process whose credentials changed (setuid exec, setresuid) is not dumpable:
            # the kernel then hands the files in its /proc directory (not the directory
            # itself) to root.
            if os.stat(f"/proc/{pid}/stat").st_uid != uid:
                raise PeerChanged(f"process {pid} is not dumpable (it gained or dropped "
                                  "privileges)")
        # Checked last: what was read above was read while the pid was still this process.
        if pinned is not None and (
                _pidfd_pid(pinned.pidfd) != pid if pinned.pidfd is not None
                else start_time(pid) != pinned.start_time):
            raise PeerChanged(f"process {pid} exited; its pid now belongs to another process")
    except (FileNotFoundError, ProcessLookupError):
        raise PeerChanged(f"process {pid} has exited") from None
    except (OSError, ValueError, IndexError) as e:
        raise PeerChanged(f"cannot check process {pid}: {getattr(e, 'strerror', None) or e}") \
            from None
