// Blockwise attention (DESIGN.md 4.4): one Q block against one KV block with
// global offsets q0/k0, forward (FlashAttention-2 order), LSE merge, finalize,
// and the backward (pre-pass, dK/dV per KV tile, dQ per Q tile; no atomics).
//
// Workgroup memory is kept to a few hundred floats: WGSL zero-initializes it,
// which naga's GLSL output does with one array constructor per variable, and
// Mesa's GL compiler (llvmpipe) is slow to build: a test shader
// with 3072 floats of it took 52 s per pipeline, one with 320 floats 0.9 s. So K, V, Q and dO are
// read straight from their buffers (on llvmpipe, as on any CPU, the caches
// hold them), and each thread keeps its share of the running accumulator in
// a private array, writing the caller's O / dQ / dK / dV once at the end.
//
// bw_forward: one workgroup per (tile of BQ query rows, query head, sequence).
// The running state is (m, l) per row in workgroup memory and the
// unnormalised accumulator in registers: thread t owns elements
// d = t + WG c (c < 4) of every row of the tile, so head dims up to 256 fit.
// Accumulate mode starts from the caller's (O, lse) as the state (m = lse,
// l = 1, acc = O), which is the LSE merge done incrementally. Per KV tile of
// BK keys: scores (thread = row t/4 x keys t%4, t%4+4, ...), one thread per
// row runs the online softmax, then acc = acc alpha + P V. KV tiles past the
// last key the tile's last row sees (causal) are never visited.

