"""`renacerd serve` with one attachment for every run: concurrent runs, each exact and
isolated, the same programs in the kernel for one run or four, a slot per run's owner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_service import PY, Service, _store, env, finish

from renacerd.syscall_table import syscall_table

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the service loads BPF: needs root")

# A client in miniature, on the raw protocol so the ack is timed alone: Hello, then (on
# "go") TraceMe; once acked and told "go" again, STATS stat calls on its own marker path,
# WRITES writes to /dev/null, and an exec of EXEC when given.
CLIENT = r"""
import json, os, socket, sys, time
from renacerd.client import protocol
path, run, marker = sys.argv[1:4]
stats, writes = int(os.environ["STATS"]), int(os.environ["WRITES"])
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)
s.send(protocol.encode(protocol.Hello(pid=os.getpid())))
sys.stdin.readline()
t0 = time.perf_counter()
s.send(protocol.encode(protocol.TraceMe(1, run)))
ack = protocol.decode(s.recv(protocol.MAX_FRAME))
took = time.perf_counter() - t0
print(json.dumps({"ok": ack.ok, "reason": ack.reason, "ack_s": took}), flush=True)
sys.stdin.readline()
for _ in range(stats):
    try:
        os.stat(marker)
    except FileNotFoundError:
        pass
fd = os.open("/dev/null", os.O_WRONLY)
for _ in range(writes):
    os.write(fd, b"x" * 7)
os.close(fd)
if os.environ.get("EXEC"):
    r = os.spawnv(os.P_WAIT, os.environ["EXEC"], [os.environ["EXEC"], "0"])
    print("exec", r, flush=True)
print("done", flush=True)
sys.stdin.readline()
"""

NR = {name: nr for nr, name in syscall_table().items()}


def _service_progs(pid: int) -> list[tuple[str, str]]:
    """What the process `pid` holds in the kernel, from its descriptors' fdinfo:
    ("prog", id) for each BPF program, ("raw_tp", name) for each raw tracepoint link."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue  # closed meanwhile
        info = dict(ln.split(":\t", 1) for ln in text.splitlines() if ":\t" in ln)
        if info.get("link_type") == "raw_tracepoint":
            held.add(("raw_tp", info["tp_name"]))
        elif "prog_type" in info:
            held.add(("prog", info["prog_id"]))
    return sorted(held)


