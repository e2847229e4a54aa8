/* The daemon's per-event hot path in one pass each: grouping a drain's event records into
 * per-process row buffers, a chunk's column work before zstd (enter-time sort, ts delta,
 * narrowing, byte shuffle), and the join of a drain's events with their queued detail
 * records (a hash join, string ids from a cache kept across drains).
 * renacerd/capture/assembly.py, renacerd/columns.py and renacerd/capture/details.py hold
 * the numpy reference of each; the stored bytes are the same. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* renacerd/records.py EVENT: 48 bytes */
typedef struct {
    uint64_t ts, dur;
    int64_t ret;
    uint64_t a0;
    uint32_t pid, tid;
    uint16_t nr, flags;
    uint32_t aux;
} event_t;

/* One buffered event of a process, the chunk's columns in a row (no pid): 56 bytes */
typedef struct {
    int64_t ts;
    uint64_t dur;
    int64_t ret;
    uint64_t a0;
    uint32_t tid;
    uint16_t nr, flags;
    int32_t s0, s1;
    uint32_t aux, mode;
} row_t;

#define ROW_SIZE ((Py_ssize_t)sizeof(row_t))

/* A 1-D buffer of n items of `itemsize` bytes, any stride. */
typedef struct {
    Py_buffer view;
    const char *base;
    Py_ssize_t n, stride;
} column_t;

static int get_column(PyObject *obj, Py_ssize_t itemsize, column_t *c, const char *what) {
    if (PyObject_GetBuffer(obj, &c->view, PyBUF_RECORDS_RO) < 0)
        return -1;
    if (c->view.ndim != 1 || c->view.itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected a 1-D array of %zd-byte items", what,
                     itemsize);
        PyBuffer_Release(&c->view);
        return -1;
    }
    c->base = c->view.buf;
    c->n = c->view.shape[0];
    c->stride = c->view.strides[0];
    return 0;
}

#define AT(c, i, type) (*(const type *)((c).base + (i) * (c).stride))

/* pid -> index of its run, open addressing (a drain holds a few processes, or thousands) */
typedef struct {
    uint32_t *keys;
    int32_t *vals;
    size_t mask;
} pidmap_t;

static int pidmap_init(pidmap_t *m, size_t want) {
    size_t cap = 16;
    while (cap < 2 * want)
        cap <<= 1;
    m->keys = malloc(cap * sizeof(uint32_t));
    m->vals = malloc(cap * sizeof(int32_t));
    if (!m->keys || !m->vals) {
        free(m->keys);
        free(m->vals);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < cap; i++)
        m->vals[i] = -1;
    m->mask = cap - 1;
    return 0;
}

static int32_t *pidmap_slot(pidmap_t *m, uint32_t pid) {
    size_t h = (pid * 0x9E3779B1u) & m->mask;
    while (m->vals[h] >= 0 && m->keys[h] != pid)
        h = (h + 1) & m->mask;
    m->keys[h] = pid;
    return &m->vals[h];
}

