"""The attacks of docs/security.md, each run for real: as an unprivileged member of group
renacer (a user this module creates), against a service, span server or store of the test."""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from renacerd.capture.peer import Peer, PeerChanged, check_traceable, start_time
from renacerd.client import protocol
from renacerd.serve import service as svcmod
from renacerd.serve.notify import Notifier
from renacerd.serve.span_ring import REAPER, FdReaper
from renacerd.serve.span_server import SpanServer, bind_socket

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
MEMBER = "rnc-sec-member"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates users and drops privileges")


def env() -> dict[str, str]:
    """Children import this checkout."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


@pytest.fixture(scope="module")
def member():
    """A real unprivileged user in group renacer: (name, uid)."""
    subprocess.run(["userdel", MEMBER], capture_output=True)
    subprocess.run(["useradd", "--system", "--no-create-home", "--no-user-group", "-G",
                    "renacer", "-s", "/usr/sbin/nologin", MEMBER], check=True)
    try:
        yield MEMBER, pwd.getpwnam(MEMBER).pw_uid
    finally:
        subprocess.run(["userdel", MEMBER], capture_output=True)


def as_member(code: str, *args: str, stdin=None) -> subprocess.Popen:
    """`python -c code args` as the member (setpriv: a fresh exec, so it is dumpable)."""
    return subprocess.Popen(["setpriv", f"--reuid={MEMBER}", "--regid=nogroup",
                             "--groups=renacer", "--", PY, "-c", code, *args], env=env(),
                            stdin=stdin or subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, timeout: float = 60) -> str:
    """Its stdout; the test fails on a non-zero exit."""
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return out


class Front:
    """A `renacerd serve` front (renacerd.serve.service.Service) on a thread of the test."""

    def __init__(self, start: bool = True) -> None:
        # pytest's tmp root is 0700: the member must reach the socket's directory.
        self.dir = Path(tempfile.mkdtemp(prefix="renacer-sec-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.path = str(self.dir / "front.sock")
        self.sock = svcmod.listen(self.path, grp.getgrnam("renacer").gr_gid)
        self.db = self.dir / "state" / "traces.db"
        self.svc: svcmod.Service | None = None
        if start:
            self.start()

    def start(self) -> None:
        """Serve on the bound socket."""
        self.svc = svcmod.Service(self.sock, str(self.db), str(self.dir / "runs"),
                                  Notifier(None), unlink_path=self.path)
        self.thread = threading.Thread(target=self.svc.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop the service and remove its files."""
        if self.svc is not None:
            self.svc.stop()
            self.thread.join(10)
        else:
            self.sock.close()
        shutil.rmtree(self.dir)


