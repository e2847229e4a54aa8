"""The table of hooked CUDA runtime, driver and NCCL symbols: one uprobe + uretprobe each."""

from __future__ import annotations

from dataclasses import dataclass

# Kinds of GPU event (what gpu_trace groups by).
LAUNCH = "launch"
GRAPH = "graph"
MEMCPY = "memcpy"
MALLOC = "malloc"
FREE = "free"
SYNC = "sync"
SET_DEVICE = "set_device"
COLLECTIVE = "collective"
COMM_INIT = "comm_init"
MEM_MAP = "mem_map"

# cudaMemcpyKind
H2H, H2D, D2H, D2D, DEFAULT = 0, 1, 2, 3, 4

# Library families, matched against file names (wheel copies and hashed names included).
RUNTIME = "cudart"
DRIVER = "cuda"
NCCL = "nccl"


@dataclass(frozen=True, slots=True)
class Hook:
    """One hooked symbol: where it lives, how its arguments are read, what it means."""

    symbol: str
    family: str
    shape: str      # the argument reader in bpf/cuda.c (sh_*)
    kind: str
    copy_kind: int = DEFAULT  # driver copies: the direction is the symbol's
    op: str = ""              # collectives: the NCCL operation


HOOKS: tuple[Hook, ...] = (
    # runtime
    Hook("cudaLaunchKernel", RUNTIME, "sh_rt_launch", LAUNCH),
    Hook("cudaLaunchKernel_ptsz", RUNTIME, "sh_rt_launch", LAUNCH),
    Hook("cudaLaunchKernelExC", RUNTIME, "sh_launch_ex", LAUNCH),
    Hook("cudaLaunchKernelExC_ptsz", RUNTIME, "sh_launch_ex", LAUNCH),
    Hook("cudaGraphLaunch", RUNTIME, "sh_args2", GRAPH),
    Hook("cudaGraphLaunch_ptsz", RUNTIME, "sh_args2", GRAPH),
    Hook("cudaMemcpy", RUNTIME, "sh_rt_memcpy", MEMCPY),
    Hook("cudaMemcpy_ptds", RUNTIME, "sh_rt_memcpy", MEMCPY),
    Hook("cudaMemcpyAsync", RUNTIME, "sh_rt_memcpy", MEMCPY),
    Hook("cudaMemcpyAsync_ptsz", RUNTIME, "sh_rt_memcpy", MEMCPY),
    Hook("cudaMalloc", RUNTIME, "sh_alloc", MALLOC),
    Hook("cudaMallocAsync", RUNTIME, "sh_alloc", MALLOC),
    Hook("cudaMallocAsync_ptsz", RUNTIME, "sh_alloc", MALLOC),
    Hook("cudaFree", RUNTIME, "sh_args2", FREE),
    Hook("cudaFreeAsync", RUNTIME, "sh_args2", FREE),
    Hook("cudaFreeAsync_ptsz", RUNTIME, "sh_args2", FREE),
    Hook("cudaDeviceSynchronize", RUNTIME, "sh_args2", SYNC),
    Hook("cudaStreamSynchronize", RUNTIME, "sh_args2", SYNC),
    Hook("cudaStreamSynchronize_ptsz", RUNTIME, "sh_args2", SYNC),
    Hook("cudaEventSynchronize", RUNTIME, "sh_args2", SYNC),
    Hook("cudaSetDevice", RUNTIME, "sh_args2", SET_DEVICE),
    # driver
    Hook("cuLaunchKernel", DRIVER, "sh_drv_launch", LAUNCH),
    Hook("cuLaunchKernel_ptsz", DRIVER, "sh_drv_launch", LAUNCH),
    Hook("cuLaunchKernelEx", DRIVER, "sh_launch_ex", LAUNCH),
    Hook("cuLaunchKernelEx_ptsz", DRIVER, "sh_launch_ex", LAUNCH),
    Hook("cuGraphLaunch", DRIVER, "sh_args2", GRAPH),
    Hook("cuGraphLaunch_ptsz", DRIVER, "sh_args2", GRAPH),
    Hook("cuMemcpy", DRIVER, "sh_drv_memcpy", MEMCPY, DEFAULT),
    Hook("cuMemcpyAsync", DRIVER, "sh_drv_memcpy", MEMCPY, DEFAULT),
    Hook("cuMemcpyHtoD_v2", DRIVER, "sh_drv_memcpy", MEMCPY, H2D),
    Hook("cuMemcpyHtoDAsync_v2", DRIVER, "sh_drv_memcpy", MEMCPY, H2D),
    Hook("cuMemcpyDtoH_v2", DRIVER, "sh_drv_memcpy", MEMCPY, D2H),
    Hook("cuMemcpyDtoHAsync_v2", DRIVER, "sh_drv_memcpy", MEMCPY, D2H),
    Hook("cuMemcpyDtoD_v2", DRIVER, "sh_drv_memcpy", MEMCPY, D2D),
    Hook("cuMemcpyDtoDAsync_v2", DRIVER, "sh_drv_memcpy", MEMCPY, D2D),
    Hook("cuMemAlloc_v2", DRIVER, "sh_alloc", MALLOC),
    Hook("cuMemFree_v2", DRIVER, "sh_args2", FREE),
    Hook("cuMemCreate", DRIVER, "sh_alloc", MALLOC),
    Hook("cuMemMap", DRIVER, "sh_mem_map", MEM_MAP),
    Hook("cuStreamSynchronize", DRIVER, "sh_args2", SYNC),
    Hook("cuCtxSynchronize", DRIVER, "sh_args2", SYNC),
    # NCCL
    Hook("ncclAllReduce", NCCL, "sh_nccl_reduce", COLLECTIVE, op="allreduce"),
    Hook("ncclReduceScatter", NCCL, "sh_nccl_reduce", COLLECTIVE, op="reducescatter"),
    Hook("ncclAllGather", NCCL, "sh_nccl_gather", COLLECTIVE, op="allgather"),
    Hook("ncclBroadcast", NCCL, "sh_nccl_bcast", COLLECTIVE, op="broadcast"),
    Hook("ncclBcast", NCCL, "sh_nccl_p2p", COLLECTIVE, op="broadcast"),
    Hook("ncclSend", NCCL, "sh_nccl_p2p", COLLECTIVE, op="send"),
    Hook("ncclRecv", NCCL, "sh_nccl_p2p", COLLECTIVE, op="recv"),
    Hook("ncclCommInitRank", NCCL, "sh_nccl_init", COMM_INIT),
)

