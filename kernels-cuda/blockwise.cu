// Blockwise attention (DESIGN.md 4.4): one Q block against one KV block with
// global offsets q0/k0. Forward in FlashAttention-2 order (a tile of query rows
// per block, KV tiles staged in shared memory, online softmax in f32, KV tiles
// past the tile's last visible key skipped), LSE merge, finalize, and the
// backward as a pre-pass (delta), a dK/dV kernel per KV tile looping over query
// rows and a dQ kernel per Q tile looping over keys: no float atomics.
//
// f16/bf16 at head_dim 64/128 with 16-byte aligned rows: the forward and
// backward on tensor cores (forward_mma_impl, dkv_mma_impl, dq_mma_impl).
// Everything else: plain f32 FMA on CUDA cores, 128 threads as 16 x 8
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
// Tensor-core forward for f16/bf16 at head_dim 64 and 128 (FlashAttention-2
// order, mma.sync m16n8k16 with f32 accumulators). Same contract as
// forward_impl; the launcher picks it only when every Q/K/V row starts on a
// 16-byte boundary (base pointers 16-byte aligned, strides multiples of 8).
//
// Block: 4 warps, warp w owns query rows 16w..16w+15 of a 64-row tile; KV
// tiles of 64 keys, K and V double-buffered through cp.async. Per KV tile a
// warp forms S = Q K^T (Q fragments held in registers), scales it into the
// log2 domain, masks, updates the online softmax in exp2, converts P to T in
// registers and feeds it as the A operand of O += P V. Lane (grp = lane / 4,
// tig = lane % 4) holds rows grp and grp + 8 of its warp, and in each 8-wide
// n-tile the columns 2 tig and 2 tig + 1 (the m16n8 accumulator layout).
// Shared rows are padded by 8 elements (16 bytes) so the 8 row addresses of an
// ldmatrix phase fall in distinct banks.
// This block's own partial is formed from scratch; accumulate mode merges it
// into the caller's (O, lse) at the end by the LSE rule, so a row that sees no
// key of this block is left bit-identical (an empty state becomes exactly 0).
// Shared: q_sh [64][D+8], then per stage s in {0, 1}: K [64][D+8], V [64][D+8].

constexpr int kMmaThreads = 128;
constexpr int kMmaRows = 64;  // query rows per block (16 per warp)
constexpr int kMmaKeys = 64;  // keys per KV tile

#ifndef FRUGAL_CUDA_EMU  // tests/cuda_emu/ptx_emu.h stands in for these on the host
__device__ __forceinline__ unsigned smem_u32(const void* ptr) {
    return static_cast<unsigned>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row))
                 : "memory");
}

// c += a b for one m16n8k16 tile: a = 4 registers of A (row-major 16x16),
// b0/b1 = 2 registers of B (k-major 16x8), c = the 4 f32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                          unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif

// Two floats as a T pair in one register, lo in the low half (the lower column).
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);
template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&h);
}
template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&h);
}

#ifndef FRUGAL_CUDA_EMU
// 2^x (ex2.approx: 2 ulp, 2^-inf = 0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
#else
#include "ptx_emu.h"
#endif

// Starts the copy of rows [0, n) of a strided tensor (row stride row_st
// elements, every row 16-byte aligned) into dst[r * (D + 8) + d]; rows [n, ROWS)
// become zeros (plain stores, visible after the next __syncthreads).
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile_async(T* dst, const T* src, long long row_st, int n) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    static_assert((ROWS * CH) % kMmaThreads == 0, "tile chunks must split evenly over the block");
#pragma unroll
    for (int it = 0; it < ROWS * CH / kMmaThreads; ++it) {
        const int e = it * kMmaThreads + threadIdx.x;
        const int r = e / CH, c = e % CH;
        T* d = dst + r * (D + 8) + c * 8;
        if (r < n)
            cp_async16(d, src + (long long)r * row_st + c * 8);
        else
            *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
    }
}

constexpr float kLog2e = 1.4426950408889634f;

// Fragment helpers, for a row-major shared tile with row stride ST elements
// (lane = 4 grp + tig; the m16n8k16 register layouts of the PTX ISA):
// frag_a: A operand (16 rows x 16 k) at rows r0.., k-columns c0..; matrices
//   m0 rows +0..7 cols +0..7, m1 rows +8..15 cols +0..7, m2 rows +0..7 cols
//   +8..15, m3 rows +8..15 cols +8..15, so a[0..3] = (row grp, k 2tig),
//   (grp + 8, 2tig), (grp, 2tig + 8), (grp + 8, 2tig + 8).
// frag_b_nk: B operands of two n-tiles when the tile is stored [n][k] (B = tile^T):
//   rows r0.. are n, columns c0.. are k; matrices m0 n +0..7 k +0..7, m1 n +0..7
//   k +8..15, m2 n +8..15 k +0..7, m3 n +8..15 k +8..15; b[0] = k 2tig..2tig+1,
//   b[1] = k 2tig+8..2tig+9 at n = grp of n-tile 0; b[2], b[3] the same for n-tile 1.
// frag_b_kn: B operands of two n-tiles when the tile is stored [k][n] (ldmatrix
//   .trans): rows r0.. are k, columns c0.. are n; matrices m0 k +0..7 n +0..7,
//   m1 k +8..15 n +0..7, m2 k +0..7 n +8..15, m3 k +8..15 n +8..15; after the
//   transpose lane holds k 2tig, 2tig + 1 at n = grp, so b[0], b[1] serve n-tile
//   0 and b[2], b[3] n-tile 1.
// acc_to_a: the accumulators of n-tiles 2kt and 2kt + 1 (c0, c1 = row grp,
//   columns 2tig, 2tig + 1; c2, c3 = row grp + 8) are, packed to T, the A
//   fragment of k-columns 16kt..16kt + 15.
template <int ST, typename T>
__device__ __forceinline__ void frag_a(unsigned (&a)[4], const T* tile, int r0, int c0, int lane) {
    ldmatrix_x4(a, tile + (r0 + (lane & 15)) * ST + c0 + (lane >> 4) * 8);
}
template <int ST, typename T>
__device__ __forceinline__ void frag_b_nk(unsigned (&b)[4], const T* tile, int r0, int c0, int lane) {
    ldmatrix_x4(b, tile + (r0 + (lane & 7) + ((lane >> 4) << 3)) * ST + c0 + ((lane >> 3) & 1) * 8);
}
template <int ST, typename T>
__device__ __forceinline__ void frag_b_kn(unsigned (&b)[4], const T* tile, int r0, int c0, int lane) {
    ldmatrix_x4_trans(b, tile + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ST + c0 + (lane >> 4) * 8);
}
template <typename T>
__device__ __forceinline__ void acc_to_a(unsigned (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = pack2<T>(lo[0], lo[1]);
    a[1] = pack2<T>(lo[2], lo[3]);
    a[2] = pack2<T>(hi[0], hi[1]);
    a[3] = pack2<T>(hi[2], hi[3]);
}

// acc += A B for this warp's 16 rows: A is the warp's accumulator tiles `a`
// (columns 8 n.., as probabilities P or dS), packed to the input dtype 16
// columns at a time as A fragments; B is a [k][n] shared tile (row stride ST)
// whose rows are A's columns, read with ldmatrix.trans (matrices: k +0..7
// n +0..7, k +8..15 n +0..7, k +0..7 n +8..15, k +8..15 n +8..15).
// O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q.
template <typename T, int ST, int NK, int ND>
__device__ __forceinline__ void acc_times_tile(float (&acc)[ND][4], const float (&a)[NK][4], const T* b, int lane) {
#pragma unroll
    for (int kt = 0; kt < NK / 2; ++kt) {
        unsigned af[4];
        acc_to_a<T>(af, a[2 * kt], a[2 * kt + 1]);
#pragma unroll
        for (int dn = 0; dn < ND / 2; ++dn) {
            unsigned bf[4];
            frag_b_kn<ST>(bf, b, kt * 16, dn * 16, lane);
            mma_16816<T>(acc[2 * dn], af, bf[0], bf[1]);
            mma_16816<T>(acc[2 * dn + 1], af, bf[2], bf[3]);
        }
    }
}

// The two score products of a backward step for this warp's 16 rows: x = A_x
// B_x^T and y = A_y B_y^T over the head dim (KD k-steps), where the A tiles
// are stored [row][dim] (rows row0..row0+15) and the B tiles [n][dim] with NN
// n-tiles of 8. dK/dV: (K, Q) and (V, dO); dQ: (Q, K) and (dO, V).
template <typename T, int ST, int KD, int NN>
__device__ __forceinline__ void paired_products(float (&x)[NN][4], float (&y)[NN][4], const T* a_x, const T* a_y,
                                                const T* b_x, const T* b_y, int row0, int lane) {
#pragma unroll
    for (int n = 0; n < NN; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[n][e] = y[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
        unsigned ax[4], ay[4];
        frag_a<ST>(ax, a_x, row0, kk * 16, lane);
        frag_a<ST>(ay, a_y, row0, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < NN / 2; ++np) {
            unsigned bx[4], by[4];
            frag_b_nk<ST>(bx, b_x, np * 16, kk * 16, lane);
            frag_b_nk<ST>(by, b_y, np * 16, kk * 16, lane);
            mma_16816<T>(x[2 * np], ax, bx[0], bx[1]);
            mma_16816<T>(x[2 * np + 1], ax, bx[2], bx[3]);
            mma_16816<T>(y[2 * np], ay, by[0], by[1]);
            mma_16816<T>(y[2 * np + 1], ay, by[2], by[3]);
        }
    }
}

// Forward helpers shared by the mma.sync and wgmma kernels. Their tiles are in
// the m16n8 accumulator layout, [n-tile][e]: this lane's rows r0 (e < 2) and
// r0 + 8 (e >= 2) of the block, columns 8 n + 2 tig + (e & 1).

// Scales a tile of scores into log2 units; when `need_mask` (a tile that
// crosses the key end, the last row or the causal diagonal) masks keys past
// kv_len, rows past `rows` and keys the causal mask hides.
template <int NK>
__device__ __forceinline__ void scores_to_log2(float (&s)[NK][4], float sl2, bool need_mask, int r0, int tig, int i0,
                                               int j0, int rows, const BwParams& p) {
#pragma unroll
    for (int n = 0; n < NK; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float x = s[n][e] * sl2;
            if (need_mask) {
                const int i = r0 + (e >> 1) * 8;
                const int j = j0 + n * 8 + tig * 2 + (e & 1);
                const bool seen = j < p.kv_len && i < rows && visible(p, i0 + i, j);
                if (!seen) x = neg_inf();
            }
            s[n][e] = x;
        }
}

// One tile of the online softmax: s (log2 units) becomes P = 2^(s - m) for the
// updated row maxima m, l (this lane's share of each row's sum, reduced over
// the quad at the end) is updated, and alpha is the factor the output
// accumulators must be rescaled by (rescale_rows; the wgmma kernel defers it
// while P V of the previous tile is in flight). A row with nothing seen yet
// keeps m = -inf and uses 0 as its reference, so 2^(-inf - 0) = 0 and no
// -inf - -inf arises.
template <int NK>
__device__ __forceinline__ void online_softmax(float (&s)[NK][4], float (&m)[2], float (&l)[2], float (&alpha)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mt = neg_inf();
#pragma unroll
        for (int n = 0; n < NK; ++n) mt = fmaxf(mt, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        mt = fmaxf(mt, __shfl_xor_sync(frugal::kFullMask, mt, 1));
        mt = fmaxf(mt, __shfl_xor_sync(frugal::kFullMask, mt, 2));
        const float mn = fmaxf(m[r], mt);
        const float ref = (mn == neg_inf()) ? 0.f : mn;
        alpha[r] = fast_exp2(m[r] - ref);
        m[r] = mn;
        float ps = 0.f;
#pragma unroll
        for (int n = 0; n < NK; ++n)
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; ++e) {
                const float pr = fast_exp2(s[n][e] - ref);
                s[n][e] = pr;
                ps += pr;
            }
        l[r] = l[r] * alpha[r] + ps;
    }
}

template <int ND>
__device__ __forceinline__ void rescale_rows(float (&acc)[ND][4], const float (&alpha)[2]) {
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] *= alpha[e >> 1];
}

