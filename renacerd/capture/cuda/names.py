"""Kernel names: from registration calls when seen, else the host stub's ELF symbol."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

import cxxfilt
import numpy as np

from renacerd.capture.cuda.elf import ElfError, ElfSymbols, read_symbols
from renacerd.capture.cuda.maps import (
    Image,
    Mapping,
    find_mapping,
    kernel_dev,
    openable_path,
    read_maps,
)
from renacerd.cuda.records import N_GET_KERNEL, N_IMAGE, N_MODULE_FN, N_REGISTER

PF_X = 1

# how a name was found (KernelNames.resolved_by)
BY_REGISTER = "register"
BY_GET_KERNEL = "get_kernel"
BY_MODULE = "module_function"
BY_ELF = "elf_symbol"
UNRESOLVED = "unresolved"


def demangle(name: str) -> str:
    """C++ names demangled (libstdc++'s __cxa_demangle via cxxfilt); others as they are."""
    if not name.startswith("_Z"):
        return name
    try:
        return cxxfilt.demangle(name, external_only=False)
    except cxxfilt.InvalidName:
        return name


class KernelNames:
    """Per-process maps from launch handles to kernel names, fed by the name ring."""

    def __init__(self, exe_paths: Callable[[int], list[str]] | None = None) -> None:
        # where a process's executable may be found once the process is gone
        self.exe_paths = exe_paths or (lambda pid: [])
        self.images: dict[int, Image] = {}
        self.registered: dict[tuple[int, int], str] = {}   # (pid, host stub) -> name
        self.handles: dict[tuple[int, int], int] = {}      # (pid, cudaKernel_t) -> stub
        self.functions: dict[tuple[int, int], str] = {}    # (pid, CUfunction) -> name
        self.maps: dict[int, list[Mapping]] = {}
        self._elf: dict[tuple[int, int], ElfSymbols | None] = {}
        self._cache: dict[tuple[int, int, bool], tuple[str, str]] = {}
        self.resolved_by: Counter[str] = Counter()

    def take(self, recs: np.ndarray) -> None:
        """Absorb drained name records."""
        for r in recs:
            pid, how, key = int(r["pid"]), int(r["how"]), int(r["key"])
            name = bytes(r["name"]).split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
            if how == N_REGISTER and name:
                self.registered[(pid, key)] = demangle(name)
            elif how == N_GET_KERNEL:
                self.handles[(pid, key)] = int(r["key2"])
            elif how == N_MODULE_FN and name:
                self.functions[(pid, key)] = demangle(name)
            elif how == N_IMAGE:
                raw = bytes(r["name"])
                self.images[pid] = Image(key, int(r["key2"]), kernel_dev(
                    int.from_bytes(raw[8:12].ljust(4, b"\0"), "little")),
                    int.from_bytes(raw[:8].ljust(8, b"\0"), "little"))

    def snapshot_maps(self, pid: int) -> None:
        """Remember where pid's objects are mapped (kept after it exits)."""
        m = read_maps(pid)
        if m:
            self.maps[pid] = m

    def forget(self, pid: int) -> None:
        """Drop a process's tables (its ids may be reused)."""
        self.maps.pop(pid, None)
        self.images.pop(pid, None)
        for d in (self.registered, self.handles, self.functions):
            for k in [k for k in d if k[0] == pid]:
                del d[k]
        for k in [k for k in self._cache if k[0] == pid]:
            del self._cache[k]

    def resolve(self, pid: int, addr: int, driver: bool) -> tuple[str, str]:
        """(name, how) of the kernel a launch named by `addr` (stub, handle or CUfunction)."""
        key = (pid, addr, driver)
        hit = self._cache.get(key)
        if hit is not None and hit[1] != UNRESOLVED:
            self.resolved_by[hit[1]] += 1
            return hit
        out = self._resolve(pid, addr, driver)
        self._cache[key] = out
        self.resolved_by[out[1]] += 1
        return out

    def _resolve(self, pid: int, addr: int, driver: bool) -> tuple[str, str]:
        if driver:
            name = self.functions.get((pid, addr))
            if name:
                return name, BY_MODULE
        how = BY_REGISTER
        stub = self.handles.get((pid, addr))
        if stub is not None:
            addr, how = stub, BY_GET_KERNEL
        name = self.registered.get((pid, addr))
        if name:
            return name, how
        name = self._elf_symbol(pid, addr)
        if name:
            return demangle(name), BY_ELF
        return f"{addr:#x}", UNRESOLVED

    def _elf_symbol(self, pid: int, addr: int) -> str | None:
        """Host stub address -> mapping -> file offset -> link-time address -> symbol."""
        m = find_mapping(self.maps.get(pid, []), addr)
        if m is None:
            self.snapshot_maps(pid)
            m = find_mapping(self.maps.get(pid, []), addr)
        if m is None:
            return self._image_symbol(pid, addr)
        elf = self._elf_of(pid, m)
        if elf is None:
            return None
        # The PIE / shared-object bias falls out: the offset in the file is bias-free.
        vaddr = elf.vaddr_of_offset(addr - m.start + m.offset)
        return None if vaddr is None else elf.symbol_at(vaddr)

    def _image_symbol(self, pid: int, addr: int) -> str | None:
        """A stub in the executable of a process whose maps were never read: the kernel's
        start_code is the lowest executable segment's link-time address plus the bias."""
        img = self.images.get(pid)
        if img is None or not img.start <= addr < img.end:
            return None
        key = (img.dev, img.inode)
        if key not in self._elf:
            # checked by (dev, inode): a path seen in the trace may name another file now
            for path in self.exe_paths(pid):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == key:
                    try:
                        self._elf[key] = read_symbols(path)
                    except ElfError:
                        self._elf[key] = None
                    break
        elf = self._elf.get(key)
        if elf is None:
            return None
        x = [int(ph["vaddr"]) for ph in elf.loads if int(ph["flags"]) & PF_X]
        return elf.symbol_at(addr - img.start + min(x)) if x else None

    def _elf_of(self, pid: int, m: Mapping) -> ElfSymbols | None:
        key = (m.dev, m.inode)
        if key not in self._elf:
            path = openable_path(pid, m)
            elf = None
            if path is not None:
                try:
                    elf = read_symbols(path)
                except ElfError:
                    elf = None
            self._elf[key] = elf
        return self._elf[key]

    def unresolved(self) -> int:
        """Launches whose kernel stayed a hex address."""
        return self.resolved_by[UNRESOLVED]

