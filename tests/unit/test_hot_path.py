"""The compiled hot path (renacerd/_hot.c) stores exactly what its numpy reference stores."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bench.daemon_replay import replay_once, store_digest
from renacerd.capture import assembly
from renacerd.columns import (
    SYSCALL_COLUMNS,
    EventRows,
    decode,
    encode,
    encode_rows,
    row_buffer,
)
from renacerd.records import EV_FORK, EVENT, F_DETAIL, LONG_LEN, detail_dtype

# pids no machine runs (above the default pid_max): the tracer snapshots nothing
P1, P2, P3 = 4_190_001, 4_190_002, 4_190_003


def _events(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    """(pid, tid, enter ts, nr) -> event records (dur, ret, a0 and aux from the ts)."""
    ev = np.zeros(len(rows), EVENT)
    for i, (pid, tid, ts, nr) in enumerate(rows):
        ev[i] = (ts, 1000 + ts % 7 * 10**9, ts % 5 - 2, ts * 3, pid, tid, nr, 0, ts % 3)
    return ev


def _recording(drains: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Drains of (events, short details) as bench/daemon_replay.py records them."""
    dl = np.zeros(0, detail_dtype(LONG_LEN))
    rec = {"t": np.arange(1, len(drains) + 1, dtype=np.int64) * 300_000_000}
    for name, parts in (("ev", [e for e, _ in drains]), ("de", [d for _, d in drains]),
                        ("dl", [dl for _ in drains])):
        rec[name] = np.concatenate(parts)
        rec[name + "_n"] = np.array([len(p) for p in parts], np.int64)
    return rec


def _paths(ev: np.ndarray, every: int) -> np.ndarray:
    """A path detail for every `every`-th event (flagged), naming one of 5 files."""
    sel = np.arange(0, len(ev), every)
    ev["flags"][sel] |= F_DETAIL
    de = np.zeros(len(sel), detail_dtype())
    de["ts"], de["tid"], de["nr"] = ev["ts"][sel], ev["tid"][sel], 257
    names = [f"/data/shard-{i % 5}.bin".encode() for i in sel]
    de["data"] = names
    de["len"] = [len(s) + 1 for s in names]
    return de


def _digests(rec: dict[str, np.ndarray], tmp_path, monkeypatch) -> tuple[str, str]:
    out = []
    for name, path in (("numpy", None), ("compiled", assembly._compiled)):
        monkeypatch.setattr(assembly, "hot", path)
        db = tmp_path / f"{name}.db"
        replay_once(rec, db, None, 0.0)
        out.append(store_digest(db))
    return out[0], out[1]


def test_the_extension_is_built():
    assert assembly._compiled is not None, "renacerd/_hot.c is not built: pip install -e ."


def test_one_event(tmp_path, monkeypatch):
    rec = _recording([(_events([(P1, P1, 10**9, 0)]), np.zeros(0, detail_dtype()))])
    a, b = _digests(rec, tmp_path, monkeypatch)
    assert a == b