// Epilogue per row: this block's partial is (acc / l, lse_b); in accumulate
// mode it is merged into the caller's (O, lse) as in merge_impl, so a row that
// sees no key of this block is left bit-identical (an empty state becomes
// exactly 0). `row0` is the global row of the block's first query row.
template <int ND>
__device__ __forceinline__ void write_partial(const float (&acc)[ND][4], const float (&m)[2], const float (&l)[2],
                                              int r0, int tig, int rows, long long row0, float* __restrict__ o,
                                              float* __restrict__ lse, const BwParams& p) {
    constexpr int D = ND * 8;
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float lr = l[r];
        lr += __shfl_xor_sync(frugal::kFullMask, lr, 1);
        lr += __shfl_xor_sync(frugal::kFullMask, lr, 2);
        const int i = r0 + r * 8;
        const bool valid = i < rows;
        const long long row = row0 + i;
        const float lse_b = lr > 0.f ? (m[r] + log2f(lr)) * kLn2 : neg_inf();
        // Every lane of the quad reads the old lse before lane tig 0 rewrites it.
        float lse_a = neg_inf();
        if (valid && p.accumulate) lse_a = lse[row];
        __syncwarp();
        if (!valid) continue;
        if (lse_b == neg_inf()) {
            // Nothing seen here: the empty partial; accumulating, no change
            // unless the state is empty too, which the merge rule makes (0, -inf).
            if (lse_a == neg_inf()) {
#pragma unroll
                for (int n = 0; n < ND; ++n) {
                    o[row * D + n * 8 + tig * 2] = 0.f;
                    o[row * D + n * 8 + tig * 2 + 1] = 0.f;
                }
                if (tig == 0) lse[row] = neg_inf();
            }
            continue;
        }
        float wb = 1.f / lr, wa = 0.f, lse_m = lse_b;
        if (lse_a != neg_inf()) {
            const float hi = fmaxf(lse_a, lse_b);
            lse_m = hi + log1pf(expf(fminf(lse_a, lse_b) - hi));
            wa = expf(lse_a - lse_m);
            wb *= expf(lse_b - lse_m);
        }
#pragma unroll
        for (int n = 0; n < ND; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                float* dst = o + row * D + n * 8 + tig * 2 + c;
                const float x = acc[n][2 * r + c] * wb;
                *dst = (lse_a != neg_inf()) ? *dst * wa + x : x;
            }
        if (tig == 0) lse[row] = lse_m;
    }
}

template <typename T, int D>
__device__ __forceinline__ void forward_mma_impl(const T* __restrict__ q, const T* __restrict__ k,
                                                 const T* __restrict__ v, float* __restrict__ o,
                                                 float* __restrict__ lse, const BwParams& p) {
    static_assert(D == 64 || D == 128, "the tensor-core forward covers head_dim 64 and 128");
    constexpr int BQ = kMmaRows, BK = kMmaKeys;
    constexpr int ST = D + 8;   // shared row stride in elements
    constexpr int KD = D / 16;  // k-steps over the head dim (S = Q K^T)
    constexpr int ND = D / 8;   // 8-wide n-tiles over the head dim (O)
    constexpr int NK = BK / 8;  // 8-wide n-tiles over the keys (S)
    extern __shared__ __align__(16) unsigned char bw_mma_smem[];
    T* q_sh = reinterpret_cast<T*>(bw_mma_smem);
    T* kv_sh = q_sh + BQ * ST;  // stage s: K at kv_sh + 2 s BK ST, V right after

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, grp = lane >> 2, tig = lane & 3;
    // Causal: the tiles with the most keys first, so the short ones fill the tail.
    const int qt = p.causal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
    const int i0 = qt * BQ, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (p.q_heads / p.kv_heads);
    const int rows = min(BQ, p.q_len - i0);
    const long long row0 = ((long long)b * p.q_heads + h) * p.q_len + i0;
    const int kend = keys_end(p, i0 + rows - 1);
    const int ntiles = (kend + BK - 1) / BK;
    const T* kb = k + b * p.k_st[0] + g * p.k_st[1];
    const T* vb = v + b * p.v_st[0] + g * p.v_st[1];
    const float sl2 = p.scale * kLog2e;

    // Row state for rows grp (index 0) and grp + 8 (index 1) of this warp, in
    // log2 units: m = running max of scale log2(e) q.k, l = this lane's share of
    // sum 2^(s - m) (summed over the quad at the end).
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
    float acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

    if (ntiles > 0) {
        load_tile_async<T, D, BQ>(q_sh, q + b * p.q_st[0] + h * p.q_st[1] + (long long)i0 * p.q_st[2], p.q_st[2],
                                  rows);
        const int nk = min(BK, kend);
        load_tile_async<T, D, BK>(kv_sh, kb, p.k_st[2], nk);
        load_tile_async<T, D, BK>(kv_sh + BK * ST, vb, p.v_st[2], nk);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
    }
    // Q fragments (A operand, 16 rows x 16 dims per k-step) for the whole loop.
    unsigned qf[KD][4];
    if (ntiles > 0) {
#pragma unroll
        for (int kk = 0; kk < KD; ++kk)
            frag_a<ST>(qf[kk], q_sh, warp * 16, kk * 16, lane);
    }

    for (int t = 0; t < ntiles; ++t) {
        const int j0 = t * BK;
        // Prefetch the next tile into the other stage (freed by the previous
        // iteration's closing barrier); the group is empty on the last tile.
        if (t + 1 < ntiles) {
            const int jn = j0 + BK;
            const int nk = min(BK, kend - jn);
            T* kn = kv_sh + ((t + 1) & 1) * 2 * BK * ST;
            load_tile_async<T, D, BK>(kn, kb + (long long)jn * p.k_st[2], p.k_st[2], nk);
            load_tile_async<T, D, BK>(kn + BK * ST, vb + (long long)jn * p.v_st[2], p.v_st[2], nk);
        }
        cp_async_commit();
        cp_async_wait<1>();  // this tile's group has landed
        __syncthreads();
        const T* ks = kv_sh + (t & 1) * 2 * BK * ST;
        const T* vs = ks + BK * ST;

        // S = Q K^T: per k-step one ldmatrix.x4 gives B fragments for two n-tiles
        // (matrices: keys +0..7 dims +0..7, keys +0..7 dims +8..15, keys +8..15 dims +0..7, +8..15 +8..15).
        float s[NK][4];
#pragma unroll
        for (int n = 0; n < NK; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
            for (int np = 0; np < NK / 2; ++np) {
                unsigned kf[4];
                frag_b_nk<ST>(kf, ks, np * 16, kk * 16, lane);
                mma_16816<T>(s[2 * np], qf[kk], kf[0], kf[1]);
                mma_16816<T>(s[2 * np + 1], qf[kk], kf[2], kf[3]);
            }
        }

        // Mask only tiles that cross the key end or the causal diagonal of the
        // block's first row (j0 + BK <= kv_len keeps the sum below i32::MAX).
        const bool need_mask = (j0 + BK > p.kv_len) || (p.causal && p.k0 + j0 + BK - 1 > p.q0 + i0);
        scores_to_log2(s, sl2, need_mask, warp * 16 + grp, tig, i0, j0, rows, p);
        float alpha[2];
        online_softmax(s, m, l, alpha);
        rescale_rows(acc, alpha);

        // O += P V (P: the S accumulators, kept in registers).
        acc_times_tile<T, ST>(acc, s, vs, lane);
        __syncthreads();  // every warp is done with this stage before it is refilled
    }

    write_partial(acc, m, l, warp * 16 + grp, tig, rows, row0, o, lse, p);
}

