"""renacer ranks across hosts: a real torchrun job (gloo, 3 ranks) traced by renacerd, its
store split by rank into two hosts' stores (host-a: ranks 0 and 1 and the launcher, host-b:
rank 2, its monotonic clock moved ahead), both pushed to the ClickHouse server of
scripts/clickhouse.sh; `renacer ranks clickhouse://.../DB/JOB` must give what the local path
gives on the whole store."""

from __future__ import annotations

import re
import shutil
import sqlite3
import uuid
from types import SimpleNamespace

import orjson
import pytest

from renacerd.client.dist_env import DistInfo
from renacerd.columns import SYSCALL_COLUMNS, decode, encode
from renacerd.cuda.records import GPU_LAYOUT
from renacerd.io import clickhouse_ranks as chr_
from renacerd.io.clickhouse_ranks import INIT_FN
from renacerd.reports.rank_labels import label
from renacerd.sinks import SinkError
from renacerd.sinks import clickhouse as ch_sink
from renacerd.sinks.clickhouse import (
    ADDED_COLUMNS,
    SCHEMA,
    ClickHouseClient,
    ClickHouseSink,
    ensure_schema,
    parse_url,
)
from renacerd.store.database import DIST_COLUMNS
from renacerd.trace.unified_trace import ProcessSpan
from tests.conftest import needs_root, run_cli
from tests.e2e import test_clickhouse as ch
from tests.e2e.test_ranks_torchrun import FSYNC, MIN_LATE, READ, SLEEP, _port, _trace
from tests.unit.test_ranks_units import _gpu_init

HOSTS = {"host-a": (0, 1), "host-b": (2,)}
# host-b's clock runs this far ahead of host-a's (ns): what its clock offset must come to
SHIFT_NS = 1_000_250_000_000
# Ranks leave a gloo collective together, on one machine within a few ms even on a loaded
# 2-CPU host (the last to see the result is scheduled late); the offset is a median over
# about 40 collectives, so it is within this of the shift.
OFFSET_TOL_MS = 20.0
SAME_KEYS = ("steps", "stragglers", "slow_steps", "desync", "waiting")


server = ch.server  # the loopback server fixture (scripts/clickhouse.sh), one definition


@pytest.fixture(scope="module")
def chdb(server):
    """A database of this module's own, dropped afterwards: its URL."""
    name = "renacer_ranks_" + uuid.uuid4().hex[:10]
    url = f"clickhouse://{server}/{name}"
    yield url
    if ch._ping():
        ClickHouseClient(parse_url(url)).query(f"DROP DATABASE IF EXISTS {name}", database=False)


def _shift(db: sqlite3.Connection, ns: int) -> None:
    """Move every monotonic time of a store by ns (its host's clock started earlier)."""
    db.execute("UPDATE runs SET start_mono_ns = start_mono_ns + ?, "
               "end_mono_ns = end_mono_ns + ?", (ns, ns))
    db.execute("UPDATE processes SET start_mono_ns = start_mono_ns + ?, "
               "end_mono_ns = end_mono_ns + ?", (ns, ns))
    db.execute("UPDATE spans SET start_mono_nanos = start_mono_nanos + ?, "
               "end_mono_nanos = end_mono_nanos + ?", (ns, ns))
    for cid, layer, blob in db.execute("SELECT id, layer, data FROM chunks").fetchall():
        layout = GPU_LAYOUT if layer == "gpu" else SYSCALL_COLUMNS
        cols = decode(blob, layout)
        cols["ts"] = cols["ts"] + ns
        db.execute("UPDATE chunks SET data = ?, first_ts = first_ts + ?, last_ts = last_ts + ? "
                   "WHERE id = ?", (encode(cols, layout), ns, ns, cid))


def _split(src, dst, host: str, ranks: tuple[int, ...], keep_unranked: bool, shift: int):
    """A copy of the store holding only the processes of `ranks` (and, with keep_unranked,
    those with no rank), as recorded on `host`."""
    shutil.copy(src, dst)
    db = sqlite3.connect(dst)
    marks = ",".join("?" * len(ranks))
    cond = f"rank IN ({marks})" + (" OR rank IS NULL" if keep_unranked else "")
    drop = db.execute(f"SELECT id, pid FROM processes WHERE NOT ({cond})", ranks).fetchall()
    for proc_id, pid in drop:
        db.execute("DELETE FROM chunks WHERE proc_id = ?", (proc_id,))
        db.execute("DELETE FROM spans WHERE proc_id = ? OR process_id = ?", (proc_id, pid))
        db.execute("DELETE FROM processes WHERE id = ?", (proc_id,))
    db.execute("UPDATE runs SET host = ?", (host,))
    db.execute("UPDATE processes SET rank_host = ? WHERE rank IS NOT NULL", (host,))
    if shift:
        _shift(db, shift)
    db.commit()
    db.close()


