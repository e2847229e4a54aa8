"""OTLP/HTTP exporter: experiment spans from the store to an OpenTelemetry collector.

Spans keep their W3C trace and span ids and parents, so a job's own OpenTelemetry spans (which
share the trace through TRACEPARENT) and renacer's join in Jaeger or Tempo. Each span carries
what its process tree did in syscalls meanwhile; its process is the OTLP resource. Encoding
uses the official opentelemetry-proto messages; delivery is at least once, as OTLP defines it.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from renacerd import __version__
from renacerd.client.span import SpanRecord
from renacerd.escaping import json_text
from renacerd.sinks import (
    Backoff,
    Progress,
    SinkError,
    StoreTailer,
    ready_spans,
    ready_summaries,
)
from renacerd.store.database import RunInfo, Store
from renacerd.trace.unified_trace import ProcessSpan

TRACES_PATH = "/v1/traces"
BATCH_SPANS = 512
RETRYABLE = frozenset({429, 502, 503, 504})


def _traces_url(base: str) -> str:
    u = urllib.parse.urlsplit(base)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise SinkError(f"bad OTLP endpoint {base!r} (expected http://HOST:4318)")
    if u.path.rstrip("/").endswith(TRACES_PATH):
        return base
    return base.rstrip("/") + TRACES_PATH


def resolve_endpoint(flag: str | None, env: Mapping[str, str] = os.environ) -> str | None:
    """The /v1/traces URL from --otlp-endpoint, else the OTEL_EXPORTER_OTLP_* variables.

    A base URL gets /v1/traces appended (as OTEL_EXPORTER_OTLP_ENDPOINT defines); the
    traces-specific variable is used as given.
    """
    if flag:
        return _traces_url(flag)
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        u = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        _traces_url(u)
        return u
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return _traces_url(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    return None


def parse_headers(text: str | None) -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_HEADERS: `k1=v1,k2=v2`, values URL-encoded."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = urllib.parse.unquote(v.strip())
    return out


def any_value(v: Any) -> AnyValue:
    """A JSON value as an OTLP AnyValue (bool before int: bool is an int in Python)."""
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, str):  # protobuf strings are UTF-8: stray bytes of a name as \xNN
        return AnyValue(string_value=json_text(v))
    if isinstance(v, (list, tuple)):
        a = AnyValue()
        a.array_value.values.extend(any_value(x) for x in v)
        return a
    if isinstance(v, dict):
        a = AnyValue()
        a.kvlist_value.values.extend(KeyValue(key=json_text(str(k)), value=any_value(x))
                                     for k, x in v.items())
        return a
    return AnyValue(string_value=orjson.dumps(v).decode() if v is not None else "")


def key_values(d: Mapping[str, Any]) -> list[KeyValue]:
    """Attributes as OTLP KeyValues."""
    return [KeyValue(key=json_text(k), value=any_value(v)) for k, v in d.items()]


def _json(js: str | None) -> dict[str, Any]:
    try:
        d = orjson.loads(js) if js else {}
    except orjson.JSONDecodeError:
        return {}
    return d if isinstance(d, dict) else {}


def process_resource(info: RunInfo, p: ProcessSpan | None, resource_json: str | None) -> Resource:
    """The span's process as an OTLP resource (semantic-convention keys)."""
    attrs: dict[str, Any] = {"service.name": "renacer"}
    attrs.update(_json(resource_json))
    attrs["host.name"] = info.host or ""
    attrs["renacer.run"] = info.name
    if p is not None:
        attrs["process.pid"] = p.pid
        attrs["process.parent_pid"] = p.ppid
        attrs["process.executable.name"] = p.name
        if p.exe:
            attrs["process.executable.path"] = p.exe
        if p.argv:
            attrs["process.command_args"] = list(p.argv)
    return Resource(attributes=key_values(attrs))


