"""/proc/PID/maps: which CUDA runtime, driver and NCCL copies a process has mapped."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from renacerd.capture.probes.btf import BTFError, member_offset
from renacerd.cuda.hooks import DRIVER, NCCL, RUNTIME

# libcudart.so.12, libcudart.so.13.0.48, libcudart-6d56b25a.so.11.0 (hashed wheel copies),
# libcuda.so.1 (not libcudart / libcudnn), libnccl.so.2, libnccl-<hash>.so.2
_FAMILY = (
    (RUNTIME, re.compile(rb"^libcudart(?:-[0-9a-f]{8})?\.so(?:\.\d+)*$")),
    (DRIVER, re.compile(rb"^libcuda(?:-[0-9a-f]{8})?\.so(?:\.\d+)*$")),
    (NCCL, re.compile(rb"^libnccl(?:-[0-9a-f]{8})?\.so(?:\.\d+)*$")),
)


def family_of(path: str | bytes) -> str | None:
    """The CUDA library family a file name belongs to, or None."""
    b = path.encode() if isinstance(path, str) else path
    base = b.rsplit(b"/", 1)[-1]
    for fam, rx in _FAMILY:
        if rx.match(base):
            return fam
    return None


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: int      # os.makedev(major, minor)
    inode: int
    path: str


def read_maps(pid: int) -> list[Mapping]:
    """Every file-backed mapping of `pid` ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            data = f.read()
    except OSError:
        return []
    out = []
    for line in data.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith(b"/"):
            continue
        lo, hi = parts[0].split(b"-")
        major, minor = parts[3].split(b":")
        path = parts[5].decode("utf-8", "surrogateescape")
        if path.endswith(" (deleted)"):
            path = path[: -len(" (deleted)")]
        out.append(
            Mapping(int(lo, 16), int(hi, 16), parts[1].decode(), int(parts[2], 16),
                    os.makedev(int(major, 16), int(minor, 16)), int(parts[4]), path)
        )
    return out


def find_mapping(maps: list[Mapping], addr: int) -> Mapping | None:
    """The mapping holding addr."""
    for m in maps:
        if m.start <= addr < m.end:
            return m
    return None


def openable_path(pid: int, m: Mapping) -> str | None:
    """A path to the mapped file itself, checked by (dev, inode) where the kernel gives it.

    The plain path when it names the same file in our mount namespace; else through the
    target's root (containers); else /proc/PID/map_files (a replaced or deleted file).
    """
    for p in (m.path, f"/proc/{pid}/root{m.path}"):
        try:
            st = os.stat(p)
        except OSError:
            continue
        if st.st_ino == m.inode:
            return p
    # Overlay filesystems may report another inode than stat: the mapping's own file.
    mf = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
    return mf if os.path.exists(mf) else None


def image_offsets() -> dict[str, int]:
    """BTF offsets bpf/cuda.c needs to record a process's executable image ({} without BTF:
    names then need the process's maps, read while it lives)."""
    fields = {
        "TASK_MM_OFF": ("task_struct", "mm"),
        "MM_START_CODE_OFF": ("mm_struct", "start_code"),
        "MM_END_CODE_OFF": ("mm_struct", "end_code"),
        "MM_EXE_FILE_OFF": ("mm_struct", "exe_file"),
        "FILE_INODE_OFF": ("file", "f_inode"),
        "INODE_INO_OFF": ("inode", "i_ino"),
        "INODE_SB_OFF": ("inode", "i_sb"),
        "SB_DEV_OFF": ("super_block", "s_dev"),
    }
    try:
        return {k: member_offset(*v) for k, v in fields.items()}
    except BTFError:
        return {}


@dataclass(frozen=True, slots=True)
class Image:
    """A process's executable as the launch probe saw it: [start, end) of its code (the
    kernel's mm start_code/end_code) and the file's (dev, inode)."""

    start: int
    end: int
    dev: int      # os.makedev(major, minor)
    inode: int


def kernel_dev(dev: int) -> int:
    """The kernel's internal dev_t (major << 20 | minor) as os.stat's st_dev."""
    return os.makedev(dev >> 20, dev & 0xFFFFF)
