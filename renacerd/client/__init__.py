"""The client library training code imports: spans, request_tracing and configure (orjson only).

Dependency rule: this package imports only the standard library, orjson and itself, so a
training job pays nothing for the daemon's numpy, BCC or SQLite.
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
