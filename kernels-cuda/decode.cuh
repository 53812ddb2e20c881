// Flash-decoding (split-KV) templates: one query token per (sequence, query
// head) against an interval of key positions, shared by dense decode
// (decode.cu) and the decode form of cross-layer attention (crosslayer.cu);
// SparQ's gather (sparq.cu) reuses the row-group pieces (stage_q,
// convert_group, attend_group, stash_warp_state, combine_warps).
//
//   partial_impl: grid (num_splits, kv_heads * head_chunks, batch), block 128.
//     One block = one KV split x one kv head x up to 8 of its query heads, so
//     each K/V row is read from memory once for all the heads sharing it (GQA).
//     Writes the normalized partial output and its log-sum-exp per split.
//   merge_impl: grid (q_heads, batch), block 128. Log-sum-exp merge of the
//     active splits into the output.
//
// Keys policy (template parameter): `span(b)` gives sequence b's key positions
// [lo, hi) (hi - lo <= capacity), whether its output is refused (NaN), and
// `row(p)`, the cache row of position p. Split s covers positions
// [lo + s * chunk_len, lo + (s + 1) * chunk_len). An empty interval outputs 0.
//
// All offsets are 64-bit: caches exceed 2^31 elements.
#pragma once

#include "common.cuh"

#define FRUGAL_DECODE_HEADS_PER_BLOCK 8

// Mirrors the #[repr(C)] struct on the Rust side; passed by value, last arg.
struct DecodeParams {
    long long q_stride_b, q_stride_h;
    long long k_stride_b, k_stride_h, k_stride_s;
    long long v_stride_b, v_stride_h, v_stride_s;
    long long o_stride_b, o_stride_h;
    int batch, q_heads, kv_heads, head_dim, capacity;
    int chunk_len;   // keys per split, >= 1
    int num_splits;  // = ceil(capacity / chunk_len)
    float scale;
};
static_assert(sizeof(DecodeParams) == 112, "DecodeParams must match the Rust #[repr(C)] layout");
static_assert(alignof(DecodeParams) == 8, "DecodeParams must match the Rust #[repr(C)] layout");

namespace frugal {
namespace decode {

constexpr int kThreads = 128;  // blockDim = (128, 1, 1): the partial kernel's warp count is compiled in
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kHeads = FRUGAL_DECODE_HEADS_PER_BLOCK;

// How a lane reads its VEC consecutive elements of a row. Loads and
// conversions are separate so all loads of a key group are issued first.
template <typename T, bool VECTOR> struct RowAccess;

template <typename T> struct RowAccess<T, true> {  // 8-byte loads, needs alignment
    static constexpr int VEC = Vec8<T>::VEC;
    using Raw = uint2;
    __device__ __forceinline__ static Raw zero() { return make_uint2(0u, 0u); }
    __device__ __forceinline__ static Raw load(const T* p) { return load_raw8(p); }
    __device__ __forceinline__ static void convert(Raw r, float (&f)[VEC]) { convert_raw8<T>(r, f); }
};

template <typename T> struct RowAccess<T, false> {  // one element, any alignment
    static constexpr int VEC = 1;
    using Raw = float;
    __device__ __forceinline__ static Raw zero() { return 0.f; }
    __device__ __forceinline__ static Raw load(const T* p) { return load_f32(p); }
    __device__ __forceinline__ static void convert(Raw r, float (&f)[VEC]) { f[0] = r; }
};

// The keys of dense decode: positions [0, seq_lens[b]) at rows 0..; a length
// past the capacity is refused.
struct DenseKeys {
    const unsigned int* __restrict__ seq_lens;
    int capacity;

    struct Span {
        long long lo, hi;
        bool refused;
        __device__ __forceinline__ long long row(long long pos) const { return pos; }
    };