static void pidmap_free(pidmap_t *m) {
    free(m->keys);
    free(m->vals);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* pid_runs(ev) -> (pids, first_ts, counts): the drain's processes in ascending pid order,
 * each with the enter ts of its first record (ring order) and its number of records. */
static PyObject *pid_runs(PyObject *self, PyObject *args) {
    PyObject *ev_obj;
    if (!PyArg_ParseTuple(args, "O", &ev_obj))
        return NULL;
    column_t ev;
    if (get_column(ev_obj, sizeof(event_t), &ev, "ev") < 0)
        return NULL;
    PyObject *out = NULL;
    pidmap_t m = {0};
    uint32_t *pids = NULL;
    uint64_t *first = NULL;
    Py_ssize_t *counts = NULL;
    Py_ssize_t np_ = 0, cap = 8;
    pids = malloc(cap * sizeof *pids);
    first = malloc(cap * sizeof *first);
    counts = malloc(cap * sizeof *counts);
    if (!pids || !first || !counts || pidmap_init(&m, 64) < 0) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    uint32_t last = 0;
    Py_ssize_t last_i = -1;
    for (Py_ssize_t i = 0; i < ev.n; i++) {
        const event_t *e = (const event_t *)(ev.base + i * ev.stride);
        if (last_i >= 0 && e->pid == last) {
            counts[last_i]++;
            continue;
        }
        int32_t *slot = pidmap_slot(&m, e->pid);
        if (*slot < 0) {
            if (np_ == cap) {
                cap *= 2;
                uint32_t *p2 = realloc(pids, cap * sizeof *pids);
                if (p2)
                    pids = p2;
                uint64_t *f2 = realloc(first, cap * sizeof *first);
                if (f2)
                    first = f2;
                Py_ssize_t *c2 = realloc(counts, cap * sizeof *counts);
                if (c2)
                    counts = c2;
                if (!p2 || !f2 || !c2) {
                    PyErr_NoMemory();
                    goto done;
                }
            }
            if ((size_t)np_ * 2 >= m.mask) { /* grow the map: rehash */
                pidmap_t m2;
                if (pidmap_init(&m2, 2 * (size_t)np_ + 2) < 0)
                    goto done;
                for (Py_ssize_t k = 0; k < np_; k++)
                    *pidmap_slot(&m2, pids[k]) = (int32_t)k;
                pidmap_free(&m);
                m = m2;
                slot = pidmap_slot(&m, e->pid);
            }
            *slot = (int32_t)np_;
            pids[np_] = e->pid;
            first[np_] = e->ts;
            counts[np_] = 0;
            np_++;
        }
        last = e->pid;
        last_i = *slot;
        counts[last_i]++;
    }
    /* ascending pid order: sort the indices by pid */
    uint64_t *keyed = malloc((np_ ? np_ : 1) * sizeof *keyed);
    if (!keyed) {
        PyErr_NoMemory();
        goto done;
    }
    /* (pid, index) packed in 64 bits: pids are unique, so the order is the pids' */
    for (Py_ssize_t k = 0; k < np_; k++)
        keyed[k] = ((uint64_t)pids[k] << 32) | (uint64_t)k;
    qsort(keyed, np_, sizeof *keyed, cmp_u64);
    PyObject *lp = PyList_New(np_), *lf = PyList_New(np_), *lc = PyList_New(np_);
    if (!lp || !lf || !lc) {
        Py_XDECREF(lp);
        Py_XDECREF(lf);
        Py_XDECREF(lc);
        free(keyed);
        goto done;
    }
    for (Py_ssize_t k = 0; k < np_; k++) {
        Py_ssize_t j = (Py_ssize_t)(keyed[k] & 0xFFFFFFFFu);
        PyList_SET_ITEM(lp, k, PyLong_FromUnsignedLong(pids[j]));
        PyList_SET_ITEM(lf, k, PyLong_FromLongLong((long long)first[j]));
        PyList_SET_ITEM(lc, k, PyLong_FromSsize_t(counts[j]));
    }
    free(keyed);
    out = PyTuple_Pack(3, lp, lf, lc);
    Py_DECREF(lp);
    Py_DECREF(lf);
    Py_DECREF(lc);
done:
    pidmap_free(&m);
    free(pids);
    free(first);
    free(counts);
    PyBuffer_Release(&ev.view);
    return out;
}

/* scatter(ev, flags, s0, s1, mode, pids, bufs, skips): appends every record of pid
 * pids[k] to the bytearray bufs[k] as a row, after dropping its first skips[k] records
 * (bufs[k] None: all dropped). flags, s0, s1, mode: the drain's columns, in ring order. */
/* Set a bytearray's size, within its allocation when it fits: PyByteArray_Resize would
 * shrink a reused buffer (size under half its allocation) to exactly the size, and the
 * next drains would fault its pages in again. */
static int set_size(PyObject *b, Py_ssize_t size) {
    PyByteArrayObject *a = (PyByteArrayObject *)b;
    if (a->ob_exports == 0 && a->ob_start == a->ob_bytes && size + 1 <= a->ob_alloc) {
        Py_SET_SIZE(a, size);
        a->ob_bytes[size] = '\0';
        return 0;
    }
    return PyByteArray_Resize(b, size);
}

/* reset(buf): empty a row buffer, keeping its allocation for the next chunk. */
static PyObject *reset(PyObject *self, PyObject *arg) {
    if (!PyByteArray_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "reset: not a bytearray");
        return NULL;
    }
    PyByteArrayObject *a = (PyByteArrayObject *)arg;
    if (a->ob_exports > 0 || a->ob_start != a->ob_bytes) {
        PyErr_SetString(PyExc_BufferError, "reset: the buffer is exported or offset");
        return NULL;
    }
    if (a->ob_alloc > 0) {
        Py_SET_SIZE(a, 0);
        a->ob_bytes[0] = '\0';
    }
    Py_RETURN_NONE;
}

