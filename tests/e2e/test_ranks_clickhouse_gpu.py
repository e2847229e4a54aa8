"""renacer ranks across hosts with the GPU layer: the NCCL stub job (tests/cuda_stubs/
nccl_job.py: 3 ranks with torchrun's variables, CUDA synchronisation in every step, the
broadcast of step 1 inside a c10d span, rank 1's different-sized all-reduce at step 4, rank
0's failed all-gather at step 6) traced by
renacerd, split over two hosts as in test_ranks_clickhouse.py, both pushed; `renacer ranks
clickhouse://...` must give the local answer: GPU waits, NCCL collectives and communicators
included."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import zlib

import numpy as np
import orjson
import pytest

from renacerd.cuda.hooks import HOOKS, SYNC
from renacerd.cuda.records import GPU_LAYOUT
from renacerd.store.database import Store
from tests.bpf.test_cuda import NCCL_JOB, NCCL_STEP_OPS, env_with_driver, stub_build
from tests.conftest import ROOT, needs_root, run_cli
from tests.e2e import test_clickhouse as ch
from tests.e2e import test_ranks_clickhouse as rch

server = ch.server  # the loopback server fixture (scripts/clickhouse.sh), one definition
chdb = rch.chdb  # a database of this module's own
PORT = "29431"  # MASTER_PORT of the job: its id is 127.0.0.1:PORT
HELLO_PORT = "29432"  # the same, of the job only the hello names
STEPS = 6
SAME_KEYS = ("steps", "stragglers", "slow_steps", "desync", "waiting")
_SYNC_FN = [i + 1 for i, h in enumerate(HOOKS) if h.kind == SYNC]


def _ranks(*args: str) -> dict:
    r = run_cli("renacer_main", "ranks", *args, "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    return orjson.loads(r.stdout)


def _sync_ms(db, run: str) -> dict[tuple[int, int], float]:
    """(rank, step) -> the ms of the GPU synchronisation calls inside the step, summed from
    the store directly (every sync call of the job is on the step's thread, outside its
    NCCL calls)."""
    st = Store(str(db))
    info = st.run(run)
    out = {}
    spans = st.span_records(info.id)
    for proc_id, p in st.processes(info.id):
        if p.dist is None or p.dist.rank is None:
            continue
        g = st.columns(info.id, proc_id, "gpu", GPU_LAYOUT)
        sync = np.isin(g["fn"], _SYNC_FN)
        for sp in spans:
            if sp.process_id == p.pid and sp.span_name == "train_step":
                step = orjson.loads(sp.attributes_json)["experiment.step"]
                m = sync & (g["ts"] >= sp.start_mono_nanos) & (g["ts"] < sp.end_mono_nanos)
                out[(p.dist.rank, int(step))] = round(int(g["dur"][m].sum()) / 1e6, 3)
    st.close()
    return out


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """The stub libraries, compiled once for the module."""
    return stub_build.build(tmp_path_factory.mktemp("cuda"))


def _trace(stubs, db, run: str, *opts: str) -> str:
    """Trace nccl_job.py's 3 ranks of STEPS steps (rank 1's desync at step 4) with `opts`
    into the store at db; the communicator's id."""
    env = env_with_driver(stubs)
    env["PYTHONPATH"] = str(ROOT)
    for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    r = subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db", str(db), "--run",
         run, "--", sys.executable, str(NCCL_JOB), *opts, str(stubs.nccl), "3", str(STEPS),
         "1:4:1000"], capture_output=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode().split()[0]


@pytest.fixture(scope="module")
def gpu_job(tmp_path_factory, stubs, chdb):
    """(local report, ClickHouse report, the communicator's id, store, its host stores)."""
    d = tmp_path_factory.mktemp("gpu")
    db = d / "t.db"
    comm_id = _trace(stubs, db, "gpu", "--env", PORT, "--cudart", str(stubs.runtime),
                     "--c10d", "1")
    local = _ranks("gpu", "--db", str(db))
    parts = []
    for i, (host, ranks) in enumerate(rch.HOSTS.items()):
        part = d / f"{host}.db"
        rch._split(db, part, host, ranks, i == 0, rch.SHIFT_NS * i)
        push = run_cli("renacer_main", "push", "gpu", "--db", str(part), "--to", chdb)
        assert push.returncode == 0, push.stderr
        parts.append((part, push.stderr))
    remote = _ranks(f"{chdb}/127.0.0.1:{PORT}")
    return local, remote, comm_id, db, parts


@needs_root
def test_ranks_and_communicators(gpu_job):
    local, remote, comm_id, _, _ = gpu_job
    group = zlib.crc32(bytes.fromhex(comm_id))
    keys = ("rank", "local_rank", "world_size", "pid", "job_id", "source", "steps", "comms")
    assert [{k: r[k] for k in keys} for r in remote["ranks"]] == [
        {k: r[k] for k in keys} for r in local["ranks"]]
    assert [(r["rank"], r["world_size"], r["source"], r["job_id"], r["steps"], r["host"],
             r["comms"]) for r in remote["ranks"]] == [
        (k, 3, "env", f"127.0.0.1:{PORT}", STEPS, "host-b" if k == 2 else "host-a",
         [{"comm_id": comm_id, "rank": k, "nranks": 3, "group": group}]) for k in range(3)]


