"""The equivalence score of two runs: renacer's weights (0.4/0.2/0.4) and threshold (0.85)."""

from __future__ import annotations

from dataclasses import dataclass

from renacerd.client.span import SLOTS

EQUIVALENCE_THRESHOLD = 0.85
# overall = 0.4 match + 0.2 (1 - timing) + 0.4 semantic: with the other two at their best,
# overall >= t needs match >= (t - 0.6) / 0.4 (0.625 at the default 0.85)
W_MATCH, W_TIMING, W_SEMANTIC = 0.4, 0.2, 0.4


@dataclass(**SLOTS)
class EquivalenceScore:
    """How alike two traces behave; `exact` is False when a bound replaced an exact value."""

    syscall_match: float
    timing_variance: float
    semantic_equiv: float
    exact: bool = True

    def overall(self) -> float:
        """0.4 * syscall_match + 0.2 * (1 - timing_variance) + 0.4 * semantic_equiv."""
        return (
            W_MATCH * self.syscall_match
            + W_TIMING * (1.0 - self.timing_variance)
            + W_SEMANTIC * self.semantic_equiv
        )

    def is_equivalent(self, threshold: float = EQUIVALENCE_THRESHOLD) -> bool:
        """Whether overall() reaches the threshold (0.85 by default, as in renacer)."""
        return self.overall() >= threshold