    __device__ __forceinline__ Span span(int b) const {
        const unsigned int len = seq_lens[b];
        return Span{0, static_cast<long long>(len), len > static_cast<unsigned int>(capacity)};
    }
};

// ---------------------------------------------------------------------------
// One query token per head against groups of U K/V rows, spread over a
// block's warps: the pieces partial_impl shares with SparQ's gather
// (sparq.cu), which attends over a gathered list of rows the same way.
// Lane `lane` owns elements d = pass * 32 * VEC + lane * VEC + e of a row;
// its PER = NPASS * VEC elements are numbered x = pass * VEC + e in every
// per-lane array.

// Stages up to H query heads (head i at q_head0 + i * q_stride_h) in shared
// memory as [head][x / 4][lane][x % 4] (conflict-free float4 reads),
// pre-scaled, zero outside head_dim and for heads at or past nh (>= 1), so
// padding adds nothing to the dot products. Warp w stages heads w, w + WARPS,
// ...; the caller synchronizes.
template <typename A, int WARPS, int H, int Q4, int NPASS, typename T>
__device__ __forceinline__ void stage_q(float (&sh_q)[H][Q4][kWarpSize][4], const T* q_head0, long long q_stride_h,
                                        int nh, const bool (&dvalid)[NPASS], float scale, int warp, int lane) {
    constexpr int VEC = A::VEC;
    static_assert(Q4 * 4 == NPASS * VEC, "q is staged as float4 per lane");
#pragma unroll
    for (int i = 0; i < H; ++i) {
        if (i % WARPS != warp) continue;
        const T* qh = q_head0 + static_cast<long long>(min(i, nh - 1)) * q_stride_h + lane * VEC;
#pragma unroll
        for (int ps = 0; ps < NPASS; ++ps) {
            float f[VEC];
            A::convert((i < nh && dvalid[ps]) ? A::load(qh + ps * kWarpSize * VEC) : A::zero(), f);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const int x = ps * VEC + e;
                sh_q[i][x / 4][lane][x % 4] = f[e] * scale;
            }
        }
    }
}

// A group's raw loads (all issued before any conversion) as f32.
template <typename A, int U, int NPASS, int PER>
__device__ __forceinline__ void convert_group(const typename A::Raw (&kr)[U][NPASS],
                                              const typename A::Raw (&vr)[U][NPASS], float (&kf)[U][PER],
                                              float (&vf)[U][PER]) {
    constexpr int VEC = A::VEC;
    static_assert(PER == NPASS * VEC, "PER = NPASS * VEC");
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int ps = 0; ps < NPASS; ++ps) {
            float fk[VEC], fv[VEC];
            A::convert(kr[u][ps], fk);
            A::convert(vr[u][ps], fv);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                kf[u][ps * VEC + e] = fk[e];
                vf[u][ps * VEC + e] = fv[e];
            }
        }
    }
}

// One head's online-softmax state (m, l, acc) updated with a group of U rows
// (this lane's elements kf, vf of each; rows at or past nvalid are masked),
// against the head's staged q (q4 = sh_q[head]). One rescale per group.
template <int U, int Q4, int PER>
__device__ __forceinline__ void attend_group(const float (&q4)[Q4][kWarpSize][4], const float (&kf)[U][PER],
                                             const float (&vf)[U][PER], int nvalid, int lane, float& m, float& l,
                                             float (&acc)[PER]) {
    constexpr int LOG2U = ilog2(U);
    static_assert(Q4 * 4 == PER, "q is staged as float4 per lane");
    float qv[PER];
#pragma unroll
    for (int x4 = 0; x4 < Q4; ++x4) {
        const float4 t = *reinterpret_cast<const float4*>(&q4[x4][lane][0]);
        qv[4 * x4 + 0] = t.x;
        qv[4 * x4 + 1] = t.y;
        qv[4 * x4 + 2] = t.z;
        qv[4 * x4 + 3] = t.w;
    }
    float part[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        float d = 0.f;
#pragma unroll
        for (int x = 0; x < PER; ++x) d = fmaf(qv[x], kf[u][x], d);
        part[u] = d;
    }
    // After warp_transpose_sum, this lane holds the score of row my_u of the group.
    float s = warp_transpose_sum<U>(part, lane);
    const int my_u = lane >> (5 - LOG2U);
    if (my_u >= nvalid) s = neg_inf();  // row beyond the split / list

    // Max over the group's rows: they differ only in the top LOG2U lane bits.
    float gmax = s;
#pragma unroll
    for (int off = kWarpSize / 2; off >= kWarpSize / U; off >>= 1)
        gmax = fmaxf(gmax, __shfl_xor_sync(kFullMask, gmax, off));

    // While everything seen is -inf, use 0 as the reference so no -inf - -inf:
    // alpha = 0 (acc, l are 0), p = 0.
    const float m_new = fmaxf(m, gmax);
    const float m_ref = (m_new == neg_inf()) ? 0.f : m_new;
    const float alpha = __expf(m - m_ref);
    const float pme = __expf(s - m_ref);
    m = m_new;

    float pu[U];
    float psum = 0.f;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        pu[u] = __shfl_sync(kFullMask, pme, u << (5 - LOG2U));
        psum += pu[u];
    }
    l = fmaf(l, alpha, psum);
