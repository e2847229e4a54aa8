"""Each process's rank in its job: exec-time environment, else the client's hello, else NCCL
communicator init (rank, nranks)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson

from renacerd.client.dist_env import DistInfo
from renacerd.trace.gpu_trace import comm_inits
from renacerd.trace.unified_trace import ProcessSpan

NCCL_JOB_PREFIX = "nccl:"
_HELLO_KEYS = ("rank", "local_rank", "world_size", "group_rank", "local_world_size", "job_id",
               "host")


def hello_ranks(spans: Iterable[Any]) -> dict[int, DistInfo]:
    """pid -> the rank its client's hello gave (carried as renacer.* resource attributes)."""
    out: dict[int, DistInfo] = {}
    seen: dict[str, DistInfo | None] = {}
    for sp in spans:
        res = sp.resource_json
        if not res or sp.process_id in out:
            continue
        if res not in seen:
            attrs = orjson.loads(res)
            fields = {k: attrs.get(f"renacer.{k}") for k in _HELLO_KEYS}
            seen[res] = (DistInfo(**fields, source="hello")
                         if any(v is not None for v in fields.values()) else None)
        if seen[res] is not None:
            out[sp.process_id] = seen[res]
    return out


def nccl_rank(gpu_cols: dict[str, np.ndarray] | None) -> DistInfo | None:
    """Rank and nranks of the first successful ncclCommInitRank of a process's GPU layer; its
    communicator's id names the job ("nccl:" + hex), which every rank shares."""
    inits = comm_inits(gpu_cols) if gpu_cols is not None else []
    if not inits:
        return None
    c = inits[0]
    return DistInfo(rank=c.rank, world_size=c.nranks, job_id=f"{NCCL_JOB_PREFIX}{c.comm_id}",
                    source="nccl")


def label(procs: Iterable[ProcessSpan], spans: Iterable[Any],
          gpu: dict[int, dict[str, np.ndarray] | None] | None = None) -> None:
    """Set each process's `dist` from the three sources, the environment first."""
    hello = hello_ranks(spans)
    for p in procs:
        d: DistInfo | None = p.dist
        for other in (hello.get(p.pid), nccl_rank((gpu or {}).get(p.pid))):
            if other is None:
                continue
            d = other if d is None else d.merged(other)
        p.dist = d


def label_traces(traces: list[Any]) -> None:
    """label() over a run's UnifiedTraces."""
    if not traces:
        return
    label([t.process for t in traces], traces[0].spans,
          {t.pid: (t.gpu or {}).get("columns") for t in traces})


def rank_entry(p: ProcessSpan) -> dict[str, Any] | None:
    """The JSON of a process's rank (None: not part of a distributed job)."""
    return None if p.dist is None else p.dist.to_dict()
