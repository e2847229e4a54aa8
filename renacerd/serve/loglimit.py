"""Warning lines a hostile or broken client can trigger, at most one per kind per interval."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

INTERVAL = 10.0


@dataclass(slots=True)
class LimitedLog:
    """Logs the first line of each kind, then at most one per `interval` seconds with the
    number of lines held back since; `counts` has every occurrence, logged or not."""

    log: logging.Logger
    interval: float = INTERVAL
    counts: dict[str, int] = field(default_factory=dict)
    _held: dict[str, int] = field(default_factory=dict)
    _next: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def warning(self, kind: str, msg: str, *args: object) -> None:
        """Count one `kind` event; log it unless a line of that kind went out just now."""
        now = time.monotonic()
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if now < self._next.get(kind, 0.0):
                self._held[kind] = self._held.get(kind, 0) + 1
                return
            held = self._held.pop(kind, 0)
            self._next[kind] = now + self.interval
        if held:
            msg += f" ({held} more like it since the last such line, not logged)"
        self.log.warning(msg, *args)