def _ranks(*args: str) -> dict:
    r = run_cli("renacer_main", "ranks", *args, "--json", "--min-late-ms", MIN_LATE,
                timeout=300)
    assert r.returncode == 0, r.stderr
    return orjson.loads(r.stdout)


def _two_hosts(tmp, chdb: str, run: str, *job_args: str, ok: bool = True):
    """Trace the job, split it over two hosts, push both; (local report, job id)."""
    db, port = tmp / "t.db", _port()
    r = _trace(db, run, *job_args, port=port)
    assert (r.returncode == 0) == ok, r.stderr
    local = _ranks(run, "--db", str(db))
    for i, (host, ranks) in enumerate(HOSTS.items()):
        part = tmp / f"{host}.db"
        _split(db, part, host, ranks, i == 0, SHIFT_NS * i)
        push = run_cli("renacer_main", "push", run, "--db", str(part), "--to", chdb, "-q")
        assert push.returncode == 0, push.stderr
    return local, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def late(tmp_path_factory, chdb):
    d = tmp_path_factory.mktemp("late")
    fifo, ckpt = d / "slow.fifo", d / "ckpt-0.bin"
    local, job = _two_hosts(d, chdb, "late", "--steps", "20", "--late", f"{SLEEP}:2:sleep:400",
                            "--late", f"{READ}:1:read:{fifo}", "--late",
                            f"{FSYNC}:0:fsync:{ckpt}")
    url = f"{chdb}/{job}"
    return local, _ranks(url), url, fifo, ckpt, d


@needs_root
def test_the_job_is_joined_across_hosts(late):
    local, remote, url, _, _, _ = late
    assert [(r["rank"], r["host"], r["run_host"], r["run"]) for r in remote["ranks"]] == [
        (0, "host-a", "host-a", "late"), (1, "host-a", "host-a", "late"),
        (2, "host-b", "host-b", "late")]
    keys = ("rank", "local_rank", "world_size", "pid", "job_id", "source", "steps")
    assert [{k: r[k] for k in keys} for r in remote["ranks"]] == [
        {k: r[k] for k in keys} for r in local["ranks"]]
    assert (remote["run"], remote["status"]) == (local["ranks"][0]["job_id"], "complete")
    assert sorted((r["host"], r["run"]) for r in remote["runs"]) == [
        ("host-a", "late"), ("host-b", "late")]


@needs_root
def test_same_answer_as_the_local_path(late):
    local, remote, _, fifo, ckpt, _ = late
    # exact: the same step spans, the same calls, the same files, summed the same way
    for k in SAME_KEYS:
        assert remote[k] == local[k], k
    by_step = {s["step"]: s["straggler"] for s in remote["steps"]}
    assert [by_step[s]["rank"] for s in (SLEEP, READ, FSYNC)] == [2, 1, 0]
    assert [(c["syscall"], c["path"]) for c in (by_step[s]["causes"][0] for s in (
        SLEEP, READ, FSYNC))] == [("clock_nanosleep", None), ("read", str(fifo)),
                                  ("fsync", str(ckpt))]
    assert [s["step"] for s in remote["steps"] if s["straggler"]] == [SLEEP, READ, FSYNC]


@needs_root
def test_clock_offsets_from_collective_exits(late):
    _, remote, url, _, _, _ = late
    a, b = remote["clock_offsets"]
    assert (a["host"], a["offset_ms"], a["reference"]) == ("host-a", 0.0, True)
    assert (b["host"], b["reference"]) == ("host-b", False)
    # two barriers and two all_reduce calls per step, 20 steps: each seen on both hosts
    assert a["collectives"] == b["collectives"] == 42
    assert abs(b["offset_ms"] - SHIFT_NS / 1e6) <= OFFSET_TOL_MS
    text = run_cli("renacer_main", "ranks", url, "--min-late-ms", MIN_LATE)
    assert text.returncode == 0, text.stderr
    assert "  host host-a: reference clock (from 42 collective exits)\n" in text.stdout
    assert f"  host host-b: clock +{b['offset_ms']:.3f} ms (from 42 " in text.stdout
    line = next(ln for ln in text.stdout.splitlines() if ln.split()[:1] == [str(SLEEP)])
    assert "rank 2 late " in line and "clock_nanosleep" in line


