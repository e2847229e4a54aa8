"""The programs the oracle runs, each under strace and under renacerd, and how it runs them.

Both runs of a case happen in the same directory (emptied and set up again in between) with
the same environment, so argv and paths are the same; only renacerd's RENACER_SOCKET is
extra. Each case's slacks say which counts may differ and why; everything else must match.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from tests.oracle import renacer_view, strace_log
from tests.oracle.diff import FUTEX, Outcome, Slack, compare

ROOT = Path(__file__).resolve().parents[2]
STRACE = ("strace", "-f", "-y", "-s", "4096")
TIMEOUT = 120
SOCKET_VAR = "RENACER_SOCKET"
ADDR_NO_RANDOMIZE = 0x0040000


@dataclass(frozen=True, slots=True)
class Case:
    """One program: how to prepare its directory, its command, what it must write."""

    name: str
    cmd: tuple[str, ...]
    files: dict[str, str | bytes] = field(default_factory=dict)
    programs: dict[str, str] = field(default_factory=dict)
    fifos: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    slacks: tuple[Slack, ...] = ()
    serve: int = 0  # >0: attach with --pid to a server the case starts, this many requests


def _text(n: int) -> str:
    """`n` lines of varied, compressible text."""
    return "".join(f"line {i} {'abcdefghij' * (i % 7)}\n" for i in range(n))


def _blob(n: int) -> bytes:
    """`n` bytes that compress somewhat (a fixed pseudo-random walk)."""
    x, out = 12345, bytearray()
    while len(out) < n:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out += bytes([65 + (x >> 16) % 8]) * (1 + (x >> 8) % 5)
    return bytes(out[:n])


HELLO = "#include <stdio.h>\nint main(void) { puts(\"hello\"); return 0; }\n"

# a.txt's job waits on a fifo that b.txt's job writes: the first job is always still
# running when make starts the second (which then takes a jobserver token), whatever the
# timing, and the last job starts after both have ended.
MAKEFILE = textwrap.dedent("""\
    all: all.txt
    all.txt: a.txt b.txt
    \tcat a.txt b.txt > all.txt
    a.txt:
    \tcat sync.fifo > a.txt
    b.txt:
    \tprintf 'bbbbbb\\n' > b.txt; printf 'aaaa\\n' > sync.fifo
    """)

PY_THREADS = textwrap.dedent("""\
    import threading
    both = threading.Barrier(2)  # both threads alive at once: each maps its own malloc arena
    def work(i):
        both.wait()
        with open(f"out{i}.txt", "wb", buffering=0) as f:
            for _ in range(20):
                f.write(bytes([65 + i]) * 100)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    # join() returns once a thread's Python state is gone, before its OS thread has blocked
    # signals, freed its stack and called exit: without this pause exit_group may kill it
    # in that window (seen under load: one exit, madvise and rt_sigprocmask fewer)
    import time
    time.sleep(0.2)
    """)

SEGV = r"""
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>
int main(void) {
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);      /* no core file in the work directory */
    int fd = open("before.txt", O_CREAT | O_WRONLY | O_TRUNC, 0644);
    write(fd, "written before the fault\n", 25);
    close(fd);
    *(volatile int *)0 = 1;
    return 0;
}
"""

SIGKILL = r"""
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    pid_t p = fork();
    if (p == 0) {
        int fd = open("child.txt", O_CREAT | O_WRONLY | O_TRUNC, 0644);
        write(fd, "child\n", 6);
        close(fd);
        kill(getpid(), SIGKILL);
        return 1;
    }
    int st;
    waitpid(p, &st, 0);
    return WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL ? 0 : 1;
}
"""

SERVER = textwrap.dedent("""\
    import http.server
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"ok " + self.path.encode() + b"\\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            if self.path == "/quit":
                self.server.done = True
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.done = False
    print(server.server_address[1], flush=True)
    while not server.done:
        server.handle_request()
    """)

# The attached server is blocked in poll() when the tracer arrives.
ATTACH_CALL = (
    Slack(frozenset({"restart_syscall"}), "strace's attach interrupts the call the server is "
          "blocked in, which resumes as restart_syscall (renacerd interrupts nothing)", 1),
    Slack(frozenset({"poll"}), "the poll() in progress at the attach: renacerd sees it return "
          "(a record without its entry), strace shows it as restart_syscall", 1),
)



def arena(program: str, threads: int) -> Slack:
    """mmap/munmap of the malloc arenas of `threads` threads of `program`."""
    return Slack(frozenset({"mmap", "munmap"}), "glibc maps a thread's malloc arena at an "
                 "aligned address: a mapping that lands aligned is kept, one that does not is "
                 "mapped again at twice the size and trimmed, so an arena costs one or two mmap "
                 "and up to two munmap; where it lands depends on whether the other thread's "
                 "stack or arena was mapped first (seen varying by one between two runs under "
                 "the same tracer)", threads, program=program)


# no user site, no bytecode written; the hash seed is fixed in case_env (set and dict sizes
# decide when Python maps and unmaps its arenas)
PY = (sys.executable, "-s", "-B")

CASES: tuple[Case, ...] = (
    Case("tar", ("tar", "-cf", "archive.tar", "-C", "src", "."),
         files={"src/a/changelog": _text(60), "src/b/changelog": _text(90),
                "src/c/notes.txt": _text(10)},
         outputs=("archive.tar",)),
    Case("gzip", ("gzip", "-k", "-9", "data.txt"), files={"data.txt": _text(800)},
         outputs=("data.txt.gz",)),
    Case("gcc", ("gcc", "-save-temps", "-O1", "-o", "hello", "hello.c"),
         files={"hello.c": HELLO}, outputs=("hello.i", "hello.s")),
    Case("make -j2", ("make", "-j2"), files={"Makefile": MAKEFILE}, fifos=("sync.fifo",),
         outputs=("a.txt", "b.txt", "all.txt"),
         slacks=(Slack(frozenset({"wait4"}), "make reaps with wait4(WNOHANG) in a loop after "
                       "each job: a poll that finds the other job still running returns 0 and "
                       "adds one call, so the count depends on which of the two jobs, ended "
                       "within microseconds of each other, make sees first", 1,
                       program="make"),)),
    Case("git", ("sh", "-c", "git init -q && git add . && git commit -q -m first"),
         files={"README": _text(20), "src/main.c": HELLO},
         slacks=(Slack(frozenset({"getrandom"}), "git's count of getrandom calls varies by "
                       "one between runs of the same command: 5 or 6 for the whole tree in "
                       "12 runs under strace alone", 1, "git"),)),
    Case("xz -T2", ("xz", "-T2", "--block-size=65536", "-k", "data.bin"),
         files={"data.bin": _blob(256 * 1024)}, outputs=("data.bin.xz",),
         slacks=(arena("xz", 2),)),
    Case("find", ("find", "src", "-type", "f", "-name", "*.txt"),
         files={"src/a/one.txt": "1", "src/a/b/two.txt": "2", "src/c/three.c": "3"}),
    Case("cp", ("cp", "big.bin", "copy.bin"), files={"big.bin": _blob(256 * 1024)},
         outputs=("copy.bin",)),
    Case("pipeline with SIGPIPE", ("bash", "-c", "yes | head -1; echo ${PIPESTATUS[*]}"),
         slacks=(Slack(frozenset({"write"}), "yes writes 8 KiB at a time until head has read "
                       "once (up to 128 KiB) and exited: from 2 writes (one read, one refused) "
                       "to 17 (a full 64 KiB pipe twice, one refused), by scheduling", 15,
                       program="yes"),)),
    Case("python threads", (*PY, "threads.py"), files={"threads.py": PY_THREADS},
         outputs=("out0.txt", "out1.txt"), slacks=(arena("python*", 2),)),
    Case("SIGSEGV", ("{build}/segv",), programs={"segv": SEGV}, outputs=("before.txt",)),
    Case("SIGKILL", ("{build}/sigkill",), programs={"sigkill": SIGKILL},
         outputs=("child.txt",)),
    Case("--pid http.server", (*PY, "server.py"), files={"server.py": SERVER}, serve=5,
         slacks=ATTACH_CALL),
)


def case_env(work: Path) -> dict[str, str]:
    """The environment both runs of a case get: fixed locale, zone, home and git identity."""
    env = dict(os.environ)
    env.pop(SOCKET_VAR, None)
    env.update(LC_ALL="C", TZ="UTC", HOME=str(work), PYTHONPATH=str(ROOT), PYTHONHASHSEED="0",
               GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="o", GIT_AUTHOR_EMAIL="o@x",
               GIT_COMMITTER_NAME="o", GIT_COMMITTER_EMAIL="o@x",
               GIT_AUTHOR_DATE="2024-01-01T00:00:00Z", GIT_COMMITTER_DATE="2024-01-01T00:00:00Z")
    return env


def _fixed_layout() -> None:
    """In the child before it execs a tracer or a server: no address space randomisation
    (inherited by everything it starts), so where mmap puts malloc's arenas and Python's
    allocator maps, and with that their mmap/munmap counts, is the same in both runs."""
    ctypes.CDLL(None, use_errno=True).personality(ADDR_NO_RANDOMIZE)


def _as_renacerd_sets_it(env: dict[str, str]) -> dict[str, str]:
    """`env` plus the one variable renacerd adds in launch mode, with a value as long as
    its private socket's path (the environment's size moves the stack and the heap)."""
    return {**env, SOCKET_VAR: os.path.join(tempfile.gettempdir(), "renacerd-" + "x" * 8,
                                            "spans.sock")}


def _prepare(case: Case, work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    for rel, content in case.files.items():
        f = work / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            f.write_bytes(content)
        else:
            f.write_text(content)
    work.mkdir(parents=True, exist_ok=True)
    for rel in case.fifos:
        os.mkfifo(work / rel)
    for f in work.rglob("*"):  # mtimes in the past: no racy-git re-reads, no make rebuilds
        os.utime(f, (1_600_000_000, 1_600_000_000), follow_symlinks=False)


def _build(case: Case, build: Path) -> None:
    build.mkdir(parents=True, exist_ok=True)
    for name, src in case.programs.items():
        exe = build / name
        if not exe.exists():
            (build / f"{name}.c").write_text(src)
            subprocess.run(["gcc", "-O1", "-o", str(exe), str(build / f"{name}.c")], check=True)


def _renacerd(db: Path, run: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "renacerd.cli.renacerd_main", "--db", str(db), "--run", run,
            *args]


@dataclass(slots=True)
class Side:
    """One traced run of a case: the tracer's process view, the command's output, and the
    sizes of the case's outputs afterwards."""

    procs: dict
    stdout: str
    sizes: dict[str, int | None]
    lost: int = 0