static PyObject *scatter(PyObject *self, PyObject *args) {
    PyObject *ev_obj, *fl_obj, *s0_obj, *s1_obj, *mode_obj, *pids_obj, *bufs_obj, *skips_obj;
    if (!PyArg_ParseTuple(args, "OOOOOO!O!O!", &ev_obj, &fl_obj, &s0_obj, &s1_obj, &mode_obj,
                          &PyList_Type, &pids_obj, &PyList_Type, &bufs_obj, &PyList_Type,
                          &skips_obj))
        return NULL;
    column_t ev, fl, s0, s1, mode;
    int got = 0;
    PyObject *result = NULL;
    pidmap_t m = {0};
    Py_ssize_t *skip = NULL;
    row_t **dst = NULL;
    if (get_column(ev_obj, sizeof(event_t), &ev, "ev") < 0)
        return NULL;
    got = 1;
    if (get_column(fl_obj, 2, &fl, "flags") < 0)
        goto out;
    got = 2;
    if (get_column(s0_obj, 4, &s0, "s0") < 0)
        goto out;
    got = 3;
    if (get_column(s1_obj, 4, &s1, "s1") < 0)
        goto out;
    got = 4;
    if (get_column(mode_obj, 4, &mode, "mode") < 0)
        goto out;
    got = 5;
    if (fl.n != ev.n || s0.n != ev.n || s1.n != ev.n || mode.n != ev.n) {
        PyErr_SetString(PyExc_ValueError, "scatter: columns of different lengths");
        goto out;
    }
    Py_ssize_t np_ = PyList_GET_SIZE(pids_obj);
    if (PyList_GET_SIZE(bufs_obj) != np_ || PyList_GET_SIZE(skips_obj) != np_) {
        PyErr_SetString(PyExc_ValueError, "scatter: pids, bufs and skips differ in length");
        goto out;
    }
    Py_ssize_t *count = calloc(np_ + 1, sizeof *count);
    skip = calloc(np_ + 1, sizeof *skip);
    dst = calloc(np_ + 1, sizeof *dst);
    if (!count || !skip || !dst || pidmap_init(&m, np_) < 0) {
        free(count);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t k = 0; k < np_; k++) {
        unsigned long pid = PyLong_AsUnsignedLong(PyList_GET_ITEM(pids_obj, k));
        skip[k] = PyLong_AsSsize_t(PyList_GET_ITEM(skips_obj, k));
        if (PyErr_Occurred()) {
            free(count);
            goto out;
        }
        *pidmap_slot(&m, (uint32_t)pid) = (int32_t)k;
    }
    for (Py_ssize_t i = 0; i < ev.n; i++) {
        int32_t *slot = pidmap_slot(&m, ((const event_t *)(ev.base + i * ev.stride))->pid);
        if (*slot < 0) {
            free(count);
            PyErr_SetString(PyExc_ValueError, "scatter: a record of a pid not in pids");
            goto out;
        }
        count[*slot]++;
    }
    /* grow each buffer once, then fill */
    for (Py_ssize_t k = 0; k < np_; k++) {
        PyObject *b = PyList_GET_ITEM(bufs_obj, k);
        Py_ssize_t keep = count[k] - skip[k];
        if (b == Py_None || keep <= 0) {
            skip[k] = count[k] + 1; /* drop them all */
            continue;
        }
        if (!PyByteArray_Check(b)) {
            free(count);
            PyErr_SetString(PyExc_TypeError, "scatter: a buffer is not a bytearray");
            goto out;
        }
        Py_ssize_t had = PyByteArray_GET_SIZE(b);
        if (set_size(b, had + keep * ROW_SIZE) < 0) {
            free(count);
            goto out;
        }
        dst[k] = (row_t *)(PyByteArray_AS_STRING(b) + had);
    }
    free(count);
    for (Py_ssize_t i = 0; i < ev.n; i++) {
        const event_t *e = (const event_t *)(ev.base + i * ev.stride);
        Py_ssize_t k = *pidmap_slot(&m, e->pid);
        if (skip[k] > 0) {
            skip[k]--;
            continue;
        }
        row_t *r = dst[k]++;
        r->ts = (int64_t)e->ts;
        r->dur = e->dur;
        r->ret = e->ret;
        r->a0 = e->a0;
        r->tid = e->tid;
        r->nr = e->nr;
        r->flags = AT(fl, i, uint16_t);
        r->s0 = AT(s0, i, int32_t);
        r->s1 = AT(s1, i, int32_t);
        r->aux = e->aux;
        r->mode = AT(mode, i, uint32_t);
    }
    result = Py_None;
    Py_INCREF(result);
out:
    pidmap_free(&m);
    free(skip);
    free(dst);
    if (got >= 5)
        PyBuffer_Release(&mode.view);
    if (got >= 4)
        PyBuffer_Release(&s1.view);
    if (got >= 3)
        PyBuffer_Release(&s0.view);
    if (got >= 2)
        PyBuffer_Release(&fl.view);
    PyBuffer_Release(&ev.view);
    return result;
}

/* A row's enter ts and its place in the chunk: sorted by ts, ties by place (stable). */
typedef struct {
    int64_t ts;
    uint32_t at, pad;
} tskey_t;

/* Merge the sorted runs a[lo, mid) and a[mid, hi) in place (tmp: room for mid - lo):
 * only the overlap moves (a chunk is sorted but for calls that crossed a drain). */
static void merge(tskey_t *a, Py_ssize_t lo, Py_ssize_t mid, Py_ssize_t hi, tskey_t *tmp) {
    if (a[mid - 1].ts <= a[mid].ts)
        return;
    /* left elements <= a[mid] stay first; right elements >= a[mid - 1] stay last */
    Py_ssize_t l = lo, r = mid;
    while (l < r) {
        Py_ssize_t m = l + (r - l) / 2;
        if (a[m].ts <= a[mid].ts)
            l = m + 1;
        else
            r = m;
    }
    Py_ssize_t i = l;
    l = mid, r = hi;
    while (l < r) {
        Py_ssize_t m = l + (r - l) / 2;
        if (a[m].ts < a[mid - 1].ts)
            l = m + 1;
        else
            r = m;
    }
    Py_ssize_t j = l;
    Py_ssize_t nl = mid - i;
    memcpy(tmp, a + i, nl * sizeof *a);
    Py_ssize_t x = 0, y = mid, o = i;
    while (x < nl && y < j)
        a[o++] = a[y].ts < tmp[x].ts ? a[y++] : tmp[x++];
    while (x < nl)
        a[o++] = tmp[x++];
    /* the rest of the right run is already in place */
}

/* Stable sort by ts: insertion sort of blocks of 32, then bottom-up in-place merges. */
static void sort_keys(tskey_t *a, Py_ssize_t n, tskey_t *tmp) {
    const Py_ssize_t B = 32;
    for (Py_ssize_t lo = 0; lo < n; lo += B) {
        Py_ssize_t hi = lo + B < n ? lo + B : n;
        for (Py_ssize_t p = lo + 1; p < hi; p++) {
            tskey_t v = a[p];
            Py_ssize_t q = p - 1;
            while (q >= lo && a[q].ts > v.ts) {
                a[q + 1] = a[q];
                q--;
            }
            a[q + 1] = v;
        }
    }
    for (Py_ssize_t w = B; w < n; w *= 2)
        for (Py_ssize_t lo = 0; lo + w < n; lo += 2 * w)
            merge(a, lo, lo + w, lo + 2 * w < n ? lo + 2 * w : n, tmp);
}

