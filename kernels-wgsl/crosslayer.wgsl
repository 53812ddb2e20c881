// Cross-layer KV mapping (src/crosslayer): masked attention of a chunk of
// queries over one (possibly ring-buffer) KV slot, and the slot write.
//
// The decode form (one query per sequence) runs decode.wgsl's split-KV
// kernels instead, with the same key_interval (common.wgsl).
//
// xl_attend: one workgroup per (query t, query head h, sequence b). The keys a
// query sees always form one interval [lo, hi) of positions (causal, strict,
// full, window and ring bounds are all intervals), so the kernel walks it in
// tiles of 64 keys: each invocation scores one key of the tile, then every
// invocation folds the tile into its output columns d = tid + 64 k (online
// softmax, f32). A query with no key writes 0; a plain slot whose length
// exceeds its rows writes NaN.

struct AttnParams {
    q_off: u32,
    k_off: u32,
    v_off: u32,
    o_off: u32,
    pos_off: u32,
    lens_off: u32,
    q_sb: u32,
    q_st: u32,
    q_sh: u32,
    k_sb: u32,
    k_sh: u32,
    k_sr: u32,
    v_sb: u32,
    v_sh: u32,
    v_sr: u32,
    o_sb: u32,
    o_st: u32,
    o_sh: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    rows: u32,
    mask: u32,   // 0 causal (j <= i), 1 strict (j < i), 2 full
    window: u32, // 0: none; else keys i - window < j
    ring: u32,   // 1: position p lives at row p % rows
    scale: f32,
    pad0: u32,
    pad1: u32,
}

struct WriteParams {
    new_k_off: u32,
    new_v_off: u32,
    k_off: u32,
    v_off: u32,
    start_off: u32,
    n_sb: u32,
    n_st: u32,
    n_sh: u32,
    s_sb: u32,
    s_sh: u32,
    s_sr: u32,
    tokens: u32,
    kv_heads: u32,
    head_dim: u32,
    rows: u32,
    ring: u32,
}

@group(0) @binding(0) var<uniform> P: AttnParams;
@group(0) @binding(1) var<storage, read> q_buf: array<u32>;
@group(0) @binding(2) var<storage, read> k_buf: array<u32>;
@group(0) @binding(3) var<storage, read> v_buf: array<u32>;
@group(0) @binding(4) var<storage, read> pos_buf: array<u32>;
@group(0) @binding(5) var<storage, read> lens_buf: array<u32>;
@group(0) @binding(6) var<storage, read_write> o_buf: array<atomic<u32>>;

@group(0) @binding(10) var<uniform> W: WriteParams;
@group(0) @binding(11) var<storage, read> new_k_buf: array<u32>;
@group(0) @binding(12) var<storage, read> new_v_buf: array<u32>;
@group(0) @binding(13) var<storage, read> start_buf: array<u32>;
@group(0) @binding(14) var<storage, read_write> k_slot_buf: array<atomic<u32>>;
@group(0) @binding(15) var<storage, read_write> v_slot_buf: array<atomic<u32>>;

const XL_NT: u32 = 64u;
const XL_MAXD: u32 = 256u;

var<workgroup> xl_q: array<f32, 256>;
var<workgroup> xl_s: array<f32, 64>;
// lo, hi, and 1 when the slot length is impossible (NaN row).
var<workgroup> xl_range: vec3<u32>;

fn xl_ld_k(i: u32) -> f32 {
    return unpack_elem(k_buf[elem_word(i)], i);
}

fn xl_ld_v(base: u32, d: u32) -> f32 {
    if (d >= P.head_dim) {
        return 0.0;
    }
    let i = base + d;
    return unpack_elem(v_buf[elem_word(i)], i);
}

fn xl_store_out(i: u32, bits: u32) {
    if (DTYPE == 0u) {
        atomicStore(&o_buf[i], bits);
        return;
    }
    let r = half_write(i, bits);
    atomicAnd(&o_buf[i >> 1u], r.x);
    atomicOr(&o_buf[i >> 1u], r.y);
}

fn xl_slot_row(j: u32) -> u32 {
    if (P.ring == 1u) {
        return j % P.rows;
    }
    return j;
}

