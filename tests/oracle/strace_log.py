"""Read `strace -f -y -s N -o FILE` output into per-process calls, errors, files and exits.

The parser knows strace's line forms: `PID name(args) = RET [ERRNO (text)]`,
`PID name(args <unfinished ...>` followed later by `PID <... name resumed>args) = RET`,
`PID +++ exited with N +++`, `PID +++ killed by SIGX [(core dumped)] +++` and signal lines
`PID --- SIGX {...} ---`. Threads are told from processes by CLONE_THREAD in clone's and
clone3's flags; a process's argv is that of its last successful execve (a forked child
without one keeps its parent's).
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field

from tests.oracle.model import Proc, file_key

LINE = re.compile(r"^(\d+) +(.*)$")
RESUMED = re.compile(r"^<\.\.\. ([a-z0-9_]+) resumed>(.*)$")
EXITED = re.compile(r"^\+\+\+ exited with (\d+) \+\+\+$")
KILLED = re.compile(r"^\+\+\+ killed by (SIG[A-Z0-9]+)( \(core dumped\))? \+\+\+$")
FD_ARG = re.compile(r"^(-?\d+)<(.*)>$", re.S)
RET = re.compile(r"^\s*= (-?\d+|0x[0-9a-f]+|\?)(.*)$", re.S)
ERRNO = re.compile(r"^(?:<[^>]*>)? ?(E[A-Z0-9_]+) \(")
UNFINISHED = " <unfinished ...>"
# The kernel's restart codes: the call is re-run, it did not fail (strace names them).
RESTARTS = frozenset({"ERESTARTSYS", "ERESTARTNOINTR", "ERESTARTNOHAND",
                      "ERESTART_RESTARTBLOCK"})

# Which argument is read from and which written to, per byte-moving call (by index).
READS = {n: 0 for n in "read pread64 readv preadv preadv2 recvfrom recvmsg".split()}
WRITES = {n: 0 for n in "write pwrite64 writev pwritev pwritev2 sendto sendmsg".split()}
READS.update(copy_file_range=0, splice=0, tee=0, sendfile=1)
WRITES.update(copy_file_range=2, splice=2, tee=1, sendfile=0)
# fds whose -y name is a file (not a pipe, socket or anonymous inode)
NOT_FILES = ("pipe:", "socket:", "anon_inode:", "UNIX", "TCP", "UDP", "NETLINK")


@dataclass(slots=True)
class Call:
    """One complete syscall as strace printed it."""

    tid: int
    name: str
    args: list[str]
    ret: int | None
    errno: str | None
    line: int


@dataclass(slots=True)
class StraceLog:
    """Everything one strace output file says, per thread and per process."""

    calls: list[Call] = field(default_factory=list)
    exits: dict[int, tuple[int | None, int | None]] = field(default_factory=dict)
    first_tid: int | None = None


def unescape(s: str) -> str:
    """A string as strace quoted it (\\n, \\t, \\", \\\\, \\xNN, \\NNN), back to text,
    bytes that are not UTF-8 escaped as renacerd escapes them (backslashreplace)."""
    out = bytearray()
    i = 0
    simple = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, '"': 34, "\\": 92}
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            d = s[i + 1]
            if d == "x":
                out.append(int(s[i + 2 : i + 4], 16))
                i += 4
                continue
            if d.isdigit():
                j = i + 1
                while j < len(s) and j < i + 4 and s[j] in "01234567":
                    j += 1
                out.append(int(s[i + 1 : j], 8))
                i = j
                continue
            out.append(simple.get(d, ord(d)))
            i += 2
            continue
        out += c.encode()
        i += 1
    return out.decode("utf-8", "backslashreplace")


def split_call(text: str) -> tuple[list[str], str]:
    """`args) = RET ...` (the text after `name(`) -> (top-level arguments, the rest)."""
    args: list[str] = []
    stack: list[str] = []
    cur: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{", ">": "<"}
    i = 0
    while i < len(text):
        c = text[i]
        if stack and stack[-1] == "<":  # an fd's -y name: only its closing > counts
            if c == "\\":
                cur.append(text[i : i + 2])
                i += 2
                continue
            if c == ">":
                stack.pop()
        elif c == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            cur.append(text[i : j + 1])
            i = j + 1
            continue
        elif c in "([{" or c == "<" and cur and (cur[-1][-1:].isdigit() or cur[-1] == "D"):
            stack.append(c)
        elif c in ")]}" and stack and stack[-1] == pairs[c]:
            stack.pop()
        elif c == ")" and not stack:
            tail = "".join(cur).strip()
            if tail or args:
                args.append(tail)
            return args, text[i + 1 :]
        elif c == "," and not stack:
            args.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    return args + ["".join(cur).strip()], ""


def _string_array(arg: str) -> list[str]:
    """`["a", "b"]` -> ["a", "b"]."""
    inner = arg.strip()[1:-1]
    items, _ = split_call(inner + ")")
    out = []
    for x in items:
        if x.startswith('"'):  # `"text"` or, cut at -s, `"text"...`
            cut = x.endswith('"...')
            out.append(unescape(x[1 : -4 if cut else -1]) + ("..." if cut else ""))
        elif x:
            out.append(x)
    return out


def parse(text: str) -> StraceLog:
    """Every call, with unfinished calls joined to their resumption, and every exit."""
    log = StraceLog()
    pending: dict[int, tuple[str, int]] = {}
    for n, raw in enumerate(text.splitlines()):
        m = LINE.match(raw)
        if not m:
            continue
        tid, rest = int(m.group(1)), m.group(2)
        if log.first_tid is None:
            log.first_tid = tid
        if rest.startswith("+++"):
            if e := EXITED.match(rest):
                log.exits[tid] = (int(e.group(1)), None)
            elif k := KILLED.match(rest):
                log.exits[tid] = (None, int(signal.Signals[k.group(1)]))
            if tid in pending:  # never returned: the process ended inside it
                name, first = pending.pop(tid)
                log.calls.append(Call(tid, name, split_call(first)[0], None, None, n))
            continue
        if rest.startswith("---"):
            continue
        if r := RESUMED.match(rest):
            name, first = pending.pop(tid, (r.group(1), ""))
            rest = f"{name}({first}{r.group(2)}"
        if rest.endswith(UNFINISHED):
            name, _, first = rest[: -len(UNFINISHED)].partition("(")
            pending[tid] = (name, first)
            continue
        name, _, body = rest.partition("(")
        args, tail = split_call(body)
        rm = RET.match(tail)
        ret: int | None = None
        err = None
        if rm:
            if rm.group(1) != "?":
                ret = _number(rm.group(1))
            if em := ERRNO.match(rm.group(2)):
                err = em.group(1)
        log.calls.append(Call(tid, name, args, ret, err, n))
    return log


def _number(s: str) -> int:
    """A return value as strace prints it: decimal, 0x hex, or 0-led octal (umask)."""
    if s.startswith("0x"):
        return int(s, 16)
    return int(s, 8) if len(s) > 1 and s[0] == "0" else int(s)


def _clone_flags(c: Call) -> str:
    if c.name == "clone3":
        return c.args[0] if c.args else ""
    return next((a for a in c.args if a.startswith("flags=")), "")


def _fd_name(arg: str) -> str | None:
    m = FD_ARG.match(arg)
    if not m:
        return None
    name = unescape(m.group(2))
    return None if name.startswith(NOT_FILES) else name


def processes(log: StraceLog, attached: bool = False) -> dict[int, Proc]:
    """Per-process views (keyed by thread-group id) of a parsed log."""
    tgid: dict[int, int] = {}
    procs: dict[int, Proc] = {}
    root = log.first_tid
    if root is None:
        return procs
    procs[root] = Proc(pid=root, parent=None, order=-1)
    tgid[root] = root
    # who created whom, in file order (a child's first lines may come before the clone's)
    for c in log.calls:
        if c.name in ("clone", "clone3", "fork", "vfork") and c.ret is not None and c.ret > 0:
            owner = tgid.setdefault(c.tid, c.tid)
            if "CLONE_THREAD" in _clone_flags(c):
                tgid[c.ret] = owner
            else:
                tgid[c.ret] = c.ret
                procs[c.ret] = Proc(pid=c.ret, parent=owner, order=c.line)
    # argv: the last successful exec, else the parent's at the fork
    for c in sorted(log.calls, key=lambda c: c.line):
        if c.name in ("clone", "clone3", "fork", "vfork") and c.ret in procs:
            child = procs[c.ret]
            if not child.argv:
                child.argv = list(procs[tgid.get(c.tid, c.tid)].argv)
        if c.name in ("execve", "execveat") and c.ret == 0:
            procs[tgid.get(c.tid, c.tid)].argv = _string_array(c.args[1 if c.name == "execve"
                                                                     else 2])
    for c in log.calls:
        p = procs.get(tgid.get(c.tid, c.tid))
        if p is None:
            continue
        p.calls[c.name] += 1
        if c.errno is not None and c.errno not in RESTARTS:
            p.errors[c.name] += 1
        if c.ret is None or c.ret <= 0:
            continue
        for table, col in ((READS, 0), (WRITES, 1)):
            i = table.get(c.name)
            if i is not None and i < len(c.args) and (path := _fd_name(c.args[i])):
                p.add_io(file_key(path), c.ret if col == 0 else 0, c.ret if col == 1 else 0)
    for tid, (code, sig) in log.exits.items():
        if tid in procs:  # the thread-group leader's end is the process's
            procs[tid].exit_code, procs[tid].exit_signal = code, sig
    if attached:
        procs[root].order = -1
    return procs
