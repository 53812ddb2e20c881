// Helpers shared by every kernel file; each file is compiled as common.wgsl + itself.
// Tensors live in array<u32> storage so adapters without SHADER_F16 (Mesa GL,
// browsers) run every dtype: f16 goes through unpack2x16float, bf16 through shifts.

// Storage element type, set per pipeline: 0 = f32, 1 = f16, 2 = bf16.
override DTYPE: u32 = 0u;

// Stands in for -inf: WGSL has no infinity literal, and masked scores never reach exp().
const NEG_BIG: f32 = -3.0e38;

// The 32-bit word that holds element i.
fn elem_word(i: u32) -> u32 {
    if (DTYPE == 0u) {
        return i;
    }
    return i >> 1u;
}

// Element i as f32, given the word elem_word(i) holds.
fn unpack_elem(word: u32, i: u32) -> f32 {
    if (DTYPE == 0u) {
        return bitcast<f32>(word);
    }
    let hi = (i & 1u) == 1u;
    if (DTYPE == 1u) {
        let pair = unpack2x16float(word);
        return select(pair.x, pair.y, hi);
    }
    let bits = select(word & 0xffffu, word >> 16u, hi);
    return bitcast<f32>(bits << 16u);
}

// x rounded to the storage type; 16-bit types in the low half.
fn pack_elem(x: f32) -> u32 {
    if (DTYPE == 0u) {
        return bitcast<u32>(x);
    }
    if (DTYPE == 1u) {
        return pack2x16float(vec2<f32>(x, 0.0)) & 0xffffu;
    }
    let b = bitcast<u32>(x);
    if (x != x) {
        return 0x7fc0u;
    }
    // Round to nearest, ties to even.
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// A quiet NaN in the storage type.
fn nan_bits() -> u32 {
    if (DTYPE == 0u) {
        return 0x7fc00000u;
    }
    if (DTYPE == 1u) {
        return 0x7e00u;
    }
    return 0x7fc0u;
}

// Writing element i of a 16-bit output held in atomic<u32> words: the two halves
// of a word may belong to different invocations, so each writer clears its half
// with atomicAnd(word, r.x) and then sets it with atomicOr(word, r.y), where
// r = half_write(i, bits). f32 outputs are plain atomicStore(word, bits).
fn half_write(i: u32, bits: u32) -> vec2<u32> {
    if ((i & 1u) == 0u) {
        return vec2<u32>(0xffff0000u, bits & 0xffffu);
    }
    return vec2<u32>(0x0000ffffu, (bits & 0xffffu) << 16u);
}

// Raw storage bits of element i (16-bit types in the low half), given the word elem_word(i).
fn elem_bits(word: u32, i: u32) -> u32 {
    if (DTYPE == 0u) {
        return word;
    }
    return select(word & 0xffffu, word >> 16u, (i & 1u) == 1u);
}

// The keys query position i sees in a slot holding positions [0, len), as
// (lo, hi, refused): one interval [lo, hi), hi >= lo, never longer than rows
// in a ring slot; refused = 1 when a plain slot cannot hold len positions.
// mask: 0 causal (j <= i), 1 strict (j < i), 2 full; window 0: none, else
// i - window < j; ring 1: only the newest rows positions are held. Dense
// decode is (mask 2, window 0, ring 0): [0, len), refused past the capacity.
fn key_interval(len: u32, i: u32, mask: u32, window: u32, ring: u32, rows: u32) -> vec3<u32> {
    var hi = len;
    if (mask == 0u && i < len) {
        hi = i + 1u;
    }
    if (mask == 1u) {
        hi = min(len, i);
    }
    var lo = 0u;
    if (window > 0u && i >= window) {
        lo = i - window + 1u;
    }
    if (ring == 1u && len > rows) {
        lo = max(lo, len - rows);
    }
    return vec3<u32>(lo, max(lo, hi), select(0u, 1u, ring == 0u && len > rows));
}