// ---------------------------------------------------------------------------
// Hopper forward (sm_90a: wgmma, the warpgroup-wide asynchronous tensor-core
// MMA) for f16/bf16 at head_dim 64 and 128. Same contract and launch
// conditions as forward_mma_impl, dispatched instead of it on compute
// capability 9.0.
//
// Block: 2 warpgroups (256 threads); warpgroup wg owns query rows 64 wg..64 wg
// + 63 of a 128-row tile. KV tiles of 128 keys, K and V double-buffered through
// cp.async. Per tile a warpgroup issues S = Q K^T as D/16 wgmma.m64n128k16 with
// both operands read from shared memory, then the online softmax on the S
// accumulators (the same m16n8 layout per warp as mma.sync, so the helpers above
// serve both kernels), then O += P V as 8 wgmma.m64nDk16 with P from registers
// (the S accumulators packed to T are the A fragment) and V read transposed
// (N-major) from shared memory.
// Shared tiles use the 128-byte swizzle that wgmma's descriptors describe: a
// tile of R rows x D columns is D/64 column blocks of R rows x 128 bytes, and
// the 16-byte chunk c of row r sits at chunk c ^ (r % 8) of its 128-byte row,
// so the 8 rows of a swizzle atom (1024 bytes, 1024-aligned) spread over all
// banks. K (B of S) and Q (A of S) are K-major (the head dim contiguous); V (B of
// P V, k = keys, n = dims) is N-major: the descriptor's leading byte offset is
// the stride between 64-dim column blocks, the stride byte offset the one
// between 8-key groups (PTX ISA, "Shared Memory Matrix Layout").
// Shared: a 1024-aligned Q [D/64][128][64], then per stage s in {0, 1}:
// K [D/64][128][64], V [D/64][128][64].

constexpr int kWgThreads = 256;  // two warpgroups

#if defined(FRUGAL_CUDA_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BW_HAS_WGMMA 1
constexpr int kWgRows = 128;  // query rows per block (64 per warpgroup); keys per dK/dV block
constexpr int kWgKeys = 128;  // keys per KV tile of the forward
#endif

#if !defined(FRUGAL_CUDA_EMU) && defined(BW_HAS_WGMMA)
// The accumulator operands of an m64nN f32 wgmma, N = 32, 64 or 128: N / 2
// registers a thread, d[n][e] for n-tile n (the m16n8 layout per warp).
#define BW_WG_ACC32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define BW_WG_ACC64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define BW_WG_ACC128                                                                                 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define BW_WG_OUT4(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define BW_WG_OUT32(d) BW_WG_OUT4(d, 0), BW_WG_OUT4(d, 1), BW_WG_OUT4(d, 2), BW_WG_OUT4(d, 3)
#define BW_WG_OUT64(d) BW_WG_OUT4(d, 0), BW_WG_OUT4(d, 1), BW_WG_OUT4(d, 2), BW_WG_OUT4(d, 3), BW_WG_OUT4(d, 4), \
    BW_WG_OUT4(d, 5), BW_WG_OUT4(d, 6), BW_WG_OUT4(d, 7)
#define BW_WG_OUT128(d) BW_WG_OUT64(d), BW_WG_OUT4(d, 8), BW_WG_OUT4(d, 9), BW_WG_OUT4(d, 10), BW_WG_OUT4(d, 11), \
    BW_WG_OUT4(d, 12), BW_WG_OUT4(d, 13), BW_WG_OUT4(d, 14), BW_WG_OUT4(d, 15)

// d (+)= A B for an m64nNk16 tile: A (64 x 16) and B (N x 16) both K-major in
// shared memory (descriptors); scale_d = 0 overwrites d.
template <typename T, int N>
__device__ __forceinline__ void wgmma_smem_kmajor(float (&d)[N / 8][4], unsigned long long a, unsigned long long b, int scale_d);
// d += A B for an m64nNk16 tile: A from registers (the m16n8k16 A fragment of
// this warp's 16 rows), B (16 x N) N-major in shared memory.
template <typename T, int N>
__device__ __forceinline__ void wgmma_regs_nmajor(float (&d)[N / 8][4], const unsigned (&a)[4], unsigned long long b);

#define BW_WGMMA_WRAPPERS(T, TS, N, ACC, OUT, PA, PB, PS, PR)                                                 \
    template <>                                                                                                \
    __device__ __forceinline__ void wgmma_smem_kmajor<T, N>(float (&d)[N / 8][4], unsigned long long a, unsigned long long b,      \
                                                            int scale_d) {                                     \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PS ", 0;\n"                                          \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TS "." TS " " ACC ", " PA ", " PB      \
                     ", p, 1, 1, 0, 0;\n}\n"                                                                   \
                     : OUT(d)                                                                                  \
                     : "l"(a), "l"(b), "r"(scale_d));                                                          \
    }                                                                                                          \
    template <>                                                                                                \
    __device__ __forceinline__ void wgmma_regs_nmajor<T, N>(float (&d)[N / 8][4], const unsigned (&a)[4],      \
                                                            unsigned long long b) {                                      \
        asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TS "." TS " " ACC ", " PR ", " PA      \
                     ", 1, 1, 1, 1;\n"                                                                         \
                     : OUT(d)                                                                                  \
                     : "l"(b), "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]));                                    \
    }

// Operand numbers after the N / 2 accumulators: SS: a, b, scale_d; RS: b, then the 4 A registers.
BW_WGMMA_WRAPPERS(__half, "f16", 32, BW_WG_ACC32, BW_WG_OUT32, "%16", "%17", "%18", "{%17, %18, %19, %20}")
BW_WGMMA_WRAPPERS(__half, "f16", 64, BW_WG_ACC64, BW_WG_OUT64, "%32", "%33", "%34", "{%33, %34, %35, %36}")
BW_WGMMA_WRAPPERS(__half, "f16", 128, BW_WG_ACC128, BW_WG_OUT128, "%64", "%65", "%66", "{%65, %66, %67, %68}")
BW_WGMMA_WRAPPERS(__nv_bfloat16, "bf16", 32, BW_WG_ACC32, BW_WG_OUT32, "%16", "%17", "%18", "{%17, %18, %19, %20}")
BW_WGMMA_WRAPPERS(__nv_bfloat16, "bf16", 64, BW_WG_ACC64, BW_WG_OUT64, "%32", "%33", "%34", "{%33, %34, %35, %36}")
BW_WGMMA_WRAPPERS(__nv_bfloat16, "bf16", 128, BW_WG_ACC128, BW_WG_OUT128, "%64", "%65", "%66",
                  "{%65, %66, %67, %68}")

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared-memory writes of the generic proxy (cp.async, st.shared) become
// visible to wgmma's reads (the async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// The compiler sees a wgmma's operands as used when the asm is issued, not when
// it completes: after wgmma_wait, "touch" the accumulators and A registers so
// that no read of d moves above the wait and no register of a is reused early.
template <int N>
__device__ __forceinline__ void wgmma_hold(float (&d)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[n][e])::"memory");
}
template <int N>
__device__ __forceinline__ void wgmma_hold(unsigned (&a)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[n][e])::"memory");
}
#endif

#ifdef BW_HAS_WGMMA
// A shared-memory matrix descriptor with the 128-byte swizzle: start address,
// leading and stride byte offsets (all >> 4), base offset 0 (1024-aligned atoms).
__device__ __forceinline__ unsigned long long sw128_desc(unsigned addr, unsigned lead_bytes, unsigned stride_bytes) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lead_bytes >> 4) << 16) |
           ((unsigned long long)(stride_bytes >> 4) << 32) | (1ull << 62);
}

// Starts the copy of rows [0, n) of a strided tensor (row stride row_st
// elements, every row 16-byte aligned) into a 128-byte-swizzled tile of ROWS
// rows at dst (see above); rows [n, ROWS) become zeros.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile_sw128(unsigned char* dst, const T* src, long long row_st, int n) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    static_assert((ROWS * CH) % kWgThreads == 0, "tile chunks must split evenly over the block");
#pragma unroll
    for (int it = 0; it < ROWS * CH / kWgThreads; ++it) {
        const int e = it * kWgThreads + threadIdx.x;
        const int r = e / CH, c = e % CH;
        unsigned char* d = dst + (c / 8) * (ROWS * 128) + r * 128 + (((c % 8) ^ (r % 8)) * 16);
        if (r < n)
            cp_async16(d, src + (long long)r * row_st + c * 8);
        else
            *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
    }
}

