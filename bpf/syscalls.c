// renacerd kernel side: every syscall of the traced process tree, plus fork/exec/exit.
//
// Prepended at load by renacerd.capture.probes.syscalls (bcc-tools style feature switches):
//   TID_SLOTS      power of two; slots of the per-thread start array (>= pid_max when it fits)
//   EVENT_PAGES    pages of the event ring buffer (power of two)
//   DETAIL_PAGES   pages of the detail ring buffer (power of two)
//   STR_LEN        bytes of a string in the short detail ring (most paths fit)
//   LONG_LEN       bytes of a string in the long detail ring (PATH_MAX; the argv blob)
//   LONG_PAGES     pages of the long detail ring (power of two)
//   ARGV_ARGS      argv elements captured at execve (into one blob of LONG_LEN bytes)
//   FOLLOW         defined: processes forked by a target become targets
//   TGID_INDEX     defined when pid_max <= TID_SLOTS: targets are also kept in a tgid-indexed
//                  array, the cheap test on every syscall of the system
//   RAW_TP         defined (x86-64): raw tracepoints on sys_enter/sys_exit, args from pt_regs
//   TASK_MM_OFF, MM_ARG_START_OFF, MM_ARG_END_OFF  struct offsets from the running
//                  kernel's BTF (renacerd.capture.probes.btf); without them argv comes from execve
//   RUN_SLOTS      run slots (<= 128: the slot rides in the top 7 bits of event.flags).
//                  A target's value in `targets` is its run's slot (1..RUN_SLOTS-1); a forked
//                  child inherits its parent's. One attachment serves every run of a host:
//                  records carry the slot, counters are kept per slot.
//   PRIV_CHECK     defined when the credential offsets below are known: a process of a run
//                  whose `run_owner` uid is not root stops being followed when its exec
//                  gains privilege
//   TASK_CRED_OFF, CRED_UID_OFF, CRED_GID_OFF, CRED_EUID_OFF, CRED_EGID_OFF, CRED_CAPP_OFF
//                  struct offsets from BTF for that check (required by a non-root run)
//   The __NR_* numbers come from the kernel headers BCC compiles against.
//
// Records are fixed size so the daemon decodes a whole drained range as one numpy array:
// struct event (48 B) in `events`, struct detail (24 B + STR_LEN) in `details`. A string
// is read once, whole, into a per-CPU scratch record; one longer than STR_LEN goes to
// `details_long` as a struct detail_long (24 B + LONG_LEN): a long path costs only itself.
// Producers never wake the consumer (BPF_RB_NO_WAKEUP): the daemon drains on a timer.

#include <uapi/linux/ptrace.h>
// Only the syscall numbers and the clone flags: kernel structs are read at offsets from BTF
// (above), and <linux/sched.h> would cost the compile at every start ~0.5 s of CPU.
#include <asm/unistd.h>
#include <uapi/linux/sched.h>

// Pseudo syscall numbers for lifecycle records; real numbers stay below 1024.
#define EV_FORK   0xFFF0
#define EV_EXEC   0xFFF1
#define EV_EXIT   0xFFF2
#define EV_SIGNAL 0xFFF3

// event.flags
#define F_NO_ENTER      0x01  // exit seen without its enter (in flight at attach, or slot reused)
#define F_DETAIL        0x02  // detail records were emitted for this event
#define F_DETAIL_LOST   0x04  // a detail record could not be reserved
#define F_READ_FAILED   0x08  // reading a user string / struct failed
#define F_TRUNCATED     0x10  // a string filled STR_LEN and was cut
#define F_THREAD        0x20  // EV_FORK: the child is a thread of the parent
#define F_EMPTY_PATH0   0x40  // the first path is "" (no detail record)
#define F_EMPTY_PATH1   0x80  // the second path is "" (no detail record)
#define F_UNFOLLOWED    0x100 // execve / EV_EXEC: privilege gained at exec, no longer traced
#define RUN_SHIFT      9     // flags >> RUN_SHIFT: the run slot of the record's process

// detail.slot
#define SLOT_PATH0 0
#define SLOT_PATH1 1
#define SLOT_ADDR  2
#define SLOT_COMM  3
#define SLOT_ARGV_BLOB 4  // argv NUL-separated, from the new mm at exec
#define SLOT_ARGV  8   // SLOT_ARGV + i for argv[i]

// counters (per CPU)
#define C_EVENTS_LOST   0
#define C_DETAILS_LOST  1
#define C_READ_FAILED   2
#define C_NO_ENTER      3
#define C_TRUNCATED     4
#define C_MAX           5

struct start_t {
    u64 ts;
    u64 a0;
    u64 p0;      // user pointer read at exit (path or sockaddr)
    u64 p1;      // second user pointer (rename target) or sockaddr length
    u32 tid;
    u32 nr;
    u32 kind;    // how to read p0/p1 at exit
    u32 pad;
    u32 aux;     // the event's aux: a flags argument or a second fd (aux_of)
    u32 run;     // the run slot of the thread's process at enter
};

