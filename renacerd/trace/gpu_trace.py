"""The GPU layer of a trace for readers: kernels, copies, allocations, syncs, collectives."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from renacerd.cuda.hooks import (
    COLLECTIVE,
    COMM_INIT,
    D2D,
    D2H,
    DEFAULT,
    FREE,
    H2D,
    H2H,
    HOOKS,
    LAUNCH,
    MALLOC,
    MEMCPY,
    NCCL_DTYPES,
    NCCL_OPS,
    SYNC,
)
from renacerd.cuda.records import GPU_LAYOUT

DIRECTIONS = {H2H: "cpu_to_cpu", H2D: "cpu_to_gpu", D2H: "gpu_to_cpu", D2D: "gpu_to_gpu",
              DEFAULT: "default"}
_KIND = np.array([""] + [h.kind for h in HOOKS], dtype=object)
_SYMBOL = np.array([""] + [h.symbol for h in HOOKS], dtype=object)
_OP = np.array([""] + [h.op for h in HOOKS], dtype=object)


@dataclass(slots=True)
class GpuKernel:
    """One kernel launch (renacer's fields; duration is the launch call's, on the host)."""

    kernel: str
    duration_us: float
    backend: str
    workgroup_size: str       # block dims "[x,y,z]"
    grid_size: str            # grid dims "[x,y,z]"
    elements: int             # threads launched: grid x block
    shared_mem: int
    stream: int
    timestamp_nanos: int
    tid: int
    api: str
    return_code: int


@dataclass(slots=True)
class GpuMemoryTransfer:
    """One cudaMemcpy* / cuMemcpy* call."""

    direction: str
    bytes: int
    duration_us: float
    bandwidth_mbps: float
    backend: str
    stream: int
    timestamp_nanos: int
    tid: int
    api: str
    return_code: int


@dataclass(slots=True)
class GpuAllocation:
    """A device allocation; freed_nanos None while it is outstanding."""

    ptr: int
    bytes: int
    timestamp_nanos: int
    api: str
    freed_nanos: int | None = None


@dataclass(slots=True)
class GpuSync:
    """A host wait on the device (device, stream, event or context synchronisation)."""

    api: str
    handle: int
    timestamp_nanos: int
    duration_nanos: int
    tid: int


@dataclass(slots=True)
class CommInit:
    """A successful ncclCommInitRank: this process's place in one communicator."""

    comm: int                 # the ncclComm_t it returned (this process's pointer)
    rank: int
    nranks: int
    comm_id: str              # hex of the unique id's first 16 bytes: the same in every rank
    timestamp_nanos: int

    @property
    def group(self) -> int:
        """The communicator as a number every rank agrees on (crc32 of its id bytes)."""
        return comm_group(self.comm_id)


def comm_id_hex(lo: int, hi: int) -> str:
    """The id bytes sh_nccl_init read as two little-endian words, as hex."""
    return (int(lo).to_bytes(8, "little") + int(hi).to_bytes(8, "little")).hex()


def comm_group(comm_id: str) -> int:
    """The group number of a communicator id (as torch_distributed numbers a named group)."""
    return zlib.crc32(bytes.fromhex(comm_id))


def comm_inits(cols: dict[str, np.ndarray]) -> list[CommInit]:
    """The successful ncclCommInitRank calls of a gpu layer, in order."""
    if not len(cols["ts"]):
        return []
    kind = _KIND[cols["fn"].astype(np.int64)]
    hit = np.flatnonzero((kind == COMM_INIT) & (cols["ret"] == 0))
    # sh_nccl_init: a0 *comm, a1 nranks, a2 rank, a3/a4 the id's first 16 bytes
    return [CommInit(int(cols["a0"][i]), int(cols["a2"][i]), int(cols["a1"][i]),
                     comm_id_hex(cols["a3"][i], cols["a4"][i]), int(cols["ts"][i]))
            for i in hit.tolist()]


