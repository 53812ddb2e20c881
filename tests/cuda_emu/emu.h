// A CPU emulator for this crate's CUDA kernels, so their source runs (and is
// checked against a reference) on a machine without a GPU.
//
// The kernel file is compiled as plain C++ (g++ -std=c++20) after this header:
// every CUDA thread of a block is a fiber, __syncthreads is a block barrier,
// and warp collectives (shuffles, ballots, and in ptx_emu.h ldmatrix, mma.sync
// and cp.async) exchange values through a per-warp area between two warp
// barriers. Blocks run one after another, so shared memory is one static
// buffer per kernel file (the extern one poisoned with 0xff bytes, NaN,
// before each block). Threads that return early leave the barriers, as exited
// threads stop counting on the GPU; a barrier some threads never reach aborts.
//
// What it checks: indexing, masking, fragment layouts as the PTX ISA defines
// them, the cp.async group discipline (copies land only at the wait that
// covers them), barrier placement that would deadlock, and (run again with
// FRUGAL_EMU_ORDER=reverse, warps or warps-reverse) shared-memory races
// that the order of threads decides. What it cannot: timing, races that
// need a finer interleaving than whole runs between barriers, exact
// rounding of the tensor-core accumulation order, registers and occupancy
// (the driver checks the shared-memory limit).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <ucontext.h>

#include <functional>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Static __shared__ arrays become function-local statics (one per block, as
// blocks run one at a time); a file whose shared memory is `extern
// __shared__` (blockwise.cu) defines FRUGAL_EMU_EXTERN_SHARED first and
// provides the arrays itself.
#ifdef FRUGAL_EMU_EXTERN_SHARED
#define __shared__
#else
#define __shared__ static
#endif
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define FRUGAL_CUDA_EMU 1