def test_interleaved_processes_calls_crossing_drains_and_pid_reuse(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    drains = []
    ts = 10**9
    for d in range(6):
        rows = []
        for _ in range(3000 + 500 * d):
            ts += int(rng.integers(1, 2000))
            pid = (P1, P2, P3)[int(rng.integers(0, 3))]
            rows.append((pid, pid + int(rng.integers(0, 3)), ts, int(rng.integers(0, 300))))
        # calls entered long before (a blocking read crossing drains) arrive late
        rows += [(P2, P2 + 1, ts - 10**8 * k, 0) for k in range(1, 4)]
        if d == 3:  # P3's pid reused: a fork record of P1 naming it as the child
            rows.append((P1, P1, ts + 1, EV_FORK))
        ev = _events(rows)
        if d == 3:
            ev["a0"][-1] = P3
        drains.append((ev, _paths(ev, 7)))
    rec = _recording(drains)
    a, b = _digests(rec, tmp_path, monkeypatch)
    assert a == b
    import sqlite3

    con = sqlite3.connect(tmp_path / "compiled.db")
    assert con.execute("SELECT sum(n), count(DISTINCT proc_id) FROM chunks").fetchone() == (
        len(rec["ev"]) - 1, 4)  # the fork record is no event; P3 before and after reuse
    con.close()


def test_hundreds_of_processes_in_one_drain(tmp_path, monkeypatch):
    rows = [(4_190_100 + (i * 37) % 300, 4_190_100, 10**9 + i, 0) for i in range(3000)]
    rec = _recording([(_events(rows), np.zeros(0, detail_dtype()))])
    a, b = _digests(rec, tmp_path, monkeypatch)
    assert a == b


def test_a_chunk_filled_inside_a_drain(tmp_path, monkeypatch):
    rows = [(P1 if i % 3 else P2, P1, 10**9 + i * 10, 1) for i in range(assembly.CHUNK_EVENTS
                                                                        + 100)]
    rec = _recording([(_events(rows), np.zeros(0, detail_dtype()))])
    a, b = _digests(rec, tmp_path, monkeypatch)
    assert a == b


def test_an_encoded_chunks_row_buffer_is_reused_empty_with_its_allocation():
    ev = _events([(P1, P1, 10**9 + i * 10, 1) for i in range(5000)])
    z16, z32 = np.zeros(len(ev), np.uint16), np.zeros(len(ev), np.int32)
    buf, blobs = row_buffer(), []
    for _ in range(2):
        assembly.hot.scatter(ev, z16, z32, z32, z32.view(np.uint32), [P1], [buf], [0])
        assert len(buf) == 5000 * assembly.hot.ROW_SIZE
        size = sys.getsizeof(buf)  # a bytearray's size counts its allocation
        blobs.append(encode_rows(EventRows(buf))[0])
        spare = row_buffer()
        # the same object, empty, its pages kept for the next chunk
        assert spare is buf and len(spare) == 0 and sys.getsizeof(spare) == size
    assert blobs[0] == blobs[1] and decode(blobs[0])["ts"].tolist() == ev["ts"].tolist()


@pytest.mark.parametrize("n", [1, 2, 3000])
def test_encode_rows_is_encode_at_every_narrowing_boundary(n):
    rng = np.random.default_rng(n)
    cols = {}
    for name, dt in SYSCALL_COLUMNS:
        info = np.iinfo(dt)
        edges = [0, 1, 127, 128, 255, 256, 32767, 32768, 65535, 65536, 2**31 - 1, 2**31,
                 2**32 - 1, 2**32, int(info.max)]
        edge = min(edges[int(rng.integers(len(edges)))], int(info.max))
        cols[name] = rng.integers(0, int(edge), n, dtype=np.uint64, endpoint=True).astype(dt)
        if info.min < 0:
            cols[name][::2] = -cols[name][::2]
    cols["ts"] = np.sort(cols["ts"]) if n < 3 else cols["ts"]  # out of order when longer
    rows = np.zeros(n, np.dtype(list(SYSCALL_COLUMNS)))  # row_t: the columns in this order
    for name, _ in SYSCALL_COLUMNS:
        rows[name] = cols[name]
    order = np.argsort(cols["ts"], kind="stable")
    ref = encode({k: v.take(order) for k, v in cols.items()})
    blob, count, first, last = encode_rows(EventRows(bytearray(rows.tobytes())))
    assert blob == ref and count == n
    assert (first, last) == (int(cols["ts"][order[0]]), int(cols["ts"][order[-1]]))
    assert decode(blob)["ts"].tolist() == cols["ts"][order].tolist()


def _detail(dt: np.dtype, tid: int, ts: int, slot: int, data: bytes, n: int | None = None,
            nr: int = 257) -> np.ndarray:
    d = np.zeros(1, dt)
    d["tid"], d["ts"], d["nr"], d["slot"], d["data"] = tid, ts, nr, slot, data
    d["len"] = len(data) + 1 if n is None else n
    return d


def _drains_with_every_kind_of_detail() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Drains of (events, short details, long details): paths repeated within and across
    drains, events with no detail, details waiting for the next drain's event, garbage
    past a string's NUL, socket addresses, execve argv and paths of the long ring."""
    from renacerd.records import SLOT_ADDR, SLOT_ARGV_BLOB, SLOT_PATH0, SLOT_PATH1

    sd, ld = detail_dtype(), detail_dtype(LONG_LEN)
    long_path = b"/deep" + b"/d" * 300
    drains, ts, late = [], 10**9, []
    for d in range(4):
        rows, de, dl = [], list(late), []
        late = []
        for i in range(400):
            ts += 1000
            tid = P1 + i % 3
            rows.append((P1, tid, ts, (257, 42, 59, 0, 82)[i % 5]))
            kind = i % 5
            if kind == 0:  # openat: a path seen in every drain, or a new one
                name = b"/data/shard-%d.bin" % (i % 4 if i % 2 else d * 1000 + i)
                de.append(_detail(sd, tid, ts, SLOT_PATH0, name + b"\0junk"[: i % 6],
                                  len(name) + 1))
            elif kind == 1:  # connect: a few addresses, some with NULs at the end
                addr = b"\2\0\x1f\x90\x7f\0\0\1" + b"\0" * (i % 3 * 4)
                de.append(_detail(sd, tid, ts, SLOT_ADDR, addr, nr=42))
            elif kind == 2:  # execve (failed): its path and argv
                de.append(_detail(sd, tid, ts, SLOT_PATH0, b"/bin/sh", nr=59))
                de.append(_detail(sd, tid, ts, SLOT_ARGV_BLOB, b"sh\0-c\0x%d\0" % (i % 7),
                                  nr=59))
            elif kind == 4:  # rename: two paths, the second one of the long ring
                de.append(_detail(sd, tid, ts, SLOT_PATH0, b"/tmp/a%d" % (i % 9), nr=82))
                dl.append(_detail(ld, tid, ts, SLOT_PATH1, long_path + b"%d" % (i % 3),
                                  nr=82))
            if i % 50 == 7 and kind in (0, 1):  # flagged, but its detail is lost
                de.pop()
        ev = _events(rows)
        ev["flags"][ev["nr"] != 0] |= F_DETAIL
        ev["ret"][ev["nr"] == 59] = -2
        late = [_detail(sd, P1, ts + 500, SLOT_PATH0, b"/next/drain")]  # its event: next
        rows2 = [(P1, P1, ts + 500, 257)] if d else []
        if rows2:
            e2 = _events(rows2)
            e2["flags"] |= F_DETAIL
            ev = np.concatenate([ev, e2])
        drains.append((ev, np.concatenate(de), np.concatenate(dl)))
    return drains


def test_compiled_join_is_the_numpy_join():
    from renacerd.capture.details import DetailRings
    from renacerd.capture.tracer import StringTable, Tracer

    class Ids:  # the tracer's interning, alone
        _addr_id, _detail_ids = Tracer._addr_id, Tracer._detail_ids
        _new_detail_string = Tracer._new_detail_string

        def __init__(self):
            self.strings, self._addr_ids = StringTable(), {}

    sd, ld = detail_dtype(), detail_dtype(LONG_LEN)
    ref, new = (DetailRings(sd, ld), Ids()), (DetailRings(sd, ld), Ids())
    cache = assembly._compiled.StringCache(new[1]._new_detail_string)
    for ev, de, dl in _drains_with_every_kind_of_detail():
        has = np.flatnonzero(ev["flags"] & F_DETAIL)
        tid, ts = ev["tid"][has], ev["ts"][has]
        got = []
        for (rings, ids), c in ((ref, None), (new, cache)):
            rings.add(de, dl)
            j = rings.join(tid, ts, c)
            got.append((j, ids._detail_ids(j) if c is None else j.ids, rings))
        (a, ida, ra), (b, idb, rb) = got
        assert b.ids is not None and a.ids is None
        for f in ("event", "slot", "length", "flags", "pad"):
            assert getattr(a, f).tolist() == getattr(b, f).tolist(), f
        assert ida.tolist() == idb.tolist()
        assert a.data == b.data and [a.raw(k) for k in range(len(a))] == [
            b.raw(k) for k in range(len(b))]
        assert ra.short.recs.tobytes() == rb.short.recs.tobytes()
        assert ra.long.recs.tobytes() == rb.long.recs.tobytes()
    assert ref[1].strings.by_id == new[1].strings.by_id and len(ref[1].strings.by_id) > 20


def test_compiled_join_stores_what_the_numpy_join_stores(tmp_path, monkeypatch):
    drains = _drains_with_every_kind_of_detail()
    rec = _recording([(ev, de) for ev, de, _ in drains])
    rec["dl"] = np.concatenate([dl for *_, dl in drains])
    rec["dl_n"] = np.array([len(dl) for *_, dl in drains], np.int64)
    a, b = _digests(rec, tmp_path, monkeypatch)
    assert a == b