template <typename T, int D>
__device__ __forceinline__ void forward_wgmma_impl(const T* __restrict__ q, const T* __restrict__ k,
                                                   const T* __restrict__ v, float* __restrict__ o,
                                                   float* __restrict__ lse, const BwParams& p) {
    static_assert(D == 64 || D == 128, "the wgmma forward covers head_dim 64 and 128");
    constexpr int BQ = kWgRows, BK = kWgKeys;
    constexpr int ND = D / 8;   // 8-wide n-tiles over the head dim (O)
    constexpr int NK = BK / 8;  // 8-wide n-tiles over the keys (S)
    constexpr int TILE_Q = BQ * D * 2, TILE_KV = BK * D * 2;  // bytes
    extern __shared__ __align__(16) unsigned char bw_mma_smem[];
    // Align to 1024 bytes in the shared window (the swizzle atoms' boundary).
    const unsigned raw = smem_u32(bw_mma_smem);
    unsigned char* q_sh = bw_mma_smem + (((raw + 1023u) & ~1023u) - raw);
    unsigned char* k_sh = q_sh + TILE_Q;         // stage s at k_sh + s TILE_KV
    unsigned char* v_sh = k_sh + 2 * TILE_KV;    // stage s at v_sh + s TILE_KV
    const unsigned q_addr = smem_u32(q_sh), k_addr = smem_u32(k_sh), v_addr = smem_u32(v_sh);

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, grp = lane >> 2,
              tig = lane & 3;
    // Causal: the tiles with the most keys first, so the short ones fill the tail.
    const int qt = p.causal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
    const int i0 = qt * BQ, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (p.q_heads / p.kv_heads);
    const int rows = min(BQ, p.q_len - i0);
    const long long row0 = ((long long)b * p.q_heads + h) * p.q_len + i0;
    const int kend = keys_end(p, i0 + rows - 1);
    const int ntiles = (kend + BK - 1) / BK;
    const T* kb = k + b * p.k_st[0] + g * p.k_st[1];
    const T* vb = v + b * p.v_st[0] + g * p.v_st[1];
    const float sl2 = p.scale * kLog2e;
    const int r0 = wg * 64 + warp * 16 + grp;  // this lane's first row in the block

    // Tile t's K (V) lives in K (V) stage t % 2; rows past kend are zeros.
    auto load_k = [&](int t) {
        load_tile_sw128<T, D, BK>(k_sh + (t & 1) * TILE_KV, kb + (long long)t * BK * p.k_st[2], p.k_st[2],
                                  min(BK, kend - t * BK));
    };
    auto load_v = [&](int t) {
        load_tile_sw128<T, D, BK>(v_sh + (t & 1) * TILE_KV, vb + (long long)t * BK * p.v_st[2], p.v_st[2],
                                  min(BK, kend - t * BK));
    };
    // S = Q K^T of tile t: k-step kk reads dims 16 kk.. of this warpgroup's 64
    // Q rows and of the tile's 128 keys, at byte 32 (kk % 4) of their 128-byte
    // rows in column block kk / 4.
    float s[NK][4];
    auto issue_s = [&](int t) {
        const unsigned kt_addr = k_addr + (t & 1) * TILE_KV;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const unsigned col = (kk % 4) * 32;
            const unsigned long long da =
                sw128_desc(q_addr + (kk / 4) * (BQ * 128) + wg * (64 * 128) + col, 16, 1024);
            const unsigned long long db = sw128_desc(kt_addr + (kk / 4) * (BK * 128) + col, 16, 1024);
            wgmma_smem_kmajor<T, BK>(s, da, db, kk > 0);
        }
        wgmma_commit();
    };
    // Mask and softmax of tile t's scores; P stays in s as f32.
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f}, alpha[2];
    auto softmax_s = [&](int t) {
        const int j0 = t * BK;
        const bool need_mask = (j0 + BK > p.kv_len) || (p.causal && p.k0 + j0 + BK - 1 > p.q0 + i0);
        scores_to_log2(s, sl2, need_mask, r0, tig, i0, j0, rows, p);
        online_softmax(s, m, l, alpha);
    };

    float acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
#pragma unroll
    for (int n = 0; n < NK; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
    // P of the tile whose P V is next, packed to T: keys 16 kt.. are P's
    // n-tiles 2 kt, 2 kt + 1 (acc_to_a) and V's 8-key groups 2 kt, 2 kt + 1.
    unsigned pa[NK / 2][4];

    // Intra-warpgroup pipelining (as FlashAttention-3): while the tensor cores
    // run O += P V of tile t, the warpgroup's softmax works on S of tile t + 1,
    // which was issued just before; the rescale of O by that tile's alpha
    // waits for the P V to complete. Loads run a tile ahead: the group issued
    // at the top of step t brings K of tile t + 2 (into the stage S of tile t
    // read, done before every warpgroup passed this step's barrier) and V of
    // tile t + 1 (into the stage P V of tile t - 1 read).
    // No wgmma sits under an `if`: ptxas serializes every wgmma of a kernel
    // that issues one on a path it cannot prove uniform, so the first S, the
    // pipelined steps and the last P V are three loops of 0 or more trips.
    auto wait_loads = [&] {
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
    };
    auto issue_pv = [&](int t) {
        const unsigned vt_addr = v_addr + (t & 1) * TILE_KV;
#pragma unroll
        for (int kt = 0; kt < NK / 2; ++kt)
            wgmma_regs_nmajor<T, D>(acc, pa[kt], sw128_desc(vt_addr + kt * 2048, BK * 128, 1024));
        wgmma_commit();
    };
    auto pack_p = [&] {
#pragma unroll
        for (int kt = 0; kt < NK / 2; ++kt) acc_to_a<T>(pa[kt], s[2 * kt], s[2 * kt + 1]);
    };
    if (ntiles > 0) {
        load_tile_sw128<T, D, BQ>(q_sh, q + b * p.q_st[0] + h * p.q_st[1] + (long long)i0 * p.q_st[2], p.q_st[2],
                                  rows);
        load_k(0);
        load_v(0);
        if (ntiles > 1) load_k(1);
        cp_async_commit();
    }
    for (int t = 0; t < min(ntiles, 1); ++t) {  // S of tile 0
        wait_loads();
        wgmma_fence();
        issue_s(0);
        wgmma_wait<0>();
        wgmma_hold(s);
        softmax_s(0);
        pack_p();
    }
    for (int t = 0; t + 1 < ntiles; ++t) {  // S of tile t + 1 beside P V of tile t
        wait_loads();  // K of tile t + 1 and V of tile t
        if (t + 2 < ntiles) load_k(t + 2);
        load_v(t + 1);
        cp_async_commit();
        wgmma_fence();
        issue_s(t + 1);
        issue_pv(t);
        wgmma_wait<1>();  // S of tile t + 1 is done; P V of tile t may still run
        wgmma_hold(s);
        softmax_s(t + 1);
        wgmma_wait<0>();
        wgmma_hold(acc);
        wgmma_hold(pa);
        rescale_rows(acc, alpha);
        pack_p();
    }
    for (int t = ntiles - 1; t >= 0 && t + 1 == ntiles; --t) {  // P V of the last tile
        wait_loads();  // V of the last tile
        wgmma_fence();
        issue_pv(t);
        wgmma_wait<0>();
        wgmma_hold(acc);
        wgmma_hold(pa);
    }
    write_partial(acc, m, l, r0, tig, rows, row0, o, lse, p);
}
#endif

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

// ---------------------------------------------------------------------------
// Tensor-core backward for f16/bf16 at head_dim 64 and 128 (FlashAttention-2
// order, mma.sync m16n8k16, f32 accumulators): a dK/dV kernel per 64-key tile
// and a dQ kernel per 64-row query tile, same contract and launch conditions as
// forward_mma_impl (every Q/K/V/dO row 16-byte aligned). P is recomputed from
// the forward's LSE in the log2 domain: P = 2^(scale log2(e) s - log2(e) lse).
// A query row that must contribute nothing (past q_len, or lse = -inf) gets
// log2(e) lse = +inf, so 2^(finite - inf) = 0 gives P = 0 and dS = 0 without a
// mask; keys past kv_len and the causal mask are masked explicitly (only on
// tiles that cross them).

// log2(e) lse for a query row, +inf where the row contributes nothing (see above).
__device__ __forceinline__ float lse_log2(const float* lse, long long row, bool valid) {
    if (!valid) return -neg_inf();
    const float l = lse[row];
    return l == neg_inf() ? -neg_inf() : l * kLog2e;
}

// Backward helpers shared by the mma.sync and wgmma kernels, on tiles in the
// m16n8 accumulator layout ([n-tile][e]: this lane's rows r0 (e < 2) and
// r0 + 8 (e >= 2), columns 8 n + 2 tig + (e & 1)).

// log2(e) lse (+inf where the row contributes nothing) and delta of rows
// [0, n) of a step into rs[0..n) and rs[n..2n), by `threads` threads.
__device__ __forceinline__ void stage_row_stats(float* rs, int n, int rows, long long row0, const float* lse,
                                                const float* delta, int threads) {
    for (int r = threadIdx.x; r < n; r += threads) {
        const float l2 = lse_log2(lse, row0 + r, r < rows);
        rs[r] = l2;
        rs[n + r] = (l2 == -neg_inf()) ? 0.f : delta[row0 + r];
    }
}