struct Params {
    q_off: u32, k_off: u32, v_off: u32, do_off: u32,
    q_sb: u32, q_sh: u32, q_ss: u32, k_sb: u32,
    k_sh: u32, k_ss: u32, v_sb: u32, v_sh: u32,
    v_ss: u32, do_sb: u32, do_sh: u32, do_ss: u32,
    batch: u32, q_heads: u32, kv_heads: u32, head_dim: u32,
    q_len: u32, kv_len: u32, q0: u32, k0: u32,
    causal: u32, scale: f32, accumulate: u32, bk: u32,
    o_off: u32, lse_off: u32, ob_off: u32, lseb_off: u32,
    delta_off: u32, dq_off: u32, dk_off: u32, dv_off: u32,
    out_off: u32, rows: u32, groups_x: u32, pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> q_buf: array<u32>;
@group(0) @binding(2) var<storage, read> k_buf: array<u32>;
@group(0) @binding(3) var<storage, read> v_buf: array<u32>;
@group(0) @binding(4) var<storage, read> do_buf: array<u32>;
@group(0) @binding(5) var<storage, read_write> o_rw: array<f32>;
// lse as raw f32 bits: -inf (no visible key) cannot be written as a WGSL literal.
@group(0) @binding(6) var<storage, read_write> lse_rw: array<u32>;
@group(0) @binding(7) var<storage, read> o_ro: array<f32>;
@group(0) @binding(8) var<storage, read> lse_ro: array<u32>;
@group(0) @binding(9) var<storage, read> ob_ro: array<f32>;
@group(0) @binding(10) var<storage, read> lseb_ro: array<u32>;
@group(0) @binding(11) var<storage, read_write> delta_rw: array<f32>;
@group(0) @binding(12) var<storage, read> delta_ro: array<f32>;
@group(0) @binding(13) var<storage, read_write> dq_rw: array<f32>;
@group(0) @binding(14) var<storage, read_write> dk_rw: array<f32>;
@group(0) @binding(15) var<storage, read_write> dv_rw: array<f32>;
@group(0) @binding(16) var<storage, read_write> out_buf: array<atomic<u32>>;

const WG: u32 = 64u;
const BQ: u32 = 16u;          // query rows per workgroup (bw_forward, bw_backward_dq, bw_backward_dkv)
const BK: u32 = 16u;          // keys per tile of bw_forward and bw_backward_dq
const PER_ROW: u32 = 4u;      // accumulator elements per thread and row: WG * PER_ROW >= 256
const NEG_INF_BITS: u32 = 0xff800000u;

// Scores / probabilities / dS of a tile, [BQ][BK].
var<workgroup> s_sh: array<f32, 256>;
// (P, dS) of a tile of bw_backward_dkv, [BQ][16].
var<workgroup> pds_sh: array<vec2<f32>, 256>;
var<workgroup> m_sh: array<f32, 16>;      // running max per row (NEG_BIG: nothing seen)
var<workgroup> l_sh: array<f32, 16>;      // running sum of exp per row
var<workgroup> a_sh: array<f32, 16>;      // this tile's rescale factor per row
var<workgroup> dl_sh: array<f32, 16>;     // delta per row (backward)

fn ld_q(i: u32) -> f32 { return unpack_elem(q_buf[elem_word(i)], i); }
fn ld_k(i: u32) -> f32 { return unpack_elem(k_buf[elem_word(i)], i); }
fn ld_v(i: u32) -> f32 { return unpack_elem(v_buf[elem_word(i)], i); }
fn ld_do(i: u32) -> f32 { return unpack_elem(do_buf[elem_word(i)], i); }

fn q_at(b: u32, h: u32, i: u32) -> u32 { return P.q_off + b * P.q_sb + h * P.q_sh + i * P.q_ss; }
fn k_at(b: u32, g: u32, j: u32) -> u32 { return P.k_off + b * P.k_sb + g * P.k_sh + j * P.k_ss; }
fn v_at(b: u32, g: u32, j: u32) -> u32 { return P.v_off + b * P.v_sb + g * P.v_sh + j * P.v_ss; }
fn do_at(b: u32, h: u32, i: u32) -> u32 { return P.do_off + b * P.do_sb + h * P.do_sh + i * P.do_ss; }

// Whether query row i of the block sees key row j.
fn visible(i: u32, j: u32) -> bool {
    return P.causal == 0u || P.k0 + j <= P.q0 + i;
}

// Keys [0, keys_end(i)) hold every key query row i sees.
fn keys_end(i: u32) -> u32 {
    if (P.causal == 0u) {
        return P.kv_len;
    }
    let past = P.q0 + i + 1u;
    if (past <= P.k0) {
        return 0u;
    }
    return min(P.kv_len, past - P.k0);
}

// Dot product of head_dim elements of two input-dtype rows.
fn dot_qk(qb: u32, kb: u32) -> f32 {
    var acc = 0.0;
    for (var d = 0u; d < P.head_dim; d++) {
        acc += ld_q(qb + d) * ld_k(kb + d);
    }
    return acc;
}

fn dot_dov(db: u32, vb: u32) -> f32 {
    var acc = 0.0;
    for (var d = 0u; d < P.head_dim; d++) {
        acc += ld_do(db + d) * ld_v(vb + d);
    }
    return acc;
}

@compute @workgroup_size(64)
fn bw_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i0 = wid.x * BQ;
    let h = wid.y;
    let b = wid.z;
    let g = h / (P.q_heads / P.kv_heads);
    let rows = min(BQ, P.q_len - i0);
    let d_len = P.head_dim;
    let row0 = (b * P.q_heads + h) * P.q_len + i0;

    if (t < BQ) {
        var m = NEG_BIG;
        var l = 0.0;
        if (t < rows && P.accumulate != 0u) {
            let bits = lse_rw[P.lse_off + row0 + t];
            if (bits != NEG_INF_BITS) {
                m = bitcast<f32>(bits);
                l = 1.0;
            }
        }
        m_sh[t] = m;
        l_sh[t] = l;
    }
    workgroupBarrier();
    // acc[r * PER_ROW + c]: element d = t + WG c of row r. A fresh launch, or
    // an empty running row, starts from zero.
    var acc: array<f32, 64>;
    if (P.accumulate != 0u) {
        for (var r = 0u; r < rows; r++) {
            if (l_sh[r] != 0.0) {
                for (var c = 0u; c < PER_ROW; c++) {
                    let d = t + c * WG;
                    if (d < d_len) {
                        acc[r * PER_ROW + c] = o_rw[P.o_off + (row0 + r) * d_len + d];
                    }
                }
            }
        }
    }

