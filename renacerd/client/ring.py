"""The client's end of the span ring: a sealed memfd it maps and fills with records, no syscall
per frame (docs/protocol.md, "The ring"; the daemon's end is renacerd.serve.span_ring)."""

from __future__ import annotations

import fcntl
import mmap
import os
import zlib
from typing import Optional

from renacerd.client.protocol import (
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
    ring_record_size,
)

# Whether new rings put a CRC in every record (where CPUs may reorder stores).
CRC = RING_CRC
_crc32 = zlib.crc32
_HDR = RECORD.size
_U32 = 0xFFFFFFFF

__all__ = ["CRC", "RingWriter", "ring_record_size"]


class RingWriter:
    """One ring's writer state: the mapping, the head and the next sequence number.

    Span.__enter__ and __exit__ inline the common case of `write` (a record that fits before
    `limit`); tests/unit/test_span_ring.py checks that both write the same bytes."""

    __slots__ = ("mm", "words", "size", "mask", "head", "seq", "limit", "crc")

    def __init__(self, mm: mmap.mmap, size: int, crc: bool) -> None:
        self.mm = mm
        self.words = memoryview(mm).cast("Q")
        self.size = size
        self.mask = size - 1
        # head: bytes written (a running count); seq: the last number used; limit: the head
        # up to which a record needs no look at the daemon's tail.
        self.head = self.seq = self.limit = 0
        self.crc = crc

    @classmethod
    def create(cls, size: int, dropped: int = 0) -> tuple[RingWriter, int]:
        """A fresh sealed memfd ring of `size` bytes and its descriptor (the caller closes it)."""
        fd = os.memfd_create("renacerd-spans", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        mm: Optional[mmap.mmap] = None
        try:
            os.ftruncate(fd, RING_HEADER + size)
            # The daemon maps it too: it must never shrink under that mapping.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(fd, RING_HEADER + size)
            writer = cls(mm, size, CRC)
        except BaseException:
            if mm is not None:
                mm.close()
            os.close(fd)
            raise
        words = writer.words
        words[W_MAGIC] = RING_MAGIC
        words[W_SIZE] = size
        words[W_DROPPED] = dropped
        return writer, fd

    def write(self, payload: bytes) -> bool:
        """Put one frame in the ring if it has room; no syscall."""
        n = len(payload)
        head = self.head
        end = head + ring_record_size(n)
        if end > self.limit:
            head = self.room(n)
            if head < 0:
                return False
            end = head + ring_record_size(n)
        at = RING_HEADER + (head & self.mask)
        self.mm[at + _HDR:at + _HDR + n] = payload
        self.seq = seq = self.seq + 1
        words = self.words
        i = at >> 3
        # The payload, then the length word, then the number (docs/protocol.md, "The ring").
        words[i] = n | (_crc32(payload, seq & _U32) << 32) if self.crc else n
        words[i + 1] = seq
        self.head = end
        words[W_HEAD] = end
        return True

    def room(self, n: int) -> int:
        """Where a record of `n` bytes goes (after a wrap marker if needed), or -1: no room."""
        size = self.size
        need = ring_record_size(n)
        head = self.head
        off = head & self.mask
        tail = self.words[W_TAIL]
        if off + need > size:
            if head + size - off + need - tail > size:
                return -1
            # No room before the end: a marker sends the reader back to offset 0. It takes the
            # next number without using it up.
            i = (RING_HEADER + off) >> 3
            seq = self.seq + 1
            self.words[i] = RING_WRAP | ((seq & _U32) << 32 if self.crc else 0)
            self.words[i + 1] = seq
            head += size - off
            self.head = head
        self.limit = min(tail + size, head - (head & self.mask) + size)
        return head if head + need <= self.limit else -1

    def unread(self) -> int:
        """Records written that the daemon has not consumed."""
        return min(max(self.seq - self.words[W_TAIL_SEQ], 0), self.seq)

    def add_dropped(self, n: int) -> None:
        """Count dropped frames in the header, where the daemon reads them."""
        self.words[W_DROPPED] += n

    def close(self) -> None:
        """Unmap (the daemon reads what is in the ring when the connection closes)."""
        self.words.release()
        self.mm.close()
