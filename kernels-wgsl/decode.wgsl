// Dense decode attention (DESIGN.md 4.1), split-KV with a log-sum-exp merge.
// decode_partial: one workgroup per (split, kv head x head chunk, sequence);
// each K/V row of the split is read once for all query heads of the chunk.
// decode_merge: one workgroup per (query head, sequence).

struct Params {
    q_off: u32, k_off: u32, v_off: u32, o_off: u32,
    q_sb: u32, q_sh: u32, k_sb: u32, k_sh: u32,
    k_ss: u32, v_sb: u32, v_sh: u32, v_ss: u32,
    o_sb: u32, o_sh: u32, batch: u32, q_heads: u32,
    kv_heads: u32, head_dim: u32, capacity: u32, chunk_len: u32,
    num_splits: u32, head_chunks: u32, lens_off: u32, lse_off: u32,
    scale: f32, pad0: u32, pad1: u32, pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> q_buf: array<u32>;
@group(0) @binding(2) var<storage, read> k_buf: array<u32>;
@group(0) @binding(3) var<storage, read> v_buf: array<u32>;
@group(0) @binding(4) var<storage, read> lens_buf: array<u32>;
@group(0) @binding(5) var<storage, read_write> ws: array<f32>;
@group(0) @binding(6) var<storage, read_write> o_buf: array<atomic<u32>>;

const WG: u32 = 64u;
const HPB: u32 = 8u;           // query heads per workgroup (HEADS_PER_BLOCK)
const MAXD: u32 = 256u;        // MAX_HEAD_DIM
const DPT: u32 = 4u;           // MAXD / WG: output dims per thread

var<workgroup> q_sh: array<f32, 2048>;  // HPB x MAXD, pre-scaled
var<workgroup> p_sh: array<f32, 512>;   // HPB x WG scores, then probabilities
var<workgroup> m_sh: array<f32, 8>;     // running max per head
var<workgroup> l_sh: array<f32, 8>;     // running sum of exp per head
var<workgroup> a_sh: array<f32, 8>;     // this tile's rescale per head
var<workgroup> len_sh: u32;
var<workgroup> red: array<f32, 64>;

fn load_q(i: u32) -> f32 { return unpack_elem(q_buf[elem_word(i)], i); }
fn load_k(i: u32) -> f32 { return unpack_elem(k_buf[elem_word(i)], i); }
fn load_v(i: u32) -> f32 { return unpack_elem(v_buf[elem_word(i)], i); }

// Writes element i of the output; 16-bit halves of a word may belong to
// other workgroups, so each half is replaced atomically.
fn store_bits(i: u32, bits: u32) {
    if (DTYPE == 0u) {
        atomicStore(&o_buf[i], bits);
        return;
    }
    let w = i >> 1u;
    if ((i & 1u) == 0u) {
        atomicAnd(&o_buf[w], 0xffff0000u);
        atomicOr(&o_buf[w], bits);
    } else {
        atomicAnd(&o_buf[w], 0x0000ffffu);
        atomicOr(&o_buf[w], bits << 16u);
    }
}

@compute @workgroup_size(64)
fn decode_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let split = wg.x;
    let g = wg.y / P.head_chunks;
    let c = wg.y % P.head_chunks;
    let b = wg.z;
    if (tid == 0u) {
        len_sh = lens_buf[P.lens_off + b];
    }
    let len = workgroupUniformLoad(&len_sh);
    let start = split * P.chunk_len;
    // The merge never reads splits past the length, nor anything of a sequence
    // longer than the cache.
    if (len > P.capacity || start >= len) {
        return;
    }
    let d_len = P.head_dim;
    let groups = P.q_heads / P.kv_heads;
    let h0 = g * groups + c * HPB;
    let nh = min(HPB, groups - c * HPB);
    let end = min(start + P.chunk_len, len);

    for (var i = tid; i < nh * d_len; i += WG) {
        let hi = i / d_len;
        let d = i % d_len;
        q_sh[hi * MAXD + d] = load_q(P.q_off + b * P.q_sb + (h0 + hi) * P.q_sh + d) * P.scale;
    }
    if (tid < HPB) {
        m_sh[tid] = NEG_BIG;
        l_sh[tid] = 0.0;
    }
    var acc: array<f32, 32>;   // [DPT][HPB]
    workgroupBarrier();

