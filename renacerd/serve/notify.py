"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET per state change."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass


@dataclass(slots=True)
class Notifier:
    """Talks to the service manager; every method is a no-op outside systemd."""

    address: str | bytes | None
    watchdog_s: float | None = None
    _last_ping: float = 0.0
    _last_status: str = ""

    @classmethod
    def from_environment(cls) -> Notifier:
        """$NOTIFY_SOCKET ('@name' is abstract) and $WATCHDOG_USEC when meant for us."""
        raw = os.environ.get("NOTIFY_SOCKET") or None
        address: str | bytes | None = raw
        if raw is not None and raw.startswith("@"):
            address = b"\0" + raw[1:].encode()
        watchdog = None
        usec = os.environ.get("WATCHDOG_USEC", "")
        wd_pid = os.environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == str(os.getpid())):
            watchdog = int(usec) / 1e6
        return cls(address, watchdog)

    def send(self, *fields: str) -> bool:
        """Send 'KEY=value' lines as one datagram; False when there is no manager."""
        if self.address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            # A manager that stops reading must never stall the daemon: drop instead.
            s.setblocking(False)
            try:
                s.sendto("\n".join(fields).encode(), self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        """READY=1 with the MAINPID, so a forking wrapper cannot confuse the manager."""
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        """A STATUS= line (shown by systemctl status), sent only when it changed."""
        if text == self._last_status:
            return False
        self._last_status = text
        return self.send(f"STATUS={text}")

    def stopping(self, status: str) -> bool:
        """STOPPING=1: the manager waits for the exit instead of counting it a crash."""
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        """WATCHDOG=1 at half the interval systemd asked for (call it as often as you like)."""
        if self.watchdog_s is None:
            return False
        now = time.monotonic()
        if now - self._last_ping < self.watchdog_s / 2:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")