/* dtype codes of renacerd/columns.py: i1 i2 i4 i8 u1 u2 u4 u8 */
enum { C_I1, C_I2, C_I4, C_I8, C_U1, C_U2, C_U4, C_U8 };

/* the narrowest width of the same signedness holding [lo, hi] (columns.py _narrow) */
static int narrow_signed(int64_t lo, int64_t hi, int *code) {
    if (lo >= INT8_MIN && hi <= INT8_MAX) { *code = C_I1; return 1; }
    if (lo >= INT16_MIN && hi <= INT16_MAX) { *code = C_I2; return 2; }
    if (lo >= INT32_MIN && hi <= INT32_MAX) { *code = C_I4; return 4; }
    *code = C_I8;
    return 8;
}

static int narrow_unsigned(uint64_t hi, int *code) {
    if (hi <= UINT8_MAX) { *code = C_U1; return 1; }
    if (hi <= UINT16_MAX) { *code = C_U2; return 2; }
    if (hi <= UINT32_MAX) { *code = C_U4; return 4; }
    *code = C_U8;
    return 8;
}

#define NCOLS 11
/* each column's place in a row and width in it, in SYSCALL_COLUMNS order */
static const struct { size_t off; int width, code; } COLS[NCOLS] = {
    {offsetof(row_t, ts), 8, C_I8},    {offsetof(row_t, dur), 8, C_U8},
    {offsetof(row_t, ret), 8, C_I8},   {offsetof(row_t, a0), 8, C_U8},
    {offsetof(row_t, tid), 4, C_U4},   {offsetof(row_t, nr), 2, C_U2},
    {offsetof(row_t, flags), 2, C_U2}, {offsetof(row_t, s0), 4, C_I4},
    {offsetof(row_t, s1), 4, C_I4},    {offsetof(row_t, aux), 4, C_U4},
    {offsetof(row_t, mode), 4, C_U4},
};
/* v[i] byte j <-> v[j] byte i (little-endian words: byte 0 the lowest) */
static inline void transpose8(uint64_t v[8]) {
    for (int i = 0; i < 4; i++) {
        uint64_t t = ((v[i] >> 32) ^ v[i + 4]) & 0x00000000FFFFFFFFull;
        v[i] ^= t << 32;
        v[i + 4] ^= t;
    }
    static const int two[4] = {0, 1, 4, 5};
    for (int q = 0; q < 4; q++) {
        int i = two[q];
        uint64_t t = ((v[i] >> 16) ^ v[i + 2]) & 0x0000FFFF0000FFFFull;
        v[i] ^= t << 16;
        v[i + 2] ^= t;
    }
    for (int i = 0; i < 8; i += 2) {
        uint64_t t = ((v[i] >> 8) ^ v[i + 1]) & 0x00FF00FF00FF00FFull;
        v[i] ^= t << 8;
        v[i + 1] ^= t;
    }
}

/* Scratch kept between calls (grown, never freed): fresh pages for every chunk cost a
 * page fault each 4 KiB, more than the work. Used only while the GIL is held. */
static void *scratch_keys, *scratch_tmp, *scratch_rows;
static Py_ssize_t scratch_n;

static int scratch_reserve(Py_ssize_t n) {
    if (n <= scratch_n)
        return 0;
    void *k = realloc(scratch_keys, 3 * n * sizeof(tskey_t)), *t, *r;
    if (k)
        scratch_keys = k;
    t = realloc(scratch_tmp, n * sizeof(tskey_t));
    if (t)
        scratch_tmp = t;
    r = realloc(scratch_rows, n * sizeof(row_t));
    if (r)
        scratch_rows = r;
    if (!k || !t || !r) {
        PyErr_NoMemory();
        return -1;
    }
    scratch_n = n;
    return 0;
}

#define BLOCK 2048 /* rows transposed at a time: they stay in the cache for every column */

/* prepare(rows, out) -> (n, first_ts, last_ts, [(code, offset, size)] in SYSCALL_COLUMNS
 * order): a chunk's rows sorted by enter ts (stable), each column as encode() hands it to
 * zstd, written into the bytearray `out` (grown when too small, kept by the caller to
 * be reused) at `offset`: ts as deltas (the first from 0), 8-byte columns narrowed by their
 * range, every column byte-transposed (every value's byte 0, then every byte 1, ...). */
