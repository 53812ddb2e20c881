// An emulated NCCL: a libnccl.so with the entry points that cudarc's `nccl`
// module loads for this crate's NCCL ring (ring::nccl::NcclRing), over the
// emulated CUDA driver (driver.cpp). With it and the emulated libcuda.so first
// on LD_LIBRARY_PATH, several ranks, each a thread of one process on the one
// emulated device, run the crate's NCCL transport. Built by build_driver.sh.
//
// Communicators: ncclGetUniqueId makes an id naming this process;
// ncclCommInitRank blocks until every rank of the id has joined (as NCCL
// does), for at most FRUGAL_EMU_NCCL_TIMEOUT seconds (default 300). The ranks
// of one communicator must be threads of one process.
//
// Point-to-point: ncclSend and ncclRecv, alone or between ncclGroupStart and
// ncclGroupEnd. A group's sends and receives on one stream are queued as one
// operation of the driver's deferred stream (nccl_emu.h): a send and its
// receive (matched per communicator and pair in issue order, as NCCL matches
// them) copy once both their streams have reached them, and a group completes
// once all its copies ran, so every rank may send before it receives within
// a group. The driver's adversarial order and race check cover these copies:
// a send reads its buffer on the sender's stream, a receive writes its buffer
// on the receiver's stream. A match whose count or type differs aborts naming
// both sides; a host wait for a transfer whose match is never issued aborts
// once its peer left, once every rank's thread waits the same way (a
// deadlock), or after FRUGAL_EMU_NCCL_TIMEOUT seconds.
//
// Not emulated: collectives (their symbols are absent: cudarc panics naming
// the missing symbol), ncclCommInitAll, split and config variants,
// nonblocking communicators, groups spanning several streams (refused with
// ncclInvalidUsage), registration, and anything about the real transports:
// network, shared memory, NVLink, several processes or machines, timing.
#include <cuda.h>

#include "nccl_emu.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unistd.h>
#include <vector>

extern "C" {

// NCCL 2.30's types, as nccl.h (and cudarc's bindings) define them.
typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
    ncclTimeout = 8,
    ncclNumResults = 9
} ncclResult_t;

typedef enum {
    ncclInt8 = 0,
    ncclUint8 = 1,
    ncclInt32 = 2,
    ncclUint32 = 3,
    ncclInt64 = 4,
    ncclUint64 = 5,
    ncclFloat16 = 6,
    ncclFloat32 = 7,
    ncclFloat64 = 8,
    ncclBfloat16 = 9,
    ncclFloat8e4m3 = 10,
    ncclFloat8e5m2 = 11,
    ncclNumTypes = 12
} ncclDataType_t;

typedef struct {
    char internal[128];
} ncclUniqueId;

struct ncclComm;
typedef struct ncclComm* ncclComm_t;

}  // extern "C"

// One rank's handle.
struct ncclComm {
    uint64_t id;  // the communicator, shared by its ranks
    int rank, nranks, device;
};

namespace {

constexpr char kMagic[16] = "frugal-nccl-emu";
constexpr int kVersion = 23000;  // NCCL 2.30.0, the version cudarc's bindings are for

double timeout_seconds() {
    const char* s = std::getenv("FRUGAL_EMU_NCCL_TIMEOUT");
    return s && *s ? std::atof(s) : 300.0;
}

thread_local std::string last_error;

ncclResult_t error(ncclResult_t r, const std::string& why) {
    last_error = why;
    std::fprintf(stderr, "nccl emulator: %s\n", why.c_str());
    return r;
}

// Communicators being formed or formed, by unique id.
struct Forming {
    int nranks = 0;
    uint64_t id = 0;
    std::vector<bool> joined;
    int count = 0;
};
std::mutex init_mutex;
std::condition_variable init_cv;
std::map<std::string, Forming> forming;
std::atomic<uint64_t> next_id{1};

// The sends and receives of this thread's open group (or of one call outside a group).
struct Queued {
    FrugalEmuP2p p;
    CUstream stream;
};
thread_local int group_depth = 0;
thread_local std::vector<Queued> group;

bool element(ncclDataType_t t, size_t* bytes, const char** name) {
    static const struct {
        size_t bytes;
        const char* name;
    } types[] = {{1, "int8"},    {1, "uint8"},   {4, "int32"},    {4, "uint32"},     {8, "int64"},      {8, "uint64"},
                 {2, "float16"}, {4, "float32"}, {8, "float64"},  {2, "bfloat16"},   {1, "float8e4m3"}, {1, "float8e5m2"}};
    if (unsigned(t) >= sizeof types / sizeof types[0]) return false;
    *bytes = types[t].bytes;
    *name = types[t].name;
    return true;
}

// Queues the group's transfers: one operation on its stream.
ncclResult_t issue() {
    std::vector<Queued> ops = std::move(group);
    group.clear();
    if (ops.empty()) return ncclSuccess;
    std::vector<FrugalEmuP2p> p2p;
    for (const Queued& q : ops) {
        if (q.stream != ops[0].stream)
            return error(ncclInvalidUsage, "a group with transfers on several streams (the emulator supports one stream per group)");
        p2p.push_back(q.p);
    }
    if (frugal_emu_p2p_group(ops[0].stream, p2p.data(), p2p.size()) != CUDA_SUCCESS)
        return error(ncclInvalidArgument, "a send or receive buffer is not device memory of the emulated driver");
    return ncclSuccess;
}

ncclResult_t p2p(bool send, const void* buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, CUstream stream) {
    FrugalEmuP2p p{};
    if (!comm) return error(ncclInvalidArgument, send ? "ncclSend: no communicator" : "ncclRecv: no communicator");
    if (!element(type, &p.elem_bytes, &p.type)) return error(ncclInvalidArgument, "unknown data type " + std::to_string(int(type)));
    if (peer < 0 || peer >= comm->nranks)
        return error(ncclInvalidArgument, "peer " + std::to_string(peer) + " of " + std::to_string(comm->nranks) + " ranks");
    if (!buf && count) return error(ncclInvalidArgument, "a null buffer");
    p.comm = comm->id;
    p.self = comm->rank;
    p.peer = peer;
    p.send = send;
    p.ptr = reinterpret_cast<CUdeviceptr>(buf);
    p.count = count;
    group.push_back({p, stream});
    return group_depth > 0 ? ncclSuccess : issue();
}

}  // namespace