// dK/dV: rows are keys (r0 in the tile, nk of them real), columns the step's
// queries (il, from i0, whose log2(e) lse and delta are l2s/dls). s = S^T
// becomes P^T, ds = dP^T becomes dS^T = P^T (dP^T - delta); masked only when
// `need_mask`.
template <int NQ>
__device__ __forceinline__ void dkv_probs(float (&s)[NQ][4], float (&ds)[NQ][4], int r0, int tig, int nk, int i0,
                                          int j0, bool need_mask, const float* l2s, const float* dls, float sl2,
                                          const BwParams& p) {
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int jl = r0 + (e >> 1) * 8;           // key in the tile
            const int il = n * 8 + tig * 2 + (e & 1);  // query in the step
            bool seen = true;
            if (need_mask) seen = jl < nk && i0 + il < p.q_len && visible(p, i0 + il, j0 + jl);
            const float pr = seen ? fast_exp2(s[n][e] * sl2 - l2s[il]) : 0.f;
            s[n][e] = pr;
            ds[n][e] = pr * (ds[n][e] - dls[il]);
        }
}

// dQ: rows are queries (r0 in the block's tile of `rows`, log2(e) lse and
// delta l2/dl), columns the tile's keys from j0. ds = dP becomes
// dS = P (dP - delta) with P from s = S; masked only when `need_mask`.
template <int NK>
__device__ __forceinline__ void dq_probs(const float (&s)[NK][4], float (&ds)[NK][4], int r0, int tig, int rows,
                                         int i0, int j0, bool need_mask, const float (&l2)[2], const float (&dl)[2],
                                         float sl2, const BwParams& p) {
#pragma unroll
    for (int n = 0; n < NK; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const int i = r0 + r * 8;
            const int j = j0 + n * 8 + tig * 2 + (e & 1);
            bool seen = true;
            if (need_mask) seen = j < p.kv_len && i < rows && visible(p, i0 + i, j);
            const float pr = seen ? fast_exp2(s[n][e] * sl2 - l2[r]) : 0.f;
            ds[n][e] = pr * (ds[n][e] - dl[r]);
        }
}

// dK += scale dK_acc, dV += dV_acc for this lane's keys r0, r0 + 8 (of nk) from kv_row0.
template <int ND>
__device__ __forceinline__ void add_dkv(const float (&dk_acc)[ND][4], const float (&dv_acc)[ND][4], int r0, int tig,
                                        int nk, long long kv_row0, float* __restrict__ dk, float* __restrict__ dv,
                                        float scale) {
    constexpr int D = ND * 8;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int jl = r0 + r * 8;
        if (jl >= nk) continue;
#pragma unroll
        for (int n = 0; n < ND; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const long long idx = (kv_row0 + jl) * D + n * 8 + tig * 2 + c;
                dk[idx] += scale * dk_acc[n][2 * r + c];
                dv[idx] += dv_acc[n][2 * r + c];
            }
    }
}

// dQ += scale dQ_acc for this lane's rows r0, r0 + 8 (of rows) from row0.
template <int ND>
__device__ __forceinline__ void add_dq(const float (&acc)[ND][4], int r0, int tig, int rows, long long row0,
                                       float* __restrict__ dq, float scale) {
    constexpr int D = ND * 8;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = r0 + r * 8;
        if (i >= rows) continue;
#pragma unroll
        for (int n = 0; n < ND; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) dq[(row0 + i) * D + n * 8 + tig * 2 + c] += scale * acc[n][2 * r + c];
    }
}
// log2(e) lse and delta of this lane's rows r0, r0 + 8 (of rows) from row0.
__device__ __forceinline__ void row_stats(float (&l2)[2], float (&dl)[2], int r0, int rows, long long row0,
                                          const float* lse, const float* delta) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = r0 + r * 8;
        l2[r] = lse_log2(lse, row0 + i, i < rows);
        dl[r] = (l2[r] == -neg_inf()) ? 0.f : delta[row0 + i];
    }
}

// Query rows per step of the dK/dV kernels (mma.sync and wgmma): 64 at D = 64;
// 32 at D = 128, where the dK and dV accumulators alone take 128 registers a lane.
template <int D>
struct DkvMma {
    static constexpr int kQRows = D == 64 ? 64 : 32;
};

// dK/dV on tensor cores. Block: 4 warps, warp w owns keys 16w..16w+15 of a
// 64-key tile of one (sequence, kv head); K and V stay in shared memory, the
// query steps (the group's query heads x kQRows-row steps from the first row
// that sees key j0) stream through two cp.async stages of Q, dO and the rows'
// (log2(e) lse, delta).
// Why S^T = K Q^T rather than S = Q K^T: with keys as the M dimension the
// accumulators of S^T and dP^T are already in the (keys x queries) layout that
// dV += P^T dO and dK += dS^T Q take as their A operand (acc_to_a), so P and dS
// never go through shared memory; the softmax statistics are per query, i.e.
// per accumulator column, and are read from shared memory per column.
// Per step, per warp (keys = the warp's 16, queries = the step's kQRows):
//   S^T  += K Q^T:    A = K   [keys][dims]   frag_a(k_sh, 16w, 16kk)
//                     B = Q^T (k = dims, n = queries), Q stored [queries][dims]: frag_b_nk(q)
//   dP^T += V dO^T:   A = V   frag_a(v_sh, 16w, 16kk); B = dO^T: frag_b_nk(dO)
//   P^T = 2^(S^T scale log2e - lse2[query]), dS^T = P^T (dP^T - delta[query]), masked
//   dV   += P^T dO:   A = P^T acc_to_a(s[2kt], s[2kt+1]) (k = queries 16kt..)
//                     B = dO  (k = queries, n = dims), stored [queries][dims]: frag_b_kn(dO)
//   dK   += dS^T Q:   A = dS^T acc_to_a(ds[2kt], ds[2kt+1]); B = Q frag_b_kn(q)
// Accumulator element e of n-tile n: key 16w + grp + 8(e >> 1), column
// 8n + 2tig + (e & 1) (a query for S^T/dP^T, a dim for dK/dV).
// K/V A fragments are re-read per step (ldmatrix is cheap) rather than held:
// at D = 128 they would take 64 more registers a lane.
// End: dK += scale dK_acc, dV += dV_acc into the caller's f32 tensors.
// Shared: K, V [64][D+8]; per stage s: Q, dO [kQRows][D+8]; then per stage
// lse2, delta [kQRows] f32.
template <typename T, int D>
__device__ __forceinline__ void dkv_mma_impl(const T* __restrict__ q, const T* __restrict__ k,
                                             const T* __restrict__ v, const T* __restrict__ d_o,
                                             const float* __restrict__ lse, const float* __restrict__ delta,
                                             float* __restrict__ dk, float* __restrict__ dv, const BwParams& p) {
    static_assert(D == 64 || D == 128, "the tensor-core backward covers head_dim 64 and 128");
    constexpr int BKV = kMmaKeys, BQ = DkvMma<D>::kQRows;
    constexpr int ST = D + 8;
    constexpr int KD = D / 16;  // k-steps over the head dim (S^T, dP^T)
    constexpr int ND = D / 8;   // 8-wide n-tiles over the head dim (dK, dV)
    constexpr int NQ = BQ / 8;  // 8-wide n-tiles over the step's queries (S^T, dP^T)
    extern __shared__ __align__(16) unsigned char bw_mma_smem[];
    T* k_sh = reinterpret_cast<T*>(bw_mma_smem);
    T* v_sh = k_sh + BKV * ST;
    T* qdo_sh = v_sh + BKV * ST;  // stage s: Q at qdo_sh + 2 s BQ ST, dO right after
    float* row_sh = reinterpret_cast<float*>(qdo_sh + 4 * BQ * ST);  // stage s: lse2 at row_sh + 2 s BQ, delta after

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, grp = lane >> 2, tig = lane & 3;
    const int j0 = blockIdx.x * BKV, g = blockIdx.y, b = blockIdx.z;
    const int groups = p.q_heads / p.kv_heads;
    const int nk = min(BKV, p.kv_len - j0);
    // Causal: rows before i_start see none of these keys.
    const int i_start = (p.causal && p.k0 + j0 > p.q0) ? p.k0 + j0 - p.q0 : 0;
    if (i_start >= p.q_len) return;  // no row sees these keys: dK/dV unchanged (whole block leaves)
    const int qsteps = (p.q_len - i_start + BQ - 1) / BQ;
    const int nsteps = groups * qsteps;
    const float sl2 = p.scale * kLog2e;

    // Step t: query head g groups + t / qsteps, rows i_start + (t % qsteps) BQ.., into stage t & 1.
    auto stage = [&](int t) {
        const int h = g * groups + t / qsteps;
        const int i0 = i_start + (t % qsteps) * BQ;
        const int rows = min(BQ, p.q_len - i0);
        T* qs = qdo_sh + (t & 1) * 2 * BQ * ST;
        load_tile_async<T, D, BQ>(qs, q + b * p.q_st[0] + h * p.q_st[1] + (long long)i0 * p.q_st[2], p.q_st[2],
                                  rows);
        load_tile_async<T, D, BQ>(qs + BQ * ST, d_o + b * p.o_st[0] + h * p.o_st[1] + (long long)i0 * p.o_st[2],
                                  p.o_st[2], rows);
        const long long row0 = ((long long)b * p.q_heads + h) * p.q_len + i0;
        stage_row_stats(row_sh + (t & 1) * 2 * BQ, BQ, rows, row0, lse, delta, kMmaThreads);
    };

    load_tile_async<T, D, BKV>(k_sh, k + b * p.k_st[0] + g * p.k_st[1] + (long long)j0 * p.k_st[2], p.k_st[2], nk);
    load_tile_async<T, D, BKV>(v_sh, v + b * p.v_st[0] + g * p.v_st[1] + (long long)j0 * p.v_st[2], p.v_st[2], nk);
    stage(0);
    cp_async_commit();

    float dk_acc[ND][4], dv_acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.f;

    for (int t = 0; t < nsteps; ++t) {
        // Prefetch the next step into the other stage (freed by the previous
        // iteration's closing barrier); the group is empty on the last step.
        if (t + 1 < nsteps) stage(t + 1);
        cp_async_commit();
        cp_async_wait<1>();  // this step's group (and K/V with step 0) has landed
        __syncthreads();
        const int i0 = i_start + (t % qsteps) * BQ;
        const T* qs = qdo_sh + (t & 1) * 2 * BQ * ST;
        const T* dos = qs + BQ * ST;
        const float* l2s = row_sh + (t & 1) * 2 * BQ;
        const float* dls = l2s + BQ;

        float s[NQ][4], ds[NQ][4];  // S^T, then P^T; dP^T, then dS^T
        paired_products<T, ST, KD>(s, ds, k_sh, v_sh, qs, dos, warp * 16, lane);

        // Mask only steps that hold keys past kv_len or cross the causal
        // diagonal (the block's last key against the step's first row; j0 + BKV
        // <= kv_len keeps the sum below i32::MAX). Rows past q_len have lse2 = +inf.
        const bool need_mask = (j0 + BKV > p.kv_len) || (p.causal && p.k0 + j0 + BKV - 1 > p.q0 + i0);
        dkv_probs(s, ds, warp * 16 + grp, tig, nk, i0, j0, need_mask, l2s, dls, sl2, p);

        // dV += P^T dO, dK += dS^T Q over the step's queries.
        acc_times_tile<T, ST>(dv_acc, s, dos, lane);
        acc_times_tile<T, ST>(dk_acc, ds, qs, lane);
        __syncthreads();  // every warp is done with this stage before it is refilled
    }

    const long long kv_row0 = ((long long)b * p.kv_heads + g) * p.kv_len + j0;
    add_dkv(dk_acc, dv_acc, warp * 16 + grp, tig, nk, kv_row0, dk, dv, p.scale);
}

