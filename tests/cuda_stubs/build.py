"""Build the stub CUDA libraries and programs with gcc, laid out like real installs."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(slots=True)
class Stubs:
    """Paths of everything built."""

    driver_dir: Path          # holds libcuda.so.1 (put it on LD_LIBRARY_PATH)
    driver: Path
    runtime: Path             # <root>/usr/local/cuda/lib64/libcudart.so.12
    wheel_runtime: Path       # site-packages/nvidia/cuda_runtime/lib/libcudart.so.12
    cu13_runtime: Path        # site-packages/nvidia/cu13/lib/libcudart.so.13
    hashed_runtime: Path      # site-packages/torch/lib/libcudart-6d56b25a.so.11.0
    nccl: Path
    app: Path                 # linked to the wheel runtime
    app_static: Path          # cudart linked in


def _cc(*args: str) -> None:
    subprocess.run(["gcc", "-O2", "-Wall", *args], check=True)


# The real entry points open with `push %rbp; mov %rsp,%rbp` (every hooked symbol of
# CUDA 13.0's libcudart.so.13 does), and x86 uprobes emulate a push where any other first
# instruction is single-stepped out of line: ~0.4 us against ~14 us a hit on this VM.
# -O0 gives every stub that prologue (at -O2 gcc drops the frame of small leaf functions
# whatever -fno-omit-frame-pointer says), so the stubs probe like the real libraries.
REAL_PROLOGUE = ("-O0",)


def _lib(src: str, out: Path, soname: str, *extra: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    _cc("-shared", "-fPIC", *REAL_PROLOGUE, f"-Wl,-soname,{soname}", "-o", str(out),
        str(HERE / src), *extra)
    return out


def build(dst: Path) -> Stubs:
    """Compile into `dst` (a fresh directory)."""
    drv_dir = dst / "driver"
    driver = _lib("libcuda.c", drv_dir / "libcuda.so.1", "libcuda.so.1")
    runtime = _lib("libcudart.c", dst / "usr/local/cuda/lib64/libcudart.so.12",
                   "libcudart.so.12", "-ldl")
    site = dst / "site-packages"
    wheel = _lib("libcudart.c", site / "nvidia/cuda_runtime/lib/libcudart.so.12",
                 "libcudart.so.12", "-ldl")
    cu13 = _lib("libcudart.c", site / "nvidia/cu13/lib/libcudart.so.13", "libcudart.so.13",
                "-ldl")
    hashed = _lib("libcudart.c", site / "torch/lib/libcudart-6d56b25a.so.11.0",
                  "libcudart-6d56b25a.so.11.0", "-ldl")
    nccl = _lib("libnccl.c", site / "nvidia/nccl/lib/libnccl.so.2", "libnccl.so.2")
    app = dst / "app"
    _cc("-o", str(app), str(HERE / "app.c"), "-L", str(wheel.parent), "-l:libcudart.so.12",
        f"-Wl,-rpath,{wheel.parent}")
    app_static = dst / "app_static"
    _cc("-o", str(app_static), *REAL_PROLOGUE, str(HERE / "app.c"), str(HERE / "libcudart.c"),
        "-ldl")
    return Stubs(drv_dir, driver, runtime, wheel, cu13, hashed, nccl, app, app_static)


if __name__ == "__main__":
    import sys

    d = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/cuda_stubs")
    shutil.rmtree(d, ignore_errors=True)
    print(build(d))
