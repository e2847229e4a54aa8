"""The client <-> daemon wire protocol (version 2): orjson objects, over a SOCK_SEQPACKET socket
and a shared-memory ring.

docs/protocol.md is the specification; this module encodes, and `decode` validates every
frame against it, whichever way it came. Runs on CPython >= 3.9 (the client imports it).
"""

from __future__ import annotations

import platform
import re
import struct
from dataclasses import dataclass, field
from math import isfinite
from typing import Any, Optional, Union

import orjson

from renacerd.client.span import (
    SLOTS,
    U32_MAX,
    U64_MAX,
    ExperimentMetadata,
    MetadataError,
    SpanType,
    StatusCode,
)

PROTOCOL_VERSION = 2
# The ack of a trace request to a renacerd that is not the service (a standalone daemon
# serves spans only): `renacerd -- CMD` then knows it reached no service.
NOT_SERVING = "this renacerd does not take trace requests (start it with `renacerd serve`)"
MAX_FRAME = 64 * 1024
MAX_METRICS = 256
MAX_NAME = 256
MAX_KEY = 128
MAX_MESSAGE = 4096
MAX_CLIENT = 64
MAX_RUN = 128
MAX_PATH = 108  # sun_path
# Clocks and counters the store keeps as SQLite integers (signed 64-bit): larger values would
# fail the insert, so they are refused here (ns since 1970 reach it in 2262).
I64_MAX = (1 << 63) - 1
DEFAULT_SOCKET = "/run/renacer/renacerd.sock"

# The span ring (docs/protocol.md, "The ring"): a memfd the client maps and fills, the daemon
# reads. A header page of u64 words, then `size` bytes of records.
RING_MAGIC = int.from_bytes(b"RNCRING2", "little")
RING_HEADER = 4096
RING_MIN = 1 << 16
RING_MAX = 1 << 26
RING_DEFAULT = 1 << 21
# Word indexes in the header page; the client's and the daemon's words sit on separate cache
# lines so that neither side's stores slow the other's.
W_MAGIC = 0
W_SIZE = 1
W_HEAD = 8  # client: bytes written (a running count; the offset is head % size)
W_DROPPED = 9  # client: messages dropped since the ring was set up
W_TAIL = 16  # daemon: bytes consumed
W_TAIL_SEQ = 17  # daemon: sequence number of the last message consumed
# A record is two u64 words, then the payload padded to RECORD_ALIGN: the payload length (low
# 32 bits) with its check (high 32 bits), and the sequence number (from 1). The writer stores
# the payload, then the length word, then the number, each word one aligned 8-byte store.
# On x86 (TSO) a reader that sees the number sees everything stored before it. Other CPUs may
# show stores out of order: there the check is the CRC-32 of the payload seeded with the low
# 32 bits of the number, and a record whose check fails is read again later.
RECORD = struct.Struct("<QQ")
RECORD_ALIGN = 16
RING_CRC = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i486", "i586", "i686")
# The length of the marker that sends the reader back to offset 0 (it takes no number).
RING_WRAP = 0xFFFFFFFF

_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_RUN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
_ZERO_SPAN = "0" * 16
_ZERO_TRACE = "0" * 32
_MISSING = object()

STATUS_NAMES = {"unset": StatusCode.UNSET, "ok": StatusCode.OK, "error": StatusCode.ERROR}
_STATUS_WIRE = {code: name for name, code in STATUS_NAMES.items()}
_SPAN_TYPES = {t.value: t for t in SpanType}
_METADATA_KEYS = frozenset(("model_name", "epoch", "step", "loss", "metrics"))


