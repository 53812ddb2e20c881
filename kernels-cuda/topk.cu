// Exact top-k over rows (DESIGN.md 4.3).
//
//   topk_{f32,f16,bf16}: grid (rows, 1, 1), block (1024, 1, 1), static shared
//   memory only (~37 KB). One block per row:
//     1. Radix select on order-preserving unsigned keys, 8 bits per pass from
//        the top (4 passes for f32, 2 for f16/bf16). Each pass histograms the
//        keys that match the prefix found so far and picks the digit whose
//        bucket holds the k-th largest key. Passes stop early once the chosen
//        bucket is needed whole. Result: a threshold T under a bit mask M,
//        count_gt = #{key & M > T} < k, and k_eq = k - count_gt of the
//        elements with key & M == T are taken: the ones with the lowest indices.
//     2. One ordered compaction pass in index order: block-wide prefix sums of
//        the (> T, == T) flags give every selected element its output slot.
//
// Ranking: larger value first; -0.0 == +0.0; NaN (any payload) below every
// number including -inf, all NaNs equal; ties go to the lower index. Output
// positions are strictly increasing; values are copied bit for bit.
//
// Rows are read as aligned 16-byte vectors: element i of the row is "virtual"
// element off + i, where off = (row address % 16) / sizeof(T), so virtual
// vector q covers virtual elements [q * VEC, q * VEC + VEC) and every vector
// that lies inside the row is aligned. Only the first and last vector of a row
// can be partial; those are read element by element.
//
// Element and vector indices are 32-bit unsigned: n <= 2^31 - 1 keeps every
// virtual index (< off + n + one tile) below 2^32. Row offsets are 64-bit.
#include "common.cuh"

#define FRUGAL_TOPK_THREADS 1024

// Mirrors the #[repr(C)] struct on the Rust side; passed by value, last arg.
struct TopkParams {
    long long row_stride;  // elements between rows, >= n
    int rows, n, k;        // 1 <= k <= n
    int pad;
};
static_assert(sizeof(TopkParams) == 24, "TopkParams must match the Rust #[repr(C)] layout");
static_assert(alignof(TopkParams) == 8, "TopkParams must match the Rust #[repr(C)] layout");

