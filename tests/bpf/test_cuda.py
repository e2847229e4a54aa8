"""CUDA uprobes against stub libraries built here: every decoded value, exactly."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from renacerd.capture.cuda.elf import read_symbols
from renacerd.capture.cuda.maps import family_of
from renacerd.capture.cuda.names import demangle
from renacerd.capture.cuda_source import CudaOptionError, CudaOptions, CudaSource
from renacerd.cuda.hooks import FN_ID, H2D
from renacerd.store.database import Store
from renacerd.trace.gpu_trace import (
    bandwidth_mbps,
    decode_gpu,
    gpu_by_interval,
    load_gpu,
    summarize,
)

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / "tests" / "cuda_stubs"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="BPF programs need root")

_spec = importlib.util.spec_from_file_location("cuda_stub_build", STUBS / "build.py")
stub_build = importlib.util.module_from_spec(_spec)
sys.modules["cuda_stub_build"] = stub_build
_spec.loader.exec_module(stub_build)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """The stub libraries and programs, compiled once per module."""
    return stub_build.build(tmp_path_factory.mktemp("cuda"))


def traced(cmd: list[str], env: dict[str, str], db: Path, run: str = "cuda"):
    """Start cmd (it prints 'ready' and waits), attach a Tracer with the CUDA source, let
    it go, trace it to its exit; returns (stdout line, store, source counters, source)."""
    from renacerd.capture.probes.syscalls import SyscallProbes
    from renacerd.capture.tracer import Tracer

    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"ready\n"
    probes = SyscallProbes()
    probes.load()
    store = Store(str(db), create=True)
    tracer = Tracer(probes, store, run, cmdline=cmd)
    src = CudaSource.for_tracer(tracer, CudaOptions.parse(None))
    tracer.sources.append(src)
    try:
        tracer.attach(proc.pid)
        tracer.drain_once()  # the source scans the new target's maps
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        tracer.run(duration=30)
        out = proc.stdout.read().decode()
        assert proc.wait(10) == 0, out
        tracer.finish()
        counters = src.counters()
    finally:
        src.close()
        probes.close()
        store.close()
    return out, Store(str(db)), counters, src


def gpu_of(store: Store, run: str, pid: int) -> dict:
    info = store.run(run)
    strings = store.strings(info.id)
    for proc_id, p in store.processes(info.id):
        if p.pid == pid:
            return load_gpu(store, info.id, proc_id, strings)
    raise AssertionError(f"no process {pid}")


def env_with_driver(stubs) -> dict[str, str]:
    e = dict(os.environ)
    e["LD_LIBRARY_PATH"] = str(stubs.driver_dir)
    return e


# -- without BPF -----------------------------------------------------------------------
def test_library_families_cover_every_layout():
    assert family_of("/usr/local/cuda/lib64/libcudart.so.12") == "cudart"
    assert family_of(b"/x/nvidia/cuda_runtime/lib/libcudart.so.12") == "cudart"
    assert family_of("/x/nvidia/cu13/lib/libcudart.so.13") == "cudart"
    assert family_of("/x/torch/lib/libcudart-6d56b25a.so.11.0") == "cudart"
    assert family_of("/usr/lib/x86_64-linux-gnu/libcuda.so.1") == "cuda"
    assert family_of("/x/nvidia/nccl/lib/libnccl.so.2") == "nccl"
    assert family_of("/x/libcudnn.so.9") is None
    assert family_of("/x/libcudart_static.a") is None


def test_elf_symbols_of_stub_and_static_app(stubs):
    rt = read_symbols(str(stubs.runtime))
    found = rt.lookup(["cudaLaunchKernel", "__cudaGetKernel", "cuLaunchKernel"])
    assert set(found) == {"cudaLaunchKernel", "__cudaGetKernel"}
    app = read_symbols(str(stubs.app_static))
    addr = app.functions()["_Z5saxpyfPfS_"]
    assert app.symbol_at(addr) == "_Z5saxpyfPfS_"
    assert app.symbol_at(addr + 1) == "_Z5saxpyfPfS_"
    assert demangle("_Z5saxpyfPfS_") == "saxpy(float, float*, float*)"
    assert demangle("triton_poi_fused_add_0") == "triton_poi_fused_add_0"


def test_cuda_option_parsing(tmp_path):
    assert CudaOptions.parse(None).mode == "auto"
    assert CudaOptions.parse(["off"]).mode == "off"
    lib = tmp_path / "libcudart.so.12"
    lib.write_bytes(b"x")
    assert CudaOptions.parse([str(lib)]).paths == [str(lib)]
    with pytest.raises(CudaOptionError, match="no such library"):
        CudaOptions.parse([str(tmp_path / "nope.so")])
    with pytest.raises(CudaOptionError, match="cannot be combined"):
        CudaOptions.parse(["auto", str(lib)])


def test_bandwidth_formula():
    assert bandwidth_mbps(1048576, 1e6) == 1.0
    assert bandwidth_mbps(1 << 20, 0) == 0.0


# -- real uprobes --------------------------------------------------------------------
def _check_app_run(g: dict, counters: dict, pid: int) -> None:
    c = g["columns"]
    fn = c["fn"]
    launches = g["kernels"]
    # 3 vecAdd + 2 saxpy + 1 through a CUDA 13 handle; each also passed cuLaunchKernel
    assert len(launches) == 6
    assert all(k.api == "cudaLaunchKernel" for k in launches)
    assert not (fn == FN_ID["cuLaunchKernel"]).any()
    assert counters["gpu_nested_calls"] >= 6 + 2 + 2 + 1 + 1  # launches, copies, allocs...
    for k in launches:
        assert (k.grid_size, k.workgroup_size) == ("[1,2,3]", "[4,5,6]")
        assert (k.shared_mem, k.stream, k.return_code, k.backend) == (48, 0x30, 0, "cuda")
        assert k.elements == 6 * 120
    names = [k.kernel for k in launches]
    assert names == ["vecAdd(float*, float*, int)"] * 3 + ["saxpy(float, float*, float*)"] * 2 \
        + ["vecAdd(float*, float*, int)"]
    t = g["transfers"]
    assert [(x.direction, x.bytes, x.api) for x in t] == [
        ("cpu_to_gpu", 1 << 20, "cudaMemcpy"), ("gpu_to_cpu", 512 << 10, "cudaMemcpy")]
    assert all(x.bandwidth_mbps == bandwidth_mbps(x.bytes, x.duration_us) for x in t)
    a = g["allocations"]
    assert [(x.ptr, x.bytes, x.api) for x in a] == [
        (0x7E0000000000, 1 << 20, "cudaMalloc"), (0x7E0000100000, 256, "cudaMalloc")]
    assert a[0].freed_nanos is not None and a[1].freed_nanos is None
    frees = c["a0"][fn == FN_ID["cudaFree"]]
    rets = c["ret"][fn == FN_ID["cudaFree"]]
    assert frees.tolist() == [0x7E0000000000, 0xBAD0] and rets.tolist() == [0, 1]
    assert [s.api for s in g["syncs"]] == ["cudaDeviceSynchronize"]
    s = summarize(c, g["strings"])
    assert s["kernels"] == {"vecAdd(float*, float*, int)": 4, "saxpy(float, float*, float*)": 2}
    assert s["memcpy"] == {"h2d_bytes": 1 << 20, "d2h_bytes": 512 << 10, "d2d_bytes": 0}
    assert s["malloc"] == {"calls": 2, "bytes": (1 << 20) + 256}
    assert s["free"] == {"calls": 1}
    assert s["outstanding"] == {"allocations": 1, "bytes": 256}
    assert s["sync"]["calls"] == 1 and s["unresolved_kernels"] == 0
    assert counters["gpu_events_lost"] == 0 and counters["gpu_names_lost"] == 0


@needs_root
def test_attached_program_every_value_and_no_double_count(stubs, tmp_path):
    out, store, counters, src = traced([str(stubs.app)], env_with_driver(stubs),
                                       tmp_path / "t.db")
    assert out.startswith("done 0x7e0000000000 0x7e0000100000 0")
    pid = store.processes(store.run("cuda").id)[0][1].pid
    g = gpu_of(store, "cuda", pid)
    _check_app_run(g, counters, pid)
    by = src.names.resolved_by
    # vecAdd x3 by registration, saxpy x2 from the ELF symbol, the handle launch via
    # __cudaGetKernel (then the registration of its host stub)
    assert (by["register"], by["elf_symbol"], by["get_kernel"]) == (3, 2, 1)
    probed = {Path(o.path).name for o in src.probes.probed()}
    assert {"libcudart.so.12", "libcuda.so.1"} <= probed


@needs_root
def test_statically_linked_runtime(stubs, tmp_path):
    out, store, counters, src = traced([str(stubs.app_static)], env_with_driver(stubs),
                                       tmp_path / "t.db")
    assert out.startswith("done 0x7e0000000000 0x7e0000100000 0")
    pid = store.processes(store.run("cuda").id)[0][1].pid
    _check_app_run(gpu_of(store, "cuda", pid), counters, pid)
    assert any(o.path.endswith("/app_static") for o in src.probes.probed())


@needs_root
def test_dlopen_after_attach_two_copies_driver_only_and_nccl(stubs, tmp_path):
    cmd = [sys.executable, str(STUBS / "ctypes_app.py"), str(stubs.wheel_runtime),
           str(stubs.hashed_runtime), str(stubs.nccl)]
    out, store, counters, src = traced(cmd, env_with_driver(stubs), tmp_path / "t.db")
    done, comm, bad = out.split()
    assert (done, bad) == ("done", "0")
    pid = store.processes(store.run("cuda").id)[0][1].pid
    g = gpu_of(store, "cuda", pid)
    k = [(x.api, x.kernel, x.grid_size, x.workgroup_size, x.shared_mem, x.stream)
         for x in g["kernels"]]
    assert k == [
        ("cudaLaunchKernel", "pyKernelAdd(float*)", "[1,2,3]", "[4,5,6]", 48, 0x30),
        ("cudaLaunchKernel", "0xdead0", "[1,2,3]", "[4,5,6]", 48, 0x30),
        ("cudaLaunchKernelExC", "pyKernelAdd(float*)", "[7,8,9]", "[10,11,12]", 96, 0x40),
        ("cuLaunchKernel", "triton_poi_fused_add_0", "[1,2,3]", "[4,5,6]", 48, 0x30),
        ("cuLaunchKernelEx", "triton_poi_fused_add_0", "[2,3,4]", "[32,1,1]", 128, 0x50),
        ("cudaLaunchKernel", "pyKernelAdd(float*)", "[1,2,3]", "[4,5,6]", 48, 0x30),
    ]
    t = g["transfers"]
    assert [(x.api, x.direction, x.bytes, x.stream) for x in t] == [
        ("cudaMemcpyAsync", "cpu_to_gpu", 1 << 20, 0x30)]
    co = [(x.op, x.count, x.dtype, x.bytes, x.reduce_op, x.peer, x.rank, x.nranks, x.stream)
          for x in g["collectives"]]
    assert co == [
        ("allreduce", 1024, "float32", 4096, "sum", None, 2, 4, 0x30),
        ("broadcast", 10, "float32", 40, None, 1, 2, 4, 0x30),
        ("send", 5, "int32", 20, None, 3, 2, 4, 0x30),
    ]
    assert all(x.comm == int(comm, 16) for x in g["collectives"])
    s = summarize(g["columns"], g["strings"])
    assert s["nccl"] == {"allreduce": 1, "broadcast": 1, "send": 1}
    assert s["unresolved_kernels"] == 1
    assert s["memcpy"]["h2d_bytes"] == 1 << 20 and H2D == 1
    # both runtime copies, the driver and NCCL were found by their opens, each in time
    names = {Path(o.path).name for o in src.probes.probed()}
    assert {"libcudart.so.12", "libcudart-6d56b25a.so.11.0", "libcuda.so.1",
            "libnccl.so.2"} <= names
    assert len(src.attach_latency_ns) >= 4
    assert max(src.attach_latency_ns) < 100_000_000, src.attach_latency_ns
    assert counters["gpu_events_lost"] == 0
    # per-step breakdown over two halves of the run
    ts = g["columns"]["ts"]
    mid = int(ts[3])
    steps = gpu_by_interval(_Trace(g), [("a", 0, mid), ("b", mid, int(ts[-1]) + 1)])
    assert sum(steps["a"]["kernels"].values()) == 3
    assert sum(steps["b"]["kernels"].values()) == 3


class _Trace:
    """Just enough of a UnifiedTrace for the GPU helpers."""

    def __init__(self, gpu: dict) -> None:
        self.gpu = gpu
        self.strings = gpu["strings"]
        self.spans: list = []


def test_decode_empty_layer():
    from renacerd.trace.gpu_trace import empty_columns

    g = decode_gpu(empty_columns(), [])
    assert g["kernels"] == [] and summarize(g["columns"], [])["malloc"] == {"calls": 0,
                                                                             "bytes": 0}
    assert np.array_equal(g["columns"]["ts"], np.empty(0, np.int64))


@needs_root
def test_launch_mode_cli_show_and_perfetto(stubs, tmp_path):
    """`renacerd -- app` end to end: probed before exec, shown by `renacer show`, exported."""
    env = env_with_driver(stubs)
    env["PYTHONPATH"] = str(ROOT)
    db = tmp_path / "t.db"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "renacerd.cli.renacerd_main", "--db", str(db), "--run", "cli",
         "--", str(stubs.app)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert daemon.stdout.readline() == b"ready\n"
    # a real job lives long enough for its maps to be read; give this one a drain cycle
    time.sleep(0.2)
    out, err = daemon.communicate(b"go\n", timeout=120)
    assert daemon.returncode == 0, err.decode()
    assert b"GPU: " in err
    show = subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacer_main", "show", "cli", "--db", str(db),
         "--json"], capture_output=True, env=env, check=True)
    gpu = json.loads(show.stdout)["processes"][0]["gpu"]
    assert gpu["kernels"] == {"vecAdd(float*, float*, int)": 4, "saxpy(float, float*, float*)": 2}
    assert gpu["memcpy"] == {"h2d_bytes": 1 << 20, "d2h_bytes": 512 << 10, "d2d_bytes": 0}
    assert gpu["malloc"] == {"calls": 2, "bytes": (1 << 20) + 256}
    assert gpu["free"] == {"calls": 1}
    text = subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacer_main", "show", "cli", "--db", str(db)],
        capture_output=True, env=env, check=True).stdout.decode()
    assert "1 allocations (256 B) never freed" in text
    out = tmp_path / "trace.json"
    subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacer_main", "export", "cli", "--db", str(db),
         "--format", "perfetto", "-o", str(out)], env=env, check=True)
    ev = json.loads(out.read_text())["traceEvents"]
    cuda = [e for e in ev if e.get("cat") == "cuda"]
    assert sum(1 for e in cuda if e["name"] == "cudaLaunchKernel") == 6
    assert {e["args"].get("kernel") for e in cuda if e["name"] == "cudaLaunchKernel"} == {
        "vecAdd(float*, float*, int)", "saxpy(float, float*, float*)"}


GPU_STEPS = r"""
import ctypes as C, sys, time
from renacerd.client.core import experiment_span
sys.path.insert(0, sys.argv[2])
from ctypes_app import Dim3, runtime
rt = runtime(sys.argv[1])
time.sleep(0.3)  # the daemon probes a library within 100 ms of its open
stub = 0x10000
rt.__cudaRegisterFunction(None, stub, b"_Z4stepPf", b"_Z4stepPf", -1, None, None, None, None,
                          None)
