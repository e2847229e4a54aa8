"""Numpy layouts of the fixed-size records written by bpf/syscalls.c (tests/unit/
test_record_layout.py parses the C source and checks that the two agree)."""

from __future__ import annotations

import numpy as np

# the dirfd value meaning "the working directory"; fd tables keep the cwd under this key
AT_FDCWD = -100

# Pseudo syscall numbers of lifecycle records (bpf/syscalls.c EV_*).
EV_FORK = 0xFFF0
EV_EXEC = 0xFFF1
EV_EXIT = 0xFFF2
EV_SIGNAL = 0xFFF3
LIFECYCLE_MIN = 0xFFF0

# event.flags
F_NO_ENTER = 0x01
F_DETAIL = 0x02
F_DETAIL_LOST = 0x04
F_READ_FAILED = 0x08
F_TRUNCATED = 0x10
F_THREAD = 0x20
F_EMPTY_PATH0 = 0x40  # the first path argument is "" (no detail record carries it)
F_EMPTY_PATH1 = 0x80
F_UNFOLLOWED = 0x100  # execve: privilege gained at exec, the process no longer traced
# The top bits of an event's flags hold the run slot of its process (bpf/syscalls.c
# RUN_SHIFT): one attachment serves every run, and the slot routes each record.
RUN_SHIFT = 9
RUN_SLOTS = 1 << (16 - RUN_SHIFT)  # slot 0: none
RECORD_FLAGS = (1 << RUN_SHIFT) - 1  # the flags proper, as the store keeps them

# detail.slot
SLOT_PATH0 = 0
SLOT_PATH1 = 1
SLOT_ADDR = 2
SLOT_COMM = 3
SLOT_ARGV_BLOB = 4
SLOT_ARGV = 8

# counters (per CPU), in bpf/syscalls.c order
COUNTER_NAMES = ("events_lost", "details_lost", "failed_reads", "unmatched_exits", "truncated")

EVENT = np.dtype(
    [
        ("ts", "<u8"),
        ("dur", "<u8"),
        ("ret", "<i8"),
        ("a0", "<u8"),
        ("pid", "<u4"),
        ("tid", "<u4"),
        ("nr", "<u2"),
        ("flags", "<u2"),
        ("aux", "<u4"),
    ]
)
assert EVENT.itemsize == 48

STR_LEN = 256  # the short detail ring's strings: most paths fit
LONG_LEN = 4096  # PATH_MAX: longer strings go to the long ring, whole up to this
ARGV_ARGS = 128  # execve arguments read from the caller (the argv blob holds LONG_LEN bytes)


def detail_dtype(str_len: int = STR_LEN) -> np.dtype:
    """Layout of struct detail for a given STR_LEN."""
    return np.dtype(
        [
            ("ts", "<u8"),
            ("tid", "<u4"),
            ("nr", "<u2"),
            ("slot", "u1"),
            ("flags", "u1"),
            ("len", "<i4"),
            ("pad", "<u4"),
            ("data", f"S{str_len}"),
        ]
    )


def take(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """rows[idx] for fixed-size records, gathered as 8-byte words: numpy's copy of a
    structured element is generic and ~4x slower than gathering plain integer rows."""
    w = rows.dtype.itemsize
    if w % 8 or not rows.flags.c_contiguous or rows.ndim != 1:
        return rows[idx]
    return rows.view(np.uint64).reshape(len(rows), w // 8)[idx].view(rows.dtype).reshape(-1)
