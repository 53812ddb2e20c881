// Shared device helpers for the frugal attention kernels.
//
// Everything here is header-only and `__device__ __forceinline__`, so each
// kernel file compiles on its own (one .cu -> one fatbin).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace frugal {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

// ---------------------------------------------------------------------------
// Special values (bit patterns, so they never depend on fast-math settings).

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// ---------------------------------------------------------------------------
// dtype <-> f32. Stores round to nearest even.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

template <typename T> __device__ __forceinline__ float load_f32(const T* p) { return to_float(*p); }
template <typename T> __device__ __forceinline__ void store_f32(T* p, float x) { *p = from_float<T>(x); }

// ---------------------------------------------------------------------------
// 8-byte vector access: VEC elements of T per load (f32: 2, f16/bf16: 4).
// The caller guarantees the address is 8-byte aligned.

template <typename T> struct Vec8 {
    static_assert(sizeof(T) == 2 || sizeof(T) == 4, "unsupported element size");
    static constexpr int VEC = 8 / int(sizeof(T));
};

template <typename T> __device__ __forceinline__ uint2 load_raw8(const T* p) {
    return *reinterpret_cast<const uint2*>(p);
}

// Raw 8 bytes -> VEC floats (element 0 is the low half of .x: little endian).
__device__ __forceinline__ void raw8_to_float(uint2 r, float (&f)[2], float) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
}
__device__ __forceinline__ void raw8_to_float(uint2 r, float (&f)[4], __half) {
    f[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(r.x & 0xffffu)));
    f[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(r.x >> 16)));
    f[2] = __half2float(__ushort_as_half(static_cast<unsigned short>(r.y & 0xffffu)));
    f[3] = __half2float(__ushort_as_half(static_cast<unsigned short>(r.y >> 16)));
}
__device__ __forceinline__ void raw8_to_float(uint2 r, float (&f)[4], __nv_bfloat16) {
    // bf16 is the top half of an f32: widening is a shift (exact, NaN-preserving).
    f[0] = __uint_as_float(r.x << 16);
    f[1] = __uint_as_float(r.x & 0xffff0000u);
    f[2] = __uint_as_float(r.y << 16);
    f[3] = __uint_as_float(r.y & 0xffff0000u);
}

template <typename T>
__device__ __forceinline__ void convert_raw8(uint2 r, float (&f)[Vec8<T>::VEC]) {
    raw8_to_float(r, f, T{});
}

template <typename T>
__device__ __forceinline__ void load_vec8_f32(const T* p, float (&f)[Vec8<T>::VEC]) {
    convert_raw8<T>(load_raw8(p), f);
}

// ---------------------------------------------------------------------------
// Warp reductions (all lanes get the result; full warp must participate).

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, off));
    return x;
}

__host__ __device__ constexpr int ilog2(int n) { return n <= 1 ? 0 : 1 + ilog2(n / 2); }

// Sums N per-lane values over the warp with N-1 + (5 - log2 N) shuffles
// instead of 5N: each butterfly step sends the half of the values a lane
// does not keep. Afterwards lane L holds the full sum of value
// L >> (5 - log2 N) (the top log2 N lane bits select the value); lanes that
// agree in those bits hold bit-identical results.
template <int N>
__device__ __forceinline__ float warp_transpose_sum(float (&v)[N], int lane) {
    constexpr int LOG2N = ilog2(N);
    static_assert((1 << LOG2N) == N && N <= kWarpSize, "N must be a power of two <= 32");
#pragma unroll
    for (int t = 0; t < LOG2N; ++t) {
        const int off = (kWarpSize / 2) >> t;
        const int half = N >> (t + 1);
        const bool upper = (lane & off) != 0;
        // Lower lanes keep [0, half), upper lanes keep [half, 2*half), stored at [0, half).
#pragma unroll
        for (int i = 0; i < half; ++i) {
            const float send = upper ? v[i] : v[i + half];
            const float keep = upper ? v[i + half] : v[i];
            v[i] = keep + __shfl_xor_sync(kFullMask, send, off);
        }
    }
    float s = v[0];
#pragma unroll
    for (int off = (kWarpSize / 2) >> LOG2N; off > 0; off >>= 1) s += __shfl_xor_sync(kFullMask, s, off);
    return s;
}

// ---------------------------------------------------------------------------
// Online softmax state over natural-log scores: m = running max, l = sum of
// exp(s - m). Empty state is (-inf, 0). Merging never computes -inf - -inf.

// log(exp(a) + exp(b)); -inf when both are -inf.
__device__ __forceinline__ float lse_merge(float a, float b) {
    const float mx = fmaxf(a, b);
    if (mx == neg_inf()) return neg_inf();
    return mx + log1pf(expf(fminf(a, b) - mx));
}

struct SoftmaxState {
    float m;
    float l;

    __device__ __forceinline__ static SoftmaxState empty() { return SoftmaxState{neg_inf(), 0.f}; }

    // Fold in another state (m2, l2).
    __device__ __forceinline__ void merge(float m2, float l2) {
        const float mn = fmaxf(m, m2);
        if (mn == neg_inf()) {  // both empty: stays empty, zero weights
            m = neg_inf();
            l = 0.f;
            return;
        }
        l = l * __expf(m - mn) + l2 * __expf(m2 - mn);  // exp(-inf - finite) = 0
        m = mn;
    }

    // Weight exp(m_part - m) of a part whose max was m_part, relative to this
    // (merged) state; 0 for an empty part or an empty state.
    __device__ __forceinline__ float weight(float m_part) const {
        return (m == neg_inf()) ? 0.f : __expf(m_part - m);
    }

    // log(sum exp(s)); -inf for the empty state.
    __device__ __forceinline__ float lse() const { return m + logf(l); }
};

}  // namespace frugal