#pragma unroll
    for (int x = 0; x < PER; ++x) {
        float a = acc[x] * alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) a = fmaf(pu[u], vf[u][x], a);
        acc[x] = a;
    }
}

// Each warp's (m, l, acc) of heads below nh into shared memory, then a block
// barrier, for combine_warps. A warp that saw no row holds (-inf, 0, 0).
template <int WARPS, int H, int MAXD, int PER, int NPASS>
__device__ __forceinline__ void stash_warp_state(float (&sh_acc)[WARPS][H][MAXD], float (&sh_m)[WARPS][H],
                                                 float (&sh_l)[WARPS][H], const float (&acc)[H][PER],
                                                 const float (&m)[H], const float (&l)[H], int nh,
                                                 const bool (&dvalid)[NPASS], int warp, int lane) {
    constexpr int VEC = PER / NPASS;
#pragma unroll
    for (int i = 0; i < H; ++i) {
        if (i < nh) {
#pragma unroll
            for (int ps = 0; ps < NPASS; ++ps) {
                if (dvalid[ps]) {
#pragma unroll
                    for (int e = 0; e < VEC; ++e)
                        sh_acc[warp][i][ps * kWarpSize * VEC + lane * VEC + e] = acc[i][ps * VEC + e];
                }
            }
            if (lane == 0) {
                sh_m[warp][i] = m[i];
                sh_l[warp][i] = l[i];
            }
        }
    }
    __syncthreads();
}

// Head i's state over all warps; the block writes the normalized output
// out[0..head_dim) (threads tid, tid + THREADS, ...). A warp that saw no
// row gets weight 0.
template <int THREADS, int WARPS, int H, int MAXD>
__device__ __forceinline__ SoftmaxState combine_warps(const float (&sh_acc)[WARPS][H][MAXD],
                                                      const float (&sh_m)[WARPS][H], const float (&sh_l)[WARPS][H],
                                                      int i, float* __restrict__ out, int head_dim, int tid) {
    SoftmaxState st = SoftmaxState::empty();
#pragma unroll
    for (int w = 0; w < WARPS; ++w) st.merge(sh_m[w][i], sh_l[w][i]);
    float wt[WARPS];
#pragma unroll
    for (int w = 0; w < WARPS; ++w) wt[w] = st.weight(sh_m[w][i]);
    for (int d = tid; d < head_dim; d += THREADS) {
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) o = fmaf(wt[w], sh_acc[w][i][d], o);
        out[d] = o / st.l;
    }
    return st;
}