static PyObject *prepare(PyObject *self, PyObject *args) {
    Py_buffer in;
    PyObject *outbuf;
    if (!PyArg_ParseTuple(args, "y*O!", &in, &PyByteArray_Type, &outbuf))
        return NULL;
    PyObject *result = NULL, *cols = NULL;
    if (in.len % ROW_SIZE) {
        PyErr_SetString(PyExc_ValueError, "prepare: not a whole number of rows");
        goto out;
    }
    Py_ssize_t n = in.len / ROW_SIZE;
    if (n > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "prepare: too many rows");
        goto out;
    }
    const row_t *rows = in.buf;
    Py_ssize_t i = 1;
    while (i < n && rows[i].ts >= rows[i - 1].ts)
        i++;
    if (i < n) {
        if (scratch_reserve(n) < 0)
            goto out;
        /* The rows in order of a running maximum stay where they are (A); the rest, the
         * calls entered before rows already seen (B, few: calls that crossed a drain or
         * overlapped others), are sorted alone and merged in (ties by place: stable). */
        tskey_t *a = scratch_keys, *b = a + n, *t = b + n, *keys = scratch_tmp;
        Py_ssize_t na = 0, nb = 0;
        int64_t top = INT64_MIN;
        for (Py_ssize_t k = 0; k < n; k++) {
            tskey_t e = {rows[k].ts, (uint32_t)k, 0};
            if (e.ts >= top) {
                top = e.ts;
                a[na++] = e;
            } else {
                b[nb++] = e;
            }
        }
        sort_keys(b, nb, t);
        Py_ssize_t x = 0, y = 0, o = 0;
        while (x < na && y < nb)
            keys[o++] = (b[y].ts < a[x].ts || (b[y].ts == a[x].ts && b[y].at < a[x].at))
                            ? b[y++] : a[x++];
        while (x < na)
            keys[o++] = a[x++];
        while (y < nb)
            keys[o++] = b[y++];
        row_t *sorted = scratch_rows;
        for (Py_ssize_t k = 0; k < n; k++)
            sorted[k] = rows[keys[k].at];
        rows = sorted;
    }
    /* the 8-byte columns' ranges (ts: of its deltas), one pass */
    int width[NCOLS], code[NCOLS];
    for (int c = 4; c < NCOLS; c++) {
        width[c] = COLS[c].width;
        code[c] = COLS[c].code;
    }
    if (!n) {
        for (int c = 0; c < 4; c++) {
            width[c] = 8;
            code[c] = COLS[c].code;
        }
    } else {
        int64_t dlo = rows[0].ts, dhi = rows[0].ts, rlo = rows[0].ret, rhi = rows[0].ret;
        uint64_t durhi = 0, a0hi = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            int64_t d = k ? (int64_t)((uint64_t)rows[k].ts - (uint64_t)rows[k - 1].ts)
                          : rows[0].ts;
            if (d < dlo) dlo = d;
            if (d > dhi) dhi = d;
            if (rows[k].ret < rlo) rlo = rows[k].ret;
            if (rows[k].ret > rhi) rhi = rows[k].ret;
            if (rows[k].dur > durhi) durhi = rows[k].dur;
            if (rows[k].a0 > a0hi) a0hi = rows[k].a0;
        }
        width[0] = narrow_signed(dlo, dhi, &code[0]);
        width[1] = narrow_unsigned(durhi, &code[1]);
        width[2] = narrow_signed(rlo, rhi, &code[2]);
        width[3] = narrow_unsigned(a0hi, &code[3]);
    }
    uint8_t *dst[NCOLS];
    Py_ssize_t offset[NCOLS], total = 0;
    for (int c = 0; c < NCOLS; c++) {
        offset[c] = total;
        total += n * width[c];
    }
    if (PyByteArray_GET_SIZE(outbuf) < total && PyByteArray_Resize(outbuf, total) < 0)
        goto out;
    for (int c = 0; c < NCOLS; c++)
        dst[c] = (uint8_t *)PyByteArray_AS_STRING(outbuf) + offset[c];
    /* transposed a block of rows at a time (ts: its deltas, in place of the value) */
    int64_t prev = 0;
    int64_t delta[BLOCK];
    for (Py_ssize_t lo = 0; lo < n; lo += BLOCK) {
        Py_ssize_t hi = lo + BLOCK < n ? lo + BLOCK : n, m = hi - lo;
        for (Py_ssize_t k = 0; k < m; k++) {
            int64_t t = rows[lo + k].ts;
            delta[k] = (int64_t)((uint64_t)t - (uint64_t)prev);
            prev = t;
        }
        for (int c = 0; c < NCOLS; c++) {
            const uint8_t *src = c ? (const uint8_t *)(rows + lo) + COLS[c].off
                                   : (const uint8_t *)delta;
            Py_ssize_t stride = c ? ROW_SIZE : 8;
            int w = width[c], size = COLS[c].width;
            Py_ssize_t k = 0;
            /* 8 values at a time: an 8x8 byte transpose in registers, one 8-byte store
             * per byte plane */
            for (; k + 8 <= m; k += 8) {
                uint64_t v[8];
                const uint8_t *at = src + k * stride;
                if (size == 8) {
                    for (int r = 0; r < 8; r++)
                        memcpy(&v[r], at + r * stride, 8);
                } else if (size == 4) {
                    for (int r = 0; r < 8; r++) {
                        uint32_t x;
                        memcpy(&x, at + r * stride, 4);
                        v[r] = x;
                    }
                } else {
                    for (int r = 0; r < 8; r++) {
                        uint16_t x;
                        memcpy(&x, at + r * stride, 2);
                        v[r] = x;
                    }
                }
                transpose8(v);
                uint8_t *out = dst[c] + lo + k;
                for (int b = 0; b < w; b++, out += n)
                    memcpy(out, &v[b], 8);
            }
            for (int b = 0; b < w; b++) {
                uint8_t *p = dst[c] + (Py_ssize_t)b * n + lo;
                const uint8_t *s = src + b;
                for (Py_ssize_t j = k; j < m; j++)
                    p[j] = s[j * stride];
            }
        }
    }
    /* read before any allocation below: a collection it starts may run Python code that
     * lets another thread's prepare() reuse the scratch `rows` may point into */
    long long first_ts = n ? (long long)rows[0].ts : 0LL;
    long long last_ts = n ? (long long)rows[n - 1].ts : 0LL;
    cols = PyList_New(NCOLS);
    if (!cols)
        goto out;
    for (int c = 0; c < NCOLS; c++) {
        PyObject *t = Py_BuildValue("(inn)", code[c], offset[c], n * width[c]);
        if (!t)
            goto out;
        PyList_SET_ITEM(cols, c, t);
    }
    result = Py_BuildValue("(nLLO)", n, first_ts, last_ts, cols);
