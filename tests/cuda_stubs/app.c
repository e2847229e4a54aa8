/* A program shaped like nvcc's output, against the stub runtime: host stubs named by the
 * kernels' mangled names, registration, launches with known values, copies, allocations.
 * Built twice by the tests: linked to libcudart.so.12, and with cudart linked statically.
 * It initialises CUDA, prints "ready", waits for a line on stdin (the tracer attaches meanwhile), then runs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* nvcc puts every program's device code in a .nv_fatbin section; renacerd looks for it
 * before scanning an object's symbols for a statically linked runtime. */
__attribute__((section(".nv_fatbin"), used)) static const unsigned char fatbin[16] = {
    0x50, 0xed, 0x55, 0xba, 0x01, 0x00, 0x10, 0x00};

typedef int cudaError_t;
typedef struct CUstream_st *cudaStream_t;
typedef struct CUkern_st *cudaKernel_t;
typedef struct { unsigned int x, y, z; } dim3;
typedef struct { unsigned int x, y, z; } uint3;

cudaError_t cudaLaunchKernel(const void *func, dim3 gridDim, dim3 blockDim, void **args,
                             size_t sharedMem, cudaStream_t stream);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, int kind);
cudaError_t cudaMalloc(void **devPtr, size_t size);
cudaError_t cudaFree(void *devPtr);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaSetDevice(int device);
void **__cudaRegisterFatBinary(void *fatCubin);
void __cudaRegisterFunction(void **fatCubinHandle, const char *hostFun, char *deviceFun,
                            const char *deviceName, int thread_limit, uint3 *tid, uint3 *bid,
                            dim3 *bDim, dim3 *gDim, int *wSize);
cudaError_t __cudaGetKernel(cudaKernel_t *kernelPtr, const void *entryFuncAddr);

static int failures;

/* nvcc names the host stub of `__global__ void vecAdd(float*, float*, int)` _Z6vecAddPfS_i */
void vecAdd(float *a, float *b, int n) __asm__("_Z6vecAddPfS_i");
void saxpy(float a, float *x, float *y) __asm__("_Z5saxpyfPfS_");

__attribute__((noinline)) void vecAdd(float *a, float *b, int n) {
    void *args[] = {&a, &b, &n};
    dim3 g = {1, 2, 3}, bl = {4, 5, 6};
    failures += cudaLaunchKernel((const void *)vecAdd, g, bl, args, 48, (cudaStream_t)0x30) != 0;
}

__attribute__((noinline)) void saxpy(float a, float *x, float *y) {
    void *args[] = {&a, &x, &y};
    dim3 g = {1, 2, 3}, bl = {4, 5, 6};
    failures += cudaLaunchKernel((const void *)saxpy, g, bl, args, 48, (cudaStream_t)0x30) != 0;
}

int main(void) {
    char line[16];
    if (cudaSetDevice(0) != 0) /* loads the driver, as a program's CUDA init does */
        return 2;
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 3;
    /* what nvcc's __sti____cudaRegisterAll does; only vecAdd is registered, so saxpy's
     * name can only come from the ELF symbol table */
    void **h = __cudaRegisterFatBinary((void *)0);
    __cudaRegisterFunction(h, (const char *)vecAdd, "_Z6vecAddPfS_i", "_Z6vecAddPfS_i", -1,
                           0, 0, 0, 0, 0);
    for (int i = 0; i < 3; i++)
        vecAdd(0, 0, 1024);
    for (int i = 0; i < 2; i++)
        saxpy(2.0f, 0, 0);
    /* CUDA 13: launch through the opaque handle of the host stub */
    cudaKernel_t k = 0;
    failures += __cudaGetKernel(&k, (const void *)vecAdd) != 0;
    dim3 g = {1, 2, 3}, bl = {4, 5, 6};
    failures += cudaLaunchKernel((const void *)k, g, bl, 0, 48, (cudaStream_t)0x30) != 0;

    void *dbuf = 0, *leak = 0;
    char *host = calloc(1, 1 << 20);
    failures += cudaMalloc(&dbuf, 1 << 20) != 0;
    failures += cudaMemcpy(dbuf, host, 1 << 20, 1) != 0;          /* 1 MiB H2D */
    failures += cudaMemcpy(host, dbuf, 512 << 10, 2) != 0;        /* 512 KiB D2H */
    failures += cudaDeviceSynchronize() != 0;
    failures += cudaFree(dbuf) != 0;
    failures += cudaFree((void *)0xbad0) != 1;                    /* must fail */
    failures += cudaMalloc(&leak, 256) != 0;                      /* left at exit */
    printf("done %p %p %d\n", dbuf, leak, failures);
    free(host);
    return failures;
}
