"""Span server throughput: 8 client processes send spans as fast as they can to one SpanServer.

Two runs in one go: senders using blocking sockets (the daemon's capacity; every span sent
must be recorded) and senders using the real fail-open client library (what a flood costs:
spans the clients drop are counted by them and reported to the daemon).
Usage: .venv/bin/python bench/span_server.py [--clients 8] [--spans 25000]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from renacerd.serve.span_server import SpanServer  # noqa: E402
from renacerd.serve.spans import SpanBook  # noqa: E402


def blocking_sender(path: str, spans: int) -> int:
    """Raw protocol over a blocking socket: nothing is dropped on the client side."""
    import socket

    import orjson

    from renacerd.client.protocol import Hello, encode

    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.send(encode(Hello(pid=os.getpid())))
    trace = os.urandom(16).hex()
    metrics = {"accuracy": 0.95, "f1": 0.92, "perplexity": 12.5, "grad_norm": 1.25}
    for i in range(spans):
        span = f"{(os.getpid() << 32) + i + 1:016x}"
        now = time.monotonic_ns()
        # The compact frames the client library sends (docs/protocol.md).
        s.send(orjson.dumps(["s", span, trace, None, "training_step", "gpt-2", 1, i, None,
                             metrics, now, time.time_ns(), os.getpid(), 2 * i + 1]))
        s.send(orjson.dumps(["e", span, now + 1000, time.time_ns(), 2 * i + 2]))
    s.close()
    return 0


def library_sender(path: str, spans: int) -> int:
    """The real client library, fail-open and non-blocking."""
    from renacerd.client import core as client

    client.configure(socket=path)
    metrics = {"accuracy": 0.95, "f1": 0.92, "perplexity": 12.5, "grad_norm": 1.25}
    for i in range(spans):
        with client.experiment_span("training_step", model_name="gpt-2", epoch=1, step=i,
                                    metrics=metrics):
            pass
    client._client.flush_at_exit()
    return min(client.stats()["dropped"], 255)


def run(kind: str, sender, clients: int, spans: int, tmp: str) -> dict:
    book = SpanBook()
    path = os.path.join(tmp, f"{kind}.sock")
    total = clients * spans
    recorded = 0
    with SpanServer(path, on_message=book.handle, on_disconnect=book.disconnected) as server:
        r, w = os.pipe()
        pids = []
        for _ in range(clients):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(w)
                    os.read(r, 1)  # start together
                    code = sender(path, spans)
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(r)
        t0 = time.perf_counter()
        os.write(w, b"x" * clients)
        os.close(w)
        client_dropped_exit = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        sent_done = time.perf_counter() - t0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            recorded += len(book.drain())
            counts = book.counts()
            # a span whose start the client dropped never reaches the daemon (its end is not
            # sent either); the client reports it in its dropped count
            if (counts["spans_ended"] + counts["client_dropped"] >= total
                    and server.stats["open"] == 0):
                break
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        recorded += len(book.drain())
        counts = book.counts()
        stats = dict(server.stats)
    return {"kind": kind, "spans": total, "recorded": recorded, "elapsed": elapsed,
            "senders_done": sent_done, "counts": counts, "server": stats,
            "exit_codes": client_dropped_exit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--spans", type=int, default=25_000, help="spans per client")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="rsb", dir="/tmp")
    print(f"{a.clients} client processes x {a.spans} spans (2 messages each), "
          f"{os.cpu_count()} cpus")
    print(f"{'senders':10} {'spans':>8} {'recorded':>9} {'lost':>6} {'spans/s':>9} "
          f"{'client-dropped msgs':>20} {'throttled':>9}")
    for kind, sender in (("blocking", blocking_sender), ("library", library_sender)):
        res = run(kind, sender, a.clients, a.spans, tmp)
        c = res["counts"]
        # a span is lost when the daemon accepted messages for it but recorded no span:
        # started without an end, or an end without a start
        lost = c["spans_started"] - res["recorded"] + c["orphan_ends"]
        print(f"{kind:10} {res['spans']:8d} {res['recorded']:9d} {lost:6d} "
              f"{res['recorded'] / res['elapsed']:9.0f} {c['client_dropped']:20d} "
              f"{res['server']['throttled']:9d}")
        if kind == "blocking" and res["recorded"] != res["spans"]:
            print(f"  LOST SPANS: {res}")
    print("lost = spans the daemon saw start (or end) but could not record; the library run's "
          "client-dropped messages were never sent (fail-open) and are reported by count")


if __name__ == "__main__":
    main()
