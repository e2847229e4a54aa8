"""Detail records (paths, addresses, argv) waiting for their events, joined in bulk."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from renacerd.columns import _hot
from renacerd.records import SLOT_ADDR, SLOT_ARGV_BLOB, take

# Slots whose data is bytes of a known length, not a NUL-terminated string.
BINARY_SLOTS = (SLOT_ADDR, SLOT_ARGV_BLOB)


def detail_bytes(slot: int, n: int, raw: bytes) -> bytes:
    """The payload of one detail: a string without its NUL, or `n` raw bytes."""
    if n <= 0:
        return b""
    if slot in BINARY_SLOTS:
        return raw[:n].ljust(n, b"\0")  # numpy's S field drops trailing NULs
    return raw[: n - 1]


# the compiled join's per-detail columns: event, index in the queue, string id, slot, len,
# flags, pad
_JOINED_TYPES = (np.intp, np.intp, np.int32, np.uint8, np.int32, np.uint8, np.uint32)


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
        out = take(r, di)
        self.recs = take(r, np.flatnonzero(~taken)) if len(di) < len(r) else r[:0]
        return head[hit], out

    def join_compiled(self, tid: np.ndarray, ts: np.ndarray,
                      cache: object) -> tuple[np.ndarray, ...]:
        """join() by renacerd/_hot.c, in the same order: (event index, index in `recs`,
        string id (through `cache`, a _hot.StringCache), slot, len, flags, pad of each
        matched detail, then recs), the details removed from the queue; the records are
        not copied."""
        r = np.ascontiguousarray(self.recs)
        if not len(tid) or not len(r):
            return (*(np.empty(0, t) for t in _JOINED_TYPES), r)
        out = _hot.join(tid, ts, r, cache)
        left = np.frombuffer(out[3], np.intp)
        if len(left) < len(r):
            self.recs = take(r, left) if len(left) else r[:0]
        return (*(np.frombuffer(b, t) for b, t in zip(out[:3] + out[4:], _JOINED_TYPES)), r)


# Odd 64-bit multipliers of the words of a detail's bytes: its hash for finding distinct
# details in bulk (equal hashes are then checked byte for byte, so a collision costs time,
# never a wrong string).
_MIX = np.random.default_rng(0x5EED).integers(1, 2**63, 4096 // 8, dtype=np.uint64) | 1
_ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
# Below this many details in a drain, finding the distinct ones costs more than it saves
# (bench/daemon_replay.py: ~100 details a drain of the PyTorch loop, ~3,700 of the mix)
DISTINCT_IN_BULK = 1024


def _distinct(slot: np.ndarray, length: np.ndarray,
              data: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, bytes]]]:
    """The distinct (slot, length, first `length` bytes) of details, and each detail's
    index among them (keys may repeat below DISTINCT_IN_BULK details): a drain's details
    name a few files again and again, and making a Python bytes object of every 256-byte
    field costs more than all the rest of the join."""
    n = len(data)
    if n < DISTINCT_IN_BULK:
        # too few for numpy's per-call costs to pay: every detail its own key
        return np.arange(n), list(zip(slot.tolist(), length.tolist(), data.tolist()))
    width = data.dtype.itemsize
    lens = np.clip(length, 0, width).astype(np.int64)
    nw = max(1, (int(lens.max(initial=0)) + 7) // 8)
    rows = np.ascontiguousarray(data).view(np.uint8).reshape(n, width)
    if width % 8 or nw * 8 > width:
        return _distinct_exact(slot, length, data)
    words = rows[:, : nw * 8].copy().view("<u8")  # bytes past the length: the ring's garbage
    valid = np.clip(lens[:, None] - 8 * np.arange(nw), 0, 8).astype(np.uint64)
    words &= np.where(valid == 8, _ALL, (np.uint64(1) << (valid * np.uint64(8))) - np.uint64(1))
    h = (words * _MIX[:nw]).sum(axis=1, dtype=np.uint64)
    h ^= length.astype(np.uint64) * np.uint64(0x9E37_79B9_7F4A_7C15) ^ slot.astype(np.uint64)
    _, first, inv = np.unique(h, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    back = first[inv]
    if not ((words == words[back]).all() and (length == length[back]).all()
            and (slot == slot[back]).all()):
        return _distinct_exact(slot, length, data)  # a hash collision: rare, still exact
    # in order of first sight, as one by one: strings get the ids they always got
    by_sight = np.argsort(first)
    rank = np.empty_like(by_sight)
    rank[by_sight] = np.arange(len(by_sight))
    first = first[by_sight]
    return rank[inv], list(zip(slot[first].tolist(), length[first].tolist(),
                               data[first].tolist()))


def _distinct_exact(slot: np.ndarray, length: np.ndarray,
                    data: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, bytes]]]:
    """_distinct by a dict over every detail's bytes."""
    seen: dict[tuple[int, int, bytes], int] = {}
    keys: list[tuple[int, int, bytes]] = []
    inv = np.empty(len(data), np.intp)
    for k, (s, n, raw) in enumerate(zip(slot.tolist(), length.tolist(), data.tolist())):
        key = (s, n, raw[: max(n, 0)].ljust(max(n, 0), b"\0"))  # numpy drops trailing NULs
        i = seen.get(key)
        if i is None:
            i = seen[key] = len(keys)
            keys.append((s, n, raw))
        inv[k] = i
    return inv, keys