class ProtocolError(ValueError):
    """A frame that breaks the protocol; `kind` names the class of fault, `reason` says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(**SLOTS)
class Hello:
    """First message of a connection: protocol version, informational pid, optional run name,
    and, optionally, the process's place in a distributed job (`dist`: HELLO_DIST keys)."""

    version: int = PROTOCOL_VERSION
    pid: int = 0
    run: Optional[str] = None
    client: str = ""
    dist: Optional[dict[str, Any]] = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message."""
        wire = {"t": "hello", "v": self.version, "pid": self.pid, "run": self.run,
                "client": self.client}
        if self.dist:
            wire["dist"] = self.dist
        return wire


@dataclass(**SLOTS)
class SpanStart:
    """A span opened, stamped with the client's CLOCK_MONOTONIC and wall-clock ns."""

    span_id: str
    trace_id: str
    parent_span_id: Optional[str]
    name: str
    span_type: SpanType
    metadata: ExperimentMetadata
    mono_ns: int
    wall_ns: int
    tid: int
    logical_clock: int

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message."""
        return {"t": "span_start", "span": self.span_id, "trace": self.trace_id,
                "parent": self.parent_span_id, "name": self.name, "kind": self.span_type.value,
                "md": self.metadata.to_dict(), "mono": self.mono_ns, "wall": self.wall_ns,
                "tid": self.tid, "lc": self.logical_clock}

    def to_compact(self) -> list[Any]:
        """The compact (array) form of this message; only for kind "experiment"."""
        md = self.metadata
        return ["s", self.span_id, self.trace_id, self.parent_span_id, self.name,
                md.model_name, md.epoch, md.step, md.loss, md.metrics, self.mono_ns,
                self.wall_ns, self.tid, self.logical_clock]


@dataclass(**SLOTS)
class SpanSet:
    """A metadata update: the fields named in `fields` take their values from `update`."""

    span_id: str
    update: ExperimentMetadata
    fields: frozenset[str] = field(default_factory=frozenset)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message."""
        full = self.update.to_dict()
        return {"t": "span_set", "span": self.span_id,
                "md": {k: v for k, v in full.items() if k in self.fields}}


@dataclass(**SLOTS)
class SpanEnd:
    """A span closed: status, message, exception type, client clocks."""

    span_id: str
    status: StatusCode
    message: str
    exception_type: Optional[str]
    mono_ns: int
    wall_ns: int
    logical_clock: int

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message."""
        return {"t": "span_end", "span": self.span_id, "status": _STATUS_WIRE[self.status],
                "msg": self.message, "exc": self.exception_type, "mono": self.mono_ns,
                "wall": self.wall_ns, "lc": self.logical_clock}

    def to_compact(self) -> list[Any]:
        """The compact (array) form of this message; only for status ok with no message."""
        return ["e", self.span_id, self.mono_ns, self.wall_ns, self.logical_clock]


@dataclass(**SLOTS)
class Dropped:
    """How many messages the client dropped (socket full or disconnected) since the last report."""

    count: int

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message."""
        return {"t": "dropped", "n": self.count}


@dataclass(**SLOTS)
class TraceMe:
    """Service mode: asks the daemon to trace the sending process (answered by an Ack)."""

    request_id: int
    run: Optional[str] = None
    # the sender is about to exec the traced command (`renacerd -- CMD` through the
    # service): its records start at that execve, as the standalone daemon's do
    from_exec: bool = False
    # keep only the service's flight-recorder window of full events (and aggregates)
    flight: bool = False

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message."""
        wire: dict[str, Any] = {"t": "trace_me", "req": self.request_id, "run": self.run}
        if self.from_exec:
            wire["exec"] = True
        if self.flight:
            wire["flight"] = True
        return wire


@dataclass(**SLOTS)
class Dump:
    """Service mode: keep a flight run's current window in full (answered by an Ack)."""

    request_id: int
    run: str

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message."""
        return {"t": "dump", "req": self.request_id, "run": self.run}


@dataclass(**SLOTS)
class Ack:
    """The daemon's answer to a TraceMe: ok, or refused with a reason."""

    request_id: int
    ok: bool
    reason: str = ""
    # Service mode: the per-run socket the client reconnects to for its spans.
    socket: Optional[str] = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message."""
        wire = {"t": "ack", "req": self.request_id, "ok": self.ok, "reason": self.reason}
        if self.socket is not None:
            wire["socket"] = self.socket
        return wire


@dataclass(**SLOTS)
class StatusQuery:
    """Service mode: what is being traced now (answered by a ServiceStatus)."""

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message."""
        return {"t": "status"}


