"""A small PyTorch CUDA training loop with step intervals (experiment-span-like).

argv: steps, out.json, [--handshake]. With --handshake it prints "ready" after importing
torch and waits for a line on stdin (the tracer attaches meanwhile). Writes the steps'
[start, end) CLOCK_MONOTONIC ns and their durations to out.json.
"""

import json
import sys
import time

import torch


def main() -> int:
    steps, out = int(sys.argv[1]), sys.argv[2]
    if "--handshake" in sys.argv:
        print("ready", flush=True)
        sys.stdin.readline()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)
    ).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.randn(steps, 256, 512)          # host batches: copied H2D every step
    target = torch.randint(0, 10, (steps, 256))
    spans = []
    for step in range(steps):
        t0 = time.monotonic_ns()
        x, y = data[step].to(dev), target[step].to(dev)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lv = loss.item()                           # D2H copy + sync
        spans.append({"step": step, "start": t0, "end": time.monotonic_ns(), "loss": lv})
    with open(out, "w") as f:
        json.dump(spans, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
