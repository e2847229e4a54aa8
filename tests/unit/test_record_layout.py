"""The record layouts and constants in bpf/*.c agree with renacerd/records.py and
renacerd/cuda/records.py: the C text is parsed, so a change to one side alone fails here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from renacerd import records
from renacerd.cuda import records as cuda_records

BPF = Path(__file__).resolve().parents[2] / "bpf"

# C type -> (numpy kind, bytes); natural alignment is the size on x86-64
C_TYPES = {
    "u8": ("u", 1), "u16": ("u", 2), "u32": ("u", 4), "u64": ("u", 8),
    "s8": ("i", 1), "s16": ("i", 2), "s32": ("i", 4), "s64": ("i", 8),
    "char": ("S", 1),
}


def _c_int(text: str) -> int:
    """A C integer literal: 0x.. hex, 0.. octal, decimal."""
    if text.lower().startswith("0x"):
        return int(text, 16)
    if len(text) > 1 and text.startswith("0"):
        return int(text, 8)
    return int(text)


def defines(source: str) -> dict[str, int]:
    """Every `#define NAME <integer literal>` of a C file (a name defined twice fails)."""
    out: dict[str, int] = {}
    for m in re.finditer(r"^#define\s+(\w+)\s+(0[xX][0-9a-fA-F]+|\d+)\b", source, re.M):
        assert m[1] not in out, f"{m[1]} defined twice"
        out[m[1]] = _c_int(m[2])
    return out


def struct_layout(source: str, name: str, sizes: dict[str, int]) -> tuple[list, int]:
    """([(field, kind, item bytes, count, offset)], sizeof) of `struct name` under natural
    alignment; array bounds that are macros are looked up in `sizes`."""
    m = re.search(r"^struct\s+" + name + r"\s*\{(.*?)^\};", source, re.M | re.S)
    assert m, f"struct {name} not found"
    fields, off, align = [], 0, 1
    for line in m[1].splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        f = re.fullmatch(r"(\w+)\s+(\w+)(?:\[(\w+)\])?;", line)
        assert f, f"struct {name}: cannot read {line!r}"
        kind, size = C_TYPES[f[1]]
        count = 1 if f[3] is None else (int(f[3]) if f[3].isdigit() else sizes[f[3]])
        off = -(-off // size) * size
        fields.append((f[2], kind, size, count, off))
        off += size * count
        align = max(align, size)
    return fields, -(-off // align) * align


def dtype_layout(dt: np.dtype) -> tuple[list, int]:
    """The same description of a numpy record dtype."""
    out = []
    for field in dt.names:
        sub, off = dt.fields[field][:2]
        if sub.kind == "S":
            out.append((field, "S", 1, sub.itemsize, off))
        else:
            count = int(np.prod(sub.shape)) if sub.shape else 1
            out.append((field, sub.base.kind, sub.base.itemsize, count, off))
    return out, dt.itemsize


SYSCALLS = (BPF / "syscalls.c").read_text()
CUDA = (BPF / "cuda.c").read_text()
SYS_DEFINES = defines(SYSCALLS)
CUDA_DEFINES = defines(CUDA)


@pytest.mark.parametrize("struct, dtype", [
    ("event", records.EVENT),
    ("detail", records.detail_dtype(records.STR_LEN)),
    ("detail_long", records.detail_dtype(records.LONG_LEN)),
])
def test_syscall_records_match_the_c_structs(struct: str, dtype: np.dtype) -> None:
    """Field names, order, types, offsets and sizes; the string lengths are the ones the
    loader prepends (STR_LEN, LONG_LEN)."""
    sizes = {"STR_LEN": records.STR_LEN, "LONG_LEN": records.LONG_LEN}
    assert struct_layout(SYSCALLS, struct, sizes) == dtype_layout(dtype)


def test_event_is_48_bytes_and_details_24_plus_the_string() -> None:
    """The sizes the C file's header comment promises."""
    assert struct_layout(SYSCALLS, "event", {})[1] == 48
    assert struct_layout(SYSCALLS, "detail", {"STR_LEN": 256})[1] == 24 + 256
    assert struct_layout(SYSCALLS, "detail_long", {"LONG_LEN": 4096})[1] == 24 + 4096


def test_lifecycle_numbers() -> None:
    """EV_* pseudo syscall numbers, and LIFECYCLE_MIN the lowest of them."""
    ev = {k: v for k, v in SYS_DEFINES.items() if k.startswith("EV_")}
    assert ev == {"EV_FORK": records.EV_FORK, "EV_EXEC": records.EV_EXEC,
                  "EV_EXIT": records.EV_EXIT, "EV_SIGNAL": records.EV_SIGNAL}
    assert ev == {"EV_FORK": 0xFFF0, "EV_EXEC": 0xFFF1, "EV_EXIT": 0xFFF2, "EV_SIGNAL": 0xFFF3}
    assert min(ev.values()) == records.LIFECYCLE_MIN


