// renacerd CUDA side: uprobes + uretprobes on the runtime (libcudart), the driver
// (libcuda) and NCCL. x86-64 SysV ABI only; nothing here touches kernel structs (the
// headers BCC compiles against may not match the running kernel): pt_regs and user memory,
// and, where the kernel's BTF gives their offsets, a few fields of the current mm.
//
// Prepended at load by renacerd.capture.probes.cuda:
//   GPU_PAGES     pages of the event ring buffer (power of two)
//   NAME_PAGES    pages of the kernel-name ring buffer (power of two)
//   NAME_LEN      bytes of one kernel name captured
//   PINNED_TARGETS  "path" of the syscall probes' pinned `targets` map, shared so a child
//                 the syscall side starts following is a CUDA target at the same instant;
//                 without it this program keeps its own map, filled by the daemon.
//   ENTRIES       the list of X(symbol id, shape) lines generated from the Python table
//   TASK_MM_OFF, MM_*_OFF, FILE_INODE_OFF, INODE_*_OFF, SB_DEV_OFF
//                 member offsets from the running kernel's BTF (absent: no N_IMAGE records)
//
// One record per outermost API call, written at return (so it has the duration and the
// return code): a per-thread in-flight mark counts nested hooked calls (cudaLaunchKernel
// calling cuLaunchKernel, cudaMalloc calling cuMemAlloc_v2, ...), and only depth 1 emits.
// Producers never wake the consumer (BPF_RB_NO_WAKEUP): the daemon drains on a timer.

#include <uapi/linux/ptrace.h>

// counters (per CPU)
#define C_LOST        0   // gpu ring full
#define C_NAMES_LOST  1   // name ring full
#define C_NESTED      2   // hooked calls made inside another hooked call (not recorded)
#define C_READ_FAILED 3   // a user pointer could not be read
#define C_MAX         4

// event.flags
#define F_READ_FAILED 0x01

// name_rec.how
#define N_REGISTER   1   // __cudaRegisterFunction: key = host stub, name = device symbol
#define N_GET_KERNEL 2   // __cudaGetKernel: key = cudaKernel_t handle, key2 = host stub
#define N_MODULE_FN  3   // cuModuleGetFunction: key = CUfunction, name = symbol
#define N_IMAGE      4   // the executable's code: key = start, key2 = end, name = u64 inode,
                         // u32 device (kernel encoding)

struct inflight {
    u64 ts;
    u64 a[5];
    u32 d[6];
    u64 ptr;     // user pointer read at return (*devPtr, *comm, *handle)
    u32 depth;
    u16 fn;
    u16 pad;
};

struct gpu_event {
    u64 ts;      // entry, CLOCK_MONOTONIC ns
    u64 dur;     // ns
    s64 ret;     // the API's return code (cudaError_t / CUresult / ncclResult_t)
    u64 a[5];    // per-kind arguments, see renacerd/cuda/records.py
    u32 d[6];    // launch: grid x y z, block x y z; collectives: d[0] root / peer
    u32 pid;
    u32 tid;
    u16 fn;      // index of the hooked symbol in renacerd/cuda/symbols.py
    u16 flags;
    u32 pad;
};

struct name_inflight {
    u64 ptr;     // where the handle is written
    u64 key2;    // host stub (GetKernel) or name pointer (cuModuleGetFunction)
    u16 how;
};

struct name_rec {
    u64 ts;
    u64 key;
    u64 key2;
    u32 pid;
    u16 how;
    s16 len;     // bytes of name incl. NUL, or the negative read error
    char name[NAME_LEN];
};

#ifdef PINNED_TARGETS
BPF_TABLE_PINNED("hash", u32, u32, targets, 65536, PINNED_TARGETS);
#else
BPF_HASH(targets, u32, u32, 65536);
#endif
BPF_TABLE("lru_hash", u32, struct inflight, inflight, 65536);
BPF_TABLE("lru_hash", u32, struct name_inflight, name_inflight, 4096);
BPF_PERCPU_ARRAY(counters, u64, C_MAX);
BPF_RINGBUF_OUTPUT(gpu_events, GPU_PAGES);
BPF_RINGBUF_OUTPUT(gpu_names, NAME_PAGES);