struct event {
    u64 ts;      // enter, CLOCK_MONOTONIC ns
    u64 dur;     // ns
    s64 ret;
    u64 a0;      // first argument (fd for fd-based calls); lifecycle: see EV_*
    u32 pid;     // tgid (host)
    u32 tid;
    u16 nr;
    u16 flags;
    u32 aux;     // lifecycle: child tid / signal; syscalls: number of details
};

struct detail {
    u64 ts;      // enter ts of the owning event: (tid, ts) joins them
    u32 tid;
    u16 nr;
    u8 slot;
    u8 flags;
    s32 len;     // bytes read incl. NUL, or the negative error
    u32 pad;     // open family, path 0: mode | openat2's resolve << 16
    char data[STR_LEN];
};

struct detail_long {
    u64 ts;
    u32 tid;
    u16 nr;
    u8 slot;
    u8 flags;
    s32 len;
    u32 pad;
    char data[LONG_LEN];
};

// Where execve's argv blob is built: strings are appended at a bounded offset, so the
// buffer has LONG_LEN of spill room behind the record's data.
struct argv_scratch {
    struct detail_long d;
    char spill[LONG_LEN];
};

// creat(path, mode) is open(path, O_CREAT | O_WRONLY | O_TRUNC, mode)
#define CREAT_FLAGS (0100 | 01 | 01000)
// the open flags that make the kernel use the mode: O_CREAT, __O_TMPFILE
#define MODE_FLAGS (0100 | 020000000)

// kinds of argument capture at exit
#define K_NONE      0
#define K_PATH0     1   // p0 is a path
#define K_PATH01    2   // p0 and p1 are paths
#define K_ADDR      3   // p0 is a sockaddr, p1 its length
#define K_ADDR_OUT  4   // p0 is a sockaddr filled by the kernel, p1 points to its length

// tgid -> run slot: the authority, shared with the CUDA probes (which test presence only)
BPF_HASH(targets, u32, u32, 65536);
#ifdef TGID_INDEX
// pid_max <= TID_SLOTS: a tgid-indexed copy (tgid | slot << 32) answers "is this a target,
// of which run?" exactly, and the verifier inlines an array lookup where a hash lookup is a
// helper call (~7 ns a syscall).
BPF_ARRAY(target_idx, u64, TID_SLOTS);
#endif
BPF_ARRAY(starts, struct start_t, TID_SLOTS);
BPF_PERCPU_ARRAY(counters, u64, C_MAX * RUN_SLOTS);  // [slot * C_MAX + C_*]
BPF_ARRAY(run_owner, u32, RUN_SLOTS);  // the uid each run belongs to (0: root)
BPF_RINGBUF_OUTPUT(events, EVENT_PAGES);
BPF_RINGBUF_OUTPUT(details, DETAIL_PAGES);
BPF_RINGBUF_OUTPUT(details_long, LONG_PAGES);
BPF_PERCPU_ARRAY(argv_buf, struct argv_scratch, 1);
BPF_PERCPU_ARRAY(str_buf, struct detail_long, 1);  // a string read once (emit_str_pad)

// The run slot of process `tgid`, 0 when it is not traced.
static __always_inline u32 is_target(u32 tgid) {
#ifdef TGID_INDEX
    u32 i = tgid & (TID_SLOTS - 1);
    u64 *v = target_idx.lookup(&i);
    if (!v || (u32)*v != tgid || !tgid)
        return 0;
    return (u32)(*v >> 32);
#else
    u32 *v = targets.lookup(&tgid);
    return v ? *v : 0;
#endif
}

static __always_inline void count(u32 run, int idx) {
    u32 k = (run & (RUN_SLOTS - 1)) * C_MAX + idx;
    u64 *c = counters.lookup(&k);
    if (c)
        (*c)++;
}

// A detail record with its join key filled, or NULL (counted) when the ring is full.
static __always_inline struct detail *reserve_detail(u32 run, u64 ts, u32 tid, u16 nr, u8 slot) {
    struct detail *d = details.ringbuf_reserve(sizeof(struct detail));
    if (!d) {
        count(run, C_DETAILS_LOST);
        return 0;
    }
    d->ts = ts;
    d->tid = tid;
    d->nr = nr;
    d->slot = slot;
    d->flags = 0;
    d->pad = 0;
    return d;
}

static __always_inline int read_str(char *dst, u32 size, const void *ptr, int user) {
    if (user)
        return bpf_probe_read_user_str(dst, size, ptr);
    return bpf_probe_read_kernel_str(dst, size, ptr);
}

