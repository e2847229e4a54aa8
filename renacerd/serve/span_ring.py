"""The daemon's end of a client's span ring: map the memfd safely, read its records in bulk.

The client writes records into shared memory with no syscall (docs/protocol.md, "The ring");
the span server polls every ring a few times per 10 ms. Nothing in the ring is trusted: every
offset and length is bounds-checked before use, every payload is copied out before it is
checked and decoded, and a record that does not check out yet (another CPU's stores not all
visible) is read again on the next poll, or ends the connection if it never does.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import queue
import stat
import threading
import time
import zlib

from renacerd.client.protocol import (
    MAX_FRAME,
    RECORD,
    RING_CRC,
    RING_HEADER,
    RING_MAGIC,
    RING_WRAP,
    W_DROPPED,
    W_HEAD,
    W_MAGIC,
    W_SIZE,
    W_TAIL,
    W_TAIL_SEQ,
    ProtocolError,
    ring_record_size,
)

# A record that stays invalid this long (s) is not a write in flight: the ring is broken.
STALL_S = 2.0
_crc32 = zlib.crc32
# Seals that forbid the daemon's own writes (the tail words).
_NO_WRITE = fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
_U32 = 0xFFFFFFFF


class FdReaper:
    """Closes descriptors clients sent, on a fixed pool of threads.

    A memfd closes at once; anything else may be a FUSE file whose close waits on its FUSE
    server, or a TCP socket with SO_LINGER whose close waits out the linger time. Those are
    queued for POOL threads, so however many a client sends, at most POOL threads are
    stuck in close() and no request thread ever is. Sockets a hostile client may have
    queued descriptors on are closed here too (their queue is released by that close)."""

    POOL = 4

    def __init__(self, pool: int = POOL) -> None:
        self._pool = pool
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.queued = 0
        self.closed = 0

    def close(self, fd: int) -> None:
        """Close `fd` without blocking the caller (memfds inline, the rest on the pool)."""
        try:
            fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            self.defer(fd)
            return
        os.close(fd)

    def defer(self, fd: int) -> None:
        """Queue `fd` for the pool, starting a thread while fewer than POOL run."""
        with self._lock:
            self.queued += 1
            if len(self._threads) < self._pool:
                t = threading.Thread(target=self._work, name="renacerd-close-fd", daemon=True)
                self._threads.append(t)
                t.start()
        self._queue.put(fd)

    def pending(self) -> int:
        """Descriptors queued and not closed yet."""
        with self._lock:
            return self.queued - self.closed

    def _work(self) -> None:
        while True:
            fd = self._queue.get()
            try:
                os.close(fd)
            except OSError:
                pass
            with self._lock:
                self.closed += 1


REAPER = FdReaper()


def close_untrusted(fd: int) -> None:
    """Close a descriptor a client sent, never blocking the caller (REAPER)."""
    REAPER.close(fd)


class RingReader:
    """One client's ring, mapped read-write (the daemon's words are the tail and tail seq)."""

    __slots__ = ("_map", "_words", "size", "_mask", "tail", "seq", "_dropped", "_stalled_at",
                 "checked")

    def __init__(self, fd: int, size: int, checked: bool = RING_CRC) -> None:
        """Take ownership of `fd` (closed here, mapped or not) and check it can be trusted."""
        mapped = False
        try:
            if RING_CRC and not checked:
                raise ProtocolError("value", "ring: this host's CPUs reorder stores; records "
                                             "need their CRC")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                raise ProtocolError("value", "ring: the descriptor is no sealable memfd") from None
            # Without this seal the client could shrink the file under the mapping, and the
            # daemon's next read of it would die of SIGBUS.
            if not seals & fcntl.F_SEAL_SHRINK:
                raise ProtocolError("value", "ring: the memfd is not sealed against shrinking")
            if seals & _NO_WRITE or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
                raise ProtocolError("value", "ring: the memfd is not open for reading and "
                                             "writing")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < RING_HEADER + size:
                raise ProtocolError("value", f"ring: the memfd is smaller than {size} bytes")
            # A hugetlb memfd can lose a page to a hole punched later (and SIGBUS us then).
            if st.st_blksize != mmap.PAGESIZE:
                raise ProtocolError("value", "ring: the memfd is not plain shared memory")
            self._map = mmap.mmap(fd, RING_HEADER + size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
            mapped = True
        except OSError as exc:
            raise ProtocolError("value", f"ring: cannot map the memfd ({exc})") from None
        finally:
            if mapped:
                os.close(fd)
            else:
                close_untrusted(fd)
        self._words = memoryview(self._map).cast("Q")
        if self._words[W_MAGIC] != RING_MAGIC or self._words[W_SIZE] != size:
            self.close()
            raise ProtocolError("value", "ring: bad magic or size in the header page")
        self.size = size
        self.checked = checked
        self._mask = size - 1
        self.tail = 0
        self.seq = 0
        self._dropped = 0
        self._stalled_at = 0.0

    def read(self, budget: int, until: int | None = None) -> list[bytes]:
        """Up to `budget` complete payloads, oldest first, up to the head the client published
        (or `until`, a head read earlier); the space they held goes back."""
        words = self._words
        head = words[W_HEAD] if until is None else until
        tail = self.tail
        if not tail <= head <= tail + self.size:
            raise ProtocolError("value", f"ring: head {head} outside tail {tail} + {self.size}")
        out: list[bytes] = []
        mm = self._map
        mask = self._mask
        seq = self.seq
        checked = self.checked
        while tail < head and len(out) < budget:
            off = tail & mask
            # The number first: the rest was stored before it (read in this order on x86).
            rseq = words[(RING_HEADER + off) // 8 + 1]
            want = seq + 1
            if rseq != want:
                break  # not written yet, or not yet visible here
            word = words[(RING_HEADER + off) // 8]
            size = word & _U32
            crc = word >> 32
            if size == RING_WRAP:
                if checked and crc != want & _U32:
                    break
                tail += self.size - off
                continue
            if not 0 < size <= MAX_FRAME or off + RECORD.size + size > self.size:
                raise ProtocolError("value", f"ring: record of {size} bytes at offset {off}")
            start = RING_HEADER + off + RECORD.size
            payload = mm[start:start + size]
            if checked and _crc32(payload, want & _U32) != crc:
                break  # a torn read: the rest of this record is not visible yet
            out.append(payload)
            seq = want
            tail += ring_record_size(size)
        if tail != self.tail:
            self.tail = tail
            self.seq = seq
            self._stalled_at = 0.0
            words[W_TAIL_SEQ] = seq
            words[W_TAIL] = tail
        elif tail < head and not out:
            now = time.monotonic()
            if not self._stalled_at:
                self._stalled_at = now
            elif now - self._stalled_at > STALL_S:
                raise ProtocolError("value", f"ring: the record at byte {tail} never became valid")
        return out

    @property
    def head(self) -> int:
        """The head the client has published now."""
        return self._words[W_HEAD]

    def dropped(self) -> int:
        """Messages the client dropped since the last call (it counts them in the header)."""
        total = self._words[W_DROPPED]
        new = total - self._dropped
        if new <= 0:
            return 0  # a count that goes back is not believed
        self._dropped = total
        return new

    def close(self) -> None:
        """Unmap (the client's writes after this go nowhere)."""
        self._words.release()
        self._map.close()
