"""ELF64 symbol tables as numpy arrays: which functions an object defines, and where.

Hand-written over numpy rather than pyelftools: a CUDA library's .dynsym/.symtab holds
10^4-10^6 symbols, which pyelftools walks one Python object at a time (seconds); viewed as
one structured array the whole table is read, filtered and searched in milliseconds.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import numpy as np

ET_EXEC, ET_DYN = 2, 3
PT_LOAD = 1
SHT_SYMTAB, SHT_DYNSYM = 2, 11
STT_FUNC, STT_GNU_IFUNC = 2, 10

_EHDR = np.dtype(
    [("ident", "S16"), ("type", "<u2"), ("machine", "<u2"), ("version", "<u4"),
     ("entry", "<u8"), ("phoff", "<u8"), ("shoff", "<u8"), ("flags", "<u4"),
     ("ehsize", "<u2"), ("phentsize", "<u2"), ("phnum", "<u2"), ("shentsize", "<u2"),
     ("shnum", "<u2"), ("shstrndx", "<u2")]
)
_PHDR = np.dtype(
    [("type", "<u4"), ("flags", "<u4"), ("offset", "<u8"), ("vaddr", "<u8"),
     ("paddr", "<u8"), ("filesz", "<u8"), ("memsz", "<u8"), ("align", "<u8")]
)
_SHDR = np.dtype(
    [("name", "<u4"), ("type", "<u4"), ("flags", "<u8"), ("addr", "<u8"), ("offset", "<u8"),
     ("size", "<u8"), ("link", "<u4"), ("info", "<u4"), ("addralign", "<u8"),
     ("entsize", "<u8")]
)
_SYM = np.dtype(
    [("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"),
     ("size", "<u8")]
)
EM_X86_64, EM_AARCH64 = 62, 183


class ElfError(ValueError):
    """Not an ELF64 little-endian object, or a truncated one."""


@dataclass(slots=True)
class ElfSymbols:
    """The defined functions of one object (both tables merged), sorted by address."""

    path: str
    type: int
    machine: int
    loads: np.ndarray                      # PT_LOAD program headers
    values: np.ndarray                     # sorted function addresses (link-time vaddr)
    sizes: np.ndarray
    name_off: np.ndarray                   # offsets into strtab of the symbol's table
    strtab: list[bytes]                    # per symbol: its table's string section
    table: np.ndarray                      # per symbol: index into strtab
    soname: str = ""
    _by_name: dict[str, int] | None = field(default=None, repr=False)

    def name(self, i: int) -> str:
        """Symbol i's name (without a @version suffix)."""
        tab = self.strtab[int(self.table[i])]
        off = int(self.name_off[i])
        end = tab.find(b"\0", off)
        return tab[off:end].decode("utf-8", "backslashreplace").split("@", 1)[0]

    def functions(self) -> dict[str, int]:
        """name -> address of every defined function."""
        if self._by_name is None:
            by: dict[str, int] = {}
            for i in range(len(self.values)):
                by.setdefault(self.name(i), int(self.values[i]))
            self._by_name = by
        return self._by_name

    def lookup(self, names: tuple[str, ...] | list[str]) -> dict[str, int]:
        """name -> address for those of `names` defined here, without indexing every symbol.

        A name is found as "name\\0" (or "name@version") anywhere in a string table: a
        linker may share the tail of a longer string, and a symbol whose name offset lands
        exactly there is that name.
        """
        if self._by_name is not None:
            return {n: self._by_name[n] for n in names if n in self._by_name}
        out: dict[str, int] = {}
        for t, tab in enumerate(self.strtab):
            sel = np.flatnonzero(self.table == t)
            if not len(sel):
                continue
            offs = self.name_off[sel]
            for n in names:
                if n in out:
                    continue
                hits = []
                for end in (b"\0", b"@"):
                    pat = n.encode() + end
                    i = tab.find(pat)
                    while i >= 0:
                        hits.append(i)
                        i = tab.find(pat, i + 1)
                if hits:
                    m = np.flatnonzero(np.isin(offs, hits))
                    if len(m):
                        out[n] = int(self.values[sel[m[0]]])
        return out

    def has(self, name: str) -> bool:
        """The object defines function `name`."""
        return name in self.functions()

    def vaddr_of_offset(self, file_off: int) -> int | None:
        """The link-time address of a file offset inside a PT_LOAD segment."""
        for ph in self.loads:
            off, fsz = int(ph["offset"]), int(ph["filesz"])
            if off <= file_off < off + max(fsz, 1):
                return file_off - off + int(ph["vaddr"])
        return None

    def offset_of_vaddr(self, vaddr: int) -> int | None:
        """The file offset of a link-time address (what a uprobe is attached at)."""
        for ph in self.loads:
            va, fsz = int(ph["vaddr"]), int(ph["filesz"])
            if va <= vaddr < va + fsz:
                return vaddr - va + int(ph["offset"])
        return None

    def symbol_at(self, vaddr: int) -> str | None:
        """The function whose [value, value+size) holds vaddr (size 0: exact match only)."""
        i = int(np.searchsorted(self.values, vaddr, side="right")) - 1
        if i < 0:
            return None
        v, sz = int(self.values[i]), int(self.sizes[i])
        if vaddr == v or vaddr < v + sz:
            return self.name(i)
        return None


