"""The capture core end to end: real BPF, real processes with known syscall patterns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from renacerd.store.database import Store
from tests.conftest import ROOT, needs_root, run_cli

pytestmark = needs_root

PATTERN = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    const char *out = argv[1];
    char buf[64];
    memset(buf, 'x', sizeof buf);
    int fd = open(out, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    for (int i = 0; i < 20; i++) write(fd, buf, 64);
    close(fd);
    for (int i = 0; i < 7; i++) getppid();
    pid_t p = fork();
    if (p == 0) {
        for (int i = 0; i < 3; i++) getppid();
        _exit(7);
    }
    int st;
    waitpid(p, &st, 0);
    pid_t q = fork();
    if (q == 0) {
        execl("/bin/true", "true", "--version-not", (char *)0);
        _exit(99);
    }
    waitpid(q, &st, 0);
    return 3;
}
"""


def _counts(trace) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in trace.names():
        out[n] = out.get(n, 0) + 1
    return out


def _check_pattern(db: Path, run: str, out_file: Path, launched: bool) -> None:
    store = Store(db)
    info = store.run(run)
    assert info.status == "complete"
    assert info.events_lost == 0 and info.details_lost == 0
    traces = store.load_run(run)
    assert len(traces) == 3
    parent, child, execd = traces
    assert child.process.ppid == parent.pid and execd.process.ppid == parent.pid
    assert parent.process.exit_code == 3 and parent.process.exit_signal is None
    assert child.process.exit_code == 7
    assert execd.process.exit_code == 0
    assert execd.process.exe == "/bin/true" or execd.process.exe.endswith("/true")
    assert execd.process.argv == ["true", "--version-not"]
    assert execd.process.name == "true"

    pc = _counts(parent)
    # attach mode misses what ran before the attach; from the open on, all is exact
    assert pc["getppid"] == 7
    assert pc["write"] == 20
    assert pc["wait4"] == 2
    assert _counts(child) == {"getppid": 3, "set_robust_list": 1, "exit_group": 1} or (
        _counts(child)["getppid"] == 3
    )
    writes = [r for r in parent if r.name == "write"]
    assert all(r.return_value == 64 for r in writes)
    assert all(r.duration_nanos > 0 for r in writes)
    opens = [r for r in parent if r.name == "openat" and r.args.get("path") == str(out_file)]
    assert len(opens) == 1 and opens[0].return_value >= 3
    fd = opens[0].return_value
    assert all(r.args["fd"] == fd for r in writes)
    execs = [r for r in execd if r.name == "execve"]
    assert execs[0].args["path"] == "/bin/true"
    assert execs[0].args["argv"] == ["true", "--version-not"]
    if launched:
        assert parent.names()[0] == "execve"

    from renacerd.trace.fdtrack import file_io

    assert file_io(parent)[str(out_file)] == [0, 20 * 64]


def test_launch_mode_exact_pattern(cc, renacerd, db, tmp_path):
    exe = cc("pattern", PATTERN)
    out = tmp_path / "out.bin"
    r = renacerd("--run", "launch", "--", str(exe), str(out))
    assert r.returncode == 3, r.stderr  # the command's exit status
    assert "run launch: 3 processes" in r.stderr
    assert "0 lost" in r.stderr
    _check_pattern(db, "launch", out, launched=True)


STOPPED = PATTERN.replace(
    "    const char *out = argv[1];",
    '    const char *out = argv[1];\n    #include <signal.h>\n    raise(SIGSTOP);',
)


def _wait_state(pid: int, state: str, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never reached state {state}")


def test_attach_mode_to_stopped_process(cc, db, tmp_path):
    exe = cc("stopped", "#include <signal.h>\n" + STOPPED.replace("#include <signal.h>\n", ""))
    out = tmp_path / "out.bin"
    target = subprocess.Popen([str(exe), str(out)])
    try:
        _wait_state(target.pid, "T")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "renacerd.cli.renacerd_main", "--db", str(db), "--run",
             "attach", "--pid", str(target.pid)],
            stderr=subprocess.PIPE, text=True, env=env,
        )
        line = daemon.stderr.readline()
        assert "tracing run attach" in line
        os.kill(target.pid, signal.SIGCONT)
        assert target.wait(timeout=30) == 3
        rest = daemon.communicate(timeout=30)[1]
        assert daemon.returncode == 0, rest
    finally:
        if target.poll() is None:
            target.kill()
    _check_pattern(db, "attach", out, launched=False)
    store = Store(db)
    parent = store.load_run("attach")[0]
    assert parent.process.attached


