"""Client cost per `with experiment_span(...)` beside a bare `with` and OpenTelemetry's SDK.

Open + close of a span with metadata holding 4 metrics, median over batches (100k spans by
default), all measured in one run: bare `with` block, renacerd client with no daemon, renacerd
client connected to a real SpanServer in a separate process (batches of 1000 with pauses that
let the daemon keep up, 100 spans per 10 ms, and a flood that saturates it), OpenTelemetry
SDK start_as_current_span with a BatchSpanProcessor (and an exporter that discards).
Usage: .venv/bin/python bench/client_span.py [--spans 100000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from renacerd.client import core as client  # noqa: E402
from renacerd.client import experiment_span  # noqa: E402

METRICS = {"accuracy": 0.95, "f1": 0.92, "perplexity": 12.5, "grad_norm": 1.25}


class Bare:
    """The cheapest context manager: the floor under every `with`."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def median_ns(body, spans: int, batch: int, pause: float = 0.0) -> float:
    """Median over batches of the mean ns per iteration of body(batch); `pause` s between."""
    body(batch)  # warm up
    per = []
    for _ in range(max(spans // batch, 1)):
        if pause:
            time.sleep(pause)
        t0 = time.perf_counter_ns()
        body(batch)
        per.append((time.perf_counter_ns() - t0) / batch)
    return statistics.median(per)


def bare(n: int) -> None:
    for _ in range(n):
        with Bare():
            pass


def renacer(n: int) -> None:
    for i in range(n):
        with experiment_span("training_step", model_name="gpt-2", epoch=1, step=i,
                             metrics=METRICS):
            pass


def serve(path: str, ready, stop, result) -> None:
    """The daemon side in its own process: SpanServer + SpanBook, drained as a store would."""
    from renacerd.serve.span_server import SpanServer
    from renacerd.serve.spans import SpanBook

    book = SpanBook()
    drained = 0
    with SpanServer(path, on_message=book.handle, on_disconnect=book.disconnected):
        ready.set()
        while not stop.wait(0.05):
            drained += len(book.drain())
        time.sleep(0.2)
        drained += len(book.drain())
    result.send((drained, book.counts()))


def otel_body():
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError:
        return None

    class Discard(SpanExporter):
        """Exports nowhere, so the figure is the SDK's own cost."""

        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    tracer = provider.get_tracer("bench")
    attrs = {f"experiment.metrics.{k}": v for k, v in METRICS.items()}

    def body(n: int) -> None:
        for i in range(n):
            with tracer.start_as_current_span("training_step", attributes=attrs) as span:
                span.set_attribute("experiment.step", i)

    return body, provider


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows: list[tuple[str, float, str]] = []

    rows.append(("bare `with` block", median_ns(bare, a.spans, a.batch), ""))

    tmp = tempfile.mkdtemp(prefix="rcb", dir="/tmp")
    client.configure(socket=os.path.join(tmp, "absent.sock"))
    rows.append(("renacerd, no daemon", median_ns(renacer, a.spans, a.batch), ""))

    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    result_r, result_w = ctx.Pipe(duplex=False)
    path = os.path.join(tmp, "bench.sock")
    daemon = ctx.Process(target=serve, args=(path, ready, stop, result_w))
    daemon.start()
    ready.wait(30)
    client.configure(socket=path)
    # Batches the daemon keeps up with: its per-client budget is 50,000 messages/s.
    before = client.stats()
    connected = median_ns(renacer, a.spans, a.batch, pause=a.batch * 2 / 40_000)
    after = client.stats()
    # Training steps are separated by compute: 100 spans, then 10 ms for the daemon to drain.
    paced_before = client.stats()
    paced = median_ns(renacer, a.spans, 100, pause=0.01)
    paced_after = client.stats()
    time.sleep(0.1)
    flood_before = client.stats()
    flood = median_ns(renacer, a.spans, a.batch)
    flood_after = client.stats()
    stop.set()
    drained, counts = result_r.recv()
    daemon.join(30)
    client.configure(socket=os.path.join(tmp, "absent.sock"))
    shutil.rmtree(tmp, ignore_errors=True)
    sent_spans = (a.spans // a.batch + 1) * a.batch

    def note(b: dict, e: dict) -> str:
        return f"{e['sent'] - b['sent']} msgs sent, {e['dropped'] - b['dropped']} dropped"

    rows.append(("renacerd, daemon connected", connected,
                 f"{sent_spans} spans in batches of {a.batch}: {note(before, after)}"))
    rows.append(("renacerd, connected, paced", paced,
                 f"100 spans per 10 ms: {note(paced_before, paced_after)}"))
    rows.append(("renacerd, connected, flood", flood,
                 f"no pauses: {note(flood_before, flood_after)} (daemon saturated); "
                 f"daemon recorded {drained} spans in all"))

    otel = otel_body()
    if otel is None:
        rows.append(("OpenTelemetry SDK (batch)", float("nan"),
                     "opentelemetry-sdk not installed"))
    else:
        body, provider = otel
        rows.append(("OpenTelemetry SDK (batch)", median_ns(body, a.spans, a.batch), ""))
        provider.shutdown()

    print(f"per-span cost, median over {a.spans // a.batch} batches of {a.batch} "
          f"(python {sys.version.split()[0]}, {os.cpu_count()} cpus)")
    print(f"{'case':30} {'ns/span':>10} {'x bare':>8}  note")
    base = rows[0][1]
    for name, ns, note in rows:
        print(f"{name:30} {ns:10.0f} {ns / base:8.1f}  {note}")
    by = {name: ns for name, ns, _ in rows}
    otel_ns = by["OpenTelemetry SDK (batch)"]
    print(f"targets: connected {by['renacerd, daemon connected'] / 1000:.2f} us, "
          f"{by['renacerd, connected, paced'] / 1000:.2f} us paced (<= 5 us), "
          f"absent {by['renacerd, no daemon'] / 1000:.2f} us (<= 1 us)")
    if otel_ns == otel_ns:
        print(f"OpenTelemetry / renacerd connected: "
              f"{otel_ns / by['renacerd, daemon connected']:.1f}x, "
              f"{otel_ns / by['renacerd, connected, paced']:.1f}x paced")
    print(f"daemon counts: {counts}")


if __name__ == "__main__":
    main()
