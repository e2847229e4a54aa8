"""SpanBook: turns the span clients' message stream into finished SpanRecords for the store.

Open spans are keyed by (SO_PEERCRED pid, span id), so a client can only open and close spans
of its own process. Spans left open by a client that disconnects are held for `grace_ns`
waiting for the tracer's exact exit time (`process_exited`), then persisted with status Error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import orjson

from renacerd.client.protocol import (
    I64_MAX,
    MAX_METRICS,
    NOT_SERVING,
    Ack,
    Dropped,
    Hello,
    Message,
    SpanEnd,
    SpanSet,
    SpanStart,
    TraceMe,
)
from renacerd.client.span import ExperimentMetadata, SpanKind, SpanRecord, StatusCode
from renacerd.serve.span_server import PeerCred

log = logging.getLogger("renacerd.spans")

GRACE_NS = 1_000_000_000
STEP_TIMES = 4096  # the last step durations kept: the hang check's median
MAX_OPEN_PER_CONNECTION = 10_000
# Per-uid and per-run limits (docs/security.md, "Limits"): what one user's processes may make
# the tracer hold and write. Root's processes are held to none of them. A span's bytes are
# its name, model name and metric names plus SPAN_OVERHEAD, charged when it starts and on
# each metric update.
MAX_OPEN_PER_UID = 10_000
SPAN_BYTES_PER_S = 4 << 20
SPAN_BYTES_BURST = 16 << 20
MAX_RUN_SPAN_BYTES = 256 << 20
SPAN_OVERHEAD = 64
EXITED = "process exited mid-span"
DISCONNECTED = "client disconnected mid-span"
STOPPED = "daemon stopped mid-span"

TraceRequest = Callable[[PeerCred, TraceMe], "tuple[bool, str]"]


@dataclass(slots=True)
class _Open:
    peer: PeerCred
    start: SpanStart
    metadata: ExperimentMetadata
    resource_json: str
    # set once the client is gone: provisional end, final after the grace period
    end_mono: int = 0
    end_wall: int = 0
    deadline: int = 0
    # the process's exit, seen while its connection may still hold unread messages
    exit_mono: int = 0
    exit_wall: int = 0


@dataclass(slots=True)
class _UidState:
    """What one uid's processes hold in this run, and its byte bucket."""

    open: int = 0
    tokens: float = float(SPAN_BYTES_BURST)
    refilled: float = field(default_factory=time.monotonic)
    warned: bool = False


@dataclass(slots=True)
class _ConnState:
    resource_json: str
    keys: set[tuple[int, str]] = field(default_factory=set)
    warned: bool = False