def _sizes(case: Case, work: Path) -> dict[str, int | None]:
    return {o: (work / o).stat().st_size if (work / o).exists() else None for o in case.outputs}


def _launch(case: Case, work: Path, cmd: list[str], tracer: list[str],
            env: dict[str, str]) -> str:
    p = subprocess.run([*tracer, *cmd], cwd=work, env=env, capture_output=True,
                       preexec_fn=_fixed_layout,
                       text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    if "renacerd: error" in p.stderr or p.stderr.startswith("strace:"):
        raise RuntimeError(f"{tracer[0]} failed on {case.name}: {p.stderr.strip()}")
    return p.stdout


def _serve(case: Case, work: Path, tracer: list[str], ready: str) -> tuple[str, list[str]]:
    """Start the case's server untraced, attach `tracer` to it, make `case.serve` requests
    and a last one that stops it; its stdout and argv."""
    server = subprocess.Popen(list(case.cmd), cwd=work, env=case_env(work), text=True,
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              preexec_fn=_fixed_layout)
    try:
        port = int(server.stdout.readline())
        argv = (Path(f"/proc/{server.pid}/cmdline").read_bytes().rstrip(b"\0")
                .decode().split("\0"))
        t = subprocess.Popen([*(a.replace("{pid}", str(server.pid)) for a in tracer)],
                             stderr=subprocess.PIPE, text=True, env=case_env(work))
        while ready not in (line := t.stderr.readline()):
            if not line:
                raise RuntimeError(f"{tracer[0]} did not attach: {t.communicate()[1]}")
        for path in [f"/r{i}" for i in range(case.serve)] + ["/quit"]:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            c.request("GET", path)
            c.getresponse().read()
            c.close()
        err = t.communicate(timeout=TIMEOUT)[1]
        if "renacerd: error" in err:
            raise RuntimeError(f"renacerd failed on {case.name}: {err.strip()}")
        return server.communicate(timeout=TIMEOUT)[0], argv
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def under_strace(case: Case, work: Path, build: Path) -> Side:
    """Run the case under `strace -f` and parse what it printed."""
    _prepare(case, work)
    log = work.parent / f"{work.name}.strace"
    cmd = [a.replace("{build}", str(build)) for a in case.cmd]
    if case.serve:
        out, argv = _serve(case, work, [*STRACE, "-o", str(log), "-p", "{pid}"], "attached")
        procs = strace_log.processes(strace_log.parse(log.read_text()), attached=True)
        procs[next(iter(procs))].argv = argv
    else:
        out = _launch(case, work, cmd, [*STRACE, "-q", "-o", str(log)],
                      _as_renacerd_sets_it(case_env(work)))
        procs = strace_log.processes(strace_log.parse(log.read_text()))
    return Side(procs, out, _sizes(case, work))


def under_renacerd(case: Case, work: Path, build: Path, db: Path) -> Side:
    """Run the case under renacerd and read the run back through `renacer show --json`."""
    _prepare(case, work)
    for f in db.parent.glob(db.name + "*"):  # a run name is never reused in one store
        f.unlink()
    run = work.name
    cmd = [a.replace("{build}", str(build)) for a in case.cmd]
    if case.serve:
        out, _ = _serve(case, work, _renacerd(db, run, "--pid", "{pid}"), "tracing run")
    else:
        out = _launch(case, work, cmd, [*_renacerd(db, run, "-q"), "--"], case_env(work))
    shown = renacer_view.show_json(db, run)
    return Side(renacer_view.processes(shown), out, _sizes(case, work),
                renacer_view.losses(shown))


def _written(procs: dict, path: Path) -> int:
    key = os.path.realpath(path)
    return sum(p.files.get(key, [0, 0])[1] for p in procs.values())


def run_case(case: Case, base: Path) -> Outcome:
    """Run one case both ways under `base` and compare everything."""
    slug = "".join(c if c.isalnum() else "-" for c in case.name).strip("-")
    work = base / slug / "work"
    build = base / "build"
    _build(case, build)
    s = under_strace(case, work, build)
    r = under_renacerd(case, work, build, base / slug / "traces.db")
    out = Outcome(case.name)
    compare(out, s.procs, r.procs, (FUTEX, *case.slacks))
    out.add("(command)", "stdout", s.stdout, r.stdout)
    out.add("(run)", "events lost, failed reads, truncated records", 0, r.lost)
    for o in case.outputs:
        # a file written front to back: the bytes written to it are its size
        out.add("(file system)", f"{o}: size under strace, bytes strace saw written",
                s.sizes[o], _written(s.procs, work / o))
        out.add("(file system)", f"{o}: size under renacerd, bytes renacerd saw written",
                r.sizes[o], _written(r.procs, work / o))
    return out