THREADS = r"""
#include <pthread.h>
#include <unistd.h>
static void *work(void *a) { for (int i = 0; i < 5; i++) getppid(); return 0; }
int main(void) {
    pthread_t t[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], 0, work, 0);
    for (int i = 0; i < 2; i++) pthread_join(t[i], 0);
    getppid();
    return 0;
}
"""


def test_threads_stay_in_their_process(cc, renacerd, db):
    exe = cc("threads", THREADS, "-pthread")
    r = renacerd("-q", "--run", "thr", "--", str(exe))
    assert r.returncode == 0, r.stderr
    traces = Store(db).load_run("thr")
    assert len(traces) == 1
    t = traces[0]
    calls = [r for r in t if r.name == "getppid"]
    assert len(calls) == 11
    tids = {r.tid for r in calls}
    assert len(tids) == 3 and t.pid in tids
    assert sum(1 for r in calls if r.tid == t.pid) == 1


NEW_SYSCALLS = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/openat2.h>
int main(void) {
    struct open_how how = {.flags = O_RDONLY};
    long fd = syscall(SYS_openat2, AT_FDCWD, "/etc/hostname", &how, sizeof how);
    syscall(SYS_io_uring_setup, 0, (void *)0);   /* NULL params: EFAULT */
    syscall(435, (void *)0, 0);                   /* clone3 with a NULL struct: EINVAL */
    return fd >= 0 ? 0 : 1;
}
"""


def test_syscall_names_above_334(cc, renacerd, db):
    exe = cc("newsys", NEW_SYSCALLS)
    r = renacerd("-q", "--run", "new", "--", str(exe))
    assert r.returncode == 0, r.stderr
    t = Store(db).load_run("new")[0]
    recs = {r.name: r for r in t}
    assert recs["openat2"].args["path"] == "/etc/hostname"
    assert recs["openat2"].return_value >= 3
    assert recs["io_uring_setup"].errno == 14  # EFAULT: params are copied first
    assert recs["clone3"].errno in (14, 22)


EMPTY_PATHS = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    struct stat st;
    int fd = open("/etc/hostname", O_RDONLY);
    syscall(SYS_newfstatat, fd, "", &st, AT_EMPTY_PATH);   /* fstat as glibc does it */
    syscall(SYS_newfstatat, AT_FDCWD, "", &st, 0);          /* ENOENT */
    syscall(SYS_newfstatat, AT_FDCWD, "/etc/hostname", &st, 0);
    syscall(SYS_rename, "", "/nonexistent/x");               /* ENOENT, first path empty */
    return 0;
}
"""


def test_empty_paths_are_kept_without_detail_records(cc, renacerd, db):
    exe = cc("emptypaths", EMPTY_PATHS)
    r = renacerd("-q", "--run", "empty", "--", str(exe))
    assert r.returncode == 0, r.stderr
    t = Store(db).load_run("empty")[0]
    stats = [(x.args.get("path"), x.errno) for x in t if x.name == "newfstatat"]
    assert stats[-3:] == [("", None), ("", 2), ("/etc/hostname", None)]
    ren = [x for x in t if x.name == "rename"]
    assert [(x.args.get("path"), x.args.get("path2"), x.errno) for x in ren] == [
        ("", "/nonexistent/x", 2)]
    flags = t.columns["flags"][t.names() == "newfstatat"][-3:]
    assert [int(f) & 0x42 for f in flags] == [0x40, 0x40, 0x02]  # flag, flag, detail record


