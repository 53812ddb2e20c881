// SparQ attention (DESIGN.md 4.2, src/sparq/mod.rs): one decode step is four
// launches over one f32 workspace laid out by SparqParams::plan() (offsets in
// 32-bit words, passed in StepParams), plus the cache kernels.
//
//   sparq_scores_<dt>_{vec,scalar}: grid (score_splits, kv_heads * head_chunks,
//     batch), block 256. Each block picks i1 itself (top-r of |q_h|, or of the
//     group's sum of |q_h| in shared mode; ties to the lower index), computes
//     tau_h, then for its chunk of positions the approximate logits
//     q_h[i1] . K^T[i1, j] / tau_h of up to 8 heads (one K^T read per head
//     chunk) -> logits[b, h, j], and per head the chunk's (max, sum exp) ->
//     norm[b, h, split, 0..2]. Threads own adjacent positions of a K^T row:
//     8-byte loads when capacity % VEC == 0 (vec), single elements otherwise.
//   sparq_select: grid (rows per sequence, batch), block 1024. One block per
//     selection row (shared: kv head, per-head: query head). Merges the norm
//     partials into lse[b, h]; keys (shared: sum over the group of
//     exp(logit - lse), materialised into keys[b, g, :] during the first radix
//     pass; per-head: the raw logits); exact radix select of the n - w best
//     positions of [0, len - w), ties to the lower index, ordered compaction,
//     then the window [len - w, len) -> indices[row, 0..n], ascending.
//   sparq_gather_<dt>_d{128,256}_{vec,scalar}: grid (gather_splits,
//     kv_heads * head_chunks, batch), block 128. Exact attention over the
//     gathered K/V rows of entries [s * gather_chunk, min(n, (s + 1) *
//     gather_chunk)) of the row's list for up to 8 heads sharing it (as
//     decode_partial: warp per group of rows, online softmax), plus the
//     partial alpha = sum of exp(logit - lse) over those entries ->
//     partials[b, h, s, 0..D+2] = (normalised output, lse, alpha).
//   sparq_merge_<dt>: grid (q_heads, batch), block 128. Log-sum-exp merge of
//     the active splits, alpha mix with the mean of V, output in T.
//
//   sparq_fill_<dt>: grid (ceil(max_len / 32), kv_heads, batch), block (32, 8):
//     copies K, V rows j < len from strided engine buffers and writes K^T
//     through a 32 x 32 shared tile (coalesced reads and writes).
//   sparq_fill_mean_<dt>: grid (kv_heads, batch), block 256: f32 mean of the
//     len V rows (accumulated in f64), 0 when len == 0.
//   sparq_append_<dt>: grid (batch), block 256: one token per sequence into
//     every kv head, running mean update, then the length bump.
//
// Sequences with len > capacity (impossible through SparqCache, which is the
// only writer of the lengths) produce NaN outputs instead of out-of-bounds
// accesses. All cache and workspace offsets are 64-bit.
#include "common.cuh"
#include "decode.cuh"  // the per-warp row-group attention that the gather shares with decode