// dQ on tensor cores. Block: 4 warps, warp w owns query rows 16w..16w+15 of a
// 64-row tile of one (sequence, query head); Q and dO stay in shared memory,
// KV tiles of 64 keys (only those the rows see) double-buffered through
// cp.async as in forward_mma_impl. Per KV tile, per warp (rows = the warp's
// 16 queries, keys = the tile's 64):
//   S  += Q K^T:    A = Q  [rows][dims]  frag_a(q_sh, 16w, 16kk)
//                   B = K^T (k = dims, n = keys), K stored [keys][dims]: frag_b_nk(k)
//   dP += dO V^T:   A = dO frag_a(do_sh, 16w, 16kk); B = V^T: frag_b_nk(v)
//   P = 2^(S scale log2e - lse2[row]), dS = P (dP - delta[row]), masked
//   dQ += dS K:     A = dS acc_to_a(ds[2kt], ds[2kt+1]) (k = keys 16kt..)
//                   B = K (k = keys, n = dims), stored [keys][dims]: frag_b_kn(k)
// Accumulator element e of n-tile n: row 16w + grp + 8(e >> 1), column
// 8n + 2tig + (e & 1) (a key for S/dP, a dim for dQ); each lane holds lse2 and
// delta of its two rows in registers. Q/dO A fragments are re-read per tile
// (ldmatrix) rather than held: at D = 128 they would take 64 registers a lane.
// End: dQ += scale dQ_acc into the caller's f32 dQ.
// Shared: Q, dO [64][D+8]; per stage s: K, V [64][D+8].
template <typename T, int D>
__device__ __forceinline__ void dq_mma_impl(const T* __restrict__ q, const T* __restrict__ k,
                                            const T* __restrict__ v, const T* __restrict__ d_o,
                                            const float* __restrict__ lse, const float* __restrict__ delta,
                                            float* __restrict__ dq, const BwParams& p) {
    static_assert(D == 64 || D == 128, "the tensor-core backward covers head_dim 64 and 128");
    constexpr int BQ = kMmaRows, BK = kMmaKeys;
    constexpr int ST = D + 8;
    constexpr int KD = D / 16;  // k-steps over the head dim (S, dP)
    constexpr int ND = D / 8;   // 8-wide n-tiles over the head dim (dQ)
    constexpr int NK = BK / 8;  // 8-wide n-tiles over the keys (S, dP)
    extern __shared__ __align__(16) unsigned char bw_mma_smem[];
    T* q_sh = reinterpret_cast<T*>(bw_mma_smem);
    T* do_sh = q_sh + BQ * ST;
    T* kv_sh = do_sh + BQ * ST;  // stage s: K at kv_sh + 2 s BK ST, V right after

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, grp = lane >> 2, tig = lane & 3;
    // Causal: the tiles with the most keys first, so the short ones fill the tail.
    const int qt = p.causal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
    const int i0 = qt * BQ, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (p.q_heads / p.kv_heads);
    const int rows = min(BQ, p.q_len - i0);
    const long long row0 = ((long long)b * p.q_heads + h) * p.q_len + i0;
    const int kend = keys_end(p, i0 + rows - 1);
    const int ntiles = (kend + BK - 1) / BK;
    if (ntiles == 0) return;  // no row sees a key: dQ unchanged (whole block leaves)
    const T* kb = k + b * p.k_st[0] + g * p.k_st[1];
    const T* vb = v + b * p.v_st[0] + g * p.v_st[1];
    const float sl2 = p.scale * kLog2e;

    float l2[2], dl[2];
    row_stats(l2, dl, warp * 16 + grp, rows, row0, lse, delta);

    load_tile_async<T, D, BQ>(q_sh, q + b * p.q_st[0] + h * p.q_st[1] + (long long)i0 * p.q_st[2], p.q_st[2], rows);
    load_tile_async<T, D, BQ>(do_sh, d_o + b * p.o_st[0] + h * p.o_st[1] + (long long)i0 * p.o_st[2], p.o_st[2],
                              rows);
    {
        const int nk = min(BK, kend);
        load_tile_async<T, D, BK>(kv_sh, kb, p.k_st[2], nk);
        load_tile_async<T, D, BK>(kv_sh + BK * ST, vb, p.v_st[2], nk);
    }
    cp_async_commit();

    float acc[ND][4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

    for (int t = 0; t < ntiles; ++t) {
        const int j0 = t * BK;
        if (t + 1 < ntiles) {
            const int jn = j0 + BK;
            const int nk = min(BK, kend - jn);
            T* kn = kv_sh + ((t + 1) & 1) * 2 * BK * ST;
            load_tile_async<T, D, BK>(kn, kb + (long long)jn * p.k_st[2], p.k_st[2], nk);
            load_tile_async<T, D, BK>(kn + BK * ST, vb + (long long)jn * p.v_st[2], p.v_st[2], nk);
        }
        cp_async_commit();
        cp_async_wait<1>();  // this tile's group (and Q/dO with tile 0) has landed
        __syncthreads();
        const T* ks = kv_sh + (t & 1) * 2 * BK * ST;
        const T* vs = ks + BK * ST;

        float s[NK][4], ds[NK][4];  // S, then P; dP, then dS
        paired_products<T, ST, KD>(s, ds, q_sh, do_sh, ks, vs, warp * 16, lane);

        // Mask as in forward_mma_impl: only tiles that cross the key end or the
        // causal diagonal of the block's first row. Keys in [kend, j0 + BK) are
        // zero rows, hidden by that mask (kend < kv_len only when causal hides them).
        const bool need_mask = (j0 + BK > p.kv_len) || (p.causal && p.k0 + j0 + BK - 1 > p.q0 + i0);
        dq_probs(s, ds, warp * 16 + grp, tig, rows, i0, j0, need_mask, l2, dl, sl2, p);

        // dQ += dS K over the tile's keys.
        acc_times_tile<T, ST>(acc, ds, ks, lane);
        __syncthreads();  // every warp is done with this stage before it is refilled
    }

    add_dq(acc, warp * 16 + grp, tig, rows, row0, dq, p.scale);
}

// ---------------------------------------------------------------------------
// Hopper backward (wgmma; compute capability 9.0, the launch conditions of the
// mma.sync backward): dkv_mma_impl and dq_mma_impl with their products on
// warpgroup MMAs, shared tiles 128-byte swizzled as in forward_wgmma_impl.
#ifdef BW_HAS_WGMMA

// The two score products of a backward step for this warpgroup's 64 rows:
// x = A_x B_x^T and y = A_y B_y^T over the head dim, the A tiles A_ROWS rows
// (this warpgroup's from row 64 wg) and the B tiles N rows, all K-major and
// 128-byte swizzled at the given shared addresses; returns once both are done.
// dK/dV: (K, V) against (Q, dO); dQ: (Q, dO) against (K, V).
template <typename T, int D, int A_ROWS, int N>
__device__ __forceinline__ void paired_products_wgmma(float (&x)[N / 8][4], float (&y)[N / 8][4], unsigned a_x,
                                                      unsigned a_y, unsigned b_x, unsigned b_y, int wg) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const unsigned a_col = (kk / 4) * (A_ROWS * 128) + wg * (64 * 128) + (kk % 4) * 32;
        const unsigned b_col = (kk / 4) * (N * 128) + (kk % 4) * 32;
        wgmma_smem_kmajor<T, N>(x, sw128_desc(a_x + a_col, 16, 1024), sw128_desc(b_x + b_col, 16, 1024), kk > 0);
        wgmma_smem_kmajor<T, N>(y, sw128_desc(a_y + a_col, 16, 1024), sw128_desc(b_y + b_col, 16, 1024), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(x);
    wgmma_hold(y);
}

// dK/dV. Block: 2 warpgroups; warpgroup wg owns keys 64 wg..64 wg + 63 of a
// 128-key tile of one (sequence, kv head); K and V stay in shared memory and
// the query steps (the group's query heads x kQRows rows from the first row
// that sees key j0) stream through two cp.async stages of Q, dO and the rows'
// (log2(e) lse, delta), as in dkv_mma_impl. Per step, per warpgroup:
//   S^T  = K Q^T   D/16 x m64n<BQ>k16, A = K, B = Q (both K-major, shared)
//   dP^T = V dO^T  A = V, B = dO
//   P^T, dS^T per accumulator (key, query) as in dkv_mma_impl
//   dV  += P^T dO  BQ/16 x m64n<D>k16, A = P^T (registers), B = dO N-major
//   dK  += dS^T Q  A = dS^T (registers), B = Q N-major
// Shared (1024-aligned): K, V [D/64][128][64]; per stage s: Q, dO
// [D/64][BQ][64]; then per stage (lse2, delta) [2][BQ] f32.
template <typename T, int D>
__device__ __forceinline__ void dkv_wgmma_impl(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, const T* __restrict__ d_o,
                                               const float* __restrict__ lse, const float* __restrict__ delta,
                                               float* __restrict__ dk, float* __restrict__ dv, const BwParams& p) {
    static_assert(D == 64 || D == 128, "the wgmma backward covers head_dim 64 and 128");
    constexpr int BKV = kWgRows, BQ = DkvMma<D>::kQRows;
    constexpr int ND = D / 8;   // 8-wide n-tiles over the head dim (dK, dV)
    constexpr int NQ = BQ / 8;  // 8-wide n-tiles over the step's queries (S^T, dP^T)
    constexpr int TILE_KV = BKV * D * 2, TILE_STEP = BQ * D * 2;  // bytes
    extern __shared__ __align__(16) unsigned char bw_mma_smem[];
    const unsigned raw = smem_u32(bw_mma_smem);
    unsigned char* k_sh = bw_mma_smem + (((raw + 1023u) & ~1023u) - raw);
    unsigned char* v_sh = k_sh + TILE_KV;
    unsigned char* step_sh = v_sh + TILE_KV;  // stage s: Q at step_sh + 2 s TILE_STEP, dO right after
    float* row_sh = reinterpret_cast<float*>(step_sh + 4 * TILE_STEP);  // stage s: lse2 at row_sh + 2 s BQ, delta after
    const unsigned k_addr = smem_u32(k_sh), v_addr = smem_u32(v_sh), step_addr = smem_u32(step_sh);

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, grp = lane >> 2,
              tig = lane & 3;
    const int j0 = blockIdx.x * BKV, g = blockIdx.y, b = blockIdx.z;
    const int groups = p.q_heads / p.kv_heads;
    const int nk = min(BKV, p.kv_len - j0);
    // Causal: rows before i_start see none of these keys; with none left the
    // block has no step and leaves dK/dV as they are.
    const int i_start = (p.causal && p.k0 + j0 > p.q0) ? p.k0 + j0 - p.q0 : 0;
    const int qsteps = (p.q_len - i_start + BQ - 1) / BQ;
    const int nsteps = i_start < p.q_len ? groups * qsteps : 0;
    const float sl2 = p.scale * kLog2e;

    // Step t: query head g groups + t / qsteps, rows i_start + (t % qsteps) BQ.., into stage t & 1.
    auto stage = [&](int t) {
        const int h = g * groups + t / qsteps;
        const int i0 = i_start + (t % qsteps) * BQ;
        const int rows = min(BQ, p.q_len - i0);
        unsigned char* qs = step_sh + (t & 1) * 2 * TILE_STEP;
        load_tile_sw128<T, D, BQ>(qs, q + b * p.q_st[0] + h * p.q_st[1] + (long long)i0 * p.q_st[2], p.q_st[2],
                                  rows);
        load_tile_sw128<T, D, BQ>(qs + TILE_STEP,
                                  d_o + b * p.o_st[0] + h * p.o_st[1] + (long long)i0 * p.o_st[2], p.o_st[2], rows);
        const long long row0 = ((long long)b * p.q_heads + h) * p.q_len + i0;
        stage_row_stats(row_sh + (t & 1) * 2 * BQ, BQ, rows, row0, lse, delta, kWgThreads);
    };
    if (nsteps > 0) {
        load_tile_sw128<T, D, BKV>(k_sh, k + b * p.k_st[0] + g * p.k_st[1] + (long long)j0 * p.k_st[2], p.k_st[2],
                                   nk);
        load_tile_sw128<T, D, BKV>(v_sh, v + b * p.v_st[0] + g * p.v_st[1] + (long long)j0 * p.v_st[2], p.v_st[2],
                                   nk);
        stage(0);
        cp_async_commit();
    }

    float dk_acc[ND][4], dv_acc[ND][4], s[NQ][4], ds[NQ][4];  // S^T then P^T; dP^T then dS^T
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.f;
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = ds[n][e] = 0.f;
    unsigned pa[NQ / 2][4], dsa[NQ / 2][4];

    for (int t = 0; t < nsteps; ++t) {
        // Prefetch the next step into the other stage (freed by the previous
        // iteration's closing barrier); the group is empty on the last step.
        if (t + 1 < nsteps) stage(t + 1);
        cp_async_commit();
        cp_async_wait<1>();  // this step's group (and K/V with step 0) has landed
        fence_proxy_async();
        __syncthreads();
        const int i0 = i_start + (t % qsteps) * BQ;
        const unsigned q_addr = step_addr + (t & 1) * 2 * TILE_STEP, do_addr = q_addr + TILE_STEP;
        const float* l2s = row_sh + (t & 1) * 2 * BQ;
        const float* dls = l2s + BQ;

        paired_products_wgmma<T, D, BKV, BQ>(s, ds, k_addr, v_addr, q_addr, do_addr, wg);

        // Mask only steps that hold keys past kv_len or cross the causal
        // diagonal (the block's last key against the step's first row; j0 + BKV
        // <= kv_len keeps the sum below i32::MAX). Rows past q_len have lse2 = +inf.
        const bool need_mask = (j0 + BKV > p.kv_len) || (p.causal && p.k0 + j0 + BKV - 1 > p.q0 + i0);
        dkv_probs(s, ds, wg * 64 + warp * 16 + grp, tig, nk, i0, j0, need_mask, l2s, dls, sl2, p);
#pragma unroll
        for (int kt = 0; kt < NQ / 2; ++kt) {
            acc_to_a<T>(pa[kt], s[2 * kt], s[2 * kt + 1]);
            acc_to_a<T>(dsa[kt], ds[2 * kt], ds[2 * kt + 1]);
        }

        // dV += P^T dO, dK += dS^T Q over the step's queries, 16 (two 8-row groups) a k-step.
        wgmma_fence();
#pragma unroll
        for (int kt = 0; kt < NQ / 2; ++kt) {
            wgmma_regs_nmajor<T, D>(dv_acc, pa[kt], sw128_desc(do_addr + kt * 2048, BQ * 128, 1024));
            wgmma_regs_nmajor<T, D>(dk_acc, dsa[kt], sw128_desc(q_addr + kt * 2048, BQ * 128, 1024));
        }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_hold(dv_acc);
        wgmma_hold(dk_acc);
        wgmma_hold(pa);
        wgmma_hold(dsa);
        __syncthreads();  // both warpgroups are done with this stage before it is refilled
    }

    const long long kv_row0 = ((long long)b * p.kv_heads + g) * p.kv_len + j0;
    if (nsteps > 0) add_dkv(dk_acc, dv_acc, wg * 64 + warp * 16 + grp, tig, nk, kv_row0, dk, dv, p.scale);
}

// dQ. Block: 2 warpgroups; warpgroup wg owns query rows 64 wg..64 wg + 63 of
// a 128-row tile of one (sequence, query head); Q and dO stay in shared
// memory; KV tiles of 64 keys (only those the rows see) double-buffered
// through cp.async, as in dq_mma_impl. Per tile, per warpgroup:
//   S  = Q K^T   D/16 x m64n64k16, A = Q, B = K (both K-major, shared)
//   dP = dO V^T  A = dO, B = V
//   P, dS per accumulator (row, key) as in dq_mma_impl
//   dQ += dS K   4 x m64n<D>k16, A = dS (registers), B = K N-major
// Shared (1024-aligned): Q, dO [D/64][128][64]; per stage s: K, V [D/64][64][64].
template <typename T, int D>
__device__ __forceinline__ void dq_wgmma_impl(const T* __restrict__ q, const T* __restrict__ k,
                                              const T* __restrict__ v, const T* __restrict__ d_o,
                                              const float* __restrict__ lse, const float* __restrict__ delta,
                                              float* __restrict__ dq, const BwParams& p) {
    static_assert(D == 64 || D == 128, "the wgmma backward covers head_dim 64 and 128");
    constexpr int BQ = kWgRows, BK = 64;
    constexpr int ND = D / 8;   // 8-wide n-tiles over the head dim (dQ)
    constexpr int NK = BK / 8;  // 8-wide n-tiles over the keys (S, dP)
    constexpr int TILE_Q = BQ * D * 2, TILE_KV = BK * D * 2;  // bytes
    extern __shared__ __align__(16) unsigned char bw_mma_smem[];
    const unsigned raw = smem_u32(bw_mma_smem);
    unsigned char* q_sh = bw_mma_smem + (((raw + 1023u) & ~1023u) - raw);
    unsigned char* do_sh = q_sh + TILE_Q;
    unsigned char* kv_sh = do_sh + TILE_Q;  // stage s: K at kv_sh + 2 s TILE_KV, V right after
    const unsigned q_addr = smem_u32(q_sh), do_addr = smem_u32(do_sh), kv_addr = smem_u32(kv_sh);

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, grp = lane >> 2,
              tig = lane & 3;
    // Causal: the tiles with the most keys first, so the short ones fill the tail.
    const int qt = p.causal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
    const int i0 = qt * BQ, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (p.q_heads / p.kv_heads);
    const int rows = min(BQ, p.q_len - i0);
    const long long row0 = ((long long)b * p.q_heads + h) * p.q_len + i0;
    const int kend = keys_end(p, i0 + rows - 1);
    const int ntiles = (kend + BK - 1) / BK;  // 0: no row sees a key, dQ stays as it is
    const T* kb = k + b * p.k_st[0] + g * p.k_st[1];
    const T* vb = v + b * p.v_st[0] + g * p.v_st[1];
    const float sl2 = p.scale * kLog2e;
    const int r0 = wg * 64 + warp * 16 + grp;  // this lane's first row in the block

    float l2[2], dl[2];
    row_stats(l2, dl, r0, rows, row0, lse, delta);
    auto load_kv = [&](int t) {
        unsigned char* kn = kv_sh + (t & 1) * 2 * TILE_KV;
        const int nk = min(BK, kend - t * BK);
        load_tile_sw128<T, D, BK>(kn, kb + (long long)t * BK * p.k_st[2], p.k_st[2], nk);
        load_tile_sw128<T, D, BK>(kn + TILE_KV, vb + (long long)t * BK * p.v_st[2], p.v_st[2], nk);
    };
    if (ntiles > 0) {
        load_tile_sw128<T, D, BQ>(q_sh, q + b * p.q_st[0] + h * p.q_st[1] + (long long)i0 * p.q_st[2], p.q_st[2],
                                  rows);
        load_tile_sw128<T, D, BQ>(do_sh, d_o + b * p.o_st[0] + h * p.o_st[1] + (long long)i0 * p.o_st[2],
                                  p.o_st[2], rows);
        load_kv(0);
        cp_async_commit();
    }

    float acc[ND][4], s[NK][4], ds[NK][4];  // dQ; S then P; dP then dS
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
#pragma unroll
    for (int n = 0; n < NK; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = ds[n][e] = 0.f;
    unsigned dsa[NK / 2][4];

    for (int t = 0; t < ntiles; ++t) {
        const int j0 = t * BK;
        if (t + 1 < ntiles) load_kv(t + 1);
        cp_async_commit();
        cp_async_wait<1>();  // this tile's group (and Q/dO with tile 0) has landed
        fence_proxy_async();
        __syncthreads();
        const unsigned k_addr = kv_addr + (t & 1) * 2 * TILE_KV, v_addr = k_addr + TILE_KV;

        paired_products_wgmma<T, D, BQ, BK>(s, ds, q_addr, do_addr, k_addr, v_addr, wg);

        // Mask as in dq_mma_impl: only tiles that cross the key end or the
        // causal diagonal of the block's first row.
        const bool need_mask = (j0 + BK > p.kv_len) || (p.causal && p.k0 + j0 + BK - 1 > p.q0 + i0);
        dq_probs(s, ds, r0, tig, rows, i0, j0, need_mask, l2, dl, sl2, p);
#pragma unroll
        for (int kt = 0; kt < NK / 2; ++kt) acc_to_a<T>(dsa[kt], ds[2 * kt], ds[2 * kt + 1]);

        // dQ += dS K over the tile's keys, 16 (two 8-key groups) a k-step.
        wgmma_fence();
#pragma unroll
        for (int kt = 0; kt < NK / 2; ++kt)
            wgmma_regs_nmajor<T, D>(acc, dsa[kt], sw128_desc(k_addr + kt * 2048, BK * 128, 1024));
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_hold(acc);
        wgmma_hold(dsa);
        __syncthreads();  // both warpgroups are done with this stage before it is refilled
    }

    if (ntiles > 0) add_dq(acc, r0, tig, rows, row0, dq, p.scale);
}
#endif

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

// Tensor-core forward: bw_forward_mma_<f16|bf16>_d<64|128>; keep in sync with
// `mma_kernel_name` in src/blockwise/cuda.rs.
#define BW_MMA_FORWARD(NAME, T, D)                                                                             \
    extern "C" __global__ void __launch_bounds__(frugal_bw::kMmaThreads)                                       \
        bw_forward_mma_##NAME##_d##D(const T* q, const T* k, const T* v, float* o, float* lse,                 \
                                     frugal_bw::BwParams p) {                                                  \
        frugal_bw::forward_mma_impl<T, D>(q, k, v, o, lse, p);                                                 \
    }

// Hopper kernels, 256 threads: bw_forward_wgmma_<f16|bf16>_d<64|128> and
// bw_dq_wgmma_* (grid: 128-row tiles x query heads x batch), bw_dkv_wgmma_*
// (grid: 128-key tiles x kv heads x batch); keep in sync with
// `wgmma_kernel_name` in src/blockwise/cuda.rs, which launches them only on
// compute capability 9.0. Their bodies exist only in the sm_90a code;
// elsewhere they trap.
#ifdef BW_HAS_WGMMA
#define BW_WGMMA_BODY(...) frugal_bw::__VA_ARGS__;
#else
#define BW_WGMMA_BODY(...) __trap();
#endif
#define BW_WGMMA_KERNELS(NAME, T, D)                                                                           \
    extern "C" __global__ void __launch_bounds__(frugal_bw::kWgThreads, 1)                                     \
        bw_forward_wgmma_##NAME##_d##D(const T* q, const T* k, const T* v, float* o, float* lse,               \
                                       frugal_bw::BwParams p) {                                                \
        BW_WGMMA_BODY(forward_wgmma_impl<T, D>(q, k, v, o, lse, p))                                            \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(frugal_bw::kWgThreads, 1)                                     \
        bw_dkv_wgmma_##NAME##_d##D(const T* q, const T* k, const T* v, const T* d_o, const float* lse,         \
                                   const float* delta, float* dk, float* dv, frugal_bw::BwParams p) {          \
        BW_WGMMA_BODY(dkv_wgmma_impl<T, D>(q, k, v, d_o, lse, delta, dk, dv, p))                               \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(frugal_bw::kWgThreads, 1)                                     \
        bw_dq_wgmma_##NAME##_d##D(const T* q, const T* k, const T* v, const T* d_o, const float* lse,          \
                                  const float* delta, float* dq, frugal_bw::BwParams p) {                      \
        BW_WGMMA_BODY(dq_wgmma_impl<T, D>(q, k, v, d_o, lse, delta, dq, p))                                    \
    }