// A string read once, whole (up to LONG_LEN), into this CPU's scratch record, then copied
// into the short ring when it fits STR_LEN and into the long ring when not; with the long
// ring full the short one keeps it cut. empty: the flag to return for "" (no record) or 0.
// quiet: a failed or cut read is flagged, not counted (execve: the daemon counts it unless
// the kernel's copy made at exec replaces it).
// The scratch is safe per CPU: these programs run with preemption off and never nest.
static __always_inline u16 emit_str_pad(u32 run, u64 ts, u32 tid, u16 nr, u8 slot, const void *ptr,
                                        int user, u32 pad, int quiet, u16 empty) {
    u32 zero = 0;
    struct detail_long *b = str_buf.lookup(&zero);
    if (!b)
        return F_DETAIL_LOST;
    int n = read_str(b->data, LONG_LEN, ptr, user);
    if (empty && n == 1)
        return empty;
    b->ts = ts;
    b->tid = tid;
    b->nr = nr;
    b->slot = slot;
    b->pad = pad;
    b->len = n;
    u16 fl = F_DETAIL;
    if (n < 0) {
        fl |= F_READ_FAILED;
        if (!quiet)
            count(run, C_READ_FAILED);
    } else if (n > STR_LEN) {
        if (n == LONG_LEN) {
            fl |= F_TRUNCATED;
            if (!quiet)
                count(run, C_TRUNCATED);
        }
        b->flags = fl;
        if (!details_long.ringbuf_output(b, sizeof(struct detail_long), BPF_RB_NO_WAKEUP))
            return fl;
        // no room in the long ring: the short record keeps what fits, cut
        if (!(fl & F_TRUNCATED) && !quiet)
            count(run, C_TRUNCATED);
        fl |= F_TRUNCATED;
        b->len = STR_LEN;
        b->data[STR_LEN - 1] = 0;
    }
    b->flags = fl;
    if (details.ringbuf_output(b, sizeof(struct detail), BPF_RB_NO_WAKEUP)) {
        count(run, C_DETAILS_LOST);
        return F_DETAIL_LOST;
    }
    return fl;
}

static __always_inline u16 emit_str(u32 run, u64 ts, u32 tid, u16 nr, u8 slot,
                                    const void *ptr, int user) {
    return emit_str_pad(run, ts, tid, nr, slot, ptr, user, 0, 0, 0);
}

// execve's argv as one NUL-separated blob (slot SLOT_ARGV_BLOB) in the long ring: up to
// ARGV_ARGS strings and LONG_LEN bytes, flagged truncated beyond. A NULL argv is empty.
// Neither a cut nor a failed read is counted here (the strings of a forked caller may sit in
// pages not yet faulted in): the daemon counts those its kept records show.
static __always_inline u16 emit_argv(u32 run, u64 ts, u32 tid, u16 nr, const char *const *argv) {
    u32 zero = 0;
    struct argv_scratch *b = argv_buf.lookup(&zero);
    if (!b)
        return 0;
    u32 off = 0;
    u16 fl = F_DETAIL;
    int i;
    for (i = 0; i < ARGV_ARGS && argv; i++) {
        const char *arg = 0;
        if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) < 0) {
            fl |= F_READ_FAILED;
            break;
        }
        if (!arg)
            break;
        if (off >= LONG_LEN) {
            fl |= F_TRUNCATED;
            break;
        }
        int n = bpf_probe_read_user_str(&b->d.data[off & (LONG_LEN - 1)], LONG_LEN, arg);
        if (n < 0) {
            fl |= F_READ_FAILED;
            break;
        }
        off += n;
        if (n == LONG_LEN)
            fl |= F_TRUNCATED;  // one argument of LONG_LEN bytes or more
    }
    if (i == ARGV_ARGS && argv) {
        const char *more = 0;
        if (bpf_probe_read_user(&more, sizeof(more), &argv[ARGV_ARGS]) == 0 && more)
            fl |= F_TRUNCATED;
    }
    if (off > LONG_LEN) {
        off = LONG_LEN;
        fl |= F_TRUNCATED;
    }
    b->d.ts = ts;
    b->d.tid = tid;
    b->d.nr = nr;
    b->d.slot = SLOT_ARGV_BLOB;
    b->d.flags = fl;
    b->d.len = off;
    b->d.pad = 0;
    if (details_long.ringbuf_output(&b->d, sizeof(struct detail_long), BPF_RB_NO_WAKEUP)) {
        count(run, C_DETAILS_LOST);
        return F_DETAIL_LOST;
    }
    return fl;
}

// Read `len` bytes (already bounded by the caller, provably <= STR_LEN) of user memory into
// a reserved detail, flag a failed read, submit it.
static __always_inline u16 submit_bytes(u32 run, struct detail *d, const void *ptr, u32 len, u16 fl) {
    int err = bpf_probe_read_user(d->data, len, ptr);
    if (err < 0) {
        fl |= F_READ_FAILED;
        count(run, C_READ_FAILED);
        d->len = err;
    } else {
        d->len = len;
    }
    d->flags = fl;
    details.ringbuf_submit(d, BPF_RB_NO_WAKEUP);
    return fl;
}

