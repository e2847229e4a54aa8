"""strace as the oracle: real programs traced by `strace -f` and by renacerd must agree.

Per process (paired by tree position and program, never by pid) and per syscall name: the
process tree, argv, how each process ended, call and error counts, bytes read and written
per resolved file, and, for files written front to back, bytes written == the file's size.
The cases, the stated slacks and the comparison live in tests/oracle; scripts/
fidelity_table.py runs the same cases into docs/fidelity.md.
"""

from __future__ import annotations

import pytest

from tests.conftest import needs_root
from tests.oracle.cases import CASES, run_case
from tests.oracle.diff import Outcome
from tests.oracle.model import Proc, tree_keys
from tests.oracle.strace_log import parse, processes

# A hand-written strace -f -y log: a thread (clone3 with CLONE_THREAD) whose call is split
# over two lines, a forked child that execs and is killed, a restarted call.
SAMPLE = """\
100 execve("/usr/bin/prog", ["prog", "a b"], 0x7ffd /* 3 vars */) = 0
100 openat(AT_FDCWD</w>, "out", O_WRONLY|O_CREAT, 0644) = 3</w/out>
100 clone3({flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM, \
child_tid=0x7f, parent_tid=0x7f, exit_signal=0, stack=0x7f, stack_size=0x7ff, tls=0x7f} => \
{parent_tid=[101]}, 88) = 101
101 write(3</w/out>, "x)\\" = 1"..., 10 <unfinished ...>
100 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, \
child_tidptr=0x7f) = 102
101 <... write resumed>)                 = 10
102 execve("/bin/sleep", ["sleep", "9"], 0x5 /* 3 vars */) = 0
102 clock_nanosleep(CLOCK_REALTIME, 0, {tv_sec=9, tv_nsec=0},  <unfinished ...>
100 wait4(-1,  <unfinished ...>
102 +++ killed by SIGKILL +++
100 <... wait4 resumed>[{WIFSIGNALED(s) && WTERMSIG(s) == SIGKILL}], 0, NULL) = ? ERESTARTSYS \
(To be restarted if SA_RESTART is set)
100 --- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_KILLED, si_pid=102} ---
100 wait4(-1, [{WIFSIGNALED(s) && WTERMSIG(s) == SIGKILL}], 0, NULL) = 102
100 getsockname(4<socket:[9]>, {sa_family=AF_INET}, [128 => 16]) = 0
100 umask(077)                          = 022
100 access("/nope", R_OK)               = -1 ENOENT (No such file or directory)
100 copy_file_range(3</w/in>, NULL, 5</w/copy>, NULL, 4096, 0) = 4096
100 exit_group(0)                       = ?
101 +++ exited with 0 +++
100 +++ exited with 0 +++
"""


def test_strace_log_parser():
    procs = processes(parse(SAMPLE))
    tree = tree_keys(procs)
    main: Proc = tree[(("prog", 0),)]
    child: Proc = tree[(("prog", 0), ("sleep", 0))]
    assert main.argv == ["prog", "a b"] and (main.exit_code, main.exit_signal) == (0, None)
    assert child.argv == ["sleep", "9"] and (child.exit_code, child.exit_signal) == (None, 9)
    assert main.calls["write"] == 1  # the thread's call is its process's
    assert main.files["/w/out"] == [0, 10]
    assert main.files["/w/in"] == [4096, 0] and main.files["/w/copy"] == [0, 4096]
    assert main.calls["wait4"] == 2 and main.errors["wait4"] == 0  # ERESTARTSYS: re-run
    assert main.errors == {"access": 1}
    assert main.calls["umask"] == 1 and main.calls["getsockname"] == 1
    assert child.calls["clock_nanosleep"] == 1  # entered, never returned
    assert sum(main.calls.values()) == 12


def _report(out: Outcome) -> str:
    lines = [f"{out.case}: {len(out.differing())} of {len(out.rows)} values differ "
             "(process | what | strace | renacerd)"]
    lines += [f"  {r.process} | {r.what} | {r.strace!r} | {r.renacer!r}"
              for r in out.differing()]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One directory for every case's work directory, store and compiled programs."""
    return tmp_path_factory.mktemp("oracle")


@needs_root
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_renacerd_agrees_with_strace(case, base):
    out = run_case(case, base)
    assert out.calls > 0 and out.rows
    assert not out.differing(), _report(out)
