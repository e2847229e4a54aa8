"""Where ranks first disagree: the sequence of collectives (op, size, dtype, group) each rank
called in each step (c10d spans and NCCL calls), compared position by position; and the
collectives never left."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from renacerd.cuda.hooks import COLLECTIVE, HOOKS, NCCL_DTYPES, hook_of
from renacerd.trace.gpu_trace import comm_inits

COLLECTIVE_PREFIX = "c10d."
_IS_COLL = np.array([False] + [h.kind == COLLECTIVE for h in HOOKS])
_M = "experiment.metrics.c10d."
# what the daemon writes for a span that its process never ended (renacerd.serve.spans)
UNFINISHED = ("process exited mid-span", "client disconnected mid-span",
              "daemon stopped mid-span")


def _num(attrs: dict[str, Any], key: str) -> int:
    try:
        return int(float(attrs.get(_M + key, -1)))
    except (TypeError, ValueError):
        return -1


@dataclass(slots=True)
class Collective:
    """One collective call of a rank, from its c10d.<op> span."""

    op: str
    numel: int
    dtype: str
    group: int
    seq: int
    step: int | None
    start_ns: int
    end_ns: int
    failed: bool  # ended with status Error: raised (a timeout, a peer gone) or never left
    status_message: str

    @classmethod
    def of(cls, sp: Any, attrs: dict[str, Any], step: int | None) -> Collective:
        """From a span record and its attributes; `step` is the step span it falls in."""
        return cls(sp.span_name[len(COLLECTIVE_PREFIX):], _num(attrs, "numel"),
                   attrs.get("experiment.model_name", ""), _num(attrs, "group"),
                   _num(attrs, "seq"), step, int(sp.start_mono_nanos), int(sp.end_mono_nanos),
                   int(sp.status_code) == 2, sp.status_message or "")

    def signature(self) -> tuple[str, int, str, int]:
        """What must match across ranks."""
        return (self.op, self.numel, self.dtype, self.group)

    def to_dict(self) -> dict[str, Any]:
        """JSON of the call."""
        return {"op": self.op, "numel": self.numel, "dtype": self.dtype, "group": self.group,
                "seq": self.seq}


def nccl_collectives(gpu_cols: dict[str, np.ndarray],
                     covered: list[tuple[int, int]]) -> list[Collective]:
    """The NCCL calls of a process's GPU layer that start outside the `covered` intervals
    (its c10d spans), as collectives named by their symbol (`ncclAllReduce`): numel the
    count, dtype NCCL's, group the communicator's (from its init; -1 when not seen), seq the
    call's number on its communicator in this process, from 1."""
    if not len(gpu_cols["ts"]):
        return []
    fn = gpu_cols["fn"].astype(np.int64)
    idx = np.flatnonzero(_IS_COLL[np.minimum(fn, len(_IS_COLL) - 1)])
    if not len(idx):
        return []
    ts = gpu_cols["ts"][idx]
    if covered:
        cov = np.array(sorted(covered), dtype=np.int64).reshape(-1, 2)
        reach = np.maximum.accumulate(cov[:, 1])
        j = np.searchsorted(cov[:, 0], ts, side="right") - 1
        idx = idx[~((j >= 0) & (ts < reach[np.maximum(j, 0)]))]
    comms = {c.comm: c for c in comm_inits(gpu_cols)}
    seq: Counter[int] = Counter()
    out = []
    for i in idx.tolist():
        comm = int(gpu_cols["a3"][i])
        ci = comms.get(comm)
        seq[comm] += 1
        ret = int(gpu_cols["ret"][i])
        h = hook_of(int(fn[i]))
        dt = int(gpu_cols["a1"][i])
        start = int(gpu_cols["ts"][i])
        out.append(Collective(
            h.symbol, int(gpu_cols["a0"][i]), NCCL_DTYPES.get(dt, (f"dtype{dt}", 0))[0],
            ci.group if ci else -1, seq[comm], None, start, start + int(gpu_cols["dur"][i]),
            ret != 0, f"{h.symbol} returned ncclResult_t {ret}" if ret else ""))
    return out


def _by_step(calls: list[Collective]) -> dict[int, list[Collective]]:
    out: dict[int, list[Collective]] = {}
    for c in calls:
        if c.step is not None:
            out.setdefault(c.step, []).append(c)
    return out


def desync(by_rank: dict[int, list[Collective]]) -> dict[str, Any] | None:
    """The first (step, position) where the ranks' collectives differ: which ranks differ from
    the majority and what each called (null: the rank called nothing there)."""
    if len(by_rank) < 2:
        return None
    steps = {r: _by_step(calls) for r, calls in by_rank.items()}
    all_steps = sorted(set().union(*(s.keys() for s in steps.values())))
    last = {r: max(s) if s else -1 for r, s in steps.items()}
    for step in all_steps:
        # a rank whose trace ends before this step (it crashed) is no disagreement here
        ranks = [r for r in by_rank if last[r] >= step]
        seqs = {r: steps[r].get(step, []) for r in ranks}
        longest = max(len(v) for v in seqs.values())
        for pos in range(longest):
            sig = {r: (v[pos].signature() if pos < len(v) else None) for r, v in seqs.items()}
            if len(set(sig.values())) <= 1:
                continue
            common, _ = Counter(sig.values()).most_common(1)[0]
            return {
                "step": step, "position": pos,
                "ranks": sorted(r for r, s in sig.items() if s != common),
                "calls": {str(r): (seqs[r][pos].to_dict() if pos < len(seqs[r]) else None)
                          for r in sorted(seqs)},
            }
    return None


def waiting(by_rank: dict[int, list[Collective]]) -> list[dict[str, Any]]:
    """Collectives a rank entered and did not complete: it never left them (its process died
    or hung there: `unfinished`) or they raised (a timeout, a peer gone)."""
    out = []
    for r in sorted(by_rank):
        for c in by_rank[r]:
            if c.failed:
                out.append({"rank": r, "step": c.step, **c.to_dict(),
                            "unfinished": c.status_message in UNFINISHED,
                            "status_message": c.status_message})
    return out
