"""The training-side client: `experiment_span` marks steps and tells renacerd about them.

A span's start and end frames go into the connection's shared-memory ring (renacerd.client.ring;
no syscall per span), or over its socket (renacerd.client.connection) where a ring cannot be set
up. Span.__enter__ and __exit__ are the hot path: they inline the ring's common write.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
import time
import zlib
from contextvars import ContextVar
from typing import Any, Callable, Optional, TypeVar, Union

import orjson

from renacerd.client import protocol
from renacerd.client.connection import CONNECTION as _client
from renacerd.client.connection import DEFAULT_TRACE_TIMEOUT, log
from renacerd.client.protocol import RECORD, RING_HEADER, W_HEAD
from renacerd.client.span import (
    RESOURCE_JSON,
    U32_MAX,
    ExperimentMetadata,
    SpanKind,
    SpanRecord,
    SpanType,
    StatusCode,
    clock,
    id_rng,
    parse_traceparent,
)
from renacerd.client.wire import wire_field, wire_metrics

__all__ = [
    "Span",
    "configure",
    "current_span",
    "experiment_span",
    "request_tracing",
    "stats",
]

_crc32 = zlib.crc32
_HDR = RECORD.size
_U32 = 0xFFFFFFFF

_current: ContextVar[Optional[Span]] = ContextVar("renacerd_span", default=None)
_getrandbits = id_rng.getrandbits
_monotonic_ns = time.monotonic_ns
_native_id = threading.get_native_id
_isfinite = math.isfinite
_dumps = orjson.dumps
_MAX_NAME = protocol.MAX_NAME
_MAX_KEY = protocol.MAX_KEY
_pid = os.getpid()
# native thread ids, cached per thread (get_native_id is a syscall); replaced after fork
_tls = threading.local()
_UNSET = StatusCode.UNSET
_OK = StatusCode.OK
_ERROR = StatusCode.ERROR
_NO_METRICS: dict[str, float] = {}
_MAX_METRICS = protocol.MAX_METRICS
_MAX_FRAME = protocol.MAX_FRAME

F = TypeVar("F", bound=Callable[..., Any])


def _after_fork() -> None:
    """In a forked child: this process's pid, and thread ids looked up afresh."""
    global _pid, _tls
    _pid = os.getpid()
    _tls = threading.local()


os.register_at_fork(after_in_child=_after_fork)


def configure(socket: Optional[str] = None, run: Optional[str] = None,
              trace_timeout: Optional[float] = None, ring: Optional[bool] = None,
              flight_recorder: Optional[bool] = None) -> None:
    """Set the daemon socket and service-mode run name (None: RENACER_SOCKET / RENACER_RUN);
    ring=False sends every frame over the socket (None: unless RENACER_RING=0);
    flight_recorder=True asks the service to keep only its flight-recorder window of full
    events (None: when RENACER_FLIGHT_RECORDER=1)."""
    _client.reset(socket, run, trace_timeout, ring, flight_recorder)


def stats() -> dict[str, Any]:
    """Messages sent, dropped and waiting in the backlog, and whether it is connected."""
    c = _client
    ring = c.ring
    return {"sent": c.sent + (ring.seq if ring is not None else 0), "dropped": c.dropped,
            "queued": len(c.backlog), "connected": c.sock is not None, "ring": ring is not None}


def current_span() -> Optional[Span]:
    """The innermost open span of this context, if any."""
    return _current.get()


def request_tracing(timeout: float = DEFAULT_TRACE_TIMEOUT) -> bool:
    """Ask the daemon to trace this process (service mode); False on refusal or timeout."""
    return _client.request_tracing(timeout)


Parent = Union["Span", str, None]