class _Restarting(ClickHouseSink):
    """A sink that forgets every process's fd table before each batch, as one restarted
    between any two batches does: it must replay the chunks already sent."""

    def _files(self, store, info, procs, batch):
        self._fds.clear()
        return super()._files(store, info, procs, batch)


@needs_root
def test_a_restarted_sink_names_the_same_files(late, server):
    _, _, url, fifo, _, d = late
    chdb = url.rsplit("/", 1)[0]
    again = f"clickhouse://{server}/renacer_restart_" + uuid.uuid4().hex[:10]
    part = d / "restart.db"
    shutil.copy(d / "host-a.db", part)
    sink = _Restarting(str(part), again, "late", batch_rows=5000)
    try:
        stats = sink.flush_now()
    finally:
        sink._store.close()
    sql = ("SELECT pid, ts, chunk, dup, file FROM events WHERE host = 'host-a' "
           "ORDER BY pid, ts, chunk, dup FORMAT TSV")
    try:
        assert stats.batches > 10
        want = ClickHouseClient(parse_url(chdb)).query(sql)
        assert ClickHouseClient(parse_url(again)).query(sql) == want
        assert f"\t{fifo}\n".encode() in want
    finally:
        ClickHouseClient(parse_url(again)).query(
            f"DROP DATABASE IF EXISTS {parse_url(again).database}", database=False)


@needs_root
def test_desync_across_hosts(tmp_path, chdb):
    # rank 1 (host-a) calls a 5-element all_reduce at step 7 where the others call 1
    local, job = _two_hosts(tmp_path, chdb, "desync", "--steps", "20", "--desync", "7:1:5",
                            "--timeout", "3", ok=False)
    remote = _ranks(f"{chdb}/{job}")
    assert (local["desync"]["step"], local["desync"]["position"]) == (7, 1)
    for k in SAME_KEYS:
        assert remote[k] == local[k], k


@needs_root
def test_bad_url_or_unknown_job_exit_2(chdb, late):
    ensure_schema(ClickHouseClient(parse_url(chdb)))
    for url in (chdb, f"{chdb}/no-such-job", "clickhouse:///db/job", f"{chdb}/a/b",
                "clickhouse://127.0.0.1:1/db/job"):
        r = run_cli("renacer_main", "ranks", url)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (url, r.stderr)
    r = run_cli("renacer_main", "ranks", f"{chdb}/no-such-job")
    assert "no job 'no-such-job'" in r.stderr


def test_an_older_database_gains_the_rank_columns(server):
    name = "renacer_old_" + uuid.uuid4().hex[:10]
    c = ClickHouseClient(parse_url(f"clickhouse://{server}/{name}"))
    c.query(f"CREATE DATABASE {name}", database=False)
    try:
        for ddl in SCHEMA:  # the tables as the schema before ranks made them
            ddl = re.sub(r",\s*rank Nullable.*?rank_source Nullable\(String\)", "",
                         ddl.replace(", file String", ""), flags=re.S)
            c.query(ddl)
        assert "rank" not in _cols(c, "processes") and "file" not in _cols(c, "events")
        ensure_schema(c)
        ensure_schema(c)  # twice: nothing to add the second time
        assert _cols(c, "processes")[-8:] == [
            "rank", "local_rank", "world_size", "group_rank", "local_world_size", "job_id",
            "rank_host", "rank_source"]
        assert _cols(c, "events")[-1] == "file"
    finally:
        c.query(f"DROP DATABASE IF EXISTS {name}", database=False)


def _cols(c: ClickHouseClient, table: str) -> list[str]:
    return [r["name"] for r in c.rows(
        f"SELECT name FROM system.columns WHERE database = currentDatabase() "
        f"AND table = '{table}'")]


_J = {"renacer.job_id": "j"}
# pid -> (its exec-time environment's rank, its spans' resources by start, its first NCCL
# init (rank, nranks)): each field of the label from the first source that has it
LABELS = {
    1: (DistInfo(rank=0, world_size=4, host="h"), [{}, {"renacer.rank": 5, **_J}], (7, 16)),
    2: (None, [{"renacer.rank": 1, "renacer.local_rank": 1, "renacer.world_size": 4,
                "renacer.host": "hh", **_J}], (9, 16)),
    3: (None, [{"renacer.rank": 2, "renacer.job_id": None, "renacer.host": None}], (2, 16)),
    4: (None, [{"service.name": "s"}], (3, 16)),
    5: (DistInfo(rank=3, world_size=4, job_id="j"), [{"renacer.rank": 6, "renacer.job_id": "k"}],
        None),
    6: (None, [{"renacer.rank": 4, **_J}, {"renacer.rank": 8, "renacer.job_id": "k"}], None),
    7: (None, [{"renacer.group_rank": None, "renacer.host": None}], None),
    8: (DistInfo(job_id="j"), [{"renacer.rank": 5, "renacer.group_rank": 1}], None),
}
NCCL_ID = "nccl:0102030405060708090a0b0c0d0e0f10"  # _gpu_init's communicator


