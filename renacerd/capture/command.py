"""The command renacerd runs: the file execvp(3) would run, its run's default name, and
the signal state it inherits from renacerd's caller. Light on purpose: `renacerd -- CMD`
through the service imports only this, the protocol and argparse (no numpy, no BCC)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass

from renacerd.escaping import escape


class CommandError(ValueError):
    """The command cannot be executed (one clear line, exit status 2)."""


def resolve_command(name: str, env: Mapping[str, str]) -> str:
    """The file execvp(3) would run for `name` under `env`'s PATH (its default without
    one; no search for a name with a '/'), found before the traced exec so the search's
    failed execve calls are not in the trace (as strace does)."""
    if not name:
        raise CommandError("cannot execute '': empty command name")
    if "/" in name:
        candidates = [name]
    else:  # an empty PATH entry is the cwd: execvp then runs the bare name
        candidates = [os.path.join(d, name) for d in os.get_exec_path(dict(env))]
    denied = False
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue  # execvp goes on past ENOENT, ENOTDIR, ELOOP and the like
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            return path
        denied = True  # EACCES: execvp tries the rest and reports this one
    shown = escape(name)
    if denied:
        raise CommandError(f"cannot execute '{shown}': permission denied")
    if "/" in name:
        raise CommandError(f"cannot execute '{shown}': no such file")
    raise CommandError(f"cannot execute '{shown}': not found on PATH")


def default_run_name(cmd: list[str] | None) -> str:
    """host-command-YYYYmmdd-HHMMSS-pid: unique, sortable, readable."""
    base = os.path.basename(cmd[0]) if cmd else "attach"
    return f"{socket.gethostname()}-{base}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def signal_set(field: str, pid: int | str = "self") -> frozenset[int]:
    """The signals in a mask line of /proc/PID/status (SigIgn, SigBlk, SigCgt, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                bits = int(line.split()[1], 16)
                return frozenset(n + 1 for n in range(bits.bit_length()) if bits >> n & 1)
    return frozenset()


# Python ignores these two at start-up whatever its caller did; their caller's state is
# lost before any Python code runs, so the command gets the default, as from a shell.
_PYTHON_IGNORES = frozenset({signal.SIGPIPE, signal.SIGXFSZ})


@dataclass(slots=True, frozen=True)
class CallerSignals:
    """The signal dispositions and mask renacerd's own caller gave it."""

    ignored: frozenset[int]
    blocked: frozenset[int]

    @classmethod
    def capture(cls) -> CallerSignals:
        """Read them now: call before anything installs a handler or blocks a signal.
        Python keeps a caller's SIG_IGN of SIGINT and only catches a default one, and
        exec resets caught signals, so SigIgn minus what Python forces is the caller's."""
        return cls(signal_set("SigIgn") - _PYTHON_IGNORES,
                   frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, ())))

    def restore(self) -> None:
        """Give this process (a child about to exec) exactly the caller's dispositions and
        mask: every signal ignored by the caller ignored, every other one default."""
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_IGN if sig in self.ignored else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.blocked)
