"""An NCCL job of N ranks against the stub libnccl, driven through ctypes; no launcher
variables (RANK, WORLD_SIZE) are set, so each process's rank can only come from its
ncclCommInitRank.

    nccl_job.py [--env PORT] [--hello PORT] [--cudart LIBCUDART] [--c10d 1] LIBNCCL NRANKS
                STEPS [RANK:STEP:COUNT]

The launcher gets a unique id (ncclGetUniqueId), prints its first 16 bytes as hex, starts
one process per rank with the whole id, and exits with the worst exit status. Each rank
inits its communicator, then runs STEPS steps, each an experiment span (the client) with
step=k: ncclAllReduce(1024 x float32) twice and ncclAllGather(256 x float16) once, plus an
ncclBroadcast(10 x int32, root 0) at step 1. With RANK:STEP:COUNT, that rank's second
all-reduce of that step has COUNT elements (a desync).

--env PORT gives each rank torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
127.0.0.1, MASTER_PORT PORT: the job "127.0.0.1:PORT"). --hello PORT has each rank set those
variables in its own os.environ after its exec, before its client connects: only the client's
hello says the rank, as a training script that learns it from its config does.
--cudart LIBCUDART adds GPU waits: each step, cudaStreamSynchronize after the first
all-reduce and cudaDeviceSynchronize at its end, and one cudaDeviceSynchronize before the
first step; in the last step rank 0 calls ncclAllGather on no communicator (it fails:
ncclInvalidArgument). --c10d 1 wraps the
broadcast of step 1 in a c10d.broadcast span, as torch's ProcessGroupNCCL's calls are."""

import ctypes as C
import os
import subprocess
import sys
import time

SETTLE = 0.3  # the daemon probes a library within 100 ms of its open; calls wait beyond it
FLOAT32, FLOAT16, INT32, SUM = 7, 6, 2, 0


class UniqueId(C.Structure):
    _fields_ = [("internal", C.c_char * 128)]


def _nccl(path: str) -> C.CDLL:
    lib = C.CDLL(path)
    lib.ncclCommInitRank.argtypes = [C.POINTER(C.c_void_p), C.c_int, UniqueId, C.c_int]
    lib.ncclAllReduce.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t, C.c_int, C.c_int,
                                  C.c_void_p, C.c_void_p]
    lib.ncclAllGather.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t, C.c_int, C.c_void_p,
                                  C.c_void_p]
    lib.ncclBroadcast.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t, C.c_int, C.c_int,
                                  C.c_void_p, C.c_void_p]
    return lib


def _broadcast(nccl: C.CDLL, buf: C.Array, comm: C.c_void_p, c10d: bool) -> int:
    """ncclBroadcast(10 x int32, root 0), inside a c10d span with c10d."""
    from renacerd.client.core import experiment_span

    if not c10d:
        return nccl.ncclBroadcast(buf, buf, 10, INT32, 0, comm, None)
    with experiment_span("c10d.broadcast", model_name="int32",
                         metrics={"c10d.numel": 10, "c10d.group": 0, "c10d.seq": 1}):
        return nccl.ncclBroadcast(buf, buf, 10, INT32, 0, comm, None)


def rank_main(lib_path: str, rank: int, nranks: int, uid_hex: str, steps: int,
              desync: tuple[int, int] | None, cudart: str, c10d: bool, hello: str) -> int:
    if hello != "-":  # read by the client's hello; the exec-time environment has none
        os.environ.update(_rank_env(hello, rank, nranks))
    from renacerd.client.core import experiment_span

    nccl = _nccl(lib_path)
    rt = C.CDLL(cudart) if cudart != "-" else None
    time.sleep(SETTLE)
    if rt is not None:
        rt.cudaStreamSynchronize.argtypes = [C.c_void_p]
        rt.cudaDeviceSynchronize()  # outside every step: no step's wait
    uid = UniqueId()
    C.memmove(C.byref(uid), bytes.fromhex(uid_hex), C.sizeof(uid))
    comm = C.c_void_p()
    bad = nccl.ncclCommInitRank(C.byref(comm), nranks, uid, rank) != 0
    buf = C.create_string_buffer(1 << 16)
    for k in range(1, steps + 1):
        with experiment_span("train_step", model_name="stub", step=k):
            if k == 1:
                bad += _broadcast(nccl, buf, comm, c10d) != 0
            bad += nccl.ncclAllReduce(buf, buf, 1024, FLOAT32, SUM, comm, None) != 0
            if rt is not None:
                bad += rt.cudaStreamSynchronize(None) != 0
            n = desync[1] if desync and desync[0] == k else 1024
            bad += nccl.ncclAllReduce(buf, buf, n, FLOAT32, SUM, comm, None) != 0
            bad += nccl.ncclAllGather(buf, buf, 256, FLOAT16, comm, None) != 0
            if rt is not None:
                bad += rt.cudaDeviceSynchronize() != 0
                if rank == 0 and k == steps:  # fails, as meant: not counted as bad
                    nccl.ncclAllGather(buf, buf, 256, FLOAT16, None, None)
    return int(bad)


def _options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The leading --env PORT / --hello PORT / --cudart LIB / --c10d 1 options, and the
    rest."""
    opts = {}
    while argv and argv[0] in ("--env", "--hello", "--cudart", "--c10d"):
        opts[argv[0][2:]] = argv[1]
        argv = argv[2:]
    return opts, argv


def _rank_env(port: str | None, rank: int, nranks: int) -> dict[str, str]:
    """The environment of a rank: torchrun's variables with --env."""
    env = dict(os.environ)
    if port:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    return env


def main(argv: list[str]) -> int:
    if argv[0] == "--rank":
        lib, rank, nranks, uid, steps, desync, cudart, c10d, hello = argv[1:10]
        d = tuple(int(x) for x in desync.split(":")) if desync != "-" else None
        return rank_main(lib, int(rank), int(nranks), uid, int(steps), d, cudart, c10d == "1",
                         hello)
    opts, argv = _options(argv)
    lib, nranks, steps = argv[0], int(argv[1]), argv[2]
    late = [int(x) for x in argv[3].split(":")] if len(argv) > 3 else None
    uid = UniqueId()
    if _nccl(lib).ncclGetUniqueId(C.byref(uid)) != 0:
        return 2
    print(bytes(uid)[:16].hex(), flush=True)
    procs = []
    for r in range(nranks):
        desync = f"{late[1]}:{late[2]}" if late and late[0] == r else "-"
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--rank", lib, str(r), str(nranks), bytes(uid).hex(),
             steps, desync, opts.get("cudart", "-"), opts.get("c10d", "0"),
             opts.get("hello", "-")],
            env=_rank_env(opts.get("env"), r, nranks)))
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