def build_request(info: RunInfo, rows: list[SpanRecord], summaries: list[dict[str, Any]],
                  procs: dict[int, ProcessSpan]) -> ExportTraceServiceRequest:
    """One export request: spans grouped by their process (one ResourceSpans each)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.process_id or 0, []).append(i)
    req = ExportTraceServiceRequest()
    scope = InstrumentationScope(name="renacerd", version=__version__)
    for pid, idx in groups.items():
        rs = ResourceSpans(resource=process_resource(info, procs.get(pid),
                                                     rows[idx[0]].resource_json))
        ss = ScopeSpans(scope=scope)
        for i in idx:
            r = rows[i]
            attrs = _json(r.attributes_json)
            attrs["renacer.logical_clock"] = r.logical_clock or 0
            attrs["thread.id"] = r.thread_id or 0
            attrs.update(summaries[i])
            ss.spans.append(Span(
                trace_id=r.trace_id,
                span_id=r.span_id,
                parent_span_id=r.parent_span_id or b"",
                name=r.span_name,
                # renacer numbers kinds from Internal=0; OTLP from Unspecified=0, Internal=1
                kind=(r.span_kind or 0) + 1,
                start_time_unix_nano=r.start_time_nanos or 0,
                end_time_unix_nano=r.end_time_nanos or 0,
                attributes=key_values(attrs),
                status=Status(code=r.status_code or 0, message=r.status_message or ""),
            ))
        rs.scope_spans.append(ss)
        req.resource_spans.append(rs)
    return req


@dataclass(slots=True)
class ExportStats:
    """What an exporter has done since it started."""

    spans: int = 0
    requests: int = 0
    bytes_sent: int = 0
    retries: int = 0
    errors: int = 0
    rejected: int = 0  # spans the collector refused for good (they stay in the store)
    last_error: str | None = None


class _Rejected(SinkError):
    """The collector refused a request in a way a retry cannot fix."""


class OtlpExporter(StoreTailer):
    """Tails the spans of the store at `store_path` to an OTLP/HTTP collector."""

    _thread_name = "renacer-otlp"

    def __init__(self, store_path: str, endpoint: str | None = None, run: str | None = None, *,
                 poll_s: float = 1.0, batch_spans: int = BATCH_SPANS, timeout_s: float = 10.0,
                 headers: dict[str, str] | None = None, backoff: Backoff | None = None) -> None:
        url = resolve_endpoint(endpoint)
        if url is None:
            raise SinkError("no OTLP endpoint: give --otlp-endpoint URL or set "
                            "OTEL_EXPORTER_OTLP_ENDPOINT")
        super().__init__(store_path, run, poll_s, backoff)
        self.url = url
        self.batch_spans = batch_spans
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/x-protobuf",
                        **parse_headers(os.environ.get("OTEL_EXPORTER_OTLP_HEADERS")),
                        **(headers or {})}
        self._progress_key = f"otlp:{url}"
        self._stats = ExportStats()
        self._seen: dict[tuple[int, int], float] = {}

    def stop(self, drain_s: float = 5.0) -> ExportStats:
        """Export what is stored (for up to drain_s while the collector answers), then stop."""
        return super().stop(drain_s)

    @property
    def stats(self) -> ExportStats:
        """A snapshot of the counters."""
        return replace(self._stats)

    def _poll(self) -> bool:
        store, progress = self._open()
        runs = [store.run(self.run)] if self.run else store.runs()
        idle = True
        for info in runs:
            pos = progress.get(info.id)
            if pos.done:
                continue
            sent = self._export_run(store, progress, info, pos)
            idle &= not sent
        return idle

    def _export_run(self, store: Store, progress: Progress, info: RunInfo, pos) -> bool:
        spans = store.spans_after(info.id, pos.span_rowid, self.batch_spans)
        if not spans:
            if info.status != "running":
                pos.done = True
                progress.set(info.id, pos)
            return False
        ready = ready_spans(store, info.id, info.status == "running", spans, self._seen)
        if not ready:
            return False
        procs = store.processes(info.id)
        tree = [(i, p.pid, p.ppid) for i, p in procs]
        by_pid = {p.pid: p for _, p in procs}
        table = info.syscall_table
        if not table:
            from renacerd.syscall_table import syscall_table

            table = syscall_table()
        records = [sp.record for sp in ready]
        sums = [x.attributes() for x in ready_summaries(store, info.id, tree, ready, table)]
        req = build_request(info, records, sums, by_pid)
        try:
            self._post(req.SerializeToString())
        except _Rejected as e:
            # A permanent refusal must not wedge the exporter; the spans stay in the store.
            self._stats.rejected += len(ready)
            self._stats.last_error = str(e)
        else:
            self._stats.spans += len(ready)
        pos.span_rowid = ready[-1].rowid
        progress.set(info.id, pos)
        for sp in ready:
            self._seen.pop((info.id, sp.rowid), None)
        return True

    def _post(self, body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, method="POST", headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                out = resp.read()
        except urllib.error.HTTPError as e:
            msg = f"OTLP collector {self.url} answered {e.code} {e.reason}"
            if e.code in RETRYABLE:
                err = SinkError(msg)
                ra = e.headers.get("Retry-After") if e.headers else None
                err.retry_after = float(ra) if ra and ra.isdigit() else 0.0  # type: ignore
                raise err from None
            raise _Rejected(msg) from None
        except (urllib.error.URLError, OSError) as e:
            raise SinkError(f"cannot reach OTLP collector {self.url}: "
                            f"{getattr(e, 'reason', e)}") from None
        self._stats.requests += 1
        self._stats.bytes_sent += len(body)
        if out:
            resp_msg = ExportTraceServiceResponse()
            try:
                resp_msg.ParseFromString(out)
                self._stats.rejected += resp_msg.partial_success.rejected_spans
            except Exception:  # a collector answering 200 with junk still took the spans
                pass