namespace frugal {
namespace sparq {

// Mirrors the #[repr(C)] StepParams of src/sparq/cuda.rs; passed by value, last arg.
struct StepParams {
    long long q_stride_b, q_stride_h;
    long long o_stride_b, o_stride_h;
    // Workspace offsets in 32-bit words (SparqPlan).
    long long logits, norm, lse, keys, indices, partials;
    int batch, q_heads, kv_heads, head_dim, capacity;
    int groups;           // q_heads / kv_heads
    int heads_per_block;  // 1..=8; 1 in per-head mode
    int head_chunks;      // ceil(groups / heads_per_block)
    int r;                // 1..=head_dim
    int k;                // >= 1
    int window;           // min(local_window, k)
    int reallocate;       // mix with the mean of V
    int shared;           // GQA mode: 1 shared, 0 per head
    int score_chunk, score_splits;
    int gather_chunk, gather_splits;
    int k_cap;  // min(k, capacity): the row length of `indices`
    float scale;
    int pad;
};
static_assert(sizeof(StepParams) == 160, "StepParams must match the Rust #[repr(C)] layout");
static_assert(alignof(StepParams) == 8, "StepParams must match the Rust #[repr(C)] layout");

// Mirrors the #[repr(C)] CacheParams of src/sparq/cuda.rs (fill, fill_mean, append).
struct CacheParams {
    long long k_stride_b, k_stride_h, k_stride_s;  // engine K (fill only)
    long long v_stride_b, v_stride_h, v_stride_s;  // engine V (fill only)
    int batch, kv_heads, head_dim, capacity;
};
static_assert(sizeof(CacheParams) == 64, "CacheParams must match the Rust #[repr(C)] layout");
static_assert(alignof(CacheParams) == 8, "CacheParams must match the Rust #[repr(C)] layout");

constexpr int kHeads = 8;    // = HEADS_PER_BLOCK on the Rust side
constexpr int kMaxD = 256;   // = MAX_HEAD_DIM

// ---------------------------------------------------------------------------
// Small helpers.

// exp(a - b) merged into (m, l): the online-softmax state of natural-log
// scores. Accurate expf: these sums feed alpha and the selection keys.
__device__ __forceinline__ void state_merge(float& m, float& l, float m2, float l2) {
    const float mn = fmaxf(m, m2);
    if (mn == neg_inf()) {
        m = neg_inf();
        l = 0.f;
        return;
    }
    l = l * expf(m - mn) + l2 * expf(m2 - mn);  // exp(-inf - finite) = 0
    m = mn;
}

__device__ __forceinline__ void warp_state_merge(float& m, float& l) {
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(kFullMask, m, off);
        const float l2 = __shfl_xor_sync(kFullMask, l, off);
        state_merge(m, l, m2, l2);
    }
}

__device__ __forceinline__ unsigned lanemask_lt(unsigned lane) { return (1u << lane) - 1u; }

// Inclusive prefix sum over the lanes of a full warp.
__device__ __forceinline__ unsigned warp_inclusive_scan(unsigned x, unsigned lane) {
#pragma unroll
    for (unsigned d = 1; d < kWarpSize; d <<= 1) {
        const unsigned y = __shfl_up_sync(kFullMask, x, d);
        if (lane >= d) x += y;
    }
    return x;
}

// Order-preserving key of an f32: unsigned order == ranking order, larger
// first; -0.0 == +0.0; NaN (any payload) -> 0, below every number.
__device__ __forceinline__ unsigned f32_key(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Raw bit copies of cache elements (bit exact, NaN payloads included).
template <typename T> struct Bits {
    using type = unsigned short;
};
template <> struct Bits<float> {
    using type = unsigned;
};
template <typename T> __device__ __forceinline__ typename Bits<T>::type load_bits(const T* p) {
    return *reinterpret_cast<const typename Bits<T>::type*>(p);
}
template <typename T> __device__ __forceinline__ void store_bits(T* p, typename Bits<T>::type x) {
    *reinterpret_cast<typename Bits<T>::type*>(p) = x;
}

// ===========================================================================
// 1. Approximate scores.

constexpr int kScoreThreads = 256;  // blockDim = (256, 1, 1) is compiled in
constexpr int kScoreWarps = kScoreThreads / kWarpSize;
constexpr int kScoreRows = 8;  // K^T rows loaded per thread before any math
static_assert(kScoreWarps == kHeads, "warp i computes tau of head i");
static_assert(kScoreThreads >= kMaxD, "thread d ranks component d");

// How a thread reads its P positions of a K^T row in a tile of
// kScoreThreads * P positions starting at tile0.
template <typename T, bool VECTOR> struct KtAccess;

// Positions [tile0 + tid * P, + P): one 8-byte load. Needs capacity % P == 0,
// an 8-byte aligned K^T base and tile0 % P == 0, so a vector that starts
// before `end` lies inside the row.
template <typename T> struct KtAccess<T, true> {
    static constexpr int P = Vec8<T>::VEC;
    using Raw = uint2;
    __device__ __forceinline__ static long long pos(long long tile0, int tid, int e) {
        return tile0 + static_cast<long long>(tid) * P + e;
    }
    __device__ __forceinline__ static Raw load(const T* row, long long tile0, int tid, long long end) {
        const long long p0 = tile0 + static_cast<long long>(tid) * P;
        return p0 < end ? load_raw8(row + p0) : make_uint2(0u, 0u);
    }
    __device__ __forceinline__ static void convert(const Raw& r, float (&f)[P]) { convert_raw8<T>(r, f); }
};

// Positions tile0 + e * kScoreThreads + tid: single elements, any alignment.
template <typename T> struct KtAccess<T, false> {
    static constexpr int P = 4;
    struct Raw {
        float x[P];
    };
    __device__ __forceinline__ static long long pos(long long tile0, int tid, int e) {
        return tile0 + static_cast<long long>(e) * kScoreThreads + tid;
    }
    __device__ __forceinline__ static Raw load(const T* row, long long tile0, int tid, long long end) {
        Raw r;
#pragma unroll
        for (int e = 0; e < P; ++e) {
            const long long j = pos(tile0, tid, e);
            r.x[e] = j < end ? to_float(row[j]) : 0.f;
        }
        return r;
    }
    __device__ __forceinline__ static void convert(const Raw& r, float (&f)[P]) {
#pragma unroll
        for (int e = 0; e < P; ++e) f[e] = r.x[e];
    }
};

// Stores a thread's logits of one head for the positions < end.
template <bool VECTOR, int P>
__device__ __forceinline__ void store_logits(float* row, long long p0, long long tile0, int tid, long long end,
                                             const float (&a)[P]) {
    if (VECTOR) {
        if (p0 + P <= end) {  // aligned: row start and p0 are multiples of P, the workspace base of 16 B
            if constexpr (P == 4) {
                *reinterpret_cast<float4*>(row + p0) = make_float4(a[0], a[1], a[2], a[3]);
            } else if constexpr (P == 2) {
                *reinterpret_cast<float2*>(row + p0) = make_float2(a[0], a[1]);
            } else {
#pragma unroll
                for (int e = 0; e < P; ++e) row[p0 + e] = a[e];
            }
        } else {
#pragma unroll
            for (int e = 0; e < P; ++e)
                if (p0 + e < end) row[p0 + e] = a[e];
        }
    } else {
#pragma unroll
        for (int e = 0; e < P; ++e) {
            const long long j = tile0 + static_cast<long long>(e) * kScoreThreads + tid;
            if (j < end) row[j] = a[e];
        }
    }
}

template <typename T, bool VECTOR>
__device__ __forceinline__ void scores_impl(const T* __restrict__ q, const T* __restrict__ kt,
                                            const unsigned* __restrict__ lens, float* __restrict__ ws,
                                            const StepParams& p) {
    using A = KtAccess<T, VECTOR>;
    using Raw = typename A::Raw;
    constexpr int P = A::P;
    constexpr int kTile = kScoreThreads * P;

    __shared__ unsigned sh_key[kMaxD];
    __shared__ int sh_sel[kMaxD];
    __shared__ int sh_i1[kMaxD];
    __shared__ __align__(16) float sh_qs[kMaxD][kHeads];  // q_h[i1[t]] / tau_h
    __shared__ unsigned sh_wcount[kScoreWarps];
    __shared__ float sh_m[kScoreWarps][kHeads];
    __shared__ float sh_l[kScoreWarps][kHeads];

    // Whole-block exits, before any barrier.
    if (blockDim.x != kScoreThreads) return;
    const int split = blockIdx.x;
    const int b = blockIdx.z;
    const int g = blockIdx.y / p.head_chunks;
    const int c = blockIdx.y % p.head_chunks;
    const int groups = p.groups;
    const int h0 = g * groups + c * p.heads_per_block;               // first query head of this block
    const int nh = min(p.heads_per_block, groups - c * p.heads_per_block);  // heads served
    const int D = p.head_dim;
    if (D > kMaxD || nh < 1 || nh > kHeads || p.r < 1 || p.r > D) return;
    const unsigned len = lens[b];
    if (len > static_cast<unsigned>(p.capacity)) return;
    const long long start = static_cast<long long>(split) * p.score_chunk;
    if (start >= static_cast<long long>(len)) return;  // inactive split (also len == 0)
    const long long end = min(static_cast<long long>(len), start + p.score_chunk);

    const int tid = threadIdx.x;
    const int lane = tid & (kWarpSize - 1);
    const int warp = tid / kWarpSize;
    const T* qb = q + b * p.q_stride_b;

    // ---- i1: top-r components of |q| summed over the selecting heads (the
    // whole group in shared mode), ties to the lower index.
    const int sel_h0 = p.shared ? g * groups : h0;
    const int sel_n = p.shared ? groups : 1;
    if (tid < D) {
        float a = 0.f;
        for (int hh = 0; hh < sel_n; ++hh)
            a += fabsf(to_float(qb[static_cast<long long>(sel_h0 + hh) * p.q_stride_h + tid]));
        sh_key[tid] = isnan(a) ? 0u : __float_as_uint(a) + 1u;  // a >= +0: bits are ordered; NaN lowest
    }
    __syncthreads();
    bool sel = false;
    if (tid < D) {
        const unsigned mine = sh_key[tid];
        int rank = 0;  // components ranked before this one
        for (int e = 0; e < D; ++e) {
            const unsigned o = sh_key[e];
            rank += (o > mine || (o == mine && e < tid)) ? 1 : 0;
        }
        sel = rank < p.r;  // exactly r components (a strict total order)
    }
    const unsigned ball = __ballot_sync(kFullMask, sel);
    if (lane == 0) sh_wcount[warp] = static_cast<unsigned>(__popc(ball));
    sh_sel[tid] = sel ? 1 : 0;
    __syncthreads();
    if (sel) {
        int pos = __popc(ball & lanemask_lt(lane));
        for (int w = 0; w < warp; ++w) pos += static_cast<int>(sh_wcount[w]);
        sh_i1[pos] = tid;  // ascending component order
    }
    __syncthreads();

    // ---- tau_h = sqrt(D * |q_h[i1]|_1 / |q_h|_1) (sqrt(D) for |q_h|_1 == 0); warp i serves head i.
    if (warp < nh) {
        const T* qh = qb + static_cast<long long>(h0 + warp) * p.q_stride_h;
        float all = 0.f, part = 0.f;
        for (int d = lane; d < D; d += kWarpSize) {
            const float x = fabsf(to_float(qh[d]));
            all += x;
            if (sh_sel[d]) part += x;
        }
        all = warp_sum(all);
        part = warp_sum(part);
        const float ratio = all > 0.f ? part / all : 1.f;
        const float inv_tau = 1.f / sqrtf(static_cast<float>(D) * ratio);
        for (int t = lane; t < p.r; t += kWarpSize) sh_qs[t][warp] = to_float(qh[sh_i1[t]]) * inv_tau;
    } else {
        for (int t = lane; t < p.r; t += kWarpSize) sh_qs[t][warp] = 0.f;
    }
    __syncthreads();

    // ---- Logits of the chunk, tile by tile; online (max, sum exp) per head.
    const int r = p.r;
    const long long cap = p.capacity;
    const T* ktb = kt + (static_cast<long long>(b) * p.kv_heads + g) * D * cap;
    float* lg = ws + p.logits + (static_cast<long long>(b) * p.q_heads + h0) * cap;  // head i: + i * cap

    float m[kHeads], l[kHeads];
#pragma unroll
    for (int i = 0; i < kHeads; ++i) {
        m[i] = neg_inf();
        l[i] = 0.f;
    }

    for (long long tile0 = start; tile0 < end; tile0 += kTile) {
        float acc[kHeads][P];
#pragma unroll
        for (int i = 0; i < kHeads; ++i)
#pragma unroll
            for (int e = 0; e < P; ++e) acc[i][e] = 0.f;

        for (int t0 = 0; t0 < r; t0 += kScoreRows) {
            Raw raw[kScoreRows];
#pragma unroll
            for (int u = 0; u < kScoreRows; ++u) {
                const int t = t0 + u;
                // Rows past r load nothing (end 0) and are skipped below.
                const T* row = ktb + static_cast<long long>(sh_i1[min(t, r - 1)]) * cap;
                raw[u] = A::load(row, tile0, tid, t < r ? end : 0);
            }
#pragma unroll
            for (int u = 0; u < kScoreRows; ++u) {
                if (t0 + u < r) {  // block-uniform
                    float f[P];
                    A::convert(raw[u], f);
                    const float4 qa = *reinterpret_cast<const float4*>(&sh_qs[t0 + u][0]);
                    const float4 qc = *reinterpret_cast<const float4*>(&sh_qs[t0 + u][4]);
                    const float qv[kHeads] = {qa.x, qa.y, qa.z, qa.w, qc.x, qc.y, qc.z, qc.w};
#pragma unroll
                    for (int i = 0; i < kHeads; ++i) {
                        if (i < nh) {
#pragma unroll
                            for (int e = 0; e < P; ++e) acc[i][e] = fmaf(qv[i], f[e], acc[i][e]);
                        }
                    }
                }
            }
        }

        bool valid[P];
#pragma unroll
        for (int e = 0; e < P; ++e) valid[e] = A::pos(tile0, tid, e) < end;
        const long long p0 = A::pos(tile0, tid, 0);
#pragma unroll
        for (int i = 0; i < kHeads; ++i) {
            if (i < nh) {
                store_logits<VECTOR, P>(lg + i * cap, p0, tile0, tid, end, acc[i]);
                float tm = neg_inf();
#pragma unroll
                for (int e = 0; e < P; ++e)
                    if (valid[e]) tm = fmaxf(tm, acc[i][e]);
                const float mn = fmaxf(m[i], tm);
                if (mn != neg_inf()) {  // per thread; no -inf - -inf
                    float s = l[i] * expf(m[i] - mn);
#pragma unroll
                    for (int e = 0; e < P; ++e)
                        if (valid[e]) s += expf(acc[i][e] - mn);
                    l[i] = s;
                    m[i] = mn;
                }
            }
        }
    }

    // ---- Block-wide (max, sum exp) per head.
#pragma unroll
    for (int i = 0; i < kHeads; ++i) {
        if (i < nh) {  // block-uniform: whole warps shuffle
            warp_state_merge(m[i], l[i]);
            if (lane == 0) {
                sh_m[warp][i] = m[i];
                sh_l[warp][i] = l[i];
            }
        }
    }
    __syncthreads();
    if (tid < nh) {
        float mm = neg_inf(), ll = 0.f;
#pragma unroll
        for (int w = 0; w < kScoreWarps; ++w) state_merge(mm, ll, sh_m[w][tid], sh_l[w][tid]);
        float* nrm = ws + p.norm + ((static_cast<long long>(b) * p.q_heads + h0 + tid) * p.score_splits + split) * 2;
        nrm[0] = mm;
        nrm[1] = ll;
    }
}

// ===========================================================================
// 2. Selection: lse, keys, exact radix select, ordered compaction.

constexpr int kSelThreads = 1024;  // blockDim = (1024, 1, 1) is compiled in
constexpr int kSelWarps = kSelThreads / kWarpSize;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
// One histogram copy per lane index (no same-address serialisation within a
// warp); stride kBins + 1 puts copy c of bin b in bank (c + b) % 32.
constexpr int kHistCopies = kWarpSize;
constexpr int kHistStride = kBins + 1;
constexpr int kReduceGroups = kSelThreads / kBins;
constexpr int kCopiesPerGroup = kHistCopies / kReduceGroups;
constexpr unsigned kCountUnroll = 4;    // keys per thread per histogram step
constexpr unsigned kCompactUnroll = 4;  // keys per lane per compaction tile
static_assert(kSelThreads % kBins == 0 && kHistCopies % kReduceGroups == 0, "histogram reduction layout");
static_assert(kBins % kWarpSize == 0 && kBins <= kSelThreads, "digit scan layout");
static_assert(kSelWarps == kWarpSize, "the compaction scans one warp total per lane");

__device__ __forceinline__ void select_impl(const unsigned* __restrict__ lens, float* ws, const StepParams& p) {
    __shared__ unsigned s_hist[kHistCopies][kHistStride];
    __shared__ unsigned s_part[kReduceGroups][kBins];
    __shared__ unsigned s_scan[kBins / kWarpSize];
    __shared__ unsigned s_choice[3];  // digit, count above it in the bucket, its count
    __shared__ unsigned s_wt[2][kSelWarps][2];  // per-warp (> T, == T) totals, double-buffered

    // Whole-block exits, before any barrier.
    if (blockDim.x != kSelThreads) return;
    const int x = blockIdx.x;  // kv head (shared) or query head (per head)
    const int b = blockIdx.y;
    const bool shared = p.shared != 0;
    const unsigned len = lens[b];
    if (len == 0 || len > static_cast<unsigned>(p.capacity)) return;

    const unsigned tid = threadIdx.x;
    const unsigned lane = tid % kWarpSize;
    const unsigned warp = tid / kWarpSize;
    const long long cap = p.capacity;
    const int h_first = shared ? x * p.groups : x;
    const int nheads = shared ? p.groups : 1;
    const long long row = shared ? static_cast<long long>(b) * p.kv_heads + x : static_cast<long long>(b) * p.q_heads + x;
    const long long hrow0 = static_cast<long long>(b) * p.q_heads + h_first;  // (b, h_first) in [batch, q_heads]

    // ---- lse[b, h] from the active scores splits; warp w serves heads w, w + 32, ...
    const int ns = static_cast<int>(min((static_cast<long long>(len) + p.score_chunk - 1) / p.score_chunk,
                                        static_cast<long long>(p.score_splits)));
    for (int hh = static_cast<int>(warp); hh < nheads; hh += kSelWarps) {
        const float* nrm = ws + p.norm + (hrow0 + hh) * p.score_splits * 2;
        float m = neg_inf(), l = 0.f;
        for (int s = static_cast<int>(lane); s < ns; s += kWarpSize) state_merge(m, l, nrm[2 * s], nrm[2 * s + 1]);
        warp_state_merge(m, l);
        if (lane == 0) ws[p.lse + hrow0 + hh] = m + logf(l);  // -inf when empty
    }
    __syncthreads();  // lse visible to the whole block (plain loads below)

    const unsigned n = static_cast<unsigned>(min(static_cast<long long>(p.k), static_cast<long long>(len)));
    const unsigned w = min(static_cast<unsigned>(max(p.window, 0)), n);
    const unsigned mlen = len - w;   // candidates [0, mlen)
    const unsigned need = n - w;     // taken among them
    unsigned* idx = reinterpret_cast<unsigned*>(ws + p.indices) + row * p.k_cap;
    for (unsigned i = tid; i < w; i += kSelThreads) idx[need + i] = mlen + i;  // the window, ascending
    if (need == 0) return;
    if (need == mlen) {  // every candidate is taken
        for (unsigned i = tid; i < mlen; i += kSelThreads) idx[i] = i;
        return;
    }

    // Keys: shared mode reads the keys row materialised by the first pass;
    // per-head mode ranks the raw logits (softmax is monotone).
    float* keys = shared ? ws + p.keys + row * cap : ws + p.logits + hrow0 * cap;
    const float* lgt = ws + p.logits + hrow0 * cap;  // head h_first + hh: + hh * cap
    const float* lse = ws + p.lse + hrow0;

    // ---- 1. Radix select. Invariant: 1 <= k_rem <= bucket, where bucket =
    // #{key & mask == prefix} and k_rem of those are still to be taken.
    unsigned prefix = 0u, mask = 0u;
    unsigned k_rem = need, bucket = mlen;  // need < mlen: at least one pass
    for (unsigned i = tid; i < kHistCopies * kHistStride; i += kSelThreads) (&s_hist[0][0])[i] = 0u;
    __syncthreads();
    bool first = true;
    for (int shift = 32 - kRadixBits; shift >= 0 && k_rem != bucket; shift -= kRadixBits) {
        constexpr unsigned kStep = kCountUnroll * kSelThreads;
        for (unsigned j0 = 0; j0 < mlen; j0 += kStep) {
            unsigned kk[kCountUnroll];
            if (shared && first) {
                // Materialise keys[j] = sum over the group of exp(logit - lse), heads in order.
                float f[kCountUnroll];
#pragma unroll
                for (unsigned u = 0; u < kCountUnroll; ++u) f[u] = 0.f;
#pragma unroll 4
                for (int hh = 0; hh < nheads; ++hh) {  // unrolled: several heads' loads in flight
                    const float lh = lse[hh];
                    const float* lr = lgt + static_cast<long long>(hh) * cap;
#pragma unroll
                    for (unsigned u = 0; u < kCountUnroll; ++u) {
                        const unsigned j = j0 + u * kSelThreads + tid;
                        if (j < mlen) f[u] += expf(lr[j] - lh);
                    }
                }
#pragma unroll
                for (unsigned u = 0; u < kCountUnroll; ++u) {
                    const unsigned j = j0 + u * kSelThreads + tid;
                    if (j < mlen) keys[j] = f[u];
                    kk[u] = f32_key(f[u]);
                }
            } else {
#pragma unroll
                for (unsigned u = 0; u < kCountUnroll; ++u) {
                    const unsigned j = j0 + u * kSelThreads + tid;
                    kk[u] = j < mlen ? f32_key(keys[j]) : 0u;
                }
            }
#pragma unroll
            for (unsigned u = 0; u < kCountUnroll; ++u) {
                const unsigned j = j0 + u * kSelThreads + tid;
                if (j < mlen && (kk[u] & mask) == prefix)
                    atomicAdd(&s_hist[lane][(kk[u] >> shift) & (kBins - 1)], 1u);
            }
        }
        first = false;
        __syncthreads();

        // Sum the copies (and zero them for the next pass).
        {
            const unsigned bin = tid % kBins;
            const unsigned grp = tid / kBins;
            unsigned s = 0u;
#pragma unroll
            for (unsigned cc = grp * kCopiesPerGroup; cc < (grp + 1) * kCopiesPerGroup; ++cc) {
                s += s_hist[cc][bin];
                s_hist[cc][bin] = 0u;
            }
            s_part[grp][bin] = s;
        }
        __syncthreads();

        // Thread t < 256 takes bin 255 - t: an inclusive scan over t counts the
        // bucket's keys with digit >= bin; the chosen digit is where it first reaches k_rem.
        unsigned cnt = 0u, incl = 0u;
        const unsigned bin = kBins - 1 - tid;  // meaningful for tid < kBins
        if (tid < kBins) {
#pragma unroll
            for (int grp = 0; grp < kReduceGroups; ++grp) cnt += s_part[grp][bin];
            incl = warp_inclusive_scan(cnt, lane);
            if (lane == kWarpSize - 1) s_scan[warp] = incl;
        }
        __syncthreads();
        if (tid < kBins) {
            for (unsigned ww = 0; ww < warp; ++ww) incl += s_scan[ww];
            const unsigned excl = incl - cnt;
            if (excl < k_rem && incl >= k_rem) {  // exactly one thread
                s_choice[0] = bin;
                s_choice[1] = excl;
                s_choice[2] = cnt;
            }
        }
        __syncthreads();
        prefix |= s_choice[0] << shift;
        mask |= static_cast<unsigned>(kBins - 1) << shift;
        k_rem -= s_choice[1];
        bucket = s_choice[2];
        // s_choice, s_scan and s_part are rewritten only after the next pass's
        // first two barriers, which every thread reaches after these reads.
    }

    // ---- 2. Ordered compaction: selected = key & mask > prefix, or == prefix
    // among the first k_rem such candidates. Warp v of a tile owns candidates
    // t0 + v * 32 * E + e * 32 + lane, so (warp, e, lane) order is index order.
    const unsigned k_eq = k_rem;
    unsigned carry_gt = 0u, carry_eq = 0u;
    unsigned buf = 0u;
    constexpr unsigned kTile = kCompactUnroll * kSelThreads;
    const unsigned lt = lanemask_lt(lane);
    for (unsigned t0 = 0; t0 < mlen; t0 += kTile, buf ^= 1u) {
        const unsigned base = t0 + warp * (kWarpSize * kCompactUnroll);
        unsigned kk[kCompactUnroll];
#pragma unroll
        for (unsigned e = 0; e < kCompactUnroll; ++e) {
            const unsigned j = base + e * kWarpSize + lane;
            kk[e] = j < mlen ? f32_key(keys[j]) & mask : 0u;
        }
        unsigned gtb[kCompactUnroll], eqb[kCompactUnroll];
        unsigned wgt = 0u, weq = 0u;
#pragma unroll
        for (unsigned e = 0; e < kCompactUnroll; ++e) {
            const bool ok = base + e * kWarpSize + lane < mlen;
            gtb[e] = __ballot_sync(kFullMask, ok && kk[e] > prefix);
            eqb[e] = __ballot_sync(kFullMask, ok && kk[e] == prefix);
            wgt += static_cast<unsigned>(__popc(gtb[e]));
            weq += static_cast<unsigned>(__popc(eqb[e]));
        }
        if (lane == 0) {
            s_wt[buf][warp][0] = wgt;
            s_wt[buf][warp][1] = weq;
        }
        __syncthreads();
        const unsigned vg = s_wt[buf][lane][0];  // warp `lane`'s totals (kSelWarps == 32)
        const unsigned ve = s_wt[buf][lane][1];
        const unsigned ig = warp_inclusive_scan(vg, lane);
        const unsigned ie = warp_inclusive_scan(ve, lane);
        unsigned gt_before = carry_gt + __shfl_sync(kFullMask, ig - vg, static_cast<int>(warp));
        unsigned eq_before = carry_eq + __shfl_sync(kFullMask, ie - ve, static_cast<int>(warp));
        const unsigned tot_gt = __shfl_sync(kFullMask, ig, kWarpSize - 1);
        const unsigned tot_eq = __shfl_sync(kFullMask, ie, kWarpSize - 1);
#pragma unroll
        for (unsigned e = 0; e < kCompactUnroll; ++e) {
            const bool gt = (gtb[e] >> lane) & 1u;
            const bool eq = (eqb[e] >> lane) & 1u;
            const unsigned gb = gt_before + static_cast<unsigned>(__popc(gtb[e] & lt));
            const unsigned eb = eq_before + static_cast<unsigned>(__popc(eqb[e] & lt));
            // Selected before it: every > T, and the first k_eq of == T.
            if (gt || (eq && eb < k_eq)) idx[gb + min(eb, k_eq)] = base + e * kWarpSize + lane;
            gt_before += static_cast<unsigned>(__popc(gtb[e]));
            eq_before += static_cast<unsigned>(__popc(eqb[e]));
        }
        carry_gt += tot_gt;
        carry_eq += tot_eq;
        if (carry_gt + min(carry_eq, k_eq) >= need) break;  // all written; block-uniform
    }
}

// ===========================================================================
// 3. Exact attention over the gathered rows.

constexpr int kGatherThreads = 128;  // blockDim = (128, 1, 1) is compiled in
constexpr int kGatherWarps = kGatherThreads / kWarpSize;
constexpr int kMaxGatherChunk = 256;  // >= SparqPlan::gather_chunk (checked by the launcher)

// decode.cuh's partial_impl over the gathered rows (its row-group pieces and
// lane layout): lane `lane` owns elements d = pass * 32 * VEC + lane * VEC + e;
// its PER = NPASS * VEC elements are numbered x = pass * VEC + e.
template <typename T, int MAXD, bool VECTOR>
__device__ __forceinline__ void gather_impl(const T* __restrict__ q, const T* __restrict__ kc,
                                            const T* __restrict__ vc, const unsigned* __restrict__ lens,
                                            float* __restrict__ ws, const StepParams& p) {
    using A = decode::RowAccess<T, VECTOR>;
    using Raw = typename A::Raw;
    constexpr int VEC = A::VEC;
    constexpr int NPASS = MAXD / (kWarpSize * VEC);
    static_assert(NPASS * kWarpSize * VEC == MAXD, "MAXD must be a multiple of 32 * VEC");
    constexpr int PER = NPASS * VEC;
    static_assert(PER % 4 == 0, "q is read from shared memory as float4");
    constexpr int U = (PER <= 4) ? 4 : 2;  // rows per group

    __shared__ __align__(16) float sh_q[kHeads][PER / 4][kWarpSize][4];
    __shared__ float sh_acc[kGatherWarps][kHeads][MAXD];
    __shared__ float sh_m[kGatherWarps][kHeads];
    __shared__ float sh_l[kGatherWarps][kHeads];
    __shared__ float sh_alpha[kHeads];
    __shared__ unsigned sh_idx[kMaxGatherChunk];

    // Whole-block exits, before any barrier.
    if (blockDim.x != kGatherThreads) return;
    const int split = blockIdx.x;
    const int b = blockIdx.z;
    const int g = blockIdx.y / p.head_chunks;
    const int c = blockIdx.y % p.head_chunks;
    const int groups = p.groups;
    const int h0 = g * groups + c * p.heads_per_block;
    const int nh = min(p.heads_per_block, groups - c * p.heads_per_block);
    const unsigned len = lens[b];
    if (len == 0 || len > static_cast<unsigned>(p.capacity) || nh < 1 || nh > kHeads) return;
    const long long n = min(static_cast<long long>(p.k), static_cast<long long>(len));
    const long long start = static_cast<long long>(split) * p.gather_chunk;
    if (start >= n) return;  // inactive split
    const int cnt = static_cast<int>(min(static_cast<long long>(p.gather_chunk), n - start));  // >= 1
    const int D = p.head_dim;
    const int hd2 = D + 2;
    const long long prow0 = static_cast<long long>(b) * p.q_heads + h0;  // (b, h0)
    if (D > MAXD || p.gather_chunk > kMaxGatherChunk) {  // wrong variant: NaN lse -> NaN output
        if (static_cast<int>(threadIdx.x) < nh)
            ws[p.partials + ((prow0 + threadIdx.x) * p.gather_splits + split) * hd2 + D] = quiet_nan();
        return;
    }

    const int tid = threadIdx.x;
    const int lane = tid & (kWarpSize - 1);
    const int warp = tid / kWarpSize;
    const long long cap = p.capacity;

    // The block's entries of the position list (clamped: never read outside the cache).
    const long long lrow = p.shared ? static_cast<long long>(b) * p.kv_heads + g : prow0;
    const unsigned* lst = reinterpret_cast<const unsigned*>(ws + p.indices) + lrow * p.k_cap + start;
    for (int e = tid; e < cnt; e += kGatherThreads) sh_idx[e] = min(lst[e], static_cast<unsigned>(cap - 1));

    bool dvalid[NPASS];
#pragma unroll
    for (int ps = 0; ps < NPASS; ++ps) dvalid[ps] = ps * kWarpSize * VEC + lane * VEC < D;

    decode::stage_q<A, kGatherWarps>(sh_q, q + b * p.q_stride_b + static_cast<long long>(h0) * p.q_stride_h,
                                     p.q_stride_h, nh, dvalid, p.scale, warp, lane);
    __syncthreads();

    float acc[kHeads][PER];
    float m[kHeads], l[kHeads];
#pragma unroll
    for (int i = 0; i < kHeads; ++i) {
        m[i] = neg_inf();
        l[i] = 0.f;
#pragma unroll
        for (int xx = 0; xx < PER; ++xx) acc[i][xx] = 0.f;
    }

    const long long gbase = (static_cast<long long>(b) * p.kv_heads + g) * cap * D;
    const T* kbase = kc + gbase + lane * VEC;
    const T* vbase = vc + gbase + lane * VEC;

    // Loads the rows of entries [e0, e0 + U); entries at or past cnt are not read.
    Raw kr[U][NPASS], vr[U][NPASS];
    auto load_group = [&](int e0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool ok_e = e0 + u < cnt;
            const long long j = ok_e ? static_cast<long long>(sh_idx[e0 + u]) : 0;
            const T* krow = kbase + j * D;
            const T* vrow = vbase + j * D;
#pragma unroll
            for (int ps = 0; ps < NPASS; ++ps) {
                const bool ok = ok_e && dvalid[ps];
                kr[u][ps] = ok ? A::load(krow + ps * kWarpSize * VEC) : A::zero();
                vr[u][ps] = ok ? A::load(vrow + ps * kWarpSize * VEC) : A::zero();
            }
        }
    };

    constexpr int kStep = kGatherWarps * U;
    load_group(warp * U);
    for (int e0 = warp * U; e0 < cnt; e0 += kStep) {
        const int nvalid = min(U, cnt - e0);  // >= 1

        float kf[U][PER], vf[U][PER];
        decode::convert_group<A>(kr, vr, kf, vf);
        load_group(e0 + kStep);

#pragma unroll
        for (int i = 0; i < kHeads; ++i)  // `i < nh` is block-uniform
            if (i < nh) decode::attend_group(sh_q[i], kf, vf, nvalid, lane, m[i], l[i], acc[i]);
    }

    // Partial alpha per head: sum over the entries of exp(logit - lse); warp w serves heads w, w + 4.
    for (int i = warp; i < nh; i += kGatherWarps) {
        const float* lg = ws + p.logits + (prow0 + i) * cap;
        const float lh = ws[p.lse + prow0 + i];
        float a = 0.f;
        for (int e = lane; e < cnt; e += kWarpSize) a += expf(lg[sh_idx[e]] - lh);
        a = warp_sum(a);
        if (lane == 0) sh_alpha[i] = a;
    }

    // Combine the warps' states per head.
    decode::stash_warp_state(sh_acc, sh_m, sh_l, acc, m, l, nh, dvalid, warp, lane);
    for (int i = 0; i < nh; ++i) {
        float* out = ws + p.partials + ((prow0 + i) * p.gather_splits + split) * hd2;
        const SoftmaxState st = decode::combine_warps<kGatherThreads>(sh_acc, sh_m, sh_l, i, out, D, tid);
        if (tid == 0) {
            out[D] = st.lse();
            out[D + 1] = sh_alpha[i];
        }
    }
}

// ===========================================================================
// 4. Merge of the gather splits, alpha mix, output.

constexpr int kMergeThreads = 128;

template <typename T>
__device__ __forceinline__ void merge_impl(const float* __restrict__ ws, const float* __restrict__ mean,
                                           const unsigned* __restrict__ lens, T* __restrict__ o,
                                           const StepParams& p) {
    __shared__ float sh_max[kWarpSize];

    const int h = blockIdx.x;
    const int b = blockIdx.y;
    const int D = p.head_dim;
    T* out = o + b * p.o_stride_b + h * p.o_stride_h;

    const unsigned len = lens[b];
    if (len == 0 || len > static_cast<unsigned>(p.capacity)) {
        const float fill = (len == 0) ? 0.f : quiet_nan();
        for (int d = threadIdx.x; d < D; d += blockDim.x) store_f32(out + d, fill);
        return;
    }
    const long long n = min(static_cast<long long>(p.k), static_cast<long long>(len));
    const int n_active = static_cast<int>(
        min((n + p.gather_chunk - 1) / p.gather_chunk, static_cast<long long>(p.gather_splits)));
    const int hd2 = D + 2;
    const float* base = ws + p.partials + (static_cast<long long>(b) * p.q_heads + h) * p.gather_splits * hd2;

    float mx = neg_inf();
    for (int s = threadIdx.x; s < n_active; s += blockDim.x) mx = fmaxf(mx, base[static_cast<long long>(s) * hd2 + D]);
    mx = warp_max(mx);
    if ((threadIdx.x & (kWarpSize - 1)) == 0) sh_max[threadIdx.x / kWarpSize] = mx;
    __syncthreads();
    mx = sh_max[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / kWarpSize); ++w) mx = fmaxf(mx, sh_max[w]);
    if (!isfinite(mx)) {  // only with non-finite inputs; block-uniform
        for (int d = threadIdx.x; d < D; d += blockDim.x) store_f32(out + d, quiet_nan());
        return;
    }

