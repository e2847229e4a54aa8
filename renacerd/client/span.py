"""Experiment spans: the renacer `experiment_span` API (metadata, spans, SpanRecord, scores).

Runs on CPython >= 3.9 with orjson as its only dependency, because the client library
(renacerd.client.core) imports it inside training jobs.

Number formatting of `ExperimentMetadata.to_attributes()` (one documented rule):
integers print in decimal; floats print like Rust's `f64` Display, i.e. the shortest digits
that round-trip, never an exponent, and integral values without a fractional part
(1.0 -> "1", 0.0025 -> "0.0025", 1e-7 -> "0.0000001", 1e20 -> "100000000000000000000",
-0.0 -> "-0", NaN -> "NaN", inf -> "inf").
"""

from __future__ import annotations

import enum
import itertools
import math
import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from random import Random
from typing import Any, Callable, Optional

import orjson

# dataclass(slots=True) exists from 3.10; on 3.9 the classes are plain dataclasses.
SLOTS: dict[str, bool] = {"slots": True} if sys.version_info >= (3, 10) else {}

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

__all__ = [
    "ExperimentMetadata",
    "ExperimentSpan",
    "LamportClock",
    "MetadataError",
    "SpanKind",
    "SpanRecord",
    "SpanType",
    "StatusCode",
    "clock",
    "format_number",
    "id_rng",
    "new_span_id",
    "new_trace_id",
    "parse_traceparent",
    "traceparent",
]


class MetadataError(ValueError):
    """Experiment metadata that is not valid JSON or does not fit the schema."""


class SpanType(str, enum.Enum):
    """What a span covers; SYSCALL is the default, as in renacer."""

    SYSCALL = "syscall"
    GPU = "gpu"
    EXPERIMENT = "experiment"

    @classmethod
    def default(cls) -> SpanType:
        """The default span type (SYSCALL)."""
        return cls.SYSCALL


class SpanKind(enum.IntEnum):
    """OpenTelemetry span kinds with renacer's SpanRecord values."""

    INTERNAL = 0
    SERVER = 1
    CLIENT = 2
    PRODUCER = 3
    CONSUMER = 4


class StatusCode(enum.IntEnum):
    """OpenTelemetry status codes with renacer's SpanRecord values."""

    UNSET = 0
    OK = 1
    ERROR = 2


