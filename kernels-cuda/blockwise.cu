// Blockwise attention (DESIGN.md 4.4): one Q block against one KV block with
// global offsets q0/k0. Forward in FlashAttention-2 order (a tile of query rows
// per block, KV tiles staged in shared memory, online softmax in f32, KV tiles
// past the tile's last visible key skipped), LSE merge, finalize, and the
// backward as a pre-pass (delta), a dK/dV kernel per KV tile looping over query
// rows and a dQ kernel per Q tile looping over keys: no float atomics.
//
// Plain f32 FMA on CUDA cores (no mma.sync): 128 threads as 16 x 8
// (ty = tid / 8, tx = tid % 8); scores are register micro-tiles (rows of ty,
// keys of tx) over shared-memory f32 tiles with an odd row stride; outputs are
// per-thread register tiles (rows of ty, columns tx + 8c).

#include "common.cuh"

namespace frugal_bw {

using frugal::from_float;
using frugal::neg_inf;
using frugal::to_float;

struct BwParams {
    long long q_st[3];
    long long k_st[3];
    long long v_st[3];
    long long o_st[3];  // dO and the finalized output
    int batch, q_heads, kv_heads, head_dim;
    int q_len, kv_len, q0, k0;
    int causal, accumulate;
    float scale;
    int pad;
};
static_assert(sizeof(BwParams) == 144, "BwParams must match KernelParams in src/blockwise/cuda.rs");

constexpr int kThreads = 128;
constexpr int kTile = 32;  // keys per tile (forward, dQ); query rows per step (dK/dV, dQ)

__device__ __forceinline__ bool visible(const BwParams& p, int i, int j) {
    return !p.causal || p.k0 + j <= p.q0 + i;
}

// Keys [0, keys_end(i)) hold every key query row i sees (sums fit: validated <= i32::MAX).
__device__ __forceinline__ int keys_end(const BwParams& p, int i) {
    if (!p.causal) return p.kv_len;
    const int past = p.q0 + i + 1;
    if (past <= p.k0) return 0;
    return min(p.kv_len, past - p.k0);
}

// Shared-memory row stride in floats: odd, so rows fall in different banks.
__device__ __forceinline__ int row_stride(int d) { return d | 1; }

// Stages rows [0, n) of a strided tensor (row stride row_st, contiguous d) into
// dst[r * ds + d] as f32 times mul, zero-filling rows [n, rows).
template <typename T>
__device__ __forceinline__ void stage_rows(float* dst, const T* base, long long row_st, int n, int rows, int d_len,
                                           int ds, float mul) {
    for (int e = threadIdx.x; e < rows * d_len; e += kThreads) {
        const int r = e / d_len;
        const int d = e - r * d_len;
        float x = 0.f;
        if (r < n) x = to_float(base[(long long)r * row_st + d]) * mul;
        dst[r * ds + d] = x;
    }
}

// Max / sum over the 8 lanes that share a ty (lane bits 0-2 are tx).
__device__ __forceinline__ float max8(float x) {
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) x = fmaxf(x, __shfl_xor_sync(frugal::kFullMask, x, off));
    return x;
}
__device__ __forceinline__ float sum8(float x) {
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) x += __shfl_xor_sync(frugal::kFullMask, x, off);
    return x;
}

