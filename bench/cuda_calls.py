"""Cost of the CUDA uprobes: calls/s on the stub libraries traced vs untraced, per kind.

Usage (root): PYTHONPATH=. .venv/bin/python bench/cuda_calls.py [--calls N] [--single-step]
Target: <= 2 us added per hooked call, 0 lost events at 200k calls/s.
The stubs open every entry point with `push %rbp` like CUDA 13.0's libcudart (the kernel
emulates that instruction); --single-step shows the cost where it cannot.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from renacerd.capture.cuda.elf import read_symbols  # noqa: E402
from renacerd.capture.probes.cuda import ALL_SYMBOLS, CudaProbes  # noqa: E402

LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
typedef struct { unsigned x, y, z; } dim3;
int cudaLaunchKernel(const void *, dim3, dim3, void **, size_t, void *);
int cudaMemcpy(void *, const void *, size_t, int);
int cudaMalloc(void **, size_t);
int cudaFree(void *);
int cudaStreamSynchronize(void *);
int cudaSetDevice(int);
typedef struct { char internal[128]; } ncclUniqueId;
int ncclCommInitRank(void **, int, ncclUniqueId, int);
int ncclAllReduce(const void *, void *, size_t, int, int, void *, void *);
static long long now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}
int main(int argc, char **argv) {
    const char *kind = argv[1];
    long n = atol(argv[2]);
    double rate = atof(argv[3]);          /* calls per second; 0 = as fast as possible */
    char line[8];
    cudaSetDevice(0);
    void *comm = 0; ncclUniqueId id; memset(&id, 0, sizeof id);
    ncclCommInitRank(&comm, 1, id, 0);
    static char host[4096];
    void *dev = 0; cudaMalloc(&dev, 4096);
    printf("ready\n"); fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 3;
    dim3 g = {1, 2, 3}, b = {4, 5, 6};
    long long t0 = now();
    for (long i = 0; i < n; i++) {
        if (rate > 0) while (now() - t0 < (long long)(i * 1e9 / rate)) {}
        if (!strcmp(kind, "launch")) cudaLaunchKernel((void *)0x1000, g, b, 0, 48, (void *)0x30);
        else if (!strcmp(kind, "memcpy")) cudaMemcpy(dev, host, 4096, 1);
        else if (!strcmp(kind, "malloc_free")) { void *p; cudaMalloc(&p, 256); cudaFree(p); }
        else if (!strcmp(kind, "sync")) cudaStreamSynchronize((void *)0x30);
        else if (!strcmp(kind, "allreduce")) ncclAllReduce(host, host, 1024, 7, 0, comm, 0);
    }
    long long t1 = now();
    printf("%lld\n", t1 - t0);
    return 0;
}
"""
# hooked calls per loop iteration, and how many of them reach the ring (outermost only)
KINDS = {"launch": 1, "memcpy": 1, "malloc_free": 2, "sync": 1, "allreduce": 1}


def build(tmp: Path, single_step: bool = False):
    spec = importlib.util.spec_from_file_location("cuda_stub_build",
                                                  ROOT / "tests/cuda_stubs/build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cuda_stub_build"] = mod
    spec.loader.exec_module(mod)
    if single_step:
        mod.REAL_PROLOGUE = ()  # -O2: small entry points lose the push the kernel emulates
    stubs = mod.build(tmp / "stubs")
    src = tmp / "loop.c"
    src.write_text(LOOP_C)
    exe = tmp / "loop"
    rt, nc = stubs.wheel_runtime.parent, stubs.nccl.parent
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src), "-L", str(rt), "-l:libcudart.so.12",
                    "-L", str(nc), "-l:libnccl.so.2", f"-Wl,-rpath,{rt}:{nc}"], check=True)
    return stubs, exe