    // alpha = sum of the partial alphas; exactly 1 when the whole sequence was read.
    const bool mix = p.reallocate != 0 && n < static_cast<long long>(len);
    float alpha = 0.f;
    if (mix)
        for (int s = 0; s < n_active; ++s) alpha += base[static_cast<long long>(s) * hd2 + D + 1];
    const float* mrow = mean + (static_cast<long long>(b) * p.kv_heads + h / p.groups) * D;

    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float num = 0.f, den = 0.f;
#pragma unroll 4
        for (int s = 0; s < n_active; ++s) {
            const float* ps = base + static_cast<long long>(s) * hd2;
            const float wgt = expf(ps[D] - mx);
            num = fmaf(wgt, ps[d], num);
            den += wgt;
        }
        float y = num / den;
        if (mix) y = alpha * y + (1.f - alpha) * mrow[d];
        store_f32(out + d, y);
    }
}

// ===========================================================================
// Cache kernels.

constexpr int kFillTile = 32;   // positions and dims per tile; blockDim = (32, 8, 1)
constexpr int kFillRows = 8;
constexpr int kMeanThreads = 256;
constexpr int kMeanWarps = kMeanThreads / kWarpSize;
constexpr int kMeanChunks = kMaxD / kWarpSize;  // dims per lane
constexpr int kMeanUnroll = 4;                  // rows per warp in flight
constexpr int kAppendThreads = 256;