class SpanBook:
    """Open spans per client, closed into SpanRecords; thread-safe."""

    def __init__(
        self,
        *,
        trace_request: Optional[TraceRequest] = None,
        service_name: str = "renacerd",
        grace_ns: int = GRACE_NS,
        max_open_per_connection: int = MAX_OPEN_PER_CONNECTION,
        max_open_per_uid: int = MAX_OPEN_PER_UID,
        bytes_per_s: float = SPAN_BYTES_PER_S,
        bytes_burst: float = SPAN_BYTES_BURST,
        max_run_bytes: int = MAX_RUN_SPAN_BYTES,
    ) -> None:
        self._trace_request = trace_request
        self._service_name = service_name
        self._grace_ns = grace_ns
        self._max_open = max_open_per_connection
        self._max_open_uid = max_open_per_uid
        self._bytes_per_s = bytes_per_s
        self._bytes_burst = bytes_burst
        self._max_run_bytes = max_run_bytes
        self._uids: dict[int, _UidState] = {}
        self.run_bytes = 0
        # span starts and metric updates refused by the limits above, by limit
        self.limited_open = 0
        self.limited_rate = 0
        self.limited_run_bytes = 0
        self._lock = threading.Lock()
        self._open: dict[tuple[int, str], _Open] = {}
        self._conns: dict[int, _ConnState] = {}
        self._gone: dict[tuple[int, str], _Open] = {}
        self._finished: list[SpanRecord] = []
        # pid -> its exit (mono, wall): a span_start read after the exit (the socket
        # thread may lag the tracer) still ends at the exit, not a grace period later
        self._exited: dict[int, tuple[int, int]] = {}
        self.spans_started = 0
        self.spans_ended = 0
        self.orphan_ends = 0
        self.orphan_sets = 0
        self.duplicate_starts = 0
        self.rejected_starts = 0
        self.client_dropped = 0
        self.ended_by_exit = 0
        self.ended_by_disconnect = 0
        # how long each step span that ended took (the flight recorder's hang check)
        self._step_ns: deque[int] = deque(maxlen=STEP_TIMES)

    def counts(self) -> dict[str, int]:
        """The book's counters and how many spans are open now."""
        with self._lock:
            return {
                "spans_started": self.spans_started, "spans_ended": self.spans_ended,
                "orphan_ends": self.orphan_ends, "orphan_sets": self.orphan_sets,
                "duplicate_starts": self.duplicate_starts,
                "rejected_starts": self.rejected_starts, "client_dropped": self.client_dropped,
                "ended_by_exit": self.ended_by_exit,
                "ended_by_disconnect": self.ended_by_disconnect,
                "open": len(self._open) + len(self._gone),
                "spans_limited_open": self.limited_open,
                "spans_limited_rate": self.limited_rate,
                "spans_limited_run_bytes": self.limited_run_bytes,
                "span_bytes": self.run_bytes,
            }

    def limit_counters(self) -> dict[str, int]:
        """What the limits refused (persisted with the run's source counters)."""
        c = self.counts()
        return {k: c[k] for k in ("spans_limited_open", "spans_limited_rate",
                                  "spans_limited_run_bytes", "span_bytes")}

    def _conn(self, peer: PeerCred, run: Optional[str] = None,
              dist: Optional[dict] = None) -> _ConnState:
        state = self._conns.get(peer.conn_id)
        if state is None or run is not None or dist:
            resource = {"service.name": self._service_name, "process.pid": peer.pid,
                        "process.user.id": peer.uid}
            if run is not None:
                resource["renacer.run"] = run
            for key, value in (dist or {}).items():  # the hello's rank: renacer.rank, ...
                resource[f"renacer.{key}"] = value
            fresh = _ConnState(orjson.dumps(resource).decode())
            if state is not None:
                fresh.keys = state.keys
            self._conns[peer.conn_id] = state = fresh
        return state

    def handle(self, peer: PeerCred, msg: Message) -> Optional[Message]:
        """Apply one client message (SpanServer's on_message); answers TraceMe with an Ack."""
        if isinstance(msg, TraceMe):
            if self._trace_request is None:
                return Ack(msg.request_id, False, NOT_SERVING)
            ok, reason = self._trace_request(peer, msg)
            return Ack(msg.request_id, ok, reason)
        with self._lock:
            if isinstance(msg, SpanStart):
                self._start(peer, msg)
            elif isinstance(msg, SpanEnd):
                self._end(peer, msg)
            elif isinstance(msg, SpanSet):
                self._set(peer, msg)
            elif isinstance(msg, Dropped):
                self.client_dropped = min(self.client_dropped + msg.count, I64_MAX)
            elif isinstance(msg, Hello):
                if msg.pid and msg.pid != peer.pid:
                    log.debug("client says pid %d, SO_PEERCRED says %d (pid namespace?)",
                              msg.pid, peer.pid)
                self._conn(peer, msg.run, msg.dist)
        return None

    def _start(self, peer: PeerCred, msg: SpanStart) -> None:
        state = self._conn(peer)
        key = (peer.pid, msg.span_id)
        if key in self._open:
            self.duplicate_starts += 1
            return
        if len(state.keys) >= self._max_open:
            self.rejected_starts += 1
            if not state.warned:
                state.warned = True
                log.warning("pid %d has %d spans open; ignoring further starts", peer.pid,
                            len(state.keys))
            return
        if not self._charge(peer, state, _md_bytes(msg.metadata) + len(msg.name), opening=True):
            return
        span = self._open[key] = _Open(peer, msg, msg.metadata, state.resource_json)
        exit_ = self._exited.get(peer.pid)
        if exit_ is not None and msg.mono_ns <= exit_[0]:  # later: a new process, same pid
            span.exit_mono, span.exit_wall = exit_
        state.keys.add(key)
        self.spans_started += 1

    def _end(self, peer: PeerCred, msg: SpanEnd) -> None:
        key = (peer.pid, msg.span_id)
        span = self._open.pop(key, None)
        if span is None:
            self.orphan_ends += 1
            state = self._conn(peer)
            if not state.warned:
                state.warned = True
                log.warning("pid %d ended span %s that it never started; ignored", peer.pid,
                            msg.span_id)
            return
        self._forget(span, key)
        self.spans_ended += 1
        if span.metadata.step is not None:
            self._step_ns.append(max(0, msg.mono_ns - span.start.mono_ns))
        self._finished.append(self._record(
            span, msg.mono_ns, msg.wall_ns, msg.logical_clock, msg.status, msg.message,
            msg.exception_type))

    def _set(self, peer: PeerCred, msg: SpanSet) -> None:
        span = self._open.get((peer.pid, msg.span_id))
        if span is None:
            self.orphan_sets += 1
            return
        md = span.metadata
        update = msg.update
        if "metrics" in msg.fields or "model_name" in msg.fields:
            state = self._conns.get(peer.conn_id)
            if state is None or not self._charge(peer, state, _md_bytes(update), opening=False):
                return
        for name in msg.fields:
            if name == "metrics":
                merged = {**md.metrics, **update.metrics}
                if len(merged) <= MAX_METRICS:
                    md.metrics = merged
            else:
                setattr(md, name, getattr(update, name))

    def _charge(self, peer: PeerCred, state: _ConnState, size: int, opening: bool) -> bool:
        """Take `size` bytes (and, `opening`, one open span) from peer's uid; False (counted,
        one warning per connection) when a limit refuses them. Root is not limited."""
        if peer.uid == 0:
            if opening:
                self._uids.setdefault(0, _UidState()).open += 1
            self.run_bytes += size
            return True
        u = self._uids.get(peer.uid)
        if u is None:
            u = self._uids[peer.uid] = _UidState(tokens=float(self._bytes_burst))
        now = time.monotonic()
        u.tokens = min(self._bytes_burst, u.tokens + (now - u.refilled) * self._bytes_per_s)
        u.refilled = now
        if opening and u.open >= self._max_open_uid:
            self.limited_open += 1
            why = f"uid {peer.uid} has {u.open} spans open (at most {self._max_open_uid})"
        elif self.run_bytes + size > self._max_run_bytes:
            self.limited_run_bytes += 1
            why = f"the run holds {self.run_bytes} span bytes (at most {self._max_run_bytes})"
        elif u.tokens < size:
            self.limited_rate += 1
            why = f"uid {peer.uid} sends over {self._bytes_per_s:.0f} span bytes/s"
        else:
            u.tokens -= size
            self.run_bytes += size
            if opening:
                u.open += 1
            return True
        if not state.warned:
            state.warned = True
            log.warning("pid %d: %s; spans refused (counted)", peer.pid, why)
        return False

    def _forget(self, span: _Open, key: tuple[int, str]) -> None:
        state = self._conns.get(span.peer.conn_id)
        if state is not None:
            state.keys.discard(key)

    def _record(self, span: _Open, end_mono: int, end_wall: int, clock: int,
                status: StatusCode, message: str, exception_type: Optional[str]) -> SpanRecord:
        """The finished span (every span ends here once: its uid holds one open span less)."""
        u = self._uids.get(span.peer.uid)
        if u is not None and u.open:
            u.open -= 1
        start = span.start
        attrs = span.metadata.to_attributes()
        attrs["span.type"] = start.span_type.value
        if exception_type:
            attrs["exception.type"] = exception_type
        end_mono = max(end_mono, start.mono_ns)
        end_wall = max(end_wall, start.wall_ns)
        return SpanRecord(
            trace_id=bytes.fromhex(start.trace_id),
            span_id=bytes.fromhex(start.span_id),
            parent_span_id=None if start.parent_span_id is None
            else bytes.fromhex(start.parent_span_id),
            span_name=start.name,
            span_kind=SpanKind.INTERNAL,
            start_time_nanos=start.wall_ns,
            end_time_nanos=end_wall,
            duration_nanos=end_wall - start.wall_ns,
            logical_clock=max(clock, start.logical_clock),
            status_code=status,
            status_message=message,
            attributes_json=orjson.dumps(attrs).decode(),
            resource_json=span.resource_json,
            process_id=span.peer.pid,
            thread_id=start.tid,
            start_mono_nanos=start.mono_ns,
            end_mono_nanos=end_mono,
        )

    def _abandon(self, span: _Open, end_mono: int, end_wall: int, message: str) -> SpanRecord:
        return self._record(span, end_mono, end_wall, span.start.logical_clock,
                            StatusCode.ERROR, message, None)

    def disconnected(self, peer: PeerCred) -> None:
        """A client connection closed (SpanServer's on_disconnect): hold its open spans."""
        now_mono, now_wall = time.monotonic_ns(), time.time_ns()
        with self._lock:
            state = self._conns.pop(peer.conn_id, None)
            if state is None:
                return
            for key in state.keys:
                span = self._open.pop(key, None)
                if span is not None and span.exit_mono:
                    self.ended_by_exit += 1
                    self._finished.append(self._abandon(span, span.exit_mono, span.exit_wall,
                                                        EXITED))
                elif span is not None:
                    span.end_mono, span.end_wall = now_mono, now_wall
                    span.deadline = now_mono + self._grace_ns
                    self._gone[key] = span

    def process_exited(self, pid: int, exit_mono_ns: int, exit_wall_ns: int) -> int:
        """End pid's open spans at its exit time with status Error; returns how many."""
        with self._lock:
            self._exited[pid] = (exit_mono_ns, exit_wall_ns)
            for key, span in self._open.items():
                if key[0] == pid:
                    # Its connection may still hold an unread span_end: decide at disconnect.
                    span.exit_mono, span.exit_wall = exit_mono_ns, exit_wall_ns
            keys = [k for k in self._gone if k[0] == pid]
            for key in keys:
                span = self._open.pop(key, None) or self._gone.pop(key)
                self._forget(span, key)
                self.ended_by_exit += 1
                self._finished.append(self._abandon(span, exit_mono_ns, exit_wall_ns, EXITED))
            return len(keys)

    def steps(self) -> tuple[list[int], list[tuple[int, int]]]:
        """The durations of the last STEP_TIMES step spans that ended, and (step, start
        CLOCK_MONOTONIC ns) of every open one: one snapshot (the socket thread adds to
        both)."""
        with self._lock:
            return list(self._step_ns), [(s.metadata.step, s.start.mono_ns)
                                         for s in self._open.values()
                                         if s.metadata.step is not None]

    def drain(self, now_mono_ns: Optional[int] = None) -> list[SpanRecord]:
        """Finished records since the last drain, including abandoned spans past their grace."""
        now = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
        with self._lock:
            for key in [k for k, s in self._gone.items() if s.deadline <= now]:
                span = self._gone.pop(key)
                self.ended_by_disconnect += 1
                self._finished.append(self._abandon(span, span.end_mono, span.end_wall,
                                                    DISCONNECTED))
            out, self._finished = self._finished, []
        return out

    def end_all(self, message: str = STOPPED) -> list[SpanRecord]:
        """At shutdown: end every open or held span with status Error and drain everything."""
        now_mono, now_wall = time.monotonic_ns(), time.time_ns()
        with self._lock:
            for key, span in list(self._open.items()):
                self._forget(span, key)
                self._finished.append(self._abandon(span, now_mono, now_wall, message))
            for span in self._gone.values():
                self.ended_by_disconnect += 1
                self._finished.append(self._abandon(span, span.end_mono, span.end_wall,
                                                    DISCONNECTED))
            self._open.clear()
            self._gone.clear()
            out, self._finished = self._finished, []
        return out


def _md_bytes(md: ExperimentMetadata) -> int:
    """What a span's metadata costs to hold and store, roughly (see SPAN_OVERHEAD)."""
    return SPAN_OVERHEAD + len(md.model_name) + sum(len(k) + 16 for k in md.metrics)