// ---------------------------------------------------------------------------
// Forward. Block: BQ = 16 RM query rows of one (sequence, query head); thread
// (ty, tx) owns rows ty RM + r and, per KV tile of 32 keys, the scores of keys
// tx 4 + c, and output columns tx + 8c. Accumulate mode starts from the caller's
// (O, lse) as the state (m = lse, l = 1, acc = O): the LSE merge, incrementally.
// Shared: q_sh [BQ][ds] (pre-scaled), kv_sh [32][ds] (K, then V), p_sh [BQ][33].
template <typename T, int DMAX, int RM>
__device__ __forceinline__ void forward_impl(const T* __restrict__ q, const T* __restrict__ k,
                                             const T* __restrict__ v, float* __restrict__ o,
                                             float* __restrict__ lse, const BwParams& p) {
    constexpr int BQ = 16 * RM;
    constexpr int BK = kTile;
    constexpr int DC = DMAX / 8;
    extern __shared__ float smem[];
    const int D = p.head_dim;
    const int ds = row_stride(D);
    float* q_sh = smem;
    float* kv_sh = q_sh + BQ * ds;
    float* p_sh = kv_sh + BK * ds;
    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const int i0 = blockIdx.x * BQ, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (p.q_heads / p.kv_heads);
    const int rows = min(BQ, p.q_len - i0);
    const long long row0 = ((long long)b * p.q_heads + h) * p.q_len + i0;

    stage_rows(q_sh, q + b * p.q_st[0] + h * p.q_st[1] + (long long)i0 * p.q_st[2], p.q_st[2], rows, BQ, D, ds,
               p.scale);

    float m[RM], l[RM], acc[RM][DC];
#pragma unroll
    for (int r = 0; r < RM; ++r) {
        const int i = ty * RM + r;
        m[r] = neg_inf();
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < DC; ++c) acc[r][c] = 0.f;
        if (p.accumulate && i < rows) {
            const float old = lse[row0 + i];
            if (old != neg_inf()) {
                m[r] = old;
                l[r] = 1.f;
#pragma unroll
                for (int c = 0; c < DC; ++c) {
                    const int d = tx + 8 * c;
                    if (d < D) acc[r][c] = o[(row0 + i) * D + d];
                }
            }
        }
    }

    const int kend = keys_end(p, i0 + rows - 1);
    const T* kb = k + b * p.k_st[0] + g * p.k_st[1];
    const T* vb = v + b * p.v_st[0] + g * p.v_st[1];
    for (int j0 = 0; j0 < kend; j0 += BK) {
        const int nk = min(BK, kend - j0);
        __syncthreads();  // q_sh staged; the previous tile's readers of kv_sh and p_sh are done
        stage_rows(kv_sh, kb + (long long)j0 * p.k_st[2], p.k_st[2], nk, BK, D, ds, 1.f);
        __syncthreads();
        float s[RM][4];
#pragma unroll
        for (int r = 0; r < RM; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[r][c] = 0.f;
        for (int d = 0; d < D; ++d) {
            float a[RM], kk[4];
#pragma unroll
            for (int r = 0; r < RM; ++r) a[r] = q_sh[(ty * RM + r) * ds + d];
#pragma unroll
            for (int c = 0; c < 4; ++c) kk[c] = kv_sh[(tx * 4 + c) * ds + d];
#pragma unroll
            for (int r = 0; r < RM; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[r][c] = fmaf(a[r], kk[c], s[r][c]);
        }
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            const int i = ty * RM + r;
            float mt = neg_inf();
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int j = tx * 4 + c;
                if (!(i < rows && j < nk && visible(p, i0 + i, j0 + j))) s[r][c] = neg_inf();
                mt = fmaxf(mt, s[r][c]);
            }
            mt = max8(mt);
            const float mn = fmaxf(m[r], mt);
            // exp(-inf - finite) = 0 rescales an empty state; nothing seen yet keeps alpha = 1.
            const float alpha = (mn == neg_inf()) ? 1.f : expf(m[r] - mn);
            float ps = 0.f;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float pr = (s[r][c] == neg_inf()) ? 0.f : expf(s[r][c] - mn);
                p_sh[i * (BK + 1) + tx * 4 + c] = pr;
                ps += pr;
            }
            ps = sum8(ps);
            l[r] = l[r] * alpha + ps;
            m[r] = mn;
#pragma unroll
            for (int c = 0; c < DC; ++c) acc[r][c] *= alpha;
        }
        __syncthreads();  // K reads done, P visible
        stage_rows(kv_sh, vb + (long long)j0 * p.v_st[2], p.v_st[2], nk, BK, D, ds, 1.f);
        __syncthreads();
        for (int j = 0; j < nk; ++j) {
            float vv[DC];
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                const int d = tx + 8 * c;
                vv[c] = (d < D) ? kv_sh[j * ds + d] : 0.f;
            }
#pragma unroll
            for (int r = 0; r < RM; ++r) {
                const float pr = p_sh[(ty * RM + r) * (BK + 1) + j];
#pragma unroll
                for (int c = 0; c < DC; ++c) acc[r][c] = fmaf(pr, vv[c], acc[r][c]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < RM; ++r) {
        const int i = ty * RM + r;
        if (i >= rows) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            const int d = tx + 8 * c;
            if (d < D) o[(row0 + i) * D + d] = acc[r][c] * inv;
        }
        if (tx == 0) lse[row0 + i] = l[r] > 0.f ? m[r] + logf(l[r]) : neg_inf();
    }
}

