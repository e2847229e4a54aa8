"""The client library training code imports: spans, request_tracing and configure (orjson only).

Dependency rule: this package imports only the standard library, orjson and itself, and runs
on CPython >= 3.9 (tests/unit/test_client_py39.py), so a training job pays nothing for the
daemon's numpy, BCC or SQLite. Its modules: core (Span, experiment_span, configure, stats),
connection (socket, hello, backlog, reconnect, fail-open), ring (RingWriter, the span ring's
writer), wire (metadata coerced for the wire), protocol (frames and the ring layout), span
(the span model) and dist_env (rank variables).
"""

from renacerd.client.core import (
    Span,
    configure,
    current_span,
    experiment_span,
    request_tracing,
    stats,
)

__all__ = ["Span", "configure", "current_span", "experiment_span", "request_tracing", "stats"]
