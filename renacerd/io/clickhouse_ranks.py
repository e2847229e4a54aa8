"""`renacer ranks clickhouse://HOST:8123/DB/JOB`: the ranks report of a job whose runs several
hosts pushed, computed as SQL in ClickHouse.

The ranks are the processes of job JOB, on every host, labelled as reports.rank_labels
labels them (the environment's rank columns, else the client's hello from the spans'
resource attributes, else the first NCCL communicator init). Each query below runs on
the server and returns per-step per-rank rows (or per-host ones), never events: steps
(the outermost span of each step value), the collectives of each step (c10d spans, and the
NCCL calls of the GPU layer outside them), the time of each step's calls and of its GPU
synchronisation outside collectives on the step's thread, and, for the steps that have a
straggler only, their profile by syscall and file. The straggler, cause, slow-step and
desync logic is renacerd.reports.ranks's own, run on those rows. Ranks are aligned by step;
each host's clock offset from the first rank's host is the median difference of the exit
times of the same collective (group, seq), since ranks leave a collective together.

ClickHouse 18.16 has no ASOF or range JOIN: an event (or collective) finds its step by an
equi-join on a time bucket, each step listed under every bucket it overlaps, then the
exact interval test; the bucket is the median step length, so a step spans about two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from renacerd.client.dist_env import DistInfo
from renacerd.client.protocol import HELLO_DIST_INTS, HELLO_DIST_TEXT
from renacerd.cuda.hooks import COLLECTIVE, COMM_INIT, HOOKS, NCCL_DTYPES, SYNC
from renacerd.reports.desync import Collective, desync, waiting
from renacerd.reports.rank_labels import NCCL_JOB_PREFIX
from renacerd.reports.ranks import (
    WAIT_SYSCALLS,
    Profile,
    ProfileSource,
    RankSteps,
    rank_entry,
    steps_report,
)
from renacerd.sinks import SinkError
from renacerd.sinks.clickhouse import ClickHouseClient, parse_url, quote
from renacerd.syscall_table import syscall_table
from renacerd.trace.gpu_trace import CommInit, comm_group, comm_id_hex

_C10D = "experiment.metrics.c10d."
NCCL_FNS = tuple(h.symbol for h in HOOKS if h.kind == COLLECTIVE)
SYNC_FNS = tuple(h.symbol for h in HOOKS if h.kind == SYNC)
INIT_FN = next(h.symbol for h in HOOKS if h.kind == COMM_INIT)
# an NCCL call's dtype by name, as reports.desync names it
_DTYPE = (f"transform(a1, [{', '.join(f'toUInt64({k})' for k in NCCL_DTYPES)}], "
          f"[{', '.join(quote(v[0]) for v in NCCL_DTYPES.values())}], "
          "concat('dtype', toString(a1)))")
_MIN_BUCKET_NS = 1_000_000
# what a collective read back for reports.desync carries (coll_sql's columns)
_ROW_COLS = ("run, host, pid, cs, ce, op, numel, dtype, span_name, status_code, status_message, "
             "attributes_json, nccl, comm, comm_lo, comm_hi, has_init")


def _attr_num(key: str) -> str:
    """A c10d metric attribute as Int64 (-1: absent), as reports.desync reads it."""
    k = quote(_C10D + key)
    return (f"if(indexOf(attributes.key, {k}) = 0, toInt64(-1), "
            f"toInt64(toFloat64OrZero(attributes.value[indexOf(attributes.key, {k})])))")


class JobQuery:
    """The SQL of one job: its rank processes (run, host, pid) and the step bucket width."""

    def __init__(self, client: ClickHouseClient, members: list[tuple[str, str, int]]) -> None:
        self.client = client
        self.members = members
        self.bucket_ns = _MIN_BUCKET_NS

    @property
    def sel(self) -> str:
        """The rank processes, as a condition on (run, host, pid)."""
        return ", ".join(f"({quote(r)}, {quote(h)}, {p})" for r, h, p in self.members)

    def steps_sql(self, extra: str = "") -> str:
        """One row per (process, step): the longest span of that step value (nested spans
        of one step: the outermost is the step), collectives' spans excluded."""
        return (
            "SELECT run, host, process_id AS pid, assumeNotNull(step) AS step, "
            "argMax(start_mono_nanos, end_mono_nanos - start_mono_nanos) AS s, "
            "argMax(end_mono_nanos, end_mono_nanos - start_mono_nanos) AS e, "
            "argMax(thread_id, end_mono_nanos - start_mono_nanos) AS tid "
            f"FROM spans FINAL WHERE (run, host, process_id) IN ({self.sel}) "
            "AND step IS NOT NULL AND NOT startsWith(span_name, 'c10d.') "
            f"AND end_mono_nanos >= start_mono_nanos {extra} GROUP BY run, host, pid, step")

    def _buckets(self, lo: str, hi: str) -> str:
        b = self.bucket_ns
        return (f"intDiv({lo}, {b}) + arrayJoin(range(toUInt64(intDiv({hi}, {b}) - "
                f"intDiv({lo}, {b}) + 1))) AS b")

    def step_buckets(self, extra: str = "") -> str:
        """Each step under every time bucket it overlaps."""
        return (f"SELECT run, host, pid, tid, step, s, e, {self._buckets('s', 'e')} "
                f"FROM ({self.steps_sql(extra)})")

    def c10d_sql(self, extra: str = "") -> str:
        """The c10d spans of the ranks: one row per collective call."""
        return (
            "SELECT run, host, process_id AS pid, start_mono_nanos AS cs, "
            "end_mono_nanos AS ce, substring(span_name, 6) AS op, "
            f"{_attr_num('numel')} AS numel, model AS dtype, {_attr_num('group')} AS grp, "
            f"{_attr_num('seq')} AS seq, span_name, status_code, status_message, "
            "attributes_json, toUInt8(0) AS nccl, toUInt64(0) AS comm, toUInt64(0) AS comm_lo, "
            "toUInt64(0) AS comm_hi, toUInt8(0) AS has_init FROM spans FINAL "
            f"WHERE (run, host, process_id) IN ({self.sel}) "
            f"AND startsWith(span_name, 'c10d.') {extra}")

    def gpu_sql(self, fns: tuple[str, ...], cols: str) -> str:
        """The ranks' GPU calls of the given hook symbols."""
        return (f"SELECT run, host, pid, {cols} FROM gpu_calls WHERE (run, host, pid) IN "
                f"({self.sel}) AND fn IN ({', '.join(map(quote, fns))})")

    def nccl_sql(self) -> str:
        """The ranks' NCCL calls that start outside every c10d span of their process (inside
        one, the span is the collective), with their communicator's id from its init (the
        latest init of that ncclComm_t, as reports.desync reads it): `grp` a hash of the id
        that is equal where the ids are (-1: no init seen), `seq` 0 (nccl_seqs numbers the
        calls asked for)."""
        b = self.bucket_ns
        cover = (f"SELECT run, host, pid, b, groupArray((cs, ce)) AS cov FROM (SELECT run, "
                 f"host, pid, cs, ce, {self._buckets('cs', 'ce')} FROM ({self.c10d_sql()})) "
                 "GROUP BY run, host, pid, b")
        calls = self.gpu_sql(NCCL_FNS, f"ts, dur, ret, fn, a0, a1, a3 AS comm, intDiv(ts, {b}) "
                             "AS b")
        inits = (f"SELECT run, host, pid, a0 AS comm, argMax(a3, ts) AS comm_lo, "
                 "argMax(a4, ts) AS comm_hi, toUInt8(1) AS has_init FROM "
                 f"({self.gpu_sql((INIT_FN,), 'ts, ret, a0, a3, a4')}) WHERE ret = 0 "
                 "GROUP BY run, host, pid, comm")
        uncovered = (f"SELECT * FROM ({calls}) ANY LEFT JOIN ({cover}) USING (run, host, pid, b)")
        joined = (f"SELECT * FROM (SELECT * FROM ({uncovered}) WHERE NOT arrayExists(c -> ts >= "
                  "tupleElement(c, 1) AND ts < tupleElement(c, 2), cov)) "
                  f"ANY LEFT JOIN ({inits}) USING (run, host, pid, comm)")
        return (
            "SELECT run, host, pid, ts AS cs, toInt64(ts + dur) AS ce, fn AS op, "
            f"toInt64(a0) AS numel, {_DTYPE} AS dtype, if(has_init, "
            "toInt64(cityHash64(comm_lo, comm_hi)), toInt64(-1)) AS grp, toInt64(0) AS seq, "
            "fn AS span_name, toUInt8(if(ret != 0, 2, 0)) AS status_code, if(ret != 0, "
            "concat(fn, ' returned ncclResult_t ', toString(ret)), '') AS status_message, "
            "'' AS attributes_json, toUInt8(1) AS nccl, comm, comm_lo, comm_hi, has_init "
            f"FROM ({joined})")

    def coll_sql(self) -> str:
        """Every collective call of the ranks: c10d spans and the NCCL calls outside them."""
        return f"SELECT * FROM ({self.c10d_sql()}) UNION ALL {self.nccl_sql()}"

    def coll_in_steps(self, cols: str, extra: str = "") -> str:
        """Collectives joined to the step they start in (a step of their process)."""
        return (
            f"SELECT {cols} FROM (SELECT *, intDiv(cs, {self.bucket_ns}) AS b "
            f"FROM ({self.coll_sql()})) ALL INNER JOIN ({self.step_buckets(extra)}) "
            "USING (run, host, pid, b) WHERE cs >= s AND cs < e")

    def step_windows(self, extra: str = "") -> str:
        """Each step with the collectives of its process that overlap it (`cw`: (start, end)
        pairs), under every bucket it overlaps."""
        colls = (
            "SELECT run, host, pid, step, groupUniqArray((cs, ce)) AS cw FROM (SELECT run, "
            f"host, pid, cs, ce, {self._buckets('cs', 'ce')} FROM ({self.coll_sql()})) "
            f"ALL INNER JOIN ({self.step_buckets(extra)}) USING (run, host, pid, b) "
            "WHERE cs < e AND ce > s GROUP BY run, host, pid, step")
        return (
            f"SELECT pid, tid, step, s, e, cw, "
            f"{self._buckets('s', 'e')} FROM (SELECT * FROM ({self.steps_sql(extra)}) "
            f"ANY LEFT JOIN ({colls}) USING (run, host, pid, step))")

    def hosts(self) -> list[JobQuery]:
        """One query per (run, host) of the members, for events_in_steps."""
        out: dict[tuple[str, str], list[tuple[str, str, int]]] = {}
        for m in self.members:
            out.setdefault(m[:2], []).append(m)
        qs = [JobQuery(self.client, ms) for ms in out.values()]
        for q in qs:
            q.bucket_ns = self.bucket_ns
        return qs

    def events_in_steps(self, cols: str, used: str, group: str, extra: str = "",
                        windows: list[tuple[int, int]] | None = None,
                        table: str = "events", cond: str = "") -> str:
        """The calls of one host's ranks (a query of hosts()) in a step, on its thread,
        outside every collective of their process (the collective's own time is counted
        apart); `used`: the event columns `cols` reads. One (run, host) per query: the
        events are read by their primary key's prefix and joined on numbers alone (pid,
        tid, bucket); hashing run and host per event would cost more than the rest.
        `windows`: [start, end) times outside which no step asked for lies (a PREWHERE:
        the other columns are read only where it holds). `table` gpu_calls (and `cond` on
        its rows): the GPU calls instead, the same way."""
        run, host = self.members[0][:2]
        pids = ", ".join(str(m[2]) for m in self.members)
        b = self.bucket_ns
        pre = ""
        if windows:
            bs = sorted({x for lo, hi in windows for x in range(lo // b, hi // b + 1)})
            pre = f"PREWHERE intDiv(ts, {b}) IN ({', '.join(map(str, bs))}) "
        return (
            f"SELECT {cols} FROM (SELECT pid, tid, ts, {used}, intDiv(ts, {b}) AS b "
            f"FROM {table} {pre}WHERE run = {quote(run)} AND host = {quote(host)} "
            f"AND pid IN ({pids}) {cond}) "
            f"ALL INNER JOIN ({self.step_windows(extra)}) USING (pid, tid, b) "
            "WHERE ts >= s AND ts < e AND NOT arrayExists("
            "c -> ts >= tupleElement(c, 1) AND ts < tupleElement(c, 2), cw) "
            f"GROUP BY {group}")


def _hello_sql() -> str:
    """Per (run, host, pid): the rank its client's hello gave, as rank_labels.hello_ranks
    reads it: the renacer.* resource attributes of its first span (by start, then store
    row) that carries one of them not null (`h_` columns, `has_hello` 1)."""
    def raw(k: str, col: str = "resource_json") -> str:
        return f"visitParamExtractRaw({col}, {quote('renacer.' + k)})"

    keys = HELLO_DIST_INTS + HELLO_DIST_TEXT
    carries = " OR ".join(f"{raw(k)} NOT IN ('', 'null')" for k in keys)
    named = ", ".join(quote("renacer." + k) for k in keys)
    # no FINAL: a span pushed twice is the same row twice (its resource, start and store
    # row), which argMin reads the same; the PREWHERE reads the keys alone of most spans
    first = ("SELECT run, host, process_id AS pid, argMin(resource_json, (start_mono_nanos, "
             "store_rowid)) AS res, argMin(resource.key, (start_mono_nanos, store_rowid)) AS "
             "ks, argMin(resource.value, (start_mono_nanos, store_rowid)) AS vs FROM spans "
             f"PREWHERE hasAny(resource.key, [{named}]) WHERE {carries} "
             "GROUP BY run, host, pid")
    # a text's value from the pushed pairs (the sink's own string, unescaped); JSON null
    # there reads "null", so its null-ness is the JSON's
    cols = [f"toUInt32OrNull({raw(k, 'res')}) AS h_{k}" for k in HELLO_DIST_INTS]
    cols += [f"if({raw(k, 'res')} IN ('', 'null'), NULL, vs[indexOf(ks, "
             f"{quote('renacer.' + k)})]) AS h_{k}" for k in HELLO_DIST_TEXT]
    return f"SELECT run, host, pid, toUInt8(1) AS has_hello, {', '.join(cols)} FROM ({first})"


def _nccl_first_sql() -> str:
    """Per (run, host, pid): its first successful ncclCommInitRank, as rank_labels.nccl_rank
    reads it: rank, nranks and the communicator id's words (`n_` columns, `has_nccl` 1)."""
    return ("SELECT run, host, pid, toUInt8(1) AS has_nccl, "
            "toNullable(toUInt32(argMin(a2, ts))) AS n_rank, "
            "toNullable(toUInt32(argMin(a1, ts))) AS n_world_size, argMin(a3, ts) AS n_lo, "
            f"argMin(a4, ts) AS n_hi FROM gpu_calls WHERE fn = {quote(INIT_FN)} AND ret = 0 "
            "GROUP BY run, host, pid")


def _nccl_words(job: str) -> tuple[int, int] | None:
    """The communicator id words an "nccl:" + hex job id names (None: no such job id)."""
    if not job.startswith(NCCL_JOB_PREFIX):
        return None
    try:
        raw = bytes.fromhex(job[len(NCCL_JOB_PREFIX):])
    except ValueError:
        return None
    if len(raw) != 16:
        return None
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def _members(client: ClickHouseClient, job: str, key: str) -> list[dict[str, Any]]:
    """The job's rank processes, labelled as reports.rank_labels labels them: each field
    from the exec-time environment (`processes`), else the client's hello (`spans`), else
    the first NCCL communicator init (`gpu_calls`); the job id likewise, an NCCL one
    "nccl:" + the communicator id's hex."""
    words = _nccl_words(job)
    nccl_job = f"n_lo = {words[0]} AND n_hi = {words[1]}" if words else "0"
    env = ("SELECT run, host, pid, rank AS e_rank, local_rank AS e_local_rank, world_size AS "
           "e_world_size, group_rank AS e_group_rank, local_world_size AS e_local_world_size, "
           "job_id AS e_job_id, rank_host AS e_host, rank_source AS e_source "
           "FROM processes FINAL")
    labelled = (f"SELECT * FROM (SELECT * FROM ({env}) ANY LEFT JOIN ({_hello_sql()}) "
                f"USING (run, host, pid)) ANY LEFT JOIN ({_nccl_first_sql()}) "
                "USING (run, host, pid)")
    rows = client.rows(
        "SELECT run, host, pid, coalesce(e_rank, h_rank, n_rank) AS rank, "
        "coalesce(e_local_rank, h_local_rank) AS local_rank, "
        "coalesce(e_world_size, h_world_size, n_world_size) AS world_size, "
        "coalesce(e_group_rank, h_group_rank) AS group_rank, "
        "coalesce(e_local_world_size, h_local_world_size) AS local_world_size, "
        "coalesce(e_host, h_host) AS rank_host, multiIf(e_source IS NOT NULL, e_source, "
        "has_hello = 1, 'hello', 'nccl') AS rank_source "
        f"FROM ({labelled}) WHERE multiIf(e_job_id IS NOT NULL, e_job_id = {quote(job)}, "
        f"h_job_id IS NOT NULL, h_job_id = {quote(job)}, has_nccl = 1 AND {nccl_job}) "
        "AND rank IS NOT NULL ORDER BY rank, host, run, pid")
    if not rows:
        raise SinkError(f"no job {job!r} in {key}: no pushed process has that job id")
    return [{**r, "job_id": job} for r in rows]


def _grid(rows: dict[str, Any], cols: list[str], run: str | None = None,
          host: str | None = None) -> dict[tuple, tuple]:
    """(run, host, pid, step) -> the values of `cols` of a per-step result (run and host
    given for a result of one host's query)."""
    out = {}
    for i in range(len(rows.get("step", []))):
        k = (run if run is not None else _txt(rows["run"][i]),
             host if host is not None else _txt(rows["host"][i]),
             int(rows["pid"][i]), int(rows["step"][i]))
        out[k] = tuple(rows[c][i] for c in cols)
    return out


def _txt(v: Any) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v


def _choose(members: list[dict[str, Any]], st: dict[str, Any]) -> list[dict[str, Any]]:
    """One process per rank, by rank: a wrapper (sh -c) and its python share a rank, the
    one with more steps is the rank."""
    nsteps: dict[tuple[str, str, int], int] = {}
    for r, h, p in zip(st.get("run", []), st.get("host", []), st.get("pid", np.empty(0))):
        key = (_txt(r), _txt(h), int(p))
        nsteps[key] = nsteps.get(key, 0) + 1
    chosen: dict[int, dict[str, Any]] = {}
    for m in members:
        n = nsteps.get((m["run"], m["host"], m["pid"]), 0)
        old = chosen.get(m["rank"])
        if n and (old is None or n > nsteps[(old["run"], old["host"], old["pid"])]):
            chosen[m["rank"]] = m
    return [chosen[r] for r in sorted(chosen)]


def _base(client: ClickHouseClient, job: str, key: str, min_late_ms: float,
          members: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's head: the job, its runs (run, host, status) and their status."""
    pairs = ", ".join(sorted({f"({quote(m['run'])}, {quote(m['host'])})" for m in members}))
    runs = client.rows(
        f"SELECT run, host, status FROM runs FINAL WHERE (run, host) IN ({pairs}) "
        "ORDER BY host, run")
    statuses = sorted({r["status"] for r in runs})
    return {"run": job, "job": job, "source": key, "min_late_ms": min_late_ms,
            "status": "/".join(statuses), "runs": runs}


def _collective_steps(q: JobQuery) -> dict[tuple, tuple]:
    """Per (run, host, pid, step): collective ns, calls, ops, and the signature hash of the
    step's (op, numel, dtype, group) sequence in order of entry."""
    coll = q.client.native(q.coll_in_steps(
        "run, host, pid, step, sum(ce - cs) AS coll_ns, count() AS ncoll, groupArray(op) AS ops, "
        "cityHash64(arrayMap(x -> tupleElement(x, 2), arraySort(groupArray((cs, "
        "cityHash64(op, numel, dtype, grp)))))) AS sig") + " GROUP BY run, host, pid, step")
    coll["ops"] = [[_txt(o) for o in ops] for ops in coll.get("ops", [])]
    return _grid(coll, ["coll_ns", "ncoll", "ops", "sig"])


def _call_steps(q: JobQuery, tables: dict[tuple[str, str], dict[int, str]]
                ) -> dict[tuple, tuple]:
    """Per (run, host, pid, step): ns of the calls outside collectives, and of the waiting
    ones among them; one query per (run, host)."""
    out: dict[tuple, tuple] = {}
    for qh in q.hosts():
        run, host = qh.members[0][:2]
        waits = ", ".join(str(nr) for nr, name in tables[(run, host)].items()
                          if name in WAIT_SYSCALLS) or "-1"
        ev = q.client.native(qh.events_in_steps(
            f"pid, step, sum(dur) AS sys_ns, sumIf(dur, nr IN ({waits})) AS wait_ns",
            "dur, nr", "pid, step"))
        out.update(_grid(ev, ["sys_ns", "wait_ns"], run, host))
    return out


def _sync_steps(q: JobQuery) -> dict[tuple, tuple]:
    """Per (run, host, pid, step): ns of the GPU synchronisation calls on the step's thread
    outside collectives (as reports.ranks counts gpu_sync_ns); one query per (run, host)."""
    out: dict[tuple, tuple] = {}
    syncs = ", ".join(map(quote, SYNC_FNS))
    for qh in q.hosts():
        run, host = qh.members[0][:2]
        rows = q.client.native(qh.events_in_steps(
            "pid, step, sum(dur) AS sync_ns", "dur", "pid, step", table="gpu_calls",
            cond=f"AND fn IN ({syncs})"))
        out.update(_grid(rows, ["sync_ns"], run, host))
    return out


def _comms(q: JobQuery) -> dict[tuple[str, str, int], list[CommInit]]:
    """(run, host, pid) -> the communicators it joined (successful NCCL inits), in order."""
    out: dict[tuple[str, str, int], list[CommInit]] = {m: [] for m in q.members}
    for r in q.client.rows(
            f"SELECT * FROM ({q.gpu_sql((INIT_FN,), 'ts, ret, a0, a1, a2, a3, a4')}) "
            "WHERE ret = 0 ORDER BY run, host, pid, ts"):
        # sh_nccl_init: a0 *comm, a1 nranks, a2 rank, a3/a4 the id's first 16 bytes
        out[(r["run"], r["host"], r["pid"])].append(CommInit(
            r["a0"], r["a2"], r["a1"], comm_id_hex(r["a3"], r["a4"]), r["ts"]))
    return out


@dataclass(slots=True)
class _Ranks:
    """The job's ranks as RankSteps, with what the report needs beside them."""

    ranks: list[RankSteps]
    starts: list[np.ndarray]  # per rank, its steps' start times
    ops: list[dict[int, dict[str, int]]]  # per rank: step -> {op: calls}
    sigs: list[dict[int, int]]  # per rank: step -> signature hash of its collectives


def _rank_steps(q: JobQuery, order: list[dict[str, Any]], st: dict[str, Any],
                cg: dict[tuple, tuple], eg: dict[tuple, tuple], sg: dict[tuple, tuple],
                comms: dict[tuple[str, str, int], list[CommInit]]) -> _Ranks:
    """RankSteps of each chosen rank process from the per-step rows (collectives, calls,
    GPU synchronisation) and its communicators."""
    idx = {k: i for i, k in enumerate(q.members)}
    rows_of: dict[int, list[int]] = {}
    for i, (r, h, p) in enumerate(zip(st["run"], st["host"], st["pid"].tolist())):
        j = idx.get((_txt(r), _txt(h), p))
        if j is not None:
            rows_of.setdefault(j, []).append(i)
    out = _Ranks([], [], [], [])
    for i, m in enumerate(order):
        rows = rows_of[i]
        steps = np.asarray(st["step"], dtype=np.int64)[rows]
        s = np.asarray(st["s"], dtype=np.int64)[rows]
        e = np.asarray(st["e"], dtype=np.int64)[rows]
        c = [cg.get((*q.members[i], k), (0, 0, [], None)) for k in steps.tolist()]
        v = [eg.get((*q.members[i], k), (0, 0)) for k in steps.tolist()]
        g = [sg.get((*q.members[i], k), (0,))[0] for k in steps.tolist()]
        dist = DistInfo(rank=m["rank"], local_rank=m["local_rank"], world_size=m["world_size"],
                        group_rank=m["group_rank"], local_world_size=m["local_world_size"],
                        job_id=m["job_id"], host=m["rank_host"] or m["host"],
                        source=m["rank_source"] or "env")
        none = np.empty(0, dtype=np.int64)
        out.ranks.append(RankSteps(
            rank=m["rank"], pid=m["pid"], dist=dist, steps=steps, step_ns=e - s,
            coll_ns=np.array([x[0] for x in c], dtype=np.int64),
            wait_sys_ns=np.array([x[1] for x in v], dtype=np.int64),
            gpu_sync_ns=np.array(g, dtype=np.int64),
            syscall_ns=np.array([x[0] for x in v], dtype=np.int64),
            ncoll=np.array([x[1] for x in c], dtype=np.int64),
            prof_step=none, prof_code=none, prof_ns=none, prof_calls=none,
            keys=[], collectives=[], comms=comms[q.members[i]]))
        out.starts.append(s)
        out.ops.append({k: _count(x[2]) for k, x in zip(steps.tolist(), c) if x[2]})
        out.sigs.append({k: int(x[3]) for k, x in zip(steps.tolist(), c) if x[3] is not None})
    return out


def _profiles(q: JobQuery, rk: _Ranks, tables: dict[tuple[str, str], dict[int, str]]
              ) -> ProfileSource:
    """The ProfileSource of a job in ClickHouse: per (syscall, file) time and calls of the
    steps asked for, one query per (run, host), reading only those steps' buckets."""
    idx = {k: i for i, k in enumerate(q.members)}

    def source(late: list[int]) -> dict[int, list[Profile]]:
        out: dict[int, list[Profile]] = {k: [{} for _ in rk.ranks] for k in late}
        want = set(late)
        for qh in q.hosts():
            run, host = qh.members[0][:2]
            table = tables[(run, host)]
            window: dict[int, tuple[int, int]] = {}  # step -> its span over the host's ranks
            for m in qh.members:
                i = idx[m]
                ends = rk.starts[i] + rk.ranks[i].step_ns
                for k, lo, hi in zip(rk.ranks[i].steps.tolist(), rk.starts[i].tolist(),
                                     ends.tolist()):
                    if k in want:
                        a, b = window.get(k, (lo, hi))
                        window[k] = (min(a, lo), max(b, hi))
            res = q.client.native(qh.events_in_steps(
                "pid, step, nr, file, sum(dur) AS ns, count() AS calls",
                "dur, nr, file", "pid, step, nr, file",
                f"AND step IN ({', '.join(map(str, late))})", sorted(window.values())))
            for j in range(len(res.get("step", []))):
                nr = int(res["nr"][j])
                key = (table.get(nr, f"syscall_{nr}"), _txt(res["file"][j]) or None)
                out[int(res["step"][j])][idx[(run, host, int(res["pid"][j]))]][key] = (
                    int(res["ns"][j]), int(res["calls"][j]))
        return out
    return source


def job_ranks_data(url: str, min_late_ms: float, timeout_s: float = 600.0) -> dict[str, Any]:
    """The `renacer ranks --json` contract for the job at `url`, plus `clock_offsets`."""
    t = parse_url(url, with_run=True)
    job = t.run or ""
    client = ClickHouseClient(t, timeout_s)
    members = _members(client, job, t.key)
    q = JobQuery(client, [(m["run"], m["host"], m["pid"]) for m in members])
    st = client.native(q.steps_sql() + " ORDER BY run, host, pid, s")
    order = _choose(members, st)
    base = _base(client, job, t.key, min_late_ms, members)
    if not order:
        return steps_report([], {**base, "ranks": [], "clock_offsets": []}, min_late_ms,
                            None, [], [], lambda s: {})
    q.members = [(m["run"], m["host"], m["pid"]) for m in order]
    durs = np.asarray(st["e"], dtype=np.int64) - np.asarray(st["s"], dtype=np.int64)
    q.bucket_ns = max(_MIN_BUCKET_NS, int(np.median(durs)))
    tables = _syscall_tables(client, q.members)
    rk = _rank_steps(q, order, st, _collective_steps(q), _call_steps(q, tables),
                     _sync_steps(q), _comms(q))
    base["ranks"] = [{**rank_entry(rs), "run": m["run"], "run_host": m["host"]}
                     for rs, m in zip(rk.ranks, order)]
    base["clock_offsets"] = _clock_offsets(q, order[0]["host"])
    by_rank = _collectives(q, rk.ranks, rk.sigs)
    return steps_report(rk.ranks, base, min_late_ms, desync(by_rank),
                        waiting(_failed(q, rk.ranks)), rk.ops, _profiles(q, rk, tables))


def _syscall_tables(client: ClickHouseClient, members: list[tuple[str, str, int]]
                    ) -> dict[tuple[str, str], dict[int, str]]:
    """(run, host) -> the syscall names its events were pushed with (the run's table, else
    this machine's, as the sink does)."""
    pairs = ", ".join(f"({quote(r)}, {quote(h)})" for r, h in {m[:2] for m in members})
    rows = client.rows("SELECT run, host, syscall_table.nr AS nr, syscall_table.name AS name "
                       f"FROM runs FINAL WHERE (run, host) IN ({pairs})")
    out = {(r["run"], r["host"]): dict(zip(r["nr"], r["name"])) for r in rows}
    for key in {m[:2] for m in members}:
        if not out.get(key):
            out[key] = syscall_table()
    return out


def _count(ops: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in ops:
        out[o] = out.get(o, 0) + 1
    return out


class _Span:
    """The fields of a c10d span that Collective.of reads."""

    __slots__ = ("span_name", "start_mono_nanos", "end_mono_nanos", "status_code",
                 "status_message")

    def __init__(self, r: dict[str, Any]) -> None:
        self.span_name = r["span_name"]
        self.start_mono_nanos = r["cs"]
        self.end_mono_nanos = r["ce"]
        self.status_code = r["status_code"]
        self.status_message = r["status_message"]


def _collective(r: dict[str, Any], step: int | None, seqs: dict[tuple, int]) -> Collective:
    """A row of coll_sql as reports.desync's Collective: a c10d span's, or an NCCL call's
    (named by its symbol, its group the communicator's, seq its number there)."""
    if not r["nccl"]:
        return Collective.of(_Span(r), orjson.loads(r["attributes_json"] or "{}"), step)
    group = comm_group(comm_id_hex(r["comm_lo"], r["comm_hi"])) if r["has_init"] else -1
    seq = seqs[(r["run"], r["host"], r["pid"], r["comm"], r["cs"])]
    return Collective(r["op"], r["numel"], r["dtype"], group, seq, step, r["cs"], r["ce"],
                      r["status_code"] == 2, r["status_message"])


def _nccl_seqs(q: JobQuery, rows: list[dict[str, Any]]) -> dict[tuple, int]:
    """(run, host, pid, comm, start) -> the call's number on its communicator in its
    process, from 1, of the NCCL calls among rows (those outside c10d spans counted)."""
    want = {(r["run"], r["host"], r["pid"], r["comm"], r["cs"]) for r in rows if r["nccl"]}
    if not want:
        return {}
    lit = ", ".join(f"({quote(a)}, {quote(h)}, toUInt32({p}), toUInt64({c}), toInt64({t}))"
                    for a, h, p, c, t in sorted(want))
    asked = ("SELECT tupleElement(x, 1) AS run, tupleElement(x, 2) AS host, tupleElement(x, "
             "3) AS pid, tupleElement(x, 4) AS comm, tupleElement(x, 5) AS t "
             f"FROM system.one ARRAY JOIN [{lit}] AS x")
    # the asked calls (few) on the right: every earlier call of their communicator streams
    pairs = (f"SELECT run, host, pid, comm, cs, t FROM (SELECT run, host, pid, comm, cs "
             f"FROM ({q.nccl_sql()})) ALL INNER JOIN ({asked}) USING (run, host, pid, comm)")
    res = q.client.rows(f"SELECT run, host, pid, comm, t, count() AS seq FROM ({pairs}) "
                        "WHERE cs <= t GROUP BY run, host, pid, comm, t")
    return {(r["run"], r["host"], r["pid"], r["comm"], r["t"]): r["seq"] for r in res}


def _with_steps(rows: list[dict[str, Any]], q: JobQuery, ranks: list[RankSteps],
                starts: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[int, list[Collective]]:
    """Collectives of rows (from coll_sql), by rank, each given the step it starts in."""
    idx = {k: i for i, k in enumerate(q.members)}
    seqs = _nccl_seqs(q, rows)
    out: dict[int, list[Collective]] = {rs.rank: [] for rs in ranks}
    for r in rows:
        i = idx[(r["run"], r["host"], r["pid"])]
        s, e = starts[i]
        k = int(np.searchsorted(s, r["cs"], side="right")) - 1
        step = int(ranks[i].steps[k]) if k >= 0 and r["cs"] < e[k] else None
        out[ranks[i].rank].append(_collective(r, step, seqs))
    for calls in out.values():
        calls.sort(key=lambda c: c.start_ns)
    return out


def _step_times(q: JobQuery, ranks: list[RankSteps]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    res = q.client.rows(f"SELECT run, host, pid, s, e FROM ({q.steps_sql()}) ORDER BY s")
    idx = {k: i for i, k in enumerate(q.members)}
    out: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in range(len(ranks))}
    for r in res:
        i = idx[(r["run"], r["host"], r["pid"])]
        out[i][0].append(r["s"])
        out[i][1].append(r["e"])
    return {i: (np.array(a, dtype=np.int64), np.array(b, dtype=np.int64))
            for i, (a, b) in out.items()}


def _collectives(q: JobQuery, ranks: list[RankSteps], sigs: list[dict[int, int]]
                 ) -> dict[int, list[Collective]]:
    """What reports.desync needs: each rank's collectives of the first step where the
    ranks' per-step signatures (a hash of the step's (op, numel, dtype, group) sequence)
    differ, and of each rank's last step with collectives (desync skips ranks whose trace
    ended before a step); nothing when every step agrees."""
    last = [max(s) if s else -1 for s in sigs]
    steps = sorted(set().union(*(s.keys() for s in sigs)))
    first = None
    for step in steps:
        alive = [i for i in range(len(sigs)) if last[i] >= step]
        if len({sigs[i].get(step) for i in alive}) > 1:
            first = step
            break
    if first is None:
        return {rs.rank: [] for rs in ranks}
    want = sorted({first} | {x for x in last if x >= first})
    rows = q.client.rows(q.coll_in_steps(_ROW_COLS, f"AND step IN ({', '.join(map(str, want))})"))
    return _with_steps(rows, q, ranks, _step_times(q, ranks))


def _failed(q: JobQuery, ranks: list[RankSteps]) -> dict[int, list[Collective]]:
    """Each rank's collectives that ended in error (raised, or never left)."""
    rows = q.client.rows(f"SELECT {_ROW_COLS} FROM ({q.coll_sql()}) WHERE status_code = 2")
    if not rows:
        return {rs.rank: [] for rs in ranks}
    return _with_steps(rows, q, ranks, _step_times(q, ranks))


def _clock_offsets(q: JobQuery, ref: str) -> list[dict[str, Any]]:
    """Per host, its clock minus `ref`'s: the median, over the collectives both hosts'
    ranks left, of the difference of their (per-host median) exit times; c10d spans only
    (an NCCL call returns once its work is enqueued: no moment the ranks share)."""
    per = (f"SELECT host, grp, seq, medianExact(ce) AS x FROM ({q.c10d_sql('AND seq > 0')}) "
           "GROUP BY host, grp, seq")
    rows = q.client.rows(
        f"SELECT host, medianExact(x - xr) AS off, count() AS n FROM ({per}) ALL INNER JOIN "
        f"(SELECT grp, seq, x AS xr FROM ({per}) WHERE host = {quote(ref)}) USING (grp, seq) "
        "GROUP BY host ORDER BY host")
    return [{"host": r["host"], "offset_ms": round(float(r["off"]) / 1e6, 3),
             "collectives": int(r["n"]), "reference": r["host"] == ref} for r in rows]
