"""Member offsets of running-kernel structs, from its BTF (the headers BCC compiles with may be
another kernel's, so struct layouts must come from the kernel itself)."""

from __future__ import annotations

import functools
import re
import subprocess

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
_TYPE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER = re.compile(r"^\s+'([^']*)' type_id=(\d+) bits_offset=(\d+)")


class BTFError(RuntimeError):
    """The kernel's BTF is missing or lacks a member we need."""


@functools.lru_cache(maxsize=1)
def _types() -> tuple[dict[int, tuple[str, str, list[tuple[str, int, int]]]], dict[str, int]]:
    try:
        out = subprocess.run(
            ["bpftool", "btf", "dump", "file", VMLINUX_BTF, "format", "raw"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BTFError(f"cannot read {VMLINUX_BTF} with bpftool: {e}") from e
    types: dict[int, tuple[str, str, list[tuple[str, int, int]]]] = {}
    by_name: dict[str, int] = {}
    cur: list[tuple[str, int, int]] | None = None
    for line in out.splitlines():
        m = _TYPE.match(line)
        if m:
            tid, kind, name = int(m.group(1)), m.group(2), m.group(3)
            cur = []
            types[tid] = (kind, name, cur)
            if kind == "STRUCT" and name not in by_name:
                by_name[name] = tid
            continue
        mm = _MEMBER.match(line)
        if mm and cur is not None:
            cur.append((mm.group(1), int(mm.group(2)), int(mm.group(3))))
    return types, by_name


def member_offset(struct: str, member: str) -> int:
    """Byte offset of `member` in `struct`, looking through anonymous struct/union members."""
    types, by_name = _types()
    if struct not in by_name:
        raise BTFError(f"struct {struct} not in the kernel's BTF")

    def find(tid: int, base: int) -> int | None:
        kind, _, members = types[tid]
        for name, mt, bits in members:
            if name == member:
                return base + bits // 8
            if name == "(anon)":
                t = mt
                while types[t][0] in ("TYPEDEF", "CONST", "VOLATILE"):
                    t = types[t][2][0][1] if types[t][2] else t
                    break
                if types[t][0] in ("STRUCT", "UNION"):
                    r = find(t, base + bits // 8)
                    if r is not None:
                        return r
        return None

    off = find(by_name[struct], 0)
    if off is None:
        raise BTFError(f"struct {struct} has no member {member} in the kernel's BTF")
    return off