namespace emu {

struct Dim {
    unsigned x = 1, y = 1, z = 1;
};

// A barrier of `expected` participants; a participant that returns drops out.
// Waiting is cooperative (see Fiber): a waiter resumes once `gen` moves on.
struct Barrier {
    int expected = 0, arrived = 0;
    unsigned gen = 0;
    void arrive_and_wait();
    void arrive_and_drop() {
        --expected;
        if (arrived > 0 && arrived == expected) release();
    }
    void release() {
        arrived = 0;
        ++gen;
    }
};

struct Warp {
    Barrier bar;
    uint32_t u[32][8];
    const void* p[32];
    float f[32];
};

// cp.async copies of one thread, in commit groups (used by ptx_emu.h).
struct CpAsyncQueue {
    std::vector<std::pair<void*, const void*>> open;
    std::vector<std::vector<std::pair<void*, const void*>>> groups;
};

struct Ctx {
    Dim thread, block;
    Barrier* block_bar = nullptr;
    Warp* warp = nullptr;
    int lane = 0;
    CpAsyncQueue* cp = nullptr;
};

// The running CUDA thread's context (set by the scheduler before each resume).
inline Ctx ctx;

// Every CUDA thread of a block is a fiber (ucontext) on one host thread;
// the scheduler resumes, round robin, each fiber whose barrier has released
// (in the order FRUGAL_EMU_ORDER picks: see order()), so runs are
// deterministic and a barrier that some threads never reach is reported
// instead of hanging. A fiber runs until its next barrier or warp collective.
struct Fiber {
    ucontext_t uc;
    std::unique_ptr<char[]> stack;
    Ctx ctx;
    CpAsyncQueue cp;
    const unsigned* wait_gen = nullptr;  // resumable once *wait_gen != wait_val
    unsigned wait_val = 0;
    bool done = false;
};

inline ucontext_t scheduler;
inline Fiber* current = nullptr;
inline std::function<void()>* body = nullptr;
constexpr size_t kStackBytes = 256 << 10;

inline void Barrier::arrive_and_wait() {
    if (++arrived == expected) {
        release();
        return;
    }
    current->wait_gen = &gen;
    current->wait_val = gen;
    swapcontext(&current->uc, &scheduler);
}

inline void warp_sync() { ctx.warp->bar.arrive_and_wait(); }

inline void fiber_entry() {
    Fiber* f = current;
    (*body)();
    f->ctx.warp->bar.arrive_and_drop();
    f->ctx.block_bar->arrive_and_drop();
    f->done = true;  // returns to the scheduler through uc_link
}

inline Dim grid_dim, block_dim;

// FRUGAL_EMU_ORDER picks the order in which the scheduler resumes a block's
// fibers, so that a thread reading shared memory another thread wrote with
// no barrier between them sees a different value in one of the orders:
//   forward (default)  round robin in thread order, each fiber up to its next
//                      barrier or warp collective (thread 0 first);
//   reverse            the same, last thread first;
//   warps              one warp at a time runs alone until it waits at a block
//                      barrier or ends, in warp order: a warp runs ahead of the
//                      later ones by any number of warp collectives;
//   warps-reverse      the same, last warp (and lane) first.
struct Order {
    bool reverse = false, warp_serial = false;
};
inline const Order& order() {
    static const Order o = [] {
        const char* e = std::getenv("FRUGAL_EMU_ORDER");
        const std::string v = e ? e : "";
        if (v.empty() || v == "forward") return Order{};
        if (v == "reverse") return Order{true, false};
        if (v == "warps") return Order{false, true};
        if (v == "warps-reverse") return Order{true, true};
        std::fprintf(stderr, "cuda emulator: FRUGAL_EMU_ORDER=%s: expected forward, reverse, warps or warps-reverse\n", e);
        std::abort();
    }();
    return o;
}

// Runs every block of the grid in order, its threads as fibers. `smem` (the
// file's `extern __shared__` buffer, if any) is poisoned with 0xff bytes
// (NaN) before each block.
template <typename K, typename... A>
void launch(Dim grid, Dim block, unsigned char* smem, size_t smem_bytes, K kernel, A... args) {
    grid_dim = grid;
    block_dim = block;
    const int n = static_cast<int>(block.x * block.y * block.z);
    std::vector<Fiber> fibers(n);
    for (auto& f : fibers) f.stack.reset(new char[kStackBytes]);
    std::function<void()> run = [&] { kernel(args...); };
    body = &run;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                if (smem) std::memset(smem, 0xff, smem_bytes);
                Barrier block_bar{n};
                std::vector<Warp> warps((n + 31) / 32);
                for (size_t w = 0; w < warps.size(); ++w) warps[w].bar.expected = std::min(32, n - 32 * (int)w);
                for (int t = 0; t < n; ++t) {
                    Fiber& f = fibers[t];
                    f.cp = CpAsyncQueue{};
                    f.ctx = Ctx{Dim{static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                                    static_cast<unsigned>(t / (block.x * block.y))},
                                Dim{bx, by, bz}, &block_bar, &warps[t / 32], t % 32, &f.cp};
                    f.wait_gen = nullptr;
                    f.done = false;
                    getcontext(&f.uc);
                    f.uc.uc_stack.ss_sp = f.stack.get();
                    f.uc.uc_stack.ss_size = kStackBytes;
                    f.uc.uc_link = &scheduler;
                    makecontext(&f.uc, fiber_entry, 0);
                }
                int left = n;
                // Resumes fiber t if it may run; false if it is done or waits at a barrier.
                auto resume = [&](int t) {
                    Fiber& f = fibers[t];
                    if (f.done || (f.wait_gen && *f.wait_gen == f.wait_val)) return false;
                    f.wait_gen = nullptr;
                    ctx = f.ctx;
                    current = &f;
                    swapcontext(&scheduler, &f.uc);
                    if (f.done) --left;
                    return true;
                };
                const Order& o = order();
                const int warps_n = (n + 31) / 32;
                while (left > 0) {
                    bool progress = false;
                    if (!o.warp_serial) {
                        for (int i = 0; i < n; ++i) progress |= resume(o.reverse ? n - 1 - i : i);
                    } else {
                        for (int i = 0; i < warps_n; ++i) {
                            const int w = o.reverse ? warps_n - 1 - i : i, lanes = std::min(32, n - 32 * w);
                            for (bool any = true; any;) {
                                any = false;
                                for (int l = 0; l < lanes; ++l) any |= resume(32 * w + (o.reverse ? lanes - 1 - l : l));
                                progress |= any;
                            }
                        }
                    }
                    if (!progress) {
                        std::fprintf(stderr, "cuda emulator: block (%u, %u, %u): %d threads wait at a barrier the others never reach\n",
                                     bx, by, bz, left);
                        std::abort();
                    }
                }
            }
    body = nullptr;
}

}  // namespace emu

#define threadIdx (emu::ctx.thread)
#define blockIdx (emu::ctx.block)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::ctx.block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }

template <typename T>
T emu_shfl_from(T v, int src) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    auto& w = *emu::ctx.warp;
    std::memcpy(&w.u[emu::ctx.lane][0], &v, 4);
    emu::warp_sync();
    T r;
    std::memcpy(&r, &w.u[src & 31][0], 4);
    emu::warp_sync();
    return r;
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
    const int lane = emu::ctx.lane;
    return emu_shfl_from(v, lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane);
}
inline unsigned __ballot_sync(unsigned, int pred) {
    auto& w = *emu::ctx.warp;
    w.u[emu::ctx.lane][0] = pred != 0;
    emu::warp_sync();
    unsigned r = 0;
    for (int l = 0; l < 32; ++l) r |= w.u[l][0] << l;
    emu::warp_sync();
    return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
template <typename T>
T __ldg(const T* p) {
    return *p;
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
    return emu_shfl_from(v, emu::ctx.lane ^ mask);
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
    return emu_shfl_from(v, src);
}

inline float __int_as_float(int x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline float __uint_as_float(unsigned x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline int __float_as_int(float f) {
    int x;
    std::memcpy(&x, &f, 4);
    return x;
}
inline unsigned __float_as_uint(float f) {
    unsigned x;
    std::memcpy(&x, &f, 4);
    return x;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
using std::isfinite;
using std::isnan;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
