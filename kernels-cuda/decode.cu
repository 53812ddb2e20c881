// Dense flash-decoding (split-KV) attention for one query token per
// (sequence, query head): the keys of sequence b are positions [0, seq_lens[b])
// at rows 0.. of the cache. Templates in decode.cuh.
#include "decode.cuh"

// ---------------------------------------------------------------------------
// Exported symbols.

// MINB: blocks per SM to fit in registers. 4 for the hot f16/bf16 d128 path
// (128 regs, no spills); elsewhere ptxas chooses (forcing it spills).
#define FRUGAL_DECODE_PARTIAL(NAME, T, MAXD, VECTOR, MINB)                                                     \
    extern "C" __global__ void __launch_bounds__(frugal::decode::kThreads, MINB)                               \
        NAME(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                         \
             const unsigned int* __restrict__ seq_lens, float* __restrict__ part_o, float* __restrict__ part_lse, \
             DecodeParams p) {                                                                                 \
        frugal::decode::partial_impl<T, MAXD, VECTOR>(q, k, v, frugal::decode::DenseKeys{seq_lens, p.capacity}, \
                                                      part_o, part_lse, p);                                    \
    }

FRUGAL_DECODE_PARTIAL(decode_partial_f32_d128_vec, float, 128, true, 1)
FRUGAL_DECODE_PARTIAL(decode_partial_f32_d128_scalar, float, 128, false, 1)
FRUGAL_DECODE_PARTIAL(decode_partial_f32_d256_vec, float, 256, true, 1)
FRUGAL_DECODE_PARTIAL(decode_partial_f32_d256_scalar, float, 256, false, 1)
FRUGAL_DECODE_PARTIAL(decode_partial_f16_d128_vec, __half, 128, true, 4)
FRUGAL_DECODE_PARTIAL(decode_partial_f16_d128_scalar, __half, 128, false, 1)
FRUGAL_DECODE_PARTIAL(decode_partial_f16_d256_vec, __half, 256, true, 1)
FRUGAL_DECODE_PARTIAL(decode_partial_f16_d256_scalar, __half, 256, false, 1)
FRUGAL_DECODE_PARTIAL(decode_partial_bf16_d128_vec, __nv_bfloat16, 128, true, 4)
FRUGAL_DECODE_PARTIAL(decode_partial_bf16_d128_scalar, __nv_bfloat16, 128, false, 1)
FRUGAL_DECODE_PARTIAL(decode_partial_bf16_d256_vec, __nv_bfloat16, 256, true, 1)
FRUGAL_DECODE_PARTIAL(decode_partial_bf16_d256_scalar, __nv_bfloat16, 256, false, 1)

#define FRUGAL_DECODE_MERGE(NAME, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(frugal::decode::kThreads)                                \
        NAME(const float* __restrict__ part_o, const float* __restrict__ part_lse,                        \
             const unsigned int* __restrict__ seq_lens, T* __restrict__ o, DecodeParams p) {              \
        frugal::decode::merge_impl<T>(part_o, part_lse, frugal::decode::DenseKeys{seq_lens, p.capacity}, o, p); \
    }

FRUGAL_DECODE_MERGE(decode_merge_f32, float)
FRUGAL_DECODE_MERGE(decode_merge_f16, __half)
FRUGAL_DECODE_MERGE(decode_merge_bf16, __nv_bfloat16)