@dataclass(slots=True)
class GpuCollective:
    """One NCCL call."""

    op: str
    count: int
    dtype: str
    bytes: int
    reduce_op: str | None
    peer: int | None          # root (broadcast) or peer (send/recv)
    rank: int | None
    nranks: int | None
    comm: int
    stream: int
    timestamp_nanos: int
    duration_nanos: int
    return_code: int
    comm_id: str | None = None  # from the communicator's init (None: init not seen)


def bandwidth_mbps(nbytes: int, duration_us: float) -> float:
    """renacer's formula: bytes*1e6/(duration_us*1048576), 0 when the duration is 0."""
    if duration_us <= 0:
        return 0.0
    return nbytes * 1e6 / (duration_us * 1048576)


def empty_columns() -> dict[str, np.ndarray]:
    """A gpu layer with no rows."""
    return {k: np.empty(0, dtype=dt) for k, dt in GPU_LAYOUT}


def load_gpu(store, run_id: int, proc_id: int, strings: list[bytes]) -> dict[str, Any]:
    """The gpu layer of one process as UnifiedTrace.gpu: columns plus decoded records."""
    cols = store.columns(run_id, proc_id, "gpu", GPU_LAYOUT)
    return decode_gpu(cols, strings)


def _name_of(strings: list[bytes], sid: int) -> str:
    """A string id of the layer as text ("?" where the run has no such string)."""
    if 0 <= sid < len(strings):
        return strings[sid].decode("utf-8", "backslashreplace")
    return "?"


def _kernels(cols: dict[str, np.ndarray], kind: np.ndarray, sym: np.ndarray,
             strings: list[bytes]) -> list[GpuKernel]:
    """The kernel launches."""
    ts, dur, tid, ret, a1, a2 = (cols[k] for k in ("ts", "dur", "tid", "ret", "a1", "a2"))
    kernels = []
    for i in np.flatnonzero(kind == LAUNCH):
        g = (int(cols["gx"][i]), int(cols["gy"][i]), int(cols["gz"][i]))
        b = (int(cols["bx"][i]), int(cols["by"][i]), int(cols["bz"][i]))
        kernels.append(GpuKernel(
            kernel=_name_of(strings, int(cols["name"][i])), duration_us=int(dur[i]) / 1e3,
            backend="cuda", workgroup_size=f"[{b[0]},{b[1]},{b[2]}]",
            grid_size=f"[{g[0]},{g[1]},{g[2]}]",
            elements=g[0] * g[1] * g[2] * b[0] * b[1] * b[2], shared_mem=int(a1[i]),
            stream=int(a2[i]), timestamp_nanos=int(ts[i]), tid=int(tid[i]), api=sym[i],
            return_code=int(ret[i]),
        ))
    return kernels


def _transfers(cols: dict[str, np.ndarray], kind: np.ndarray, sym: np.ndarray
               ) -> list[GpuMemoryTransfer]:
    """The memory copies."""
    ts, dur, tid, ret, a2, a3, a4 = (cols[k] for k in
                                     ("ts", "dur", "tid", "ret", "a2", "a3", "a4"))
    transfers = []
    for i in np.flatnonzero(kind == MEMCPY):
        us = int(dur[i]) / 1e3
        transfers.append(GpuMemoryTransfer(
            direction=DIRECTIONS.get(int(a3[i]), "default"), bytes=int(a2[i]), duration_us=us,
            bandwidth_mbps=bandwidth_mbps(int(a2[i]), us), backend="cuda", stream=int(a4[i]),
            timestamp_nanos=int(ts[i]), tid=int(tid[i]), api=sym[i], return_code=int(ret[i]),
        ))
    return transfers