extern "C" {

ncclResult_t ncclGetVersion(int* version) {
    if (!version) return ncclInvalidArgument;
    *version = kVersion;
    return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
        case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
        case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
        case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        case ncclTimeout: return "timeout";
        default: return "unknown result code";
    }
}

const char* ncclGetLastError(ncclComm_t) { return last_error.c_str(); }

// 128 bytes: a magic string, this process's id and a counter.
ncclResult_t ncclGetUniqueId(ncclUniqueId* out) {
    if (!out) return ncclInvalidArgument;
    std::memset(out, 0, sizeof *out);
    std::memcpy(out->internal, kMagic, sizeof kMagic);
    const int64_t pid = getpid();
    const uint64_t n = next_id++;
    const int64_t t = std::chrono::steady_clock::now().time_since_epoch().count();
    std::memcpy(out->internal + 16, &pid, 8);
    std::memcpy(out->internal + 24, &n, 8);
    std::memcpy(out->internal + 32, &t, 8);
    return ncclSuccess;
}

// Blocks until all `nranks` ranks of `id` have joined.
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    if (!comm) return error(ncclInvalidArgument, "ncclCommInitRank: no communicator pointer");
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return error(ncclInvalidArgument, "ncclCommInitRank: rank " + std::to_string(rank) + " of " + std::to_string(nranks));
    if (std::memcmp(id.internal, kMagic, sizeof kMagic) != 0)
        return error(ncclInvalidArgument, "ncclCommInitRank: not a unique id of the emulated NCCL (from ncclGetUniqueId)");
    int64_t pid;
    std::memcpy(&pid, id.internal + 16, 8);
    if (pid != getpid())
        return error(ncclInvalidUsage, "ncclCommInitRank: the id was made by process " + std::to_string(pid) +
                                           ": the emulator's ranks must be threads of the process that made it");
    CUdevice device = 0;
    if (cuCtxGetDevice(&device) != CUDA_SUCCESS) device = 0;
    std::unique_lock<std::mutex> lock(init_mutex);
    Forming& f = forming[std::string(id.internal, sizeof id.internal)];
    if (f.nranks == 0) {
        f.nranks = nranks;
        f.id = next_id++;
        f.joined.assign(nranks, false);
    }
    if (f.nranks != nranks)
        return error(ncclInvalidUsage, "ncclCommInitRank: rank " + std::to_string(rank) + " says " + std::to_string(nranks) +
                                           " ranks, an earlier rank of the same id " + std::to_string(f.nranks));
    if (f.joined[rank])
        return error(ncclInvalidUsage, "ncclCommInitRank: rank " + std::to_string(rank) + " joined this id twice");
    f.joined[rank] = true;
    ++f.count;
    const uint64_t cid = f.id;
    frugal_emu_p2p_join(cid, rank);
    init_cv.notify_all();
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_seconds());
    if (!init_cv.wait_until(lock, deadline, [&f] { return f.count == f.nranks; }))
        return error(ncclSystemError, "ncclCommInitRank: rank " + std::to_string(rank) + " waited over FRUGAL_EMU_NCCL_TIMEOUT seconds: " +
                                          std::to_string(f.count) + " of " + std::to_string(nranks) + " ranks joined");
    *comm = new ncclComm{cid, rank, nranks, device};
    return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) { return comm ? ncclSuccess : ncclInvalidArgument; }

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return ncclInvalidArgument;
    frugal_emu_p2p_leave(comm->id, comm->rank, 1);
    delete comm;
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (!comm) return ncclInvalidArgument;
    frugal_emu_p2p_leave(comm->id, comm->rank, 0);
    delete comm;
    return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* err) {
    if (!comm || !err) return ncclInvalidArgument;
    *err = ncclSuccess;
    return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
    if (!comm || !count) return ncclInvalidArgument;
    *count = comm->nranks;
    return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device) {
    if (!comm || !device) return ncclInvalidArgument;
    *device = comm->device;
    return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
    if (!comm || !rank) return ncclInvalidArgument;
    *rank = comm->rank;
    return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
    ++group_depth;
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
    if (group_depth == 0) return error(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    return --group_depth > 0 ? ncclSuccess : issue();
}

ncclResult_t ncclSend(const void* buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, CUstream stream) {
    return p2p(true, buf, count, type, peer, comm, stream);
}

ncclResult_t ncclRecv(void* buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, CUstream stream) {
    return p2p(false, buf, count, type, peer, comm, stream);
}

}  // extern "C"