// ---------------------------------------------------------------------------
// Merge: one thread per row.
__device__ __forceinline__ void merge_impl(float* __restrict__ o, float* __restrict__ lse,
                                           const float* __restrict__ ob, const float* __restrict__ lseb,
                                           const BwParams& p) {
    const long long rows = (long long)p.batch * p.q_heads * p.q_len;
    const long long r = (long long)blockIdx.x * kThreads + threadIdx.x;
    if (r >= rows) return;
    const int D = p.head_dim;
    const float la = lse[r], lb = lseb[r];
    float* orow = o + r * D;
    const float* brow = ob + r * D;
    if (lb == neg_inf()) {
        if (la == neg_inf())
            for (int d = 0; d < D; ++d) orow[d] = 0.f;
        return;
    }
    if (la == neg_inf()) {
        for (int d = 0; d < D; ++d) orow[d] = brow[d];
        lse[r] = lb;
        return;
    }
    const float hi = fmaxf(la, lb);
    const float m = hi + log1pf(expf(fminf(la, lb) - hi));
    const float wa = expf(la - m), wb = expf(lb - m);
    for (int d = 0; d < D; ++d) orow[d] = orow[d] * wa + brow[d] * wb;
    lse[r] = m;
}

// Finalize: one thread per element of O.
template <typename T>
__device__ __forceinline__ void finalize_impl(const float* __restrict__ o, const float* __restrict__ lse,
                                              T* __restrict__ out, const BwParams& p) {
    const int D = p.head_dim;
    const long long n = (long long)p.batch * p.q_heads * p.q_len * D;
    const long long e = (long long)blockIdx.x * kThreads + threadIdx.x;
    if (e >= n) return;
    const long long r = e / D;
    const int d = (int)(e - r * D);
    const int i = (int)(r % p.q_len);
    const long long bh = r / p.q_len;
    const int h = (int)(bh % p.q_heads), b = (int)(bh / p.q_heads);
    const float x = (lse[r] == neg_inf()) ? 0.f : o[e];
    out[b * p.o_st[0] + h * p.o_st[1] + (long long)i * p.o_st[2] + d] = from_float<T>(x);
}

// Backward pre-pass: delta = rowsum(dO * O), one warp per row.
template <typename T>
__device__ __forceinline__ void prepass_impl(const float* __restrict__ o, const T* __restrict__ d_o,
                                             float* __restrict__ delta, const BwParams& p) {
    const long long rows = (long long)p.batch * p.q_heads * p.q_len;
    const long long r = (long long)blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;  // whole warps leave together
    const int D = p.head_dim;
    const int i = (int)(r % p.q_len);
    const long long bh = r / p.q_len;
    const int h = (int)(bh % p.q_heads), b = (int)(bh / p.q_heads);
    const T* dorow = d_o + b * p.o_st[0] + h * p.o_st[1] + (long long)i * p.o_st[2];
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) acc = fmaf(to_float(dorow[d]), o[r * D + d], acc);
    acc = frugal::warp_sum(acc);
    if (lane == 0) delta[r] = acc;
}

