"""Columnar chunk codec: numpy columns -> one compact BLOB (delta, narrow, byte-shuffle, zstd)."""

from __future__ import annotations

import struct
import threading
import zlib
from collections import deque

import numpy as np
import zstandard

try:
    from renacerd import _hot
except ImportError:  # not built (no compiler or Python headers): the numpy path
    _hot = None

MAGIC = b"RCC2"
MAGIC_V1 = b"RCC1"  # zlib, full-width columns: still read


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
    ("aux", "<u4"),  # open/openat/openat2/creat: the open flags (creat: O_CREAT|O_WRONLY|O_TRUNC)
    ("mode", "<u4"),  # the same calls: mode, and openat2's RESOLVE_* flags << 16
)
# Columns added after the first stores: a chunk written before them reads them as 0.
OPTIONAL_COLUMNS = frozenset({"aux", "mode"})
_DELTA = frozenset({"ts"})
_SIGNED = tuple(np.dtype(t) for t in ("<i1", "<i2", "<i4", "<i8"))
_UNSIGNED = tuple(np.dtype(t) for t in ("<u1", "<u2", "<u4", "<u8"))
_CODES = {dt.str: i for i, dt in enumerate(_SIGNED + _UNSIGNED)}
_BY_CODE = _SIGNED + _UNSIGNED
_local = threading.local()


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    """One (de)compressor pair per thread: zstandard's objects are not thread-safe."""
    pair = getattr(_local, "pair", None)
    if pair is None:
        pair = _local.pair = (zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor())
    return pair


def _narrow(a: np.ndarray) -> np.ndarray:
    """The same values in the narrowest integer type of the same signedness that holds them."""
    # 8-byte columns only: two passes over a narrow column cost more than they save
    if a.dtype.kind not in "iu" or not len(a) or a.dtype.itemsize < 8:
        return a
    lo, hi = int(a.min()), int(a.max())
    for dt in _SIGNED if a.dtype.kind == "i" else _UNSIGNED:
        if dt.itemsize >= a.dtype.itemsize:
            return a
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return a.astype(dt)
    return a


def _shuffle(a: np.ndarray) -> np.ndarray:
    """Byte-transpose so the high (mostly zero) bytes of every value sit together (a
    contiguous array: zstd reads its buffer, no copy to bytes)."""
    w = a.dtype.itemsize
    if w == 1:
        return a
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, w).T)


class EventRows:
    """A process's buffered syscall events as the compiled path keeps them: rows of
    renacerd/_hot.c's row_t (the chunk's columns, in arrival order), encoded by
    encode_rows to the bytes encode gives the same events as columns."""

    __slots__ = ("data",)

    def __init__(self, data: bytearray | bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data) // _hot.ROW_SIZE


# Encoded chunks' row buffers, emptied for the next chunks (deque: the writer thread gives,
# the capture thread takes). A fresh buffer faults in its pages as it fills, which cost
# as much as the grouping itself; four cover the processes that fill chunks at once.
_spare_rows: deque[bytearray] = deque(maxlen=4)


def row_buffer() -> bytearray:
    """An empty row buffer for a process's next chunk: a spare one when there is."""
    try:
        return _spare_rows.pop()
    except IndexError:
        return bytearray()


def encode_rows(rows: EventRows) -> tuple[bytes, int, int, int]:
    """(BLOB, events, first ts, last ts) of syscall rows: sorted by enter ts (stable), then
    what encode does, the column work in one compiled pass."""
    out = getattr(_local, "prepared", None)
    if out is None:
        # kept per thread and reused: fresh pages for every chunk cost more than the work
        out = _local.prepared = bytearray()
    n, first, last, prepared = _hot.prepare(rows.data, out)
    if isinstance(rows.data, bytearray):
        _hot.reset(rows.data)  # the rows are in `out` now
        _spare_rows.append(rows.data)
        rows.data = b""
    comp = _zstd()[0]
    parts = [MAGIC, struct.pack("<IH", n, len(SYSCALL_COLUMNS))]
    with memoryview(out) as mv:
        for (name, _), (code, at, size) in zip(SYSCALL_COLUMNS, prepared):
            _pack(parts, name, code, comp.compress(mv[at : at + size]))
    return b"".join(parts), n, first, last


def _pack(parts: list[bytes], name: str, code: int, z: bytes) -> None:
    nb = name.encode()
    parts.append(struct.pack("<BBI", len(nb), code, len(z)))
    parts.append(nb)
    parts.append(z)


