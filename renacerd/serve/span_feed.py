"""The client socket of a tracing session: experiment spans in, SpanRecords into the run."""

from __future__ import annotations

import logging
import os
import tempfile

import psutil

from renacerd.capture.tracer import ProcState, Tracer
from renacerd.serve.span_server import PeerCred, SocketInUseError, SpanServer
from renacerd.serve.spans import SpanBook

log = logging.getLogger("renacerd")

DEFAULT_SOCKET = "/run/renacer/renacerd.sock"


class SpanFeedError(RuntimeError):
    """The span socket cannot be set up (one line, exit 2)."""


class _LimitCounters:
    """The span book's limit counters as a tracer Source: persisted with the run's counters."""

    def __init__(self, book: SpanBook) -> None:
        self.book = book

    def on_syscalls(self, tracer, ev, s0) -> None:
        """Nothing to do per batch."""

    def drain(self, tracer) -> None:
        """Nothing to drain."""

    def flush(self, tracer) -> None:
        """Nothing to write but the counters."""

    def counters(self) -> dict[str, int]:
        """Span starts and updates the per-uid and per-run limits refused."""
        return self.book.limit_counters()

    def close(self) -> None:
        """Nothing to release."""


class SpanFeed:
    """Owns the SpanServer and SpanBook of one session and feeds the tracer's run."""

    def __init__(self, server_path: str, private_dir: str | None) -> None:
        self.path = server_path
        self._private_dir = private_dir
        self.book = SpanBook()
        self.tracer: Tracer | None = None
        self._roots: set[int] = set()
        self.server = SpanServer(
            server_path,
            on_message=self.book.handle,
            on_disconnect=self.book.disconnected,
            authorize=self._authorize,
            mode=0o600 if private_dir else 0o660,
        )

    @classmethod
    def for_session(cls, path: str | None, launch: bool) -> SpanFeed | None:
        """Launch mode: a private socket unless --socket; attach mode: --socket or the
        default path, skipped (with a line) when a live daemon already serves it."""
        private = None
        if path is None and launch:
            private = tempfile.mkdtemp(prefix="renacerd-")
            path = os.path.join(private, "spans.sock")
        explicit = path is not None
        path = path or DEFAULT_SOCKET
        try:
            feed = cls(path, private)
            feed.server.start()
        except SocketInUseError as e:
            if explicit:
                raise SpanFeedError(str(e)) from e
            log.warning("renacerd: %s; this run collects no experiment spans", e)
            return None
        except OSError as e:
            if explicit:
                raise SpanFeedError(f"cannot listen on {path}: {e.strerror or e}") from e
            log.warning("renacerd: cannot listen on %s (%s); no experiment spans", path, e)
            return None
        return feed

    def _authorize(self, peer: PeerCred) -> bool:
        """Only processes of the traced tree may open spans (pid from SO_PEERCRED)."""
        if peer.pid in self._roots:
            return True
        t = self.tracer
        # The kernel adds forked children to the target map at fork time, and the tracer
        # keeps every process it saw: together race-free even for a child that has exited.
        if t is not None and (peer.pid in t.procs or t.probes.is_target(peer.pid)):
            return True
        try:
            ancestry = {p.pid for p in psutil.Process(peer.pid).parents()}
        except psutil.Error:
            return False
        if self._roots & ancestry:
            return True
        log.warning("renacerd: span client pid %d is not in the traced tree: refused", peer.pid)
        return False

    def attach(self, tracer: Tracer, roots: list[int]) -> None:
        """Start feeding `tracer`'s run."""
        self.tracer = tracer
        self._roots.update(roots)
        tracer.on_process_exit.append(self._process_exited)
        tracer.on_flush.append(self._flush)
        tracer.sources.append(_LimitCounters(self.book))

    def _process_exited(self, st: ProcState) -> None:
        t = self.tracer
        end = st.span.end_mono_ns or 0
        self.book.process_exited(st.span.pid, end, t.start_wall + (end - t.start_mono))

    def _store(self, records) -> None:
        t = self.tracer
        if not records:
            return
        proc_ids = {pid: st.proc_id for pid, st in t.procs.items()}
        with t.lock:
            t.store.add_spans(t.run_id, records, proc_ids)
            t.store.update_run(t.run_id, client_dropped=self.book.counts().get("client_dropped", 0))

    def _flush(self) -> None:
        # Grace counts in the tracer's time: a starved daemon must not call a span
        # "disconnected" before it has read the exit record that ends it exactly.
        self._store(self.book.drain(self.tracer.read_through_mono))

    def close(self) -> None:
        """Stop serving; spans still open end as 'daemon stopped'."""
        self.server.stop()
        if self.tracer is not None:
            self._store(self.book.end_all())
        if self._private_dir:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            try:
                os.rmdir(self._private_dir)
            except OSError:
                pass