// ---------------------------------------------------------------------------
// Backward dK/dV. Block: BKV = 16 KPT keys of one (sequence, kv head), K and V
// staged once; loops over the group's query heads and over 32-row query steps
// that see the keys (causal: from the first row that sees key j0). Per step,
// thread (ty, tx) forms S and dP for rows ty 2 + rr and keys tx SK + c, writes
// P and dS = P (dP - delta) to shared memory, then accumulates
// dV += P^T dO and dK += dS^T Q for keys ty KPT + kk, columns tx + 8c in
// registers; they are added into the caller's dK/dV once at the end.
// Shared: k_sh, v_sh [BKV][ds]; q_sh, do_sh [32][ds]; p_sh, ds_sh [32][BKV + 1].
template <typename T, int DMAX, int KPT>
__device__ __forceinline__ void dkv_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                         const T* __restrict__ d_o, const float* __restrict__ lse,
                                         const float* __restrict__ delta, float* __restrict__ dk,
                                         float* __restrict__ dv, const BwParams& p) {
    constexpr int BKV = 16 * KPT;
    constexpr int BQ = kTile;
    constexpr int SK = BKV / 8;
    constexpr int DC = DMAX / 8;
    constexpr int PS = BKV + 1;
    extern __shared__ float smem[];
    const int D = p.head_dim;
    const int ds = row_stride(D);
    float* k_sh = smem;
    float* v_sh = k_sh + BKV * ds;
    float* q_sh = v_sh + BKV * ds;
    float* do_sh = q_sh + BQ * ds;
    float* p_sh = do_sh + BQ * ds;
    float* ds_sh = p_sh + BQ * PS;
    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const int j0 = blockIdx.x * BKV, g = blockIdx.y, b = blockIdx.z;
    const int groups = p.q_heads / p.kv_heads;
    const int nk = min(BKV, p.kv_len - j0);

    stage_rows(k_sh, k + b * p.k_st[0] + g * p.k_st[1] + (long long)j0 * p.k_st[2], p.k_st[2], nk, BKV, D, ds, 1.f);
    stage_rows(v_sh, v + b * p.v_st[0] + g * p.v_st[1] + (long long)j0 * p.v_st[2], p.v_st[2], nk, BKV, D, ds, 1.f);

    float dk_acc[KPT][DC], dv_acc[KPT][DC];
#pragma unroll
    for (int kk = 0; kk < KPT; ++kk)
#pragma unroll
        for (int c = 0; c < DC; ++c) dk_acc[kk][c] = dv_acc[kk][c] = 0.f;

    const int i_start = (p.causal && p.k0 + j0 > p.q0) ? p.k0 + j0 - p.q0 : 0;
    for (int hh = 0; hh < groups; ++hh) {
        const int h = g * groups + hh;
        const long long hrow0 = ((long long)b * p.q_heads + h) * p.q_len;
        for (int i0 = i_start; i0 < p.q_len; i0 += BQ) {
            const int rows = min(BQ, p.q_len - i0);
            __syncthreads();  // K/V staged; the previous step's readers are done
            stage_rows(q_sh, q + b * p.q_st[0] + h * p.q_st[1] + (long long)i0 * p.q_st[2], p.q_st[2], rows, BQ, D,
                       ds, 1.f);
            stage_rows(do_sh, d_o + b * p.o_st[0] + h * p.o_st[1] + (long long)i0 * p.o_st[2], p.o_st[2], rows, BQ,
                       D, ds, 1.f);
            __syncthreads();
            float s[2][SK], dp[2][SK];
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                for (int c = 0; c < SK; ++c) s[rr][c] = dp[rr][c] = 0.f;
            for (int d = 0; d < D; ++d) {
                float aq[2], ado[2], bk[SK], bv[SK];
#pragma unroll
                for (int rr = 0; rr < 2; ++rr) {
                    aq[rr] = q_sh[(ty * 2 + rr) * ds + d];
                    ado[rr] = do_sh[(ty * 2 + rr) * ds + d];
                }
#pragma unroll
                for (int c = 0; c < SK; ++c) {
                    bk[c] = k_sh[(tx * SK + c) * ds + d];
                    bv[c] = v_sh[(tx * SK + c) * ds + d];
                }
#pragma unroll
                for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                    for (int c = 0; c < SK; ++c) {
                        s[rr][c] = fmaf(aq[rr], bk[c], s[rr][c]);
                        dp[rr][c] = fmaf(ado[rr], bv[c], dp[rr][c]);
                    }
            }
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const int i = ty * 2 + rr;
                const float L = (i < rows) ? lse[hrow0 + i0 + i] : neg_inf();
                const float dl = (i < rows) ? delta[hrow0 + i0 + i] : 0.f;
#pragma unroll
                for (int c = 0; c < SK; ++c) {
                    const int j = tx * SK + c;
                    const bool seen = i < rows && j < nk && L != neg_inf() && visible(p, i0 + i, j0 + j);
                    const float pr = seen ? expf(s[rr][c] * p.scale - L) : 0.f;
                    p_sh[i * PS + j] = pr;
                    ds_sh[i * PS + j] = pr * (dp[rr][c] - dl);
                }
            }
            __syncthreads();
            for (int r = 0; r < rows; ++r) {
                float qq[DC], dd[DC];
#pragma unroll
                for (int c = 0; c < DC; ++c) {
                    const int d = tx + 8 * c;
                    qq[c] = (d < D) ? q_sh[r * ds + d] : 0.f;
                    dd[c] = (d < D) ? do_sh[r * ds + d] : 0.f;
                }
#pragma unroll
                for (int kk = 0; kk < KPT; ++kk) {
                    const int j = ty * KPT + kk;
                    const float pr = p_sh[r * PS + j], dsv = ds_sh[r * PS + j];
#pragma unroll
                    for (int c = 0; c < DC; ++c) {
                        dv_acc[kk][c] = fmaf(pr, dd[c], dv_acc[kk][c]);
                        dk_acc[kk][c] = fmaf(dsv, qq[c], dk_acc[kk][c]);
                    }
                }
            }
        }
    }

    const long long kv_row0 = ((long long)b * p.kv_heads + g) * p.kv_len + j0;