@pytest.fixture
def front(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    f = Front()
    yield f
    f.close()


def wait_for(cond, what: str, timeout: float = 30.0) -> None:
    """Poll `cond` until true (the service works on threads of its own)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- the peer: setuid after connect, pid reuse, privilege ------------------------------------

SETUID_AFTER_CONNECT = r"""
import json, os, socket, sys, time
from renacerd.client import protocol
path = sys.argv[1]
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
pid = os.fork()
if pid == 0:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.send(protocol.encode(protocol.Hello()))
    socket.send_fds(b, [b"c"], [s.fileno()])
    s.close()
    b.recv(1)
    r, w = os.pipe()  # passwd waits on its stdin for the current password, forever
    os.dup2(r, 0)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execv("/usr/bin/passwd", ["passwd"])
_, fds, _, _ = socket.recv_fds(a, 16, 1)
conn = socket.socket(fileno=fds[0])
a.send(b"g")
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    uids = [l for l in open(f"/proc/{pid}/status") if l.startswith("Uid:")][0].split()[1:]
    if uids[1] == "0":
        break
    time.sleep(0.01)
print("euid", uids[1], flush=True)
conn.send(protocol.encode(protocol.TraceMe(1, "atk-setuid")))
print(json.dumps(protocol.decode(conn.recv(65536)).to_wire()), flush=True)
os.kill(pid, 9)
os.waitpid(pid, 0)
"""


def test_setuid_exec_after_connect_is_not_traced(front, member):
    name, uid = member
    out = finish(as_member(SETUID_AFTER_CONNECT, front.path)).splitlines()
    assert out[0] == "euid 0"  # passwd ran with euid 0 when trace_me came
    ack = json.loads(out[1])
    assert ack["ok"] is False
    assert ack["reason"].startswith("not traced: process ")
    assert f"runs with uids [{uid}, 0, 0, 0]" in ack["reason"]
    assert front.svc.stats["runs_started"] == 0 and front.svc.runs == {}
    assert not front.svc.store.run_exists("atk-setuid")


PID_REUSE = r"""
import json, os, socket, sys
from renacerd.client import protocol
path = sys.argv[1]
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
pid = os.fork()
if pid == 0:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.send(protocol.encode(protocol.Hello()))
    s.send(protocol.encode(protocol.StatusQuery()))
    s.recv(65536)  # answered: the service pinned this process at accept
    socket.send_fds(b, [b"c"], [s.fileno()])
    os._exit(0)
_, fds, _, _ = socket.recv_fds(a, 16, 1)
os.waitpid(pid, 0)  # reaped: its pid is free for anyone's next process
conn = socket.socket(fileno=fds[0])
conn.send(protocol.encode(protocol.TraceMe(1, "atk-reuse")))
print(pid, json.dumps(protocol.decode(conn.recv(65536)).to_wire()), flush=True)
"""


def test_connection_of_an_exited_process_traces_nothing(front, member):
    pid, ack = finish(as_member(PID_REUSE, front.path)).split(" ", 1)
    ack = json.loads(ack)
    assert ack["ok"] is False
    assert ack["reason"] == f"not traced: process {pid} has exited"
    assert front.svc.stats["runs_started"] == 0


def test_pid_reuse_is_caught_by_the_pidfd_and_by_the_start_time(member):
    name, uid = member
    # The pid of a process pinned at accept goes to another process: simulated with two real
    # processes, a pin taken on the first and checked against the second's pid.
    first = as_member("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    second = as_member("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    try:
        wait_for(lambda: _uid_of(second.pid) == uid, "the member's process")
        pidfd = os.pidfd_open(first.pid)
        first.communicate("")
        check_traceable(second.pid, uid, Peer(second.pid, uid, 0, None, start_time(second.pid)))
        with pytest.raises(PeerChanged, match="its pid now belongs to another process"):
            check_traceable(second.pid, uid,
                            Peer(second.pid, uid, 0, pidfd, start_time(second.pid)))
        with pytest.raises(PeerChanged, match="its pid now belongs to another process"):
            check_traceable(second.pid, uid,
                            Peer(second.pid, uid, 0, None, start_time(second.pid) + 1))
        os.close(pidfd)
    finally:
        second.communicate("")


def _uid_of(pid: int) -> int:
    """The owner of the process's /proc files: its uid once it is dumpable (after
    setpriv's exec; between its setreuid and the exec they are root's, and the directory
    itself is already the uid's)."""
    try:
        return os.stat(f"/proc/{pid}/stat").st_uid
    except FileNotFoundError:
        return -1


PRIVILEGED_PEER = r"""
import ctypes, grp, json, os, pwd, socket, sys
from renacerd.client import protocol
path, mode = sys.argv[1:3]
uid = pwd.getpwnam(sys.argv[3]).pw_uid
gid = grp.getgrnam("renacer").gr_gid
pid = os.fork()
if pid == 0:
    os.setgroups([gid])
    os.setresgid(gid, gid, gid)
    if mode == "saved-root":
        os.setresuid(uid, uid, 0)  # can become root again at will
    else:
        os.setresuid(uid, uid, uid)
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.send(protocol.encode(protocol.Hello()))
    s.send(protocol.encode(protocol.TraceMe(1, "atk-" + mode)))
    print(json.dumps(protocol.decode(s.recv(65536)).to_wire()), flush=True)
    os._exit(0)
os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.parametrize("mode,reason", [
    ("saved-root", "runs with uids [{uid}, {uid}, 0, {uid}]"),
    ("undumpable", "is not dumpable"),
])
def test_a_member_process_with_privilege_is_not_traced(front, member, mode, reason):
    name, uid = member
    r = subprocess.run([PY, "-c", PRIVILEGED_PEER, front.path, mode, name], env=env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ack = json.loads(r.stdout)
    assert ack["ok"] is False and reason.format(uid=uid) in ack["reason"], ack
    assert front.svc.stats["runs_started"] == 0


def test_a_plain_member_process_passes_the_checks(member):
    name, uid = member
    p = as_member("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    try:
        wait_for(lambda: _uid_of(p.pid) == uid, "the member's process")
        pidfd = os.pidfd_open(p.pid)
        check_traceable(p.pid, uid, Peer(p.pid, uid, 0, pidfd, start_time(p.pid)))
        os.close(pidfd)
        # Root's own requests need only the pin; another uid is refused.
        check_traceable(p.pid, 0)
        with pytest.raises(PeerChanged, match="runs with uids"):
            check_traceable(p.pid, uid + 1)
    finally:
        p.communicate("")


# -- per-uid limits ---------------------------------------------------------------------------

HOLD_AND_ASK = r"""
import logging, os, socket, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from renacerd.client import core as client, protocol
path, n = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.send(protocol.encode(protocol.Hello()))
    s.send(protocol.encode(protocol.StatusQuery()))
    s.recv(65536)
    held.append(s)
print("held", len(held), flush=True)
sys.stdin.readline()
client.configure(socket=path, run="limited", trace_timeout=10, ring=False)
print("traced", client.request_tracing(10), flush=True)
with client.experiment_span("goes-on", step=1):
    pass
print("ran", flush=True)
sys.stdin.readline()
"""


def test_connection_limits_refuse_clearly_and_root_keeps_a_slot(front, member, monkeypatch):
    monkeypatch.setattr(svcmod, "MAX_CONNECTIONS", 12)
    monkeypatch.setattr(svcmod, "ROOT_RESERVED", 4)
    monkeypatch.setattr(svcmod, "MAX_CONNECTIONS_PER_UID", 6)
    name, uid = member
    p = as_member(HOLD_AND_ASK, front.path, "6", stdin=subprocess.PIPE)
    try:
        assert p.stdout.readline() == "held 6\n", p.stderr.read()
        p.stdin.write("\n")
        p.stdin.flush()
        # The client says why and goes on untraced (fail open): its span code runs.
        assert p.stdout.readline() == "traced False\n"
        assert p.stdout.readline() == "ran\n"
        wait_for(lambda: front.svc.stats["rejected"] == 1, "the refusal")
        # Root's `renacer status` answers whatever members hold.
        from renacerd.cli.status import query

        assert query(front.path).runs == []
    finally:
        out, err = p.communicate("\n", timeout=30)
    assert (f"renacerd refused this connection: limit: uid {uid} has 6 connections open "
            "(at most 6 per user); going on untraced") in err
    assert p.returncode == 0


def test_the_last_connections_are_roots(front, member, monkeypatch):
    monkeypatch.setattr(svcmod, "MAX_CONNECTIONS", 8)
    monkeypatch.setattr(svcmod, "ROOT_RESERVED", 4)
    p = as_member(HOLD_AND_ASK, front.path, "4", stdin=subprocess.PIPE)
    try:
        assert p.stdout.readline() == "held 4\n", p.stderr.read()
        from renacerd.cli.status import query

        assert query(front.path).runs == []
        # A member's status query refused with the reason, in one line.
        r = subprocess.run(["setpriv", f"--reuid={MEMBER}", "--regid=nogroup",
                            "--groups=renacer", "--", PY, "-m", "renacerd.cli.renacer_main",
                            "status", "--socket", front.path], env=env(), capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2
        assert r.stderr == (f"renacer status: error: the service on {front.path} refused: "
                            "4 connections open (the last 4 are root's)\n")
    finally:
        p.communicate("\n\n", timeout=30)


def test_concurrent_runs_per_uid_are_limited(front, member):
    name, uid = member
    p = as_member("import sys; sys.stdin.read()", stdin=subprocess.PIPE)
    try:
        wait_for(lambda: _uid_of(p.pid) == uid, "the member's process")
        for i in range(svcmod.MAX_RUNS_PER_UID):
            front.svc.runs[f"held-{i}"] = svcmod.ServiceRun(f"held-{i}", uid, 1, "/nonexistent")
        pidfd = os.pidfd_open(p.pid)
        peer = Peer(p.pid, uid, 0, pidfd, start_time(p.pid))
        ok, reason, path = front.svc.trace_request(peer, "one-too-many")
        assert (ok, path) == (False, None)
        assert reason == (f"limit: uid {uid} has {svcmod.MAX_RUNS_PER_UID} runs traced "
                          f"(at most {svcmod.MAX_RUNS_PER_UID} per user)")
        peer.close()
    finally:
        front.svc.runs.clear()
        p.communicate("")


def test_span_limits_per_uid_and_per_run():
    from renacerd.experiment_span import ExperimentMetadata, SpanType
    from renacerd.serve.span_server import PeerCred
    from renacerd.serve.spans import SpanBook

    def start(book, peer, i, metrics=None):
        book.handle(peer, protocol.SpanStart(
            f"{i + 1:016x}", "a" * 32, None, "s", SpanType.EXPERIMENT,
            ExperimentMetadata("", None, None, None, metrics or {}), 1, 1, 1, 1))

    member = PeerCred(10, 1000, 1000, 1)
    other_conn = PeerCred(11, 1000, 1000, 2)
    root = PeerCred(12, 0, 0, 3)
    book = SpanBook(max_open_per_uid=5)
    for i in range(4):
        start(book, member, i)
    for i in range(4, 8):
        start(book, other_conn, i)  # the uid's cap spans its connections
    for i in range(8, 20):
        start(book, root, i)
    c = book.counts()
    assert (c["spans_started"], c["spans_limited_open"]) == (5 + 12, 3)
    # Bytes: a span named "s" with 256 metric names of 128 characters is 36,929 bytes
    # (SPAN_OVERHEAD 64 + 1 + 256 * (128 + 16)); a burst of 100,000 holds two, the rest of
    # a fast loop is refused (at 1 byte/s the bucket refills by well under one span while
    # the loop runs).
    metrics = {f"{k:0128d}": 1.0 for k in range(256)}
    book = SpanBook(bytes_per_s=1, bytes_burst=100_000)
    for i in range(10):
        start(book, member, i, metrics)
    assert (book.counts()["spans_started"], book.counts()["spans_limited_rate"]) == (2, 8)
    book = SpanBook(max_run_bytes=3 * 36_929)
    for i in range(10):
        start(book, member, i, metrics)
    c = book.limit_counters()
    assert (c["spans_limited_run_bytes"], c["span_bytes"]) == (7, 3 * 36_929)


# -- fd exhaustion ----------------------------------------------------------------------------

EMFILE_SERVER = r"""
import logging, os, resource, socket, sys, time
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from renacerd.serve.span_server import SpanServer, bind_socket
path = sys.argv[1]
srv = SpanServer(path, on_message=lambda p, m: None)
srv.start()
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
hogs = []
try:
    while True:
        hogs.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
print("full", flush=True)
sys.stdin.readline()   # clients are waiting in the backlog now
time.sleep(1.0)        # the window the counts below are about
errors = srv.stats["accept_errors"]
for fd in hogs:
    os.close(fd)
while srv.stats["connections"] < 10:
    time.sleep(0.01)
print(errors, srv.stats["connections"], flush=True)
srv.stop()
"""


def test_accept_at_emfile_backs_off_and_logs_one_line(tmp_path):
    path = str(tmp_path / "s.sock")
    p = subprocess.Popen([PY, "-c", EMFILE_SERVER, path], env=env(), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "full\n", p.stderr.read()
    clients = []
    for _ in range(10):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        c.connect(path)
        clients.append(c)
    out, err = p.communicate("\n", timeout=60)
    errors, served = map(int, out.split())
    # Backing off from 50 ms, doubling to 1 s, makes at most ~6 tries in that second (a
    # starved test host makes fewer); the spinning loop made thousands. Once descriptors are
    # free again every waiting client is served.
    assert 1 <= errors <= 12 and served == 10
    lines = [line for line in err.splitlines() if line.startswith("accept failed")]
    assert lines == ["accept failed: [Errno 24] Too many open files; 1 times so far"], err
    for c in clients:
        c.close()


LIVENESS_AT_EMFILE = r"""
import os, resource, sys
from types import SimpleNamespace
from renacerd.capture.tracer import Tracer, _proc_alive
dead = int(sys.argv[1])
st = SimpleNamespace(ended=False, missing_since=None)
t = SimpleNamespace(procs={os.getpid(): st}, liveness_errors=0,
                    _end_process=lambda *a: sys.exit("ended a live process"))
resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
hogs = []
try:
    while True:
        hogs.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
Tracer._check_liveness(t)
Tracer._check_liveness(t)
alive, gone = _proc_alive(os.getpid()), _proc_alive(dead)
os.close(hogs.pop())
print(alive, gone, t.liveness_errors, st.missing_since, _proc_alive(os.getpid()), flush=True)
"""


def test_liveness_is_never_inferred_from_a_failed_proc_open():
    dead = subprocess.Popen(["true"])
    dead.wait()
    r = subprocess.run([PY, "-c", LIVENESS_AT_EMFILE, str(dead.pid)], env=env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # Without descriptors /proc says nothing (None, counted twice, nothing ended); a gone pid
    # needs no descriptor to be known gone (the open fails with ENOENT, not EMFILE).
    assert r.stdout == "None False 2 None True\n"


# -- blocking closes ---------------------------------------------------------------------------

LINGER_SENDER = r"""
import os, socket, struct, sys
from renacerd.client import protocol
path, port, n, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
keep = []
for i in range(n):
    t = socket.socket()
    t.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 600))
    t.connect(("127.0.0.1", port))
    t.setblocking(False)
    try:
        while True:  # unsent data: its close waits up to 600 s for the peer to read
            t.send(b"x" * 65536)
    except BlockingIOError:
        pass
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.connect(path)
    if kind == "front":
        msg = protocol.Hello()
    else:
        c.send(protocol.encode(protocol.Hello()))
        msg = (protocol.Ring(protocol.RING_MIN) if i % 2 else protocol.SpanEnd(
            "1" * 16, protocol.StatusCode.OK, "", None, 1, 1, 1))
    socket.send_fds(c, [protocol.encode(msg)], [t.fileno()])
    keep += [c, t]
