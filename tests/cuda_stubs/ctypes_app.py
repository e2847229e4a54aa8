"""The stub CUDA libraries driven from Python through ctypes, dlopen'ed after the tracer
attached: argv = runtime copy 1, runtime copy 2, NCCL. Prints "ready", waits for a line on
stdin, then loads and calls with known values."""

import ctypes as C
import sys
import time

SETTLE = 0.3  # the daemon probes a library within 100 ms of its open; calls wait beyond it


class Dim3(C.Structure):
    _fields_ = [("x", C.c_uint), ("y", C.c_uint), ("z", C.c_uint)]


class LaunchConfig(C.Structure):  # cudaLaunchConfig_t
    _fields_ = [("grid", Dim3), ("block", Dim3), ("smem", C.c_size_t), ("stream", C.c_void_p),
                ("attrs", C.c_void_p), ("nattrs", C.c_uint)]


class CuLaunchConfig(C.Structure):  # CUlaunchConfig
    _fields_ = [("gx", C.c_uint), ("gy", C.c_uint), ("gz", C.c_uint), ("bx", C.c_uint),
                ("by", C.c_uint), ("bz", C.c_uint), ("smem", C.c_uint),
                ("stream", C.c_void_p), ("attrs", C.c_void_p), ("nattrs", C.c_uint)]


class UniqueId(C.Structure):
    _fields_ = [("internal", C.c_char * 128)]


def runtime(path):
    rt = C.CDLL(path)
    rt.cudaLaunchKernel.argtypes = [C.c_void_p, Dim3, Dim3, C.c_void_p, C.c_size_t, C.c_void_p]
    rt.cudaLaunchKernelExC.argtypes = [C.POINTER(LaunchConfig), C.c_void_p, C.c_void_p]
    rt.cudaMemcpyAsync.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t, C.c_int, C.c_void_p]
    rt.__cudaRegisterFunction.argtypes = [C.c_void_p, C.c_void_p, C.c_char_p, C.c_char_p,
                                          C.c_int] + [C.c_void_p] * 5
    return rt


def main() -> int:
    print("ready", flush=True)
    sys.stdin.readline()
    rt = runtime(sys.argv[1])
    nccl = C.CDLL(sys.argv[3])
    time.sleep(SETTLE)
    bad = 0
    stub = 0x10000
    rt.__cudaRegisterFunction(None, stub, b"_Z11pyKernelAddPf", b"_Z11pyKernelAddPf", -1,
                              None, None, None, None, None)
    bad += rt.cudaLaunchKernel(stub, Dim3(1, 2, 3), Dim3(4, 5, 6), None, 48, 0x30) != 0
    bad += rt.cudaLaunchKernel(0xDEAD0, Dim3(1, 2, 3), Dim3(4, 5, 6), None, 48, 0x30) != 0
    cfg = LaunchConfig(Dim3(7, 8, 9), Dim3(10, 11, 12), 96, 0x40, None, 0)
    bad += rt.cudaLaunchKernelExC(C.byref(cfg), stub, None) != 0
    host = C.create_string_buffer(1 << 20)
    bad += rt.cudaMemcpyAsync(0x7E0000000000, host, 1 << 20, 1, 0x30) != 0

    # the driver API alone, as Triton launches: named by cuModuleGetFunction
    drv = C.CDLL("libcuda.so.1")
    time.sleep(SETTLE)
    f = C.c_void_p()
    bad += drv.cuModuleGetFunction(C.byref(f), C.c_void_p(1), b"triton_poi_fused_add_0") != 0
    drv.cuLaunchKernel.argtypes = [C.c_void_p] + [C.c_uint] * 7 + [C.c_void_p] * 3
    bad += drv.cuLaunchKernel(f, 1, 2, 3, 4, 5, 6, 48, 0x30, None, None) != 0
    ccfg = CuLaunchConfig(2, 3, 4, 32, 1, 1, 128, 0x50, None, 0)
    drv.cuLaunchKernelEx.argtypes = [C.POINTER(CuLaunchConfig), C.c_void_p, C.c_void_p,
                                     C.c_void_p]
    bad += drv.cuLaunchKernelEx(C.byref(ccfg), f, None, None) != 0

    uid = UniqueId()
    bad += nccl.ncclGetUniqueId(C.byref(uid)) != 0
    comm = C.c_void_p()
    nccl.ncclCommInitRank.argtypes = [C.POINTER(C.c_void_p), C.c_int, UniqueId, C.c_int]
    bad += nccl.ncclCommInitRank(C.byref(comm), 4, uid, 2) != 0
    send = C.create_string_buffer(4096)
    nccl.ncclAllReduce.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t, C.c_int, C.c_int,
                                   C.c_void_p, C.c_void_p]
    bad += nccl.ncclAllReduce(send, send, 1024, 7, 0, comm, 0x30) != 0
    nccl.ncclBroadcast.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t, C.c_int, C.c_int,
                                   C.c_void_p, C.c_void_p]
    bad += nccl.ncclBroadcast(send, send, 10, 7, 1, comm, 0x30) != 0
    nccl.ncclSend.argtypes = [C.c_void_p, C.c_size_t, C.c_int, C.c_int, C.c_void_p, C.c_void_p]
    bad += nccl.ncclSend(send, 5, 2, 3, comm, 0x30) != 0

    # a second copy of the runtime in the same process (hashed wheel name)
    rt2 = runtime(sys.argv[2])
    time.sleep(SETTLE)
    bad += rt2.cudaLaunchKernel(stub, Dim3(1, 2, 3), Dim3(4, 5, 6), None, 48, 0x30) != 0
    print(f"done {comm.value:#x} {bad}", flush=True)
    return bad


if __name__ == "__main__":
    sys.exit(main())