def _push_labels(c: ClickHouseClient) -> None:
    """LABELS as the sink pushes them: processes' rank columns, spans' resources (the later
    span first, store row order not start order), the NCCL inits of gpu_calls."""
    ps = list(LABELS.items())
    cols = [("run", "String", ["r"] * len(ps)), ("host", "String", ["a"] * len(ps)),
            ("pid", "UInt32", [p for p, _ in ps]), ("proc", "UInt32", [p for p, _ in ps])]
    types = dict(ADDED_COLUMNS["processes"])
    for name in DIST_COLUMNS:  # as the sink's _send_processes names them
        key = {"rank_host": "host", "rank_source": "source"}.get(name, name)
        cols.append((name, types[name], [e and getattr(e, key) for _, (e, _, _) in ps]))
    c.insert("processes", cols, len(ps))
    spans = [(p, i, orjson.dumps(r).decode()) for p, (_, rs, _) in ps for i, r in enumerate(rs)]
    spans.reverse()
    kv = [ch_sink._kv(r) for _, _, r in spans]
    c.insert("spans", [
        ("run", "String", ["r"] * len(spans)), ("host", "String", ["a"] * len(spans)),
        ("process_id", "UInt32", [p for p, _, _ in spans]),
        ("start_mono_nanos", "Int64", [100 + i for _, i, _ in spans]),
        ("store_rowid", "UInt64", list(range(len(spans)))),
        ("span_id", "String", [f"{p}.{i}" for p, i, _ in spans]),
        ("resource_json", "String", [r for _, _, r in spans]),
        ("resource.key", "Array(String)", [k for k, _ in kv]),
        ("resource.value", "Array(String)", [v for _, v in kv])], len(spans))
    inits = [(p, n) for p, (_, _, n) in ps if n]
    c.insert("gpu_calls", [
        ("run", "String", ["r"] * len(inits)), ("host", "String", ["a"] * len(inits)),
        ("pid", "UInt32", [p for p, _ in inits]), ("fn", "String", [INIT_FN] * len(inits)),
        ("a1", "UInt64", [n[1] for _, n in inits]), ("a2", "UInt64", [n[0] for _, n in inits]),
        ("a3", "UInt64", [0x0807060504030201] * len(inits)),
        ("a4", "UInt64", [0x100F0E0D0C0B0A09] * len(inits))], len(inits))


def test_ranks_labelled_as_locally(server):
    """The job's members: each field from the environment, else the hello (the first span
    that carries one), else NCCL, as reports.rank_labels.label gives them."""
    name = "renacer_labels_" + uuid.uuid4().hex[:10]
    c = ClickHouseClient(parse_url(f"clickhouse://{server}/{name}"))
    ensure_schema(c)
    procs = [ProcessSpan(pid=p, dist=e) for p, (e, _, _) in LABELS.items()]
    spans = [SimpleNamespace(process_id=p, resource_json=orjson.dumps(r).decode())
             for p, (_, rs, _) in LABELS.items() for r in rs]
    label(procs, spans, {p: _gpu_init(*n) for p, (_, _, n) in LABELS.items() if n})
    try:
        _push_labels(c)
        for job in ("j", NCCL_ID):
            want = sorted((p.dist.to_dict() | {"pid": p.pid} for p in procs
                           if p.dist and p.dist.job_id == job and p.dist.rank is not None),
                          key=lambda x: (x["rank"], x["pid"]))
            got = [{"rank": r["rank"], "local_rank": r["local_rank"],
                    "world_size": r["world_size"], "group_rank": r["group_rank"],
                    "local_world_size": r["local_world_size"], "job_id": r["job_id"],
                    "host": r["rank_host"], "source": r["rank_source"], "pid": r["pid"]}
                   for r in chr_._members(c, job, name)]
            assert got == want, job
        assert [x["pid"] for x in want] == [3, 4]  # the hello's rank, NCCL's job
        with pytest.raises(SinkError, match="no job 'k'"):
            chr_._members(c, "k", name)
    finally:
        c.query(f"DROP DATABASE IF EXISTS {name}", database=False)
