/* Stub of the CUDA driver API (libcuda.so.1): the real symbols with the real signatures
 * (cuda.h, CUDA 12/13), no GPU. Device memory is a fake address range; allocations are
 * tracked so freeing an unknown pointer fails like the real driver. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct CUfunc_st *CUfunction;
typedef struct CUmod_st *CUmodule;
typedef struct CUstream_st *CUstream;
typedef struct CUgraphExec_st *CUgraphExec;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct CUmemAllocationProp_st CUmemAllocationProp;
typedef struct CUlaunchAttribute_st CUlaunchAttribute;
typedef struct CUlaunchConfig_st {
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    CUstream hStream;
    CUlaunchAttribute *attrs;
    unsigned int numAttrs;
} CUlaunchConfig;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define MAX_ALLOCS 4096
#define DEV_BASE 0x7e0000000000ULL

static CUdeviceptr live[MAX_ALLOCS];
static CUdeviceptr next_ptr = DEV_BASE;
volatile unsigned long long stub_launches, stub_bytes;

static CUresult track(CUdeviceptr *out, size_t size) {
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (!live[i]) {
            live[i] = next_ptr;
            *out = next_ptr;
            next_ptr += (size + 0xFFFF) & ~0xFFFFULL;
            return CUDA_SUCCESS;
        }
    }
    return 2; /* CUDA_ERROR_OUT_OF_MEMORY */
}

static CUresult untrack(CUdeviceptr p) {
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (p && live[i] == p) {
            live[i] = 0;
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_INVALID_VALUE;
}

static CUresult launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                       unsigned bz) {
    stub_launches += (gx && gy && gz && bx && by && bz) ? 1 : 0;
    return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                        unsigned int gridDimZ, unsigned int blockDimX, unsigned int blockDimY,
                        unsigned int blockDimZ, unsigned int sharedMemBytes, CUstream hStream,
                        void **kernelParams, void **extra) {
    (void)f; (void)sharedMemBytes; (void)hStream; (void)kernelParams; (void)extra;
    return launch(gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ);
}

CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                             unsigned int gridDimZ, unsigned int blockDimX,
                             unsigned int blockDimY, unsigned int blockDimZ,
                             unsigned int sharedMemBytes, CUstream hStream,
                             void **kernelParams, void **extra) {
    (void)f; (void)sharedMemBytes; (void)hStream; (void)kernelParams; (void)extra;
    return launch(gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ) + 0;
}

CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **kernelParams,
                          void **extra) {
    (void)f; (void)kernelParams; (void)extra;
    return launch(config->gridDimX, config->gridDimY, config->gridDimZ, config->blockDimX,
                  config->blockDimY, config->blockDimZ);
}

CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream) {
    return hGraphExec ? CUDA_SUCCESS : (hStream ? CUDA_ERROR_INVALID_VALUE : 400);
}

CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t ByteCount) {
    stub_bytes += ByteCount + (dst == src);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t ByteCount, CUstream hStream) {
    stub_bytes += ByteCount + (dst == src) + (hStream != 0);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount) {
    stub_bytes += ByteCount + (dstDevice == 0) + (srcHost == 0);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount,
                              CUstream hStream) {
    stub_bytes += ByteCount + (dstDevice == 0) + (srcHost == 0) + (hStream != 0);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount) {
    stub_bytes += ByteCount + (dstHost == 0) + (srcDevice == 0);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoHAsync_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount,
                              CUstream hStream) {
    stub_bytes += ByteCount + (dstHost == 0) + (srcDevice == 0) + (hStream != 0);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoD_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount) {
    stub_bytes += ByteCount + (dstDevice == srcDevice);
    return CUDA_SUCCESS;
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount,
                              CUstream hStream) {
    stub_bytes += ByteCount + (dstDevice == srcDevice) + (hStream != 0);
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize) {
    if (!dptr || !bytesize)
        return CUDA_ERROR_INVALID_VALUE;
    return track(dptr, bytesize);
}

CUresult cuMemFree_v2(CUdeviceptr dptr) { return untrack(dptr); }

CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                     const CUmemAllocationProp *prop, unsigned long long flags) {
    (void)prop; (void)flags;
    static CUmemGenericAllocationHandle h = 0x4000;
    if (!handle || !size)
        return CUDA_ERROR_INVALID_VALUE;
    *handle = ++h;
    return CUDA_SUCCESS;
}

CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset,
                  CUmemGenericAllocationHandle handle, unsigned long long flags) {
    (void)offset; (void)flags;
    return ptr && size && handle ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* A function handle derived from the name, as stable as a real module's. */
CUresult cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name) {
    (void)hmod;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const char *p = name; *p; p++)
        h = (h ^ (unsigned char)*p) * 0x100000001b3ULL;
    *hfunc = (CUfunction)(uintptr_t)(0x5f0000000000ULL | (h & 0xFFFFFFF0ULL));
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream hStream) { return hStream == (CUstream)1 ? 400 : 0; }

CUresult cuCtxSynchronize(void) { return stub_launches == ~0ULL ? 1 : CUDA_SUCCESS; }