static __always_inline void count(int idx) {
    u64 *c = counters.lookup(&idx);
    if (c)
        (*c)++;
}

static __always_inline u64 stack_arg(struct pt_regs *ctx, int slot) {
    // slot 1 is [rsp+8]: at uprobe entry rsp points at the return address.
    u64 v = 0;
    if (bpf_probe_read_user(&v, sizeof(v), (void *)(PT_REGS_SP(ctx) + 8 * slot)) < 0)
        count(C_READ_FAILED);
    return v;
}

// Returns the slot to fill, or 0 when the call is nested in another hooked call (or not
// a target's); depth is counted either way so the matching returns pair up.
static __always_inline struct inflight *begin(u16 fn) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct inflight *st = inflight.lookup(&tid);
    if (st && st->depth) {
        st->depth++;
        count(C_NESTED);
        return 0;
    }
    u32 tgid = id >> 32;
    if (!targets.lookup(&tgid))
        return 0;
    struct inflight z = {};
    z.ts = bpf_ktime_get_ns();
    z.depth = 1;
    z.fn = fn;
    inflight.update(&tid, &z);
    return inflight.lookup(&tid);
}

int cuda_return(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    struct inflight *st = inflight.lookup(&tid);
    if (!st || !st->depth)
        return 0;
    if (st->depth > 1) {
        st->depth--;
        return 0;
    }
    st->depth = 0;
    u64 now = bpf_ktime_get_ns();
    struct gpu_event *e = gpu_events.ringbuf_reserve(sizeof(struct gpu_event));
    if (!e) {
        count(C_LOST);
        return 0;
    }
    e->ts = st->ts;
    e->dur = now - st->ts;
    e->ret = (s32)PT_REGS_RC(ctx);
    e->a[0] = st->a[0];
    e->a[1] = st->a[1];
    e->a[2] = st->a[2];
    e->a[3] = st->a[3];
    e->a[4] = st->a[4];
    e->d[0] = st->d[0];
    e->d[1] = st->d[1];
    e->d[2] = st->d[2];
    e->d[3] = st->d[3];
    e->d[4] = st->d[4];
    e->d[5] = st->d[5];
    e->pid = id >> 32;
    e->tid = tid;
    e->fn = st->fn;
    e->flags = 0;
    e->pad = 0;
    if (st->ptr) {
        // The out-parameter is only written by the callee: read it now, not at entry.
        u64 v = 0;
        if (e->ret == 0 && bpf_probe_read_user(&v, sizeof(v), (void *)st->ptr) < 0) {
            e->flags |= F_READ_FAILED;
            count(C_READ_FAILED);
        }
        e->a[0] = v;
    }
    gpu_events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    return 0;
}

// ---- the executable's image ---------------------------------------------------------
#ifdef TASK_MM_OFF
BPF_TABLE("lru_hash", u32, u64, image_sent, 65536);  // tgid -> mm its image was sent for

static __always_inline u64 kread(u64 base, u64 off) {
    u64 v = 0;
    if (base)
        bpf_probe_read_kernel(&v, sizeof(v), (char *)base + off);
    return v;
}