CUDA_SECTIONS = frozenset({b".nv_fatbin", b".nvFatBinSegment", b"__nv_module_id"})


def has_cuda_code(path: str) -> bool:
    """The object embeds CUDA device code (the sections nvcc emits beside a statically linked
    runtime). Reads only the section headers: cheap enough for every library a job opens,
    unlike a full symbol scan of e.g. a 500 MB libtorch_cpu.so."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        head = os.pread(fd, _EHDR.itemsize, 0)
        if len(head) != _EHDR.itemsize:  # shorter than an ELF header (a script)
            return False
        eh = np.frombuffer(head, _EHDR)
        eh = eh[0]
        ident = bytes(eh["ident"])
        if ident[:4] != b"\x7fELF" or ident[4] != 2 or not eh["shnum"]:
            return False
        n = int(eh["shnum"])
        raw = os.pread(fd, n * _SHDR.itemsize, int(eh["shoff"]))
        if len(raw) != n * _SHDR.itemsize or int(eh["shstrndx"]) >= n:
            return False
        sh = np.frombuffer(raw, _SHDR)
        st = sh[int(eh["shstrndx"])]
        names = os.pread(fd, int(st["size"]), int(st["offset"]))
    except OSError:
        return False
    finally:
        os.close(fd)
    for off in sh["name"]:
        end = names.find(b"\0", int(off))
        if names[int(off) : end if end >= 0 else None] in CUDA_SECTIONS:
            return True
    return False


def read_symbols(path: str) -> ElfSymbols:
    """Parse the program headers and every symbol table of `path`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ElfError(f"{path}: {e.strerror}") from e
    try:
        size = os.fstat(fd).st_size
        if size < _EHDR.itemsize:
            raise ElfError(f"{path}: too small for ELF")
        mm = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        return _parse(path, mm, size)
    finally:
        try:
            mm.close()
        except BufferError:
            pass  # numpy views of a failed parse still hold it; it unmaps when they die


def _parse(path: str, mm: mmap.mmap, size: int) -> ElfSymbols:
    eh = np.frombuffer(mm, _EHDR, count=1)[0]
    ident = bytes(eh["ident"])
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        raise ElfError(f"{path}: not a little-endian ELF64 object")

    def table(off: int, n: int, dt: np.dtype) -> np.ndarray:
        if off + n * dt.itemsize > size:
            raise ElfError(f"{path}: truncated ELF")
        return np.frombuffer(mm, dt, count=n, offset=off).copy()

    ph = table(int(eh["phoff"]), int(eh["phnum"]), _PHDR)
    sh = table(int(eh["shoff"]), int(eh["shnum"]), _SHDR) if eh["shnum"] else np.empty(0, _SHDR)
    loads = ph[ph["type"] == PT_LOAD]
    vals, sizes, noff, tabs, strtabs = [], [], [], [], []
    for s in sh[(sh["type"] == SHT_SYMTAB) | (sh["type"] == SHT_DYNSYM)]:
        n = int(s["size"]) // _SYM.itemsize
        syms = table(int(s["offset"]), n, _SYM)
        st = sh[int(s["link"])]
        strs = bytes(mm[int(st["offset"]): int(st["offset"]) + int(st["size"])])
        typ = syms["info"] & 0xF
        keep = ((typ == STT_FUNC) | (typ == STT_GNU_IFUNC)) & (syms["shndx"] != 0) & (
            syms["value"] != 0
        )
        syms = syms[keep]
        vals.append(syms["value"])
        sizes.append(syms["size"])
        noff.append(syms["name"])
        tabs.append(np.full(len(syms), len(strtabs), dtype=np.int32))
        strtabs.append(strs)
    if vals:
        v = np.concatenate(vals)
        order = np.argsort(v, kind="stable")
        values, szs = v[order], np.concatenate(sizes)[order]
        name_off, tab = np.concatenate(noff)[order], np.concatenate(tabs)[order]
    else:
        values = szs = np.empty(0, np.uint64)
        name_off, tab = np.empty(0, np.uint32), np.empty(0, np.int32)
    return ElfSymbols(
        path=path, type=int(eh["type"]), machine=int(eh["machine"]), loads=loads,
        values=values, sizes=szs, name_off=name_off, strtab=strtabs, table=tab,
    )
