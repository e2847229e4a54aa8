"""Span metadata coerced into what the protocol accepts (values that cannot be sent are dropped)."""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

from renacerd.client import protocol
from renacerd.client.span import U32_MAX, U64_MAX

_isfinite = math.isfinite
_MAX_NAME = protocol.MAX_NAME
_MAX_KEY = protocol.MAX_KEY


def uint_or_none(value: Any, limit: int) -> Optional[int]:
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if 0 <= number <= limit else None


def float_or_none(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if _isfinite(number) else None


def clean_metrics(metrics: Any) -> dict[str, float]:
    """Coerce user metrics into what the protocol accepts, dropping what cannot be sent."""
    clean: dict[str, float] = {}
    try:
        items = list(metrics.items())
    except AttributeError:
        return clean
    for key, value in items[: protocol.MAX_METRICS]:
        number = float_or_none(value)
        if number is not None:
            clean[str(key)[:_MAX_KEY]] = number
    return clean


def wire_metrics(metrics: Any) -> Any:
    """The metrics as they may go on the wire: the dict itself when already clean."""
    if not metrics:
        return {}
    try:
        if type(metrics) is dict and len(metrics) <= protocol.MAX_METRICS:
            for key, value in metrics.items():
                # len() of a non-str key raises TypeError; a str subclass goes the slow way.
                if type(value) is not float or len(key) > _MAX_KEY or type(key) is not str:
                    break
            else:
                # One sum finds any NaN or infinity among the values.
                if _isfinite(sum(metrics.values())):
                    return metrics
    except TypeError:
        pass
    return clean_metrics(metrics)


def wire_field(name: str, value: Any) -> Any:
    """One metadata field coerced for the wire (None when it cannot be sent)."""
    if value is None:
        return None
    if name == "model_name":
        return value[:_MAX_NAME] if type(value) is str else str(value)[:_MAX_NAME]
    if name == "epoch":
        return value if type(value) is int and 0 <= value <= U32_MAX else uint_or_none(
            value, U32_MAX)
    if name == "step":
        return value if type(value) is int and 0 <= value <= U64_MAX else uint_or_none(
            value, U64_MAX)
    if name == "loss":
        return value if type(value) is float and _isfinite(value) else float_or_none(value)
    return wire_metrics(value)