def format_number(value: float | int) -> str:
    """Format a number the documented way (Rust f64 Display for floats, decimal ints)."""
    if type(value) is float:
        text = repr(value)
        if text.endswith(".0") and "e" not in text:
            return text[:-2]
        if "e" not in text and "n" not in text:  # "nan" and "inf" hold an n
            return text
    elif isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    x = float(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = repr(x)
    if "e" in text:
        # Decimal keeps repr's shortest round-trip digits; "f" drops the exponent.
        text = format(Decimal(text), "f")
    if text.endswith(".0"):
        text = text[:-2]
    return text


def _uint(obj: dict[str, Any], key: str, limit: int) -> Optional[int]:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise MetadataError(f"{key} must be an integer or null, got {type(value).__name__}")
    if not 0 <= value <= limit:
        raise MetadataError(f"{key} must be in 0..{limit}, got {value}")
    return value


def _finite(value: Any, what: str) -> float:
    if type(value) is float:
        if not math.isfinite(value):
            raise MetadataError(f"{what} must be a finite number, got {value!r}")
        return value
    if type(value) is int:
        return float(value)
    raise MetadataError(f"{what} must be a number, got {type(value).__name__}")


def _metrics(value: Any) -> dict[str, float]:
    if type(value) is not dict:
        raise MetadataError(f"metrics must be an object, got {type(value).__name__}")
    return {k: _finite(v, f"metrics[{k!r}]") for k, v in value.items()}


@dataclass(**SLOTS)
class ExperimentMetadata:
    """Structured metadata of a training operation (renacer's ExperimentMetadata)."""

    model_name: str = ""
    epoch: Optional[int] = None
    step: Optional[int] = None
    loss: Optional[float] = None
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def default(cls) -> ExperimentMetadata:
        """Empty metadata: no model name, nothing set."""
        return cls()

    def to_dict(self) -> dict[str, Any]:
        """All fields in renacer's order, None kept (null in JSON)."""
        return {
            "model_name": self.model_name,
            "epoch": self.epoch,
            "step": self.step,
            "loss": self.loss,
            "metrics": self.metrics,
        }

    def to_json(self) -> str:
        """JSON with every field in order model_name, epoch, step, loss, metrics; None as null."""
        return orjson.dumps(self.to_dict()).decode()

    @classmethod
    def from_dict(cls, obj: Any) -> ExperimentMetadata:
        """Validate a parsed JSON object; missing fields take defaults, unknown ones are ignored."""
        if type(obj) is not dict:
            raise MetadataError(f"metadata must be a JSON object, got {type(obj).__name__}")
        model_name = obj.get("model_name", "")
        if type(model_name) is not str:
            raise MetadataError(f"model_name must be a string, got {type(model_name).__name__}")
        loss = obj.get("loss")
        return cls(
            model_name=model_name,
            epoch=_uint(obj, "epoch", U32_MAX),
            step=_uint(obj, "step", U64_MAX),
            loss=None if loss is None else _finite(loss, "loss"),
            metrics=_metrics(obj["metrics"]) if "metrics" in obj else {},
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ExperimentMetadata:
        """Parse `to_json()` output; raises MetadataError for bad JSON, types or values."""
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise MetadataError(f"invalid metadata JSON: {exc}") from None
        return cls.from_dict(obj)

    def to_attributes(self) -> dict[str, str]:
        """Flat span attributes, numbers formatted by `format_number`."""
        attrs = {"experiment.model_name": self.model_name}
        if self.epoch is not None:
            attrs["experiment.epoch"] = format_number(self.epoch)
        if self.step is not None:
            attrs["experiment.step"] = format_number(self.step)
        if self.loss is not None:
            attrs["experiment.loss"] = format_number(self.loss)
        for key, value in self.metrics.items():
            attrs[f"experiment.metrics.{key}"] = format_number(value)
        return attrs


class LamportClock:
    """A process-wide Lamport clock: tick() per local event, observe() merges a remote value."""

    __slots__ = ("_lock", "tick")

    def __init__(self, start: int = 0) -> None:
        self._lock = threading.Lock()
        # tick() advances for a local event and returns the new time. It is the counter's own
        # __next__: atomic under the GIL, lock-free, and no Python frame on the span hot path.
        self.tick: Callable[[], int] = itertools.count(start + 1).__next__

    def observe(self, remote: int) -> int:
        """Merge a received clock value: time becomes max(local, remote) + 1."""
        with self._lock:
            now = self.tick()
            if remote >= now:
                now = remote + 1
                self.tick = itertools.count(now + 1).__next__
            return now


clock = LamportClock()

# The id generator; reseeded in forked children so they never repeat the parent's ids.
id_rng = Random(os.urandom(32))


def _reseed() -> None:
    id_rng.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed)


def new_span_id() -> bytes:
    """A random, never all-zero, 8-byte span id (W3C)."""
    return (id_rng.getrandbits(64) or 1).to_bytes(8, "big")


def new_trace_id() -> bytes:
    """A random, never all-zero, 16-byte trace id (W3C)."""
    return (id_rng.getrandbits(128) or 1).to_bytes(16, "big")


def traceparent(trace_id: bytes, span_id: bytes, sampled: bool = True) -> str:
    """The W3C traceparent header `00-<32 hex>-<16 hex>-<flags>`."""
    return f"00-{trace_id.hex()}-{span_id.hex()}-{'01' if sampled else '00'}"


_HEX = frozenset("0123456789abcdef")


def _hex_field(text: str, size: int, what: str) -> bytes:
    if len(text) != 2 * size or not _HEX.issuperset(text):
        raise ValueError(f"traceparent {what} must be {2 * size} lowercase hex digits")
    raw = bytes.fromhex(text)
    if not any(raw):
        raise ValueError(f"traceparent {what} must not be all zero")
    return raw


def parse_traceparent(header: str) -> tuple[bytes, bytes, int]:
    """Parse a W3C traceparent into (trace_id, span_id, flags); ValueError when invalid."""
    parts = header.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or not _HEX.issuperset(parts[0]):
        raise ValueError(f"not a W3C traceparent: {header!r}")
    if parts[0] == "ff" or (parts[0] == "00" and len(parts) != 4):
        raise ValueError(f"unsupported traceparent version in {header!r}")
    trace_id = _hex_field(parts[1], 16, "trace-id")
    span_id = _hex_field(parts[2], 8, "parent-id")
    if len(parts[3]) != 2 or not _HEX.issuperset(parts[3]):
        raise ValueError(f"traceparent flags must be 2 lowercase hex digits in {header!r}")
    return trace_id, span_id, int(parts[3], 16)


@dataclass(**SLOTS)
class SpanRecord:
    """A finished span as stored (renacer's SpanRecord plus CLOCK_MONOTONIC bounds)."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: Optional[bytes]
    span_name: str
    span_kind: SpanKind
    start_time_nanos: int
    end_time_nanos: int
    duration_nanos: int
    logical_clock: int
    status_code: StatusCode
    status_message: str
    attributes_json: str
    resource_json: str
    process_id: int
    thread_id: int
    start_mono_nanos: int = 0
    end_mono_nanos: int = 0

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SpanRecord:
        """A SpanRecord from a stored row (the store, a run file, ClickHouse): names that are
        not fields are left out; ids may be bytes-like or hex text (an empty parent id is a
        root span's); empty attribute or resource text is none."""
        d = {k: row[k] for k in SPAN_FIELDS if k in row}
        for k in ("trace_id", "span_id", "parent_span_id"):
            v = d.get(k)
            if isinstance(v, str):
                d[k] = bytes.fromhex(v) if v or k != "parent_span_id" else None
            elif v is not None:
                d[k] = bytes(v)
        for k in ("attributes_json", "resource_json"):
            if d.get(k) == "":
                d[k] = None
        return cls(**d)

    def trace_id_hex(self) -> str:
        """The trace id as 32 lowercase hex digits."""
        return self.trace_id.hex()

    def span_id_hex(self) -> str:
        """The span id as 16 lowercase hex digits."""
        return self.span_id.hex()

    def parent_span_id_hex(self) -> Optional[str]:
        """The parent span id as hex, or None for a root span."""
        return None if self.parent_span_id is None else self.parent_span_id.hex()

    def traceparent(self) -> str:
        """The W3C traceparent naming this span (to continue its trace elsewhere)."""
        return traceparent(self.trace_id, self.span_id)

    def attributes(self) -> dict[str, Any]:
        """The attributes, parsed."""
        return orjson.loads(self.attributes_json)

    def resource(self) -> dict[str, Any]:
        """The resource, parsed."""
        return orjson.loads(self.resource_json)


SPAN_FIELDS = tuple(f.name for f in fields(SpanRecord))


RESOURCE_JSON = orjson.dumps({"service.name": "renacer", "span.type": "experiment"}).decode()


@dataclass(**SLOTS)
class ExperimentSpan:
    """A span over an ML training operation (renacer's ExperimentSpan, with real clocks)."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: Optional[bytes]
    name: str
    span_type: SpanType
    metadata: ExperimentMetadata
    start_time_nanos: int
    end_time_nanos: int
    logical_clock: int
    start_mono_nanos: int
    end_mono_nanos: int
    status: StatusCode = StatusCode.OK
    status_message: str = ""
    thread_id: int = 0
    process_id: int = 0

    @classmethod
    def new_experiment(cls, name: str, metadata: ExperimentMetadata) -> ExperimentSpan:
        """Start a root experiment span in a new trace."""
        return cls.new_experiment_with_parent(name, metadata, new_trace_id(), None)

    @classmethod
    def new_experiment_with_parent(
        cls,
        name: str,
        metadata: ExperimentMetadata,
        trace_id: bytes,
        parent_span_id: Optional[bytes],
    ) -> ExperimentSpan:
        """Start an experiment span inside trace `trace_id` under `parent_span_id`."""
        if len(trace_id) != 16 or not any(trace_id):
            raise ValueError("trace_id must be 16 bytes, not all zero")
        if parent_span_id is not None and (len(parent_span_id) != 8 or not any(parent_span_id)):
            raise ValueError("parent_span_id must be 8 bytes, not all zero")
        return cls(
            trace_id=bytes(trace_id),
            span_id=new_span_id(),
            parent_span_id=None if parent_span_id is None else bytes(parent_span_id),
            name=name,
            span_type=SpanType.EXPERIMENT,
            metadata=metadata,
            start_time_nanos=time.time_ns(),
            end_time_nanos=0,
            logical_clock=clock.tick(),
            start_mono_nanos=time.monotonic_ns(),
            end_mono_nanos=0,
            thread_id=threading.get_native_id(),
            process_id=os.getpid(),
        )

    @property
    def ended(self) -> bool:
        """Whether end() has been called."""
        return self.end_mono_nanos != 0

    def end(self) -> None:
        """Stamp the end time and advance the Lamport clock; later calls change nothing."""
        if self.end_mono_nanos:
            return
        self.end_mono_nanos = time.monotonic_ns()
        self.end_time_nanos = time.time_ns()
        self.logical_clock = clock.tick()

    def traceparent(self) -> str:
        """The W3C traceparent naming this span."""
        return traceparent(self.trace_id, self.span_id)

    def to_span_record(self) -> SpanRecord:
        """The stored form: kind INTERNAL, this span's status, real thread and process ids."""
        attrs = self.metadata.to_attributes()
        attrs["span.type"] = self.span_type.value
        return SpanRecord(
            trace_id=self.trace_id,
            span_id=self.span_id,
            parent_span_id=self.parent_span_id,
            span_name=self.name,
            span_kind=SpanKind.INTERNAL,
            start_time_nanos=self.start_time_nanos,
            end_time_nanos=self.end_time_nanos,
            duration_nanos=max(self.end_time_nanos - self.start_time_nanos, 0),
            logical_clock=self.logical_clock,
            status_code=self.status,
            status_message=self.status_message,
            attributes_json=orjson.dumps(attrs).decode(),
            resource_json=RESOURCE_JSON,
            process_id=self.process_id,
            thread_id=self.thread_id,
            start_mono_nanos=self.start_mono_nanos,
            end_mono_nanos=self.end_mono_nanos,
        )
