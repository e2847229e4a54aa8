"""Chunk writer: encodes and inserts event chunks on its own thread, off the drain path."""

from __future__ import annotations

import queue
import threading

import numpy as np

from renacerd.columns import EventRows, encode, encode_rows
from renacerd.store.database import Store, StoreError

MAX_PENDING = 8  # chunks in flight; beyond that the drain loop writes itself (backpressure)


class ChunkWriter:
    """zlib and SQLite release the GIL, so encoding here overlaps with draining the rings."""

    def __init__(self, store: Store, run_id: int,
                 lock: threading.RLock | None = None) -> None:
        """`lock`: the lock of `store`'s connection when other runs share it."""
        self.store = store
        self.run_id = run_id
        # every store call of the run goes under it
        self.lock = lock if lock is not None else threading.RLock()
        self.bytes_written = 0
        self.error: Exception | None = None
        self._q: queue.Queue = queue.Queue(maxsize=MAX_PENDING)
        self._t = threading.Thread(target=self._loop, name="renacerd-writer", daemon=True)
        self._t.start()

    def submit(self, proc_id: int, cols: dict[str, np.ndarray] | EventRows) -> None:
        """Queue one chunk (equal-length columns); writes it inline when the queue is full."""
        try:
            self._q.put_nowait((proc_id, cols))
        except queue.Full:
            self._write(proc_id, cols)

    def _write(self, proc_id: int, cols: dict[str, np.ndarray] | EventRows) -> None:
        if isinstance(cols, EventRows):
            blob, n, first, last = encode_rows(cols)  # sorted there
        else:
            ts = cols["ts"]
            if len(ts) > 1 and (np.diff(ts) < 0).any():
                # sorted per drain; a call that spans a drain (entered before the previous
                # drain's last event, exited after) lands behind it. The store keeps enter
                # order.
                order = np.argsort(ts, kind="stable")
                cols = {k: v.take(order) for k, v in cols.items()}
                ts = cols["ts"]
            blob = encode(cols)
            # sorted: the ends are the extremes
            n, first, last = len(ts), int(ts[0]), int(ts[-1])
        with self.lock:
            self.store.add_encoded_chunk(self.run_id, proc_id, blob, n, first, last)
            # committed at once: a write transaction left open until the next flush would
            # keep other writers of the file (a sink's progress) waiting on the lock
            self.store.commit()
            self.bytes_written += len(blob)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                self._write(*item)
            except Exception as e:  # surfaced to the drain loop, which stops the run
                self.error = e if isinstance(e, StoreError) else StoreError(
                    f"{self.store.path}: {type(e).__name__}: {e}")
            finally:
                self._q.task_done()

    def close(self) -> None:
        """Finish the queue and stop the thread; re-raise a write failure."""
        self._q.put(None)
        self._t.join()
        if self.error is not None:
            raise self.error
