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
    n = chunk_len(blob)
    out = {name: np.empty(n, dtype=dt) for name, dt in layout}
    decode_into(blob, out, 0, layout)
    return out


def chunk_len(blob: bytes) -> int:
    """Number of events in a chunk, from its header."""
    if bytes(blob[:4]) != MAGIC:
        raise ChunkError("not a renacerd column chunk")
    try:
        return struct.unpack_from("<I", blob, 4)[0]
    except struct.error as e:
        raise ChunkError(f"corrupt column chunk: {e}") from e


def decode_into(blob: bytes, out: dict[str, np.ndarray], start: int,
                layout=SYSCALL_COLUMNS) -> int:
    """Decode a chunk straight into out[name][start:start+n] (no concatenation); returns n."""
    mv = memoryview(blob)
    if bytes(mv[:4]) != MAGIC:
        raise ChunkError("not a renacerd column chunk")
    try:
        n, ncols = struct.unpack_from("<IH", mv, 4)
        off = 10
        dtypes = dict(layout)
        seen: set[str] = set()
        for _ in range(ncols):
            ln, zlen = struct.unpack_from("<BI", mv, off)
            off += 5
            name = bytes(mv[off : off + ln]).decode()
            off += ln
            z = mv[off : off + zlen]
            if len(z) != zlen:
                raise ChunkError("chunk truncated")
            off += zlen
            seen.add(name)
            dt = np.dtype(dtypes[name])
            dst = out[name][start : start + n]
            if len(dst) != n:
                raise ChunkError("chunk holds more events than its row says")
            raw = np.frombuffer(zlib.decompress(z), dtype=np.uint8)
            if raw.size != n * dt.itemsize:
                raise ChunkError(f"column {name} holds {raw.size} bytes, expected "
                                 f"{n * dt.itemsize}")
            w = dt.itemsize
            if w == 1:
                dst.view(np.uint8)[:] = raw
            else:
                dst.view(np.uint8).reshape(n, w)[:] = raw.reshape(w, n).T
            if name in _DELTA:
                np.cumsum(dst, dtype=dst.dtype, out=dst)
    except (struct.error, zlib.error, KeyError, UnicodeDecodeError) as e:
        raise ChunkError(f"corrupt column chunk: {e}") from e
    missing = set(dtypes) - seen
    if missing:
        raise ChunkError(f"chunk lacks columns {sorted(missing)}")
    return n
