"""DetailQueue: details joined to their events by (tid, enter ts), in bulk."""

import numpy as np

from renacerd.capture.details import DetailQueue, detail_bytes
from renacerd.records import SLOT_ADDR, SLOT_ARGV, SLOT_PATH0, SLOT_PATH1, detail_dtype

DT = detail_dtype(64)


def dets(*rows):
    """Detail records from (tid, ts, slot, data[, len]) rows; len counts the NUL of strings."""
    out = np.zeros(len(rows), dtype=DT)
    for i, r in enumerate(rows):
        tid, ts, slot, data = r[:4]
        out[i]["tid"], out[i]["ts"], out[i]["slot"], out[i]["nr"] = tid, ts, slot, 257
        out[i]["data"] = data
        out[i]["len"] = r[4] if len(r) > 4 else len(data) + 1
    return out


def test_join_matches_each_detail_to_its_event_and_keeps_the_rest():
    q = DetailQueue(DT)
    q.add(dets((10, 100, SLOT_PATH0, b"/a"), (10, 100, SLOT_PATH1, b"/b"),
               (11, 100, SLOT_PATH0, b"/c"), (10, 200, SLOT_PATH0, b"/later")))
    q.add(dets((12, 50, SLOT_PATH0, b"/orphan")))
    # events: (tid 11, ts 100), (tid 10, ts 100), (tid 10, ts 150: no details)
    ei, got = q.join(np.array([11, 10, 10], np.uint32), np.array([100, 100, 150], np.uint64))
    pairs = sorted(zip(ei.tolist(), got["data"].tolist()))
    assert pairs == [(0, b"/c"), (1, b"/a"), (1, b"/b")]
    # unmatched details stay queued, in arrival order
    assert len(q) == 2
    assert q.recs["data"].tolist() == [b"/later", b"/orphan"]
    assert q.pop(10, 200) == [(SLOT_PATH0, 257, b"/later")]
    assert q.pop(10, 200) == []
    assert len(q) == 1


def test_join_with_nothing_queued_or_no_events():
    q = DetailQueue(DT)
    ei, got = q.join(np.array([1], np.uint32), np.array([5], np.uint64))
    assert len(ei) == 0 and len(got) == 0
    q.add(dets((1, 5, SLOT_PATH0, b"/x")))
    ei, got = q.join(np.array([], np.uint32), np.array([], np.uint64))
    assert len(ei) == 0 and len(q) == 1


def test_same_ts_other_thread_is_not_joined():
    q = DetailQueue(DT)
    q.add(dets((7, 100, SLOT_PATH0, b"/mine")))
    ei, _ = q.join(np.array([8], np.uint32), np.array([100], np.uint64))
    assert len(ei) == 0 and len(q) == 1


def test_detail_bytes_strings_and_binary():
    assert detail_bytes(SLOT_PATH0, 3, b"/a") == b"/a"
    assert detail_bytes(SLOT_ARGV + 1, 1, b"") == b""
    assert detail_bytes(SLOT_PATH0, -14, b"junk") == b""  # failed read: empty
    # a sockaddr ending in NULs: the S field dropped them, the length restores them
    assert detail_bytes(SLOT_ADDR, 8, b"\x02\x00\x00P") == b"\x02\x00\x00P\0\0\0\0"
