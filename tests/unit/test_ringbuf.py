"""The bulk ring reader on a memfd laid out as a BPF ring buffer (consumer page, producer
page, data area): peek leaves the space to the producers until release, drain copies."""

import mmap
import os
import struct

import numpy as np
import pytest

from renacerd.capture.ringbuf import RingBufferError, RingReader
from renacerd.records import EVENT

PAGE = mmap.PAGESIZE
DATA = 4 * PAGE
REC = 8 + EVENT.itemsize  # header + payload (48 B, already 8-aligned)
BUSY, DISCARD = 1 << 31, 1 << 30


@pytest.fixture
def ring():
    fd = os.memfd_create("ring")
    os.ftruncate(fd, 2 * PAGE + 2 * DATA)
    m = mmap.mmap(fd, 2 * PAGE + 2 * DATA)
    yield fd, m
    m.close()
    os.close(fd)


def produce(m: mmap.mmap, recs: list[tuple[int, int]], start: int = 0) -> int:
    """Write records (ts, header flags) from data offset `start`; set producer_pos."""
    pos = start
    for ts, hdr in recs:
        e = np.zeros(1, dtype=EVENT)
        e["ts"], e["nr"], e["pid"] = ts, 39, 7
        m[2 * PAGE + pos : 2 * PAGE + pos + REC] = struct.pack("<II", EVENT.itemsize | hdr, 0) \
            + e.tobytes()
        pos += REC
    m[PAGE : PAGE + 8] = struct.pack("<Q", pos)
    return pos


def consumer(m: mmap.mmap) -> int:
    return struct.unpack("<Q", m[:8])[0]


def test_peek_is_a_view_released_only_on_release(ring):
    fd, m = ring
    end = produce(m, [(100, 0), (200, 0), (300, 0)])
    r = RingReader(fd, DATA, EVENT)
    ev = r.peek()
    assert ev["ts"].tolist() == [100, 200, 300]
    assert consumer(m) == 0  # still the producers' to keep: nothing handed back yet
    assert np.shares_memory(ev, r._data)
    r.release()
    assert consumer(m) == end
    r.release()  # a second release hands back nothing more
    assert consumer(m) == end
    assert len(r.peek()) == 0
    del ev  # a view pins the mapping
    r.close()


def test_drain_copies_and_releases(ring):
    fd, m = ring
    end = produce(m, [(1, 0), (2, 0)])
    r = RingReader(fd, DATA, EVENT)
    ev = r.drain()
    assert ev["ts"].tolist() == [1, 2] and ev["pid"].tolist() == [7, 7]
    assert ev.flags.c_contiguous and not np.shares_memory(ev, r._data)
    assert consumer(m) == end
    r.close()


def test_drain_of_one_record_is_a_copy_too(ring):
    # one row counts as contiguous: a copy must still be made, or the record would change
    # under the reader when the kernel reuses the released space
    fd, m = ring
    produce(m, [(5, 0)])
    r = RingReader(fd, DATA, EVENT)
    ev = r.drain()
    assert not np.shares_memory(ev, r._data)
    produce(m, [(6, 0)])  # the producer writes over the released space
    assert ev["ts"].tolist() == [5]
    r.close()


def test_close_with_a_view_still_alive_does_not_fail(ring):
    fd, m = ring
    produce(m, [(1, 0)])
    r = RingReader(fd, DATA, EVENT)
    ev = r.peek()
    r.close()  # the mapping goes when `ev` does
    assert ev["ts"].tolist() == [1]


def test_peek_stops_at_a_busy_record_and_skips_discarded_ones(ring):
    fd, m = ring
    produce(m, [(1, 0), (2, DISCARD), (3, 0), (4, BUSY), (5, 0)])
    r = RingReader(fd, DATA, EVENT)
    ev = r.peek()
    assert ev["ts"].tolist() == [1, 3]  # a copy: the discarded record is left out
    r.release()
    assert consumer(m) == 3 * REC  # up to the busy record, which the next drain reads
    r.close()


def test_a_record_of_another_size_is_an_error(ring):
    fd, m = ring
    produce(m, [(1, 0)])
    m[2 * PAGE : 2 * PAGE + 4] = struct.pack("<I", 24)
    r = RingReader(fd, DATA, EVENT)
    with pytest.raises(RingBufferError, match="record of 24 bytes"):
        r.peek()
    assert consumer(m) == 0
    r.close()
