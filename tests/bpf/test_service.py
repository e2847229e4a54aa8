"""`renacerd serve` for real: socket activation, sd_notify, per-run tracers, permissions."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from renacerd.client import protocol
from renacerd.experiment_span import StatusCode
from renacerd.store.database import Store
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
CAPS = "+bpf,+perfmon,+sys_resource,+sys_ptrace,+chown"
TRACE_TIMEOUT = 60

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the service loads BPF: needs root")

# A training process in miniature: service-mode client, spans around known syscalls.
CLIENT = r"""
import os, sys, time
from renacerd.client import core as client
sock, run, mode, marker = sys.argv[1:5]
client.configure(socket=sock, run=run, trace_timeout=float(os.environ["TRACE_TIMEOUT"]))
if mode == "steps":
    for i in range(int(os.environ.get("STEPS", "3"))):
        with client.experiment_span("step", step=i):
            open(f"{marker}.{i}", "w").close()
    print("done", client.stats()["dropped"], flush=True)
elif mode == "hold":
    with client.experiment_span("held", step=7):
        open(marker, "w").close()
        print("in-span", flush=True)
        sys.stdin.read()
    print("released", flush=True)
elif mode == "fork":
    with client.experiment_span("parent", step=0):
        open(marker, "w").close()
    print("parent", flush=True)
    sys.stdin.readline()
    kids = []
    for i in range(int(os.environ["KIDS"])):
        pid = os.fork()
        if pid == 0:
            with client.experiment_span("child", step=i + 1):
                pass
            client._client.flush_at_exit()
            os._exit(0)
        kids.append(pid)
    bad = [p for p in kids if os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) != 0]
    print("forked", len(kids), "failed", len(bad), flush=True)
    sys.stdin.read()
elif mode == "churn":
    for i in range(int(os.environ["STEPS"])):
        with client.experiment_span("good", step=i):
            os.stat(marker)
        if i == 0:
            print("started", flush=True)
            sys.stdin.readline()
        time.sleep(0.005)
    print("done", client.stats()["dropped"], flush=True)
elif mode == "files":
    with client.experiment_span("fill", step=0):
        for i in range(int(os.environ["STEPS"])):
            try:
                os.stat(f"{marker}/{i:08d}-" + "x" * 200)
            except FileNotFoundError:
                pass
    print("done", flush=True)
"""


def env() -> dict[str, str]:
    """The environment every child of a test gets."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["TRACE_TIMEOUT"] = str(TRACE_TIMEOUT)
    return e


def renacer_gid() -> int:
    """The renacer group (scripts/install.sh creates it)."""
    import grp

    return grp.getgrnam("renacer").gr_gid


def _unit_limits() -> None:
    """The unit's LimitNICE, as systemd sets it before exec. A host that refuses it (no
    CAP_SYS_RESOURCE) gets per-run tracers that stay at normal priority, as they should."""
    m = re.search(r"^LimitNICE=(\d+)$", (ROOT / "systemd/renacerd.service").read_text(), re.M)
    try:
        resource.setrlimit(resource.RLIMIT_NICE, (int(m[1]), int(m[1])))
    except (OSError, ValueError):
        pass