template <typename T>
__device__ __forceinline__ void fill_impl(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ kc,
                                          T* __restrict__ kt, T* __restrict__ vc, const unsigned* __restrict__ lens,
                                          const CacheParams& p) {
    using B = typename Bits<T>::type;
    __shared__ B tile[kFillTile][kFillTile + 1];

    if (blockDim.x != kFillTile || blockDim.y != kFillRows) return;
    const long long j0 = static_cast<long long>(blockIdx.x) * kFillTile;
    const int g = blockIdx.y;
    const int b = blockIdx.z;
    const unsigned len = lens[b];
    if (len > static_cast<unsigned>(p.capacity) || j0 >= static_cast<long long>(len)) return;
    const int D = p.head_dim;
    const long long cap = p.capacity;
    const int tx = threadIdx.x, ty = threadIdx.y;

    const T* ks = k + b * p.k_stride_b + g * p.k_stride_h;
    const T* vs = v + b * p.v_stride_b + g * p.v_stride_h;
    const long long bg = static_cast<long long>(b) * p.kv_heads + g;
    T* kcb = kc + bg * cap * D;
    T* vcb = vc + bg * cap * D;
    T* ktb = kt + bg * D * cap;

    for (int d0 = 0; d0 < D; d0 += kFillTile) {
        for (int jj = ty; jj < kFillTile; jj += kFillRows) {
            const long long j = j0 + jj;
            const int d = d0 + tx;
            if (j < len && d < D) {
                const B x = load_bits(ks + j * p.k_stride_s + d);
                store_bits(kcb + j * D + d, x);
                tile[jj][tx] = x;
            }
        }
        __syncthreads();
        for (int dd = ty; dd < kFillTile; dd += kFillRows) {
            const int d = d0 + dd;
            const long long j = j0 + tx;
            if (j < len && d < D) store_bits(ktb + d * cap + j, tile[tx][dd]);
        }
        __syncthreads();
    }
    for (int jj = ty; jj < kFillTile; jj += kFillRows) {
        const long long j = j0 + jj;
        if (j >= len) break;
        for (int d = tx; d < D; d += kFillTile) store_bits(vcb + j * D + d, load_bits(vs + j * p.v_stride_s + d));
    }
}