def _allocations(cols: dict[str, np.ndarray], kind: np.ndarray, sym: np.ndarray
                 ) -> list[GpuAllocation]:
    """The successful allocations, each with the time of its free if one was seen."""
    ts, a0, a1 = cols["ts"], cols["a0"], cols["a1"]
    allocations: list[GpuAllocation] = []
    live: dict[int, GpuAllocation] = {}
    for i in np.flatnonzero(((kind == MALLOC) | (kind == FREE)) & (cols["ret"] == 0)):
        if kind[i] == MALLOC:
            al = GpuAllocation(int(a0[i]), int(a1[i]), int(ts[i]), sym[i])
            allocations.append(al)
            if sym[i] != "cuMemCreate":  # a physical handle, not a pointer that is freed
                live[al.ptr] = al
        else:
            al = live.pop(int(a0[i]), None)
            if al is not None:
                al.freed_nanos = int(ts[i])
    return allocations


def carry_allocations(cols: dict[str, np.ndarray], live: dict[int, int],
                      orphans: list[int]) -> tuple[int, int]:
    """Apply a part of a layer's allocations and frees, in order, to the state of the parts
    before it (`live`: pointer -> bytes; `orphans`: [count, bytes] of allocations whose
    pointer was allocated again unfreed, which never free); returns the outstanding
    (allocations, bytes) after it, as `summarize` counts them over the whole layer."""
    kind = _KIND[cols["fn"].astype(np.int64)]
    sym = _SYMBOL[cols["fn"].astype(np.int64)]
    a0, a1 = cols["a0"], cols["a1"]
    for i in np.flatnonzero(((kind == MALLOC) | (kind == FREE)) & (cols["ret"] == 0)):
        ptr = int(a0[i])
        if kind[i] == FREE:
            live.pop(ptr, None)
        elif sym[i] != "cuMemCreate":  # a physical handle: never outstanding
            if ptr in live:
                orphans[0] += 1
                orphans[1] += live[ptr]
            live[ptr] = int(a1[i])
    return len(live) + orphans[0], sum(live.values()) + orphans[1]


def _collectives(cols: dict[str, np.ndarray], kind: np.ndarray) -> list[GpuCollective]:
    """The NCCL collectives, with rank and size from their communicator's init."""
    ts, dur, ret = cols["ts"], cols["dur"], cols["ret"]
    a0, a1, a2, a3, a4 = (cols[f"a{i}"] for i in range(5))
    comms = {c.comm: c for c in comm_inits(cols)}
    collectives = []
    for i in np.flatnonzero(kind == COLLECTIVE):
        op = _OP[int(cols["fn"][i])]
        dname, size = NCCL_DTYPES.get(int(a1[i]), (f"dtype{int(a1[i])}", 0))
        ci = comms.get(int(a3[i]))
        rank, nranks = (ci.rank, ci.nranks) if ci else (None, None)
        reducing = op in ("allreduce", "reducescatter")
        collectives.append(GpuCollective(
            op=op, count=int(a0[i]), dtype=dname, bytes=int(a0[i]) * size,
            reduce_op=NCCL_OPS.get(int(a2[i]), str(int(a2[i]))) if reducing else None,
            peer=int(cols["gx"][i]) if op in ("broadcast", "send", "recv") else None,
            rank=rank, nranks=nranks, comm=int(a3[i]), stream=int(a4[i]),
            timestamp_nanos=int(ts[i]), duration_nanos=int(dur[i]), return_code=int(ret[i]),
            comm_id=ci.comm_id if ci else None,
        ))
    return collectives


def decode_gpu(cols: dict[str, np.ndarray], strings: list[bytes]) -> dict[str, Any]:
    """Columns -> {"columns", "kernels", "transfers", "allocations", "syncs", "collectives"}."""
    kind = _KIND[cols["fn"].astype(np.int64)]
    sym = _SYMBOL[cols["fn"].astype(np.int64)]
    ts, dur, tid, a0 = cols["ts"], cols["dur"], cols["tid"], cols["a0"]
    syncs = [
        GpuSync(sym[i], int(a0[i]), int(ts[i]), int(dur[i]), int(tid[i]))
        for i in np.flatnonzero(kind == SYNC)
    ]
    return {"columns": cols, "kernels": _kernels(cols, kind, sym, strings),
            "transfers": _transfers(cols, kind, sym),
            "allocations": _allocations(cols, kind, sym), "syncs": syncs,
            "collectives": _collectives(cols, kind), "strings": strings}