@dataclass(slots=True)
class Joined:
    """Details matched to events (from both rings): parallel per-detail columns."""

    event: np.ndarray  # index of the owning event
    slot: np.ndarray
    length: np.ndarray
    flags: np.ndarray
    pad: np.ndarray
    texts: tuple[np.ndarray, ...]  # the S fields, short ring's then long ring's, in order
    # the compiled join's: where each part's details are in its texts (the ring's records,
    # not copied), and every detail's string id (-1: none); None from the numpy join
    at: tuple[np.ndarray, ...] | None = None
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.event)

    def _texts(self) -> list[np.ndarray]:
        if self.at is None:
            return list(self.texts)
        return [t[i] for t, i in zip(self.texts, self.at)]

    @property
    def data(self) -> list[bytes]:
        """Every detail's raw S field (trailing NULs dropped by numpy)."""
        return [b for t in self._texts() for b in t.tolist()]

    def raw(self, k: int) -> bytes:
        """Detail k's raw S field."""
        for p, t in enumerate(self.texts):
            n = len(t) if self.at is None else len(self.at[p])
            if k < n:
                return t[k if self.at is None else self.at[p][k]].tolist()
            k -= n
        raise IndexError(k)

    def distinct(self) -> tuple[np.ndarray, list[tuple[int, int, bytes]]]:
        """(index into the keys of each detail, distinct (slot, length, raw) keys); two
        keys may be equal across the rings' parts (then they name the same string)."""
        invs, keys, at = [], [], 0
        for t in self._texts():
            if not len(t):
                continue
            inv, k = _distinct(self.slot[at : at + len(t)], self.length[at : at + len(t)], t)
            invs.append(inv + len(keys))
            keys += k
            at += len(t)
        return (np.concatenate(invs) if invs else np.empty(0, np.intp)), keys


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

    def join(self, tid: np.ndarray, ts: np.ndarray, cache: object = None) -> Joined:
        """Every queued detail of events (tid, ts), removed from the queues; with `cache`
        (a renacerd._hot.StringCache) joined by the compiled path, string ids included."""
        if cache is not None:
            return self._join_compiled(tid, ts, cache)
        ei, d = self.short.join(tid, ts)
        if len(self.long):
            li, dl = self.long.join(tid, ts)
            if len(li):  # long records waiting for later events cost this drain nothing
                return Joined(
                    np.concatenate([ei, li]),
                    *(np.concatenate([d[f], dl[f]]) for f in ("slot", "len", "flags", "pad")),
                    (d["data"], dl["data"]),
                )
        return Joined(ei, d["slot"], d["len"], d["flags"], d["pad"], (d["data"],))

    def _join_compiled(self, tid: np.ndarray, ts: np.ndarray, cache: object) -> Joined:
        """join() by renacerd/_hot.c: the short ring's details, then the long ring's (their
        strings interned in that order, as the numpy path's distinct() gives them)."""
        parts = [self.short.join_compiled(tid, ts, cache)]
        if len(self.long):
            parts.append(self.long.join_compiled(tid, ts, cache))
        parts = [p for p in parts if len(p[0])] or parts[:1]
        cols = parts[0][:-1] if len(parts) == 1 else [
            np.concatenate(c) for c in zip(*(p[:-1] for p in parts))]
        event, _, ids, slot, length, flags, pad = cols
        return Joined(event, slot, length, flags, pad, tuple(p[-1]["data"] for p in parts),
                      tuple(p[1] for p in parts), ids)


def split_argv(blob: bytes) -> list[bytes]:
    """argv from its NUL-separated blob (a cut blob's last string has no NUL)."""
    if not blob:
        return []
    if blob.endswith(b"\0"):
        blob = blob[:-1]
    return blob.split(b"\0")