template <typename T>
__device__ __forceinline__ void fill_mean_impl(const T* __restrict__ vc, float* __restrict__ mean,
                                               const unsigned* __restrict__ lens, const CacheParams& p) {
    __shared__ double sh[kMeanWarps][kMaxD];

    if (blockDim.x != kMeanThreads) return;
    const int g = blockIdx.x;
    const int b = blockIdx.y;
    const int D = p.head_dim;
    const long long bg = static_cast<long long>(b) * p.kv_heads + g;
    float* mrow = mean + bg * D;
    const unsigned len = lens[b];
    if (len == 0 || len > static_cast<unsigned>(p.capacity) || D > kMaxD) {
        const float fill = len == 0 ? 0.f : quiet_nan();
        for (int d = threadIdx.x; d < D; d += kMeanThreads) mrow[d] = fill;
        return;
    }
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const T* vb = vc + bg * p.capacity * D;

    double acc[kMeanChunks];
#pragma unroll
    for (int cc = 0; cc < kMeanChunks; ++cc) acc[cc] = 0.0;
    for (long long j0 = warp; j0 < len; j0 += kMeanWarps * kMeanUnroll) {
        float x[kMeanUnroll][kMeanChunks];
#pragma unroll
        for (int u = 0; u < kMeanUnroll; ++u) {
            const long long j = j0 + static_cast<long long>(u) * kMeanWarps;
#pragma unroll
            for (int cc = 0; cc < kMeanChunks; ++cc) {
                const int d = cc * kWarpSize + lane;
                x[u][cc] = (j < len && d < D) ? to_float(vb[j * D + d]) : 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < kMeanUnroll; ++u)
#pragma unroll
            for (int cc = 0; cc < kMeanChunks; ++cc) acc[cc] += static_cast<double>(x[u][cc]);
    }
#pragma unroll
    for (int cc = 0; cc < kMeanChunks; ++cc) {
        const int d = cc * kWarpSize + lane;
        if (d < D) sh[warp][d] = acc[cc];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += kMeanThreads) {
        double s = 0.0;
#pragma unroll
        for (int w = 0; w < kMeanWarps; ++w) s += sh[w][d];
        mrow[d] = static_cast<float>(s / static_cast<double>(len));
    }
}

template <typename T>
__device__ __forceinline__ void append_impl(const T* __restrict__ k_new, const T* __restrict__ v_new,
                                            T* __restrict__ kc, T* __restrict__ kt, T* __restrict__ vc,
                                            float* __restrict__ mean, unsigned* __restrict__ lens,
                                            const CacheParams& p) {
    const int b = blockIdx.x;
    const unsigned len = lens[b];  // read by every thread before the barrier below
    if (len >= static_cast<unsigned>(p.capacity)) return;  // full: refused by the launcher already
    const int D = p.head_dim;
    const long long cap = p.capacity;
    const int total = p.kv_heads * D;
    for (int t = threadIdx.x; t < total; t += blockDim.x) {
        const int g = t / D;
        const int d = t - g * D;
        const long long bg = static_cast<long long>(b) * p.kv_heads + g;
        const long long src = bg * D + d;
        const auto kx = load_bits(k_new + src);
        const auto vx = load_bits(v_new + src);
        store_bits(kc + (bg * cap + len) * D + d, kx);
        store_bits(kt + (bg * D + d) * cap + len, kx);
        store_bits(vc + (bg * cap + len) * D + d, vx);
        const float mv = mean[src];
        mean[src] = mv + (to_float(v_new[src]) - mv) / static_cast<float>(len + 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) lens[b] = len + 1u;
}

}  // namespace sparq
}  // namespace frugal