out:
    Py_XDECREF(cols);
    PyBuffer_Release(&in);
    return result;
}

/* ---- the detail join ---------------------------------------------------------------- */

/* renacerd/records.py detail_dtype: a 24-byte head, then the string field */
typedef struct {
    uint64_t ts;
    uint32_t tid;
    uint16_t nr;
    uint8_t slot, flags;
    int32_t len;
    uint32_t pad;
} detail_t;

#define DETAIL_HEAD ((Py_ssize_t)sizeof(detail_t))
enum { SLOT_PATH1 = 1, SLOT_ADDR = 2 }; /* renacerd/records.py SLOT_* */

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDull;
    h ^= h >> 33;
    return h;
}

static uint64_t hash_bytes(const char *p, size_t n, uint64_t seed) {
    uint64_t h = seed ^ (n * 0x9E3779B97F4A7C15ull);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 29;
    }
    if (i < n) {
        uint64_t w = 0;
        memcpy(&w, p + i, n - i);
        h = (h ^ w) * 0x9E3779B97F4A7C15ull;
    }
    return mix64(h);
}

/* One cached string: a path's bytes (kind 0), or an address's length and bytes (kind 1). */
typedef struct {
    uint64_t hash;
    char *bytes; /* NULL: an empty slot */
    uint32_t len;
    int32_t n, id;
    int kind;
} centry_t;

/* StringCache(miss): string ids of detail payloads, kept across drains; a payload not seen
 * before is handed to miss(slot, n, payload) -> id (the run's interning). */
typedef struct {
    PyObject_HEAD
    PyObject *miss;
    centry_t *tab, *last; /* last: the entry found last (NULL after a growth) */
    size_t mask, used;
} cache_t;

static void cache_dealloc(cache_t *c) {
    if (c->tab) {
        for (size_t i = 0; i <= c->mask; i++)
            free(c->tab[i].bytes);
        free(c->tab);
    }
    Py_XDECREF(c->miss);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int cache_init(cache_t *c, PyObject *args, PyObject *kw) {
    PyObject *miss;
    if (!PyArg_ParseTuple(args, "O", &miss))
        return -1;
    if (!PyCallable_Check(miss)) {
        PyErr_SetString(PyExc_TypeError, "StringCache: miss must be callable");
        return -1;
    }
    if (!c->tab) {
        c->tab = calloc(1024, sizeof *c->tab);
        if (!c->tab) {
            PyErr_NoMemory();
            return -1;
        }
        c->mask = 1023;
    }
    Py_INCREF(miss);
    Py_XSETREF(c->miss, miss);
    return 0;
}

static centry_t *cache_probe(centry_t *tab, size_t mask, uint64_t h, int kind, int32_t n,
                             const char *p, uint32_t len) {
    size_t i = h & mask;
    for (;; i = (i + 1) & mask) {
        centry_t *e = &tab[i];
        if (!e->bytes)
            return e;
        if (e->hash == h && e->kind == kind && e->n == n && e->len == len &&
            !memcmp(e->bytes, p, len))
            return e;
    }
}

static int cache_grow(cache_t *c) {
    size_t cap = 2 * (c->mask + 1);
    centry_t *tab = calloc(cap, sizeof *tab);
    if (!tab) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i <= c->mask; i++) {
        centry_t *e = &c->tab[i];
        if (!e->bytes)
            continue;
        size_t k = e->hash & (cap - 1);
        while (tab[k].bytes)
            k = (k + 1) & (cap - 1);
        tab[k] = *e;
    }
    free(c->tab);
    c->tab = tab;
    c->last = NULL;
    c->mask = cap - 1;
    return 0;
}

/* The id of one detail's payload (-1: a slot with no string id here), interning it through
 * miss() on first sight. The payload is what the numpy path keys on: a path's bytes before
 * its NUL as numpy's S field gives them (trailing NULs of the whole field dropped), an
 * address's first n bytes with its length. */
static int cache_id(cache_t *c, const detail_t *d, const char *data, Py_ssize_t width,
                    int32_t *id) {
    int slot = d->slot, kind;
    int32_t n = d->len, key_n;
    Py_ssize_t m;
    if (slot <= SLOT_PATH1) {
        kind = 0;
        key_n = 0;
        m = n > 0 ? (n - 1 < width ? n - 1 : width) : 0;
        if (m > 0 && !data[m - 1]) {
            /* bytes past m all NUL: numpy dropped them, and the NULs before m with them */
            Py_ssize_t k = m;
            while (k < width && !data[k])
                k++;
            if (k == width)
                while (m > 0 && !data[m - 1])
                    m--;
        }
    } else if (slot == SLOT_ADDR) {
        kind = 1;
        key_n = n;
        m = n > 0 ? (n < width ? n : width) : 0;
    } else {
        *id = -1;
        return 0;
    }
    /* a call's details often name the path of the call before (open, then stat) */
    centry_t *last = c->last;
    if (last && last->kind == kind && last->n == key_n && last->len == (uint32_t)m &&
        !memcmp(last->bytes, data, (size_t)m)) {
        *id = last->id;
        return 0;
    }
    uint64_t h = hash_bytes(data, (size_t)m, (uint64_t)kind << 32 ^ (uint32_t)key_n);
    centry_t *e = cache_probe(c->tab, c->mask, h, kind, key_n, data, (uint32_t)m);
    if (e->bytes) {
        c->last = e;
        *id = e->id;
        return 0;
    }
    PyObject *r = PyObject_CallFunction(c->miss, "iiy#", slot, (int)n, data, m);
    if (!r)
        return -1;
    long v = PyLong_AsLong(r);
    Py_DECREF(r);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (2 * (c->used + 1) > c->mask + 1) {
        if (cache_grow(c) < 0)
            return -1;
    }
    /* miss() may have run Python code, never this cache's: the table is as it was */
    e = cache_probe(c->tab, c->mask, h, kind, key_n, data, (uint32_t)m);
    e->bytes = malloc(m ? (size_t)m : 1);
    if (!e->bytes) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(e->bytes, data, (size_t)m);
    e->hash = h;
    e->len = (uint32_t)m;
    e->n = key_n;
    e->kind = kind;
    e->id = (int32_t)v;
    c->used++;
    c->last = e;
    *id = (int32_t)v;
    return 0;
}