def encode(cols: dict[str, np.ndarray], layout=SYSCALL_COLUMNS) -> bytes:
    """Pack equal-length columns into one BLOB."""
    n = len(cols[layout[0][0]])
    comp = _zstd()[0]
    parts = [MAGIC, struct.pack("<IH", n, len(layout))]
    for name, dt in layout:
        if name not in cols and name in OPTIONAL_COLUMNS:
            a = np.zeros(n, dtype=dt)  # columns built by code older than them
        else:
            a = np.ascontiguousarray(cols[name], dtype=dt)
        if len(a) != n:
            raise ValueError(f"column {name} has {len(a)} values, expected {n}")
        if name in _DELTA and n:
            a = np.diff(a, prepend=np.zeros(1, dtype=a.dtype))
        a = _narrow(a)
        _pack(parts, name, _CODES[a.dtype.str], comp.compress(_shuffle(a)))
    return b"".join(parts)


def decode(blob: bytes, layout=SYSCALL_COLUMNS) -> dict[str, np.ndarray]:
    """Inverse of encode; raises ChunkError on anything malformed."""
    n = chunk_len(blob)
    out = {name: np.empty(n, dtype=dt) for name, dt in layout}
    decode_into(blob, out, 0, layout)
    return out


def chunk_len(blob: bytes) -> int:
    """Number of events in a chunk, from its header."""
    if bytes(blob[:4]) not in (MAGIC, MAGIC_V1):
        raise ChunkError("not a renacerd column chunk")
    try:
        return struct.unpack_from("<I", blob, 4)[0]
    except struct.error as e:
        raise ChunkError(f"corrupt column chunk: {e}") from e


def _unshuffle(raw: np.ndarray, dst: np.ndarray, n: int, w: int) -> None:
    """Inverse of _shuffle: w byte planes of n bytes each back into dst's n values."""
    if w == 1:
        dst.view(np.uint8)[:] = raw
        return
    planes = raw.reshape(w, n)
    if w == 8:  # the strided copy costs what eight shift-and-or passes do
        dst.view(np.uint8).reshape(n, w)[:] = planes.T
        return
    # narrow values: a few whole-array passes beat the strided byte transpose (~10x at w=2)
    u = dst.view(f"<u{w}")
    u[:] = planes[w - 1]
    for j in range(w - 2, -1, -1):
        u <<= 8
        u |= planes[j]


def decode_into(blob: bytes, out: dict[str, np.ndarray], start: int,
                layout=SYSCALL_COLUMNS, subset: bool = False) -> int:
    """Decode a chunk straight into out[name][start:start+n] (no concatenation); returns n.
    `subset`: `layout` names only the columns wanted, the chunk's others are skipped
    undecompressed."""
    mv = memoryview(blob)
    magic = bytes(mv[:4])
    if magic not in (MAGIC, MAGIC_V1):
        raise ChunkError("not a renacerd column chunk")
    v1 = magic == MAGIC_V1
    dec = _zstd()[1]
    try:
        n, ncols = struct.unpack_from("<IH", mv, 4)
        off = 10
        dtypes = dict(layout)
        seen: set[str] = set()
        for _ in range(ncols):
            if v1:
                ln, zlen = struct.unpack_from("<BI", mv, off)
                off += 5
            else:
                ln, code, zlen = struct.unpack_from("<BBI", mv, off)
                off += 6
            name = bytes(mv[off : off + ln]).decode()
            off += ln
            z = mv[off : off + zlen]
            if len(z) != zlen:
                raise ChunkError("chunk truncated")
            off += zlen
            if subset and name not in dtypes:
                continue
            seen.add(name)
            dt = np.dtype(dtypes[name])
            sdt = dt if v1 else _BY_CODE[code]
            dst = out[name][start : start + n]
            if len(dst) != n:
                raise ChunkError("chunk holds more events than its row says")
            w = sdt.itemsize
            if v1:
                raw = np.frombuffer(zlib.decompress(z), dtype=np.uint8)
            else:
                raw = np.frombuffer(dec.decompress(z, max_output_size=n * w), dtype=np.uint8)
            if raw.size != n * w:
                raise ChunkError(f"column {name} holds {raw.size} bytes, expected {n * w}")
            tmp = dst if sdt == dt else np.empty(n, dtype=sdt)
            _unshuffle(raw, tmp, n, w)
            if tmp is not dst:
                dst[:] = tmp
            if name in _DELTA:
                np.cumsum(dst, dtype=dst.dtype, out=dst)
    except (struct.error, zlib.error, zstandard.ZstdError, KeyError, IndexError,
            UnicodeDecodeError) as e:
        raise ChunkError(f"corrupt column chunk: {e}") from e
    missing = set(dtypes) - seen
    for name in missing & OPTIONAL_COLUMNS:
        out[name][start : start + n] = 0
    missing -= OPTIONAL_COLUMNS
    if missing:
        raise ChunkError(f"chunk lacks columns {sorted(missing)}")
    return n