class Service:
    """`renacerd serve` as a process of the test; the socket optionally from systemd."""

    def __init__(self, tmp: Path, *, activate: bool, caps: bool = True,
                 db: Path | None = None, args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.sock = str(tmp / "renacerd.sock")
        self.db = db or tmp / "state" / "traces.db"
        self.notify_path = str(tmp / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(0.2)
        self.messages: list[str] = []
        e = env()
        e["NOTIFY_SOCKET"] = self.notify_path
        cmd = [PY, "-m", "renacerd.cli.renacerd_main", "serve", "--db", str(self.db), *args]
        if caps:
            # Exactly the unit's CapabilityBoundingSet: proves it is enough.
            cmd = ["setpriv", f"--bounding-set=-all,{CAPS}", "--inh-caps=-all", "--", *cmd]
        if activate:
            cmd = ["systemd-socket-activate", "--seqpacket", "-l", self.sock,
                   "-E", "PYTHONPATH", "-E", "NOTIFY_SOCKET", "-E", "PATH", *cmd]
        else:
            cmd += ["--socket", self.sock]
        self.log = open(tmp / "service.log", "w+")
        self.proc = subprocess.Popen(cmd, env=e, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=_unit_limits)
        self.early: socket.socket | None = None
        if activate:
            # systemd-socket-activate starts the daemon on the first connection, as systemd
            # does: this one is made, and its request sent, before the daemon exists.
            deadline = time.monotonic() + 10
            while not os.path.exists(self.sock) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.early = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            while True:
                try:
                    self.early.connect(self.sock)
                    break
                except ConnectionRefusedError:
                    # Bound (the file exists) but not listening yet.
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            self.early.send(protocol.encode(protocol.Hello(pid=os.getpid())))
            self.early.send(protocol.encode(protocol.StatusQuery()))

    def wait_ready(self, timeout: float = 60) -> list[str]:
        """Collect sd_notify datagrams until READY=1."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except TimeoutError:
                assert self.proc.poll() is None, self.text()
                continue
            if "READY=1" in self.messages[-1].splitlines():
                return self.messages
        raise AssertionError(f"no READY=1 in {timeout} s: {self.messages}\n{self.text()}")

    def text(self) -> str:
        """The service's log so far."""
        self.log.flush()
        return (self.tmp / "service.log").read_text()

    def client(self, run: str, mode: str, marker: str, user: str | None = None,
               extra: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a client process (as `user` with group renacer when given)."""
        script = self.tmp / "client.py"
        script.write_text(CLIENT)
        cmd = [PY, str(script), self.sock, run, mode, marker]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--groups=renacer",
                   "--", *cmd]
        e = env()
        e.update(extra or {})
        return subprocess.Popen(cmd, env=e, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def status(self) -> dict:
        """`renacer status --json` against this service."""
        r = subprocess.run([PY, "-m", "renacerd.cli.renacer_main", "status", "--socket",
                            self.sock, "--json"], env=env(), capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def wait_run_ended(self, name: str, timeout: float = 30):
        """The run's row once its tracer marked it ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with _store(self.db) as st:
                info = st.run(name) if st.run_exists(name) else None
            if info is not None and info.status != "running":
                return info
            time.sleep(0.1)
        raise AssertionError(f"run {name} did not end in {timeout} s\n{self.text()}")

    def stop(self, sig: int = signal.SIGTERM) -> float:
        """Signal the service and wait; returns how long it took to exit."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGUSR1)
                time.sleep(1)
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"service ignored signal {sig}:\n{self.text()}") from None
        took = time.monotonic() - t0
        self.notify.close()
        self.log.close()
        return took


class _store:
    """A Store opened and closed around a block."""

    def __init__(self, path: Path) -> None:
        self.store = Store(path)

    def __enter__(self) -> Store:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def finish(p: subprocess.Popen, timeout: float = 60) -> str:
    """Wait for a client; its stdout (the test fails on a non-zero exit)."""
    out, err = p.communicate(input="" if p.stdin is not None else None, timeout=timeout)
    assert p.returncode == 0, err
    return out


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One socket-activated service, with only the unit's capabilities, for this module."""
    tmp = tmp_path_factory.mktemp("svc")
    os.chmod(tmp, 0o755)
    svc = Service(tmp, activate=True)
    svc.wait_ready()
    yield svc
    svc.stop()


def test_notify_datagrams_reach_abstract_and_path_sockets(tmp_path, monkeypatch):
    from renacerd.serve.notify import Notifier

    name = f"renacer-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(b"\0" + name.encode())
        rx.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
        monkeypatch.setenv("WATCHDOG_USEC", "2000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        n = Notifier.from_environment()
        assert n.watchdog_s == 2.0
        assert n.ready("up")
        assert rx.recv(512) == f"READY=1\nSTATUS=up\nMAINPID={os.getpid()}".encode()
        assert n.watchdog() and not n.watchdog()  # at most every half interval
        assert rx.recv(512) == b"WATCHDOG=1"
        assert n.status("x") and not n.status("x")  # unchanged status is not resent
        assert rx.recv(512) == b"STATUS=x"
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Notifier.from_environment().watchdog_s is None  # meant for another process
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier.from_environment().ready("up")
    # A manager that stopped reading never blocks the daemon.
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        full = Notifier(path)
        sent = [full.send(f"STATUS={i}") for i in range(2000)]
        assert sent[0] and not sent[-1]


def test_units_verify(tmp_path):
    unit = (ROOT / "systemd/renacerd.service").read_text()
    assert "Type=notify" in unit
    sock = (ROOT / "systemd/renacerd.socket").read_text()
    assert "ListenSequentialPacket=/run/renacer/renacerd.sock" in sock
    assert "SocketMode=0660" in sock and "SocketGroup=renacer" in sock
    # ExecStart must name an existing file for verify: point it at this checkout's venv.
    exe = Path(PY).parent / "renacerd"
    if not exe.exists():
        exe = Path(PY)
    (tmp_path / "renacerd.service").write_text(
        unit.replace("/usr/local/bin/renacerd", str(exe)))
    (tmp_path / "renacerd.socket").write_text(sock)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "renacerd.socket"),
                        str(tmp_path / "renacerd.service")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@needs_root
def test_ready_only_after_listening_and_status_lines(service):
    ready = [m for m in service.messages if "READY=1" in m.splitlines()]
    assert len(ready) == 1
    fields = dict(line.split("=", 1) for line in ready[0].splitlines())
    assert fields["MAINPID"] == str(service.proc.pid)
    assert fields["STATUS"].startswith(f"listening on {service.sock}")
    # The BPF load check was announced before READY.
    assert service.messages.index(ready[0]) >= 1
    assert service.messages[0] == "STATUS=checking that BPF programs load"
    # The request sent before the daemon started was queued on systemd's socket and served.
    service.early.settimeout(10)
    reply = protocol.decode(service.early.recv(protocol.MAX_FRAME))
    assert isinstance(reply, protocol.ServiceStatus)
    assert reply.pid == service.proc.pid and reply.runs == []
    service.early.close()
    st = service.status()
    assert st["pid"] == service.proc.pid and st["runs"] == []


@needs_root
def test_two_clients_get_two_runs_traced_from_their_first_span(service, tmp_path):
    a = service.client("svc-a", "hold", str(tmp_path / "a-marker"))
    b = service.client("svc-b", "hold", str(tmp_path / "b-marker"))
    assert a.stdout.readline() == "in-span\n"
    assert b.stdout.readline() == "in-span\n"
    st = service.status()
    runs = {r["run"]: r for r in st["runs"]}
    assert set(runs) == {"svc-a", "svc-b"}
    assert runs["svc-a"]["pid"] == a.pid and runs["svc-b"]["pid"] == b.pid
    assert all(r["ready"] and r["uid"] == 0 for r in runs.values())
    text = subprocess.run([PY, "-m", "renacerd.cli.renacer_main", "status", "--socket",
                           service.sock], env=env(), capture_output=True, text=True).stdout
    assert "tracing 2 runs" in text and "svc-a" in text and "svc-b" in text
    assert finish(a) == "released\n"
    assert finish(b) == "released\n"
    for name, proc, marker in (("svc-a", a, "a-marker"), ("svc-b", b, "b-marker")):
        info = service.wait_run_ended(name)
        assert info.status == "complete" and info.owner_uid == 0
        with _store(service.db) as st:
            traces = st.load_run(name)
            spans = st.span_records(info.id)
        assert [t.pid for t in traces] == [proc.pid]
        # The openat of the marker, made first thing inside the first span, is in the run.
        paths = {traces[0].string(s) for s in traces[0].columns["s0"] if s >= 0}
        assert str(tmp_path / marker) in paths
        other = str(tmp_path / ("b-marker" if marker == "a-marker" else "a-marker"))
        assert other not in paths
        assert [(s.span_name, StatusCode(s.status_code).name) for s in spans] == [("held", "OK")]
        assert spans[0].process_id == proc.pid


@needs_root
def test_sigkill_mid_span_ends_run_with_signal_and_error_span(service, tmp_path):
    c = service.client("svc-kill", "hold", str(tmp_path / "k-marker"))
    assert c.stdout.readline() == "in-span\n"
    c.kill()
    c.wait()
    info = service.wait_run_ended("svc-kill")
    assert info.status == "complete"
    with _store(service.db) as st:
        (_, proc), = st.processes(info.id)
        spans = st.span_records(info.id)
    assert proc.pid == c.pid and proc.exit_signal == signal.SIGKILL
    assert [(s.span_name, StatusCode(s.status_code).name, s.status_message) for s in spans] == [
        ("held", "ERROR", "process exited mid-span")], (proc, spans, service.text())
    assert spans[0].end_mono_nanos <= proc.end_mono_ns + 1_000_000


@needs_root
def test_run_names_are_not_shared_across_process_trees(service, tmp_path):
    a = service.client("svc-owned", "hold", str(tmp_path / "o1"))
    assert a.stdout.readline() == "in-span\n"
    # A second, unrelated process asking for the same run is refused (fails open, untraced).
    b = service.client("svc-owned", "steps", str(tmp_path / "o2"),
                       extra={"STEPS": "1", "TRACE_TIMEOUT": "10"})
    out, err = b.communicate(timeout=60)
    assert b.returncode == 0 and out == "done 0\n"
    assert "renacerd refused to trace this process: run 'svc-owned' is tracing another " \
           "process tree" in err
    finish(a)
    service.wait_run_ended("svc-owned")
    with _store(service.db) as st:
        assert [t.pid for t in st.load_run("svc-owned")] == [a.pid]


def _progs() -> set[int]:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True,
                         text=True, check=True).stdout
    return {p["id"] for p in json.loads(out)}


def _progs_left(before: set[int], timeout: float = 3.0) -> set[int]:
    """Programs loaded since `before` that remain (the kernel frees them after an RCU grace)."""
    deadline = time.monotonic() + timeout
    while (left := _progs() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@needs_root
def test_sigterm_flushes_and_detaches_within_2s(tmp_path):
    os.chmod(tmp_path, 0o755)
    progs_before = _progs()
    uprobes_before = Path("/sys/kernel/tracing/uprobe_events").read_text()
    svc = Service(tmp_path, activate=True)
    svc.wait_ready()
    c = svc.client("svc-term", "hold", str(tmp_path / "t-marker"))
    assert c.stdout.readline() == "in-span\n"
    tracer = svc.status()["runs"][0]["tracer_pid"]
    assert tracer == svc.proc.pid  # the service traces every run itself
    assert _progs() - progs_before  # the shared programs are loaded
    took = svc.stop(signal.SIGTERM)
    assert svc.proc.returncode == 0
    assert took < 2.0, svc.text()
    assert not Path(f"/proc/{tracer}").exists()
    assert c.poll() is None  # the target is unharmed
    assert finish(c) == "released\n"
    assert _progs_left(progs_before) == set()
    assert Path("/sys/kernel/tracing/uprobe_events").read_text() == uprobes_before
    with _store(svc.db) as st:
        info = st.run("svc-term")
        spans = st.span_records(info.id)
    # Still live when the service stopped: the run says it is not the whole story.
    assert info.status == "incomplete" and info.end_wall_ns
    assert info.error == "renacerd serve stopped while the run was live"
    assert [(s.span_name, StatusCode(s.status_code).name, s.status_message) for s in spans] == [
        ("held", "ERROR", "client disconnected mid-span")]
    # Systemd's socket stays systemd's: the daemon never unlinks a socket it was handed.
    assert stat.S_ISSOCK(os.stat(svc.sock).st_mode)


@needs_root
def test_the_service_prunes_a_run_at_its_end_to_its_budget(tmp_path):
    os.chmod(tmp_path, 0o755)
    svc = Service(tmp_path, activate=False, args=("--retention-size", "1"))
    try:
        svc.wait_ready()
        c = svc.client("svc-pruned", "hold", str(tmp_path / "p-marker"))
        assert c.stdout.readline() == "in-span\n"
        with _store(svc.db) as st:
            assert st.run("svc-pruned").pruned is None  # live: only its oldest chunks, later
        assert finish(c) == "released\n"
        assert svc.wait_run_ended("svc-pruned").status == "complete"
        assert wait_for(lambda: _pruned(svc.db, "svc-pruned"), timeout=30), svc.text()
        with _store(svc.db) as st:
            info = st.run("svc-pruned")
            assert info.pruned["reason"] == "size" and info.pruned["events"] == info.events
            assert [s.span_name for s in st.span_records(info.id)] == ["held"]
            agg = st.aggregates(info.id)
        # the marker's openat, made inside the span, is counted in its stored summary
        assert agg["spans"][0]["calls"]["openat"] >= 1
        r = subprocess.run([PY, "-m", "renacerd.cli.renacer_main", "show", "svc-pruned",
                            "--db", str(svc.db), "--by", "step", "--json"], env=env(),
                           capture_output=True, text=True, timeout=60)
        steps = json.loads(r.stdout)
        assert steps["pruned"] is True and [s["step"] for s in steps["steps"]] == ["7"]
    finally:
        svc.stop()


def _pruned(db: Path, run: str) -> bool:
    with _store(db) as st:
        return st.run(run).pruned is not None


def _as_nobody(code: str, groups: str = "--clear-groups") -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", groups, "--", PY,
                           "-c", code], env=env(), capture_output=True, text=True, timeout=60)


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1] if len(sys.argv) > 1 else {path!r})
except PermissionError:
    print("refused")
