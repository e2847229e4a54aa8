"""Columnar chunk codec: numpy columns -> one compact BLOB (delta + byte-shuffle + zlib)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

MAGIC = b"RCC1"


class ChunkError(ValueError):
    """A chunk BLOB is truncated or not in this format."""


# Syscall layer columns, in storage order. ts is stored as deltas from the previous event.
SYSCALL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "<i8"),
    ("dur", "<u8"),
    ("ret", "<i8"),
    ("a0", "<u8"),
    ("tid", "<u4"),
    ("nr", "<u2"),
    ("flags", "<u2"),
    ("s0", "<i4"),
    ("s1", "<i4"),
)
_DELTA = frozenset({"ts"})


def _shuffle(a: np.ndarray) -> bytes:
    """Byte-transpose so the high (mostly zero) bytes of every value sit together."""
    w = a.dtype.itemsize
    if w == 1:
        return a.tobytes()
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, w).T).tobytes()


def _unshuffle(b: bytes, dtype: np.dtype, n: int) -> np.ndarray:
    w = dtype.itemsize
    raw = np.frombuffer(b, dtype=np.uint8)
    if raw.size != n * w:
        raise ChunkError(f"column holds {raw.size} bytes, expected {n * w}")
    if w == 1:
        return raw.view(dtype).copy()
    return np.ascontiguousarray(raw.reshape(w, n).T).view(dtype).reshape(n)


def encode(cols: dict[str, np.ndarray], layout=SYSCALL_COLUMNS, level: int = 1) -> bytes:
    """Pack equal-length columns into one BLOB."""
    n = len(cols[layout[0][0]])
    parts = [MAGIC, struct.pack("<IH", n, len(layout))]
    for name, dt in layout:
        a = np.ascontiguousarray(cols[name], dtype=dt)
        if len(a) != n:
            raise ValueError(f"column {name} has {len(a)} values, expected {n}")
        if name in _DELTA and n:
            a = np.diff(a, prepend=np.zeros(1, dtype=a.dtype))
        z = zlib.compress(_shuffle(a), level)
        nb = name.encode()
        parts.append(struct.pack("<BI", len(nb), len(z)))
        parts.append(nb)
        parts.append(z)
    return b"".join(parts)


def decode(blob: bytes, layout=SYSCALL_COLUMNS) -> dict[str, np.ndarray]:
    """Inverse of encode; raises ChunkError on anything malformed."""
    mv = memoryview(blob)
    if bytes(mv[:4]) != MAGIC:
        raise ChunkError("not a renacerd column chunk")
    try:
        n, ncols = struct.unpack_from("<IH", mv, 4)
        off = 10
        dtypes = dict(layout)
        out: dict[str, np.ndarray] = {}
        for _ in range(ncols):
            ln, zlen = struct.unpack_from("<BI", mv, off)
            off += 5
            name = bytes(mv[off : off + ln]).decode()
            off += ln
            z = mv[off : off + zlen]
            if len(z) != zlen:
                raise ChunkError("chunk truncated")
            off += zlen
            dt = np.dtype(dtypes[name])
            a = _unshuffle(zlib.decompress(z), dt, n)
            if name in _DELTA:
                a = np.cumsum(a, dtype=a.dtype)
            out[name] = a
    except (struct.error, zlib.error, KeyError, UnicodeDecodeError) as e:
        raise ChunkError(f"corrupt column chunk: {e}") from e
    return out


def concat(chunks: list[dict[str, np.ndarray]], layout=SYSCALL_COLUMNS) -> dict[str, np.ndarray]:
    """Join decoded chunks column by column."""
    if not chunks:
        return {name: np.empty(0, dtype=dt) for name, dt in layout}
    return {name: np.concatenate([c[name] for c in chunks]) for name, _ in layout}