// A path argument at exit. An empty one (glibc's fstat is newfstatat(fd, "", AT_EMPTY_PATH):
// a third of the paths of a PyTorch data loader) is a flag on the event, not a record the
// daemon has to decode.
// A NULL path is no path (utimensat(fd, NULL, ...) is futimens; *at calls with
// AT_EMPTY_PATH may pass NULL): nothing to read, and not a failed read.
static __always_inline u16 emit_path(u32 run, u64 ts, u32 tid, u16 nr, u8 slot, const void *ptr,
                                     u32 pad) {
    if (!ptr)
        return 0;
    return emit_str_pad(run, ts, tid, nr, slot, ptr, 1, pad, 0,
                        slot == SLOT_PATH0 ? F_EMPTY_PATH0 : F_EMPTY_PATH1);
}

static __always_inline u16 emit_addr(u32 run, u64 ts, u32 tid, u16 nr, const void *ptr, u32 len) {
    if (!ptr)
        return 0;  // no address given (sendto on a connected socket, accept's NULL)
    struct detail *d = reserve_detail(run, ts, tid, nr, SLOT_ADDR);
    if (!d)
        return F_DETAIL_LOST;
    // sockaddr_storage is 128 bytes; the mask keeps the size provably within data[]
    if (len > 128)
        len = 128;
    asm volatile("%0 &= 0xff" : "+r"(len));
    return submit_bytes(run, d, ptr, len, F_DETAIL);
}

// One event record; returns 0 (and counts it) when the ring is full.
static __always_inline struct event *reserve_event(u32 run) {
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e)
        count(run, C_EVENTS_LOST);
    return e;
}

