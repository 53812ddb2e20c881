// Cross-layer KV mapping (src/crosslayer): masked attention of a chunk of
// queries over one (possibly ring-buffer) KV slot, and the slot write.
//
//   xl_attend_*: grid (queries, q_heads, batch), block 128. The keys query
//     i = q_pos[b] + t sees form one interval [lo, hi) of positions (causal,
//     strict, full, window and ring bounds are all intervals); the block walks
//     it in tiles of 128 keys: each thread scores one key of the tile, then
//     every thread folds the tile into its output columns d = tid + 128 k
//     (online softmax in f32). No key: the row is 0. A plain slot whose length
//     exceeds its rows: the row is NaN. Same algorithm as xl_attend in
//     kernels-wgsl/crosslayer.wgsl (64-key tiles there).
//   xl_write_*: grid (tokens * kv_heads, batch), block 128. Copies new K/V
//     rows to the slot row of position start[b] + t (p % rows in a ring slot;
//     skipped when a plain slot cannot hold p).
//
// Offsets and positions are 64-bit.
#include "common.cuh"

// Mirrors the #[repr(C)] structs in src/crosslayer/cuda.rs; passed by value, last arg.
struct XlAttnParams {
    long long q_stride[3];  // b, t, h
    long long k_stride[3];  // b, g, row
    long long v_stride[3];
    long long o_stride[3];  // b, t, h
    int q_heads, kv_heads, head_dim, rows;
    int mask;    // 0 causal (j <= i), 1 strict (j < i), 2 full
    int window;  // 0: none; else keys i - window < j
    int ring;    // 1: position p lives at row p % rows
    float scale;
};
static_assert(sizeof(XlAttnParams) == 128, "XlAttnParams must match the Rust #[repr(C)] layout");
static_assert(alignof(XlAttnParams) == 8, "XlAttnParams must match the Rust #[repr(C)] layout");

struct XlWriteParams {
    long long new_stride[3];   // b, t, g
    long long slot_stride[3];  // b, g, row
    int tokens, kv_heads, head_dim, rows, ring, pad;
};
static_assert(sizeof(XlWriteParams) == 72, "XlWriteParams must match the Rust #[repr(C)] layout");
static_assert(alignof(XlWriteParams) == 8, "XlWriteParams must match the Rust #[repr(C)] layout");