else:
    print("connected")
"""


@needs_root
def test_permissions_socket_store_and_user_runs():
    # pytest's own tmp root is 0700: other users must be able to reach the socket's directory.
    tmp_path = Path(tempfile.mkdtemp(prefix="renacer-perm-", dir="/tmp"))
    os.chmod(tmp_path, 0o755)
    gid = renacer_gid()
    svc = Service(tmp_path, activate=False)
    try:
        svc.wait_ready()
        st = os.stat(svc.sock)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, gid)
        code = CONNECT.format(path=svc.sock)
        assert _as_nobody(code).stdout == "refused\n"
        assert _as_nobody(code, "--groups=renacer").stdout == "connected\n"
        # A member's run is owned by its uid; its span socket is its own.
        c = svc.client("svc-nobody", "hold", "/tmp/renacer-test-nobody-marker", user="nobody")
        assert c.stdout.readline() == "in-span\n", c.stderr.read()
        run = svc.status()["runs"][0]
        assert run["uid"] == 65534
        mine = _as_nobody(
            "import sys; from renacerd.cli.status import query; "
            f"print([r['run'] for r in query({svc.sock!r}).runs])", "--groups=renacer")
        assert mine.stdout == "['svc-nobody']\n", mine.stderr
        finish(c)
        info = svc.wait_run_ended("svc-nobody")
        assert info.owner_uid == 65534
        for path in (svc.db, Path(f"{svc.db}-wal"), Path(f"{svc.db}-shm")):
            s = os.stat(path)
            assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid) == (0o640, 0, gid), path
        s = os.stat(svc.db.parent)
        assert (stat.S_IMODE(s.st_mode), s.st_gid) == (0o750, gid)
        # A non-member reads nothing, neither the file nor through renacer.
        r = _as_nobody(f"open({str(svc.db)!r}, 'rb').read(16)")
        assert "PermissionError" in r.stderr
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            "--", PY, "-m", "renacerd.cli.renacer_main", "runs", "--db",
                            str(svc.db)], env=env(), capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
        assert "svc-nobody" not in r.stderr
    finally:
        svc.stop()
        Path("/tmp/renacer-test-nobody-marker").unlink(missing_ok=True)
        shutil.rmtree(tmp_path)


@needs_root
def test_bad_input_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([PY, "-m", "renacerd.cli.renacerd_main", "serve", "--bogus"], env=env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    r = subprocess.run([PY, "-m", "renacerd.cli.renacer_main", "status", "--socket",
                        str(tmp_path / "none.sock")], env=env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == (f"renacer status: error: no renacerd service answers on "
                        f"{tmp_path / 'none.sock'}: No such file or directory\n")