static PyTypeObject CacheType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "renacerd._hot.StringCache",
    .tp_basicsize = sizeof(cache_t),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "String ids of detail payloads kept across drains (miss(slot, n, payload) "
              "-> id interns a new one).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)cache_init,
    .tp_dealloc = (destructor)cache_dealloc,
};

/* A matched detail: its event's key, its place in the queue, its event. */
typedef struct {
    uint64_t ts;
    uint32_t tid, det;
    Py_ssize_t ev;
} hit_t;

static inline int hit_before(const hit_t *a, const hit_t *b) {
    return a->tid < b->tid || (a->tid == b->tid && a->ts < b->ts);
}

/* Stable sort by (tid, ts) (ties keep queue order): insertion sort of blocks of 32, then
 * bottom-up merges that skip runs already in order (one thread's details come in order). */
static void sort_hits(hit_t *a, Py_ssize_t n, hit_t *tmp) {
    const Py_ssize_t B = 32;
    for (Py_ssize_t lo = 0; lo < n; lo += B) {
        Py_ssize_t hi = lo + B < n ? lo + B : n;
        for (Py_ssize_t p = lo + 1; p < hi; p++) {
            hit_t v = a[p];
            Py_ssize_t q = p - 1;
            while (q >= lo && hit_before(&v, &a[q])) {
                a[q + 1] = a[q];
                q--;
            }
            a[q + 1] = v;
        }
    }
    for (Py_ssize_t w = B; w < n; w *= 2)
        for (Py_ssize_t lo = 0; lo + w < n; lo += 2 * w) {
            Py_ssize_t mid = lo + w, hi = lo + 2 * w < n ? lo + 2 * w : n;
            if (!hit_before(&a[mid], &a[mid - 1]))
                continue;
            memcpy(tmp, a + lo, w * sizeof *a);
            Py_ssize_t x = 0, y = mid, o = lo;
            while (x < w && y < hi)
                a[o++] = hit_before(&a[y], &tmp[x]) ? a[y++] : tmp[x++];
            while (x < w)
                a[o++] = tmp[x++];
        }
}

/* (tid, ts) -> the first event with that key, open addressing */
typedef struct {
    uint64_t ts;
    uint32_t tid, used;
    Py_ssize_t ev;
} evkey_t;

static inline size_t key_hash(uint32_t tid, uint64_t ts) {
    return (size_t)mix64(ts * 0x9E3779B97F4A7C15ull ^ tid);
}

/* join(tid, ts, recs, cache) -> (events, details, ids, left, slot, len, flags, pad): the
 * queued detail records `recs` of events (tid[i], ts[i]), as numpy's lexsort join orders
 * them (by tid, enter ts, then queue order): each one's event index (intp), its index in
 * recs (intp), its string id (int32, through cache) and its record's fields (u1, i4, u1,
 * u4); `left`: the indices of the details no event claimed (intp), in queue order. All as
 * bytes. */