print("sent", flush=True)
os._exit(0)  # an exiting process's closes never linger: the receiver holds the last copy
"""


class Lingering:
    """The TCP peer of LINGER_SENDER's sockets: reads nothing, until release() resets
    every connection, which ends every lingering close."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]

    def send(self, path: str, n: int, kind: str, user: bool) -> None:
        """Run LINGER_SENDER (as the member when `user`) and wait for it to exit."""
        cmd = [PY, "-c", LINGER_SENDER, path, str(self.port), str(n), kind]
        if user:
            cmd = ["setpriv", f"--reuid={MEMBER}", "--regid=nogroup", "--groups=renacer",
                   "--", *cmd]
        r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=60)
        assert r.stdout == "sent\n", r.stderr

    def release(self) -> None:
        """Reset every connection (SO_LINGER 0 closes with RST)."""
        self.listener.setblocking(False)
        try:
            while True:
                peer, _ = self.listener.accept()
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                peer.close()
        except BlockingIOError:
            pass
        self.listener.close()


def _close_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "renacerd-close-fd")


def test_lingering_descriptors_never_block_the_span_server(tmp_path):
    got = []
    linger = Lingering()
    path = str(tmp_path / "s.sock")
    listening = bind_socket(path)
    # Sent and the sender gone before the server runs: its copies are the last ones.
    linger.send(path, 12, "span", user=False)
    srv = SpanServer(sock=listening, on_message=lambda p, m: got.append(m))
    srv.start()
    try:
        wait_for(lambda: srv.stats["descriptors_refused"] == 12, "12 descriptors refused")
        # The server thread is free: a good client's message arrives.
        c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        c.connect(path)
        c.send(protocol.encode(protocol.Hello(run="after")))
        wait_for(lambda: any(getattr(m, "run", None) == "after" for m in got), "the hello")
        c.close()
        # The reaper's pool, no more, is stuck in close(); the rest wait their turn.
        assert _close_threads() == FdReaper.POOL
        assert REAPER.pending() >= 12 - FdReaper.POOL
    finally:
        linger.release()
        srv.stop()
        os.unlink(path)
    wait_for(lambda: REAPER.pending() == 0, "the reaper to close everything")


