"""Files of real programs (tar, make + gcc, dash, cp) as `renacer show --json` reports them."""

from __future__ import annotations

import json
import os
import textwrap

from renacerd.store.database import Store
from tests.conftest import needs_root

pytestmark = needs_root


def _show(renacerd, renacer, run: str, *cmd: str) -> dict:
    r = renacerd("--run", run, "--", *cmd)
    assert r.returncode == 0, r.stderr
    s = renacer("show", run, "--json")
    assert s.returncode == 0, s.stderr
    return json.loads(s.stdout)


def _by_argv0(d: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in d["processes"]:
        out.setdefault(os.path.basename(p["argv"][0]) if p["argv"] else p["comm"],
                       []).append(p)
    return out


def test_tar_two_directories_same_name(renacerd, renacer, tmp_path):
    """`tar -C d1 f.txt -C d2 f.txt`: two files named f.txt, two lines, exact bytes."""
    for d, body in (("d1", b"hello\n"), ("d2", b"hello-world-2\n")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "f.txt").write_bytes(body)
    out = tmp_path / "out.tar"
    d = _show(renacerd, renacer, "tar", "tar", "-cf", str(out), "-C", str(tmp_path / "d1"),
              "f.txt", "-C", str(tmp_path / "d2"), "f.txt")
    (tar,) = d["processes"]
    files = tar["files"]
    assert files[str(tmp_path / "d1" / "f.txt")]["bytes_read"] == 6
    assert files[str(tmp_path / "d2" / "f.txt")]["bytes_read"] == 14
    assert "f.txt" not in files
    # tar writes its archive with write(2) in 10240-byte records
    assert files[str(out)]["bytes_written"] == out.stat().st_size == 10240
    assert files[str(out)]["created"] is True and files[str(out)]["truncated"] is True
    assert d["lost"]["unmatched_exits"] == 0
    assert tar["gpu"] is None


def test_make_gcc_relative_paths(renacerd, renacer, tmp_path):
    """make -C DIR chdirs, then gcc's children open hello.c and Makefile by relative name."""
    src = tmp_path / "proj"
    src.mkdir()
    (src / "hello.c").write_text("int main(void) { return 0; }\n")
    (src / "Makefile").write_text(textwrap.dedent("""\
        hello: hello.c
        \tgcc -O0 -o hello hello.c
        """))
    d = _show(renacerd, renacer, "make", "make", "-s", "-C", str(src))
    procs = _by_argv0(d)
    (make,) = procs["make"]
    assert make["files"][str(src / "Makefile")]["bytes_read"] == (src / "Makefile").stat().st_size
    cc1 = [p for p in d["processes"] if p["comm"] == "cc1"]
    assert len(cc1) == 1
    assert cc1[0]["files"][str(src / "hello.c")]["bytes_read"] == (src / "hello.c").stat().st_size
    every = {k for p in d["processes"] for k in p["files"]}
    assert "hello.c" not in every and "Makefile" not in every
    assert all(k.startswith("/") or k.startswith(("pipe:", "socket:", "anon_inode:"))
               for k in every), sorted(every)


def test_dash_pipeline_pairs_the_pipe_ends(renacerd, renacer, tmp_path):
    """printf | cat > out: the writer's pipe and the reader's are one pipe:[N]."""
    out = tmp_path / "out.txt"
    d = _show(renacerd, renacer, "pipe", "dash", "-c", f"printf abcdef | cat > {out}")
    (cat,) = _by_argv0(d)["cat"]
    pipes = {k: v for p in d["processes"] for k, v in p["files"].items()
             if k.startswith("pipe:[") and p["pid"] != d["processes"][0]["pid"]}
    ((name, stat),) = [(k, v) for k, v in cat["files"].items() if k.startswith("pipe:[")]
    assert stat["bytes_read"] == 6
    writer = [p for p in d["processes"] if p is not cat and name in p["files"]]
    assert [p["files"][name]["bytes_written"] for p in writer] == [6], pipes
    assert out.read_bytes() == b"abcdef"


def test_dash_redirection_restores_stdout(renacerd, renacer, tmp_path):
    """dash saves fd 1 with fcntl(F_DUPFD) for `> out` and dup2s it back afterwards."""
    out = tmp_path / "out.txt"
    d = _show(renacerd, renacer, "dash", "dash", "-c", f"echo a > {out}; echo bcd")
    (sh,) = d["processes"]
    assert sh["files"][str(out)]["bytes_written"] == 2
    # every other file (libc among them) is only read: the 4 bytes went to the saved stdout
    written = [v["bytes_written"] for k, v in sh["files"].items()
               if k != str(out) and v["bytes_written"]]
    assert written == [4]


def test_cp_copy_file_range_counts_both_files(renacerd, renacer, tmp_path):
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(os.urandom(300_000))
    d = _show(renacerd, renacer, "cp", "cp", str(src), str(dst))
    (cp,) = d["processes"]
    assert cp["files"][str(src)]["bytes_read"] == 300_000
    assert cp["files"][str(dst)]["bytes_written"] == 300_000
    assert cp["files"][str(dst)]["created"] is True


SIGSUSPEND = r"""
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void on_usr1(int s) { (void)s; }
int main(void) {
    sigset_t block, none;
    sigemptyset(&block); sigaddset(&block, SIGUSR1); sigemptyset(&none);
    signal(SIGUSR1, on_usr1);
    sigprocmask(SIG_BLOCK, &block, 0);
    pid_t c = fork();
    if (c == 0) { kill(getppid(), SIGUSR1); _exit(0); }
    waitpid(c, 0, 0);          /* the signal is pending now */
    sigsuspend(&none);         /* returns at once: -ERESTARTNOHAND at the exit, EINTR to us */
    return 0;
}
"""


def test_interrupted_call_is_not_an_error(cc, renacerd, renacer, db):
    """sigsuspend woken by a handled signal: ERESTARTNOHAND is an interruption."""
    exe = cc("sigsuspend", SIGSUSPEND)
    d = _show(renacerd, renacer, "intr", str(exe))
    s = d["processes"][0]["syscalls"]["rt_sigsuspend"]
    assert (s["calls"], s["errors"], s["interrupted"]) == (1, 0, 1)
    (rec,) = [r for r in Store(db).load_run("intr")[0]
              if r.name == "rt_sigsuspend"]
    assert rec.errno == 514
    assert Store(db).load_run("intr")[0].errno_name(rec.errno) == "ERESTARTNOHAND"
