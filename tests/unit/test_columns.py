"""The chunk codec: exact round trips at every integer width, old zlib chunks, corruption."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from renacerd.columns import MAGIC, SYSCALL_COLUMNS, ChunkError, _shuffle, decode, encode


def _cols(n: int) -> dict[str, np.ndarray]:
    i = np.arange(n)
    return {
        "ts": (10**15 + np.cumsum(np.where(i % 7 == 0, 5_000_000_000, 230))).astype(np.int64),
        "dur": np.where(i % 3 == 0, 2**40, 90).astype(np.uint64),
        "ret": np.where(i % 2 == 0, -11, 4096).astype(np.int64),
        "a0": np.where(i % 5 == 0, 0x7FFF_DEAD_BEEF, 3).astype(np.uint64),
        "tid": np.full(n, 4242, np.uint32),
        "nr": (i % 450).astype(np.uint16),
        "flags": (i % 3).astype(np.uint16),
        "s0": np.where(i % 4 == 0, -1, i).astype(np.int32),
        "s1": np.full(n, -1, np.int32),
        "aux": np.where(i % 6 == 0, 0o1101, 0).astype(np.uint32),
        "mode": np.where(i % 6 == 0, 0o644, 0).astype(np.uint32),
    }


@pytest.mark.parametrize("n", [0, 1, 2, 1000])
def test_round_trip_exact(n: int) -> None:
    cols = _cols(n)
    blob = encode(cols)
    assert blob[:4] == MAGIC
    out = decode(blob)
    for name, dt in SYSCALL_COLUMNS:
        assert out[name].dtype == np.dtype(dt)
        assert out[name].tolist() == cols[name].tolist(), name


def test_narrow_columns_widen_back_with_sign() -> None:
    cols = _cols(64)
    cols["ret"] = np.array([-1, -2, 127, -128] * 16, dtype=np.int64)  # fits one signed byte
    cols["dur"] = np.array([255, 0] * 32, dtype=np.uint64)  # fits one unsigned byte
    out = decode(encode(cols))
    assert out["ret"][:4].tolist() == [-1, -2, 127, -128]
    assert out["dur"][:2].tolist() == [255, 0]


def _encode_v1(cols: dict[str, np.ndarray]) -> bytes:
    """The first format (RCC1: full-width columns, zlib), as earlier daemons wrote it."""
    n = len(cols["ts"])
    parts = [b"RCC1", struct.pack("<IH", n, len(SYSCALL_COLUMNS))]
    for name, dt in SYSCALL_COLUMNS:
        a = np.ascontiguousarray(cols[name], dtype=dt)
        if name == "ts":
            a = np.diff(a, prepend=np.zeros(1, dtype=a.dtype))
        z = zlib.compress(_shuffle(a), 1)
        parts += [struct.pack("<BI", len(name), len(z)), name.encode(), z]
    return b"".join(parts)


def test_old_zlib_chunks_still_read() -> None:
    cols = _cols(300)
    out = decode(_encode_v1(cols))
    for name, _ in SYSCALL_COLUMNS:
        assert out[name].tolist() == cols[name].tolist(), name


@pytest.mark.parametrize("cut", [3, 9, 20, -5])
def test_truncated_or_foreign_blob_is_chunk_error(cut: int) -> None:
    blob = encode(_cols(100))
    with pytest.raises(ChunkError):
        decode(blob[:cut])
    with pytest.raises(ChunkError):
        decode(b"XXXX" + blob[4:])


def test_corrupt_payload_is_chunk_error() -> None:
    blob = bytearray(encode(_cols(100)))
    blob[30:60] = b"\xff" * 30
    with pytest.raises(ChunkError):
        decode(bytes(blob))
