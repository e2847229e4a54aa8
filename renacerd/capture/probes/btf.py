"""Member offsets of running-kernel structs, from its BTF (the headers BCC compiles with may be
another kernel's, so struct layouts must come from the kernel itself)."""

from __future__ import annotations

import functools
import re
import subprocess

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
_MEMBER = re.compile(r"^\s+'([^']*)' type_id=(\d+) bits_offset=(\d+)")
_HEAD = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'")


class BTFError(RuntimeError):
    """The kernel's BTF is missing or lacks a member we need."""


@functools.lru_cache(maxsize=1)
def _dump() -> str:
    try:
        return subprocess.run(
            ["bpftool", "btf", "dump", "file", VMLINUX_BTF, "format", "raw"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BTFError(f"cannot read {VMLINUX_BTF} with bpftool: {e}") from e


def _type_at(text: str, pos: int) -> tuple[str, list[tuple[str, int, int]]]:
    """Kind and members of the type whose header line starts at `pos`."""
    end = text.find("\n[", pos + 1)
    block = text[pos : end if end >= 0 else len(text)].splitlines()
    m = _HEAD.match(block[0])
    kind = m.group(2) if m else ""
    members = []
    for line in block[1:]:
        mm = _MEMBER.match(line)
        if mm:
            members.append((mm.group(1), int(mm.group(2)), int(mm.group(3))))
    return kind, members


def _by_id(text: str, tid: int) -> tuple[str, list[tuple[str, int, int]]]:
    pos = text.find(f"\n[{tid}] ")
    if pos < 0:
        raise BTFError(f"BTF type {tid} not found")
    return _type_at(text, pos + 1)


def member_offset(struct: str, member: str) -> int:
    """Byte offset of `member` in `struct`, looking through anonymous struct/union members.
    Only the few types needed are parsed: the dump has hundreds of thousands of lines."""
    text = _dump()
    pos = text.find(f"] STRUCT '{struct}' ")
    if pos < 0:
        raise BTFError(f"struct {struct} not in the kernel's BTF")
    start = text.rfind("\n", 0, pos) + 1

    def find(members: list[tuple[str, int, int]], base: int, depth: int) -> int | None:
        for name, mt, bits in members:
            if name == member:
                return base + bits // 8
            if name == "(anon)" and depth < 4:
                kind, sub = _by_id(text, mt)
                if kind in ("STRUCT", "UNION"):
                    r = find(sub, base + bits // 8, depth + 1)
                    if r is not None:
                        return r
        return None

    off = find(_type_at(text, start)[1], 0, 0)
    if off is None:
        raise BTFError(f"struct {struct} has no member {member} in the kernel's BTF")
    return off
