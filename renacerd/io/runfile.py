"""Golden trace files: one portable, versioned file holding a whole run (renacer export)."""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from renacerd.columns import ChunkError, decode, encode
from renacerd.escaping import lossless_dumps, lossless_loads
from renacerd.trace.unified_trace import ProcessSpan, UnifiedTrace

MAGIC = b"RENACERG"
VERSION = 1
# magic, u16 version, u16 flags, u64 body length, u32 crc32 of the body
_HEAD = struct.Struct("<8sHHQI")
_SECTION = struct.Struct("<Q")
SUFFIX = ".rgt"


class GoldenError(ValueError):
    """A golden trace file is missing, truncated, corrupt, or of another format/version."""


def _run_json(run: Any) -> dict[str, Any]:
    d = dataclasses.asdict(run) if dataclasses.is_dataclass(run) else dict(run)
    d.pop("id", None)
    d["syscall_table"] = {str(k): v for k, v in (d.get("syscall_table") or {}).items()}
    return d


def _span_json(s: Any) -> dict[str, Any]:
    d = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    for k in ("trace_id", "span_id", "parent_span_id"):
        if isinstance(d.get(k), bytes | bytearray):
            d[k] = bytes(d[k]).hex()
    # enums (span_kind, status_code) go out as their integers, as the store keeps them
    return {k: int(v) if isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in d.items()}


def _gpu_json(t: UnifiedTrace) -> dict[str, Any] | None:
    if not t.gpu:
        return None
    if "summary" in t.gpu:
        return {"summary": t.gpu["summary"]}
    try:
        from renacerd.trace.gpu_trace import gpu_summary

        return {"summary": gpu_summary(t)}
    except ImportError:
        return None


def write_golden(path: str | os.PathLike[str], run: Any, traces: list[UnifiedTrace]) -> int:
    """Write the run to `path` (atomically); returns the file size."""
    strings = traces[0].strings if traces else []
    spans = traces[0].spans if traces else []
    header = {
        "format": "renacer golden trace",
        "run": _run_json(run),
        "processes": [
            {**dataclasses.asdict(t.process),
             "initial_fds": {str(k): v for k, v in t.process.initial_fds.items()},
             "events": len(t), "gpu": _gpu_json(t)}
            for t in traces
        ],
        "spans": [_span_json(s) for s in spans],
        "strings": len(strings),
    }
    lens = np.array([len(s) for s in strings], dtype="<u4")
    # names keep their bytes that are not UTF-8 (renacerd.escaping)
    sections = [lossless_dumps(header), zlib.compress(lens.tobytes() + b"".join(strings), 6)]
    sections += [encode(t.columns) for t in traces]
    body = b"".join(_SECTION.pack(len(s)) + s for s in sections)
    head = _HEAD.pack(MAGIC, VERSION, 0, len(body), zlib.crc32(body))
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(body)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return len(head) + len(body)


def read_golden(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[UnifiedTrace]]:
    """(run info dict, traces) from a golden trace file; GoldenError on anything wrong."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise GoldenError(f"{path}: no such file") from None
    except OSError as e:
        raise GoldenError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise GoldenError(f"{path}: not a renacer golden trace (bad magic)")
    if len(data) < _HEAD.size:
        raise GoldenError(f"{path}: truncated golden trace (header incomplete)")
    _, version, _, body_len, crc = _HEAD.unpack_from(data)
    if version != VERSION:
        raise GoldenError(f"{path}: golden trace version {version} is not supported "
                          f"(this renacer reads version {VERSION})")
    body = memoryview(data)[_HEAD.size:]
    if len(body) < body_len:
        raise GoldenError(f"{path}: truncated golden trace ({len(body)} of {body_len} bytes)")
    if len(body) > body_len:
        raise GoldenError(f"{path}: trailing bytes after the golden trace")
    if zlib.crc32(body) != crc:
        raise GoldenError(f"{path}: corrupt golden trace (checksum mismatch)")
    try:
        return _parse(body)
    except (ChunkError, zlib.error, orjson.JSONDecodeError, KeyError, TypeError,
            ValueError, struct.error) as e:
        raise GoldenError(f"{path}: corrupt golden trace ({e})") from None


def _parse(body: memoryview) -> tuple[dict[str, Any], list[UnifiedTrace]]:
    sections: list[memoryview] = []
    off = 0
    while off < len(body):
        (n,) = _SECTION.unpack_from(body, off)
        off += _SECTION.size
        sections.append(body[off: off + n])
        off += n
    header = lossless_loads(bytes(sections[0]))
    raw = zlib.decompress(sections[1])
    count = int(header["strings"])
    lens = np.frombuffer(raw[: 4 * count], dtype="<u4").astype(np.int64)
    ends = np.cumsum(lens) + 4 * count
    strings = [raw[int(e - n): int(e)] for e, n in zip(ends, lens)]
    run = header["run"]
    table = {int(k): v for k, v in run.get("syscall_table", {}).items()}
    run["syscall_table"] = table
    spans = _spans(header.get("spans") or [])
    procs = header["processes"]
    if len(sections) != 2 + len(procs):
        raise ValueError(f"{len(sections) - 2} event sections for {len(procs)} processes")
    traces = []
    for p, sec in zip(procs, sections[2:]):
        fields = {f.name for f in dataclasses.fields(ProcessSpan)}
        span = ProcessSpan(**{k: v for k, v in p.items() if k in fields})
        span.initial_fds = {int(k): v for k, v in (p.get("initial_fds") or {}).items()}
        t = UnifiedTrace(span.pid, span.name)
        t.process = span
        t.run = run.get("name")
        t.columns = decode(bytes(sec))
        if len(t) != p.get("events", len(t)):
            raise ValueError(f"process {span.pid}: {len(t)} events, header says {p['events']}")
        t.strings = strings
        if table:
            t.table = table
        t.spans = spans
        if p.get("gpu"):
            t.gpu = p["gpu"]
        traces.append(t)
    return run, traces


def _spans(items: list[dict[str, Any]]) -> list[Any]:
    if not items:
        return []
    from renacerd.client.span import SpanRecord

    return [SpanRecord.from_row(d) for d in items]


def load_golden_trace(path: str | os.PathLike[str]) -> list[UnifiedTrace]:
    """Every process of a golden trace file as UnifiedTraces (renacer's load_golden_trace)."""
    return read_golden(path)[1]
