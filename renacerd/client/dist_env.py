"""A process's place in a distributed job (rank, local rank, world size, job id, host), from
the launcher's environment variables. Runs on CPython >= 3.9 (the client imports it)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Optional

from renacerd.client.span import SLOTS

# What torchrun / torch.distributed.launch / mpirun-style launchers set for each worker. Only
# these are ever kept: the rest of an environment (tokens, keys) is never read into the store.
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE",
             "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
_RANK_KEYS = frozenset(v.encode() for v in RANK_VARS)
MAX_ENVIRON = 1 << 20  # /proc/PID/environ read at most this far (the kernel caps it too)
MAX_FIELD = 128
_INT_LIMIT = 2**31 - 1


@dataclass(**SLOTS)
class DistInfo:
    """Where a process sits in its job; `source` says where it was learnt (env, hello, nccl)."""

    rank: Optional[int] = None
    local_rank: Optional[int] = None
    world_size: Optional[int] = None
    group_rank: Optional[int] = None
    local_world_size: Optional[int] = None
    job_id: Optional[str] = None
    host: Optional[str] = None
    source: str = "env"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)

    def merged(self, other: Optional[DistInfo]) -> DistInfo:
        """These fields, each missing one taken from `other`."""
        if other is None:
            return self
        out = DistInfo(**{k: v for k, v in self.to_dict().items()})
        for k, v in other.to_dict().items():
            if k != "source" and getattr(out, k) is None and v is not None:
                setattr(out, k, v)
        return out


def _int(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if 0 <= n <= _INT_LIMIT else None


def _field(value: Optional[str]) -> Optional[str]:
    return value[:MAX_FIELD] if value else None


def from_mapping(env: Mapping[str, str], host: Optional[str] = None,
                 source: str = "env") -> Optional[DistInfo]:
    """The DistInfo those variables describe; None when no rank variable is set. The job id is
    TORCHELASTIC_RUN_ID (unless torchrun's default "none"), else MASTER_ADDR:MASTER_PORT (what
    every rank of a job shares)."""
    if not any(env.get(v) for v in RANK_VARS):
        return None
    job = env.get("TORCHELASTIC_RUN_ID")
    if job == "none":  # torchrun's default --rdzv-id: every job has it, it names none
        job = None
    if not job and env.get("MASTER_ADDR"):
        job = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '')}"
    return DistInfo(
        rank=_int(env.get("RANK")),
        local_rank=_int(env.get("LOCAL_RANK")),
        world_size=_int(env.get("WORLD_SIZE")),
        group_rank=_int(env.get("GROUP_RANK")),
        local_world_size=_int(env.get("LOCAL_WORLD_SIZE")),
        job_id=_field(job),
        host=_field(host or socket.gethostname()),
        source=source,
    )


def parse_environ(blob: bytes, host: Optional[str] = None) -> Optional[DistInfo]:
    """DistInfo from the NUL-separated KEY=VALUE bytes of /proc/PID/environ."""
    env: dict[str, str] = {}
    for item in blob.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in _RANK_KEYS:
            env[key.decode()] = value.decode("utf-8", "replace")
    return from_mapping(env, host)


def read_environ(pid: int, host: Optional[str] = None) -> tuple[Optional[DistInfo], bool]:
    """(DistInfo of pid's exec-time environment, read ok). The kernel serves the environment
    block the process was exec'd with; a process already gone cannot be read (ok False)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            blob = f.read(MAX_ENVIRON)
    except OSError:
        return None, False
    if not blob:  # a zombie's mm is gone: nothing to read
        return None, False
    return parse_environ(blob, host), True