host = C.create_string_buffer(4096)
for k in range(1, 4):
    with experiment_span("training_step", model_name="m", step=k):
        for _ in range(k):
            rt.cudaLaunchKernel(stub, Dim3(1, 1, 1), Dim3(32, 1, 1), None, 0, 0)
        rt.cudaMemcpyAsync(0x7E0000000000, host, 1024 * k, 1, 0)
"""


@needs_root
def test_gpu_events_tagged_per_step(stubs, tmp_path):
    script = tmp_path / "gpu_steps.py"
    script.write_text(GPU_STEPS)
    env = env_with_driver(stubs)
    env["PYTHONPATH"] = str(ROOT)
    db = tmp_path / "t.db"
    r = subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db", str(db), "--run",
         "gs", "--", sys.executable, str(script), str(stubs.runtime), str(STUBS)],
        capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    show = subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacer_main", "show", "gs", "--db", str(db),
         "--by", "step", "--json"], capture_output=True, env=env, check=True)
    steps = json.loads(show.stdout)["steps"]
    assert [(s["step"], s["gpu_launches"], s["gpu_bytes"]) for s in steps] == [
        ("1", 1, 1024), ("2", 2, 2048), ("3", 3, 3072)]


# Launches one kernel it never registered and exits at once: gone before the daemon's next
# drain, so its maps can never be read; the name comes from what the launch probe recorded.
QUICK = r"""
typedef struct { unsigned int x, y, z; } dim3;
int cudaLaunchKernel(const void *f, dim3 g, dim3 b, void **args, unsigned long smem,
                     void *stream);