#pragma unroll
    for (int kk = 0; kk < KPT; ++kk) {
        const int j = ty * KPT + kk;
        if (j >= nk) continue;
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            const int d = tx + 8 * c;
            if (d >= D) continue;
            const long long idx = (kv_row0 + j) * D + d;
            dk[idx] += p.scale * dk_acc[kk][c];
            dv[idx] += dv_acc[kk][c];
        }
    }
}

// ---------------------------------------------------------------------------
// Backward dQ. Block: 32 query rows of one (sequence, query head), Q and dO
// staged once; per KV tile of 32 keys (only those the rows see), thread
// (ty, tx) forms S and dP for rows ty 2 + rr and keys tx 4 + c, writes dS to
// shared memory, then accumulates dQ += dS K for rows ty 2 + rr, columns
// tx + 8c in registers; added into the caller's dQ at the end.
// Shared: q_sh, do_sh [32][ds]; k_sh, v_sh [32][ds]; ds_sh [32][33].
template <typename T, int DMAX>
__device__ __forceinline__ void dq_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                        const T* __restrict__ d_o, const float* __restrict__ lse,
                                        const float* __restrict__ delta, float* __restrict__ dq, const BwParams& p) {
    constexpr int BQ = kTile;
    constexpr int BK = kTile;
    constexpr int DC = DMAX / 8;
    constexpr int PS = BK + 1;
    extern __shared__ float smem[];
    const int D = p.head_dim;
    const int ds = row_stride(D);
    float* q_sh = smem;
    float* do_sh = q_sh + BQ * ds;
    float* k_sh = do_sh + BQ * ds;
    float* v_sh = k_sh + BK * ds;
    float* ds_sh = v_sh + BK * ds;
    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const int i0 = blockIdx.x * BQ, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (p.q_heads / p.kv_heads);
    const int rows = min(BQ, p.q_len - i0);
    const long long row0 = ((long long)b * p.q_heads + h) * p.q_len + i0;

    stage_rows(q_sh, q + b * p.q_st[0] + h * p.q_st[1] + (long long)i0 * p.q_st[2], p.q_st[2], rows, BQ, D, ds, 1.f);
    stage_rows(do_sh, d_o + b * p.o_st[0] + h * p.o_st[1] + (long long)i0 * p.o_st[2], p.o_st[2], rows, BQ, D, ds,
               1.f);
    float L[2], dl[2], acc[2][DC];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int i = ty * 2 + rr;
        L[rr] = (i < rows) ? lse[row0 + i] : neg_inf();
        dl[rr] = (i < rows) ? delta[row0 + i] : 0.f;
#pragma unroll
        for (int c = 0; c < DC; ++c) acc[rr][c] = 0.f;
    }

    const int kend = keys_end(p, i0 + rows - 1);
    const T* kb = k + b * p.k_st[0] + g * p.k_st[1];
    const T* vb = v + b * p.v_st[0] + g * p.v_st[1];
    for (int j0 = 0; j0 < kend; j0 += BK) {
        const int nk = min(BK, kend - j0);
        __syncthreads();  // Q/dO staged; the previous tile's readers are done
        stage_rows(k_sh, kb + (long long)j0 * p.k_st[2], p.k_st[2], nk, BK, D, ds, 1.f);
        stage_rows(v_sh, vb + (long long)j0 * p.v_st[2], p.v_st[2], nk, BK, D, ds, 1.f);
        __syncthreads();
        float s[2][4], dp[2][4];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[rr][c] = dp[rr][c] = 0.f;
        for (int d = 0; d < D; ++d) {
            float aq[2], ado[2], bk[4], bv[4];
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                aq[rr] = q_sh[(ty * 2 + rr) * ds + d];
                ado[rr] = do_sh[(ty * 2 + rr) * ds + d];
            }
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                bk[c] = k_sh[(tx * 4 + c) * ds + d];
                bv[c] = v_sh[(tx * 4 + c) * ds + d];
            }