// Where the executable's code is mapped and which file it is, once per process image (an
// exec replaces the mm), before the launch's own record: a process gone before the daemon
// reads /proc/PID/maps still has its host stubs named from the executable's symbols.
static __always_inline void note_image(void) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 mm = kread((u64)bpf_get_current_task(), TASK_MM_OFF);
    if (!mm)
        return;
    u64 *sent = image_sent.lookup(&tgid);
    if (sent && *sent == mm)
        return;
    u64 inode = kread(kread(mm, MM_EXE_FILE_OFF), FILE_INODE_OFF);
    u64 ino = kread(inode, INODE_INO_OFF);
    u32 dev = (u32)kread(kread(inode, INODE_SB_OFF), SB_DEV_OFF);
    struct name_rec *r = gpu_names.ringbuf_reserve(sizeof(struct name_rec));
    if (!r) {
        count(C_NAMES_LOST);
        return;  // not marked sent: the next launch tries again
    }
    r->ts = bpf_ktime_get_ns();
    r->key = kread(mm, MM_START_CODE_OFF);
    r->key2 = kread(mm, MM_END_CODE_OFF);
    r->pid = tgid;
    r->how = N_IMAGE;
    r->len = 12;
    __builtin_memcpy(r->name, &ino, 8);
    __builtin_memcpy(r->name + 8, &dev, 4);
    gpu_names.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    image_sent.update(&tgid, &mm);
}
#else
static __always_inline void note_image(void) {}
#endif

// ---- argument shapes ----------------------------------------------------------------
// cudaLaunchKernel(func, dim3 grid, dim3 block, void **args, size_t shmem, stream):
// a dim3 (12 bytes) travels in two registers: x | y << 32, then z.
static __always_inline int sh_rt_launch(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    note_image();
    u64 g = PT_REGS_PARM2(ctx), b = PT_REGS_PARM4(ctx);
    st->a[0] = PT_REGS_PARM1(ctx);
    st->a[1] = stack_arg(ctx, 1);   // shared memory
    st->a[2] = stack_arg(ctx, 2);   // stream
    st->d[0] = (u32)g;
    st->d[1] = g >> 32;
    st->d[2] = (u32)PT_REGS_PARM3(ctx);
    st->d[3] = (u32)b;
    st->d[4] = b >> 32;
    st->d[5] = (u32)PT_REGS_PARM5(ctx);
    return 0;
}

// cudaLaunchKernelExC(const cudaLaunchConfig_t *config, const void *func, void **args):
// config = {dim3 grid @0, dim3 block @12, size_t smem @24, stream @32, attrs @40, n @48}
// cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, ...): the same offsets.
static __always_inline int sh_launch_ex(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    note_image();
    struct { u32 d[6]; u64 smem; u64 stream; } cfg = {};
    if (bpf_probe_read_user(&cfg, sizeof(cfg), (void *)PT_REGS_PARM1(ctx)) < 0)
        count(C_READ_FAILED);
    st->a[0] = PT_REGS_PARM2(ctx);
    st->a[1] = cfg.smem & 0xffffffffULL;  // CUlaunchConfig's field is 32-bit; pad is 0
    st->a[2] = cfg.stream;
    st->d[0] = cfg.d[0];
    st->d[1] = cfg.d[1];
    st->d[2] = cfg.d[2];
    st->d[3] = cfg.d[3];
    st->d[4] = cfg.d[4];
    st->d[5] = cfg.d[5];
    return 0;
}

// cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
// six in registers, then bz [rsp+8], shmem [rsp+16], stream [rsp+24].
static __always_inline int sh_drv_launch(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    st->a[0] = PT_REGS_PARM1(ctx);
    st->d[0] = (u32)PT_REGS_PARM2(ctx);
    st->d[1] = (u32)PT_REGS_PARM3(ctx);
    st->d[2] = (u32)PT_REGS_PARM4(ctx);
    st->d[3] = (u32)PT_REGS_PARM5(ctx);
    st->d[4] = (u32)PT_REGS_PARM6(ctx);
    st->d[5] = (u32)stack_arg(ctx, 1);
    st->a[1] = (u32)stack_arg(ctx, 2);
    st->a[2] = stack_arg(ctx, 3);
    return 0;
}

// (graphExec, stream), (stream), (event), (int device), (ptr), (ptr, stream):
// the first two integer arguments as they are.
static __always_inline int sh_args2(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    st->a[0] = PT_REGS_PARM1(ctx);
    st->a[4] = PT_REGS_PARM2(ctx);
    return 0;
}