def run_loop(exe: Path, env: dict, kind: str, n: int, rate: float, probes=None):
    """Run one loop; returns (ns elapsed, events recorded)."""
    p = subprocess.Popen([str(exe), kind, str(n), str(rate)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=env, text=True)
    assert p.stdout.readline() == "ready\n"
    got = [0]
    stop = threading.Event()

    def drain():
        while not stop.is_set():
            got[0] += len(probes.drain()[0])
            time.sleep(0.02)

    t = None
    if probes is not None:
        probes.add_target(p.pid)
        probes.drain()
        t = threading.Thread(target=drain)
        t.start()
    p.stdin.write("go\n")
    p.stdin.flush()
    ns = int(p.stdout.readline())
    p.wait()
    if t is not None:
        stop.set()
        t.join()
        got[0] += len(probes.drain()[0])
        probes.remove_target(p.pid)
    return ns, got[0]


def floor_run(libs, exe: Path, env: dict, n: int) -> dict[str, int]:
    """The same loops with empty BPF programs on every hooked symbol: the uprobe trap cost
    of this machine, which no tracer built on uprobes can go below."""
    from bcc import BPF

    b = BPF(text=b"int f(void *ctx) { return 0; }")
    for lib in libs:
        elf = read_symbols(str(lib))
        for sym in elf.lookup(ALL_SYMBOLS):
            b.attach_uprobe(name=str(lib).encode(), sym=sym.encode(), fn_name=b"f")
            b.attach_uretprobe(name=str(lib).encode(), sym=sym.encode(), fn_name=b"f")
    try:
        return {kind: run_loop(exe, env, kind, n, 0)[0] for kind in KINDS}
    finally:
        b.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--single-step", action="store_true",
                    help="stubs at -O2, entry points without the real libraries' push "
                    "prologue: every uprobe hit single-steps its first instruction")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/cuda_calls.py: needs root (BPF)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as d:
        stubs, exe = build(Path(d), args.single_step)
        env = dict(os.environ, LD_LIBRARY_PATH=str(stubs.driver_dir))
        n = args.calls
        # the baseline runs before any uprobe exists on the libraries
        base = {kind: run_loop(exe, env, kind, n, 0)[0] for kind in KINDS}
        libs = (stubs.wheel_runtime, stubs.driver, stubs.nccl)
        floor = floor_run(libs, exe, env, n)
        probes = CudaProbes(gpu_mb=16)
        probes.load()
        for lib in libs:
            probes.probe_object(str(lib))
        print(f"{'kind':<12} {'untraced calls/s':>17} {'traced calls/s':>15} "
              f"{'added us/call':>14} {'trap floor us':>14} {'ours us':>8} {'events':>8} "
              f"{'lost':>5}")
        worst = 0.0
        for kind, per in KINDS.items():
            before = probes.counters()["gpu_events_lost"]
            traced, ev = run_loop(exe, env, kind, n, 0, probes)
            lost = probes.counters()["gpu_events_lost"] - before
            added = (traced - base[kind]) / (n * per) / 1e3
            trap = (floor[kind] - base[kind]) / (n * per) / 1e3
            ours = added - trap
            worst = max(worst, ours)
            print(f"{kind:<12} {n * per / base[kind] * 1e9:>17,.0f} "
                  f"{n * per / traced * 1e9:>15,.0f} {added:>14.2f} {trap:>14.2f} {ours:>8.2f} "
                  f"{ev:>8} {lost:>5}")
        before = probes.counters()["gpu_events_lost"]
        ns, ev = run_loop(exe, env, "launch", n, 200_000, probes)
        lost = probes.counters()["gpu_events_lost"] - before
        print(f"paced at 200k launches/s for {n} calls: {ev} events, {lost} lost, "
              f"{n / ns * 1e9:,.0f} calls/s achieved")
        print(f"worst added per hooked call over the empty-uprobe floor: {worst:.2f} us "
              "(target <= 2 us)")
        probes.close()
    return 0 if worst <= 2.0 and lost == 0 and ev == n else 1


if __name__ == "__main__":
    sys.exit(main())