@compute @workgroup_size(64)
fn xl_attend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let t = wg.x;
    let h = wg.y;
    let b = wg.z;
    let g = h / (P.q_heads / P.kv_heads);
    if (tid == 0u) {
        let len = lens_buf[P.lens_off + b];
        let pos = pos_buf[P.pos_off + b];
        // The query position, saturated instead of wrapping past 2^32 - 1.
        let i = select(pos + t, 0xffffffffu, pos > 0xffffffffu - t);
        xl_range = key_interval(len, i, P.mask, P.window, P.ring, P.rows);
    }
    let range = workgroupUniformLoad(&xl_range);
    let lo = range.x;
    let hi = range.y;
    let d_len = P.head_dim;
    let out = P.o_off + b * P.o_sb + t * P.o_st + h * P.o_sh;
    if (range.z == 1u) {
        for (var d = tid; d < d_len; d += XL_NT) {
            xl_store_out(out + d, nan_bits());
        }
        return;
    }
    let qb = P.q_off + b * P.q_sb + t * P.q_st + h * P.q_sh;
    for (var d = tid; d < d_len; d += XL_NT) {
        let i = qb + d;
        xl_q[d] = unpack_elem(q_buf[elem_word(i)], i);
    }
    workgroupBarrier();

    let kb = P.k_off + b * P.k_sb + g * P.k_sh;
    let vb = P.v_off + b * P.v_sb + g * P.v_sh;
    var m = NEG_BIG;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    let span = hi - lo;
    let tiles = (span + XL_NT - 1u) / XL_NT;
    for (var tile = 0u; tile < tiles; tile += 1u) {
        let first = tile * XL_NT;
        let count = min(XL_NT, span - first);
        var s = NEG_BIG;
        if (tid < count) {
            let row = kb + xl_slot_row(lo + first + tid) * P.k_sr;
            var dot = 0.0;
            for (var d = 0u; d < d_len; d += 1u) {
                dot += xl_q[d] * xl_ld_k(row + d);
            }
            s = dot * P.scale;
        }
        xl_s[tid] = s;
        workgroupBarrier();
        var tmax = NEG_BIG;
        for (var x = 0u; x < count; x += 1u) {
            tmax = max(tmax, xl_s[x]);
        }
        let m_new = max(m, tmax);
        let corr = exp(m - m_new);
        l *= corr;
        acc *= corr;
        for (var x = 0u; x < count; x += 1u) {
            let p = exp(xl_s[x] - m_new);
            l += p;
            let row = vb + xl_slot_row(lo + first + x) * P.v_sr;
            let vals = vec4<f32>(
                xl_ld_v(row, tid),
                xl_ld_v(row, tid + XL_NT),
                xl_ld_v(row, tid + 2u * XL_NT),
                xl_ld_v(row, tid + 3u * XL_NT),
            );
            acc += p * vals;
        }
        m = m_new;
        // Every invocation has read this tile's scores before the next one overwrites them.
        workgroupBarrier();
    }
    let inv = select(1.0 / l, 0.0, l == 0.0);
    let res = acc * inv;
    for (var k = 0u; k < 4u; k += 1u) {
        let d = tid + k * XL_NT;
        if (d < d_len) {
            xl_store_out(out + d, pack_elem(res[k]));
        }
    }
}

fn xl_store_slot(is_v: bool, i: u32, bits: u32) {
    if (DTYPE == 0u) {
        if (is_v) {
            atomicStore(&v_slot_buf[i], bits);
        } else {
            atomicStore(&k_slot_buf[i], bits);
        }
        return;
    }
    let r = half_write(i, bits);
    if (is_v) {
        atomicAnd(&v_slot_buf[i >> 1u], r.x);
        atomicOr(&v_slot_buf[i >> 1u], r.y);
    } else {
        atomicAnd(&k_slot_buf[i >> 1u], r.x);
        atomicOr(&k_slot_buf[i >> 1u], r.y);
    }
}

// One workgroup per (token t * kv_heads + g, sequence b): copies that K and V
// row to the slot row of position start[b] + t (skipped when a plain slot
// cannot hold it).
@compute @workgroup_size(64)
fn xl_write(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let t = wg.x / W.kv_heads;
    let g = wg.x % W.kv_heads;
    let b = wg.y;
    let start = start_buf[W.start_off + b];
    let p = select(start + t, 0xffffffffu, start > 0xffffffffu - t);
    var row = p;
    if (W.ring == 1u) {
        row = p % W.rows;
    } else if (p >= W.rows) {
        return;
    }
    let src = b * W.n_sb + t * W.n_st + g * W.n_sh;
    let dst = b * W.s_sb + g * W.s_sh + row * W.s_sr;
    for (var d = tid; d < W.head_dim; d += XL_NT) {
        let ik = W.new_k_off + src + d;
        let iv = W.new_v_off + src + d;
        xl_store_slot(false, W.k_off + dst + d, elem_bits(new_k_buf[elem_word(ik)], ik));
        xl_store_slot(true, W.v_off + dst + d, elem_bits(new_v_buf[elem_word(iv)], iv));
    }
}