// ---------------------------------------------------------------------------
// Exported symbols.

// At most 128 registers: 2 blocks (16 warps) per SM at least.
#define FRUGAL_SPARQ_SCORES(NAME, T, VECTOR)                                                                \
    extern "C" __global__ void __launch_bounds__(frugal::sparq::kScoreThreads, 2)                           \
        NAME(const T* __restrict__ q, const T* __restrict__ kt, const unsigned int* __restrict__ lens,       \
             float* __restrict__ ws, frugal::sparq::StepParams p) {                                          \
        frugal::sparq::scores_impl<T, VECTOR>(q, kt, lens, ws, p);                                           \
    }

FRUGAL_SPARQ_SCORES(sparq_scores_f32_vec, float, true)
FRUGAL_SPARQ_SCORES(sparq_scores_f32_scalar, float, false)
FRUGAL_SPARQ_SCORES(sparq_scores_f16_vec, __half, true)
FRUGAL_SPARQ_SCORES(sparq_scores_f16_scalar, __half, false)
FRUGAL_SPARQ_SCORES(sparq_scores_bf16_vec, __nv_bfloat16, true)
FRUGAL_SPARQ_SCORES(sparq_scores_bf16_scalar, __nv_bfloat16, false)

extern "C" __global__ void __launch_bounds__(frugal::sparq::kSelThreads, 1)
    sparq_select(const unsigned int* __restrict__ lens, float* ws, frugal::sparq::StepParams p) {
    frugal::sparq::select_impl(lens, ws, p);
}

