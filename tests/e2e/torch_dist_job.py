"""A small data-parallel training job on CPU (gloo) for the rank tests, run under torchrun.

Each step: forward and backward of a tiny model, one all_reduce of the flattened gradients,
one all_reduce of the loss, inside an experiment span carrying the step. Options make one
rank late at chosen steps by a chosen cause, or call a different-sized all_reduce (a desync).
"""

from __future__ import annotations

import argparse
import datetime
import os
import threading
import time

import torch
import torch.distributed as dist

from renacerd.client import experiment_span
from renacerd.integrations.torch_distributed import install

FSYNC_BYTES = 768 << 20  # dirty data for a "large fsync" (~0.25 s on this kind of disk)


def _late(kind: str, arg: str) -> None:
    """Make this rank late by `kind`: fsync of a pre-written file, a slow read, a sleep."""
    if kind == "fsync":
        fd = os.open(arg, os.O_WRONLY)
        os.fsync(fd)
        os.close(fd)
    elif kind == "read":
        # A FIFO whose writer (another thread) delivers after a pause: the read blocks.
        os.mkfifo(arg)

        def writer() -> None:
            with open(arg, "wb") as f:
                time.sleep(0.4)
                f.write(b"x" * 4096)

        th = threading.Thread(target=writer)
        th.start()
        fd = os.open(arg, os.O_RDONLY)
        while os.read(fd, 4096):
            pass
        os.close(fd)
        th.join()
        os.unlink(arg)
    elif kind == "sleep":
        time.sleep(float(arg) / 1000)


def main() -> None:
    """Parse the plan, train, leave."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--late", action="append", default=[],
                   help="STEP:RANK:KIND:ARG (kind fsync PATH, read FIFO_PATH, sleep MS)")
    p.add_argument("--desync", default=None, help="STEP:RANK:NUMEL for the loss all_reduce")
    p.add_argument("--timeout", type=float, default=60, help="collective timeout, seconds")
    a = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=a.timeout))
    install()
    rank = dist.get_rank()
    plan = {}
    for item in a.late:
        step, r, kind, arg = item.split(":", 3)
        if int(r) == rank:
            plan[int(step)] = (kind, arg)
            if kind == "fsync":  # dirty pages now, outside any step: the step only syncs
                with open(arg, "wb") as f:
                    chunk = b"\xa5" * (1 << 20)
                    for _ in range(FSYNC_BYTES >> 20):
                        f.write(chunk)
    desync = tuple(int(x) for x in a.desync.split(":")) if a.desync else None
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    dist.barrier()
    for step in range(a.steps):
        with experiment_span("train_step", model_name="linear", step=step):
            if step in plan:
                _late(*plan[step])
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            flat = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
            dist.all_reduce(flat)
            n = 1
            if desync is not None and desync[0] == step and desync[1] == rank:
                n = desync[2]
            dist.all_reduce(loss.detach().reshape(1).repeat(n))
            opt.step()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
