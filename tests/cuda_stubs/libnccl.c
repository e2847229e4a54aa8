/* Stub of NCCL (libnccl.so.2): the real symbols with the real signatures (nccl.h 2.x). */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int ncclResult_t;
typedef struct ncclComm *ncclComm_t;
typedef struct CUstream_st *cudaStream_t;
typedef int ncclDataType_t;
typedef int ncclRedOp_t;
#define NCCL_UNIQUE_ID_BYTES 128
typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;

struct ncclComm {
    int nranks, rank;
    char id[NCCL_UNIQUE_ID_BYTES];
};

volatile unsigned long long stub_elems;

/* Like NCCL's bootstrap handle: a random 8-byte magic first (each communicator its own),
 * then fixed bytes standing for the root's address. */
ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId) {
    FILE *f = fopen("/dev/urandom", "rb");
    if (!f || fread(uniqueId->internal, 1, 8, f) != 8) {
        if (f)
            fclose(f);
        return 2; /* ncclSystemError */
    }
    fclose(f);
    for (int i = 8; i < NCCL_UNIQUE_ID_BYTES; i++)
        uniqueId->internal[i] = (char)i;
    return 0;
}

/* The id arrives by value: 128 bytes in memory, so rank is the 3rd integer register. */
ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank) {
    if (!comm || nranks < 1 || rank < 0 || rank >= nranks)
        return 4; /* ncclInvalidArgument */
    struct ncclComm *c = calloc(1, sizeof(*c));
    if (!c)
        return 1;
    c->nranks = nranks;
    c->rank = rank;
    memcpy(c->id, commId.internal, NCCL_UNIQUE_ID_BYTES);
    *comm = c;
    return 0;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    free(comm);
    return 0;
}

static ncclResult_t coll(ncclComm_t comm, size_t count) {
    if (!comm)
        return 4;
    stub_elems += count;
    return 0;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream) {
    (void)sendbuff; (void)recvbuff; (void)datatype; (void)op; (void)stream;
    return coll(comm, count);
}

ncclResult_t ncclReduceScatter(const void *sendbuff, void *recvbuff, size_t recvcount,
                               ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                               cudaStream_t stream) {
    (void)sendbuff; (void)recvbuff; (void)datatype; (void)op; (void)stream;
    return coll(comm, recvcount) + 0;
}

ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount,
                           ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream) {
    (void)sendbuff; (void)recvbuff; (void)datatype; (void)stream;
    return coll(comm, sendcount);
}

ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count,
                           ncclDataType_t datatype, int root, ncclComm_t comm,
                           cudaStream_t stream) {
    (void)sendbuff; (void)recvbuff; (void)datatype; (void)stream;
    return root < 0 ? 4 : coll(comm, count);
}

ncclResult_t ncclBcast(void *buff, size_t count, ncclDataType_t datatype, int root,
                       ncclComm_t comm, cudaStream_t stream) {
    (void)buff; (void)datatype; (void)stream;
    return root < 0 ? 4 : coll(comm, count);
}

ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
    (void)sendbuff; (void)datatype; (void)stream;
    return peer < 0 ? 4 : coll(comm, count);
}

ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
    (void)recvbuff; (void)datatype; (void)stream;
    return peer < 0 ? 4 : coll(comm, count) + 0;
}