BW_WGMMA_KERNELS(f16, __half, 64)
BW_WGMMA_KERNELS(f16, __half, 128)
BW_WGMMA_KERNELS(bf16, __nv_bfloat16, 64)
BW_WGMMA_KERNELS(bf16, __nv_bfloat16, 128)

// Tensor-core backward: bw_dkv_mma_<f16|bf16>_d<64|128> (grid: 64-key tiles x
// kv heads x batch) and bw_dq_mma_<f16|bf16>_d<64|128> (grid: 64-row tiles x
// query heads x batch).
#define BW_MMA_BACKWARD(NAME, T, D)                                                                            \
    extern "C" __global__ void __launch_bounds__(frugal_bw::kMmaThreads)                                       \
        bw_dkv_mma_##NAME##_d##D(const T* q, const T* k, const T* v, const T* d_o, const float* lse,           \
                                 const float* delta, float* dk, float* dv, frugal_bw::BwParams p) {            \
        frugal_bw::dkv_mma_impl<T, D>(q, k, v, d_o, lse, delta, dk, dv, p);                                    \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(frugal_bw::kMmaThreads)                                       \
        bw_dq_mma_##NAME##_d##D(const T* q, const T* k, const T* v, const T* d_o, const float* lse,            \
                                const float* delta, float* dq, frugal_bw::BwParams p) {                        \
        frugal_bw::dq_mma_impl<T, D>(q, k, v, d_o, lse, delta, dq, p);                                         \
    }

#define BW_MMA_ALL(NAME, T, D) \
    BW_MMA_FORWARD(NAME, T, D) \
    BW_MMA_BACKWARD(NAME, T, D)

BW_MMA_ALL(f16, __half, 64)
BW_MMA_ALL(f16, __half, 128)
BW_MMA_ALL(bf16, __nv_bfloat16, 64)
BW_MMA_ALL(bf16, __nv_bfloat16, 128)

#define BW_ALL_DIMS(NAME, T)                  \
    BW_DTYPE_KERNELS(NAME, T)                 \
    BW_DIM_KERNELS(NAME, T, 64, 4, 2)         \
    BW_DIM_KERNELS(NAME, T, 128, 4, 2)        \
    BW_DIM_KERNELS(NAME, T, 256, 2, 1)

BW_ALL_DIMS(f32, float)
BW_ALL_DIMS(f16, __half)
BW_ALL_DIMS(bf16, __nv_bfloat16)