    let kend = keys_end(i0 + rows - 1u);
    let qr = t / 4u;
    let qc = t % 4u;
    for (var j0 = 0u; j0 < kend; j0 += BK) {
        let nk = min(BK, kend - j0);
        if (qr < rows) {
            let qb = q_at(b, h, i0 + qr);
            for (var j = qc; j < nk; j += 4u) {
                var s = dot_qk(qb, k_at(b, g, j0 + j)) * P.scale;
                if (!visible(i0 + qr, j0 + j)) {
                    s = NEG_BIG;
                }
                s_sh[qr * BK + j] = s;
            }
        }
        workgroupBarrier();
        if (t < rows) {
            let m_old = m_sh[t];
            var m_tile = NEG_BIG;
            for (var j = 0u; j < nk; j++) {
                m_tile = max(m_tile, s_sh[t * BK + j]);
            }
            let m_new = max(m_old, m_tile);
            var alpha = 1.0;
            var sum = 0.0;
            if (m_new > NEG_BIG) {
                alpha = exp(m_old - m_new);
            }
            for (var j = 0u; j < nk; j++) {
                let s = s_sh[t * BK + j];
                var p = 0.0;
                if (s > NEG_BIG) {
                    p = exp(s - m_new);
                }
                s_sh[t * BK + j] = p;
                sum += p;
            }
            m_sh[t] = m_new;
            l_sh[t] = l_sh[t] * alpha + sum;
            a_sh[t] = alpha;
        }
        workgroupBarrier();
        for (var r = 0u; r < rows; r++) {
            let alpha = a_sh[r];
            for (var c = 0u; c < PER_ROW; c++) {
                acc[r * PER_ROW + c] *= alpha;
            }
        }
        // Each V element once per thread, into every row's accumulator.
        for (var c = 0u; c < PER_ROW; c++) {
            let d = t + c * WG;
            if (d < d_len) {
                for (var j = 0u; j < nk; j++) {
                    let v = ld_v(v_at(b, g, j0 + j) + d);
                    for (var r = 0u; r < rows; r++) {
                        acc[r * PER_ROW + c] += s_sh[r * BK + j] * v;
                    }
                }
            }
        }
        workgroupBarrier();
    }

    for (var r = 0u; r < rows; r++) {
        let l = l_sh[r];
        for (var c = 0u; c < PER_ROW; c++) {
            let d = t + c * WG;
            if (d < d_len) {
                o_rw[P.o_off + (row0 + r) * d_len + d] = select(0.0, acc[r * PER_ROW + c] / l, l > 0.0);
            }
        }
    }
    if (t < rows) {
        let l = l_sh[t];
        var bits = NEG_INF_BITS;
        if (l > 0.0) {
            bits = bitcast<u32>(m_sh[t] + log(l));
        }
        lse_rw[P.lse_off + row0 + t] = bits;
    }
}

// The flat index of a thread in a 1-D launch split over (groups_x, y) workgroups.
fn flat(wid: vec3<u32>, t: u32) -> u32 {
    return (wid.y * P.groups_x + wid.x) * WG + t;
}

// bw_merge: one thread per row; merges (ob, lseb) into (o, lse).
@compute @workgroup_size(64)
fn bw_merge(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let r = flat(wid, t);
    if (r >= P.rows) {
        return;
    }
    let d_len = P.head_dim;
    let a_bits = lse_rw[P.lse_off + r];
    let b_bits = lseb_ro[P.lseb_off + r];
    let ob = P.o_off + r * d_len;
    let bb = P.ob_off + r * d_len;
    if (b_bits == NEG_INF_BITS) {
        if (a_bits == NEG_INF_BITS) {
            for (var d = 0u; d < d_len; d++) {
                o_rw[ob + d] = 0.0;
            }
        }
        return;
    }
    if (a_bits == NEG_INF_BITS) {
        for (var d = 0u; d < d_len; d++) {
            o_rw[ob + d] = ob_ro[bb + d];
        }
        lse_rw[P.lse_off + r] = b_bits;
        return;
    }
    let la = bitcast<f32>(a_bits);
    let lb = bitcast<f32>(b_bits);
    let hi = max(la, lb);
    let lse = hi + log(1.0 + exp(min(la, lb) - hi));
    let wa = exp(la - lse);
    let wb = exp(lb - lse);
    for (var d = 0u; d < d_len; d++) {
        o_rw[ob + d] = o_rw[ob + d] * wa + ob_ro[bb + d] * wb;
    }
    lse_rw[P.lse_off + r] = bitcast<u32>(lse);
}

