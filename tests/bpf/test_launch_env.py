"""Launch mode does not change the program: `renacerd -- CMD` gives CMD exactly what it
would get untraced, and finds it on PATH before the traced exec (one execve, as strace)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

from tests.conftest import ROOT, needs_root

pytestmark = needs_root

# Everything a process inherits, one fact a line: dispositions (sigaction 1..64), mask,
# open fds, rlimits, nice, policy, affinity, ioprio, umask, cwd, process group, prctl
# state, cgroup, credentials and capabilities, environment.
ENVDUMP = r"""/* Print what a process inherits. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

extern char **environ;

static void cat(const char *path, const char *tag, const char *const *keep) {
    char line[4096];
    FILE *f = fopen(path, "r");
    if (!f) { printf("%s: cannot open\n", tag); return; }
    while (fgets(line, sizeof line, f)) {
        int ok = keep == NULL;
        for (const char *const *k = keep; k && *k; k++)
            if (strncmp(line, *k, strlen(*k)) == 0) ok = 1;
        if (ok) printf("%s: %s", tag, line);
    }
    fclose(f);
}

static int cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(void) {
    for (int sig = 1; sig <= 64; sig++) {
        struct sigaction sa;
        if (sigaction(sig, NULL, &sa) != 0) {
            printf("signal %d: error %d\n", sig, errno);
            continue;
        }
        const char *h = sa.sa_handler == SIG_DFL ? "default"
                        : sa.sa_handler == SIG_IGN ? "ignored" : "handled";
        printf("signal %d: %s flags=%#x\n", sig, h, (unsigned)sa.sa_flags);
    }
    sigset_t set;
    sigprocmask(SIG_BLOCK, NULL, &set);
    printf("blocked:");
    for (int sig = 1; sig <= 64; sig++) if (sigismember(&set, sig) == 1) printf(" %d", sig);
    printf("\n");
    DIR *d = opendir("/proc/self/fd");
    struct dirent *de;
    while ((de = readdir(d))) {
        int fd = atoi(de->d_name);
        if (de->d_name[0] == '.' || fd == dirfd(d)) continue;
        char p[64], target[4096];
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(p, target, sizeof target - 1);
        target[n < 0 ? 0 : n] = 0;
        char *br = strchr(target, '[');  /* pipe:[inode]: the inode differs per run */
        if (br && (strncmp(target, "pipe:", 5) == 0 || strncmp(target, "socket:", 7) == 0))
            *br = 0;
        printf("fd %d: %s fdflags=%d flags=%#o\n", fd, target, fcntl(fd, F_GETFD),
               fcntl(fd, F_GETFL));
    }
    closedir(d);
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        struct rlimit rl;
        getrlimit(r, &rl);
        printf("rlimit %d: %llu %llu\n", r, (unsigned long long)rl.rlim_cur,
               (unsigned long long)rl.rlim_max);
    }
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0);
    printf("nice: %d errno %d\n", nice, errno);
    struct sched_param sp;
    sched_getparam(0, &sp);
    printf("policy: %d priority %d\n", sched_getscheduler(0), sp.sched_priority);
    cpu_set_t cpus;
    sched_getaffinity(0, sizeof cpus, &cpus);
    printf("cpus: %d\n", CPU_COUNT(&cpus));
    printf("ioprio: %ld\n", syscall(SYS_ioprio_get, 1, 0));
    mode_t um = umask(0);
    umask(um);
    printf("umask: %03o\n", um);
    char cwd[4096];
    printf("cwd: %s\n", getcwd(cwd, sizeof cwd));
    printf("pgrp: %d sid: %d\n", getpgrp(), getsid(0));
    printf("no_new_privs: %d timerslack: %d dumpable: %d pdeathsig-none personality: %#x\n",
           prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0), prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0),
           prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), personality(0xffffffff));
    cat("/proc/self/cgroup", "cgroup", NULL);
    cat("/proc/self/oom_score_adj", "oom_score_adj", NULL);
    static const char *const status[] = {"Uid", "Gid", "Groups", "Umask", "SigBlk", "SigIgn",
        "SigCgt", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp",
        "Cpus_allowed_list", "Mems_allowed_list", NULL};
    cat("/proc/self/status", "status", status);
    int n = 0;
    while (environ[n]) n++;
    qsort(environ, n, sizeof *environ, cmp);
    for (int i = 0; i < n; i++) printf("env: %s\n", environ[i]);
    return 0;
}
"""

CALLER_IGNORES = (signal.SIGHUP, signal.SIGUSR1, signal.SIGINT, signal.SIGRTMIN + 3)
CALLER_BLOCKS = (signal.SIGUSR2, signal.SIGRTMIN + 5)


def _odd_caller(extra_fd: int):
    """What an unusual caller gives its child (run in the child before exec)."""

    def setup() -> None:
        for s in CALLER_IGNORES:
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, CALLER_BLOCKS)
        resource.setrlimit(resource.RLIMIT_CORE, (4096, 8192))
        resource.setrlimit(resource.RLIMIT_NOFILE, (900, 4096))
        # renacerd may raise RLIMIT_NICE for itself (to leave SCHED_IDLE), never for the
        # command: lowered here so that a raise would show (0 0 cannot be lowered)
        soft, hard = resource.getrlimit(resource.RLIMIT_NICE)
        resource.setrlimit(resource.RLIMIT_NICE, (min(soft, 1), min(hard, 1)))
        os.nice(3)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        os.umask(0o027)

    return setup


def _env(**extra: str | bytes) -> dict[bytes, bytes]:
    e = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
    e[b"PYTHONPATH"] = os.fsencode(ROOT)
    e.pop(b"RENACER_SOCKET", None)
    for k, v in extra.items():
        e[k.encode()] = v if isinstance(v, bytes) else v.encode()
    return e


def _dump(argv: list[str], cwd, env, extra_fd: int) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, stdin=subprocess.DEVNULL,
                          preexec_fn=_odd_caller(extra_fd), pass_fds=(extra_fd,), timeout=120)


def test_launched_command_inherits_exactly_what_the_caller_gave(cc, db, tmp_path):
    exe = cc("envdump", ENVDUMP)
    work = tmp_path / "work dir"
    work.mkdir()
    extra = os.open(tmp_path / "kept.txt", os.O_RDWR | os.O_CREAT, 0o600)
    os.set_inheritable(extra, True)
    try:
        # a non-UTF-8 environment value travels through renacerd as the same bytes
        env = _env(RENACER_ODD=b"caf\xe9 \xff")
        plain = _dump([str(exe)], work, env, extra)
        traced = _dump([sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db",
                        str(db), "--run", "env", "--", str(exe)], work, env, extra)
    finally:
        os.close(extra)
    assert plain.returncode == 0 and traced.returncode == 0, traced.stderr
    got = traced.stdout.splitlines()
    sock = [ln for ln in got if ln.startswith(b"env: RENACER_SOCKET=")]
    assert len(sock) == 1  # the one intended difference
    assert [ln for ln in got if ln not in sock] == plain.stdout.splitlines()
    # and the caller's oddities are really there (the comparison is not vacuous)
    lines = set(plain.stdout.splitlines())
    for s in CALLER_IGNORES:
        assert f"signal {int(s)}: ignored flags=0".encode() in lines
    for s in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM):
        assert f"signal {int(s)}: default flags=0".encode() in lines
    blocked = " ".join(str(int(s)) for s in sorted(CALLER_BLOCKS))
    assert f"blocked: {blocked}".encode() in lines
    nice_lim = min(resource.getrlimit(resource.RLIMIT_NICE)[1], 1)
    assert f"rlimit {resource.RLIMIT_NICE}: {nice_lim} {nice_lim}".encode() in lines
    assert f"rlimit {resource.RLIMIT_CORE}: 4096 8192".encode() in lines
    assert f"policy: {os.SCHED_BATCH} priority 0".encode() in lines
    assert b"umask: 027" in lines
    assert f"cwd: {work}".encode() in lines
    assert f"fd {extra}: {tmp_path / 'kept.txt'} fdflags=0 flags=0100002".encode() in lines
    assert sum(ln.startswith(b"fd ") for ln in lines) == 4  # 0, 1, 2 and the caller's
    assert b"env: RENACER_ODD=caf\xe9 \xff" in lines
    # nice: the caller's 3 on top of pytest's own
    assert f"nice: {os.getpriority(os.PRIO_PROCESS, 0) + 3} errno 0".encode() in lines


def _show(renacer, run: str) -> dict:
    r = renacer("show", run, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_sigpipe_pipeline_behaves_and_is_recorded_as_untraced(renacerd, renacer):
    script = "yes | head -1; echo ${PIPESTATUS[*]}"
    plain = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    r = renacerd("-q", "--run", "pipe", "--", "bash", "-c", script)
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout == "y\n141 0\n"
    assert "Broken pipe" not in r.stderr
    procs = {p["comm"]: p for p in _show(renacer, "pipe")["processes"]}
    assert (procs["yes"]["exit_signal"], procs["yes"]["exit_code"]) == (signal.SIGPIPE, None)
    assert (procs["head"]["exit_signal"], procs["head"]["exit_code"]) == (None, 0)
    assert (procs["bash"]["exit_signal"], procs["bash"]["exit_code"]) == (None, 0)


def test_path_search_is_not_in_the_trace(renacerd, renacer, tmp_path):
    # PATH with directories before the one that holds ls: execvp would try each of them
    path = os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b"), "/usr/bin", "/bin"])
    r = renacerd("-q", "--run", "ls", "--", "ls", str(tmp_path), env={"PATH": path})
    assert r.returncode == 0, r.stderr
    (p,) = _show(renacer, "ls")["processes"]
    assert p["syscalls"]["execve"] == {**p["syscalls"]["execve"], "calls": 1, "errors": 0}
    assert p["exe"] == "/usr/bin/ls" and p["argv"] == ["ls", str(tmp_path)]


def test_path_search_follows_execvp(renacerd, renacer, tmp_path, cc):
    # no PATH at all: execvp's default (/bin:/usr/bin)
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db",
                        str(tmp_path / "t.db"), "--run", "nopath", "--", "true"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    (proc,) = _show_db(tmp_path / "t.db", "nopath")["processes"]
    assert proc["exe"] == "/bin/true" and proc["syscalls"]["execve"]["calls"] == 1
    # a name with a '/' is not searched; a shell script without #! runs under /bin/sh
    script = tmp_path / "bare"
    script.write_text("echo from-sh $1\n")
    script.chmod(0o755)
    r = subprocess.run([sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db",
                        str(tmp_path / "t.db"), "--run", "bare", "--", "./bare", "x"],
                       env={**env, "PATH": "/nowhere"}, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "from-sh x\n"


def _show_db(db, run: str) -> dict:
    from tests.conftest import run_cli

    r = run_cli("renacer_main", "show", run, "--json", "--db", str(db))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_missing_or_unexecutable_command_is_one_line_exit_2(renacerd, db, tmp_path):
    r = renacerd("--", "no-such-command-here")
    assert (r.returncode, r.stderr) == (
        2, "renacerd: error: cannot execute 'no-such-command-here': not found on PATH\n")
    r = renacerd("--", str(tmp_path / "missing"))
    assert (r.returncode, r.stderr) == (
        2, f"renacerd: error: cannot execute '{tmp_path / 'missing'}': no such file\n")
    data = tmp_path / "data.txt"
    data.write_text("not a program\n")
    r = renacerd("--", str(data))
    assert (r.returncode, r.stderr) == (
        2, f"renacerd: error: cannot execute '{data}': permission denied\n")
    r = renacerd("--", str(tmp_path))  # a directory
    assert r.returncode == 2 and r.stderr.endswith("permission denied\n")
    assert not db.exists()  # refused before anything was written