@needs_root
def test_same_answer_as_the_local_path(gpu_job):
    local, remote, comm_id, db, _ = gpu_job
    for k in SAME_KEYS:
        assert remote[k] == local[k], k
    sync = _sync_ms(db, "gpu")
    assert len(sync) == 3 * STEPS and min(sync.values()) > 0
    group = zlib.crc32(bytes.fromhex(comm_id))
    for s in remote["steps"]:
        k = s["step"]
        # the broadcast is its c10d span: the NCCL call inside it is no collective again
        want = dict(NCCL_STEP_OPS, broadcast=1) if k == 1 else NCCL_STEP_OPS
        got = {r: (c["collectives"], c["ops"], c["gpu_sync_ms"]) for r, c in s["ranks"].items()}
        # rank 0's failed all-gather of the last step is a collective of its own too
        assert got == {str(r): (sum(want.values()) + (r == 0 and k == STEPS),
                                {**want, "ncclAllGather": 2} if r == 0 and k == STEPS
                                else want, sync[(r, k)]) for r in range(3)}, s
        assert s["straggler"] is None and s["after_desync"] == (k >= 4)
    # seq on the communicator, of the calls outside c10d spans: 3 a step, then the 2nd of
    # step 4
    call = {"op": "ncclAllReduce", "numel": 1024, "dtype": "float32", "group": group,
            "seq": 11}
    assert remote["desync"] == {"step": 4, "position": 1, "ranks": [1],
                                "calls": {"0": call, "1": dict(call, numel=1000), "2": call}}
    assert remote["waiting"] == [{
        "rank": 0, "step": STEPS, "op": "ncclAllGather", "numel": 256, "dtype": "float16",
        "group": -1, "seq": 1, "unfinished": False,
        "status_message": "ncclAllGather returned ncclResult_t 4"}]


@needs_root
def test_every_gpu_call_is_pushed_once(gpu_job, chdb):
    _, _, _, _, parts = gpu_job
    c = ch.ClickHouseClient(ch.parse_url(chdb))
    for part, line in parts:
        host = part.stem
        db = sqlite3.connect(part)
        n = db.execute("SELECT sum(n) FROM chunks WHERE layer = 'gpu'").fetchone()[0]
        db.close()
        got = c.query(f"SELECT count(), uniqExact(chunk, ts, dup) FROM gpu_calls "
                      f"WHERE host = '{host}' FORMAT TSV").decode().split()
        assert got == [str(n), str(n)] and n > 0
        assert f" and {n} GPU calls in " in line
    # per rank: 7 cudaDeviceSynchronize (one before the steps), 6 cudaStreamSynchronize
    rows = c.query("SELECT fn, count() FROM gpu_calls WHERE fn LIKE 'cuda%' GROUP BY fn "
                   "ORDER BY fn FORMAT TSV").decode()
    assert rows == "cudaDeviceSynchronize\t21\ncudaStreamSynchronize\t18\n"


@needs_root
def test_a_job_of_nccl_ranks(stubs, tmp_path, chdb):
    """Ranks with no launcher variables are the job "nccl:" + their communicator's id, as
    locally: rank and world size from their ncclCommInitRank."""
    db = tmp_path / "t.db"
    comm_id = _trace(stubs, db, "nccl")
    local = _ranks("nccl", "--db", str(db))
    push = run_cli("renacer_main", "push", "nccl", "--db", str(db), "--to", chdb, "-q")
    assert push.returncode == 0, push.stderr
    remote = _ranks(f"{chdb}/nccl:{comm_id}")
    for k in SAME_KEYS:
        assert remote[k] == local[k], k
    keys = ("rank", "world_size", "pid", "job_id", "source", "steps", "comms")
    assert [{k: r[k] for k in keys} for r in remote["ranks"]] == [
        {k: r[k] for k in keys} for r in local["ranks"]]
    assert [(r["rank"], r["world_size"], r["source"], r["job_id"]) for r in remote["ranks"]] == [
        (k, 3, "nccl", f"nccl:{comm_id}") for k in range(3)]
    assert remote["desync"]["calls"]["1"]["seq"] == 12  # every NCCL call: no c10d span here
    assert [r["run"] for r in remote["runs"]] == ["nccl"]


@needs_root
def test_a_job_of_hello_ranks(stubs, tmp_path, chdb):
    """Ranks that set torchrun's variables in their own os.environ after their exec are
    named by their client's hello alone: the job is the hello's ("127.0.0.1:PORT", not the
    communicator's), rank, local rank and world size its own, as locally."""
    db = tmp_path / "t.db"
    comm_id = _trace(stubs, db, "hello", "--hello", HELLO_PORT)
    st = Store(str(db))
    assert [p.dist for _, p in st.processes(st.run("hello").id)] == [None] * 4  # no env rank
    st.close()
    local = _ranks("hello", "--db", str(db))
    push = run_cli("renacer_main", "push", "hello", "--db", str(db), "--to", chdb, "-q")
    assert push.returncode == 0, push.stderr
    job = f"127.0.0.1:{HELLO_PORT}"
    remote = _ranks(f"{chdb}/{job}")
    assert [(r["rank"], r["local_rank"], r["world_size"], r["source"], r["job_id"], r["host"])
            for r in local["ranks"]] == [(k, k, 3, "hello", job, socket.gethostname())
                                         for k in range(3)]
    assert [{k: r[k] for k in local["ranks"][0]} for r in remote["ranks"]] == local["ranks"]
    for k in SAME_KEYS:
        assert remote[k] == local[k], k
    assert remote["desync"]["step"] == 4 and remote["stragglers"] == local["stragglers"]
    # the hello's job id comes before NCCL's: no process is the communicator's job
    r = run_cli("renacer_main", "ranks", f"{chdb}/nccl:{comm_id}")
    assert r.returncode == 2 and f"no job 'nccl:{comm_id}'" in r.stderr, r.stderr
