"""CUDA uprobes: load bpf/cuda.c, find every runtime/driver/NCCL copy, attach, read rings."""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np

from renacerd.capture.cuda.elf import ElfError, has_cuda_code, read_symbols
from renacerd.capture.cuda.maps import family_of, image_offsets, openable_path, read_maps
from renacerd.capture.probes.loader import (
    ProbeError,
    bpf_source,
    compile_bpf,
    detach_uprobes_in_parallel,
)
from renacerd.capture.ringbuf import RingReader
from renacerd.cuda.hooks import FN_ID, HOOKS, NAME_HOOKS, RUNTIME_MARKERS, entries_define
from renacerd.cuda.records import COUNTER_NAMES, GPU_EVENT, NAME_LEN, NAME_REC

ALL_SYMBOLS = tuple(h.symbol for h in HOOKS) + tuple(n[0] for n in NAME_HOOKS)
DEFAULT_GPU_MB = 8
DEFAULT_NAME_MB = 1
BPFFS = "/sys/fs/bpf"


def _pages(mb: float) -> int:
    want = max(1, int(mb * 1024 * 1024) // mmap.PAGESIZE)
    return 1 << (want - 1).bit_length()


def cuda_supported(force: bool = False) -> str | None:
    """Why CUDA probes must stay off on this machine, or None when they may run."""
    arch = platform.machine()
    if arch == "x86_64":
        return None
    if arch in ("aarch64", "arm64") and force:
        return None
    if arch in ("aarch64", "arm64"):
        return ("CUDA uprobes are off on arm64 (a peer's uprobes resumed GPU jobs at the "
                "wrong PC there); --cuda-force turns them on")
    return f"CUDA uprobes are not supported on {arch}"


@dataclass(slots=True)
class ProbedObject:
    """One file (dev, inode) with uprobes on it."""

    path: str
    key: tuple[int, int]
    symbols: list[str]
    attached_ns: int


@dataclass(slots=True)
class AttachStats:
    """What discovery did (for `renacerd` output and the tests)."""

    objects: list[ProbedObject] = field(default_factory=list)
    probes: int = 0
    skipped: int = 0        # objects inspected that hold nothing we hook


class CudaProbes:
    """Uprobes + uretprobes on CUDA API symbols feeding two ring buffers."""

    def __init__(
        self,
        targets_fd: int | None = None,
        gpu_mb: float = DEFAULT_GPU_MB,
        name_mb: float = DEFAULT_NAME_MB,
        force: bool = False,
    ) -> None:
        why = cuda_supported(force)
        if why:
            raise ProbeError(why)
        self.gpu_pages = _pages(gpu_mb)
        self.name_pages = _pages(name_mb)
        self.targets_fd = targets_fd
        self.defines: dict[str, object] = {
            "GPU_PAGES": self.gpu_pages,
            "NAME_PAGES": self.name_pages,
            "NAME_LEN": NAME_LEN,
            "ENTRIES": entries_define(),
            **image_offsets(),
        }
        self.bpf = None
        self.events: RingReader | None = None
        self.names: RingReader | None = None
        self.stats = AttachStats()
        self._probed: dict[tuple[int, int], ProbedObject] = {}
        self._not_cuda: set[tuple[int, int]] = set()

    def source(self) -> str:
        """The generated C."""
        return bpf_source("cuda.c", self.defines)

    def load(self) -> None:
        """Compile and load; share the syscall probes' target map when one was given."""
        pin = None
        if self.targets_fd is not None:
            pin = _pin_map(self.targets_fd)
            self.defines["PINNED_TARGETS"] = f'"{pin}"'
        try:
            self.bpf = compile_bpf(self.source())
        finally:
            if pin:
                os.unlink(pin)  # both programs hold the map; the pin was only the handoff
        try:
            self.events = RingReader(
                self.bpf["gpu_events"].map_fd, self.gpu_pages * mmap.PAGESIZE, GPU_EVENT
            )
            self.names = RingReader(
                self.bpf["gpu_names"].map_fd, self.name_pages * mmap.PAGESIZE, NAME_REC
            )
        except (OSError, ValueError) as e:
            self.close()
            raise ProbeError(f"cannot map the CUDA ring buffers: {e}") from e

    # -- targets (only when not sharing the syscall probes' map) ----------------------
    def add_target(self, pid: int) -> None:
        """Record CUDA calls of process `pid`."""
        self.bpf["targets"][ctypes.c_uint32(pid)] = ctypes.c_uint32(1)

    def remove_target(self, pid: int) -> None:
        """Stop recording `pid`."""
        try:
            del self.bpf["targets"][ctypes.c_uint32(pid)]
        except KeyError:
            pass

    # -- attaching ---------------------------------------------------------------------
    def probed(self) -> list[ProbedObject]:
        """Every object with probes on it."""
        return list(self._probed.values())

    def probe_object(self, path: str) -> ProbedObject | None:
        """Attach to every hooked symbol `path` defines; None if nothing new to hook."""
        try:
            st = os.stat(path)
        except OSError as e:
            raise ProbeError(f"{path}: {e.strerror}") from e
        key = (st.st_dev, st.st_ino)
        if key in self._probed or key in self._not_cuda:
            return None
        try:
            elf = read_symbols(path)
        except ElfError:
            self._not_cuda.add(key)
            return None
        funcs = elf.lookup(ALL_SYMBOLS)
        attached: list[str] = []
        offsets: set[int] = set()
        plan = [(h.symbol, f"cuda_enter_{FN_ID[h.symbol]}", "cuda_return") for h in HOOKS]
        plan += [(sym, entry, ret) for sym, _fam, entry, ret in NAME_HOOKS]
        for sym, entry, ret in plan:
            addr = funcs.get(sym)
            off = None if addr is None else elf.offset_of_vaddr(addr)
            if off is None or off in offsets:
                continue  # absent, or an alias of a symbol already hooked
            offsets.add(off)
            self._attach(path, key, off, entry, ret)
            attached.append(sym)
        if not attached:
            self._not_cuda.add(key)
            self.stats.skipped += 1
            return None
        obj = ProbedObject(path, key, attached, time.monotonic_ns())
        self._probed[key] = obj
        self.stats.objects.append(obj)
        return obj

    def _attach(self, path: str, key: tuple[int, int], off: int | None, entry: str,
                ret: str) -> None:
        from bcc import BPF
        from bcc.libbcc import lib

        for kind, fn_name in ((0, entry), (1, ret)):
            if not fn_name:
                continue
            fn = self.bpf.load_func(fn_name.encode(), BPF.KPROBE)
            ev = b"%s_renacerd_%x_%x_%x" % (b"pr"[kind:kind + 1], key[0], key[1], off)
            fd = lib.bpf_attach_uprobe(fn.fd, kind, ev, path.encode(), off, -1)
            if fd < 0:
                raise ProbeError(f"cannot attach a uprobe to {path}+{off:#x} ({fn_name})")
            self.bpf._add_uprobe_fd(ev, fd)
            self.stats.probes += 1

    def probe_process(self, pid: int) -> list[ProbedObject]:
        """Probe every CUDA copy mapped by `pid`: named libraries and static cudart."""
        new = []
        seen: set[int] = set()
        exe = _exe_inode(pid)
        for m in read_maps(pid):
            if m.inode in seen:
                continue
            seen.add(m.inode)
            fam = family_of(m.path)
            if fam is None and m.inode != exe and "x" not in m.perms:
                continue
            path = openable_path(pid, m)
            if path is None:
                continue
            if fam is None and not self._may_hold_runtime(path):
                continue
            try:
                obj = self.probe_object(path)
            except ProbeError:
                continue  # unmapped meanwhile
            if obj is not None:
                new.append(obj)
        return new

    def _may_hold_runtime(self, path: str) -> bool:
        """Statically linked cudart: an object defining the runtime's entry points."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        key = (st.st_dev, st.st_ino)
        if key in self._probed:
            return False
        if key in self._not_cuda:
            return False
        try:
            if has_cuda_code(path) and read_symbols(path).lookup(RUNTIME_MARKERS):
                return True
        except ElfError:
            pass
        self._not_cuda.add(key)
        return False

    # -- reading -----------------------------------------------------------------------
    def rings(self) -> list[RingReader]:
        """The call and name rings (for the priority guard's fill test)."""
        return [r for r in (self.events, self.names) if r is not None]

    def drain(self) -> tuple[np.ndarray, np.ndarray]:
        """Events, then names: a name record is written before any launch that uses it, so
        every drained launch finds its name in the same drain (names first would miss one
        written between the two reads)."""
        ev = self.events.drain()
        names = self.names.drain()
        return ev, names

    def counters_per_cpu(self) -> dict[str, list[int]]:
        """Loss and nesting counters per CPU."""
        arr = self.bpf["counters"]
        return {
            name: [int(v) for v in arr.getvalue(ctypes.c_int(i))]
            for i, name in enumerate(COUNTER_NAMES)
        }

    def counters(self) -> dict[str, int]:
        """Counters summed over CPUs."""
        return {k: sum(v) for k, v in self.counters_per_cpu().items()}

    def close(self) -> None:
        """Unmap the rings and detach every probe."""
        for r in (self.events, self.names):
            if r is not None:
                r.close()
        self.events = self.names = None
        if self.bpf is not None:
            detach_uprobes_in_parallel(self.bpf)
            self.bpf.cleanup()
            self.bpf = None


def _exe_inode(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/exe").st_ino
    except OSError:
        return -1


def _pin_map(fd: int) -> str:
    """Pin map `fd` under a fresh name in bpffs (mounting it when absent); returns the path."""
    from bcc.libbcc import lib

    pin = lib.bpf_obj_pin
    pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    pin.restype = ctypes.c_int
    if not os.path.ismount(BPFFS):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"bpf", BPFFS.encode(), b"bpf", 0, None) != 0:
            err = ctypes.get_errno()
            raise ProbeError(f"cannot mount bpffs on {BPFFS}: {os.strerror(err)}")
    path = os.path.join(BPFFS, f"renacerd-targets-{os.getpid()}-{os.urandom(4).hex()}")
    if pin(fd, path.encode()) != 0:
        raise ProbeError(f"cannot pin the target map at {path}")
    return path
