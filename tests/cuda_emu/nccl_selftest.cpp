// Checks the emulated NCCL (nccl.cpp over driver.cpp) through the NCCL and
// driver APIs, ranks as threads of this process. build_driver.sh runs it
// after building libnccl.so, lazy and eager. Usage:
//   nccl_selftest               the ring pattern of the crate's NCCL transport and matching by issue order
//   nccl_selftest mismatch      a send and its receive differ in count: must abort naming both
//   nccl_selftest deadlock      every rank sends, then receives, outside a group: must abort naming the deadlock
//   nccl_selftest left          a receive from a rank that aborted its communicator: must abort naming it
//   nccl_selftest race          a receive into a buffer another stream reads, unordered: must abort naming the race
#include <cuda.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

extern "C" {
typedef struct {
    char internal[128];
} ncclUniqueId;
typedef struct ncclComm* ncclComm_t;
int ncclGetUniqueId(ncclUniqueId*);
int ncclCommInitRank(ncclComm_t*, int, ncclUniqueId, int);
int ncclCommAbort(ncclComm_t);
int ncclCommDestroy(ncclComm_t);
int ncclCommCount(ncclComm_t, int*);
int ncclCommUserRank(ncclComm_t, int*);
int ncclGroupStart();
int ncclGroupEnd();
int ncclSend(const void*, size_t, int, int, ncclComm_t, CUstream);
int ncclRecv(void*, size_t, int, int, ncclComm_t, CUstream);
}

namespace {

constexpr int kFloat32 = 7;
int failures = 0;

void check(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "nccl emulator selftest: FAILED: %s\n", what);
        ++failures;
    }
}

#define OK(call) check((call) == 0, #call)

// Runs body(rank, comm) on `n` threads, one rank each, then waits for them.
void ranks(int n, const std::function<void(int, ncclComm_t)>& body) {
    ncclUniqueId id;
    OK(ncclGetUniqueId(&id));
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r)
        threads.emplace_back([&, r] {
            CUcontext ctx;
            OK(cuDevicePrimaryCtxRetain(&ctx, 0));
            OK(cuCtxSetCurrent(ctx));
            ncclComm_t comm = nullptr;
            OK(ncclCommInitRank(&comm, n, id, r));
            int count = 0, rank = -1;
            OK(ncclCommCount(comm, &count));
            OK(ncclCommUserRank(comm, &rank));
            check(count == n && rank == r, "the communicator's size and rank");
            body(r, comm);
        });
    for (auto& t : threads) t.join();
}

CUdeviceptr floats(CUstream s, float v, size_t n) {
    CUdeviceptr p;
    OK(cuMemAlloc(&p, n * 4));
    std::vector<float> host(n, v);
    OK(cuMemcpyHtoDAsync(p, host.data(), n * 4, s));
    return p;
}

float first_float(CUdeviceptr p) {
    float x = 0;
    OK(cuMemcpyDtoH(&x, p, 4));
    return x;
}

CUstream stream() {
    CUstream s;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    return s;
}