// Row r of [B, Hq, q_len] as (b, h, i).
fn row_coords(r: u32) -> vec3<u32> {
    let i = r % P.q_len;
    let bh = r / P.q_len;
    return vec3<u32>(bh / P.q_heads, bh % P.q_heads, i);
}

// bw_finalize: one thread per element of O; casts into the strided output at
// the dO strides (do_*), 0 where the row saw no key. 16-bit outputs share words
// between threads, hence the atomic halves.
@compute @workgroup_size(64)
fn bw_finalize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let e = flat(wid, t);
    let d_len = P.head_dim;
    if (e >= P.rows * d_len) {
        return;
    }
    let r = e / d_len;
    let d = e - r * d_len;
    let c = row_coords(r);
    var x = o_ro[P.o_off + e];
    if (lse_ro[P.lse_off + r] == NEG_INF_BITS) {
        x = 0.0;
    }
    let idx = P.out_off + c.x * P.do_sb + c.y * P.do_sh + c.z * P.do_ss + d;
    if (DTYPE == 0u) {
        atomicStore(&out_buf[idx], bitcast<u32>(x));
    } else {
        let hw = half_write(idx, pack_elem(x));
        atomicAnd(&out_buf[idx >> 1u], hw.x);
        atomicOr(&out_buf[idx >> 1u], hw.y);
    }
}

// bw_backward_prepass: delta = rowsum(dO * O), one thread per row.
@compute @workgroup_size(64)
fn bw_backward_prepass(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let r = flat(wid, t);
    if (r >= P.rows) {
        return;
    }
    let c = row_coords(r);
    let d_len = P.head_dim;
    let db = do_at(c.x, c.y, c.z);
    var acc = 0.0;
    for (var d = 0u; d < d_len; d++) {
        acc += ld_do(db + d) * o_ro[P.o_off + r * d_len + d];
    }
    delta_rw[P.delta_off + r] = acc;
}

// lse of row r as f32, NEG_BIG for -inf.
fn lse_of(r: u32) -> f32 {
    let bits = lse_ro[P.lse_off + r];
    return select(bitcast<f32>(bits), NEG_BIG, bits == NEG_INF_BITS);
}

// P = exp(s - lse) of a visible pair of a row that saw keys, else 0.
fn prob(s: f32, lse: f32, seen: bool) -> f32 {
    if (!seen || lse <= NEG_BIG) {
        return 0.0;
    }
    return exp(s - lse);
}

