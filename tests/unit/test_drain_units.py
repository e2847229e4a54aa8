"""The drain loop's pacing and the CUDA source's library filter, without a kernel."""

from types import SimpleNamespace

import numpy as np

from renacerd.capture.cuda_source import CudaOptions, CudaSource
from renacerd.capture.tracer import (
    MIN_DRAIN_INTERVAL,
    ProcState,
    StringTable,
    _take_exec,
    drain_wait,
)
from renacerd.trace.unified_trace import ProcessSpan


def test_drain_wait_idle_rings_sleep_the_longest():
    assert drain_wait((0, 0), (1000, 100), 0.04, 0.04) == 0.04


def test_drain_wait_keeps_the_fuller_ring_under_an_eighth():
    # 100 of 1000 events in 0.04 s: an eighth takes 0.05 s, capped at the longest wait
    assert drain_wait((100, 0), (1000, 100), 0.04, 0.04) == 0.04
    # 500 of 1000 events in 0.04 s: an eighth fills in 0.01 s
    assert drain_wait((500, 0), (1000, 100), 0.04, 0.04) == 0.01
    # the detail ring decides when it is the fuller one
    assert drain_wait((10, 50), (1000, 100), 0.04, 0.04) == 0.01


def test_drain_wait_has_a_floor_and_ignores_unknown_capacity():
    assert drain_wait((1000, 0), (1000, 100), 0.001, 0.04) == MIN_DRAIN_INTERVAL
    assert drain_wait((1000, 1000), (0, 0), 0.04, 0.04) == 0.04


def _source_and_tracer():
    src = CudaSource(probes=None, options=CudaOptions(), shared_targets=True)
    return src, SimpleNamespace(strings=StringTable())


def test_library_mask_marks_each_shared_object_path_once():
    src, tracer = _source_and_tracer()
    ids = [tracer.strings.intern(p) for p in
           (b"/data/shard-001.bin", b"/usr/lib/libcudart.so.12", b"/dev/shm/torch_1")]
    mask = src._library_mask(tracer)
    assert mask[ids].tolist() == [False, True, False]
    assert not mask[-1]  # s0 == -1: the event has no path
    assert src._any_lib


def test_library_mask_grows_with_the_string_table():
    src, tracer = _source_and_tracer()
    assert not src._library_mask(tracer).any()
    assert not src._any_lib
    ids = [tracer.strings.intern(f"/x/{i}.bin".encode()) for i in range(3000)]
    last = tracer.strings.intern(b"/opt/nccl/libnccl.so.2")
    mask = src._library_mask(tracer)
    assert len(mask) > last + 1
    assert np.flatnonzero(mask).tolist() == [last]
    assert not mask[ids].any() and not mask[-1]


def test_each_execve_takes_the_kernel_copy_of_its_own_exec():
    # One drain held two execs of a process (lifecycle records are handled first): each
    # execve record, entry ts to ts + dur, takes the copy made inside it.
    st = ProcState(proc_id=1, span=ProcessSpan(pid=7))
    st.execs = [(150, b"/a", b"a", False), (250, b"/bin/sh", b"sh\0-c\0exit 5", True)]
    assert _take_exec(st, 100, 160) == (150, b"/a", b"a", False)
    assert _take_exec(st, 200, 260) == (250, b"/bin/sh", b"sh\0-c\0exit 5", True)
    assert _take_exec(st, 300, 310) == (0, None, None, False)
    # a copy whose execve record never came (lost) is dropped by the next execve
    st.execs = [(50, b"/lost", None, False), (350, b"/c", b"c", False)]
    assert _take_exec(st, 300, 360) == (350, b"/c", b"c", False) and st.execs == []


def test_chunks_of_schema_1_read_aux_and_mode_as_zero():
    from renacerd.columns import SYSCALL_COLUMNS, decode, encode

    old = tuple(c for c in SYSCALL_COLUMNS if c[0] not in ("aux", "mode"))
    cols = {name: np.arange(5).astype(dt) for name, dt in old}
    got = decode(encode(cols, old))
    assert got["aux"].tolist() == [0] * 5 and got["mode"].tolist() == [0] * 5
    assert got["tid"].tolist() == [0, 1, 2, 3, 4]


def test_store_of_schema_1_reads_and_is_upgraded_by_a_writer(tmp_path):
    import sqlite3

    from renacerd.store.database import Store

    path = tmp_path / "old.db"
    Store(path, create=True).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    db.execute("ALTER TABLE runs DROP COLUMN truncated")
    db.execute("INSERT INTO runs (name, status) VALUES ('r', 'complete')")
    db.commit()
    db.close()
    assert Store(path).run("r").truncated == 0  # a reader leaves the file as it is
    s = Store(path, create=True)
    assert s.db.execute("SELECT value FROM meta").fetchone()[0] == "3"
    assert s.run("r").truncated == 0