// Lane `lane` owns elements d = pass * 32 * VEC + lane * VEC + e, e < VEC.
// head_dim % VEC == 0 (vector path) or VEC == 1, so a lane's VEC elements
// are either all inside the row or all outside it. The lane's PER = NPASS*VEC
// elements are numbered x = pass * VEC + e in all per-lane arrays.
template <typename T, int MAXD, bool VECTOR, typename Keys>
__device__ __forceinline__ void partial_impl(const T* __restrict__ q, const T* __restrict__ k,
                                             const T* __restrict__ v, const Keys& keys,
                                             float* __restrict__ part_o, float* __restrict__ part_lse,
                                             const DecodeParams& p) {
    using A = RowAccess<T, VECTOR>;
    using Raw = typename A::Raw;
    constexpr int VEC = A::VEC;
    constexpr int NPASS = MAXD / (kWarpSize * VEC);
    static_assert(NPASS * kWarpSize * VEC == MAXD, "MAXD must be a multiple of 32 * VEC");
    constexpr int PER = NPASS * VEC;       // elements per lane per row: 4 (d128) or 8 (d256)
    static_assert(PER % 4 == 0, "q is read from shared memory as float4");
    constexpr int U = (PER <= 4) ? 4 : 2;  // keys per group: 64 B (f16) / 128 B (f32) of K+V per lane
    constexpr int LOG2U = ilog2(U);

    // q lives in shared memory (read as float4 per head per group) to leave
    // registers for the accumulators and the K/V loads in flight.
    // Layout [head][x / 4][lane][x % 4]: conflict-free float4 reads.
    __shared__ __align__(16) float sh_q[kHeads][PER / 4][kWarpSize][4];
    __shared__ float sh_acc[kWarps][kHeads][MAXD];
    __shared__ float sh_m[kWarps][kHeads];
    __shared__ float sh_l[kWarps][kHeads];

    const int split = blockIdx.x;
    const int b = blockIdx.z;
    const int groups = p.q_heads / p.kv_heads;
    const int head_chunks = (groups + kHeads - 1) / kHeads;
    const int g = blockIdx.y / head_chunks;
    const int c = blockIdx.y % head_chunks;
    const int h0 = g * groups + c * kHeads;          // first query head of this block
    const int nh = min(kHeads, groups - c * kHeads);  // heads served, 1..8

    // Whole-block exits, before any barrier. Refused span: merge writes NaN.
    const typename Keys::Span span = keys.span(b);
    if (span.refused) return;
    const long long start = span.lo + static_cast<long long>(split) * p.chunk_len;
    if (start >= span.hi) return;  // inactive split (also an empty span)
    const long long end = min(span.hi, start + p.chunk_len);

    const int head_dim = p.head_dim;
    if (head_dim > MAXD) {  // wrong variant launched: NaN lse makes the merge output NaN
        if (static_cast<int>(threadIdx.x) < nh)
            part_lse[(static_cast<size_t>(b) * p.q_heads + (h0 + threadIdx.x)) * p.num_splits + split] = quiet_nan();
        return;
    }

    const int lane = threadIdx.x & (kWarpSize - 1);
    const int warp = threadIdx.x / kWarpSize;

    bool dvalid[NPASS];
#pragma unroll
    for (int ps = 0; ps < NPASS; ++ps) dvalid[ps] = ps * kWarpSize * VEC + lane * VEC < head_dim;

    stage_q<A, kWarps>(sh_q, q + b * p.q_stride_b + static_cast<long long>(h0) * p.q_stride_h, p.q_stride_h, nh,
                       dvalid, p.scale, warp, lane);
    __syncthreads();

    float acc[kHeads][PER];
    float m[kHeads], l[kHeads];
#pragma unroll
    for (int i = 0; i < kHeads; ++i) {
        m[i] = neg_inf();
        l[i] = 0.f;
#pragma unroll
        for (int x = 0; x < PER; ++x) acc[i][x] = 0.f;
    }

    const long long kss = p.k_stride_s;
    const long long vss = p.v_stride_s;
    const T* kbase = k + b * p.k_stride_b + g * p.k_stride_h + lane * VEC;
    const T* vbase = v + b * p.v_stride_b + g * p.v_stride_h + lane * VEC;

    // Loads group [key0, key0 + U) (positions) into raw registers; keys at or
    // past `end` are never read (zeros instead), so this is safe past the last group.
    Raw kr[U][NPASS], vr[U][NPASS];
    auto load_group = [&](long long key0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool key_ok = key0 + u < end;
            const long long row = span.row(key0 + u);
            const T* krow = kbase + row * kss;
            const T* vrow = vbase + row * vss;
#pragma unroll
            for (int ps = 0; ps < NPASS; ++ps) {
                const bool ok = key_ok && dvalid[ps];
                kr[u][ps] = ok ? A::load(krow + ps * kWarpSize * VEC) : A::zero();
                vr[u][ps] = ok ? A::load(vrow + ps * kWarpSize * VEC) : A::zero();
            }
        }
    };

    // Warps take interleaved groups of U keys, so the block streams the split
    // front to back. The next group's loads are issued before this group's
    // math, so each warp keeps a group of K/V in flight while it computes.
    constexpr int kStep = kWarps * U;
    load_group(start + warp * U);
    for (long long key0 = start + warp * U; key0 < end; key0 += kStep) {
        const long long nvalid = min(static_cast<long long>(U), end - key0);  // >= 1

        float kf[U][PER], vf[U][PER];
        convert_group<A>(kr, vr, kf, vf);
        load_group(key0 + kStep);

#pragma unroll
        for (int i = 0; i < kHeads; ++i)  // `i < nh` is block-uniform
            if (i < nh) attend_group(sh_q[i], kf, vf, static_cast<int>(nvalid), lane, m[i], l[i], acc[i]);
    }

    // Combine the 4 warps' states per head.
    stash_warp_state(sh_acc, sh_m, sh_l, acc, m, l, nh, dvalid, warp, lane);
    for (int i = 0; i < nh; ++i) {
        // Every active split has >= 1 key, so l >= 1 unless inputs are non-finite.
        const size_t row = (static_cast<size_t>(b) * p.q_heads + (h0 + i)) * p.num_splits + split;
        const SoftmaxState st =
            combine_warps<kThreads>(sh_acc, sh_m, sh_l, i, part_o + row * head_dim, head_dim, threadIdx.x);
        if (threadIdx.x == 0) part_lse[row] = st.lse();
    }
}