static __always_inline void submit_event(u32 run, struct event *e, u64 ts, u64 dur, s64 ret, u64 a0,
                                         u32 pid, u32 tid, u16 nr, u16 flags, u32 aux) {
    e->ts = ts;  // lifecycle records: the same ts keys their detail records
    e->dur = dur;
    e->ret = ret;
    e->a0 = a0;
    e->pid = pid;
    e->tid = tid;
    e->nr = nr;
    e->flags = flags | (u16)((run & (RUN_SLOTS - 1)) << RUN_SHIFT);
    e->aux = aux;
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

// A record with details is reserved first and submitted after them: the daemon reads the
// event ring, then the detail ring, so an event it sees has its details there too.
static __always_inline int emit_event(u32 run, u64 ts, u64 dur, s64 ret, u64 a0, u32 pid, u32 tid,
                                      u16 nr, u16 flags, u32 aux) {
    struct event *e = reserve_event(run);
    if (!e)
        return 0;
    submit_event(run, e, ts, dur, ret, a0, pid, tid, nr, flags, aux);
    return 1;
}

// How a syscall's user memory is read at exit; K_ARGS: no capture, but enter needs all six
// arguments (clone flags, execve); K_AUX: enter keeps one more argument in the event's aux
// (aux_of), and pipe/pipe2/socketpair read their fd pair at exit. Only these calls pay for
// reading more than arg 0.
#define K_ARGS 5
#define K_AUX  6
static __always_inline u32 kind_of(u32 nr) {
    switch (nr) {
    case __NR_memfd_create:  // its name is read as a path
        return K_PATH0;
    case __NR_dup3: case __NR_pipe: case __NR_pipe2: case __NR_socket: case __NR_socketpair:
    case __NR_eventfd2: case __NR_timerfd_create: case __NR_signalfd4: case __NR_fcntl:
    case __NR_sendfile: case __NR_copy_file_range: case __NR_splice: case __NR_tee:
        return K_AUX;
    case __NR_open: case __NR_creat: case __NR_stat: case __NR_lstat:
    case __NR_access: case __NR_unlink: case __NR_mkdir: case __NR_rmdir:
    case __NR_chdir: case __NR_truncate: case __NR_readlink: case __NR_chmod:
    case __NR_chown: case __NR_lchown: case __NR_statfs:
    case __NR_openat: case __NR_openat2: case __NR_newfstatat: case __NR_statx:
    case __NR_faccessat: case __NR_faccessat2: case __NR_unlinkat: case __NR_mkdirat:
    case __NR_readlinkat: case __NR_fchmodat: case __NR_fchownat: case __NR_mknodat:
    case __NR_utimensat:
        return K_PATH0;
    case __NR_rename: case __NR_link: case __NR_symlink:
    case __NR_renameat: case __NR_renameat2: case __NR_linkat: case __NR_symlinkat:
        return K_PATH01;
    case __NR_connect: case __NR_bind: case __NR_sendto:
        return K_ADDR;
    case __NR_accept: case __NR_accept4: case __NR_getpeername: case __NR_getsockname:
        return K_ADDR_OUT;
    case __NR_clone: case __NR_clone3: case __NR_execve: case __NR_execveat:
        return K_ARGS;
    }
    return K_NONE;
}

// The event's aux for calls other than the open family (whose flags come with p1): the
// argument renacerd.trace.fdtrack.AUX names, so fd tables can be replayed at analysis time.
static __always_inline u32 aux_of(u32 nr, u64 *a) {
    switch (nr) {
    case __NR_pipe2: case __NR_socket: case __NR_socketpair: case __NR_eventfd2:
    case __NR_timerfd_create: case __NR_memfd_create: case __NR_sendfile: case __NR_tee:
    case __NR_symlinkat:
        return (u32)a[1];
    case __NR_dup3: case __NR_copy_file_range: case __NR_splice:
    case __NR_renameat: case __NR_renameat2: case __NR_linkat:
        return (u32)a[2];
    case __NR_accept4: case __NR_signalfd4:
        return (u32)a[3];
    case __NR_fcntl:
        return (u32)(a[1] & 0xFFFF) | (u32)((a[2] & 0xFFFF) << 16);
    }
    return 0;
}

// Which argument(s) hold the user memory of `kind`; returns the kind actually to capture.
static __always_inline u32 capture_ptrs(u32 nr, u32 kind, u64 *a, u64 *p0, u64 *p1) {
    switch (nr) {
    // the open family: p1 = open flags | (mode | resolve << 16) << 32
    case __NR_open:
        *p0 = a[0];
        *p1 = (u32)a[1] | ((a[2] & 0xFFFF) << 32);
        return kind;
    case __NR_creat:
        *p0 = a[0];
        *p1 = CREAT_FLAGS | ((a[1] & 0xFFFF) << 32);
        return kind;
    case __NR_openat:
        *p0 = a[1];
        *p1 = (u32)a[2] | ((a[3] & 0xFFFF) << 32);
        return kind;
    case __NR_openat2: {
        u64 how[3] = {};  // struct open_how: flags, mode, resolve
        if (a[2])
            bpf_probe_read_user(how, sizeof(how), (void *)a[2]);
        *p0 = a[1];
        *p1 = (u32)how[0] | ((how[1] & 0xFFFF) << 32) | ((how[2] & 0xFFFF) << 48);
        return kind;
    }
    case __NR_newfstatat: case __NR_statx:
    case __NR_faccessat: case __NR_faccessat2: case __NR_unlinkat: case __NR_mkdirat:
    case __NR_readlinkat: case __NR_fchmodat: case __NR_fchownat: case __NR_mknodat:
    case __NR_utimensat:
        *p0 = a[1];
        return kind;
    case __NR_renameat: case __NR_renameat2: case __NR_linkat:
        *p0 = a[1];
        *p1 = a[3];
        return kind;
    case __NR_symlinkat:
        *p0 = a[0];
        *p1 = a[2];
        return kind;
    case __NR_connect: case __NR_bind:
        *p0 = a[1];
        *p1 = a[2];
        return kind;
    case __NR_sendto:
        if (!a[4])
            return K_NONE;
        *p0 = a[4];
        *p1 = a[5];
        return kind;
    case __NR_accept: case __NR_accept4: case __NR_getpeername: case __NR_getsockname:
        if (!a[1] || !a[2])
            return K_NONE;
        *p0 = a[1];
        *p1 = a[2];
        return kind;
    case __NR_clone: case __NR_clone3: case __NR_execve: case __NR_execveat:
        return K_NONE;
    case __NR_socketpair:
        *p0 = a[3];  // int sv[2], read at exit
        return kind;
    }
    // open, creat, stat ... and rename, link, symlink: the path(s) lead
    *p0 = a[0];
    *p1 = a[1];
    return kind;
}

// Two ways in, one body. RAW_TP (x86-64): raw tracepoints hand over pt_regs, skipping the
// perf trace-buffer set-up of a classic tracepoint (about 20 ns a syscall here); the
// arguments are read from the registers, and only the calls that need more than arg 0
// read all six. Elsewhere: the classic raw_syscalls tracepoints with their args array.
#ifdef RAW_TP
struct sysregs { u64 r10, r9, r8, ax, cx, dx, si, di; };  // pt_regs from r10 on, in order
#define ENTER_PROBE RAW_TRACEPOINT_PROBE(sys_enter)
#define EXIT_PROBE RAW_TRACEPOINT_PROBE(sys_exit)
#define ENTER_NR ((u32)ctx->args[1])
#define EXIT_RET ((s64)ctx->args[1])
static __always_inline void load_a0(struct bpf_raw_tracepoint_args *ctx, u64 *a) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    bpf_probe_read_kernel(&a[0], sizeof(u64), &regs->di);
}
static __always_inline void load_args(struct bpf_raw_tracepoint_args *ctx, u64 *a) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    struct sysregs r = {};
    bpf_probe_read_kernel(&r, sizeof(r), &regs->r10);
    a[0] = r.di; a[1] = r.si; a[2] = r.dx; a[3] = r.r10; a[4] = r.r8; a[5] = r.r9;
}
static __always_inline u32 exit_nr(struct bpf_raw_tracepoint_args *ctx) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    u64 nr = 0;
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    return (u32)nr;
}
#define LOAD_A0(a) load_a0(ctx, a)
#define LOAD_ARGS(a) load_args(ctx, a)
#define EXIT_NR exit_nr(ctx)
#else
#define ENTER_PROBE TRACEPOINT_PROBE(raw_syscalls, sys_enter)
#define EXIT_PROBE TRACEPOINT_PROBE(raw_syscalls, sys_exit)
#define ENTER_NR ((u32)args->id)
#define EXIT_RET ((s64)args->ret)
#define LOAD_A0(a) (a)[0] = args->args[0]
#define LOAD_ARGS(a) do { (a)[0] = args->args[0]; (a)[1] = args->args[1]; \
    (a)[2] = args->args[2]; (a)[3] = args->args[3]; (a)[4] = args->args[4]; \
    (a)[5] = args->args[5]; } while (0)