def test_detail_rings_join_short_and_long_records_as_one():
    from renacerd.capture.details import DetailRings, split_argv
    from renacerd.records import SLOT_ARGV_BLOB, SLOT_PATH0, detail_dtype

    q = DetailRings(detail_dtype(8), detail_dtype(32))
    short = np.zeros(2, detail_dtype(8))
    short["tid"], short["ts"], short["slot"] = [1, 2], [10, 20], SLOT_PATH0
    short["data"], short["len"], short["pad"] = [b"/a", b"/b"], [3, 3], [0o644, 0]
    long = np.zeros(1, detail_dtype(32))
    long["tid"], long["ts"], long["slot"] = 2, 20, SLOT_ARGV_BLOB
    long["data"], long["len"], long["flags"] = b"sh\0-c\0x\0", 7, 0x10
    q.add(short, long)
    j = q.join(np.array([2, 1], np.uint32), np.array([20, 10], np.uint64))
    got = sorted(zip(j.event.tolist(), j.slot.tolist(), j.data, j.pad.tolist(),
                     j.flags.tolist()))
    assert got == [(0, SLOT_PATH0, b"/b", 0, 0), (0, SLOT_ARGV_BLOB, b"sh\0-c\0x", 0, 0x10),
                   (1, SLOT_PATH0, b"/a", 0o644, 0)]
    assert len(q) == 0
    assert split_argv(b"sh\0-c\0\0") == [b"sh", b"-c", b""]
    assert split_argv(b"cut-mid") == [b"cut-mid"] and split_argv(b"") == []


def test_joined_distinct_keys_ignore_bytes_past_the_length():
    from renacerd.capture.details import DetailRings
    from renacerd.records import SLOT_ADDR, SLOT_PATH0, SLOT_PATH1, detail_dtype

    q = DetailRings(detail_dtype(16), detail_dtype(32))
    d = np.zeros(6, detail_dtype(16))
    d["tid"], d["ts"] = 7, [1, 2, 3, 4, 5, 6]
    # the ring does not clear a record: bytes past a string's NUL are left from before
    d["data"] = [b"/x\0garbage", b"/x\0other", b"/y", b"\2\0\0\x50", b"\2\0\0\x50\0\0", b"zz"]
    d["len"] = [3, 3, 3, 4, 6, -14]
    d["slot"] = [SLOT_PATH0, SLOT_PATH0, SLOT_PATH1, SLOT_ADDR, SLOT_ADDR, SLOT_PATH0]
    q.add(d, np.zeros(0, detail_dtype(32)))
    j = q.join(np.full(6, 7, np.uint32), np.arange(1, 7, dtype=np.uint64))
    inv, keys = j.distinct()
    got = [(keys[i][0], keys[i][1], keys[i][2][: max(keys[i][1], 0)]) for i in inv]
    assert got == [(SLOT_PATH0, 3, b"/x\0"), (SLOT_PATH0, 3, b"/x\0"), (SLOT_PATH1, 3, b"/y"),
                   (SLOT_ADDR, 4, b"\2\0\0\x50"), (SLOT_ADDR, 6, b"\2\0\0\x50"),
                   (SLOT_PATH0, -14, b"")]
    assert len(keys) == 6  # few details: each its own key (the bulk path: tested below)
    assert j.raw(3) == b"\2\0\0\x50" and j.data[5] == b"zz"


def test_distinct_in_bulk_finds_each_distinct_detail_once():
    from renacerd.capture.details import DISTINCT_IN_BULK, _distinct
    from renacerd.records import SLOT_ADDR, SLOT_PATH0, detail_dtype

    n = 2 * DISTINCT_IN_BULK
    d = np.zeros(n, detail_dtype(64))
    i = np.arange(n)
    # 4 paths and 2 addresses; every other record has garbage past its length
    d["data"] = [(b"/p%d\0junk%d" % (k % 4, k) if k % 2 else b"/p%d" % (k % 4))
                 if k % 3 else b"\2\0\1\xbb\0\0" for k in range(n)]
    d["slot"] = np.where(i % 3 == 0, SLOT_ADDR, SLOT_PATH0)
    d["len"] = np.where(i % 3 == 0, 4 + (i % 2) * 2, 4)
    inv, keys = _distinct(d["slot"], d["len"], d["data"])
    assert len(keys) == 6
    for k in range(0, n, 97):
        s, ln, raw = keys[inv[k]]
        assert (s, ln) == (int(d["slot"][k]), int(d["len"][k]))
        want = b"\2\0\1\xbb" if k % 3 == 0 else b"/p%d\0" % (k % 4)
        assert raw[:ln].ljust(ln, b"\0")[:len(want)] == want
    # keys in order of first sight, as interning one by one gives them ids
    assert inv[:6].tolist() == [0, 1, 2, 3, 4, 1]