SOCKETS = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    bind(s, (struct sockaddr *)&a, sizeof a);
    listen(s, 1);
    socklen_t l = sizeof a;
    getsockname(s, (struct sockaddr *)&a, &l);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    connect(c, (struct sockaddr *)&a, sizeof a);
    int acc = accept(s, 0, 0);
    write(c, "hello", 5);
    char buf[8];
    read(acc, buf, 5);
    printf("%d\n", ntohs(a.sin_port));
    int u = socket(AF_UNIX, SOCK_DGRAM, 0);
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    strcpy(un.sun_path, argv[1]);
    bind(u, (struct sockaddr *)&un, sizeof un);
    int u6 = socket(AF_INET6, SOCK_DGRAM, 0);
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(9)};
    inet_pton(AF_INET6, "::1", &a6.sin6_addr);
    sendto(u6, "x", 1, 0, (struct sockaddr *)&a6, sizeof a6);
    return 0;
}
"""


def test_socket_addresses(cc, db, tmp_path):
    exe = cc("sockets", SOCKETS)
    sock_path = tmp_path / "u.sock"
    r = run_cli("renacerd_main", "--db", str(db), "-q", "--run", "net", "--", str(exe),
                str(sock_path))
    assert r.returncode == 0, r.stderr
    port = int(r.stdout.strip())
    t = Store(db).load_run("net")[0]
    by = {}
    for rec in t:
        by.setdefault(rec.name, []).append(rec)
    assert by["connect"][0].args["addr"] == f"inet:127.0.0.1:{port}"
    assert by["bind"][0].args["addr"] == "inet:127.0.0.1:0"
    assert by["bind"][1].args["addr"] == f"unix:{sock_path}"
    assert by["sendto"][-1].args["addr"] == "inet6:[::1]:9"
    assert by["getsockname"][0].args["addr"] == f"inet:127.0.0.1:{port}"
    from renacerd.trace.fdtrack import file_io

    io = file_io(t)
    assert io[f"socket:inet:127.0.0.1:{port}"][1] == 5


STORM = r"""
#include <unistd.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    for (long i = 0; i < n; i++) getppid();
    return 0;
}
"""


def test_tiny_ring_buffer_losses_are_counted(cc, renacerd, renacer, db):
    exe = cc("storm", STORM)
    n = 300_000
    r = renacerd("--run", "lossy", "--ring-mb", "0.004", "--", str(exe), str(n))
    assert r.returncode == 0, r.stderr
    assert "LOST EVENTS" in r.stderr
    info = Store(db).run("lossy")
    assert info.events_lost > 0
    assert sum(info.lost_per_cpu["events_lost"]) == info.events_lost
    t = Store(db).load_run("lossy")[0]
    got = sum(1 for x in t.names() if x == "getppid")
    assert got < n
    assert got + info.events_lost >= n
    shown = json.loads(renacer("show", "lossy", "--json").stdout)
    assert shown["lost_events"] == info.events_lost
    assert "LOSSES" in renacer("show", "lossy").stdout
    assert "!" in renacer("runs").stdout.splitlines()[1]


SLOW = r"""
#include <fcntl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_CREAT | O_WRONLY | O_TRUNC, 0644);
    for (int i = 0; i < 400; i++) { write(fd, "abcd", 4); usleep(10000); }
    return 0;
}
"""


def _start_daemon(db: Path, run: str, exe: Path, out: Path) -> subprocess.Popen:
    """renacerd launching `exe out` in the background, returned once it traces."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "renacerd.cli.renacerd_main", "--db", str(db), "--run", run,
         "--", str(exe), str(out)],
        stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert f"tracing run {run}" in daemon.stderr.readline()
    return daemon


def test_kill_9_daemon_leaves_readable_store(cc, db, tmp_path):
    exe = cc("slow", SLOW)
    daemon = _start_daemon(db, "killed", exe, tmp_path / "o")
    time.sleep(2.0)
    daemon.kill()
    daemon.wait()
    time.sleep(0.2)
    store = Store(db)
    info = store.run("killed")
    assert info.status == "incomplete"  # its daemon is gone
    t = store.load_run("killed")[0]
    writes = sum(1 for x in t.names() if x == "write")
    # 2 s at ~100 writes/s, committed at least every second
    assert writes >= 80
    # the next daemon start marks it incomplete in the file itself
    r = run_cli("renacerd_main", "--db", str(db), "-q", "--run", "next", "--", "/bin/true")
    assert r.returncode == 0, r.stderr
    row = store.db.execute("SELECT status FROM runs WHERE name='killed'").fetchone()
    assert row[0] == "incomplete"
    subprocess.run(["pkill", "-f", str(exe)], check=False)
    # no probe stayed behind: the daemon's perf events died with it
    assert "renacer" not in Path("/sys/kernel/tracing/uprobe_events").read_text()