def test_lingering_descriptors_on_the_front_socket(monkeypatch, member):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    linger = Lingering()
    front = Front(start=False)
    try:
        linger.send(front.path, 12, "front", user=True)
        front.start()
        wait_for(lambda: front.svc.stats["descriptors_refused"] == 12, "12 refusals")
        wait_for(lambda: not any(t.name.startswith("renacerd-front-")
                                 for t in threading.enumerate()), "the front threads to end")
        assert _close_threads() == FdReaper.POOL
        assert REAPER.pending() >= 12 - FdReaper.POOL
        from renacerd.cli.status import query

        assert query(front.path).runs == []
    finally:
        linger.release()
        front.close()
    wait_for(lambda: REAPER.pending() == 0, "the reaper to close everything")


# -- low --------------------------------------------------------------------------------------

def test_bad_connections_log_rate_limited_and_counted(front, caplog):
    caplog.set_level(logging.WARNING, logger="renacerd.service")
    for _ in range(200):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        c.connect(front.path)
        c.send(b"\xff garbage")
        c.close()
    wait_for(lambda: front.svc.stats["protocol_errors"] == 200, "200 protocol errors")
    lines = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(lines) == 1 and "protocol error (malformed" in lines[0]
    assert front.svc.warnings.counts["client"] == 200