#define EXIT_NR ((u32)args->id)
#endif

ENTER_PROBE {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 run = is_target(tgid);
    if (!run)
        return 0;
    u32 tid = (u32)id;
    u32 nr = ENTER_NR;
    u64 ts = bpf_ktime_get_ns();
    u64 a[6] = {};
    u32 kind = kind_of(nr);
    if (kind == K_NONE)
        LOAD_A0(a);
    else
        LOAD_ARGS(a);

    if (nr == __NR_exit_group || nr == __NR_exit) {
        // These never return: record them now, with the exit code as a0.
        emit_event(run, ts, 0, 0, a[0], tgid, tid, nr, 0, 0);
        return 0;
    }

    u32 idx = tid & (TID_SLOTS - 1);
    struct start_t *s = starts.lookup(&idx);
    if (!s)
        return 0;
    s->ts = ts;
    s->a0 = a[0];
    s->tid = tid;
    s->nr = nr;
    s->p0 = 0;
    s->p1 = 0;
    s->pad = 0;
    s->aux = 0;
    s->run = run;
    s->kind = K_NONE;
    if (kind == K_NONE)
        return 0;
    s->aux = aux_of(nr, a);
    s->kind = capture_ptrs(nr, kind, a, &s->p0, &s->p1);
    if (nr == __NR_clone) {
        s->p0 = a[0];  // clone flags, read by sched_process_fork
    } else if (nr == __NR_clone3) {
        u64 flags = 0;
        bpf_probe_read_user(&flags, sizeof(flags), (void *)a[0]);
        s->p0 = flags;
    } else if (nr == __NR_execve || nr == __NR_execveat) {
        // After a successful exec the old image is gone: read filename and argv now.
        u16 fl = 0;
        const char *fname = (const char *)(nr == __NR_execve ? a[0] : a[1]);
        const char *const *argv = (const char *const *)(nr == __NR_execve ? a[1] : a[2]);
        if (fname)  // NULL: EFAULT, nothing to read
            fl |= emit_str_pad(run, ts, tid, nr, SLOT_PATH0, fname, 1, 0, 1, 0);
        fl |= emit_argv(run, ts, tid, nr, argv);
        s->pad = fl;  // carried to the exit record's flags
    }
    return 0;
}