// cudaMemcpy(dst, src, count, kind) and cudaMemcpyAsync(..., stream):
// a[0] dst, a[1] src, a[2] bytes, a[3] kind, a[4] stream.
static __always_inline int sh_rt_memcpy(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    st->a[0] = PT_REGS_PARM1(ctx);
    st->a[1] = PT_REGS_PARM2(ctx);
    st->a[2] = PT_REGS_PARM3(ctx);
    st->a[3] = (u32)PT_REGS_PARM4(ctx);
    st->a[4] = PT_REGS_PARM5(ctx);
    return 0;
}

// cuMemcpy{,HtoD,DtoH,DtoD}[Async]_v2(dst, src, bytes[, stream]): the direction is the
// symbol's (filled in by the daemon from the symbol table), stream 4th.
static __always_inline int sh_drv_memcpy(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    st->a[0] = PT_REGS_PARM1(ctx);
    st->a[1] = PT_REGS_PARM2(ctx);
    st->a[2] = PT_REGS_PARM3(ctx);
    st->a[4] = PT_REGS_PARM4(ctx);
    return 0;
}

// cudaMalloc(void **devPtr, size), cudaMallocAsync(devPtr, size, stream),
// cuMemAlloc_v2(CUdeviceptr *dptr, size), cuMemCreate(handle *, size, prop, flags):
// a[0] = *out at return, a[1] size, a[4] stream.
static __always_inline int sh_alloc(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    st->ptr = PT_REGS_PARM1(ctx);
    st->a[1] = PT_REGS_PARM2(ctx);
    st->a[4] = PT_REGS_PARM3(ctx);
    return 0;
}

// cuMemMap(ptr, size, offset, handle, flags): a[0] ptr, a[1] size, a[3] handle.
static __always_inline int sh_mem_map(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    st->a[0] = PT_REGS_PARM1(ctx);
    st->a[1] = PT_REGS_PARM2(ctx);
    st->a[3] = PT_REGS_PARM4(ctx);
    return 0;
}

// ncclAllReduce / ncclReduceScatter(send, recv, count, dtype, op, comm, stream):
// stream is the 7th argument: [rsp+8].
static __always_inline int sh_nccl_reduce(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    st->a[0] = PT_REGS_PARM3(ctx);
    st->a[1] = (u32)PT_REGS_PARM4(ctx);
    st->a[2] = (u32)PT_REGS_PARM5(ctx);
    st->a[3] = PT_REGS_PARM6(ctx);
    st->a[4] = stack_arg(ctx, 1);
    return 0;
}

// ncclAllGather(send, recv, sendcount, dtype, comm, stream)
static __always_inline int sh_nccl_gather(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    st->a[0] = PT_REGS_PARM3(ctx);
    st->a[1] = (u32)PT_REGS_PARM4(ctx);
    st->a[3] = PT_REGS_PARM5(ctx);
    st->a[4] = PT_REGS_PARM6(ctx);
    return 0;
}

// ncclBroadcast(send, recv, count, dtype, int root, comm, stream): d[0] root
static __always_inline int sh_nccl_bcast(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    st->a[0] = PT_REGS_PARM3(ctx);
    st->a[1] = (u32)PT_REGS_PARM4(ctx);
    st->d[0] = (u32)PT_REGS_PARM5(ctx);
    st->a[3] = PT_REGS_PARM6(ctx);
    st->a[4] = stack_arg(ctx, 1);
    return 0;
}

// ncclSend / ncclRecv(buf, count, dtype, int peer, comm, stream) and
// ncclBcast(buf, count, dtype, int root, comm, stream): d[0] peer / root
static __always_inline int sh_nccl_p2p(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    st->a[0] = PT_REGS_PARM2(ctx);
    st->a[1] = (u32)PT_REGS_PARM3(ctx);
    st->d[0] = (u32)PT_REGS_PARM4(ctx);
    st->a[3] = PT_REGS_PARM5(ctx);
    st->a[4] = PT_REGS_PARM6(ctx);
    return 0;
}

// ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank): the 128-byte
// id is passed by value in memory (on the stack, from [rsp+8]), so rank is the 3rd integer
// register. a[0] = *comm at return, a[1] nranks, a[2] rank, a[3] and a[4] the id's first
// 16 bytes: NCCL's bootstrap handle (a random magic, then the root's socket address), the
// same in every rank of the communicator and different for each communicator.
static __always_inline int sh_nccl_init(struct pt_regs *ctx, u16 fn) {
    struct inflight *st = begin(fn);
    if (!st)
        return 0;
    st->ptr = PT_REGS_PARM1(ctx);
    st->a[1] = (u32)PT_REGS_PARM2(ctx);
    st->a[2] = (u32)PT_REGS_PARM3(ctx);
    st->a[3] = stack_arg(ctx, 1);
    st->a[4] = stack_arg(ctx, 2);
    return 0;
}

// ---- kernel names -------------------------------------------------------------------
static __always_inline void emit_name(u16 how, u64 key, u64 key2, const char *name) {
    struct name_rec *r = gpu_names.ringbuf_reserve(sizeof(struct name_rec));
    if (!r) {
        count(C_NAMES_LOST);
        return;
    }
    r->ts = bpf_ktime_get_ns();
    r->key = key;
    r->key2 = key2;
    r->pid = bpf_get_current_pid_tgid() >> 32;
    r->how = how;
    r->len = 0;
    r->name[0] = 0;
    if (name) {
        int n = bpf_probe_read_user_str(r->name, NAME_LEN, name);
        if (n < 0)
            count(C_READ_FAILED);
        r->len = n;
    }
    gpu_names.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

static __always_inline int is_target(void) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    return targets.lookup(&tgid) != 0;
}

// __cudaRegisterFunction(void **fatCubinHandle, const char *hostFun, char *deviceFun,
//                        const char *deviceName, int thread_limit, ...)
int name_register(struct pt_regs *ctx) {
    if (!is_target())
        return 0;
    emit_name(N_REGISTER, PT_REGS_PARM2(ctx), 0, (const char *)PT_REGS_PARM3(ctx));
    return 0;
}

// __cudaGetKernel(cudaKernel_t *kernelPtr, const void *entryFuncAddr)
int name_get_kernel(struct pt_regs *ctx) {
    if (!is_target())
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    struct name_inflight n = {};
    n.ptr = PT_REGS_PARM1(ctx);
    n.key2 = PT_REGS_PARM2(ctx);
    n.how = N_GET_KERNEL;
    name_inflight.update(&tid, &n);
    return 0;
}

// cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name)
int name_module_fn(struct pt_regs *ctx) {
    if (!is_target())
        return 0;
    u32 tid = bpf_get_current_pid_tgid();
    struct name_inflight n = {};
    n.ptr = PT_REGS_PARM1(ctx);
    n.key2 = PT_REGS_PARM3(ctx);
    n.how = N_MODULE_FN;
    name_inflight.update(&tid, &n);
    return 0;
}

int name_return(struct pt_regs *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    struct name_inflight *n = name_inflight.lookup(&tid);
    if (!n)
        return 0;
    struct name_inflight c = *n;
    name_inflight.delete(&tid);
    if ((s32)PT_REGS_RC(ctx) != 0)
        return 0;
    u64 handle = 0;
    if (bpf_probe_read_user(&handle, sizeof(handle), (void *)c.ptr) < 0) {
        count(C_READ_FAILED);
        return 0;
    }
    if (c.how == N_GET_KERNEL)
        emit_name(N_GET_KERNEL, handle, c.key2, 0);
    else
        emit_name(N_MODULE_FN, handle, 0, (const char *)c.key2);
    return 0;
}

// ---- one entry function per hooked symbol (its id tells the records apart) ------------
#define X(id, shape) int cuda_enter_##id(struct pt_regs *ctx) { return shape(ctx, id); }
ENTRIES
#undef X
