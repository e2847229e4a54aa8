"""Load BPF C from bpf/ with feature #defines prepended (the bcc-tools way)."""

from __future__ import annotations

import ctypes
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"


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


def _release_compiler_heap() -> None:
    """clang/LLVM leave ~100 MB of freed heap behind; hand it back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