def test_runs_directory_symlink_or_foreign_owner_is_refused(tmp_path, member):
    name, uid = member
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "runs"
    link.symlink_to(target)
    with pytest.raises(svcmod.ServiceError, match="is not a directory \\(a symlink\\?\\)"):
        svcmod.open_runs_dir(str(link))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700  # not chmodded through the link
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, uid, -1)
    with pytest.raises(svcmod.ServiceError, match=f"belongs to uid {uid}, not to us"):
        svcmod.open_runs_dir(str(theirs))


def test_per_run_sockets_are_unique(front, member, monkeypatch):
    name, uid = member
    started = []
    monkeypatch.setattr(front.svc, "_start", lambda run, peer: (started.append(run.socket),
                                                                run.ready.set()))
    procs = [as_member("import sys; sys.stdin.read()", stdin=subprocess.PIPE) for _ in range(2)]
    try:
        for i, p in enumerate(procs):
            wait_for(lambda p=p: _uid_of(p.pid) == uid, "the member's process")
            peer = Peer(p.pid, uid, 0, os.pidfd_open(p.pid), start_time(p.pid))
            assert front.svc.trace_request(peer, f"unique-{i}")[0]
            peer.close()
    finally:
        for p in procs:
            p.communicate("")
    assert len(set(started)) == 2
    assert all(os.path.basename(s) not in ("1.sock", "2.sock") for s in started)