EXIT_PROBE {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u32 idx = tid & (TID_SLOTS - 1);
    struct start_t *s = starts.lookup(&idx);
    if (!s)
        return 0;
    u32 tgid = id >> 32;
    u64 now = bpf_ktime_get_ns();
    u16 flags = 0;
    u64 ts, a0;
    u32 nr, run;
    s64 ret = EXIT_RET;
    // A live slot of this tid is this syscall's enter: a thread is in one syscall at a time,
    // and sched_process_fork clears a new thread's slot, so a reused tid never matches a
    // dead thread's leftover.
    if (s->tid == tid && s->ts) {
        ts = s->ts;
        a0 = s->a0;
        nr = s->nr;
        flags = s->pad;
        run = s->run;
        s->ts = 0;
    } else {
        // Not ours, or it entered before we attached.
        run = is_target(tgid);
        if (!run)
            return 0;
        nr = EXIT_NR;
        // A new child's return from fork/clone: it never entered, and strace shows nothing.
        if (ret == 0 && (nr == __NR_clone || nr == __NR_clone3 || nr == __NR_fork ||
                         nr == __NR_vfork))
            return 0;
        count(run, C_NO_ENTER);
        emit_event(run, now, 0, ret, 0, tgid, tid, nr, F_NO_ENTER, 0);
        return 0;
    }

    u32 kind = s->kind;
    u32 aux = s->aux, pad = 0;
    if (kind == K_PATH0 && (nr == __NR_open || nr == __NR_creat || nr == __NR_openat ||
                            nr == __NR_openat2)) {
        aux = (u32)s->p1;  // the open flags, kept with the event
        pad = s->p1 >> 32;  // mode (and resolve), kept with the path
        if (!(aux & MODE_FLAGS))
            pad &= 0xFFFF0000;  // the kernel ignores mode then: it is register garbage
    }
    // EFAULT: the kernel could not read the caller's memory either; nothing to capture
    if (kind != K_NONE && ret != -14) {
        u64 p0 = s->p0, p1 = s->p1;
        if (kind == K_PATH0) {
            flags |= emit_path(run, ts, tid, nr, SLOT_PATH0, (void *)p0, pad);
        } else if (kind == K_PATH01) {
            flags |= emit_path(run, ts, tid, nr, SLOT_PATH0, (void *)p0, 0);
            flags |= emit_path(run, ts, tid, nr, SLOT_PATH1, (void *)p1, 0);
        } else if (kind == K_ADDR) {
            flags |= emit_addr(run, ts, tid, nr, (void *)p0, (u32)p1);
        } else if (kind == K_ADDR_OUT && ret >= 0) {
            u32 len = 0;
            bpf_probe_read_user(&len, sizeof(len), (void *)p1);
            flags |= emit_addr(run, ts, tid, nr, (void *)p0, len);
        } else if (kind == K_AUX && ret == 0 &&
                   (nr == __NR_pipe || nr == __NR_pipe2 || nr == __NR_socketpair)) {
            // the two fds the kernel wrote: a0 becomes fds[0] | fds[1] << 32
            u64 fds = 0;
            if (bpf_probe_read_user(&fds, sizeof(fds), (void *)p0) < 0) {
                flags |= F_READ_FAILED;
                count(run, C_READ_FAILED);
            } else {
                a0 = fds;
            }
        }
    }

    emit_event(run, ts, now - ts, ret, a0, tgid, tid, nr, flags, aux);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 child = args->child_pid;
    // A new thread starts with no syscall in flight: drop what a dead thread of the same
    // tid (say, an exec'ing non-leader) left in the slot, so sys_exit cannot match it.
    u32 cidx = child & (TID_SLOTS - 1);
    struct start_t *cs = starts.lookup(&cidx);
    if (cs && cs->tid == child)
        cs->ts = 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 run = is_target(tgid);
    if (!run)
        return 0;
    u32 tid = (u32)id;
    u16 flags = 0;
    u32 idx = tid & (TID_SLOTS - 1);
    struct start_t *s = starts.lookup(&idx);
    if (s && s->tid == tid && s->ts && (s->nr == __NR_clone || s->nr == __NR_clone3)
        && (s->p0 & CLONE_THREAD))
        flags |= F_THREAD;
#ifdef FOLLOW
    if (!(flags & F_THREAD)) {
        // the child belongs to its parent's run
        targets.update(&child, &run);
#ifdef TGID_INDEX
        u32 ci = child & (TID_SLOTS - 1);
        u64 v = (u64)child | ((u64)run << 32);
        target_idx.update(&ci, &v);
#endif
    }
#endif
    struct event *e = reserve_event(run);
    if (!e)
        return 0;  // no details for a record the daemon will never see
    u64 ts = bpf_ktime_get_ns();
    emit_str(run, ts, child, EV_FORK, SLOT_COMM, (char *)args + (args->data_loc_child_comm & 0xFFFF), 0);
    submit_event(run, e, ts, 0, 0, child, tgid, tid, EV_FORK, flags, child);
    return 0;
}

#ifdef PRIV_CHECK
// The new credentials of an exec (committed before sched_process_exec): setuid/setgid bits
// make euid != uid or egid != gid; file capabilities give a non-root uid permitted caps.
static __always_inline int exec_gained_privilege(void) {
    char *task = (char *)bpf_get_current_task();
    char *cred = 0;
    bpf_probe_read_kernel(&cred, sizeof(cred), task + TASK_CRED_OFF);
    if (!cred)
        return 1;  // unreadable: do not follow what cannot be checked
    u32 uid = 0, gid = 0, euid = 0, egid = 0;
    u64 capp = 0;
    bpf_probe_read_kernel(&uid, sizeof(uid), cred + CRED_UID_OFF);
    bpf_probe_read_kernel(&gid, sizeof(gid), cred + CRED_GID_OFF);
    bpf_probe_read_kernel(&euid, sizeof(euid), cred + CRED_EUID_OFF);
    bpf_probe_read_kernel(&egid, sizeof(egid), cred + CRED_EGID_OFF);
    bpf_probe_read_kernel(&capp, sizeof(capp), cred + CRED_CAPP_OFF);
    return euid != uid || egid != gid || (uid != 0 && capp != 0);
}

// Forget a process in the kernel: none of its later syscalls, forks or CUDA calls is seen.
static __always_inline void unfollow(u32 tgid) {
    targets.delete(&tgid);
#ifdef TGID_INDEX
    u32 i = tgid & (TID_SLOTS - 1);
    u64 zero = 0;
    u64 *v = target_idx.lookup(&i);
    if (v && (u32)*v == tgid)
        target_idx.update(&i, &zero);
#endif
}
#endif

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 run = is_target(tgid);
    if (!run)
        return 0;
    u32 tid = (u32)id;
    u16 flags = F_DETAIL;