int cudaSetDevice(int device);
void quick(void) __asm__("_Z5quickv");
__attribute__((noinline)) void quick(void) {
    dim3 g = {1, 1, 1}, b = {32, 1, 1};
    cudaLaunchKernel((const void *)quick, g, b, 0, 0, 0);
}
int main(void) {
    if (cudaSetDevice(0) != 0)
        return 2;
    quick();
    return 0;
}
"""


@needs_root
def test_short_lived_process_gets_kernel_names(stubs, tmp_path):
    src = tmp_path / "quick.c"
    src.write_text(QUICK)
    exe = tmp_path / "quick"
    lib = stubs.wheel_runtime.parent
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(src), "-L", str(lib),
                    "-l:libcudart.so.12", f"-Wl,-rpath,{lib}"], check=True)
    env = env_with_driver(stubs)
    env["PYTHONPATH"] = str(ROOT)
    db = tmp_path / "t.db"
    r = subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db", str(db), "--run",
         "quick", "--", str(exe)], capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    show = subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacer_main", "show", "quick", "--db", str(db),
         "--json"], capture_output=True, env=env, check=True)
    gpu = json.loads(show.stdout)["processes"][0]["gpu"]
    assert gpu["kernels"] == {"quick()": 1}
    assert gpu["unresolved_kernels"] == 0


@needs_root
def test_runs_of_one_attachment_share_the_uprobes_and_keep_their_own_gpu_records(stubs,
                                                                               tmp_path):
    """`renacerd serve`'s capture: two runs at once on one load of the CUDA probes. Each
    library file is probed once for both; each run gets exactly its own process's calls."""
    import threading

    from renacerd.capture.shared import SharedCapture
    from renacerd.capture.tracer import Tracer

    cap = SharedCapture()
    store = Store(str(tmp_path / "t.db"), create=True)
    lock = threading.RLock()
    procs = [subprocess.Popen([str(stubs.app)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env_with_driver(stubs)) for _ in range(2)]
    ended: list = []
    try:
        for p in procs:
            assert p.stdout.readline() == b"ready\n"
        for i, p in enumerate(procs):
            slot = cap.claim(0)
            tracer = Tracer(slot, store, f"gpu-{i}", cmdline=[str(stubs.app)],
                            details=cap.details, lock=lock)
            with cap.lock:
                cap.add(slot, tracer, lambda run: ended.append(
                    (run.tracer.finish(), run.tracer.counters())))
                tracer.attach(p.pid)
        with cap.lock:
            cap.cycle(time.monotonic())  # each run's source scans its process's maps
        probed = sorted(Path(o.path).name for o in cap.cuda.probed())
        assert {"libcudart.so.12", "libcuda.so.1"} <= set(probed)
        assert len(probed) == len(set(probed))  # once each, for both runs
        uprobes = cap.cuda.stats.probes
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        deadline = time.monotonic() + 30
        while len(ended) < 2 and time.monotonic() < deadline:
            with cap.lock:
                cap.cycle(time.monotonic())
            time.sleep(0.02)
        for p in procs:
            assert p.stdout.read().decode().startswith("done 0x7e0000000000 0x7e0000100000 0")
            assert p.wait(10) == 0
    finally:
        cap.close()
    assert len(ended) == 2
    assert cap.cuda is not None and cap.cuda.stats.probes == uprobes
    for i, p in enumerate(procs):
        counters = next(c for s, c in ended if s.run == f"gpu-{i}")
        assert [pr.pid for _, pr in store.processes(store.run(f"gpu-{i}").id)] == [p.pid]
        _check_app_run(gpu_of(store, f"gpu-{i}", p.pid), counters, p.pid)
    store.close()


NCCL_JOB = STUBS / "nccl_job.py"
# nccl_job.py's calls per step: ncclBroadcast at step 1 only, then 2 all-reduces and an
# all-gather in every step
NCCL_STEP_OPS = {"ncclAllReduce": 2, "ncclAllGather": 1}


@needs_root
def test_nccl_ranks_and_collectives_per_step(stubs, tmp_path):
    """3 ranks with no launcher variables: each labelled from its ncclCommInitRank (rank,
    nranks, the communicator's id); per step the NCCL calls, and the desync of rank 1's
    different-sized all-reduce at step 4."""
    import zlib

    env = env_with_driver(stubs)
    env["PYTHONPATH"] = str(ROOT)
    for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    db = tmp_path / "t.db"
    r = subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacerd_main", "-q", "--db", str(db), "--run",
         "nccl", "--", sys.executable, str(NCCL_JOB), str(stubs.nccl), "3", "6", "1:4:1000"],
        capture_output=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr.decode()
    comm_id = r.stdout.decode().split()[0]
    group = zlib.crc32(bytes.fromhex(comm_id))
    out = subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacer_main", "ranks", "nccl", "--db", str(db),
         "--json"], capture_output=True, env=env, check=True)
    d = json.loads(out.stdout)
    assert [(x["rank"], x["world_size"], x["source"], x["job_id"], x["steps"])
            for x in d["ranks"]] == [(k, 3, "nccl", f"nccl:{comm_id}", 6) for k in range(3)]
    assert [x["comms"] for x in d["ranks"]] == [
        [{"comm_id": comm_id, "rank": k, "nranks": 3, "group": group}] for k in range(3)]
    assert [s["step"] for s in d["steps"]] == [1, 2, 3, 4, 5, 6]
    for s in d["steps"]:
        want = dict(NCCL_STEP_OPS, ncclBroadcast=1) if s["step"] == 1 else NCCL_STEP_OPS
        assert {k: (c["collectives"], c["ops"]) for k, c in s["ranks"].items()} == {
            str(k): (sum(want.values()), want) for k in range(3)}, s
        # the stub's calls return at once: nobody waits for anybody
        assert s["straggler"] is None
        assert s["after_desync"] == (s["step"] >= 4)
    # seq on the communicator: 4 calls in step 1, 3 in steps 2 and 3, then the 2nd of step 4
    call = {"op": "ncclAllReduce", "numel": 1024, "dtype": "float32", "group": group,
            "seq": 12}
    assert d["desync"] == {"step": 4, "position": 1, "ranks": [1],
                           "calls": {"0": call, "1": dict(call, numel=1000), "2": call}}
    assert d["waiting"] == []
    page = tmp_path / "ranks.html"
    subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacer_main", "ranks", "nccl", "--db", str(db),
         "--html", str(page)], capture_output=True, env=env, check=True)
    text = page.read_text()
    assert text.count('<rect class="cell"') == 2 * 3 * 6 and 'class="straggler"' not in text
    assert "DESYNC at step 4, collective #1" in text
    show = subprocess.run(
        [sys.executable, "-m", "renacerd.cli.renacer_main", "show", "nccl", "--db", str(db),
         "--json"], capture_output=True, env=env, check=True)
    labelled = sorted((p["rank"]["rank"], p["rank"]["source"])
                      for p in json.loads(show.stdout)["processes"] if p["rank"])
    assert labelled == [(0, "nccl"), (1, "nccl"), (2, "nccl")]