// MINB as decode_partial: 4 blocks per SM for the hot f16/bf16 d128 vector path.
#define FRUGAL_SPARQ_GATHER(NAME, T, MAXD, VECTOR, MINB)                                                    \
    extern "C" __global__ void __launch_bounds__(frugal::sparq::kGatherThreads, MINB)                       \
        NAME(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,                    \
             const unsigned int* __restrict__ lens, float* __restrict__ ws, frugal::sparq::StepParams p) {   \
        frugal::sparq::gather_impl<T, MAXD, VECTOR>(q, kc, vc, lens, ws, p);                                 \
    }

FRUGAL_SPARQ_GATHER(sparq_gather_f32_d128_vec, float, 128, true, 1)
FRUGAL_SPARQ_GATHER(sparq_gather_f32_d128_scalar, float, 128, false, 1)
FRUGAL_SPARQ_GATHER(sparq_gather_f32_d256_vec, float, 256, true, 1)
FRUGAL_SPARQ_GATHER(sparq_gather_f32_d256_scalar, float, 256, false, 1)
FRUGAL_SPARQ_GATHER(sparq_gather_f16_d128_vec, __half, 128, true, 4)
FRUGAL_SPARQ_GATHER(sparq_gather_f16_d128_scalar, __half, 128, false, 1)
FRUGAL_SPARQ_GATHER(sparq_gather_f16_d256_vec, __half, 256, true, 1)
FRUGAL_SPARQ_GATHER(sparq_gather_f16_d256_scalar, __half, 256, false, 1)
FRUGAL_SPARQ_GATHER(sparq_gather_bf16_d128_vec, __nv_bfloat16, 128, true, 4)
FRUGAL_SPARQ_GATHER(sparq_gather_bf16_d128_scalar, __nv_bfloat16, 128, false, 1)
FRUGAL_SPARQ_GATHER(sparq_gather_bf16_d256_vec, __nv_bfloat16, 256, true, 1)
FRUGAL_SPARQ_GATHER(sparq_gather_bf16_d256_scalar, __nv_bfloat16, 256, false, 1)

