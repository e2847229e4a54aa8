"""Ranks: the environment's rank variables, the hello's dist object, the store's rank columns,
which source wins, and the desync comparison, on exact values."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from renacerd.client.dist_env import DistInfo, parse_environ, read_environ
from renacerd.client.protocol import Hello, ProtocolError, decode, encode
from renacerd.cuda.hooks import HOOKS
from renacerd.cuda.records import GPU_LAYOUT
from renacerd.reports.desync import Collective, desync, waiting
from renacerd.reports.rank_labels import label
from renacerd.reports.ranks import _factorize
from renacerd.store.database import Store
from renacerd.trace.unified_trace import ProcessSpan

ENV = (b"PATH=/usr/bin\0RANK=3\0LOCAL_RANK=1\0WORLD_SIZE=8\0GROUP_RANK=1\0"
       b"LOCAL_WORLD_SIZE=2\0MASTER_ADDR=10.0.0.5\0MASTER_PORT=29500\0"
       b"TORCHELASTIC_RUN_ID=job-42\0HF_TOKEN=secret\0")


def test_environ_rank_variables_and_nothing_else():
    d = parse_environ(ENV, host="h1")
    assert d == DistInfo(rank=3, local_rank=1, world_size=8, group_rank=1, local_world_size=2,
                         job_id="job-42", host="h1", source="env")
    assert "secret" not in repr(d)


def test_job_id_falls_back_to_master_addr_port():
    # torchrun's default --rdzv-id is "none": it names no job
    blob = b"RANK=0\0MASTER_ADDR=10.0.0.5\0MASTER_PORT=29500\0TORCHELASTIC_RUN_ID=none\0"
    assert parse_environ(blob, host="h").job_id == "10.0.0.5:29500"
    assert parse_environ(b"RANK=0\0", host="h").job_id is None


def test_no_rank_variables_no_rank_and_bad_numbers_are_none():
    assert parse_environ(b"PATH=/bin\0HOME=/root\0", host="h") is None
    d = parse_environ(b"RANK=x\0WORLD_SIZE=-1\0LOCAL_RANK=99999999999\0", host="h")
    assert (d.rank, d.world_size, d.local_rank) == (None, None, None)


def test_read_environ_of_a_dead_pid_is_not_ok():
    assert read_environ(2**22 + 12345) == (None, False)


def test_hello_dist_round_trip_and_bad_values():
    h = Hello(pid=5, client="c", dist={"rank": 2, "world_size": 4, "job_id": "j",
                                       "host": "h"})
    back = decode(encode(h))
    assert back.dist == {"rank": 2, "world_size": 4, "job_id": "j", "host": "h"}
    assert decode(encode(Hello(pid=5))).dist is None
    for bad, kind in (({"rank": "2"}, "schema"), ({"rank": -1}, "value"),
                      ({"rank": 2**31}, "value"), ({"host": "x" * 129}, "limit"), ([], "schema")):
        frame = orjson.dumps({"t": "hello", "v": 2, "pid": 1, "dist": bad})
        with pytest.raises(ProtocolError) as e:
            decode(frame)
        assert e.value.kind == kind


def test_store_rank_columns_and_an_older_store(tmp_path):
    path = tmp_path / "s.db"
    s = Store(path, create=True)
    rid = s.begin_run("r", cmdline=[], version="v", syscall_table={}, start_wall_ns=0,
                      start_mono_ns=0)
    a = s.add_process(rid, ProcessSpan(pid=10))
    s.add_process(rid, ProcessSpan(pid=11))
    s.set_process_dist(a, DistInfo(rank=1, local_rank=1, world_size=2, job_id="j", host="h"))
    s.close()
    got = {p.pid: p.dist for _, p in Store(path).processes(rid)}
    assert got == {10: DistInfo(rank=1, local_rank=1, world_size=2, job_id="j", host="h",
                                source="env"), 11: None}
    # a store from before the rank columns: readers see no ranks, a daemon adds the columns
    db = sqlite3.connect(path)
    for c in ("rank", "local_rank", "world_size", "group_rank", "local_world_size", "job_id",
              "rank_host", "rank_source"):
        db.execute(f"ALTER TABLE processes DROP COLUMN {c}")
    db.commit()
    db.close()
    assert [p.dist for _, p in Store(path).processes(rid)] == [None, None]
    s = Store(path, create=True)
    s.set_process_dist(a, DistInfo(rank=0, source="hello"))
    s.close()
    assert Store(path).processes(rid)[0][1].dist.rank == 0


def _gpu_init(rank: int, nranks: int) -> dict[str, np.ndarray]:
    cols = {k: np.zeros(1, dtype=dt) for k, dt in GPU_LAYOUT}
    cols["fn"][0] = 1 + next(i for i, h in enumerate(HOOKS) if h.symbol == "ncclCommInitRank")
    cols["a0"][0], cols["a1"][0], cols["a2"][0] = 0xC0FFEE, nranks, rank
    cols["a3"][0], cols["a4"][0] = 0x0807060504030201, 0x100F0E0D0C0B0A09  # the id's bytes
    return cols


def test_sources_environment_first_then_hello_then_nccl():
    env = ProcessSpan(pid=1, dist=DistInfo(rank=0, world_size=2, host="h"))
    hello_only = ProcessSpan(pid=2)
    nccl_only = ProcessSpan(pid=3)
    none = ProcessSpan(pid=4)
    res = orjson.dumps({"renacer.rank": 1, "renacer.local_rank": 1, "renacer.world_size": 2,
                        "renacer.job_id": "j"}).decode()
    spans = [SimpleNamespace(process_id=1, resource_json=orjson.dumps(
                 {"renacer.rank": 5, "renacer.job_id": "j"}).decode()),
             SimpleNamespace(process_id=2, resource_json=res)]
    label([env, hello_only, nccl_only, none], spans, {3: _gpu_init(7, 16)})
    # the environment's rank stands; the hello fills what it lacked
    assert env.dist == DistInfo(rank=0, world_size=2, job_id="j", host="h", source="env")
    assert hello_only.dist == DistInfo(rank=1, local_rank=1, world_size=2, job_id="j",
                                       source="hello")
    assert nccl_only.dist == DistInfo(rank=7, world_size=16,
                                      job_id="nccl:0102030405060708090a0b0c0d0e0f10",
                                      source="nccl")
    assert none.dist is None


def _c(op: str, n: int, step: int, seq: int, failed: str = "") -> Collective:
    return Collective(op, n, "float32", 0, seq, step, 0, 0, bool(failed), failed)


def test_desync_first_step_and_position_and_who():
    same = [_c("all_reduce", 68, s, 2 * s + 1) for s in range(3)]
    by_rank = {
        0: same + [_c("all_reduce", 68, 3, 7), _c("all_reduce", 1, 3, 8)],
        1: same + [_c("all_reduce", 68, 3, 7), _c("broadcast", 1, 3, 8)],
        2: same + [_c("all_reduce", 68, 3, 7), _c("all_reduce", 1, 3, 8)],
    }
    assert desync(by_rank) == {
        "step": 3, "position": 1, "ranks": [1],
        "calls": {"0": {"op": "all_reduce", "numel": 1, "dtype": "float32", "group": 0,
                        "seq": 8},
                  "1": {"op": "broadcast", "numel": 1, "dtype": "float32", "group": 0,
                        "seq": 8},
                  "2": {"op": "all_reduce", "numel": 1, "dtype": "float32", "group": 0,
                        "seq": 8}}}
    assert desync({0: same, 1: same}) is None


def test_desync_an_extra_call_and_a_rank_that_ended_early():
    a = [_c("all_reduce", 4, 0, 1), _c("all_reduce", 4, 1, 2)]
    extra = [_c("all_reduce", 4, 0, 1), _c("all_reduce", 4, 0, 2), _c("all_reduce", 4, 1, 3)]
    d = desync({0: a, 1: extra, 2: a})
    assert (d["step"], d["position"], d["ranks"]) == (0, 1, [1])
    assert d["calls"]["0"] is None and d["calls"]["1"]["seq"] == 2
    # rank 2's trace stops after step 0 (it crashed): no disagreement at step 1
    assert desync({0: a, 1: a, 2: a[:1]}) is None


def test_waiting_lists_failed_and_unfinished_collectives():
    by_rank = {0: [_c("all_reduce", 4, 5, 9, "process exited mid-span")],
               1: [_c("all_reduce", 4, 5, 9, "Timed out waiting 3000ms")],
               2: [_c("all_reduce", 4, 5, 9)]}
    assert [(w["rank"], w["unfinished"], w["step"], w["seq"]) for w in waiting(by_rank)] == [
        (0, True, 5, 9), (1, False, 5, 9)]


def test_factorize_dense_and_sparse_agree():
    key = np.array([5, 3, 5, 9, 3, 3], dtype=np.int64)
    uniq, code = _factorize(key)
    assert uniq.tolist() == [3, 5, 9] and code.tolist() == [1, 0, 1, 2, 0, 0]
    uniq, code = _factorize(key + (1 << 40))
    assert (uniq - (1 << 40)).tolist() == [3, 5, 9] and code.tolist() == [1, 0, 1, 2, 0, 0]