static PyObject *join(PyObject *self, PyObject *args) {
    PyObject *tid_obj, *ts_obj, *recs_obj;
    cache_t *cache;
    if (!PyArg_ParseTuple(args, "OOOO!", &tid_obj, &ts_obj, &recs_obj, &CacheType, &cache))
        return NULL;
    column_t tid, ts;
    Py_buffer recs;
    int got = 0;
    PyObject *result = NULL, *bev = NULL, *bdet = NULL, *bid = NULL, *bleft = NULL;
    PyObject *bslot = NULL, *blen = NULL, *bflags = NULL, *bpad = NULL;
    evkey_t *map = NULL;
    hit_t *hits = NULL, *tmp = NULL;
    if (get_column(tid_obj, 4, &tid, "tid") < 0)
        return NULL;
    got = 1;
    if (get_column(ts_obj, 8, &ts, "ts") < 0)
        goto out;
    got = 2;
    if (PyObject_GetBuffer(recs_obj, &recs, PyBUF_RECORDS_RO) < 0)
        goto out;
    got = 3;
    if (recs.ndim != 1 || recs.itemsize <= DETAIL_HEAD || recs.strides[0] != recs.itemsize) {
        PyErr_SetString(PyExc_ValueError, "join: recs must be contiguous detail records");
        goto out;
    }
    if (tid.n != ts.n) {
        PyErr_SetString(PyExc_ValueError, "join: tid and ts differ in length");
        goto out;
    }
    Py_ssize_t ne = tid.n, nd = recs.shape[0], w = recs.itemsize;
    if (nd > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "join: too many details");
        goto out;
    }
    size_t cap = 16;
    while (cap < 2 * (size_t)ne)
        cap <<= 1;
    map = calloc(cap, sizeof *map);
    hits = malloc((nd ? nd : 1) * sizeof *hits);
    tmp = malloc((nd ? nd : 1) * sizeof *tmp);
    if (!map || !hits || !tmp) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < ne; i++) {
        uint32_t t = AT(tid, i, uint32_t);
        uint64_t s = AT(ts, i, uint64_t);
        size_t h = key_hash(t, s) & (cap - 1);
        while (map[h].used && (map[h].tid != t || map[h].ts != s))
            h = (h + 1) & (cap - 1);
        if (!map[h].used) {
            map[h] = (evkey_t){s, t, 1, i};
        }
    }
    const char *base = recs.buf;
    Py_ssize_t nh = 0, nleft = 0;
    for (Py_ssize_t k = 0; k < nd; k++) {
        const detail_t *d = (const detail_t *)(base + k * w);
        Py_ssize_t ev = -1;
        if (ne) {
            size_t h = key_hash(d->tid, d->ts) & (cap - 1);
            while (map[h].used && (map[h].tid != d->tid || map[h].ts != d->ts))
                h = (h + 1) & (cap - 1);
            if (map[h].used)
                ev = map[h].ev;
        }
        if (ev >= 0)
            hits[nh++] = (hit_t){d->ts, d->tid, (uint32_t)k, ev};
        else
            tmp[nleft++].det = (uint32_t)k; /* tmp: the waiting ones until the sort */
    }
    bleft = PyBytes_FromStringAndSize(NULL, nleft * (Py_ssize_t)sizeof(Py_ssize_t));
    if (!bleft)
        goto out;
    Py_ssize_t *left = (Py_ssize_t *)PyBytes_AS_STRING(bleft);
    for (Py_ssize_t k = 0; k < nleft; k++)
        left[k] = tmp[k].det;
    sort_hits(hits, nh, tmp);
    bev = PyBytes_FromStringAndSize(NULL, nh * (Py_ssize_t)sizeof(Py_ssize_t));
    bdet = PyBytes_FromStringAndSize(NULL, nh * (Py_ssize_t)sizeof(Py_ssize_t));
    bid = PyBytes_FromStringAndSize(NULL, nh * (Py_ssize_t)sizeof(int32_t));
    bslot = PyBytes_FromStringAndSize(NULL, nh);
    blen = PyBytes_FromStringAndSize(NULL, nh * (Py_ssize_t)sizeof(int32_t));
    bflags = PyBytes_FromStringAndSize(NULL, nh);
    bpad = PyBytes_FromStringAndSize(NULL, nh * (Py_ssize_t)sizeof(uint32_t));
    if (!bev || !bdet || !bid || !bslot || !blen || !bflags || !bpad)
        goto out;
    Py_ssize_t *oev = (Py_ssize_t *)PyBytes_AS_STRING(bev);
    Py_ssize_t *odet = (Py_ssize_t *)PyBytes_AS_STRING(bdet);
    int32_t *oid = (int32_t *)PyBytes_AS_STRING(bid), *olen = (int32_t *)PyBytes_AS_STRING(blen);
    uint8_t *oslot = (uint8_t *)PyBytes_AS_STRING(bslot);
    uint8_t *oflags = (uint8_t *)PyBytes_AS_STRING(bflags);
    uint32_t *opad = (uint32_t *)PyBytes_AS_STRING(bpad);
    for (Py_ssize_t k = 0; k < nh; k++) {
        const char *rec = base + (Py_ssize_t)hits[k].det * w;
        const detail_t *d = (const detail_t *)rec;
        oev[k] = hits[k].ev;
        odet[k] = hits[k].det;
        oslot[k] = d->slot;
        olen[k] = d->len;
        oflags[k] = d->flags;
        opad[k] = d->pad;
        if (cache_id(cache, d, rec + DETAIL_HEAD, w - DETAIL_HEAD, &oid[k]) < 0)
            goto out;
    }
    result = PyTuple_Pack(8, bev, bdet, bid, bleft, bslot, blen, bflags, bpad);
out:
    Py_XDECREF(bslot);
    Py_XDECREF(blen);
    Py_XDECREF(bflags);
    Py_XDECREF(bpad);
    Py_XDECREF(bev);
    Py_XDECREF(bdet);
    Py_XDECREF(bid);
    Py_XDECREF(bleft);
    free(map);
    free(hits);
    free(tmp);
    if (got >= 3)
        PyBuffer_Release(&recs);
    if (got >= 2)
        PyBuffer_Release(&ts.view);
    PyBuffer_Release(&tid.view);
    return result;
}

static PyMethodDef methods[] = {
    {"pid_runs", pid_runs, METH_VARARGS,
     "(pids, first enter ts, counts) of a drain's event records, pids ascending."},
    {"scatter", scatter, METH_VARARGS,
     "Append a drain's records to their processes' row buffers."},
    {"reset", reset, METH_O, "Empty a row buffer, keeping its allocation."},
    {"prepare", prepare, METH_VARARGS,
     "A chunk's rows as sorted, delta-coded, narrowed, shuffled columns."},
    {"join", join, METH_VARARGS,
     "Queued detail records matched to a drain's events, with their string ids."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "renacerd._hot",
    "Compiled hot path of the capture loop (numpy reference: renacerd.capture.assembly).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__hot(void) {
    if (PyType_Ready(&CacheType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&CacheType);
    if (PyModule_AddObject(m, "StringCache", (PyObject *)&CacheType) < 0) {
        Py_DECREF(&CacheType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "ROW_SIZE", (long)ROW_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