#define FRUGAL_SPARQ_MERGE(NAME, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(frugal::sparq::kMergeThreads)                              \
        NAME(const float* __restrict__ ws, const float* __restrict__ mean, const unsigned int* __restrict__ lens, \
             T* __restrict__ o, frugal::sparq::StepParams p) {                                               \
        frugal::sparq::merge_impl<T>(ws, mean, lens, o, p);                                                  \
    }

FRUGAL_SPARQ_MERGE(sparq_merge_f32, float)
FRUGAL_SPARQ_MERGE(sparq_merge_f16, __half)
FRUGAL_SPARQ_MERGE(sparq_merge_bf16, __nv_bfloat16)

#define FRUGAL_SPARQ_CACHE(DT, T)                                                                           \
    extern "C" __global__ void __launch_bounds__(frugal::sparq::kFillTile * frugal::sparq::kFillRows)       \
        sparq_fill_##DT(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ kc,                \
                        T* __restrict__ kt, T* __restrict__ vc, const unsigned int* __restrict__ lens,       \
                        frugal::sparq::CacheParams p) {                                                      \
        frugal::sparq::fill_impl<T>(k, v, kc, kt, vc, lens, p);                                              \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(frugal::sparq::kMeanThreads)                               \
        sparq_fill_mean_##DT(const T* __restrict__ vc, float* __restrict__ mean,                             \
                             const unsigned int* __restrict__ lens, frugal::sparq::CacheParams p) {          \
        frugal::sparq::fill_mean_impl<T>(vc, mean, lens, p);                                                 \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(frugal::sparq::kAppendThreads)                             \
        sparq_append_##DT(const T* __restrict__ k_new, const T* __restrict__ v_new, T* __restrict__ kc,      \
                          T* __restrict__ kt, T* __restrict__ vc, float* __restrict__ mean,                  \
                          unsigned int* __restrict__ lens, frugal::sparq::CacheParams p) {                   \
        frugal::sparq::append_impl<T>(k_new, v_new, kc, kt, vc, mean, lens, p);                              \
    }

FRUGAL_SPARQ_CACHE(f32, float)
FRUGAL_SPARQ_CACHE(f16, __half)
FRUGAL_SPARQ_CACHE(bf16, __nv_bfloat16)