def test_sigterm_detaches_and_flushes(cc, db, tmp_path):
    exe = cc("slow2", SLOW)
    daemon = _start_daemon(db, "term", exe, tmp_path / "o")
    time.sleep(0.5)
    daemon.send_signal(signal.SIGTERM)
    err = daemon.communicate(timeout=5)[1]  # a hang guard: it must not wait for the command
    assert "run term:" in err and "detached; command still running" in err
    assert daemon.returncode == 0
    assert Store(db).run("term").status == "complete"
    subprocess.run(["pkill", "-f", str(exe)], check=False)


def test_duration_stops_the_run(cc, renacerd, db, tmp_path):
    exe = cc("slow3", SLOW)
    r = renacerd("-q", "--run", "dur", "--duration", "0.5", "--", str(exe), str(tmp_path / "o"),
                 timeout=120)  # a hang guard: the start compiles, seconds on a loaded VM
    assert r.returncode == 0
    info = Store(db).run("dur")
    # stopped 0.5 s in: the program's 400 writes take 4 s, so far fewer of them are traced
    assert info.status == "complete" and 0 < info.events < 400
    subprocess.run(["pkill", "-f", str(exe)], check=False)


def test_store_is_compact(cc, renacerd, db):
    exe = cc("storm2", STORM)
    r = renacerd("-q", "--run", "big", "--", str(exe), "200000")
    assert r.returncode == 0
    store = Store(db)
    info = store.run("big")
    size = store.db.execute(
        "SELECT sum(length(data)) FROM chunks WHERE run_id=?", (info.id,)
    ).fetchone()[0]
    assert info.events >= 200_000
    assert size / info.events <= 16


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pid", "999999"], "no process with pid 999999"),
        (["--pid", "2"], "kernel thread"),
        (["--", "/nonexistent/cmd"], "cannot execute"),
        (["--pid", "1", "--", "true"], "exactly one"),
        ([], "exactly one"),
        (["--duration", "-1", "--", "true"], "--duration"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_input_one_line_exit_2(renacerd, args, message):
    r = renacerd(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_bad_store_paths(tmp_path):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not sqlite" * 100)
    before = corrupt.read_bytes()
    r = run_cli("renacerd_main", "--db", str(corrupt), "--", "/bin/true")
    assert r.returncode == 2 and "not a renacer store" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert corrupt.read_bytes() == before
    r = run_cli("renacerd_main", "--db", "/proc/renacer/x.db", "--", "/bin/true")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_existing_run_is_never_overwritten(renacerd, db):
    assert renacerd("-q", "--run", "same", "--", "/bin/true").returncode == 0
    events = Store(db).run("same").events
    r = renacerd("-q", "--run", "same", "--", "/bin/true")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert Store(db).run("same").events == events


def test_non_root_is_refused(tmp_path):
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
         "renacerd.cli.renacerd_main", "--db", str(tmp_path / "x.db"), "--", "/bin/true"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd="/",
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "renacerd: error: must run as root (BPF needs CAP_BPF and " \
        "CAP_PERFMON); try sudo"


def test_unknown_run_and_show_json_contract(cc, renacerd, renacer, db, tmp_path):
    exe = cc("pattern2", PATTERN)
    out = tmp_path / "o.bin"
    assert renacerd("-q", "--run", "j", "--", str(exe), str(out)).returncode == 3
    d = json.loads(renacer("show", "j", "--json").stdout)
    assert d["run"] == "j" and d["status"] == "complete" and d["lost_events"] == 0
    p = d["processes"][0]
    assert {"pid", "ppid", "comm", "exit_code", "syscalls", "files"} <= set(p)
    assert p["syscalls"]["getppid"]["calls"] == 7
    assert p["syscalls"]["getppid"]["errors"] == 0
    f = p["files"][str(out)]
    assert set(f) == {"bytes_read", "bytes_written", "created", "truncated", "appended"}
    assert (f["bytes_read"], f["bytes_written"]) == (0, 1280)
    # the launcher's own pre-exec read is not the program's unmatched exit
    assert d["lost"]["unmatched_exits"] == 0
    assert p["gpu"] is None  # no GPU calls: null, not a block of zeros
    assert [q["exit_code"] for q in d["processes"]] == [3, 7, 0]
    r = renacer("show", "nope")
    assert r.returncode == 2 and "no run named 'nope'" in r.stderr


EXEC_FROM_THREADS = r"""
#include <pthread.h>
#include <unistd.h>
static void *idle(void *a) { pause(); return 0; }
int main(void) {
    pthread_t t;
    pthread_create(&t, 0, idle, 0);
    usleep(1000);
    execl("/bin/sh", "sh", "-c", "exit 5", (char *)0);
    return 1;
}
"""


def test_exec_from_multithreaded_process_keeps_exit_code(cc, renacerd, db):
    # exec kills the other threads with SIGKILL; the process still ends with exit 5
    exe = cc("execthr", EXEC_FROM_THREADS, "-pthread")
    r = renacerd("-q", "--run", "xt", "--", str(exe))
    assert r.returncode == 5, r.stderr
    (t,) = Store(db).load_run("xt")
    assert (t.process.exit_code, t.process.exit_signal) == (5, None)
    assert t.process.argv == ["sh", "-c", "exit 5"]


def test_attach_to_itself_or_its_ancestor(db):
    cmd = (f"{sys.executable} -m renacerd.cli.renacerd_main -q --db {db} --run anc "
           "--duration 0.5 --pid $$")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # bash -c execs a lone command: $$ is then renacerd's own pid
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.endswith("is renacerd itself\n")
    # with a second command bash forks: $$ is the parent shell, renacerd its child
    r = subprocess.run(["bash", "-c", cmd + "; true"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    store = Store(db)
    info = store.run("anc")
    pids = [p.pid for _, p in store.processes(info.id)]
    assert info.daemon_pid not in pids and len(pids) == 1


LONG = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
static void run(char **argv) {
    pid_t p = fork();
    if (p == 0) { execv(argv[0], argv); _exit(127); }
    int st;
    waitpid(p, &st, 0);
}
int main(int argc, char **argv) {
    /* argv[1]: an existing directory whose path is 3000 bytes */
    char path[8192];
    snprintf(path, sizeof path, "%s/f", argv[1]);
    int fd = open(path, O_CREAT | O_WRONLY | O_EXCL, 0640);
    write(fd, "abc", 3);
    close(fd);
    memset(path, 'z', 5000);   /* over PATH_MAX: ENAMETOOLONG, captured cut */
    path[0] = '/';
    path[5000] = 0;
    struct stat sb;
    stat(path, &sb);
    static char *many[200], *big[8];
    static char bigarg[6][1501];
    many[0] = "/bin/true";
    for (int i = 1; i < 150; i++) many[i] = "a";   /* 150 short arguments: whole */
    run(many);
    big[0] = "/bin/true";
    for (int i = 0; i < 5; i++) { memset(bigarg[i], 'b', 1500); big[i + 1] = bigarg[i]; }
    run(big);                                       /* 7.5 KB of argv: cut */
    many[0] = "/nonexistent/cmd";                   /* fails: the caller's copy, 129+ cut */
    execv(many[0], many);
    return 0;
}
"""


def test_long_paths_whole_and_truncation_counted(cc, renacerd, renacer, db, tmp_path):
    exe = cc("longpaths", LONG)
    d = str(tmp_path)
    while len(d) < 3000:
        d += "/" + "d" * min(200, 3000 - len(d) - 1)
    os.makedirs(d)
    assert len(d) == 3000
    r = renacerd("-q", "--run", "long", "--", str(exe), d)
    assert r.returncode == 0, r.stderr
    store = Store(db)
    info = store.run("long")
    # the 5000-byte path, the 7.5 KB argv (kernel copy), the failed execve's 150 arguments
    assert info.truncated == 3
    assert info.failed_reads == 0 and info.details_lost == 0
    traces = store.load_run("long")
    parent = traces[0]
    opens = [x for x in parent if x.name == "openat" and x.args.get("path", "").endswith("/f")]
    assert len(opens) == 1 and opens[0].args["path"] == d + "/f"
    assert not opens[0].truncated and not opens[0].partial
    (st,) = [x for x in parent if x.name in ("stat", "newfstatat") and x.errno == 36]
    assert st.truncated and st.partial
    assert st.args["path"] == "/" + "z" * 4094  # PATH_MAX bytes with the NUL
    (failed,) = [x for x in parent if x.name == "execve" and x.errno == 2]
    assert failed.truncated
    assert failed.args["argv"] == ["/nonexistent/cmd"] + ["a"] * 127
    many, big = traces[1], traces[2]
    assert many.process.argv == ["/bin/true"] + ["a"] * 149
    (ex,) = [x for x in many if x.name == "execve"]
    assert not ex.truncated and ex.args["argv"] == many.process.argv
    (ex,) = [x for x in big if x.name == "execve"]
    assert ex.truncated
    assert "\0".join(big.process.argv).encode() == (
        b"/bin/true\0" + b"\0".join([b"b" * 1500] * 5))[:4096]
    shown = json.loads(renacer("show", "long", "--json").stdout)
    assert shown["lost"]["truncated"] == 3
    assert "3 records truncated" in renacer("show", "long").stdout
    runs = renacer("runs").stdout.splitlines()[1]
    assert runs.split()[6] == "3!" and runs.split()[7] == "3"
    from renacerd.io.jsonl import lines

    recs = [json.loads(x) for x in lines(traces) if b'"syscall"' in x]
    cut = [x for x in recs if x["truncated"]]
    assert len(cut) == 3 and all(x["partial"] for x in cut)


FUTIMENS = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_CREAT | O_WRONLY, 0644);
    futimens(fd, 0);                                      /* utimensat(fd, NULL, NULL, 0) */
    syscall(SYS_utimensat, fd, (char *)0, (void *)0, 0);
    int sv[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    sendto(sv[0], "x", 1, 0, (void *)0, 0);               /* connected: no address */
    struct stat st;
    syscall(SYS_newfstatat, fd, (char *)0, &st, AT_EMPTY_PATH);   /* NULL with AT_EMPTY_PATH */
    return 0;
}
"""


def test_allowed_null_pointers_are_not_failed_reads(cc, renacerd, renacer, db, tmp_path):
    exe = cc("futimens", FUTIMENS)
    r = renacerd("-q", "--run", "futimens", "--", str(exe), str(tmp_path / "f"))
    assert r.returncode == 0, r.stderr
    info = Store(db).run("futimens")
    assert info.failed_reads == 0 and info.lost == 0
    (t,) = Store(db).load_run("futimens")
    ut = [x for x in t if x.name == "utimensat"]
    assert len(ut) == 2 and all("path" not in x.args and not x.partial for x in ut)
    assert all(x.return_value == 0 for x in ut)
    (snd,) = [x for x in t if x.name == "sendto"]
    assert snd.return_value == 1 and "addr" not in snd.args
    assert renacer("runs").stdout.splitlines()[1].split()[6:8] == ["0", "0"]
    assert "losses: none" in renacer("show", "futimens").stdout


OPENS = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    chdir(argv[1]);
    close(open("a", O_CREAT | O_EXCL | O_WRONLY, 0640));
    close(openat(AT_FDCWD, "a", O_WRONLY | O_APPEND));
    close(syscall(SYS_creat, "c", 0600));
    struct open_how how = {.flags = O_CREAT | O_RDWR | O_TRUNC, .mode = 0604,
                           .resolve = RESOLVE_NO_SYMLINKS};
    close(syscall(SYS_openat2, AT_FDCWD, "d", &how, sizeof how));
    close(syscall(SYS_open, "a", O_RDONLY));
    return 0;
}
"""


def test_open_flags_and_mode_are_captured(cc, renacerd, db, tmp_path):
    exe = cc("opens", OPENS)
    r = renacerd("-q", "--run", "opens", "--", str(exe), str(tmp_path))
    assert r.returncode == 0, r.stderr
    (t,) = Store(db).load_run("opens")
    got = [(x.name, x.args["path"], x.args["flags"], x.args["mode"], x.args.get("resolve"))
           for x in t if x.name in ("open", "openat", "creat", "openat2")
           and x.args.get("path") in ("a", "c", "d")]
    assert got == [
        ("openat", "a", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640, None),
        ("openat", "a", os.O_WRONLY | os.O_APPEND, 0, None),
        ("creat", "c", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600, None),
        ("openat2", "d", os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o604, 0x04),
        ("open", "a", os.O_RDONLY, 0, None),
    ]
    # the aux column itself, for analysis in bulk
    sel = t.names() == "creat"
    assert t.columns["aux"][sel].tolist() == [os.O_CREAT | os.O_WRONLY | os.O_TRUNC]
    assert oct(os.stat(tmp_path / "d").st_mode & 0o777) == oct(0o604 & ~os.umask(os.umask(0)))


SUID_USER = "renacer-t1"


@pytest.fixture(scope="module")
def suid_id():
    """(uid, gid, path of a setuid-root copy of id in a directory the user can enter)."""
    import pwd
    import shutil
    import tempfile

    try:
        pw = pwd.getpwnam(SUID_USER)
    except KeyError:
        subprocess.run(["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", SUID_USER],
                       check=True)
        pw = pwd.getpwnam(SUID_USER)
    d = tempfile.mkdtemp(prefix="rsuid", dir="/tmp")
    os.chmod(d, 0o755)
    exe = os.path.join(d, "id-suid")
    shutil.copy("/usr/bin/id", exe)
    os.chown(exe, 0, 0)
    os.chmod(exe, 0o4755)
    yield pw.pw_uid, pw.pw_gid, exe
    shutil.rmtree(d, ignore_errors=True)


def _suid_run(renacerd, db, run, uid, gid, exe, *owner):
    r = renacerd("-q", "--run", run, *owner, "--", "setpriv", f"--reuid={uid}",
                 f"--regid={gid}", "--clear-groups", "/bin/sh", "-c",
                 f"{exe} -u; {exe} -u; echo done")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "0\n0\ndone\n"  # the traced job sees its setuid bit work either way
    return Store(db).load_run(run)


def test_privilege_gained_at_exec_stops_following(suid_id, renacerd, renacer, db):
    uid, gid, exe = suid_id
    traces = _suid_run(renacerd, db, "unpriv", uid, gid, exe, "--owner-uid", str(uid))
    assert Store(db).run("unpriv").owner_uid == uid
    ids = [t for t in traces if t.process.exe == exe]
    assert len(ids) == 2
    for t in ids:
        # the execve that gained privilege is the process's last record
        assert t.names().tolist()[-1] == "execve"
        last = list(t)[-1]
        assert last.args["path"] == exe and last.return_value == 0
        assert int(t.columns["flags"][-1]) & 0x100
        assert t.process.end_mono_ns is not None
    (sh,) = [t for t in traces if t.process.name == "sh"]
    assert [x.args["fd"] for x in sh if x.name == "write"] == [1]  # still followed: "done"
    info = Store(db).run("unpriv")
    assert info.source_counters["unfollowed_privileged"] == 2
    shown = json.loads(renacer("show", "unpriv", "--json").stdout)
    stopped = [p for p in shown["processes"] if p.get("stopped_following")]
    assert [p["pid"] for p in stopped] == [t.pid for t in ids]
    text = renacer("show", "unpriv").stdout
    assert text.count("stopped following: privilege gained at exec") == 2


def test_root_run_follows_into_privilege(suid_id, renacerd, db):
    uid, gid, exe = suid_id
    traces = _suid_run(renacerd, db, "rootrun", uid, gid, exe)
    ids = [t for t in traces if t.process.exe == exe]
    assert len(ids) == 2
    for t in ids:
        assert not (t.columns["flags"] & 0x100).any()
        writes = [x for x in t if x.name == "write"]
        assert len(writes) == 1 and writes[0].return_value == 2  # "0\n"
        assert t.process.exit_code == 0
    assert Store(db).run("rootrun").source_counters["unfollowed_privileged"] == 0
