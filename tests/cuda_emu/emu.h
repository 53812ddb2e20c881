// A CPU emulator for this crate's CUDA kernels, so their source runs (and is
// checked against a reference) on a machine without a GPU.
//
// The kernel file is compiled as plain C++ (g++ -std=c++20) after this header:
// every CUDA thread of a block is a host thread, __syncthreads is a block
// barrier, and warp collectives (shuffles, and in ptx_emu.h ldmatrix, mma.sync
// and cp.async) exchange values through a per-warp area between two warp
// barriers. Blocks run one after another, so shared memory is one static
// buffer per kernel file, poisoned with 0xff bytes (NaN) before each block.
// Threads that return early leave the barriers (arrive_and_drop), as exited
// threads stop counting on the GPU.
//
// What it checks: indexing, masking, fragment layouts as the PTX ISA defines
// them, the cp.async group discipline (copies land only at the wait that
// covers them), barrier placement that would deadlock. What it cannot: timing,
// races between threads that happen to be ordered here, exact rounding of
// the tensor-core accumulation order, resource limits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
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

struct Warp {
    explicit Warp(int lanes) : bar(lanes) {}
    std::barrier<> bar;
    uint32_t u[32][8];
    const void* p[32];
    float f[32];
};

struct Ctx {
    Dim thread, block;
    std::barrier<>* block_bar = nullptr;
    Warp* warp = nullptr;
    int lane = 0;
};

inline thread_local Ctx ctx;
inline Dim grid_dim, block_dim;

// Both exchanges of a collective: publish, wait, read, wait (so the area is
// free again before anyone publishes the next value).
inline void warp_sync() { ctx.warp->bar.arrive_and_wait(); }

// Runs every block of the grid in order with one host thread per CUDA thread
// (spawned once per launch). Each block gets fresh barriers, since a thread
// that returns early drops out of its block's; a launch-wide barrier that
// nobody drops separates the blocks.
template <typename K, typename... A>
void launch(Dim grid, Dim block, unsigned char* smem, size_t smem_bytes, K kernel, A... args) {
    grid_dim = grid;
    block_dim = block;
    const int n = static_cast<int>(block.x * block.y * block.z);
    const size_t blocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
    struct BlockSync {
        explicit BlockSync(int n) : bar(n) {
            for (int w = 0; w < (n + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>(std::min(32, n - 32 * w)));
        }
        std::barrier<> bar;
        std::vector<std::unique_ptr<Warp>> warps;
    };
    std::vector<std::unique_ptr<BlockSync>> sync;
    for (size_t i = 0; i < blocks; ++i) sync.push_back(std::make_unique<BlockSync>(n));
    std::barrier<> between(n);
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (int t = 0; t < n; ++t)
        threads.emplace_back([&, t] {
            for (size_t i = 0; i < blocks; ++i) {
                if (t == 0 && smem) std::memset(smem, 0xff, smem_bytes);
                between.arrive_and_wait();
                BlockSync& bs = *sync[i];
                ctx.thread = Dim{static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                                 static_cast<unsigned>(t / (block.x * block.y))};
                ctx.block = Dim{static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                                static_cast<unsigned>(i / (static_cast<size_t>(grid.x) * grid.y))};
                ctx.block_bar = &bs.bar;
                ctx.warp = bs.warps[t / 32].get();
                ctx.lane = t % 32;
                kernel(args...);
                ctx.warp->bar.arrive_and_drop();
                bs.bar.arrive_and_drop();
                between.arrive_and_wait();  // the block is done before the next one's shared memory is poisoned
            }
        });
    for (auto& th : threads) th.join();
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
