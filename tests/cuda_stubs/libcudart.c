/* Stub of the CUDA runtime (libcudart.so.12 and its copies): the real symbols with the
 * real signatures (cuda_runtime_api.h, crt/host_runtime.h). Like the real runtime it
 * dlopens the driver (libcuda.so.1) and forwards launches, copies and allocations to it,
 * so a launch passes through a runtime and a driver probe on one thread. */
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef int cudaError_t;
typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
typedef struct CUgraphExec_st *cudaGraphExec_t;
typedef struct CUkern_st *cudaKernel_t;
typedef struct { unsigned int x, y, z; } dim3;
typedef struct { unsigned int x, y, z; } uint3;
typedef struct cudaLaunchAttribute_st cudaLaunchAttribute;
typedef struct {
    dim3 gridDim;
    dim3 blockDim;
    size_t dynamicSmemBytes;
    cudaStream_t stream;
    cudaLaunchAttribute *attrs;
    unsigned int numAttrs;
} cudaLaunchConfig_t;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};

typedef int (*launch_fn)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                         unsigned, void *, void **, void **);
typedef int (*copy_fn)(uint64_t, uint64_t, size_t);
typedef int (*alloc_fn)(uint64_t *, size_t);
typedef int (*free_fn)(uint64_t);
typedef int (*sync_fn)(void);

static struct {
    launch_fn launch;
    copy_fn copy, htod, dtoh, dtod;
    alloc_fn alloc;
    free_fn free;
    sync_fn sync;
} drv;

static int driver(void) {
    if (drv.launch)
        return 0;
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!h) {
        fprintf(stderr, "stub cudart: %s\n", dlerror());
        return 35; /* cudaErrorInsufficientDriver */
    }
    drv.copy = (copy_fn)dlsym(h, "cuMemcpy");
    drv.htod = (copy_fn)dlsym(h, "cuMemcpyHtoD_v2");
    drv.dtoh = (copy_fn)dlsym(h, "cuMemcpyDtoH_v2");
    drv.dtod = (copy_fn)dlsym(h, "cuMemcpyDtoD_v2");
    drv.alloc = (alloc_fn)dlsym(h, "cuMemAlloc_v2");
    drv.free = (free_fn)dlsym(h, "cuMemFree_v2");
    drv.sync = (sync_fn)dlsym(h, "cuCtxSynchronize");
    drv.launch = (launch_fn)dlsym(h, "cuLaunchKernel");
    return 0;
}

/* cudaKernel_t handles are opaque: derive them from the host stub, reversibly. */
#define HANDLE_XOR 0x00000a5a5a500000ULL

static const void *entry_of(const void *func) {
    uintptr_t f = (uintptr_t)func;
    return (f >> 40) == 0xa5 ? (const void *)((f ^ HANDLE_XOR) & ~(0xa5ULL << 40)) : func;
}

cudaError_t cudaLaunchKernel(const void *func, dim3 gridDim, dim3 blockDim, void **args,
                             size_t sharedMem, cudaStream_t stream) {
    int e = driver();
    if (e)
        return e;
    return drv.launch((void *)entry_of(func), gridDim.x, gridDim.y, gridDim.z, blockDim.x,
                      blockDim.y, blockDim.z, (unsigned)sharedMem, stream, args, NULL);
}

cudaError_t cudaLaunchKernel_ptsz(const void *func, dim3 gridDim, dim3 blockDim, void **args,
                                  size_t sharedMem, cudaStream_t stream) {
    int e = driver();
    if (e)
        return e;
    return drv.launch((void *)entry_of(func), gridDim.x, gridDim.y, gridDim.z, blockDim.x,
                      blockDim.y, blockDim.z, (unsigned)sharedMem, stream, args, NULL);
}

cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t *config, const void *func,
                                void **args) {
    return cudaLaunchKernel(func, config->gridDim, config->blockDim, args,
                            config->dynamicSmemBytes, config->stream);
}

cudaError_t cudaLaunchKernelExC_ptsz(const cudaLaunchConfig_t *config, const void *func,
                                     void **args) {
    return cudaLaunchKernel_ptsz(func, config->gridDim, config->blockDim, args,
                                 config->dynamicSmemBytes, config->stream);
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t graphExec, cudaStream_t stream) {
    return graphExec ? 0 : (stream ? 1 : 400);
}

cudaError_t cudaGraphLaunch_ptsz(cudaGraphExec_t graphExec, cudaStream_t stream) {
    return graphExec ? 0 : (stream ? 1 : 401);
}

