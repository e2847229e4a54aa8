"""OTLP/HTTP export to a receiver on loopback that decodes with opentelemetry-proto."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from test_clickhouse import _trace_with_spans

from renacerd.sinks import Backoff, SinkError
from renacerd.sinks.otlp import OtlpExporter, resolve_endpoint
from renacerd.store.database import Store
from tests.conftest import needs_root

BASE_WALL = 1_700_000_000_000_000_000


class Receiver:
    """A collector stand-in: real HTTP, real protobuf decoding; fails the first `fail` posts."""

    def __init__(self, fail: int = 0) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        self.content_types: list[str] = []
        self.fail = fail
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                rec.paths.append(self.path)
                rec.content_types.append(self.headers["Content-Type"])
                if rec.fail > 0:
                    rec.fail -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                rec.requests.append(req)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[dict, Span]]:
        """(resource attributes, span) for every span received."""
        out = []
        for req in self.requests:
            for rs in req.resource_spans:
                res = {kv.key: _val(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    assert ss.scope.name == "renacerd"
                    out += [(res, s) for s in ss.spans]
        return out

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _val(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_val(x) for x in v.array_value.values]
    return getattr(v, kind)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@needs_root
def test_spans_exported_with_ids_parents_times_attributes(cc, renacerd, db, tmp_path, receiver):
    """Both spans arrive once, with their W3C ids, parent, wall times, metadata and summaries."""
    facts = _trace_with_spans(cc, renacerd, db, tmp_path, "otlp-run", 300)
    store = Store(db)
    [local] = store.load_run("otlp-run")
    root_rec, child_rec = store.span_records(store.run("otlp-run").id)
    stats = OtlpExporter(str(db), receiver.url, "otlp-run").flush_now()
    assert stats.spans == 2 and stats.requests == 1
    assert receiver.paths == ["/v1/traces"]
    assert receiver.content_types == ["application/x-protobuf"]
    got = {s.name: (res, s) for res, s in receiver.spans()}
    assert set(got) == {"run", "training_step"}
    res, root = got["run"]
    _, child = got["training_step"]
    assert res["process.pid"] == facts["pid"] and res["service.name"] == "renacer"
    assert res["renacer.run"] == "otlp-run" and res["process.executable.name"] == "ch_writer"
    assert res["process.command_args"][1:] == [facts["out"], "300"]
    assert root.trace_id == child.trace_id == bytes(range(1, 17))
    assert root.span_id == b"\x11" * 8 and root.parent_span_id == b""
    assert child.span_id == b"\x22" * 8 and child.parent_span_id == b"\x11" * 8
    assert child.kind == Span.SPAN_KIND_INTERNAL and child.status.code == Status.STATUS_CODE_OK
    assert child.start_time_unix_nano == BASE_WALL + child_rec.start_mono_nanos
    assert child.end_time_unix_nano == BASE_WALL + child_rec.end_mono_nanos
    ca = {kv.key: _val(kv.value) for kv in child.attributes}
    assert ca["experiment.step"] == "7" and ca["experiment.model_name"] == "tiny"
    assert ca["experiment.loss"] == "0.5" and ca["experiment.epoch"] == "1"
    assert ca["renacer.syscalls.count"] == 20 and ca["renacer.io.bytes_written"] == 1000
    assert sorted(ca["renacer.syscalls.top.names"]) == ["getppid", "write"]
    assert ca["renacer.syscalls.top.calls"] == [10, 10]
    assert ca["thread.id"] == facts["pid"] and ca["renacer.logical_clock"] == 7
    ra = {kv.key: _val(kv.value) for kv in root.attributes}
    ts = local.columns["ts"]
    inside = (ts >= root_rec.start_mono_nanos) & (ts < root_rec.end_mono_nanos)
    assert ra["renacer.syscalls.count"] == int(inside.sum())
    assert ra["renacer.syscalls.time_ns"] == int(local.columns["dur"][inside].sum())
    assert ra["renacer.io.bytes_written"] == 30_000
    names = local.names()
    reads = np.isin(names, ["read", "pread64"]) & inside & (local.columns["ret"] > 0)
    assert ra["renacer.io.bytes_read"] == int(local.columns["ret"][reads].sum())
    # the exporter remembers: a second pass sends nothing
    assert OtlpExporter(str(db), receiver.url, "otlp-run").flush_now().spans == 0
    assert len(receiver.requests) == 1


@needs_root
def test_retry_after_503_delivers_once(cc, renacerd, db, tmp_path):
    """A collector answering 503 gets the batch again after a backoff, and only once in full."""
    _trace_with_spans(cc, renacerd, db, tmp_path, "otlp-retry", 50)
    rec = Receiver(fail=2)
    try:
        exp = OtlpExporter(str(db), rec.url, poll_s=0.05,
                           backoff=Backoff(base_s=0.05, cap_s=0.2)).start()
        deadline = time.monotonic() + 20
        while len(rec.spans()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = exp.stop(drain_s=1)
    finally:
        rec.close()
    assert len(rec.paths) == 3 and stats.retries == 2 and stats.spans == 2
    assert sorted(s.name for _, s in rec.spans()) == ["run", "training_step"]


@needs_root
def test_unreachable_collector_never_blocks(cc, renacerd, db, tmp_path):
    """With nothing listening, stop() returns promptly and the spans stay pending in the store."""
    _trace_with_spans(cc, renacerd, db, tmp_path, "otlp-down", 30)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    exp = OtlpExporter(str(db), f"http://127.0.0.1:{port}", poll_s=0.05, timeout_s=1,
                       backoff=Backoff(base_s=0.05, cap_s=0.1)).start()
    time.sleep(0.5)
    t0 = time.monotonic()
    stats = exp.stop(drain_s=0.3)
    assert time.monotonic() - t0 < 3
    assert stats.errors >= 2 and stats.spans == 0 and "cannot reach" in stats.last_error
    with pytest.raises(SinkError, match="cannot reach OTLP collector"):
        OtlpExporter(str(db), f"http://127.0.0.1:{port}", "otlp-down").flush_now()


def test_endpoint_resolution():
    """--otlp-endpoint beats the environment; a base URL gets /v1/traces."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert resolve_endpoint(None, env) == "http://collector:4318/v1/traces"
    assert resolve_endpoint("http://x:4318/", env) == "http://x:4318/v1/traces"
    assert resolve_endpoint("http://x:4318/v1/traces", {}) == "http://x:4318/v1/traces"
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://t:9/custom"
    assert resolve_endpoint(None, env) == "http://t:9/custom"
    assert resolve_endpoint(None, {}) is None
    with pytest.raises(SinkError, match="bad OTLP endpoint"):
        resolve_endpoint("grpc://x:4317", {})
