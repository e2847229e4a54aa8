"""The flight recorder of a service run: only the last window of full events is kept (older
events are folded into the run's per-step aggregates), and the window is kept whole when the
job fails, when a step hangs, or when someone asks (`renacer dump RUN`)."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional

log = logging.getLogger("renacerd.flight")

DEFAULT_HANG_FACTOR = 5.0
MIN_STEPS = 3  # steps that must have ended before a step can be called hung
TRIM_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class FlightPolicy:
    """The service's flight recorder settings (`--flight-recorder`, `--flight-hang-factor`)."""

    window_ns: int
    hang_factor: float = DEFAULT_HANG_FACTOR


@dataclass(slots=True)
class FlightRun:
    """One run's flight recorder state."""

    policy: FlightPolicy
    run_id: int
    kept_from: Optional[int] = None  # events from here on are kept whole
    reasons: list[str] = field(default_factory=list)
    hung: set[Any] = field(default_factory=set)  # steps already reported hung
    next_trim: float = 0.0
    strings: list[bytes] = field(default_factory=list)  # the run's string table, as folded

    def cutoff(self, now_ns: int) -> int:
        """Events that ended before this are folded into aggregates."""
        c = now_ns - self.policy.window_ns
        return c if self.kept_from is None else min(c, self.kept_from)

    def keep(self, store: Any, reason: str, now_ns: Optional[int] = None) -> tuple[int, int]:
        """Keep the window ending now whole, and everything after it (the caller holds the
        store lock and commits); returns the window (CLOCK_MONOTONIC ns)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        lo = max(0, now - self.policy.window_ns)
        store.keep_window(self.run_id, reason, lo, now)
        self.kept_from = lo if self.kept_from is None else min(self.kept_from, lo)
        self.reasons.append(reason)
        return lo, now

    def hang(self, step_ns: list[int], open_steps: list[tuple[Any, int]],
             now_ns: int) -> Optional[str]:
        """Why a step hangs (open longer than hang_factor x the median step), None if none
        does; each step is reported once."""
        if len(step_ns) < MIN_STEPS:
            return None
        median = statistics.median(step_ns)
        limit = self.policy.hang_factor * median
        for step, start in open_steps:
            took = now_ns - start
            if step not in self.hung and took > limit:
                self.hung.add(step)
                return (f"hang: step {step} open {took / 1e9:.2f} s, over "
                        f"{self.policy.hang_factor:g} x the median step "
                        f"({median / 1e9:.3f} s)")
        return None


def exit_reason(exit_code: Optional[int], exit_signal: Optional[int]) -> Optional[str]:
    """Why a job's end keeps its window (a signal or a non-zero exit), None for exit 0."""
    if exit_signal:
        return f"killed by signal {exit_signal}"
    if exit_code:
        return f"exit code {exit_code}"
    return None