@dataclass(**SLOTS)
class ServiceStatus:
    """The service's answer to a StatusQuery: its uptime and the runs the asker may see."""

    uptime_s: float
    runs: list[dict[str, Any]]
    pid: int = 0

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message."""
        return {"t": "service_status", "uptime": self.uptime_s, "pid": self.pid,
                "runs": self.runs}


@dataclass(**SLOTS)
class Ring:
    """Client -> daemon, with the ring's memfd as SCM_RIGHTS: from now on frames come that way."""

    size: int
    checked: bool = RING_CRC  # records carry a CRC (needed where CPUs reorder stores)

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message."""
        return {"t": "ring", "size": self.size, "crc": self.checked}


Message = Union[Hello, SpanStart, SpanSet, SpanEnd, Dropped, TraceMe, Dump, Ack, StatusQuery,
                ServiceStatus, Ring]


def encode(msg: Message, compact: bool = False) -> bytes:
    """Serialise a message (`compact`: its array form); ProtocolError('oversized') if it would
    exceed MAX_FRAME."""
    frame = orjson.dumps(msg.to_compact() if compact else msg.to_wire())  # type: ignore[union-attr]
    if len(frame) > MAX_FRAME:
        raise ProtocolError("oversized", f"{len(frame)} bytes > {MAX_FRAME}")
    return frame


def _get(obj: dict[str, Any], key: str) -> Any:
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        raise ProtocolError("schema", f"{obj['t']}: missing field {key!r}")
    return value


def _uint(obj: dict[str, Any], key: str, limit: int = U64_MAX) -> int:
    value = _get(obj, key)
    if type(value) is not int:
        raise ProtocolError("schema", f"{key} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= limit:
        raise ProtocolError("value", f"{key} out of range 0..{limit}: {value}")
    return value


def _text(obj: dict[str, Any], key: str, limit: int, nullable: bool = False) -> Any:
    value = obj.get(key) if nullable else _get(obj, key)
    if value is None and nullable:
        return None
    if type(value) is not str:
        raise ProtocolError("schema", f"{key} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError("limit", f"{key} longer than {limit} characters")
    return value


def _span_id(obj: dict[str, Any], key: str, nullable: bool = False) -> Any:
    value = obj.get(key) if nullable else _get(obj, key)
    if value is None and nullable:
        return None
    if type(value) is not str or not _SPAN_ID.fullmatch(value) or value == _ZERO_SPAN:
        raise ProtocolError("value", f"{key} must be 16 lowercase hex digits, not all zero")
    return value


def _run(obj: dict[str, Any]) -> Optional[str]:
    run = obj.get("run")
    if run is None:
        return None
    if type(run) is not str or not _RUN.fullmatch(run):
        raise ProtocolError("value", f"run must match {_RUN.pattern}")
    return run


def _metadata(obj: dict[str, Any]) -> ExperimentMetadata:
    md = _get(obj, "md")
    if type(md) is not dict:
        raise ProtocolError("schema", f"md must be an object, got {type(md).__name__}")
    metrics = md.get("metrics")
    if type(metrics) is dict:
        # Bound the work before touching any value of a hostile map.
        if len(metrics) > MAX_METRICS:
            raise ProtocolError("limit", f"{len(metrics)} metrics > {MAX_METRICS}")
        for key in metrics:
            if len(key) > MAX_KEY:
                raise ProtocolError("limit", f"metric name longer than {MAX_KEY} characters")
    model_name = md.get("model_name")
    if type(model_name) is str and len(model_name) > MAX_NAME:
        raise ProtocolError("limit", f"model_name longer than {MAX_NAME} characters")
    try:
        return ExperimentMetadata.from_dict(md)
    except MetadataError as exc:
        raise ProtocolError("value", f"md: {exc}") from None


# hello.dist: integers 0 ..= 2^31-1 and strings of at most MAX_CLIENT*2 characters, or null.
HELLO_DIST_INTS = ("rank", "local_rank", "world_size", "group_rank", "local_world_size")
HELLO_DIST_TEXT = ("job_id", "host")


def _hello_dist(obj: dict[str, Any]) -> Optional[dict[str, Any]]:
    dist = obj.get("dist")
    if dist is None:
        return None
    if type(dist) is not dict:
        raise ProtocolError("schema", f"dist must be an object, got {type(dist).__name__}")
    out: dict[str, Any] = {}
    for key in HELLO_DIST_INTS:
        if dist.get(key) is not None:
            out[key] = _uint(dist, key, 2**31 - 1)
    for key in HELLO_DIST_TEXT:
        out[key] = _text(dist, key, 2 * MAX_CLIENT, nullable=True)
    return out


def _hello(obj: dict[str, Any]) -> Hello:
    version = _get(obj, "v")
    if type(version) is not int:
        raise ProtocolError("schema", "v must be an integer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {version} unsupported "
                                       f"(this daemon speaks {PROTOCOL_VERSION})")
    # pid is informational (SO_PEERCRED is what counts) and optional.
    pid = _uint(obj, "pid", U32_MAX) if obj.get("pid") is not None else 0
    return Hello(version, pid, _run(obj),
                 _text(obj, "client", MAX_CLIENT, nullable=True) or "", _hello_dist(obj))


def _u64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= U64_MAX


def _i64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= I64_MAX


def _fast_metadata(md: Any) -> Optional[ExperimentMetadata]:
    """The common well-formed metadata, checked inline; None sends it to the full checks."""
    if type(md) is not dict or len(md) > 5:
        return None
    model_name = md.get("model_name", "")
    epoch = md.get("epoch")
    step = md.get("step")
    loss = md.get("loss")
    metrics = md.get("metrics", {})
    if (type(model_name) is not str or len(model_name) > MAX_NAME
            or not (epoch is None or type(epoch) is int and 0 <= epoch <= U32_MAX)
            or not (step is None or _u64(step))
            or not (loss is None or type(loss) is float and isfinite(loss))
            or type(metrics) is not dict or len(metrics) > MAX_METRICS):
        return None
    if metrics:
        for key, value in metrics.items():
            if type(value) is not float or len(key) > MAX_KEY:
                return None
        if not isfinite(sum(metrics.values())):
            return None
    return ExperimentMetadata(model_name, epoch, step, loss, metrics)


def _span_start(obj: dict[str, Any]) -> SpanStart:
    span = obj.get("span")
    trace = obj.get("trace")
    parent = obj.get("parent")
    name = obj.get("name")
    kind = _SPAN_TYPES.get(obj.get("kind")) if type(obj.get("kind")) is str else None
    mono, wall, tid, lc = obj.get("mono"), obj.get("wall"), obj.get("tid"), obj.get("lc")
    if (type(span) is str and _SPAN_ID.fullmatch(span) and span != _ZERO_SPAN
            and type(trace) is str and _TRACE_ID.fullmatch(trace) and trace != _ZERO_TRACE
            and (parent is None or type(parent) is str and _SPAN_ID.fullmatch(parent)
                 and parent != _ZERO_SPAN)
            and type(name) is str and len(name) <= MAX_NAME and kind is not None
            and _i64(mono) and _i64(wall) and _i64(lc)
            and type(tid) is int and 0 <= tid <= U32_MAX):
        metadata = _fast_metadata(obj.get("md"))
        if metadata is not None:
            return SpanStart(span, trace, parent, name, kind, metadata, mono, wall, tid, lc)
    return _span_start_checked(obj)


def _span_start_checked(obj: dict[str, Any]) -> SpanStart:
    trace = _get(obj, "trace")
    if type(trace) is not str or not _TRACE_ID.fullmatch(trace) or trace == _ZERO_TRACE:
        raise ProtocolError("value", "trace must be 32 lowercase hex digits, not all zero")
    kind_name = _get(obj, "kind")
    kind = _SPAN_TYPES.get(kind_name) if type(kind_name) is str else None
    if kind is None:
        raise ProtocolError("value", f"kind must be one of {sorted(_SPAN_TYPES)}")
    return SpanStart(
        _span_id(obj, "span"), trace, _span_id(obj, "parent", nullable=True),
        _text(obj, "name", MAX_NAME), kind, _metadata(obj), _uint(obj, "mono", I64_MAX),
        _uint(obj, "wall", I64_MAX), _uint(obj, "tid", U32_MAX), _uint(obj, "lc", I64_MAX),
    )


def _span_set(obj: dict[str, Any]) -> SpanSet:
    update = _metadata(obj)
    return SpanSet(_span_id(obj, "span"), update, _METADATA_KEYS.intersection(obj["md"]))


def _span_end(obj: dict[str, Any]) -> SpanEnd:
    span = obj.get("span")
    status_name = obj.get("status")
    status = STATUS_NAMES.get(status_name) if type(status_name) is str else None
    message = obj.get("msg")
    exc = obj.get("exc")
    mono, wall, lc = obj.get("mono"), obj.get("wall"), obj.get("lc")
    if (type(span) is str and _SPAN_ID.fullmatch(span) and span != _ZERO_SPAN
            and status is not None and _i64(mono) and _i64(wall) and _i64(lc)
            and (message is None or type(message) is str and len(message) <= MAX_MESSAGE)
            and (exc is None or type(exc) is str and len(exc) <= MAX_NAME)):
        return SpanEnd(span, status, message or "", exc, mono, wall, lc)
    return _span_end_checked(obj)


def _span_end_checked(obj: dict[str, Any]) -> SpanEnd:
    status_name = _get(obj, "status")
    status = STATUS_NAMES.get(status_name) if type(status_name) is str else None
    if status is None:
        raise ProtocolError("value", f"status must be one of {sorted(STATUS_NAMES)}")
    return SpanEnd(
        _span_id(obj, "span"), status, _text(obj, "msg", MAX_MESSAGE, nullable=True) or "",
        _text(obj, "exc", MAX_NAME, nullable=True), _uint(obj, "mono", I64_MAX),
        _uint(obj, "wall", I64_MAX), _uint(obj, "lc", I64_MAX),
    )


def _dropped(obj: dict[str, Any]) -> Dropped:
    return Dropped(_uint(obj, "n", U32_MAX))


def _trace_me(obj: dict[str, Any]) -> TraceMe:
    from_exec = obj.get("exec", False)
    flight = obj.get("flight", False)
    if type(from_exec) is not bool or type(flight) is not bool:
        raise ProtocolError("schema", "exec and flight must be booleans")
    return TraceMe(_uint(obj, "req", U32_MAX), _run(obj), from_exec, flight)


def _dump(obj: dict[str, Any]) -> Dump:
    run = _run(obj)
    if run is None:
        raise ProtocolError("schema", "dump needs a run name")
    return Dump(_uint(obj, "req", U32_MAX), run)


def _ack(obj: dict[str, Any]) -> Ack:
    ok = _get(obj, "ok")
    if type(ok) is not bool:
        raise ProtocolError("schema", "ok must be a boolean")
    return Ack(_uint(obj, "req", U32_MAX), ok, _text(obj, "reason", MAX_MESSAGE, nullable=True)
               or "", _text(obj, "socket", MAX_PATH, nullable=True))


def _status(obj: dict[str, Any]) -> StatusQuery:
    return StatusQuery()


def _service_status(obj: dict[str, Any]) -> ServiceStatus:
    uptime = _get(obj, "uptime")
    runs = _get(obj, "runs")
    if type(uptime) not in (int, float) or type(runs) is not list:
        raise ProtocolError("schema", "service_status: uptime must be a number, runs a list")
    if not all(type(r) is dict for r in runs):
        raise ProtocolError("schema", "service_status: every run must be an object")
    return ServiceStatus(float(uptime), runs, _uint(obj, "pid", U32_MAX))


def _ring(obj: dict[str, Any]) -> Ring:
    size = _uint(obj, "size")
    if not RING_MIN <= size <= RING_MAX or size & (size - 1):
        raise ProtocolError("value", f"ring size must be a power of two in {RING_MIN}..{RING_MAX}")
    checked = _get(obj, "crc")
    if type(checked) is not bool:
        raise ProtocolError("schema", "crc must be a boolean")
    return Ring(size, checked)


def ring_record_size(payload_size: int) -> int:
    """Bytes a record with this payload takes in the ring (header and padding included)."""
    return (RECORD.size + payload_size + RECORD_ALIGN - 1) & -RECORD_ALIGN


def _compact(obj: list[Any]) -> Message:
    """The array forms of the two hot messages, checked as their object forms are."""
    tag = obj[0] if obj else None
    if tag == "s" and len(obj) == 14:
        _, span, trace, parent, name, model_name, epoch, step, loss, metrics, mono, wall, tid, \
            lc = obj
        if (type(span) is str and _SPAN_ID.fullmatch(span) and span != _ZERO_SPAN
                and type(trace) is str and _TRACE_ID.fullmatch(trace) and trace != _ZERO_TRACE
                and (parent is None or type(parent) is str and _SPAN_ID.fullmatch(parent)
                     and parent != _ZERO_SPAN)
                and type(name) is str and len(name) <= MAX_NAME
                and _i64(mono) and _i64(wall) and _i64(lc)
                and type(tid) is int and 0 <= tid <= U32_MAX):
            metadata = _fast_metadata({"model_name": model_name, "epoch": epoch, "step": step,
                                       "loss": loss, "metrics": metrics})
            if metadata is not None:
                return SpanStart(span, trace, parent, name, SpanType.EXPERIMENT, metadata, mono,
                                 wall, tid, lc)
        # Not the common well-formed case: the object form's full checks say what is wrong.
        return _span_start_checked({
            "t": "span_start", "span": span, "trace": trace, "parent": parent, "name": name,
            "kind": "experiment", "md": {"model_name": model_name, "epoch": epoch, "step": step,
                                         "loss": loss, "metrics": metrics},
            "mono": mono, "wall": wall, "tid": tid, "lc": lc,
        })
    if tag == "e" and len(obj) == 5:
        _, span, mono, wall, lc = obj
        if (type(span) is str and _SPAN_ID.fullmatch(span) and span != _ZERO_SPAN
                and _i64(mono) and _i64(wall) and _i64(lc)):
            return SpanEnd(span, StatusCode.OK, "", None, mono, wall, lc)
        return _span_end_checked({"t": "span_end", "span": span, "status": "ok", "msg": "",
                                  "exc": None, "mono": mono, "wall": wall, "lc": lc})
    raise ProtocolError("schema", "an array frame is [\"s\", 13 fields] or [\"e\", 4 fields]")


_DECODERS = {
    "hello": _hello,
    "span_start": _span_start,
    "span_set": _span_set,
    "span_end": _span_end,
    "dropped": _dropped,
    "trace_me": _trace_me,
    "ack": _ack,
    "status": _status,
    "service_status": _service_status,
    "ring": _ring,
    "dump": _dump,
}


def decode(frame: bytes | bytearray | memoryview) -> Message:
    """Validate one frame and return its message; ProtocolError(kind, reason) otherwise."""
    size = len(frame)
    if size == 0:
        raise ProtocolError("empty", "zero-length frame")
    if size > MAX_FRAME:
        raise ProtocolError("oversized", f"{size} bytes > {MAX_FRAME}")
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("malformed", f"not a complete JSON document ({exc})") from None
    if type(obj) is not dict:
        if type(obj) is list:
            return _compact(obj)
        raise ProtocolError("schema", f"message must be an object, got {type(obj).__name__}")
    kind = obj.get("t")
    decoder = _DECODERS.get(kind) if type(kind) is str else None
    if decoder is None:
        raise ProtocolError("schema", f"unknown message type {kind!r}")
    return decoder(obj)
