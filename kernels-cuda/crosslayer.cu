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
//   xl_decode_partial_* / xl_decode_merge_*: the decode form (one query per
//     sequence): decode.cuh's split-KV kernels, head-grouped so each K/V row is
//     read once per GQA group, with SlotKeys giving the interval and ring rows.
//     Launched like decode_partial_* / decode_merge_* (same grids, workspace).
//   xl_write_*: grid (tokens * kv_heads, batch), block 128. Copies new K/V
//     rows to the slot row of position start[b] + t (p % rows in a ring slot;
//     skipped when a plain slot cannot hold p).
//
// Offsets and positions are 64-bit.
#include "common.cuh"
#include "decode.cuh"

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

// The decode form's key rule; the rest of its parameters are a DecodeParams
// with capacity = rows.
struct XlKeyParams {
    int mask, window, ring, pad;  // as in XlAttnParams
};
static_assert(sizeof(XlKeyParams) == 16, "XlKeyParams must match the Rust #[repr(C)] layout");

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

// The keys query position i sees in a slot holding positions [0, len): one
// interval [lo, hi), hi >= lo, never longer than rows in a ring slot.
// refused: a plain slot cannot hold len positions (the row is NaN).
struct KeyInterval {
    unsigned long long lo, hi;
    bool refused;
};

__device__ __forceinline__ KeyInterval key_interval(unsigned long long len, unsigned long long i, int mask,
                                                    int window, int ring, int rows_i) {
    const unsigned long long rows = static_cast<unsigned long long>(rows_i);
    unsigned long long hi = len, lo = 0;
    if (mask == 0) hi = len < i + 1 ? len : i + 1;
    if (mask == 1) hi = len < i ? len : i;
    if (window > 0 && i >= static_cast<unsigned long long>(window)) lo = i - window + 1;
    if (ring && len > rows && len - rows > lo) lo = len - rows;
    if (hi < lo) hi = lo;
    return KeyInterval{lo, hi, !ring && len > rows};
}

// decode.cuh's Keys policy for the decode form: query position q_pos[b];
// position p at row p, or (RING) at row p % rows, computed as p - base, minus
// rows once more, since the interval spans at most rows positions. RING is a
// template parameter so the plain kernels keep decode's register budget.
template <bool RING> struct SlotKeys {
    const unsigned int* __restrict__ q_pos;
    const unsigned int* __restrict__ kv_lens;
    int rows;
    XlKeyParams kp;

    // Positions stay below 2^32 (lengths are u32), so the row arithmetic is 32-bit.
    struct Span {
        long long lo, hi;
        bool refused;
        unsigned int base, rows;
        __device__ __forceinline__ long long row(long long pos) const {
            if (!RING) return pos;
            const unsigned int r = static_cast<unsigned int>(pos) - base;
            return static_cast<long long>(r >= rows ? r - rows : r);
        }
    };

    __device__ __forceinline__ Span span(int b) const {
        const KeyInterval iv = key_interval(kv_lens[b], q_pos[b], kp.mask, kp.window, kp.ring, rows);
        // lo <= len < 2^32, rows >= 1. A kernel of the wrong RING for the
        // slot refuses (NaN) rather than read rows past the slot.
        const unsigned int lo = static_cast<unsigned int>(iv.lo);
        const unsigned int r = static_cast<unsigned int>(rows);
        const bool refused = iv.refused || (kp.ring != 0) != RING;
        return Span{static_cast<long long>(iv.lo), static_cast<long long>(iv.hi), refused, lo - lo % r, r};
    }
};

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
    const unsigned long long i = static_cast<unsigned long long>(q_pos[b]) + t;
    const unsigned long long rows = static_cast<unsigned long long>(p.rows);
    const KeyInterval iv = key_interval(kv_lens[b], i, p.mask, p.window, p.ring, p.rows);
    const unsigned long long lo = iv.lo, hi = iv.hi;

    T* out = o + b * p.o_stride[0] + t * p.o_stride[1] + h * p.o_stride[2];
    if (iv.refused) {
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

// The decode form: decode.cuh's kernels over SlotKeys (MINB 3 on the f16/bf16 d128 path: at 4 the slot keys spill;
// elsewhere as decode.cu); xl_decode_* for plain slots, xl_decode_ring_* for ring slots.
#define FRUGAL_XL_DECODE_PARTIAL(NAME, T, MAXD, VECTOR, MINB, RING)                                            \
    extern "C" __global__ void __launch_bounds__(frugal::decode::kThreads, MINB)                               \
        NAME(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                         \
             const unsigned int* __restrict__ q_pos, const unsigned int* __restrict__ kv_lens,                  \
             float* __restrict__ part_o, float* __restrict__ part_lse, DecodeParams p, XlKeyParams kp) {       \
        frugal::decode::partial_impl<T, MAXD, VECTOR>(                                                          \
            q, k, v, frugal::crosslayer::SlotKeys<RING>{q_pos, kv_lens, p.capacity, kp}, part_o, part_lse, p); \
    }

#define FRUGAL_XL_DECODE_MERGE(NAME, T, RING)                                                               \
    extern "C" __global__ void __launch_bounds__(frugal::decode::kThreads)                                  \
        NAME(const float* __restrict__ part_o, const float* __restrict__ part_lse,                          \
             const unsigned int* __restrict__ q_pos, const unsigned int* __restrict__ kv_lens,               \
             T* __restrict__ o, DecodeParams p, XlKeyParams kp) {                                           \
        frugal::decode::merge_impl<T>(part_o, part_lse,                                                     \
                                      frugal::crosslayer::SlotKeys<RING>{q_pos, kv_lens, p.capacity, kp}, o, p); \
    }

#define FRUGAL_XL_DECODE_FAMILY(PRE, RING, RMINB)                                                       \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_f32_d128_vec, float, 128, true, 1, RING)                     \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_f32_d128_scalar, float, 128, false, 1, RING)                 \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_f32_d256_vec, float, 256, true, 1, RING)                     \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_f32_d256_scalar, float, 256, false, 1, RING)                 \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_f16_d128_vec, __half, 128, true, RMINB, RING)                \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_f16_d128_scalar, __half, 128, false, 1, RING)                \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_f16_d256_vec, __half, 256, true, 1, RING)                    \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_f16_d256_scalar, __half, 256, false, 1, RING)                \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_bf16_d128_vec, __nv_bfloat16, 128, true, RMINB, RING)        \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_bf16_d128_scalar, __nv_bfloat16, 128, false, 1, RING)        \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_bf16_d256_vec, __nv_bfloat16, 256, true, 1, RING)            \
    FRUGAL_XL_DECODE_PARTIAL(PRE##_partial_bf16_d256_scalar, __nv_bfloat16, 256, false, 1, RING)        \
    FRUGAL_XL_DECODE_MERGE(PRE##_merge_f32, float, RING)                                                \
    FRUGAL_XL_DECODE_MERGE(PRE##_merge_f16, __half, RING)                                               \
    FRUGAL_XL_DECODE_MERGE(PRE##_merge_bf16, __nv_bfloat16, RING)

FRUGAL_XL_DECODE_FAMILY(xl_decode, false, 3)
FRUGAL_XL_DECODE_FAMILY(xl_decode_ring, true, 3)