// bw_backward_dq: one workgroup per (tile of BQ query rows, query head, sequence),
// looping over the KV tiles the rows see: per (row, key) pair S, P, dP = dO . V
// and dS = P (dP - delta), then dQ += scale dS K into private accumulators
// (thread t owns elements d = t + WG c of every row, as in bw_forward), added
// to the caller's dQ once at the end (this workgroup owns those rows).
@compute @workgroup_size(64)
fn bw_backward_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let i0 = wid.x * BQ;
    let h = wid.y;
    let b = wid.z;
    let g = h / (P.q_heads / P.kv_heads);
    let rows = min(BQ, P.q_len - i0);
    let d_len = P.head_dim;
    let row0 = (b * P.q_heads + h) * P.q_len + i0;
    if (t < rows) {
        m_sh[t] = lse_of(row0 + t);
        dl_sh[t] = delta_ro[P.delta_off + row0 + t];
    }
    workgroupBarrier();
    var acc: array<f32, 64>;
    let kend = keys_end(i0 + rows - 1u);
    let qr = t / 4u;
    let qc = t % 4u;
    for (var j0 = 0u; j0 < kend; j0 += BK) {
        let nk = min(BK, kend - j0);
        if (qr < rows) {
            let qb = q_at(b, h, i0 + qr);
            let db = do_at(b, h, i0 + qr);
            for (var j = qc; j < nk; j += 4u) {
                let dp = dot_dov(db, v_at(b, g, j0 + j));
                let s = dot_qk(qb, k_at(b, g, j0 + j));
                let p = prob(s * P.scale, m_sh[qr], visible(i0 + qr, j0 + j));
                s_sh[qr * BK + j] = p * (dp - dl_sh[qr]);
            }
        }
        workgroupBarrier();
        for (var c = 0u; c < PER_ROW; c++) {
            let d = t + c * WG;
            if (d < d_len) {
                for (var j = 0u; j < nk; j++) {
                    let k = ld_k(k_at(b, g, j0 + j) + d);
                    for (var r = 0u; r < rows; r++) {
                        acc[r * PER_ROW + c] += s_sh[r * BK + j] * k;
                    }
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < rows; r++) {
        for (var c = 0u; c < PER_ROW; c++) {
            let d = t + c * WG;
            if (d < d_len) {
                let idx = P.dq_off + (row0 + r) * d_len + d;
                dq_rw[idx] += P.scale * acc[r * PER_ROW + c];
            }
        }
    }
}

// bw_backward_dkv: one workgroup per (tile of bk keys, kv head, sequence),
// bk * head_dim <= 1024 (thread t owns elements e = t + WG c, c < 16, of the
// tile's [bk][head_dim] dK and dV in private accumulators), looping over every
// query head of the group and the query tiles that see the keys: per tile P
// and dS for the (row, key) pairs, then dV += P^T dO and dK += scale dS^T Q;
// added to the caller's dK/dV once at the end (this workgroup owns those rows).
@compute @workgroup_size(64)
fn bw_backward_dkv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let bk = P.bk;
    let j0 = wid.x * bk;
    let g = wid.y;
    let b = wid.z;
    let groups = P.q_heads / P.kv_heads;
    let nk = min(bk, P.kv_len - j0);
    let d_len = P.head_dim;
    let n_el = nk * d_len;
    var acc_k: array<f32, 16>;
    var acc_v: array<f32, 16>;
    // The first query row that sees key j0.
    var i_start = 0u;
    if (P.causal != 0u && P.k0 + j0 > P.q0) {
        i_start = P.k0 + j0 - P.q0;
    }
    let kv_row0 = (b * P.kv_heads + g) * P.kv_len + j0;
    for (var hh = 0u; hh < groups; hh++) {
        let h = g * groups + hh;
        for (var i0 = i_start; i0 < P.q_len; i0 += BQ) {
            let rows = min(BQ, P.q_len - i0);
            let row0 = (b * P.q_heads + h) * P.q_len + i0;
            if (t < rows) {
                m_sh[t] = lse_of(row0 + t);
                dl_sh[t] = delta_ro[P.delta_off + row0 + t];
            }
            workgroupBarrier();
            for (var e = t; e < BQ * bk; e += WG) {
                let r = e / bk;
                let j = e - r * bk;
                var p = 0.0;
                var ds = 0.0;
                if (r < rows && j < nk) {
                    let s = dot_qk(q_at(b, h, i0 + r), k_at(b, g, j0 + j));
                    let dp = dot_dov(do_at(b, h, i0 + r), v_at(b, g, j0 + j));
                    p = prob(s * P.scale, m_sh[r], visible(i0 + r, j0 + j));
                    ds = p * (dp - dl_sh[r]);
                }
                pds_sh[r * 16u + j] = vec2<f32>(p, ds);
            }
            workgroupBarrier();
            for (var c = 0u; c < 16u; c++) {
                let e = t + c * WG;
                if (e < n_el) {
                    let j = e / d_len;
                    let d = e - j * d_len;
                    for (var r = 0u; r < rows; r++) {
                        let pds = pds_sh[r * 16u + j];
                        acc_v[c] += pds.x * ld_do(do_at(b, h, i0 + r) + d);
                        acc_k[c] += pds.y * ld_q(q_at(b, h, i0 + r) + d);
                    }
                }
            }
            workgroupBarrier();
        }
    }
    for (var c = 0u; c < 16u; c++) {
        let e = t + c * WG;
        if (e < n_el) {
            let idx = kv_row0 * d_len + e;
            dv_rw[P.dv_off + idx] += acc_v[c];
            dk_rw[P.dk_off + idx] += P.scale * acc_k[c];
        }
    }
}
