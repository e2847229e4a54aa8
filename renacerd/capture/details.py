"""Detail records (paths, addresses, argv) waiting for their events, joined in bulk."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from renacerd.records import SLOT_ADDR, SLOT_ARGV_BLOB

# Slots whose data is bytes of a known length, not a NUL-terminated string.
BINARY_SLOTS = (SLOT_ADDR, SLOT_ARGV_BLOB)


def detail_bytes(slot: int, n: int, raw: bytes) -> bytes:
    """The payload of one detail: a string without its NUL, or `n` raw bytes."""
    if n <= 0:
        return b""
    if slot in BINARY_SLOTS:
        return raw[:n].ljust(n, b"\0")  # numpy's S field drops trailing NULs
    return raw[: n - 1]


class DetailQueue:
    """Details keyed by their event's (tid, enter ts); an event drained now finds its
    details here, since the probe submits them before the event record."""

    __slots__ = ("recs",)

    def __init__(self, dtype: np.dtype) -> None:
        self.recs = np.empty(0, dtype=dtype)

    def __len__(self) -> int:
        return len(self.recs)

    def add(self, de: np.ndarray) -> None:
        """Queue a drained batch."""
        self.recs = np.concatenate((self.recs, de)) if len(self.recs) else de

    def clear(self) -> None:
        """Forget everything queued (details whose events were lost)."""
        self.recs = self.recs[:0]

    def pop(self, tid: int, ts: int) -> list[tuple[int, int, bytes]]:
        """(slot, nr, data) of one event's details, removed from the queue."""
        r = self.recs
        if not len(r):
            return []
        hit = (r["ts"] == ts) & (r["tid"] == tid)
        if not hit.any():
            return []
        sel = r[hit]
        self.recs = r[~hit]
        return [
            (s, nr, detail_bytes(s, n, raw))
            for s, nr, n, raw in zip(sel["slot"].tolist(), sel["nr"].tolist(),
                                     sel["len"].tolist(), sel["data"].tolist())
        ]

    def join(self, tid: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Match events (tid, ts) to queued details: (event index, detail record) pairs,
        the details removed from the queue. A thread has one syscall per enter ts, so a
        key names one event."""
        r = self.recs
        ne = len(tid)
        if not ne or not len(r):
            return np.empty(0, np.intp), r[:0]
        ktid = np.concatenate((tid, r["tid"]))
        kts = np.concatenate((ts, r["ts"]))
        # events sort before their details: a detail's group head is its event, if any
        src = np.concatenate((np.zeros(ne, np.uint8), np.ones(len(r), np.uint8)))
        order = np.lexsort((src, kts, ktid))
        st, ss = ktid[order], kts[order]
        new = np.empty(len(order), bool)
        new[0] = True
        new[1:] = (st[1:] != st[:-1]) | (ss[1:] != ss[:-1])
        head = order[np.maximum.accumulate(np.where(new, np.arange(len(order)), 0))]
        hit = (order >= ne) & (head < ne)
        di = order[hit] - ne
        taken = np.zeros(len(r), bool)
        taken[di] = True
        out = r[di]
        self.recs = r[~taken]
        return head[hit], out



@dataclass(slots=True)
class Joined:
    """Details matched to events (from both rings): parallel per-detail columns."""

    event: np.ndarray  # index of the owning event
    slot: np.ndarray
    length: np.ndarray
    flags: np.ndarray
    pad: np.ndarray
    data: list[bytes]  # the raw S field (trailing NULs dropped by numpy)

    def __len__(self) -> int:
        return len(self.event)


class DetailRings:
    """The short and the long detail queues (strings that fill the short record are read
    again into the long ring), joined to events as one."""

    __slots__ = ("short", "long")

    def __init__(self, short: np.dtype, long: np.dtype) -> None:
        self.short = DetailQueue(short)
        self.long = DetailQueue(long)

    def __len__(self) -> int:
        return len(self.short) + len(self.long)

    def add(self, short: np.ndarray, long: np.ndarray) -> None:
        """Queue a drained batch of each ring."""
        if len(short):
            self.short.add(short)
        if len(long):
            self.long.add(long)

    def clear(self) -> None:
        """Forget everything queued."""
        self.short.clear()
        self.long.clear()

    def pop(self, tid: int, ts: int) -> list[tuple[int, int, bytes]]:
        """(slot, nr, data) of one event's details from both rings, removed."""
        out = self.short.pop(tid, ts)
        if len(self.long):
            out += self.long.pop(tid, ts)
        return out

    def join(self, tid: np.ndarray, ts: np.ndarray) -> Joined:
        """Every queued detail of events (tid, ts), removed from the queues."""
        ei, d = self.short.join(tid, ts)
        if len(self.long):
            li, dl = self.long.join(tid, ts)
            if len(li):  # long records waiting for later events cost this drain nothing
                return Joined(
                    np.concatenate([ei, li]),
                    *(np.concatenate([d[f], dl[f]]) for f in ("slot", "len", "flags", "pad")),
                    d["data"].tolist() + dl["data"].tolist(),
                )
        return Joined(ei, d["slot"], d["len"], d["flags"], d["pad"], d["data"].tolist())


def split_argv(blob: bytes) -> list[bytes]:
    """argv from its NUL-separated blob (a cut blob's last string has no NUL)."""
    if not blob:
        return []
    if blob.endswith(b"\0"):
        blob = blob[:-1]
    return blob.split(b"\0")
