"""`renacerd doctor`: can BPF tracing work on this machine? Each check, and its fix."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from renacerd.cli.common import Parser


def _root() -> tuple[bool, str, str]:
    ok = os.geteuid() == 0
    return ok, "running as root" if ok else f"euid {os.geteuid()}", "run as root (sudo)"


def _bcc() -> tuple[bool, str, str]:
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return False, f"import bcc failed: {e}", "apt-get install python3-bpfcc; make the venv " \
            "with --system-site-packages (the PyPI package named bcc is unrelated)"
    return True, f"import bcc ok ({Path(bcc.__file__).parent})", ""


def _tracefs() -> tuple[bool, str, str]:
    from renacerd.syscall_table import tracefs_root

    root = tracefs_root()
    if root is None:
        return False, "tracefs not mounted", "mount -t tracefs nodev /sys/kernel/tracing"
    ok = (root / "events/raw_syscalls/sys_enter").is_dir()
    return ok, f"tracefs at {root}, raw_syscalls {'present' if ok else 'MISSING'}", \
        "kernel needs CONFIG_FTRACE_SYSCALLS"


def _btf() -> tuple[bool, str, str]:
    ok = Path("/sys/kernel/btf/vmlinux").exists()
    if not ok:
        return False, "no /sys/kernel/btf/vmlinux", "argv falls back to execve's arguments"
    try:
        from renacerd.capture.probes.btf import member_offset

        off = member_offset("task_struct", "mm")
    except Exception as e:
        return False, f"BTF present but unreadable: {e}", "apt-get install bpftool"
    return True, f"BTF present (task_struct.mm at {off})", ""


def _headers() -> tuple[bool, str, str]:
    rel = platform.release()
    build = Path(f"/lib/modules/{rel}/build")
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return True, "kernel headers from CONFIG_IKHEADERS", ""
    if (build / "include/generated/autoconf.h").exists():
        target = os.path.realpath(build)
        note = "" if rel in target else f" (linked to {target}: running kernel has no package)"
        return True, f"{build} ok{note}", ""
    return False, f"no kernel headers at {build}", \
        "apt-get install linux-headers-amd64 and link build/source (scripts/install.sh does)"


def _syscalls() -> tuple[bool, str, str]:
    from renacerd.syscall_table import missing_from_table, syscall_table

    miss = missing_from_table()
    n = len(syscall_table())
    if miss:
        return False, f"{n} syscalls named; kernel has unnamed ones: {', '.join(miss)}", \
            "add them to renacerd/syscall_table.py NEWER_X86_64"
    return True, f"{n} syscall names, every kernel syscall named", ""


def _load() -> tuple[bool, str, str]:
    if os.geteuid() != 0:
        return False, "skipped (not root)", "run as root"
    from renacerd.capture.probes.loader import ProbeError
    from renacerd.capture.probes.syscalls import SyscallProbes

    p = SyscallProbes(event_mb=1, detail_mb=1)
    try:
        p.load()
    except ProbeError as e:
        return False, str(e).splitlines()[0][:200], "see the checks above"
    p.close()
    return True, "BPF programs compile, load, attach and detach", ""


def _cuda() -> tuple[bool, str, str]:
    from renacerd.capture.cuda_source import system_cuda_libraries

    libs = system_cuda_libraries()
    what = ", ".join(libs) if libs else "none in ldconfig's cache (wheel copies are found per run)"
    return True, f"CUDA libraries: {what}", ""


CHECKS: list[tuple[str, Callable[[], tuple[bool, str, str]]]] = [
    ("root", _root),
    ("bcc", _bcc),
    ("tracefs", _tracefs),
    ("btf", _btf),
    ("headers", _headers),
    ("syscalls", _syscalls),
    ("load", _load),
    ("cuda", _cuda),
]


def main(argv: list[str]) -> int:
    """Run every check; exit 0 when all pass, 1 otherwise."""
    p = Parser(prog="renacerd doctor", description="Check what BPF tracing needs here.")
    p.add_argument("--brief", action="store_true", help="one summary line")
    a = p.parse_args(argv)
    failed = 0
    for name, fn in CHECKS:
        try:
            ok, what, fix = fn()
        except Exception as e:  # a check must never crash the doctor
            ok, what, fix = False, f"{type(e).__name__}: {e}", ""
        failed += not ok
        if not a.brief:
            sys.stdout.write(f"[{'ok' if ok else 'FAIL'}] {name:<9} {what}\n")
            if not ok and fix:
                sys.stdout.write(f"       fix: {fix}\n")
    sys.stdout.write(f"doctor: {len(CHECKS) - failed}/{len(CHECKS)} checks passed\n")
    return 0 if failed == 0 else 1