#ifdef PRIV_CHECK
    // A run of an unprivileged user never follows a process into privilege: the exec's
    // own execve record (flagged) is the last one of the process.
    u32 *owner = run_owner.lookup(&run);
    if ((!owner || *owner) && exec_gained_privilege()) {
        unfollow(tgid);
        flags |= F_UNFOLLOWED;
        u32 idx = tid & (TID_SLOTS - 1);
        struct start_t *s = starts.lookup(&idx);
        if (s && s->tid == tid && s->ts)
            s->pad |= F_UNFOLLOWED;  // carried to the execve record's flags
    }
#endif
    struct event *e = reserve_event(run);
    if (!e)
        return 0;  // no details for a record the daemon will never see
    u64 ts = bpf_ktime_get_ns();
    emit_str(run, ts, tid, EV_EXEC, SLOT_PATH0, (char *)args + (args->data_loc_filename & 0xFFFF), 0);
    char comm[16];
    bpf_get_current_comm(&comm, sizeof(comm));
    emit_str(run, ts, tid, EV_EXEC, SLOT_COMM, comm, 0);
#ifdef TASK_MM_OFF
    // argv as the kernel copied it onto the new stack (resident, unlike the caller's
    // strings, which may sit in not-yet-faulted pages after fork). Offsets come from BTF.
    // Not read from a process that gained privilege: its memory is no longer the caller's.
    if (!(flags & F_UNFOLLOWED)) {
        char *task = (char *)bpf_get_current_task();
        u64 mm = 0, as = 0, ae = 0;
        bpf_probe_read_kernel(&mm, sizeof(mm), task + TASK_MM_OFF);
        if (mm) {
            bpf_probe_read_kernel(&as, sizeof(as), (char *)mm + MM_ARG_START_OFF);
            bpf_probe_read_kernel(&ae, sizeof(ae), (char *)mm + MM_ARG_END_OFF);
        }
        struct detail_long *d = details_long.ringbuf_reserve(sizeof(struct detail_long));
        if (d) {
            d->ts = ts;
            d->tid = tid;
            d->nr = EV_EXEC;
            d->slot = SLOT_ARGV_BLOB;
            d->pad = 0;
            u64 n = ae > as ? ae - as : 0;
            u8 fl = F_DETAIL;
            if (n > LONG_LEN) {
                n = LONG_LEN;
                fl |= F_TRUNCATED;
                count(run, C_TRUNCATED);
            }
            asm volatile("%0 &= 0x1fff" : "+r"(n));
            if (n > LONG_LEN)
                n = LONG_LEN;
            int err = bpf_probe_read_user(d->data, n, (void *)as);
            if (err < 0) {
                fl |= F_READ_FAILED;
                count(run, C_READ_FAILED);
                d->len = err;
            } else {
                d->len = n;
            }
            d->flags = fl;
            flags |= fl;
            details_long.ringbuf_submit(d, BPF_RB_NO_WAKEUP);
        } else {
            count(run, C_DETAILS_LOST);
            flags |= F_DETAIL_LOST;
        }
    }
#endif
    submit_event(run, e, ts, 0, 0, args->old_pid, tgid, tid, EV_EXEC, flags, 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 run = is_target(tgid);
    if (!run)
        return 0;
    // A thread killed inside a syscall never reaches sys_exit: free its slot so a later
    // thread reusing the tid cannot match it.
    u32 tid = (u32)id;
    u32 idx = tid & (TID_SLOTS - 1);
    struct start_t *s = starts.lookup(&idx);
    if (s && s->tid == tid)
        s->ts = 0;
    // ret: the task's wait status (code << 8, or the signal that ended it), -1 unknown. A
    // fatal signal is delivered as SIGKILL to every thread, so signal_deliver cannot say.
    s64 status = -1;
#ifdef TASK_EXIT_CODE_OFF
    int code = 0;
    if (bpf_probe_read_kernel(&code, sizeof(code),
                              (char *)bpf_get_current_task() + TASK_EXIT_CODE_OFF) == 0)
        status = code;
#endif
    emit_event(run, bpf_ktime_get_ns(), 0, status, args->group_dead, tgid, tid, EV_EXIT, 0, 0);
    return 0;
}

TRACEPOINT_PROBE(signal, signal_deliver) {
    // Only signals that can end the process: default action or SIGKILL.
    if (args->sa_handler != 0 && args->sig != 9)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 run = is_target(tgid);
    if (!run)
        return 0;
    emit_event(run, bpf_ktime_get_ns(), 0, 0, args->code, tgid, (u32)id, EV_SIGNAL, 0, args->sig);
    return 0;
}