namespace frugal {
namespace crosslayer {

constexpr int kThreads = 128;
constexpr int kMaxD = 256;
constexpr int kPer = kMaxD / kThreads;

template <typename T>
__device__ __forceinline__ void attend_impl(const T* __restrict__ q, const T* __restrict__ k,
                                            const T* __restrict__ v, const unsigned int* __restrict__ q_pos,
                                            const unsigned int* __restrict__ kv_lens, T* __restrict__ o,
                                            const XlAttnParams& p) {
    __shared__ float q_sh[kMaxD];
    __shared__ float s_sh[kThreads];
    const long long t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x;
    const long long g = h / (p.q_heads / p.kv_heads);
    const unsigned long long len = kv_lens[b];
    const unsigned long long i = static_cast<unsigned long long>(q_pos[b]) + t;
    const unsigned long long rows = static_cast<unsigned long long>(p.rows);
    unsigned long long hi = len, lo = 0;
    if (p.mask == 0) hi = len < i + 1 ? len : i + 1;
    if (p.mask == 1) hi = len < i ? len : i;
    if (p.window > 0 && i >= static_cast<unsigned long long>(p.window)) lo = i - p.window + 1;
    if (p.ring && len > rows && len - rows > lo) lo = len - rows;
    if (hi < lo) hi = lo;

    T* out = o + b * p.o_stride[0] + t * p.o_stride[1] + h * p.o_stride[2];
    if (!p.ring && len > rows) {
        // Uniform over the block: every thread returns before any barrier.
        for (int d = tid; d < p.head_dim; d += kThreads) out[d] = from_float<T>(quiet_nan());
        return;
    }
    const T* qr = q + b * p.q_stride[0] + t * p.q_stride[1] + h * p.q_stride[2];
    for (int d = tid; d < p.head_dim; d += kThreads) q_sh[d] = to_float(qr[d]);
    __syncthreads();

    const T* kb = k + b * p.k_stride[0] + g * p.k_stride[1];
    const T* vb = v + b * p.v_stride[0] + g * p.v_stride[1];
    float m = neg_inf(), l = 0.f;
    float acc[kPer];
#pragma unroll
    for (int c = 0; c < kPer; ++c) acc[c] = 0.f;
    const long long span = static_cast<long long>(hi - lo);
    for (long long first = 0; first < span; first += kThreads) {
        const int count = static_cast<int>(span - first < kThreads ? span - first : kThreads);
        float s = neg_inf();
        if (tid < count) {
            const unsigned long long j = lo + first + tid;
            const long long row = static_cast<long long>(p.ring ? j % rows : j);
            const T* kr = kb + row * p.k_stride[2];
            float dot = 0.f;
            for (int d = 0; d < p.head_dim; ++d) dot += q_sh[d] * to_float(kr[d]);
            s = dot * p.scale;
        }
        s_sh[tid] = s;
        __syncthreads();
        float tmax = neg_inf();
        for (int x = 0; x < count; ++x) tmax = fmaxf(tmax, s_sh[x]);
        const float m_new = fmaxf(m, tmax);
        // m = -inf before the first tile: exp(-inf) = 0 scales the empty state.
        const float corr = expf(m - m_new);
        l *= corr;
#pragma unroll
        for (int c = 0; c < kPer; ++c) acc[c] *= corr;
        for (int x = 0; x < count; ++x) {
            const float pr = expf(s_sh[x] - m_new);
            l += pr;
            const unsigned long long j = lo + first + x;
            const long long row = static_cast<long long>(p.ring ? j % rows : j);
            const T* vr = vb + row * p.v_stride[2];
#pragma unroll
            for (int c = 0; c < kPer; ++c) {
                const int d = tid + c * kThreads;
                if (d < p.head_dim) acc[c] += pr * to_float(vr[d]);
            }
        }
        m = m_new;
        // Every thread has read this tile's scores before the next tile overwrites them.
        __syncthreads();
    }
    const float inv = l == 0.f ? 0.f : 1.f / l;
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
        const int d = tid + c * kThreads;
        if (d < p.head_dim) out[d] = from_float<T>(acc[c] * inv);
    }
}

template <typename T>
__device__ __forceinline__ void write_impl(const T* __restrict__ new_k, const T* __restrict__ new_v,
                                           const unsigned int* __restrict__ start, T* __restrict__ k_slot,
                                           T* __restrict__ v_slot, const XlWriteParams& p) {
    const long long t = blockIdx.x / p.kv_heads, g = blockIdx.x % p.kv_heads, b = blockIdx.y;
    const unsigned long long pos = static_cast<unsigned long long>(start[b]) + t;
    const unsigned long long rows = static_cast<unsigned long long>(p.rows);
    if (!p.ring && pos >= rows) return;
    const long long row = static_cast<long long>(p.ring ? pos % rows : pos);
    const long long src = b * p.new_stride[0] + t * p.new_stride[1] + g * p.new_stride[2];
    const long long dst = b * p.slot_stride[0] + g * p.slot_stride[1] + row * p.slot_stride[2];
    for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
        k_slot[dst + d] = new_k[src + d];
        v_slot[dst + d] = new_v[src + d];
    }
}

}  // namespace crosslayer
}  // namespace frugal

#define FRUGAL_XL_KERNELS(SUFFIX, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(frugal::crosslayer::kThreads)                                \
        xl_attend_##SUFFIX(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,          \
                           const unsigned int* __restrict__ q_pos, const unsigned int* __restrict__ kv_lens,   \
                           T* __restrict__ o, XlAttnParams p) {                                               \
        frugal::crosslayer::attend_impl<T>(q, k, v, q_pos, kv_lens, o, p);                                    \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(frugal::crosslayer::kThreads)                                \
        xl_write_##SUFFIX(const T* __restrict__ new_k, const T* __restrict__ new_v,                            \
                          const unsigned int* __restrict__ start, T* __restrict__ k_slot,                      \
                          T* __restrict__ v_slot, XlWriteParams p) {                                          \
        frugal::crosslayer::write_impl<T>(new_k, new_v, start, k_slot, v_slot, p);                            \
    }

FRUGAL_XL_KERNELS(f32, float)
FRUGAL_XL_KERNELS(f16, __half)
FRUGAL_XL_KERNELS(bf16, __nv_bfloat16)
