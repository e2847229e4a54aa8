"""Load BPF C from bpf/ with feature #defines prepended (the bcc-tools way)."""

from __future__ import annotations

import ctypes
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parents[3] / "bpf"


class ProbeError(RuntimeError):
    """Compiling, loading or attaching a BPF program failed."""


def bpf_source(name: str, defines: dict[str, object]) -> str:
    """The C text of bpf/<name> with `defines` prepended."""
    path = BPF_DIR / name
    try:
        body = path.read_text()
    except OSError as e:
        raise ProbeError(f"cannot read BPF source {path}: {e.strerror}") from e
    head = []
    for k, v in defines.items():
        if v is False or v is None:
            continue
        head.append(f"#define {k}" if v is True else f"#define {k} {v}")
    return "\n".join(head) + "\n" + body


def compile_bpf(text: str, **kw: object):
    """Compile and load `text` with BCC; import errors and compile errors become ProbeError."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise ProbeError(
            "BCC's Python module is missing: install Debian's python3-bpfcc "
            "(the PyPI package named bcc is unrelated); run `renacerd doctor`"
        ) from e
    try:
        b = BPF(text=text, **kw)
    except Exception as e:  # BCC raises bare Exception on compile/load failures
        raise ProbeError(f"BPF program failed to load: {e}; run `renacerd doctor`") from e
    _release_compiler_heap()
    return b


MADV_PAGEOUT = 21
_COMPILER_LIBS = ("libLLVM", "libclang")


def _release_compiler_heap() -> None:
    """After the compile, clang/LLVM are dead weight: ~100 MB of freed heap and ~80 MB of
    their code pages. Hand the heap back and page the code out (it faults back in if used)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    try:
        maps = open("/proc/self/maps").read().splitlines()
    except OSError:
        return
    for line in maps:
        parts = line.split()
        if len(parts) < 6 or not any(lib in parts[5] for lib in _COMPILER_LIBS):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        libc.madvise(lo, hi - lo, MADV_PAGEOUT)  # best effort: old kernels answer EINVAL


def detach_uprobes_in_parallel(bpf) -> None:
    """Close every uprobe of `bpf` at once. Each close waits for the kernel to unregister
    the probe (~0.1 s here); BCC's cleanup does them one by one, which makes SIGTERM take
    seconds with a few dozen CUDA hooks. Done concurrently, they overlap."""
    from concurrent.futures import ThreadPoolExecutor

    from bcc import lib

    items = list(bpf.uprobe_fds.items())
    if not items:
        return
    with ThreadPoolExecutor(max_workers=min(64, len(items))) as pool:
        list(pool.map(lambda kv: lib.bpf_close_perf_event_fd(kv[1]), items))
    for name, _ in items:
        lib.bpf_detach_uprobe(name)
        bpf._del_uprobe_fd(name)
