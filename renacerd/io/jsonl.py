"""JSON lines: one object per line (processes, spans, then syscalls in time order) for scripts."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

from renacerd.escaping import json_safe
from renacerd.records import F_TRUNCATED
from renacerd.trace.unified_trace import INCOMPLETE, OPEN_FAMILY, UnifiedTrace


def _span(s: Any) -> dict[str, Any]:
    d = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    for k in ("trace_id", "span_id", "parent_span_id"):
        if isinstance(d.get(k), bytes | bytearray):
            d[k] = bytes(d[k]).hex()
    return {"type": "span", **d}


def lines(traces: list[UnifiedTrace]) -> Iterator[bytes]:
    """Serialized lines, without the newline."""
    for t in traces:
        p = dataclasses.asdict(t.process)
        p["initial_fds"] = {str(k): v for k, v in p["initial_fds"].items()}
        yield orjson.dumps(json_safe({"type": "process", **p, "events": len(t)}))
    for s in traces[0].spans if traces else []:
        yield orjson.dumps(_span(s))
    if not traces:
        return
    ts = np.concatenate([t.columns["ts"] for t in traces])
    who = np.concatenate([np.full(len(t), k, dtype=np.int32) for k, t in enumerate(traces)])
    at = np.concatenate([np.arange(len(t)) for t in traces])
    names = [t.names() for t in traces]
    texts = [t.texts() for t in traces]
    for j in np.argsort(ts, kind="stable"):
        t = traces[who[j]]
        i = int(at[j])
        c = t.columns
        ret = int(c["ret"][i])
        rec: dict[str, Any] = {"type": "syscall", "pid": t.pid, "tid": int(c["tid"][i]),
                               "ts": int(c["ts"][i]), "dur": int(c["dur"][i]),
                               "name": names[who[j]][i], "ret": ret,
                               "errno": -ret if -4095 <= ret < 0 else None,
                               "a0": int(c["a0"][i])}
        if c["s0"][i] >= 0:
            rec["path"] = texts[who[j]][int(c["s0"][i])]
        if c["s1"][i] >= 0:
            rec["path2"] = texts[who[j]][int(c["s1"][i])]
        if rec["name"] in OPEN_FAMILY:
            rec["flags"] = int(c["aux"][i])
            rec["mode"] = int(c["mode"][i]) & 0xFFFF
        fl = int(c["flags"][i])
        rec["partial"] = bool(fl & INCOMPLETE)
        rec["truncated"] = bool(fl & F_TRUNCATED)
        yield orjson.dumps(rec)


def write_jsonl(path: str | os.PathLike[str], traces: list[UnifiedTrace]) -> int:
    """Write the lines; returns how many."""
    n = 0
    with open(path, "wb") as f:
        for line in lines(traces):
            f.write(line + b"\n")
            n += 1
    return n