def test_target_exiting_before_attach_is_one_line(tmp_path):
    target = subprocess.Popen([PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    p = subprocess.Popen([PY, "-m", "renacerd.cli.renacerd_main", "--pid", str(target.pid),
                          "--db", str(tmp_path / "t.db"), "--run", "gone", "--cuda", "off"],
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def loading() -> bool:
        # BPF maps exist: the probes are loading, the target was checked already.
        try:
            return any("bpf-map" in os.readlink(f"/proc/{p.pid}/fd/{n}")
                       for n in os.listdir(f"/proc/{p.pid}/fd"))
        except OSError:
            return False

    wait_for(loading, "the probes to load", timeout=120)
    target.kill()
    target.wait()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert err == f"renacerd: error: process {target.pid} exited before it could be traced\n"


# -- the store --------------------------------------------------------------------------------

def test_store_modes_whatever_the_umask_and_repair(tmp_path, monkeypatch, caplog):
    from renacerd.store import database as store_mod

    gid = grp.getgrnam("renacer").gr_gid
    old = os.umask(0)
    try:
        db = tmp_path / "new" / "traces.db"
        s = store_mod.Store(db, create=True)
        s.begin_run("r", cmdline=["x"], version="0", syscall_table={}, start_wall_ns=1,
                    start_mono_ns=1, owner_uid=0)
        s.commit()
        for path, mode in ((db.parent, 0o750), (db, 0o640), (Path(f"{db}-wal"), 0o640),
                           (Path(f"{db}-shm"), 0o640)):
            st = os.stat(path)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (mode, gid), path
        s.close()
        # An earlier version's world-readable default directory and store are repaired.
        legacy = tmp_path / "legacy"
        legacy.mkdir()
        os.chmod(legacy, 0o755)
        (legacy / "traces.db").touch(0o644)
        monkeypatch.setattr(store_mod, "ROOT_STORE_DIR", str(legacy))
        caplog.set_level(logging.WARNING, logger="renacerd.store.database")
        store_mod.Store(legacy / "traces.db", create=True).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(legacy).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(legacy / "traces.db").st_mode) == 0o640
    assert [r.getMessage() for r in caplog.records] == [
        f"store directory {legacy} was mode 0755 (readable by every user); now 0750",
        f"store file {legacy / 'traces.db'} was mode 0644 (readable by every user); now 0640",
    ]


def test_launch_mode_store_is_private_whatever_the_umask(tmp_path):
    db = tmp_path / "fresh" / "traces.db"
    r = subprocess.run([PY, "-m", "renacerd.cli.renacerd_main", "-q", "--db", str(db),
                        "--cuda", "off", "--", "true"], env=env(), capture_output=True,
                       text=True, timeout=180, preexec_fn=lambda: os.umask(0))
    assert r.returncode == 0, r.stderr
    gid = grp.getgrnam("renacer").gr_gid
    for path, mode in ((db.parent, 0o750), (db, 0o640)):  # -wal, -shm: gone at the close
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (mode, gid), path



def test_a_running_setuid_descendant_is_not_followed_at_attach(tmp_path, member):
    """A member's shell with a setuid-root program already running below it: a run owned by
    the member attaches to the shell and leaves the privileged child out (counted)."""
    bindir = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's tmp_path is not the member's
    bindir.chmod(0o755)
    suid = bindir / "suid-sleep"
    shutil.copy("/usr/bin/sleep", suid)
    os.chmod(suid, 0o4755)
    shell = subprocess.Popen(["setpriv", f"--reuid={MEMBER}", "--regid=nogroup",
                              "--groups=renacer", "--", "sh", "-c", f"{suid} 30 & wait"])
    try:
        wait_for(lambda: [_euid(c) for c in _children(shell.pid)] == [0],
                 "the setuid child to run")
        (child,) = _children(shell.pid)
        db = tmp_path / "t.db"
        r = subprocess.run([PY, "-m", "renacerd.cli.renacerd_main", "--pid", str(shell.pid),
                            "--owner-uid", str(member[1]), "--db", str(db), "--run", "a",
                            "--duration", "1", "-q", "--cuda", "off"],
                           env=env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"not following process {child}" in r.stderr
        from renacerd.store.database import Store
        store = Store(db)
        pids = [p.pid for _, p in store.processes(store.run("a").id)]
        assert pids == [shell.pid]
        out = subprocess.run([PY, "-m", "renacerd.cli.renacer_main", "show", "a", "--json",
                              "--db", str(db)], env=env(), capture_output=True, text=True)
        assert json.loads(out.stdout)["lost"]["sources"]["unfollowed_privileged"] == 1, out.stdout
    finally:
        shell.kill()
        subprocess.run(["pkill", "-f", str(suid)])
        shutil.rmtree(bindir, ignore_errors=True)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _euid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[2]) for ln in f if ln.startswith("Uid:"))