def summarize(cols: dict[str, np.ndarray], strings: list[bytes],
              mask: np.ndarray | None = None) -> dict[str, Any]:
    """The `renacer show` JSON of a gpu layer (optionally only rows under `mask`)."""
    if mask is not None:
        cols = {k: v[mask] for k, v in cols.items()}
    fn = cols["fn"].astype(np.int64)
    kind = _KIND[fn]
    ok = cols["ret"] == 0
    launches = (kind == LAUNCH) & ok
    names, counts = np.unique(cols["name"][launches], return_counts=True)
    kernels: dict[str, int] = {}
    unresolved = 0
    for sid, n in zip(names.tolist(), counts.tolist()):
        nm = strings[sid].decode("utf-8", "backslashreplace") if 0 <= sid < len(strings) else "?"
        kernels[nm] = kernels.get(nm, 0) + n
        if nm.startswith("0x"):
            unresolved += n
    cp = (kind == MEMCPY) & ok
    by = cols["a2"]
    direction = cols["a3"]

    def moved(k: int) -> int:
        return int(by[cp & (direction == k)].sum())

    mal = (kind == MALLOC) & ok
    fre = (kind == FREE) & ok
    syn = kind == SYNC
    nccl: Counter[str] = Counter(_OP[fn[(kind == COLLECTIVE) & ok]].tolist())
    dec = decode_gpu(cols, strings) if mal.any() else None
    out_allocs = [a for a in dec["allocations"] if a.freed_nanos is None
                  and a.api != "cuMemCreate"] if dec else []
    return {
        "kernels": kernels,
        "memcpy": {"h2d_bytes": moved(H2D), "d2h_bytes": moved(D2H), "d2d_bytes": moved(D2D)},
        "malloc": {"calls": int(mal.sum()), "bytes": int(cols["a1"][mal].sum())},
        "free": {"calls": int(fre.sum())},
        "nccl": dict(nccl),
        "memcpy_other": {"h2h_bytes": moved(H2H), "default_bytes": moved(DEFAULT)},
        "outstanding": {"allocations": len(out_allocs),
                        "bytes": sum(a.bytes for a in out_allocs)},
        "sync": {"calls": int(syn.sum()), "time_ns": int(cols["dur"][syn].sum())},
        "unresolved_kernels": unresolved,
        "failed_calls": int((~ok & (kind != "")).sum()),
    }


def gpu_summary(trace) -> dict[str, Any]:
    """The per-process `"gpu"` object of `renacer show --json` for a UnifiedTrace."""
    gpu = trace.gpu or {}
    cols = gpu.get("columns")
    if cols is None:
        cols = empty_columns()
    return summarize(cols, gpu.get("strings", trace.strings))


def gpu_by_interval(trace, intervals: Iterable[tuple[str, int, int]]) -> dict[str, Any]:
    """Per-step GPU summaries: calls whose entry falls in [start, end) of each interval."""
    gpu = trace.gpu or {}
    cols = gpu.get("columns")
    if cols is None:
        cols = empty_columns()
    strings = gpu.get("strings", trace.strings)
    ts = cols["ts"]
    out = {}
    for key, start, end in intervals:
        out[key] = summarize(cols, strings, (ts >= start) & (ts < end))
    return out


def gpu_by_span(trace) -> dict[str, Any]:
    """Per-span GPU summaries keyed "name#step" (or "name@start") over the trace's spans."""
    iv = []
    for s in trace.spans:
        start = getattr(s, "start_mono_nanos", None)
        end = getattr(s, "end_mono_nanos", None)
        if start is None or end is None:
            continue
        step = None
        attrs = getattr(s, "attributes_json", None)
        if attrs:
            step = orjson.loads(attrs).get("experiment.step")
        name = getattr(s, "span_name", "span")
        iv.append((f"{name}#{step}" if step is not None else f"{name}@{start}", start, end))
    return gpu_by_interval(trace, iv)