// Each rank sends to r + 1 and receives from r - 1 in one group, twice in a
// row, the second time a block it received; then receives two messages from
// one peer, matched in issue order.
void ring(int n) {
    ranks(n, [n](int r, ncclComm_t comm) {
        const int next = (r + 1) % n, prev = (r + n - 1) % n;
        CUstream s = stream();
        CUdeviceptr x = floats(s, float(r + 1), 64), y = floats(s, NAN, 64), z = floats(s, NAN, 64);
        for (int step = 0; step < 2; ++step) {
            OK(ncclGroupStart());
            OK(ncclSend(step == 0 ? reinterpret_cast<void*>(x) : reinterpret_cast<void*>(y), 64, kFloat32, next, comm, s));
            OK(ncclRecv(reinterpret_cast<void*>(step == 0 ? y : z), 64, kFloat32, prev, comm, s));
            OK(ncclGroupEnd());
        }
        // Two sends to the next rank, in one group: matched in issue order.
        CUdeviceptr a = floats(s, 10.0f * (r + 1), 8), b = floats(s, 100.0f * (r + 1), 8);
        CUdeviceptr pa = floats(s, NAN, 8), pb = floats(s, NAN, 8);
        OK(ncclGroupStart());
        OK(ncclSend(reinterpret_cast<void*>(a), 8, kFloat32, next, comm, s));
        OK(ncclSend(reinterpret_cast<void*>(b), 8, kFloat32, next, comm, s));
        OK(ncclRecv(reinterpret_cast<void*>(pa), 8, kFloat32, prev, comm, s));
        OK(ncclRecv(reinterpret_cast<void*>(pb), 8, kFloat32, prev, comm, s));
        OK(ncclGroupEnd());
        OK(cuStreamSynchronize(s));
        check(first_float(y) == float(prev + 1), "a block received from the previous rank");
        check(first_float(z) == float((prev + n - 1) % n + 1), "a block forwarded by the previous rank");
        check(first_float(pa) == 10.0f * (prev + 1) && first_float(pb) == 100.0f * (prev + 1),
              "sends and receives of one pair matched in issue order");
        OK(ncclCommAbort(comm));
    });
}

}  // namespace

int main(int argc, char** argv) {
    OK(cuInit(0));
    const char* mode = argc > 1 ? argv[1] : "";
    if (std::strcmp(mode, "mismatch") == 0) {
        ranks(2, [](int r, ncclComm_t comm) {
            CUstream s = stream();
            CUdeviceptr x = floats(s, 1.0f, 4);
            if (r == 0) OK(ncclSend(reinterpret_cast<void*>(x), 4, kFloat32, 1, comm, s));
            else OK(ncclRecv(reinterpret_cast<void*>(x), 3, kFloat32, 0, comm, s));
            OK(cuStreamSynchronize(s));
        });
    } else if (std::strcmp(mode, "deadlock") == 0) {
        ranks(2, [](int r, ncclComm_t comm) {
            CUstream s = stream();
            CUdeviceptr x = floats(s, 1.0f, 4), y = floats(s, 1.0f, 4);
            OK(ncclSend(reinterpret_cast<void*>(x), 4, kFloat32, 1 - r, comm, s));
            OK(ncclRecv(reinterpret_cast<void*>(y), 4, kFloat32, 1 - r, comm, s));
            OK(cuStreamSynchronize(s));
        });
    } else if (std::strcmp(mode, "left") == 0) {
        ranks(2, [](int r, ncclComm_t comm) {
            if (r == 0) {
                OK(ncclCommAbort(comm));
                return;
            }
            CUstream s = stream();
            CUdeviceptr y = floats(s, 1.0f, 4);
            OK(ncclRecv(reinterpret_cast<void*>(y), 4, kFloat32, 0, comm, s));
            OK(cuStreamSynchronize(s));
        });
    } else if (std::strcmp(mode, "race") == 0) {
        ranks(2, [](int r, ncclComm_t comm) {
            CUstream s = stream(), t = stream();
            CUdeviceptr x = floats(s, 1.0f, 4), y = floats(s, 1.0f, 4);
            OK(cuStreamSynchronize(s));
            if (r == 0) {
                OK(ncclSend(reinterpret_cast<void*>(x), 4, kFloat32, 1, comm, s));
            } else {
                OK(ncclRecv(reinterpret_cast<void*>(y), 4, kFloat32, 0, comm, s));
                std::fprintf(stderr, "nccl emulator selftest: the next operation races:\n");
                cuMemcpyDtoDAsync(x, y, 16, t);  // reads what the receive writes, unordered: aborts
            }
            OK(cuStreamSynchronize(s));
        });
    } else {
        for (int n : {1, 2, 3, 4}) ring(n);
        if (failures) return 1;
        const char* schedule = std::getenv("FRUGAL_EMU_SCHEDULE");
        std::fprintf(stderr, "nccl emulator selftest: ok (schedule %s)\n", schedule && *schedule ? schedule : "lazy");
        return 0;
    }
    std::fprintf(stderr, "nccl emulator selftest: FAILED: %s was not reported\n", mode);
    return 1;
}