# fn id in the records = index + 1 (0 never appears in a record).
FN_ID: dict[str, int] = {h.symbol: i + 1 for i, h in enumerate(HOOKS)}

# Symbols that name kernels: (symbol, entry function, return function or "").
NAME_HOOKS: tuple[tuple[str, str, str, str], ...] = (
    ("__cudaRegisterFunction", RUNTIME, "name_register", ""),
    ("__cudaGetKernel", RUNTIME, "name_get_kernel", "name_return"),
    ("cuModuleGetFunction", DRIVER, "name_module_fn", "name_return"),
)

# Every symbol whose presence marks an object as holding (a copy of) the runtime: used to
# find cudart linked statically into an executable or another library.
RUNTIME_MARKERS = ("cudaLaunchKernel", "cudaMalloc", "__cudaRegisterFunction")

# ncclDataType_t (nccl.h) -> bytes per element
NCCL_DTYPES: dict[int, tuple[str, int]] = {
    0: ("int8", 1), 1: ("uint8", 1), 2: ("int32", 4), 3: ("uint32", 4), 4: ("int64", 8),
    5: ("uint64", 8), 6: ("float16", 2), 7: ("float32", 4), 8: ("float64", 8),
    9: ("bfloat16", 2), 10: ("float8e4m3", 1), 11: ("float8e5m2", 1),
}
# ncclRedOp_t
NCCL_OPS: dict[int, str] = {0: "sum", 1: "prod", 2: "max", 3: "min", 4: "avg"}


def entries_define() -> str:
    """The ENTRIES macro body for bpf/cuda.c: X(id, shape) per hooked symbol."""
    return " ".join(f"X({FN_ID[h.symbol]}, {h.shape})" for h in HOOKS)


def hook_of(fn: int) -> Hook:
    """The hook of a record's fn id."""
    return HOOKS[fn - 1]
