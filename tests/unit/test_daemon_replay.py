"""bench/daemon_replay.py's rings: what the kernel side writes, the real RingReader reads."""

from __future__ import annotations

import numpy as np

from bench.daemon_replay import MemRing, merged
from renacerd.records import EVENT


def test_mem_ring_round_trip_through_the_ring_reader_across_the_wrap():
    ring = MemRing(4096, EVENT)  # 73 records of 56 bytes: the second batch wraps
    recs = np.zeros(100, EVENT)
    recs["ts"] = np.arange(100) + 1000
    recs["pid"], recs["nr"] = 7, np.arange(100) % 300
    ring.fill(recs[:50])
    assert ring.reader.drain().tolist() == recs[:50].tolist()
    ring.fill(recs[50:])
    got = ring.reader.peek()
    assert got.tolist() == recs[50:].tolist()
    ring.reader.release()
    assert ring.reader.pending_bytes() == 0 and ring.reader.records_read == 100


def test_merged_reads_k_drains_as_one():
    rec = {"t": np.array([10, 20, 30, 40, 50]), "ev_n": np.array([1, 2, 3, 4, 5]),
           "de_n": np.array([0, 1, 0, 1, 0]), "dl_n": np.zeros(5, np.int64)}
    m = merged(rec, 2)
    assert m["t"].tolist() == [20, 40, 50]
    assert m["ev_n"].tolist() == [3, 7, 5] and m["de_n"].tolist() == [1, 1, 0]
