"""A path-heavy PyTorch loader: traced/untraced step time in alternate windows of one run.

The loop of torch_loop.py (a CPU MLP, 2 DataLoader workers) over a directory of many small
.npy files: per sample each worker stats, memory-maps (np.load(mmap_mode="r")), copies out
and closes FILES_PER_SAMPLE files, so a step carries several hundred path syscalls (stat,
three openat per np.load) among ~2,000, and the job keeps the CPUs nearly busy.
renacerd --pid attaches in alternate windows (torch_loop.windows); --pause-daemon stops
the daemon in them, so only the BPF programs run: the kernel side's cost alone.

Usage: sudo .venv/bin/python bench/path_loader.py [--windows 20] [--window-s 2]
       [--pause-daemon --daemon-arg=--ring-mb=256 --daemon-arg=--detail-ring-mb=64]
       [--build TREE --build OTHER_TREE]  (traced windows alternate the two builds)
(needs torch, like torch_loop.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.torch_loop import train, windows  # noqa: E402

FILES = 4096  # a directory of many files: the dentry cache holds them, the disk is not read
FILES_PER_SAMPLE = 2
BATCH = 32  # 64 files a step: 256 path syscalls, ~2,000 syscalls in all
ITEM_BYTES = 512


def make_files(parent: Path) -> Path:
    """FILES small .npy arrays of random bytes under parent/data."""
    import numpy as np

    d = parent / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(FILES):
        np.save(d / f"{i:06d}.npy", rng.integers(0, 256, ITEM_BYTES, dtype=np.uint8))
    return d


def workload(data_dir: str, steps: int, warmup: int) -> None:
    """The training loop over the files (runs in the traced process)."""
    import numpy as np
    import torch
    from torch.utils.data import Dataset

    files = [str(p) for p in sorted(Path(data_dir).glob("*.npy"))]

    class Files(Dataset):
        def __len__(self) -> int:
            return 10**9  # never runs out, however long --windows runs

        def __getitem__(self, i: int):
            parts = []
            for k in range(FILES_PER_SAMPLE):
                p = files[(i * FILES_PER_SAMPLE + k) * 7919 % len(files)]
                if os.stat(p).st_size:  # the loader's size check
                    parts.append(np.array(np.load(p, mmap_mode="r")))  # map, copy, unmap
            x = torch.from_numpy(np.concatenate(parts)[:1024].astype(np.float32) / 255.0)
            return x, torch.tensor(i % 10)

    train(Files(), steps, warmup, batch_size=BATCH,
          hidden=int(os.environ.get("BENCH_HIDDEN", "1536")))


def main() -> int:
    """The windowed run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--window-s", type=float, default=2.0)
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="passed to renacerd (e.g. --daemon-arg=--ring-mb=256)")
    ap.add_argument("--pause-daemon", action="store_true",
                    help="stop the daemon (SIGSTOP) for each traced window: BPF alone; give "
                         "it rings that hold a window")
    ap.add_argument("--build", action="append", type=Path, default=[],
                    help="a source tree whose renacerd traces every other window (give two, "
                         "e.g. --build . --build /tmp/other, to compare builds in one run)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--workload", nargs=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.workload:
        workload(a.workload[0], 0, a.warmup)
        return 0
    if os.geteuid() != 0:
        print("bench/path_loader.py: must run as root", file=sys.stderr)
        return 2
    if a.windows < 1 or a.window_s <= 0:
        print("bench/path_loader.py: --windows and --window-s must be positive", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        data = make_files(Path(d))
        me = [sys.executable, __file__, "--warmup", str(a.warmup), "--workload", str(data)]
        return windows(me, Path(d) / "t.db", a.windows, a.window_s, a.daemon_arg,
                       pause=a.pause_daemon, builds=[b.resolve() for b in a.build] or None,
                       title=f"path-heavy loader ({FILES_PER_SAMPLE} np.load(mmap_mode='r') "
                             f"of {FILES} files a sample, batch {BATCH}, 2 workers)")


if __name__ == "__main__":
    sys.exit(main())