def test_event_flag_bits_and_run_slot() -> None:
    """Every F_* bit of the C file has the same value in records.py (and no other F_*
    there), all below RUN_SHIFT, and the run slots fill the rest of the 16-bit flags."""
    c_flags = {k: v for k, v in SYS_DEFINES.items() if k.startswith("F_")}
    py_flags = {k: getattr(records, k) for k in dir(records) if re.fullmatch(r"F_[A-Z0-9_]+", k)}
    assert c_flags == py_flags
    assert len(c_flags) == 9 and sorted(c_flags.values()) == [1 << i for i in range(9)]
    assert SYS_DEFINES["RUN_SHIFT"] == records.RUN_SHIFT == 9
    assert max(c_flags.values()) < 1 << records.RUN_SHIFT
    assert records.RECORD_FLAGS == (1 << records.RUN_SHIFT) - 1
    assert records.RUN_SLOTS == 1 << (16 - records.RUN_SHIFT) == 128  # C: RUN_SLOTS <= 128


def test_detail_slots() -> None:
    """SLOT_* values of struct detail's slot."""
    c_slots = {k: v for k, v in SYS_DEFINES.items() if k.startswith("SLOT_")}
    assert c_slots == {k: getattr(records, k) for k in c_slots}
    assert sorted(c_slots) == ["SLOT_ADDR", "SLOT_ARGV", "SLOT_ARGV_BLOB", "SLOT_COMM",
                               "SLOT_PATH0", "SLOT_PATH1"]
    # argv[i] goes to SLOT_ARGV + i: the slot byte holds every argument captured
    assert records.SLOT_ARGV + records.ARGV_ARGS - 1 <= 0xFF


def test_syscall_counters_in_c_order() -> None:
    """COUNTER_NAMES[i] is the counter the C file indexes with the C_* of value i."""
    names = {"C_EVENTS_LOST": "events_lost", "C_DETAILS_LOST": "details_lost",
             "C_READ_FAILED": "failed_reads", "C_NO_ENTER": "unmatched_exits",
             "C_TRUNCATED": "truncated"}
    c = {k: v for k, v in SYS_DEFINES.items() if k.startswith("C_")}
    assert c.pop("C_MAX") == len(records.COUNTER_NAMES) == 5
    assert sorted(c) == sorted(names)
    assert tuple(names[k] for k in sorted(c, key=c.get)) == records.COUNTER_NAMES
    assert sorted(c.values()) == list(range(5))


@pytest.mark.parametrize("struct, dtype", [
    ("gpu_event", cuda_records.GPU_EVENT),
    ("name_rec", cuda_records.NAME_REC),
])
def test_cuda_records_match_the_c_structs(struct: str, dtype: np.dtype) -> None:
    """The CUDA side the same way (NAME_LEN is prepended by the loader)."""
    assert struct_layout(CUDA, struct, {"NAME_LEN": cuda_records.NAME_LEN}) == dtype_layout(dtype)


def test_cuda_constants() -> None:
    """Counters in C order, the flag bit and the name record kinds."""
    names = {"C_LOST": "gpu_events_lost", "C_NAMES_LOST": "gpu_names_lost",
             "C_NESTED": "gpu_nested_calls", "C_READ_FAILED": "gpu_failed_reads"}
    c = {k: v for k, v in CUDA_DEFINES.items() if k.startswith("C_")}
    assert c.pop("C_MAX") == len(cuda_records.COUNTER_NAMES) == 4
    assert tuple(names[k] for k in sorted(c, key=c.get)) == cuda_records.COUNTER_NAMES
    assert CUDA_DEFINES["F_READ_FAILED"] == cuda_records.F_READ_FAILED == 1
    hows = {k: v for k, v in CUDA_DEFINES.items() if k.startswith("N_")}
    assert hows == {k: getattr(cuda_records, k) for k in hows}
    assert hows == {"N_REGISTER": 1, "N_GET_KERNEL": 2, "N_MODULE_FN": 3, "N_IMAGE": 4}


def test_the_parser_reads_c_octal_and_rejects_a_twice_defined_name() -> None:
    """0100 is octal in C (CREAT_FLAGS' O_CREAT), and a name defined twice is an error."""
    assert defines("#define A 0100\n#define B 0x10\n#define C 7\n") == {"A": 64, "B": 16, "C": 7}
    with pytest.raises(AssertionError):
        defines("#define A 1\n#define A 2\n")
    fields, size = struct_layout("struct s {\n    u8 a;\n    u64 b;  // c\n};\n", "s", {})
    assert fields == [("a", "u", 1, 1, 0), ("b", "u", 8, 1, 8)] and size == 16