template <typename T, typename Keys>
__device__ __forceinline__ void merge_impl(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                                           const Keys& keys, T* __restrict__ o, const DecodeParams& p) {
    __shared__ float sh_max[kWarpSize];  // one per warp, any block size up to 1024

    const int h = blockIdx.x;
    const int b = blockIdx.y;
    const int head_dim = p.head_dim;
    T* out = o + b * p.o_stride_b + h * p.o_stride_h;

    const typename Keys::Span span = keys.span(b);
    const long long n_keys = span.hi - span.lo;
    if (span.refused || n_keys <= 0) {
        const float fill = span.refused ? quiet_nan() : 0.f;
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) store_f32(out + d, fill);
        return;
    }
    // Clamped so a mis-sized num_splits can never read outside the workspace.
    const int n_active =
        static_cast<int>(min((n_keys + p.chunk_len - 1) / p.chunk_len, static_cast<long long>(p.num_splits)));

    const size_t row = (static_cast<size_t>(b) * p.q_heads + h) * p.num_splits;
    const float* lse = part_lse + row;
    const float* po = part_o + row * head_dim;

    float mx = neg_inf();
    for (int s = threadIdx.x; s < n_active; s += blockDim.x) mx = fmaxf(mx, lse[s]);
    mx = warp_max(mx);
    if ((threadIdx.x & (kWarpSize - 1)) == 0) sh_max[threadIdx.x / kWarpSize] = mx;
    __syncthreads();
    mx = sh_max[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / kWarpSize); ++w) mx = fmaxf(mx, sh_max[w]);

    // Only reachable with non-finite inputs; mx is block-uniform.
    if (!isfinite(mx)) {
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) store_f32(out + d, quiet_nan());
        return;
    }

    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float num = 0.f, den = 0.f;
#pragma unroll 4
        for (int s = 0; s < n_active; ++s) {
            const float w = expf(lse[s] - mx);  // lse[s] is a broadcast load
            num = fmaf(w, po[static_cast<size_t>(s) * head_dim + d], num);
            den += w;
        }
        store_f32(out + d, num / den);
    }
}

}  // namespace decode
}  // namespace frugal