def _start(svc: Service, tmp: Path, name: str, stats: int, writes: int,
           user: str | None = None, exe: str | None = None) -> subprocess.Popen:
    script = tmp / "shared_client.py"
    script.write_text(CLIENT)
    cmd = [PY, str(script), svc.sock, name, str(tmp / f"{name}-marker")]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--groups=renacer", "--", *cmd]
    e = env()
    e.update(STATS=str(stats), WRITES=str(writes), EXEC=exe or "")
    return subprocess.Popen(cmd, env=e, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _go(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()


def _counts(svc: Service, name: str) -> tuple[list[int], dict[str, int], dict[str, int]]:
    """A finished run's pids, calls per path, and "null_writes": its writes to the fd its
    one open of /dev/null returned."""
    info = svc.wait_run_ended(name)
    assert info.status == "complete", (info, svc.text())
    with _store(svc.db) as st:
        traces = st.load_run(name)
    calls: dict[str, int] = {"null_writes": 0}
    paths: dict[str, int] = {}
    for t in traces:
        c = t.columns
        null_fd = None
        for i, sid in enumerate(c["s0"].tolist()):
            if sid < 0:
                continue
            path = t.string(sid)
            paths[path] = paths.get(path, 0) + 1
            if path == "/dev/null" and int(c["nr"][i]) == NR["openat"]:
                null_fd = int(c["ret"][i])
        if null_fd is not None:
            w = (c["nr"] == NR["write"]) & (c["a0"] == null_fd)
            calls["null_writes"] += int(w.sum())
    return [t.pid for t in traces], calls, paths


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    tmp = Path(tempfile.mkdtemp(prefix="renacer-shared-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    s = Service(tmp, activate=False)
    s.wait_ready()
    yield s
    s.stop()
    shutil.rmtree(tmp, ignore_errors=True)


def test_four_runs_at_once_are_exact_and_isolated_on_one_attachment(svc, capsys):
    tmp = Path(svc.tmp)
    idle = _service_progs(svc.proc.pid)
    assert idle, "the probes are attached before READY=1"
    # Run i makes 100 + i stats of its own path and 50 + 3 i writes: every count is known.
    names = [f"shared-{i}" for i in range(4)]
    one = _start(svc, tmp, "shared-solo", 5, 5)
    _go([one])
    assert json.loads(one.stdout.readline())["ok"]
    with_one = _service_progs(svc.proc.pid)
    _go([one])
    assert one.stdout.readline() == "done\n"
    finish(one)
    procs = [_start(svc, tmp, n, 100 + i, 50 + 3 * i) for i, n in enumerate(names)]
    _go(procs)  # all four ask at once
    acks = [json.loads(p.stdout.readline()) for p in procs]
    assert all(a["ok"] for a in acks), acks
    st = svc.status()
    assert sorted(r["run"] for r in st["runs"]) == names
    assert len({r["slot"] for r in st["runs"]}) == 4
    with_four = _service_progs(svc.proc.pid)
    # The same programs in the kernel for no run, one run and four: one syscall pair.
    assert idle == with_one == with_four
    assert [n for k, n in with_four if k == "raw_tp"] == ["sys_enter", "sys_exit"]
    with capsys.disabled():
        print(f"\nBPF programs held by the service with 0, 1 and 4 runs: {len(idle)} "
              f"{len(with_one)} {len(with_four)} (programs and raw tracepoint links)")
    _go(procs)  # all four make their calls at once
    for p in procs:
        assert p.stdout.readline() == "done\n"
        finish(p)
    for i, (n, p) in enumerate(zip(names, procs)):
        pids, calls, paths = _counts(svc, n)
        assert pids == [p.pid]
        # exactly its own stats, and no path of another run
        assert paths[str(tmp / f"{n}-marker")] == 100 + i
        assert not {str(tmp / f"{o}-marker") for o in names if o != n} & set(paths)
        # exactly its own writes to /dev/null
        assert calls["null_writes"] == 50 + 3 * i, calls
    with capsys.disabled():
        print("\nack seconds of four concurrent requests:",
              " ".join(f"{a['ack_s']:.3f}" for a in acks))


def test_each_run_has_its_owner_for_privilege_at_exec(svc, tmp_path_factory):
    """A member's run and root's run at once: the member's setuid exec is not followed,
    root's is (the owner is per run slot, not per compile)."""
    member = "rnc-shared-member"
    subprocess.run(["userdel", member], capture_output=True)
    subprocess.run(["useradd", "--system", "--no-create-home", "--no-user-group", "-G",
                    "renacer", "-s", "/usr/sbin/nologin", member], check=True)
    bindir = Path(tempfile.mkdtemp(prefix="renacer-suid-", dir="/tmp"))
    os.chmod(bindir, 0o755)
    suid = bindir / "suid-true"
    shutil.copy("/usr/bin/true", suid)
    os.chmod(suid, 0o4755)
    tmp = Path(svc.tmp)
    try:
        procs = [_start(svc, tmp, "owner-member", 1, 1, user=member, exe=str(suid)),
                 _start(svc, tmp, "owner-root", 1, 1, exe=str(suid))]
        _go(procs)
        assert all(json.loads(p.stdout.readline())["ok"] for p in procs)
        _go(procs)
        for p in procs:
            assert p.stdout.readline() == "exec 0\n"
            assert p.stdout.readline() == "done\n"
            finish(p)
        out = {}
        for name in ("owner-member", "owner-root"):
            svc.wait_run_ended(name)
            r = subprocess.run([PY, "-m", "renacerd.cli.renacer_main", "show", name, "--json",
                                "--db", str(svc.db)], env=env(), capture_output=True,
                               text=True, check=True)
            out[name] = json.loads(r.stdout)
            with _store(svc.db) as st:
                out[name]["traces"] = st.load_run(name)
        member_run, root_run = out["owner-member"], out["owner-root"]
        assert member_run["lost"]["sources"]["unfollowed_privileged"] == 1
        assert root_run["lost"]["sources"]["unfollowed_privileged"] == 0
        # root's run follows the setuid child past its exec (its exit_group is recorded);
        # the member's child ends at the exec
        exit_group = NR["exit_group"]
        kids = {n: [t for t in out[n]["traces"] if t.pid != procs[i].pid]
                for i, n in enumerate(("owner-member", "owner-root"))}
        assert len(kids["owner-member"]) == 1 and len(kids["owner-root"]) == 1
        assert exit_group not in kids["owner-member"][0].columns["nr"].tolist()
        assert exit_group in kids["owner-root"][0].columns["nr"].tolist()
    finally:
        subprocess.run(["userdel", member], capture_output=True)
        shutil.rmtree(bindir, ignore_errors=True)


BURST = r"""
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char c;
    int n = atoi(argv[1]);
    if (read(0, &c, 1) != 1)
        return 1;
    for (int i = 0; i < n; i++)
        syscall(SYS_getppid);
    syscall(SYS_exit_group, 0);
    return 0;
}
"""


def test_losses_are_counted_in_the_run_whose_records_were_dropped(cc, tmp_path):
    """Two runs on one attachment whose event ring holds 73 records: one run's burst of
    20,000 calls overflows it while the other waits. Every record of each run is either
    stored or counted lost in that run: the burst's run counts its losses, the quiet run
    none."""
    import threading
    import time

    from renacerd.capture.shared import SharedCapture
    from renacerd.capture.tracer import Tracer
    from renacerd.store.database import Store

    exe = cc("burst", BURST)
    cap = SharedCapture(event_mb=0.004, cuda=False)  # one page
    store = Store(str(tmp_path / "t.db"), create=True)
    lock = threading.RLock()
    ended: dict[str, tuple] = {}
    counts = {"burst": 20_000, "quiet": 50}
    procs = {}
    try:
        for name, n in counts.items():
            p = subprocess.Popen([str(exe), str(n)], stdin=subprocess.PIPE)
            procs[name] = p
            # attached only once blocked in read(2): on a busy machine the loader's calls
            # could still be running, and would be counted on top of the known ones
            deadline = time.monotonic() + 30
            while not Path(f"/proc/{p.pid}/syscall").read_text().startswith("0 "):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            slot = cap.claim(0)
            tracer = Tracer(slot, store, name, cmdline=[str(exe)], details=cap.details,
                            lock=lock)
            with cap.lock:
                cap.add(slot, tracer, lambda run: ended.__setitem__(
                    run.tracer.run_name, (run.tracer.finish(), run.tracer.events)))
                tracer.attach(p.pid)
        time.sleep(0.2)  # both blocked in read(2)
        for name in ("burst", "quiet"):
            procs[name].stdin.write(b"x")
            procs[name].stdin.close()
            assert procs[name].wait(30) == 0  # no drain meanwhile: the ring overflows
            deadline = time.monotonic() + 30
            while name not in ended and time.monotonic() < deadline:
                with cap.lock:
                    cap.cycle(time.monotonic())
                time.sleep(0.02)
    finally:
        cap.close()
    deadline = time.monotonic() + 10
    while len(ended) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    for name, n in counts.items():
        summary, events = ended[name]
        # after the attach: the exit of the read it was blocked in, n getppid, exit_group
        # (all stored as events) and the exit record (read by the tracer, not stored): the
        # sum is n + 3 when the exit record itself was dropped (the ring still full), else
        # n + 2 (the process then ends by the liveness check, counted lost all the same)
        lost = summary.lost["events_lost"]
        assert events + lost in (n + 2, n + 3), (name, events, lost)
        assert summary.lost["details_lost"] == 0
    assert ended["quiet"][0].lost["events_lost"] == 0
    assert ended["quiet"][1] == counts["quiet"] + 2
    assert ended["burst"][0].lost["events_lost"] > 19_000
    store.close()


def test_launch_through_the_running_service(svc):
    """`renacerd -- CMD` with the service up: no compile, the command is a run of the
    service from its execve, its exit status passed on; `--no-service` is standalone."""
    import time

    cmd = [PY, "-m", "renacerd.cli.renacerd_main", "--service-socket", svc.sock]
    t0 = time.monotonic()
    r = subprocess.run([*cmd, "--run", "via-service", "--", "sh", "-c", "exit 3"],
                       env=env(), capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 3, r.stderr
    assert r.stderr.splitlines()[0] == (f"renacerd: traced by the service on {svc.sock} as "
                                        "run via-service")
    info = svc.wait_run_ended("via-service")
    assert info.status == "complete"
    with _store(svc.db) as st:
        (trace,) = st.load_run("via-service")
    assert trace.names().tolist()[0] == "execve"  # nothing of the held child before it
    assert trace.names().tolist()[-1] == "exit_group"
    assert trace.process.exit_code == 3
    assert info.source_counters.get("foreign_events", 0) == 0
    assert info.unmatched_exits == 0
    r = subprocess.run([*cmd, "--no-service", "-q", "--db", str(Path(svc.tmp) / "own.db"),
                        "--run", "standalone", "--", "true"], env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    with _store(Path(svc.tmp) / "own.db") as st:
        assert st.run("standalone").status == "complete"
    print(f"\n`renacerd -- sh -c 'exit 3'` through the service: {took:.2f} s end to end")
