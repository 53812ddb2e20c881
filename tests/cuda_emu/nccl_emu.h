// The emulated driver's interface for the emulated NCCL: nccl.cpp (libnccl.so)
// calls these functions of driver.cpp (libcuda.so) to queue point-to-point
// transfers on the driver's deferred streams. Not part of any NVIDIA API.
//
// A group's sends and receives on one stream form one operation of that
// stream. A send of rank a to rank b and the receive of rank b from rank a
// are matched in issue order per communicator and pair (the k-th send of a
// to b with the k-th receive of b from a, as NCCL matches them); the copy
// runs once both their operations have been reached by their streams (each
// at the head of its stream's queue, its waits satisfied), and an operation
// completes once all of its copies ran. For the race check a send reads its
// buffer on the sender's stream and a receive writes its buffer on the
// receiver's stream.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>

extern "C" {

// One send or receive.
struct FrugalEmuP2p {
    uint64_t comm;      // the communicator, the same number on all its ranks
    int self, peer;     // this rank; the rank sent to or received from
    int send;           // 1: a send, reads [ptr, ptr + count * elem_bytes); 0: a receive, writes it
    CUdeviceptr ptr;
    size_t count;       // elements
    size_t elem_bytes;
    const char* type;   // the element type's name (a static string), for messages
};

// Queues the `n` sends and receives of one group on stream `s` as one
// operation. CUDA_ERROR_INVALID_VALUE when a buffer is not device memory.
// A send and receive that match but differ in count or type, or a receive
// whose buffer overlaps another buffer of the same group, abort the process
// with a message naming both.
CUresult frugal_emu_p2p_group(CUstream s, const FrugalEmuP2p* ops, size_t n);

// The calling thread issues the work of rank `rank` of `comm` (ncclCommInitRank):
// when every rank's thread waits on the driver for a transfer that no rank
// has issued, the driver reports a deadlock instead of waiting forever.
void frugal_emu_p2p_join(uint64_t comm, int rank);

// Rank `rank` left `comm` (ncclCommDestroy when `destroy`, else
// ncclCommAbort): a transfer with it that is not issued yet can never run,
// and a wait for one aborts naming it. A destroy with transfers of its own
// still unmatched aborts too (NCCL's would wait for them forever).
void frugal_emu_p2p_leave(uint64_t comm, int rank, int destroy);

}  // extern "C"
