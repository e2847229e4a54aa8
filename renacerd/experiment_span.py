"""renacer's experiment-span API under its own name: the span model (renacerd.client.span)
and, loaded on first use so the client stays light, compare_traces and EquivalenceScore."""

from __future__ import annotations

from typing import Any

from renacerd.client.span import *  # noqa: F403
from renacerd.client.span import __all__ as _SPAN_ALL

__all__ = [*_SPAN_ALL, "EquivalenceScore", "compare_traces"]  # noqa: F405


def compare_traces(baseline: Any, candidate: Any, **kw: Any) -> Any:
    """Compare two traces for behavioural equivalence (renacerd.compare.compare_traces)."""
    from renacerd.compare import compare_traces as _compare_traces

    return _compare_traces(baseline, candidate, **kw)


def __getattr__(name: str) -> Any:
    """EquivalenceScore comes from renacerd.compare.score, imported only when asked for."""
    if name == "EquivalenceScore":
        from renacerd.compare.score import EquivalenceScore

        return EquivalenceScore
    raise AttributeError(f"module 'renacerd.experiment_span' has no attribute {name!r}")