static cudaError_t copy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind) {
    int e = driver();
    if (e)
        return e;
    uint64_t d = (uintptr_t)dst, s = (uintptr_t)src;
    switch (kind) {
    case cudaMemcpyHostToDevice: return drv.htod(d, s, count);
    case cudaMemcpyDeviceToHost: return drv.dtoh(d, s, count);
    case cudaMemcpyDeviceToDevice: return drv.dtod(d, s, count);
    case cudaMemcpyHostToHost: case cudaMemcpyDefault: return drv.copy(d, s, count);
    }
    return 21; /* cudaErrorInvalidMemcpyDirection */
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind) {
    return copy(dst, src, count, kind);
}

cudaError_t cudaMemcpy_ptds(void *dst, const void *src, size_t count,
                            enum cudaMemcpyKind kind) {
    return copy(dst, src, count, kind) + 0 * (int)(uintptr_t)dst;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t stream) {
    (void)stream;
    return copy(dst, src, count, kind);
}

cudaError_t cudaMemcpyAsync_ptsz(void *dst, const void *src, size_t count,
                                 enum cudaMemcpyKind kind, cudaStream_t stream) {
    return stream == (cudaStream_t)1 ? 400 : copy(dst, src, count, kind);
}

cudaError_t cudaMalloc(void **devPtr, size_t size) {
    int e = driver();
    if (e)
        return e;
    uint64_t p = 0;
    e = drv.alloc(&p, size);
    if (e)
        return 2; /* cudaErrorMemoryAllocation */
    *devPtr = (void *)(uintptr_t)p;
    return 0;
}

cudaError_t cudaMallocAsync(void **devPtr, size_t size, cudaStream_t hStream) {
    (void)hStream;
    return cudaMalloc(devPtr, size);
}

cudaError_t cudaMallocAsync_ptsz(void **devPtr, size_t size, cudaStream_t hStream) {
    return hStream == (cudaStream_t)1 ? 400 : cudaMalloc(devPtr, size);
}

cudaError_t cudaFree(void *devPtr) {
    int e = driver();
    if (e)
        return e;
    if (!devPtr)
        return 0; /* freeing NULL succeeds, as in CUDA */
    return drv.free((uintptr_t)devPtr) ? 1 /* cudaErrorInvalidValue */ : 0;
}

cudaError_t cudaFreeAsync(void *devPtr, cudaStream_t hStream) {
    (void)hStream;
    return cudaFree(devPtr);
}

cudaError_t cudaFreeAsync_ptsz(void *devPtr, cudaStream_t hStream) {
    return hStream == (cudaStream_t)1 ? 400 : cudaFree(devPtr);
}

cudaError_t cudaDeviceSynchronize(void) {
    int e = driver();
    return e ? e : drv.sync();
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) { return stream == (cudaStream_t)1; }

cudaError_t cudaStreamSynchronize_ptsz(cudaStream_t stream) {
    return stream == (cudaStream_t)1 ? 400 : 0;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) { return event ? 0 : 400; }

/* Like the real runtime, choosing a device initialises the driver. */
cudaError_t cudaSetDevice(int device) {
    int e = driver();
    return e ? e : (device < 0 || device > 7 ? 101 : 0);
}

void **__cudaRegisterFatBinary(void *fatCubin) {
    static void *handle[2];
    handle[0] = fatCubin;
    return handle;
}

void __cudaRegisterFatBinaryEnd(void **fatCubinHandle) { (void)fatCubinHandle; }

void __cudaRegisterFunction(void **fatCubinHandle, const char *hostFun, char *deviceFun,
                            const char *deviceName, int thread_limit, uint3 *tid, uint3 *bid,
                            dim3 *bDim, dim3 *gDim, int *wSize) {
    (void)fatCubinHandle; (void)hostFun; (void)deviceFun; (void)deviceName;
    (void)thread_limit; (void)tid; (void)bid; (void)bDim; (void)gDim; (void)wSize;
}

/* CUDA 13: launches pass this opaque handle instead of the host stub. */
cudaError_t __cudaGetKernel(cudaKernel_t *kernelPtr, const void *entryFuncAddr) {
    if (!kernelPtr || !entryFuncAddr)
        return 1;
    *kernelPtr = (cudaKernel_t)(((uintptr_t)entryFuncAddr ^ HANDLE_XOR) | (0xa5ULL << 40));
    return 0;
}