    let k_head = P.k_off + b * P.k_sb + g * P.k_sh;
    let v_head = P.v_off + b * P.v_sb + g * P.v_sh;
    for (var t0 = start; t0 < end; t0 += WG) {
        // Scores: thread tid takes key t0 + tid, for every head of the chunk.
        let j = t0 + tid;
        let live = j < end;
        var dots: array<f32, 8>;
        if (live) {
            let row = k_head + j * P.k_ss;
            for (var d = 0u; d < d_len; d++) {
                let kd = load_k(row + d);
                for (var hi = 0u; hi < nh; hi++) {
                    dots[hi] += q_sh[hi * MAXD + d] * kd;
                }
            }
        }
        for (var hi = 0u; hi < HPB; hi++) {
            p_sh[hi * WG + tid] = select(NEG_BIG, dots[hi], live);
        }
        workgroupBarrier();
        if (tid < nh) {
            var mx = m_sh[tid];
            for (var t = 0u; t < WG; t++) {
                mx = max(mx, p_sh[tid * WG + t]);
            }
            a_sh[tid] = exp(m_sh[tid] - mx);
            m_sh[tid] = mx;
        }
        workgroupBarrier();
        for (var hi = 0u; hi < nh; hi++) {
            p_sh[hi * WG + tid] = select(0.0, exp(p_sh[hi * WG + tid] - m_sh[hi]), live);
        }
        workgroupBarrier();
        if (tid < nh) {
            var s = 0.0;
            for (var t = 0u; t < WG; t++) {
                s += p_sh[tid * WG + t];
            }
            l_sh[tid] = l_sh[tid] * a_sh[tid] + s;
        }
        // Thread tid owns dims tid, tid + WG, ...: each V element is read once.
        let n = min(WG, end - t0);
        for (var e = 0u; e < DPT; e++) {
            let d = tid + e * WG;
            if (d < d_len) {
                for (var hi = 0u; hi < nh; hi++) {
                    acc[e * HPB + hi] *= a_sh[hi];
                }
                for (var t = 0u; t < n; t++) {
                    let vd = load_v(v_head + (t0 + t) * P.v_ss + d);
                    for (var hi = 0u; hi < nh; hi++) {
                        acc[e * HPB + hi] += p_sh[hi * WG + t] * vd;
                    }
                }
            }
        }
        workgroupBarrier();
    }

    for (var e = 0u; e < DPT; e++) {
        let d = tid + e * WG;
        if (d < d_len) {
            for (var hi = 0u; hi < nh; hi++) {
                let row = (b * P.q_heads + h0 + hi) * P.num_splits + split;
                ws[row * d_len + d] = acc[e * HPB + hi] / l_sh[hi];
            }
        }
    }
    if (tid < nh) {
        let row = (b * P.q_heads + h0 + tid) * P.num_splits + split;
        ws[P.lse_off + row] = m_sh[tid] + log(l_sh[tid]);
    }
}

@compute @workgroup_size(64)
fn decode_merge(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let h = wg.x;
    let b = wg.y;
    if (tid == 0u) {
        len_sh = lens_buf[P.lens_off + b];
    }
    let len = workgroupUniformLoad(&len_sh);
    let d_len = P.head_dim;
    let out = P.o_off + b * P.o_sb + h * P.o_sh;
    if (len == 0u || len > P.capacity) {
        let bits = select(nan_bits(), pack_elem(0.0), len == 0u);
        for (var d = tid; d < d_len; d += WG) {
            store_bits(out + d, bits);
        }
        return;
    }
    let n_active = (len + P.chunk_len - 1u) / P.chunk_len;
    let rows = (b * P.q_heads + h) * P.num_splits;

    var mx = NEG_BIG;
    for (var s = tid; s < n_active; s += WG) {
        mx = max(mx, ws[P.lse_off + rows + s]);
    }
    red[tid] = mx;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if (tid < off) {
            red[tid] = max(red[tid], red[tid + off]);
        }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    var z = 0.0;
    for (var s = tid; s < n_active; s += WG) {
        z += exp(ws[P.lse_off + rows + s] - m);
    }
    red[tid] = z;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if (tid < off) {
            red[tid] += red[tid + off];
        }
        workgroupBarrier();
    }
    let total = red[0];
    for (var d = tid; d < d_len; d += WG) {
        var o = 0.0;
        for (var s = 0u; s < n_active; s++) {
            o += exp(ws[P.lse_off + rows + s] - m) * ws[(rows + s) * d_len + d];
        }
        store_bits(out + d, pack_elem(o / total));
    }
}