#pragma unroll
            for (int rr = 0; rr < 2; ++rr)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    s[rr][c] = fmaf(aq[rr], bk[c], s[rr][c]);
                    dp[rr][c] = fmaf(ado[rr], bv[c], dp[rr][c]);
                }
        }
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
            const int i = ty * 2 + rr;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int j = tx * 4 + c;
                const bool seen = i < rows && j < nk && L[rr] != neg_inf() && visible(p, i0 + i, j0 + j);
                const float pr = seen ? expf(s[rr][c] * p.scale - L[rr]) : 0.f;
                ds_sh[i * PS + j] = pr * (dp[rr][c] - dl[rr]);
            }
        }
        __syncthreads();
        for (int j = 0; j < nk; ++j) {
            float kk[DC];
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                const int d = tx + 8 * c;
                kk[c] = (d < D) ? k_sh[j * ds + d] : 0.f;
            }
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                const float dsv = ds_sh[(ty * 2 + rr) * PS + j];
#pragma unroll
                for (int c = 0; c < DC; ++c) acc[rr][c] = fmaf(dsv, kk[c], acc[rr][c]);
            }
        }
    }

#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const int i = ty * 2 + rr;
        if (i >= rows) continue;
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            const int d = tx + 8 * c;
            if (d < D) dq[(row0 + i) * D + d] += p.scale * acc[rr][c];
        }
    }
}

}  // namespace frugal_bw

// ---------------------------------------------------------------------------
// Entry points: bw_<kind>_<dtype>[_d<D_MAX>]; D_MAX 64 and 128 use RM = 4,
// KPT = 2; D_MAX 256 uses RM = 2, KPT = 1 (register budget). Keep in sync with
// `variant` in src/blockwise/cuda.rs.

extern "C" __global__ void __launch_bounds__(frugal_bw::kThreads)
    bw_merge(float* o, float* lse, const float* ob, const float* lseb, frugal_bw::BwParams p) {
    frugal_bw::merge_impl(o, lse, ob, lseb, p);
}

#define BW_DTYPE_KERNELS(NAME, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(frugal_bw::kThreads)                                          \
        bw_finalize_##NAME(const float* o, const float* lse, T* out, frugal_bw::BwParams p) {                  \
        frugal_bw::finalize_impl<T>(o, lse, out, p);                                                           \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(frugal_bw::kThreads)                                          \
        bw_prepass_##NAME(const float* o, const T* d_o, float* delta, frugal_bw::BwParams p) {                 \
        frugal_bw::prepass_impl<T>(o, d_o, delta, p);                                                          \
    }

#define BW_DIM_KERNELS(NAME, T, DMAX, RM, KPT)                                                                 \
    extern "C" __global__ void __launch_bounds__(frugal_bw::kThreads)                                          \
        bw_forward_##NAME##_d##DMAX(const T* q, const T* k, const T* v, float* o, float* lse,                  \
                                    frugal_bw::BwParams p) {                                                   \
        frugal_bw::forward_impl<T, DMAX, RM>(q, k, v, o, lse, p);                                              \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(frugal_bw::kThreads)                                          \
        bw_dkv_##NAME##_d##DMAX(const T* q, const T* k, const T* v, const T* d_o, const float* lse,            \
                                const float* delta, float* dk, float* dv, frugal_bw::BwParams p) {             \
        frugal_bw::dkv_impl<T, DMAX, KPT>(q, k, v, d_o, lse, delta, dk, dv, p);                                \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(frugal_bw::kThreads)                                          \
        bw_dq_##NAME##_d##DMAX(const T* q, const T* k, const T* v, const T* d_o, const float* lse,             \
                               const float* delta, float* dq, frugal_bw::BwParams p) {                         \
        frugal_bw::dq_impl<T, DMAX>(q, k, v, d_o, lse, delta, dq, p);                                          \
    }

#define BW_ALL_DIMS(NAME, T)                  \
    BW_DTYPE_KERNELS(NAME, T)                 \
    BW_DIM_KERNELS(NAME, T, 64, 4, 2)         \
    BW_DIM_KERNELS(NAME, T, 128, 4, 2)        \
    BW_DIM_KERNELS(NAME, T, 256, 2, 1)

BW_ALL_DIMS(f32, float)
BW_ALL_DIMS(f16, __half)
BW_ALL_DIMS(bf16, __nv_bfloat16)
