"""Numpy layouts of the fixed-size records written by bpf/cuda.c (tests/unit/
test_record_layout.py parses the C source and checks that the two agree)."""

from __future__ import annotations

import numpy as np

NAME_LEN = 256

# counters (per CPU), in bpf/cuda.c order
COUNTER_NAMES = ("gpu_events_lost", "gpu_names_lost", "gpu_nested_calls", "gpu_failed_reads")

# event.flags
F_READ_FAILED = 0x01

# name_rec.how
N_REGISTER = 1
N_GET_KERNEL = 2
N_MODULE_FN = 3
N_IMAGE = 4  # key = code start, key2 = code end, name = <u8 inode, <u4 kernel dev_t

GPU_EVENT = np.dtype(
    [
        ("ts", "<u8"),
        ("dur", "<u8"),
        ("ret", "<i8"),
        ("a", "<u8", (5,)),
        ("d", "<u4", (6,)),
        ("pid", "<u4"),
        ("tid", "<u4"),
        ("fn", "<u2"),
        ("flags", "<u2"),
        ("pad", "<u4"),
    ]
)
assert GPU_EVENT.itemsize == 104

NAME_REC = np.dtype(
    [
        ("ts", "<u8"),
        ("key", "<u8"),
        ("key2", "<u8"),
        ("pid", "<u4"),
        ("how", "<u2"),
        ("len", "<i2"),
        ("name", f"S{NAME_LEN}"),
    ]
)
assert NAME_REC.itemsize == 32 + NAME_LEN

# The GPU chunk written to the store (layer "gpu"): one row per API call.
GPU_LAYOUT: tuple[tuple[str, str], ...] = (
    ("ts", "<i8"),
    ("dur", "<u8"),
    ("ret", "<i8"),
    ("tid", "<u4"),
    ("fn", "<u2"),
    ("flags", "<u2"),
    ("a0", "<u8"),
    ("a1", "<u8"),
    ("a2", "<u8"),
    ("a3", "<u8"),
    ("a4", "<u8"),
    ("gx", "<u4"),
    ("gy", "<u4"),
    ("gz", "<u4"),
    ("bx", "<u4"),
    ("by", "<u4"),
    ("bz", "<u4"),
    ("name", "<i4"),   # string id of the kernel name (launches), -1 otherwise
)
