"""A small training-shaped workload: shards on disk, a loader reading them, checkpoints.

No framework needed: it makes the syscall pattern of a data-loading training loop (open,
read shards, write a checkpoint via temp-then-rename), each step marked with an experiment
span, so `renacerd -- python demo_train.py` has something real to capture and tag.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from renacerd.client import experiment_span


def make_shards(root: Path, n: int, size: int) -> list[Path]:
    """Write n shards of `size` bytes."""
    shards = []
    for i in range(n):
        p = root / f"shard-{i:03d}.bin"
        p.write_bytes(hashlib.sha256(str(i).encode()).digest() * (size // 32))
        shards.append(p)
    return shards


def train(steps: int = 5, root: Path | None = None) -> float:
    """Each step reads two shards, 'computes', and every other step checkpoints."""
    root = root or Path(tempfile.mkdtemp(prefix="renacer-demo-"))
    shards = make_shards(root, 8, 64 * 1024)
    loss = 1.0
    for step in range(steps):
        with experiment_span("training_step", model_name="demo-mlp", epoch=0, step=step) as sp:
            total = 0
            for p in shards[step % 8 : step % 8 + 2]:
                with open(p, "rb") as f:
                    while chunk := f.read(16 * 1024):
                        total += chunk[0]
            loss *= 0.8
            if step % 2 == 1:
                tmp = root / "ckpt.tmp"
                tmp.write_bytes(str(loss).encode() * 100)
                os.replace(tmp, root / "ckpt.bin")
            sp.set(loss=loss, metrics={"checksum": float(total)})
        print(f"step {step}: loss {loss:.4f} ({total})", flush=True)
    return loss


if __name__ == "__main__":
    train(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