namespace frugal {
namespace topk {

constexpr int kThreads = FRUGAL_TOPK_THREADS;  // blockDim = (1024, 1, 1) is compiled in
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
// One histogram copy per lane index: lanes of one warp never hit the same
// counter, so skewed data (most keys in one or two buckets, as in the first
// pass) costs no same-address serialization. Stride kBins + 1 puts copy c of
// bin b in bank (c + b) % 32.
constexpr int kHistCopies = kWarpSize;
constexpr int kHistStride = kBins + 1;
constexpr int kReduceGroups = kThreads / kBins;                // thread groups summing the copies
constexpr int kCopiesPerGroup = kHistCopies / kReduceGroups;  // copies each group sums
constexpr unsigned kCountUnroll = 4;  // 16-byte loads in flight per thread in a histogram pass

static_assert(kThreads % kBins == 0 && kHistCopies % kReduceGroups == 0, "histogram reduction layout");
static_assert(kBins % kWarpSize == 0 && kBins <= kThreads, "digit scan layout");
static_assert(kWarps == kWarpSize, "the compaction scans one warp total per lane");

// ---------------------------------------------------------------------------
// Order-preserving keys: unsigned key order == ranking order. NaN -> 0; every
// number maps above 0 (-inf: f32 0x007fffff, f16 0x03ff, bf16 0x007f).

template <typename T> struct KeyTraits;

template <> struct KeyTraits<float> {
    static constexpr int kKeyBits = 32;
    __device__ __forceinline__ static unsigned key(unsigned u) {
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN
        if (u == 0x80000000u) u = 0u;                     // -0.0 -> +0.0
        return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    }
    __device__ __forceinline__ static unsigned load_bits(const float* p) { return __float_as_uint(*p); }
    __device__ __forceinline__ static void store_bits(float* p, unsigned b) { *reinterpret_cast<unsigned*>(p) = b; }
};

// 16-bit formats: kInfBits is +inf (all-ones exponent); magnitudes above it are NaN.
template <unsigned kInfBits> struct Key16 {
    static constexpr int kKeyBits = 16;
    __device__ __forceinline__ static unsigned key(unsigned u) {
        if ((u & 0x7fffu) > kInfBits) return 0u;  // NaN
        if (u == 0x8000u) u = 0u;                 // -0.0 -> +0.0
        return (u & 0x8000u) ? (~u & 0xffffu) : (u | 0x8000u);
    }
};

template <> struct KeyTraits<__half> : Key16<0x7c00u> {
    __device__ __forceinline__ static unsigned load_bits(const __half* p) { return __half_as_ushort(*p); }
    __device__ __forceinline__ static void store_bits(__half* p, unsigned b) {
        *p = __ushort_as_half(static_cast<unsigned short>(b));
    }
};

template <> struct KeyTraits<__nv_bfloat16> : Key16<0x7f80u> {
    __device__ __forceinline__ static unsigned load_bits(const __nv_bfloat16* p) { return __bfloat16_as_ushort(*p); }
    __device__ __forceinline__ static void store_bits(__nv_bfloat16* p, unsigned b) {
        *p = __ushort_as_bfloat16(static_cast<unsigned short>(b));
    }
};

// ---------------------------------------------------------------------------
// 16-byte vectors of VEC = 16 / sizeof(T) elements. Element e of a vector is
// in word e (f32) or in half e & 1 of word e >> 1 (16-bit; low half first).
// All element numbers below are compile-time constants after unrolling.

template <typename T> constexpr unsigned kVec = 16 / sizeof(T);

// 16-byte vectors per lane per compaction tile: 8 elements per lane either way
// (two f16/bf16 vectors per lane would exceed 64 registers).
template <typename T> constexpr unsigned kTileVecs = sizeof(T) == 4 ? 2 : 1;

// Compaction packs (count > T) << 16 | (count == T) per tile: each half must stay below 2^16.
static_assert(kThreads * 8 < 65536, "packed tile counts overflow 16 bits");

__device__ __forceinline__ unsigned word(const uint4& v, unsigned w) {
    return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

__device__ __forceinline__ void or_word(uint4& v, unsigned w, unsigned b) {
    if (w == 0) v.x |= b;
    else if (w == 1) v.y |= b;
    else if (w == 2) v.z |= b;
    else v.w |= b;
}

template <typename T> __device__ __forceinline__ unsigned get_elem(const uint4& v, unsigned e) {
    if constexpr (sizeof(T) == 4) return word(v, e);
    else return (word(v, e >> 1) >> ((e & 1u) * 16u)) & 0xffffu;
}

template <typename T> __device__ __forceinline__ void or_elem(uint4& v, unsigned e, unsigned bits) {
    if constexpr (sizeof(T) == 4) or_word(v, e, bits);
    else or_word(v, e >> 1, bits << ((e & 1u) * 16u));
}

// The row as seen through aligned 16-byte vectors (see the file comment).
template <typename T> struct Row {
    const T* x;        // element 0 of the row
    const uint4* xa;   // x rounded down to 16 bytes: virtual vector 0
    unsigned off;      // virtual index of element 0, < VEC
    unsigned end;      // virtual end, off + n
    unsigned nvec;     // virtual vectors covering [0, end)

    // Vectors [q0, q0 + count) are all inside the row (block-uniform test).
    __device__ __forceinline__ bool inside(unsigned q0, unsigned count) const {
        return q0 * kVec<T> >= off && (q0 + count) * kVec<T> <= end;
    }

    // Loads virtual vector q; returns the mask of its elements inside the row
    // (zero bits for the others, which are not read). Any q < nvec + one tile.
    __device__ __forceinline__ unsigned load(unsigned q, uint4& v) const {
        constexpr unsigned VEC = kVec<T>;
        const unsigned v0 = q * VEC;
        if (v0 >= off && v0 + VEC <= end) {
            v = __ldg(xa + q);
            return (1u << VEC) - 1u;
        }
        v = make_uint4(0u, 0u, 0u, 0u);
        unsigned m = 0u;
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) {
            const unsigned vi = v0 + e;
            if (vi >= off && vi < end) {
                or_elem<T>(v, e, KeyTraits<T>::load_bits(x + (vi - off)));
                m |= 1u << e;
            }
        }
        return m;
    }
};

// Inclusive prefix sum over the lanes of a full warp.
__device__ __forceinline__ unsigned warp_inclusive_scan(unsigned x, unsigned lane) {
#pragma unroll
    for (unsigned d = 1; d < kWarpSize; d <<= 1) {
        const unsigned y = __shfl_up_sync(kFullMask, x, d);
        if (lane >= d) x += y;
    }
    return x;
}

// ---------------------------------------------------------------------------
// Histogram of digit (key >> shift) & 0xff over the keys with key & mask ==
// prefix, for virtual vectors q0 + j * kThreads + tid, j < kCountUnroll.
// FULL: all of them lie inside the row.

template <typename T, bool FULL>
__device__ __forceinline__ void count_chunk(const Row<T>& row, unsigned q0, unsigned tid, unsigned prefix,
                                            unsigned mask, unsigned shift, unsigned* __restrict__ hist) {
    constexpr unsigned VEC = kVec<T>;
    uint4 v[kCountUnroll];
    unsigned m[kCountUnroll];
#pragma unroll
    for (unsigned j = 0; j < kCountUnroll; ++j) {
        const unsigned q = q0 + j * kThreads + tid;
        if (FULL) {
            v[j] = __ldg(row.xa + q);
            m[j] = (1u << VEC) - 1u;
        } else {
            m[j] = row.load(q, v[j]);
        }
    }
#pragma unroll
    for (unsigned j = 0; j < kCountUnroll; ++j) {
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) {
            if (FULL || ((m[j] >> e) & 1u)) {
                const unsigned key = KeyTraits<T>::key(get_elem<T>(v[j], e));
                if ((key & mask) == prefix) atomicAdd(hist + ((key >> shift) & (kBins - 1)), 1u);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// One compaction tile: virtual vectors [q0, q0 + kThreads * kTileVecs<T>). Warp w
// owns the contiguous vectors q0 + w * 32 * kTileVecs<T> + j * 32 + lane
// (j < kTileVecs<T>), so (warp, j, lane, element) order is index order.
// Counts are packed as (count of key > T) << 16 | (count of key == T).
// wt: this tile's kWarps words of shared memory (double-buffered by the caller,
// so one barrier per tile suffices).

template <typename T, bool FULL>
__device__ __forceinline__ void compact_tile(const Row<T>& row, unsigned q0, unsigned lane, unsigned warp,
                                             unsigned thr, unsigned mask, unsigned k_eq,
                                             unsigned* __restrict__ out_idx, T* __restrict__ out_val,
                                             unsigned* __restrict__ wt, unsigned& carry_gt, unsigned& carry_eq) {
    constexpr unsigned VEC = kVec<T>;
    const unsigned qw = q0 + warp * (kWarpSize * kTileVecs<T>);

    uint4 v[kTileVecs<T>];
    unsigned m[kTileVecs<T>];
#pragma unroll
    for (unsigned j = 0; j < kTileVecs<T>; ++j) {
        const unsigned q = qw + j * kWarpSize + lane;
        if (FULL) {
            v[j] = __ldg(row.xa + q);
            m[j] = (1u << VEC) - 1u;
        } else {
            m[j] = row.load(q, v[j]);
        }
    }

    unsigned gtb[kTileVecs<T>], eqb[kTileVecs<T>];  // per-element flags of this lane's vectors
    unsigned before[kTileVecs<T>];                  // packed counts before this lane's vector j, within the warp
    unsigned wsum = 0u;                             // packed warp total
#pragma unroll
    for (unsigned j = 0; j < kTileVecs<T>; ++j) {
        gtb[j] = 0u;
        eqb[j] = 0u;
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) {
            if (FULL || ((m[j] >> e) & 1u)) {
                const unsigned mk = KeyTraits<T>::key(get_elem<T>(v[j], e)) & mask;
                gtb[j] |= static_cast<unsigned>(mk > thr) << e;
                eqb[j] |= static_cast<unsigned>(mk == thr) << e;
            }
        }
        const unsigned c = (static_cast<unsigned>(__popc(gtb[j])) << 16) | static_cast<unsigned>(__popc(eqb[j]));
        const unsigned incl = warp_inclusive_scan(c, lane);
        before[j] = wsum + (incl - c);
        wsum += __shfl_sync(kFullMask, incl, kWarpSize - 1);
    }

    if (lane == 0) wt[warp] = wsum;
    __syncthreads();
    const unsigned wv = wt[lane];  // warp `lane`'s total (kWarps == 32)
    const unsigned wincl = warp_inclusive_scan(wv, lane);
    const unsigned wbefore = __shfl_sync(kFullMask, wincl - wv, warp);  // earlier warps of the tile
    const unsigned total = __shfl_sync(kFullMask, wincl, kWarpSize - 1);

#pragma unroll
    for (unsigned j = 0; j < kTileVecs<T>; ++j) {
        if ((gtb[j] | eqb[j]) == 0u) continue;
        // Elements before this lane's vector j, row-wide: > T and == T.
        unsigned gt_before = carry_gt + (wbefore >> 16) + (before[j] >> 16);
        unsigned eq_before = carry_eq + (wbefore & 0xffffu) + (before[j] & 0xffffu);
        const unsigned vi0 = (qw + j * kWarpSize + lane) * VEC - row.off;  // row index of element 0
#pragma unroll
        for (unsigned e = 0; e < VEC; ++e) {
            const bool gt = (gtb[j] >> e) & 1u;
            const bool eq = (eqb[j] >> e) & 1u;
            if (gt || (eq && eq_before < k_eq)) {
                // Selected before it: all > T, and the first k_eq of == T.
                const unsigned slot = gt_before + min(eq_before, k_eq);
                out_idx[slot] = vi0 + e;
                KeyTraits<T>::store_bits(out_val + slot, get_elem<T>(v[j], e));
            }
            gt_before += gt;
            eq_before += eq;
        }
    }
    carry_gt += total >> 16;
    carry_eq += total & 0xffffu;
}

// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void topk_impl(const T* __restrict__ x, unsigned* __restrict__ out_idx,
                                          T* __restrict__ out_val, const TopkParams& p) {
    using K = KeyTraits<T>;
    constexpr unsigned VEC = kVec<T>;

    __shared__ unsigned s_hist[kHistCopies][kHistStride];
    __shared__ unsigned s_part[kReduceGroups][kBins];
    __shared__ unsigned s_scan[kBins / kWarpSize];
    __shared__ unsigned s_choice[3];  // digit, count above it in the bucket, its count
    __shared__ unsigned s_wt[2][kWarps];

    // Whole-block exits, before any barrier. Invalid shapes write nothing.
    const int r = blockIdx.x;
    if (r >= p.rows || blockDim.x != kThreads) return;
    if (p.n < 1 || p.k < 1 || p.k > p.n) return;
    const unsigned n = static_cast<unsigned>(p.n);
    const unsigned k = static_cast<unsigned>(p.k);

    const unsigned tid = threadIdx.x;
    const unsigned lane = tid % kWarpSize;
    const unsigned warp = tid / kWarpSize;

    Row<T> row;
    row.x = x + static_cast<long long>(r) * p.row_stride;
    const unsigned long long addr = reinterpret_cast<unsigned long long>(row.x);
    row.off = static_cast<unsigned>((addr & 15u) / sizeof(T));
    row.xa = reinterpret_cast<const uint4*>(addr & ~15ull);
    row.end = row.off + n;
    row.nvec = (row.end + VEC - 1) / VEC;

    // ---- 1. Radix select. Invariant: 1 <= k_rem <= bucket, where bucket =
    // #{key & mask == prefix} and k_rem of those are still to be taken.
    unsigned prefix = 0u, mask = 0u;
    unsigned k_rem = k, bucket = n;
    if (k_rem != bucket) {
        for (unsigned i = tid; i < kHistCopies * kHistStride; i += kThreads) (&s_hist[0][0])[i] = 0u;
        __syncthreads();
    }
    for (int shift = K::kKeyBits - kRadixBits; shift >= 0 && k_rem != bucket; shift -= kRadixBits) {
        constexpr unsigned kChunk = kCountUnroll * kThreads;
        for (unsigned q0 = 0; q0 < row.nvec; q0 += kChunk) {
            if (row.inside(q0, kChunk))
                count_chunk<T, true>(row, q0, tid, prefix, mask, static_cast<unsigned>(shift), s_hist[lane]);
            else
                count_chunk<T, false>(row, q0, tid, prefix, mask, static_cast<unsigned>(shift), s_hist[lane]);
        }
        __syncthreads();

        // Sum the copies (and zero them for the next pass): group g sums
        // copies [g * kCopiesPerGroup, (g + 1) * kCopiesPerGroup) of bin b.
        {
            const unsigned b = tid % kBins;
            const unsigned g = tid / kBins;
            unsigned s = 0u;
#pragma unroll
            for (unsigned c = g * kCopiesPerGroup; c < (g + 1) * kCopiesPerGroup; ++c) {
                s += s_hist[c][b];
                s_hist[c][b] = 0u;
            }
            s_part[g][b] = s;
        }
        __syncthreads();

        // Thread t < 256 takes bin 255 - t: an inclusive scan over t counts
        // the bucket's keys with digit >= bin. The chosen digit is the one
        // where that count first reaches k_rem.
        unsigned cnt = 0u, incl = 0u;
        const unsigned bin = kBins - 1 - tid;  // meaningful for tid < kBins
        if (tid < kBins) {
#pragma unroll
            for (int g = 0; g < kReduceGroups; ++g) cnt += s_part[g][bin];
            incl = warp_inclusive_scan(cnt, lane);
            if (lane == kWarpSize - 1) s_scan[warp] = incl;
        }
        __syncthreads();
        if (tid < kBins) {
            for (unsigned w = 0; w < warp; ++w) incl += s_scan[w];
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
        // s_part, s_scan and s_choice are rewritten only after the next
        // pass's first barrier, which every thread reaches after these reads;
        // s_hist was zeroed before the previous barrier.
    }

    // ---- 2. Ordered compaction: selected = key & mask > prefix, or
    // key & mask == prefix among the first k_rem such elements of the row.
    const unsigned long long out_base = static_cast<unsigned long long>(r) * k;
    unsigned* __restrict__ oi = out_idx + out_base;
    T* __restrict__ ov = out_val + out_base;
    const unsigned k_eq = k_rem;
    unsigned carry_gt = 0u, carry_eq = 0u;
    unsigned buf = 0u;
    constexpr unsigned kTile = kTileVecs<T> * kThreads;
    for (unsigned q0 = 0; q0 < row.nvec; q0 += kTile, buf ^= 1u) {
        if (row.inside(q0, kTile))
            compact_tile<T, true>(row, q0, lane, warp, prefix, mask, k_eq, oi, ov, s_wt[buf], carry_gt, carry_eq);
        else
            compact_tile<T, false>(row, q0, lane, warp, prefix, mask, k_eq, oi, ov, s_wt[buf], carry_gt, carry_eq);
        if (carry_gt + min(carry_eq, k_eq) >= k) break;  // all k written; block-uniform
    }
}

}  // namespace topk
}  // namespace frugal

// ---------------------------------------------------------------------------
// Exported symbols.

#define FRUGAL_TOPK_KERNEL(NAME, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(FRUGAL_TOPK_THREADS, 1)                                  \
        NAME(const T* __restrict__ x, unsigned int* __restrict__ out_idx, T* __restrict__ out_val,        \
             TopkParams p) {                                                                              \
        frugal::topk::topk_impl<T>(x, out_idx, out_val, p);                                               \
    }

FRUGAL_TOPK_KERNEL(topk_f32, float)
FRUGAL_TOPK_KERNEL(topk_f16, __half)
FRUGAL_TOPK_KERNEL(topk_bf16, __nv_bfloat16)
