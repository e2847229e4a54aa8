"""The compiled hot path (renacerd/_hot.c) stores exactly what its numpy reference stores."""

from __future__ import annotations

import numpy as np
import pytest

from bench.daemon_replay import replay_once, store_digest
from renacerd.capture import assembly
from renacerd.columns import SYSCALL_COLUMNS, EventRows, decode, encode, encode_rows
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