class Span:
    """An experiment span: a context manager, a decorator, and the handle `with` yields."""

    __slots__ = (
        "name", "model_name", "epoch", "step", "loss", "metrics", "parent", "_sid", "_trace",
        "_psid", "start_mono_ns", "_start_wall", "end_mono_ns", "_end_wall",
        "start_clock", "end_clock", "status", "status_message", "exception_type",
        "thread_id", "process_id", "_token", "_gen", "_hex",
    )

    def __init__(self, name: str, model_name: str = "", epoch: Optional[int] = None,
                 step: Optional[int] = None, loss: Optional[float] = None,
                 metrics: Optional[dict[str, float]] = None, parent: Parent = None) -> None:
        self.name = name
        self.model_name = model_name
        self.epoch = epoch
        self.step = step
        self.loss = loss
        self.metrics = metrics
        self.parent = parent
        # Every store counts on the hot path: the ids, the hex span id and the wall times
        # are set when the span starts or is sent, and read with a default before that.
        # experiment_span() repeats these stores; keep the two in step.
        self.start_mono_ns = self.end_mono_ns = self._gen = 0
        self.status = _UNSET
        self.exception_type: Optional[str] = None
        self.status_message = ""

    def _link(self, parent: Parent) -> None:
        if parent is None:
            self._trace, self._psid = _client.env_parent  # type: ignore[misc]
        else:
            try:
                trace_id, span_id, _ = parse_traceparent(str(parent))
                self._trace = int.from_bytes(trace_id, "big")
                self._psid = int.from_bytes(span_id, "big")
            except ValueError as exc:
                log.warning("span %r: ignoring parent: %s", self.name, exc)
                self._trace = _getrandbits(128) or 1
                self._psid = 0

    def __enter__(self) -> Span:
        c = _client
        if c.needs_setup:
            c.first_use()
        parent = self.parent if self.parent is not None else _current.get()
        if type(parent) is Span:
            self._trace = parent._trace
            self._psid = parent._sid
        elif parent is None and c.env_parent is None:
            self._trace = _getrandbits(128) or 1
            self._psid = 0
        else:
            self._link(parent)
        self._sid = sid = _getrandbits(64) or 1
        try:
            self.thread_id = tid = _tls.tid
        except AttributeError:
            self.thread_id = tid = _tls.tid = _native_id()
        self.process_id = _pid
        self.start_clock = lc = clock.tick()
        self.start_mono_ns = now = _monotonic_ns()
        self._token = _current.set(self)
        if c.sock is None and now < c.next_attempt_ns:
            return self  # no daemon: the span stays local
        # The daemon is (or may be) there: tell it. Inline rather than a method, like the end
        # in __exit__: this is the hot path and a call costs what a metadata field does.
        if now >= c.wall_due_ns:
            c.sync_wall(now)
        self._start_wall = wall = now + c.wall_offset_ns
        # Hex through bytes: a third of the cost of format(id, "016x") for random ids.
        self._hex = span_hex = sid.to_bytes(8, "big").hex()
        name = self.name
        model_name = self.model_name
        epoch = self.epoch
        step = self.step
        loss = self.loss
        metrics = self.metrics
        payload = None
        try:
            # Well-formed metadata goes out as it is; the rest is coerced by _start_frame.
            # orjson itself refuses (TypeError) what these checks let through: numpy scalars,
            # integers beyond 64 bits; len() refuses metric names that are not strings.
            ok = (type(name) is str and len(name) <= _MAX_NAME
                  and type(model_name) is str and len(model_name) <= _MAX_NAME
                  and (epoch is None or type(epoch) is int and 0 <= epoch <= U32_MAX)
                  and (step is None or type(step) is int and step >= 0)
                  and (loss is None or type(loss) is float and _isfinite(loss)))
            if ok and metrics:
                if type(metrics) is dict and len(metrics) <= _MAX_METRICS:
                    # The cheapest full check in pure Python: one pass, then one sum that
                    # turns any NaN or infinity into a non-finite total.
                    for key, value in metrics.items():
                        if type(value) is not float or len(key) > _MAX_KEY:
                            ok = False
                            break
                    else:
                        ok = _isfinite(sum(metrics.values()))
                else:
                    ok = False
            if ok:
                psid = self._psid
                # The compact (array) form: half the cost of the object form in orjson.
                payload = _dumps([
                    "s", span_hex, self._trace.to_bytes(16, "big").hex(),
                    psid.to_bytes(8, "big").hex() if psid else None, name, model_name, epoch,
                    step, loss, metrics or _NO_METRICS, now, wall, tid, lc,
                ])
        except TypeError:
            pass
        if payload is None:
            payload = self._start_frame(now)
            if payload is None:
                return self
        lock = c.lock
        lock.acquire()
        try:
            # RingWriter.write inlined, like its twin in __exit__: the common case of a frame
            # that fits before the ring's known limit.
            n = len(payload)
            w = c.ring
            if w is not None and n <= _MAX_FRAME and not c.backlog:
                head = w.head
                end = head + ((n + 31) & -16)  # protocol.ring_record_size
                if end <= w.limit:
                    at = RING_HEADER + (head & w.mask)
                    w.mm[at + _HDR:at + _HDR + n] = payload
                    w.seq = seq = w.seq + 1
                    words = w.words
                    at >>= 3
                    words[at] = n | (_crc32(payload, seq & _U32) << 32) if w.crc else n
                    words[at + 1] = seq
                    w.head = end
                    words[W_HEAD] = end
                    self._gen = c.gen
                    return self
            self._gen = c.send_locked(payload, now)
        finally:
            lock.release()
        return self

    def _start_frame(self, now: int) -> Optional[bytes]:
        """The span_start frame with every field coerced for the wire (None: cannot be sent)."""
        try:
            return _dumps({
                "t": "span_start", "span": self._hex, "trace": f"{self._trace:032x}",
                "parent": f"{self._psid:016x}" if self._psid else None,
                "name": str(self.name)[:_MAX_NAME], "kind": "experiment",
                "md": {
                    "model_name": wire_field("model_name", self.model_name) or "",
                    "epoch": wire_field("epoch", self.epoch),
                    "step": wire_field("step", self.step),
                    "loss": wire_field("loss", self.loss),
                    "metrics": wire_metrics(self.metrics),
                },
                "mono": now, "wall": self._start_wall, "tid": self.thread_id,
                "lc": self.start_clock,
            })
        except TypeError as exc:
            log.debug("span %r not sent: %s", self.name, exc)
            return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.end_mono_ns = now = _monotonic_ns()
        self.end_clock = lc = clock.tick()
        if exc_type is None:
            self.status = _OK
        else:
            self.status = _ERROR
            self.exception_type = exc_type.__name__
            try:
                self.status_message = str(exc)[: protocol.MAX_MESSAGE]
            except Exception:  # noqa: BLE001 - a broken __str__ must not mask the real error
                self.status_message = ""
        try:
            _current.reset(self._token)
        except ValueError:
            # Exited in another context (e.g. a generator resumed elsewhere): unwind by hand.
            _current.set(self.parent if type(self.parent) is Span else None)
        gen = self._gen
        if not gen:
            return False  # the daemon never heard of this span
        c = _client
        self._end_wall = wall = now + c.wall_offset_ns
        if exc_type is None:
            payload = _dumps(["e", self._hex, now, wall, lc])
        else:
            payload = _dumps({
                "t": "span_end", "span": self._hex, "status": "error",
                "msg": self.status_message, "exc": self.exception_type, "mono": now,
                "wall": wall, "lc": lc,
            })
        lock = c.lock
        lock.acquire()
        try:
            # A span ends only on the connection it began on.
            if gen == c.gen:
                n = len(payload)
                w = c.ring
                if w is not None and not c.backlog:
                    head = w.head
                    end = head + ((n + 31) & -16)  # protocol.ring_record_size
                    if end <= w.limit:
                        at = RING_HEADER + (head & w.mask)
                        w.mm[at + _HDR:at + _HDR + n] = payload
                        w.seq = seq = w.seq + 1
                        words = w.words
                        at >>= 3
                        words[at] = n | (_crc32(payload, seq & _U32) << 32) if w.crc else n
                        words[at + 1] = seq
                        w.head = end
                        words[W_HEAD] = end
                        return False
                c.send_locked(payload, now, True)
        finally:
            lock.release()
        return False

    async def __aenter__(self) -> Span:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return self.__exit__(exc_type, exc, tb)

    def set(self, *, loss: Optional[float] = None, metrics: Optional[dict[str, float]] = None,
            step: Optional[int] = None, epoch: Optional[int] = None,
            model_name: Optional[str] = None) -> None:
        """Update metadata (None leaves a field as it is; metrics are merged)."""
        update: dict[str, Any] = {}
        if loss is not None:
            self.loss = update["loss"] = loss
        if step is not None:
            self.step = update["step"] = step
        if epoch is not None:
            self.epoch = update["epoch"] = epoch
        if model_name is not None:
            self.model_name = update["model_name"] = model_name
        if metrics:
            self.metrics = {**self.metrics, **metrics} if self.metrics else dict(metrics)
            update["metrics"] = metrics
        c = _client
        if not update or not self._gen or self._gen != c.gen or self.end_mono_ns:
            return
        md = {}
        for key, value in update.items():
            wire = wire_field(key, value)
            if wire is not None:
                md[key] = wire
        if md:
            c.send(_dumps({"t": "span_set", "span": self._hex, "md": md}),
                   _monotonic_ns())

    def __call__(self, fn: F) -> F:
        """Decorate a function (or coroutine function) so each call runs in a fresh span."""
        args = (self.name, self.model_name, self.epoch, self.step, self.loss, self.metrics,
                self.parent)
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(*a: Any, **kw: Any) -> Any:
                with experiment_span(*args):
                    return await fn(*a, **kw)
            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*a: Any, **kw: Any) -> Any:
            with experiment_span(*args):
                return fn(*a, **kw)
        return run  # type: ignore[return-value]

    @property
    def span_id(self) -> str:
        """This span's id, 16 lowercase hex digits ("" before it starts)."""
        sid = getattr(self, "_sid", 0)
        return f"{sid:016x}" if sid else ""

    @property
    def trace_id(self) -> str:
        """The trace id, 32 lowercase hex digits ("" before the span starts)."""
        trace = getattr(self, "_trace", 0)
        return f"{trace:032x}" if trace else ""

    @property
    def parent_span_id(self) -> Optional[str]:
        """The parent span's id in hex, None for a root span (and before the span starts)."""
        psid = getattr(self, "_psid", 0)
        return f"{psid:016x}" if psid else None

    @property
    def start_wall_ns(self) -> int:
        """Wall-clock start (derived from CLOCK_MONOTONIC when the span was not sent)."""
        return getattr(self, "_start_wall", 0) or (
            self.start_mono_ns + _client.wall_offset_ns if self.start_mono_ns else 0)

    @property
    def end_wall_ns(self) -> int:
        """Wall-clock end, 0 while open (derived from CLOCK_MONOTONIC when not sent)."""
        return getattr(self, "_end_wall", 0) or (
            self.end_mono_ns + _client.wall_offset_ns if self.end_mono_ns else 0)

    @property
    def connected(self) -> bool:
        """Whether the daemon was told about this span."""
        return bool(self._gen)

    @property
    def traceparent(self) -> str:
        """The W3C traceparent naming this span (hand it to subprocesses as TRACEPARENT)."""
        return f"00-{getattr(self, '_trace', 0):032x}-{getattr(self, '_sid', 0):016x}-01"

    def metadata(self) -> ExperimentMetadata:
        """The span's metadata, coerced the way it is sent."""
        return ExperimentMetadata(
            model_name=wire_field("model_name", self.model_name) or "",
            epoch=wire_field("epoch", self.epoch),
            step=wire_field("step", self.step),
            loss=wire_field("loss", self.loss),
            metrics=dict(wire_metrics(self.metrics)),
        )

    def to_span_record(self) -> SpanRecord:
        """This span as a SpanRecord, built locally (no daemon needed)."""
        attrs = self.metadata().to_attributes()
        attrs["span.type"] = SpanType.EXPERIMENT.value
        if self.exception_type is not None:
            attrs["exception.type"] = self.exception_type
        end = self.end_wall_ns
        return SpanRecord(
            trace_id=self._trace.to_bytes(16, "big"),
            span_id=self._sid.to_bytes(8, "big"),
            parent_span_id=self._psid.to_bytes(8, "big") if self._psid else None,
            span_name=str(self.name),
            span_kind=SpanKind.INTERNAL,
            start_time_nanos=self.start_wall_ns,
            end_time_nanos=end,
            duration_nanos=max(end - self.start_wall_ns, 0) if end else 0,
            logical_clock=self.end_clock if self.end_mono_ns else self.start_clock,
            status_code=self.status,
            status_message=self.status_message,
            attributes_json=orjson.dumps(attrs).decode(),
            resource_json=RESOURCE_JSON,
            process_id=self.process_id,
            thread_id=self.thread_id,
            start_mono_nanos=self.start_mono_ns,
            end_mono_nanos=self.end_mono_ns,
        )

    def __repr__(self) -> str:
        return (f"Span({self.name!r}, span_id={self.span_id!r}, trace_id={self.trace_id!r}, "
                f"status={self.status.name})")


_new_span = object.__new__


def experiment_span(name: str, model_name: str = "", epoch: Optional[int] = None,
                    step: Optional[int] = None, loss: Optional[float] = None,
                    metrics: Optional[dict[str, float]] = None, parent: Parent = None) -> Span:
    """A new experiment span: `with experiment_span(...) as span:`, or a decorator."""
    # Span.__init__'s work, done here: calling a class (type.__call__, then __init__) costs
    # ~85 ns more than a plain function on CPython 3.11, a tenth of a span without a daemon.
    span = _new_span(Span)
    span.name = name
    span.model_name = model_name
    span.epoch = epoch
    span.step = step
    span.loss = loss
    span.metrics = metrics
    span.parent = parent
    span.start_mono_ns = span.end_mono_ns = span._gen = 0
    span.status = _UNSET
    span.exception_type = None
    span.status_message = ""
    return span
