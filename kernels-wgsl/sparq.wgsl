// SparQ attention (src/sparq/mod.rs, DESIGN.md 4.2): one decode step in four
// launches, plus the cache's bulk fill and one-token append.
//
// sparq_scores: one workgroup per (scores split, kv head x head chunk, sequence).
//   Finds i1 (top r of |q|, or of the group's sum of |q| in shared mode) and
//   tau per head, then the approximate logits q[i1] . K^T[i1, j] / tau of its
//   chunk's positions (thread per position: adjacent threads read adjacent
//   K^T words) and the chunk's (max, sum of exp) per head.
// sparq_select: one workgroup per selection row. Merges the (max, sum) partials
//   into lse, forms the key per position (shared: the group's sum of s_hat,
//   materialised; per head: the raw logit), radix-selects the best n - w of the
//   first len - w positions (ties to the lower index) and appends the window.
// sparq_gather: one workgroup per (gather split, kv head x head chunk, sequence):
//   exact attention over its slice of the position list, with its share of alpha.
// sparq_merge: one workgroup per (query head, sequence): log-sum-exp merge of the
//   gather splits, mixed with the mean of V.
//
// sparq_fill_rows / sparq_fill_t / sparq_fill_mean: the bulk fill (K or V rows,
//   K^T, the mean of V) from a strided source, one workgroup column per (kv head,
//   sequence), grid-stride over the words of positions j < len. sparq_append:
//   one workgroup per sequence writes position len of every kv head, moves the
//   running mean, then bumps len. Cache words whose two 16-bit halves may
//   belong to different invocations are written half by half with atomics.
//
// The workspace (ws) holds f32 values and u32 positions as raw 32-bit words,
// at the offsets of SparqParams::plan().

struct Params {
    q_off: u32, o_off: u32, q_sb: u32, q_sh: u32,
    o_sb: u32, o_sh: u32, batch: u32, q_heads: u32,
    kv_heads: u32, head_dim: u32, capacity: u32, groups: u32,
    r: u32, k: u32, window: u32, realloc: u32,
    gqa_shared: u32, score_chunk: u32, score_splits: u32, gather_chunk: u32,
    gather_splits: u32, k_cap: u32, hpb: u32, head_chunks: u32,
    logits_off: u32, norm_off: u32, lse_off: u32, keys_off: u32,
    idx_off: u32, part_off: u32, scale: f32, src_off: u32,
    src_sb: u32, src_sh: u32, src_ss: u32, src2_off: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
// Decode step.
@group(0) @binding(1) var<storage, read> q_buf: array<u32>;
@group(0) @binding(2) var<storage, read> kt_buf: array<u32>;
@group(0) @binding(3) var<storage, read> k_buf: array<u32>;
@group(0) @binding(4) var<storage, read> v_buf: array<u32>;
@group(0) @binding(5) var<storage, read> mean_buf: array<f32>;
@group(0) @binding(6) var<storage, read> lens_buf: array<u32>;
@group(0) @binding(7) var<storage, read_write> ws: array<u32>;
@group(0) @binding(8) var<storage, read_write> o_buf: array<atomic<u32>>;
// Fill and append.
@group(0) @binding(9) var<storage, read> src_buf: array<u32>;    // fill: K or V; append: k_new
@group(0) @binding(10) var<storage, read> src2_buf: array<u32>;  // append: v_new
@group(0) @binding(11) var<storage, read_write> dst_buf: array<atomic<u32>>;
@group(0) @binding(12) var<storage, read_write> mean_rw: array<f32>;
@group(0) @binding(13) var<storage, read_write> lens_rw: array<u32>;
@group(0) @binding(14) var<storage, read_write> k_rw: array<atomic<u32>>;
@group(0) @binding(15) var<storage, read_write> kt_rw: array<atomic<u32>>;
@group(0) @binding(16) var<storage, read_write> v_rw: array<atomic<u32>>;

const WG: u32 = 256u;
const MWG: u32 = 64u;          // sparq_merge
const FILL_DIMS: u32 = 64u;    // sparq_fill_mean: dims per workgroup (4 row lanes each)

var<workgroup> len_sh: u32;
// sparq_scores
var<workgroup> a_sh: array<f32, 256>;       // sum of |q| per component
var<workgroup> flag_sh: array<u32, 256>;    // component in i1
var<workgroup> i1_sh: array<u32, 256>;      // i1, ascending
var<workgroup> tau_sh: array<f32, 8>;
// sparq_scores: q[i1] / tau as [m][head quad]; then the (max, sum) reduction.
// sparq_gather: q as [d][head quad], then scores / probabilities as [entry][head
// quad], then the row lanes' partial outputs.
var<workgroup> v4_sh: array<vec4<f32>, 512>;
// sparq_gather
var<workgroup> gred_sh: array<vec4<f32>, 256>;  // 4 x 64 reduction slots
var<workgroup> j_sh: array<u32, 256>;           // positions of the chunk's entries
// sparq_select, sparq_merge, sparq_fill_mean
var<workgroup> red_sh: array<f32, 256>;
var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> scan_sh: array<u32, 256>;
var<workgroup> digit_sh: u32;
var<workgroup> remaining_sh: u32;
var<workgroup> total_sh: u32;
var<workgroup> lse_sh: array<f32, 256>;       // sparq_select: lse of the row's first 256 heads

fn wsf(i: u32) -> f32 {
    return bitcast<f32>(ws[i]);
}

fn load_q(b: u32, h: u32, d: u32) -> f32 {
    let i = P.q_off + b * P.q_sb + h * P.q_sh + d;
    return unpack_elem(q_buf[elem_word(i)], i);
}

// Component hh (< 8) of the pair of head quads (a: heads 0-3, b: heads 4-7).
fn pick(a: vec4<f32>, b: vec4<f32>, hh: u32) -> f32 {
    return select(b[hh & 3u], a[hh & 3u], hh < 4u);
}

// ---------------------------------------------------------------- scores

// Logits of up to 4 heads (components of x, nh of them) at o, o + stride, ...
fn put_logits(o: u32, stride: u32, x: vec4<f32>, nh: u32) {
    ws[o] = bitcast<u32>(x.x);
    if (nh > 1u) {
        ws[o + stride] = bitcast<u32>(x.y);
    }
    if (nh > 2u) {
        ws[o + 2u * stride] = bitcast<u32>(x.z);
    }
    if (nh > 3u) {
        ws[o + 3u * stride] = bitcast<u32>(x.w);
    }
}

@compute @workgroup_size(256)
fn sparq_scores(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let split = wg.x;
    let g = wg.y / P.head_chunks;
    let hc = wg.y % P.head_chunks;
    let b = wg.z;
    if (tid == 0u) {
        len_sh = lens_buf[b];
    }
    let len = workgroupUniformLoad(&len_sh);
    let start = split * P.score_chunk;
    if (len > P.capacity || start >= len) {
        return;
    }
    let end = min(start + P.score_chunk, len);
    let dim = P.head_dim;
    let h0 = g * P.groups + hc * P.hpb;
    let nh = min(P.hpb, P.groups - hc * P.hpb);
    // Heads whose |q| decide i1.
    var s0 = h0;
    var sn = nh;
    if (P.gqa_shared != 0u) {
        s0 = g * P.groups;
        sn = P.groups;
    }
    if (tid < dim) {
        var a = 0.0;
        for (var i = 0u; i < sn; i++) {
            a += abs(load_q(b, s0 + i, tid));
        }
        a_sh[tid] = a;
    }
    workgroupBarrier();
    // Component tid is in i1 when fewer than r components beat it (ties: lower index wins).
    var chosen = false;
    if (tid < dim) {
        let x = a_sh[tid];
        var rank = 0u;
        for (var e = 0u; e < dim; e++) {
            let y = a_sh[e];
            rank += u32(y > x || (y == x && e < tid));
        }
        chosen = rank < P.r;
        flag_sh[tid] = u32(chosen);
    }
    workgroupBarrier();
    if (chosen) {
        var pos = 0u;
        for (var e = 0u; e < tid; e++) {
            pos += flag_sh[e];
        }
        i1_sh[pos] = tid;
    }
    if (tid < nh) {
        // Both sums in ascending component order, so r = D gives tau = sqrt(D) exactly.
        var all = 0.0;
        var part = 0.0;
        for (var d = 0u; d < dim; d++) {
            let x = abs(load_q(b, h0 + tid, d));
            all += x;
            if (flag_sh[d] != 0u) {
                part += x;
            }
        }
        let ratio = select(1.0, part / all, all > 0.0);
        tau_sh[tid] = sqrt(f32(dim) * ratio);
    }
    workgroupBarrier();
    let r = P.r;
    if (tid < r) {
        let i = i1_sh[tid];
        var qa = vec4<f32>(0.0);
        var qb = vec4<f32>(0.0);
        for (var hh = 0u; hh < nh; hh++) {
            let x = load_q(b, h0 + hh, i) / tau_sh[hh];
            if (hh < 4u) {
                qa[hh] = x;
            } else {
                qb[hh - 4u] = x;
            }
        }
        v4_sh[2u * tid] = qa;
        v4_sh[2u * tid + 1u] = qb;
    }
    workgroupBarrier();

    let two = nh > 4u;
    let cap = P.capacity;
    let kt_head = (b * P.kv_heads + g) * dim * cap;
    let lg_head = P.logits_off + (b * P.q_heads + h0) * cap;
    var ma = vec4<f32>(NEG_BIG);
    var mb = vec4<f32>(NEG_BIG);
    var sa = vec4<f32>(0.0);
    var sb = vec4<f32>(0.0);
    for (var j = start + tid; j < end; j += WG) {
        var xa = vec4<f32>(0.0);
        var xb = vec4<f32>(0.0);
        for (var m = 0u; m < r; m++) {
            let e = kt_head + i1_sh[m] * cap + j;
            let kv = unpack_elem(kt_buf[elem_word(e)], e);
            xa += v4_sh[2u * m] * kv;
            if (two) {
                xb += v4_sh[2u * m + 1u] * kv;
            }
        }
        put_logits(lg_head + j, cap, xa, nh);
        // Online (max, sum of exp), one exp per head: exp(-|x - m|) is the factor
        // for the sum when x sets a new max, else the new term.
        let ea = exp(-abs(xa - ma));
        sa = select(sa + ea, sa * ea + 1.0, xa > ma);
        ma = max(ma, xa);
        if (two) {
            put_logits(lg_head + 4u * cap + j, cap, xb, nh - 4u);
            let eb = exp(-abs(xb - mb));
            sb = select(sb + eb, sb * eb + 1.0, xb > mb);
            mb = max(mb, xb);
        }
    }

    // (max, sum of exp) per head over the chunk.
    workgroupBarrier();
    v4_sh[2u * tid] = ma;
    v4_sh[2u * tid + 1u] = mb;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if (tid < off) {
            v4_sh[2u * tid] = max(v4_sh[2u * tid], v4_sh[2u * (tid + off)]);
            v4_sh[2u * tid + 1u] = max(v4_sh[2u * tid + 1u], v4_sh[2u * (tid + off) + 1u]);
        }
        workgroupBarrier();
    }
    let gma = v4_sh[0];
    let gmb = v4_sh[1];
    workgroupBarrier();
    v4_sh[2u * tid] = sa * exp(ma - gma);
    v4_sh[2u * tid + 1u] = sb * exp(mb - gmb);
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if (tid < off) {
            v4_sh[2u * tid] += v4_sh[2u * (tid + off)];
            v4_sh[2u * tid + 1u] += v4_sh[2u * (tid + off) + 1u];
        }
        workgroupBarrier();
    }
    if (tid < nh) {
        let o = P.norm_off + ((b * P.q_heads + h0 + tid) * P.score_splits + split) * 2u;
        ws[o] = bitcast<u32>(pick(gma, gmb, tid));
        ws[o + 1u] = bitcast<u32>(pick(v4_sh[0], v4_sh[1], tid));
    }
}

// ---------------------------------------------------------------- select

// Unsigned key whose order is the order of the f32 with bits `u`: -0 == +0, NaN lowest.
fn order_key(bits: u32) -> u32 {
    var u = bits;
    if (u == 0x80000000u) {
        u = 0u;
    }
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return 0u;
    }
    return select(u | 0x80000000u, ~u, (u & 0x80000000u) != 0u);
}

// Inclusive prefix sum of v over the workgroup (Hillis-Steele); the total goes to total_sh.
fn workgroup_scan(tid: u32, v: u32) -> u32 {
    scan_sh[tid] = v;
    workgroupBarrier();
    for (var off = 1u; off < WG; off <<= 1u) {
        var add = 0u;
        if (tid >= off) {
            add = scan_sh[tid - off];
        }
        workgroupBarrier();
        scan_sh[tid] += add;
        workgroupBarrier();
    }
    let incl = scan_sh[tid];
    if (tid == WG - 1u) {
        total_sh = incl;
    }
    workgroupBarrier();
    return incl;
}

// Max (is_max) or sum of x over the workgroup; every thread gets the result.
fn reduce_wg(tid: u32, x: f32, is_max: bool) -> f32 {
    red_sh[tid] = x;
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if (tid < off) {
            if (is_max) {
                red_sh[tid] = max(red_sh[tid], red_sh[tid + off]);
            } else {
                red_sh[tid] += red_sh[tid + off];
            }
        }
        workgroupBarrier();
    }
    let res = red_sh[0];
    workgroupBarrier();
    return res;
}

// Keys per thread and pass of the histogram loops (loaded before use, for memory-level parallelism).
const UNROLL: u32 = 4u;
// Consecutive candidates per thread in a compaction tile.
const RUN: u32 = 8u;

fn lse_of(h: u32, hh: u32) -> f32 {
    if (hh < 256u) {
        return lse_sh[hh];
    }
    return wsf(P.lse_off + h);
}

@compute @workgroup_size(256)
fn sparq_select(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = wg.x;
    let b = wg.y;
    if (tid == 0u) {
        len_sh = lens_buf[b];
    }
    let len = workgroupUniformLoad(&len_sh);
    if (len == 0u || len > P.capacity) {
        return;
    }
    let cap = P.capacity;
    let is_shared = P.gqa_shared != 0u;
    var h_first = row;
    var nheads = 1u;
    var idx_row = b * P.q_heads + row;
    var key_base = P.logits_off + (b * P.q_heads + row) * cap;
    if (is_shared) {
        h_first = row * P.groups;
        nheads = P.groups;
        idx_row = b * P.kv_heads + row;
        key_base = P.keys_off + (b * P.kv_heads + row) * cap;
    }
    let n = min(P.k, len);
    let w = min(P.window, n);
    let m = n - w;
    let cand = len - w;
    let need_keys = m > 0u && m < cand;
    let splits = (len + P.score_chunk - 1u) / P.score_chunk;

    // lse per head from the scores blocks' (max, sum of exp).
    for (var hh = 0u; hh < nheads; hh++) {
        let h = h_first + hh;
        let nb = P.norm_off + (b * P.q_heads + h) * P.score_splits * 2u;
        var mx = NEG_BIG;
        for (var s = tid; s < splits; s += WG) {
            mx = max(mx, wsf(nb + 2u * s));
        }
        let gm = reduce_wg(tid, mx, true);
        var z = 0.0;
        for (var s = tid; s < splits; s += WG) {
            z += wsf(nb + 2u * s + 1u) * exp(wsf(nb + 2u * s) - gm);
        }
        let lse = gm + log(reduce_wg(tid, z, false));
        if (tid == 0u) {
            ws[P.lse_off + b * P.q_heads + h] = bitcast<u32>(lse);
            if (hh < 256u) {
                lse_sh[hh] = lse;
            }
        }
    }
    storageBarrier();
    workgroupBarrier();

    let out = P.idx_off + idx_row * P.k_cap;
    if (!need_keys) {
        // Every candidate (m == cand: the whole sequence) or none (the window only).
        for (var t = tid; t < n; t += WG) {
            ws[out + t] = select(t, cand + t, m == 0u);
        }
        return;
    }
    if (is_shared) {
        // The group's sum of s_hat, in head order.
        let lg = P.logits_off + (b * P.q_heads + h_first) * cap;
        let head_step = cap;
        for (var j = tid; j < cand; j += WG) {
            var key = 0.0;
            for (var hh = 0u; hh < nheads; hh++) {
                key += exp(wsf(lg + hh * head_step + j) - lse_of(h_first + hh, hh));
            }
            ws[key_base + j] = bitcast<u32>(key);
        }
        storageBarrier();
    }

    // Radix select over the candidates' keys, 8 bits a pass from the top:
    // `prefix` ends as the m-th largest key, `remaining` the number of ties to keep.
    var prefix = 0u;
    var remaining = m;
    for (var step = 0u; step < 4u; step++) {
        let shift = (3u - step) * 8u;
        let hi_mask = select(0u, 0xffffffffu << (shift + 8u), shift + 8u < 32u);
        atomicStore(&hist[tid], 0u);
        workgroupBarrier();
        for (var i0 = tid; i0 < cand; i0 += UNROLL * WG) {
            var kk: array<u32, UNROLL>;
            for (var u = 0u; u < UNROLL; u++) {
                kk[u] = ws[key_base + min(i0 + u * WG, cand - 1u)];
            }
            for (var u = 0u; u < UNROLL; u++) {
                let key = order_key(kk[u]);
                if (i0 + u * WG < cand && (key & hi_mask) == prefix) {
                    atomicAdd(&hist[(key >> shift) & 255u], 1u);
                }
            }
        }
        workgroupBarrier();
        if (tid == 0u) {
            var cum = 0u;
            var d = 255u;
            loop {
                let c = atomicLoad(&hist[d]);
                if (cum + c >= remaining || d == 0u) {
                    break;
                }
                cum += c;
                d -= 1u;
            }
            digit_sh = d;
            remaining_sh = remaining - cum;
        }
        let d = workgroupUniformLoad(&digit_sh);
        remaining = workgroupUniformLoad(&remaining_sh);
        prefix |= d << shift;
    }

    // Ordered compaction: tiles of WG runs of RUN consecutive candidates; a
    // thread keeps the keys above `prefix` and, of the ties, the lowest-indexed
    // ones until `remaining` are kept.
    var eq_seen = 0u;
    var written = 0u;
    for (var tile = 0u; tile < cand; tile += RUN * WG) {
        let base = tile + tid * RUN;
        var kk: array<u32, RUN>;
        for (var u = 0u; u < RUN; u++) {
            kk[u] = ws[key_base + min(base + u, cand - 1u)];
        }
        var gt = 0u;
        var eq = 0u;
        for (var u = 0u; u < RUN; u++) {
            let key = order_key(kk[u]);
            let live = base + u < cand;
            gt += u32(live && key > prefix);
            eq += u32(live && key == prefix);
        }
        let eq_incl = workgroup_scan(tid, eq);
        let eq_total = workgroupUniformLoad(&total_sh);
        let eq_before = eq_seen + eq_incl - eq;
        let keep_eq = min(eq, remaining - min(remaining, eq_before));
        let mine = gt + keep_eq;
        let slot_incl = workgroup_scan(tid, mine);
        let chosen_total = workgroupUniformLoad(&total_sh);
        var slot = out + written + slot_incl - mine;
        var eq_left = keep_eq;
        for (var u = 0u; u < RUN; u++) {
            let key = order_key(kk[u]);
            let live = base + u < cand;
            let take_eq = live && key == prefix && eq_left > 0u;
            if ((live && key > prefix) || take_eq) {
                ws[slot] = base + u;
                slot += 1u;
            }
            if (take_eq) {
                eq_left -= 1u;
            }
        }
        eq_seen += eq_total;
        written += chosen_total;
        if (written >= m) {
            break;
        }
    }
    for (var t = tid; t < w; t += WG) {
        ws[out + m + t] = cand + t;
    }
}

// ---------------------------------------------------------------- gather

// The two 16-bit elements of a word (low half first).
fn unpack_pair(w: u32) -> vec2<f32> {
    if (DTYPE == 1u) {
        return unpack2x16float(w);
    }
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

@compute @workgroup_size(256)
fn sparq_gather(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let split = wg.x;
    let g = wg.y / P.head_chunks;
    let hc = wg.y % P.head_chunks;
    let b = wg.z;
    if (tid == 0u) {
        len_sh = lens_buf[b];
    }
    let len = workgroupUniformLoad(&len_sh);
    if (len == 0u || len > P.capacity) {
        return;
    }
    let n = min(P.k, len);
    let e0 = split * P.gather_chunk;
    if (e0 >= n) {
        return;
    }
    let cnt = min(P.gather_chunk, n - e0);
    let dim = P.head_dim;
    let cap = P.capacity;
    let h0 = g * P.groups + hc * P.hpb;
    let nh = min(P.hpb, P.groups - hc * P.hpb);
    let two = nh > 4u;
    var idx_row = b * P.q_heads + h0;
    if (P.gqa_shared != 0u) {
        idx_row = b * P.kv_heads + g;
    }
    let list = P.idx_off + idx_row * P.k_cap + e0;
    let kv_head = (b * P.kv_heads + g) * cap * dim;

    if (tid < dim) {
        var qa = vec4<f32>(0.0);
        var qb = vec4<f32>(0.0);
        for (var hh = 0u; hh < nh; hh++) {
            let x = load_q(b, h0 + hh, tid) * P.scale;
            if (hh < 4u) {
                qa[hh] = x;
            } else {
                qb[hh - 4u] = x;
            }
        }
        v4_sh[2u * tid] = qa;
        v4_sh[2u * tid + 1u] = qb;
    }
    if (tid < cnt) {
        // The list holds positions below len; the clamp only guards the reads.
        j_sh[tid] = min(ws[list + tid], len - 1u);
    }
    workgroupBarrier();
    // Exact scores, one entry per thread.
    var xa = vec4<f32>(NEG_BIG);
    var xb = vec4<f32>(NEG_BIG);
    if (tid < cnt) {
        xa = vec4<f32>(0.0);
        xb = vec4<f32>(0.0);
        let row = kv_head + j_sh[tid] * dim;
        if (DTYPE != 0u && (dim & 1u) == 0u) {
            // Even rows of 16-bit elements start on a word: two elements a load.
            let w0 = row >> 1u;
            for (var i = 0u; i < dim / 2u; i++) {
                let kv = unpack_pair(k_buf[w0 + i]);
                xa += v4_sh[4u * i] * kv.x + v4_sh[4u * i + 2u] * kv.y;
                if (two) {
                    xb += v4_sh[4u * i + 1u] * kv.x + v4_sh[4u * i + 3u] * kv.y;
                }
            }
        } else {
            for (var d = 0u; d < dim; d++) {
                let e = row + d;
                let kv = unpack_elem(k_buf[elem_word(e)], e);
                xa += v4_sh[2u * d] * kv;
                if (two) {
                    xb += v4_sh[2u * d + 1u] * kv;
                }
            }
        }
    }
    workgroupBarrier();
    v4_sh[2u * tid] = xa;
    v4_sh[2u * tid + 1u] = xb;
    workgroupBarrier();
    // Max per head: 64 partial maxima, then a tree.
    if (tid < 64u) {
        var pa = vec4<f32>(NEG_BIG);
        var pb = vec4<f32>(NEG_BIG);
        for (var e = tid; e < cnt; e += 64u) {
            pa = max(pa, v4_sh[2u * e]);
            pb = max(pb, v4_sh[2u * e + 1u]);
        }
        gred_sh[tid] = pa;
        gred_sh[64u + tid] = pb;
    }
    workgroupBarrier();
    for (var off = 32u; off > 0u; off >>= 1u) {
        if (tid < off) {
            gred_sh[tid] = max(gred_sh[tid], gred_sh[tid + off]);
            gred_sh[64u + tid] = max(gred_sh[64u + tid], gred_sh[64u + tid + off]);
        }
        workgroupBarrier();
    }
    let gma = gred_sh[0];
    let gmb = gred_sh[64];
    workgroupBarrier();
    if (tid < cnt) {
        v4_sh[2u * tid] = exp(xa - gma);
        v4_sh[2u * tid + 1u] = exp(xb - gmb);
    }
    workgroupBarrier();
    // Sum of the probabilities and the approximate softmax mass (alpha) per head.
    if (tid < 64u) {
        var la = vec4<f32>(0.0);
        var lb = vec4<f32>(0.0);
        var aa = vec4<f32>(0.0);
        var ab = vec4<f32>(0.0);
        for (var e = tid; e < cnt; e += 64u) {
            la += v4_sh[2u * e];
            lb += v4_sh[2u * e + 1u];
            let j = j_sh[e];
            for (var hh = 0u; hh < nh; hh++) {
                let h = b * P.q_heads + h0 + hh;
                let x = exp(wsf(P.logits_off + h * cap + j) - wsf(P.lse_off + h));
                if (hh < 4u) {
                    aa[hh] += x;
                } else {
                    ab[hh - 4u] += x;
                }
            }
        }
        gred_sh[tid] = la;
        gred_sh[64u + tid] = lb;
        gred_sh[128u + tid] = aa;
        gred_sh[192u + tid] = ab;
    }
    workgroupBarrier();
    for (var off = 32u; off > 0u; off >>= 1u) {
        if (tid < off) {
            for (var a = 0u; a < 256u; a += 64u) {
                gred_sh[a + tid] += gred_sh[a + tid + off];
            }
        }
        workgroupBarrier();
    }
    // p V: `lanes` row lanes of `dim` threads, lane rl takes entries rl, rl + lanes, ...
    let lanes = WG / dim;
    let rl = tid / dim;
    let d = tid % dim;
    var oa = vec4<f32>(0.0);
    var ob = vec4<f32>(0.0);
    if (rl < lanes) {
        for (var e = rl; e < cnt; e += lanes) {
            let ev = kv_head + j_sh[e] * dim + d;
            let vv = unpack_elem(v_buf[elem_word(ev)], ev);
            oa += v4_sh[2u * e] * vv;
            if (two) {
                ob += v4_sh[2u * e + 1u] * vv;
            }
        }
    }
    workgroupBarrier();
    v4_sh[2u * tid] = oa;
    v4_sh[2u * tid + 1u] = ob;
    workgroupBarrier();
    let la = gred_sh[0];
    let lb = gred_sh[64];
    let stride = dim + 2u;
    let part0 = P.part_off + ((b * P.q_heads + h0) * P.gather_splits + split) * stride;
    let head_stride = P.gather_splits * stride;
    if (tid < dim) {
        var sa = vec4<f32>(0.0);
        var sb = vec4<f32>(0.0);
        for (var l = 0u; l < lanes; l++) {
            sa += v4_sh[2u * (l * dim + tid)];
            sb += v4_sh[2u * (l * dim + tid) + 1u];
        }
        sa /= la;
        sb /= lb;
        for (var hh = 0u; hh < nh; hh++) {
            ws[part0 + hh * head_stride + tid] = bitcast<u32>(pick(sa, sb, hh));
        }
    }
    if (tid < nh) {
        let o = part0 + tid * head_stride + dim;
        ws[o] = bitcast<u32>(pick(gma, gmb, tid) + log(pick(la, lb, tid)));
        ws[o + 1u] = bitcast<u32>(pick(gred_sh[128], gred_sh[192], tid));
    }
}

// ---------------------------------------------------------------- merge

// Writes element i of the output; 16-bit halves of a word may belong to
// other workgroups, so each half is replaced atomically.
fn store_bits(i: u32, bits: u32) {
    if (DTYPE == 0u) {
        atomicStore(&o_buf[i], bits);
        return;
    }
    let r = half_write(i, bits);
    atomicAnd(&o_buf[i >> 1u], r.x);
    atomicOr(&o_buf[i >> 1u], r.y);
}

// Max (is_max) or sum over the 64 threads of sparq_merge, in red_sh[base ..].
fn reduce64(tid: u32, base: u32, x: f32, is_max: bool) -> f32 {
    red_sh[base + tid] = x;
    workgroupBarrier();
    for (var off = MWG / 2u; off > 0u; off >>= 1u) {
        if (tid < off) {
            if (is_max) {
                red_sh[base + tid] = max(red_sh[base + tid], red_sh[base + tid + off]);
            } else {
                red_sh[base + tid] += red_sh[base + tid + off];
            }
        }
        workgroupBarrier();
    }
    return red_sh[base];
}

@compute @workgroup_size(64)
fn sparq_merge(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let h = wg.x;
    let b = wg.y;
    if (tid == 0u) {
        len_sh = lens_buf[b];
    }
    let len = workgroupUniformLoad(&len_sh);
    let dim = P.head_dim;
    let out = P.o_off + b * P.o_sb + h * P.o_sh;
    if (len == 0u || len > P.capacity) {
        let bits = select(nan_bits(), pack_elem(0.0), len == 0u);
        for (var d = tid; d < dim; d += MWG) {
            store_bits(out + d, bits);
        }
        return;
    }
    let n = min(P.k, len);
    let ns = (n + P.gather_chunk - 1u) / P.gather_chunk;
    let stride = dim + 2u;
    let rows = P.part_off + (b * P.q_heads + h) * P.gather_splits * stride;
    var mx = NEG_BIG;
    for (var s = tid; s < ns; s += MWG) {
        mx = max(mx, wsf(rows + s * stride + dim));
    }
    let gm = reduce64(tid, 0u, mx, true);
    var z = 0.0;
    var al = 0.0;
    for (var s = tid; s < ns; s += MWG) {
        z += exp(wsf(rows + s * stride + dim) - gm);
        al += wsf(rows + s * stride + dim + 1u);
    }
    let total = reduce64(tid, 64u, z, false);
    let alpha = reduce64(tid, 128u, al, false);
    let g = h / P.groups;
    let mean_row = (b * P.kv_heads + g) * dim;
    for (var d = tid; d < dim; d += MWG) {
        var y = 0.0;
        for (var s = 0u; s < ns; s++) {
            y += exp(wsf(rows + s * stride + dim) - gm) * wsf(rows + s * stride + d);
        }
        y /= total;
        if (P.realloc != 0u) {
            y = alpha * y + (1.0 - alpha) * mean_buf[mean_row + d];
        }
        store_bits(out + d, pack_elem(y));
    }
}

// ---------------------------------------------------------------- fill

fn src_bits(e: u32) -> u32 {
    return elem_bits(src_buf[elem_word(e)], e);
}

// Writes word w of dst_buf (f32: lo only). A 16-bit word whose halves are both
// ours is stored whole; otherwise our half is replaced atomically, as the other
// may belong to another invocation.
fn put_dst(w: u32, lo_ok: bool, lo: u32, hi_ok: bool, hi: u32) {
    if (DTYPE == 0u || (lo_ok && hi_ok)) {
        atomicStore(&dst_buf[w], lo | (hi << 16u));
    } else if (lo_ok) {
        atomicAnd(&dst_buf[w], 0xffff0000u);
        atomicOr(&dst_buf[w], lo);
    } else if (hi_ok) {
        atomicAnd(&dst_buf[w], 0x0000ffffu);
        atomicOr(&dst_buf[w], hi << 16u);
    }
}

// Row-major K or V of (kv head wg.y, sequence wg.z) from the source layout:
// element (j, d) at src_off + b src_sb + g src_sh + j src_ss + d, j < len.
@compute @workgroup_size(256)
fn sparq_fill_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) tid: u32) {
    let g = wg.y;
    let b = wg.z;
    let len = lens_buf[b];
    if (len == 0u || len > P.capacity) {
        return;
    }
    let dim = P.head_dim;
    let blk = (b * P.kv_heads + g) * P.capacity * dim;
    let e_end = blk + len * dim;
    let src = P.src_off + b * P.src_sb + g * P.src_sh;
    let step = nwg.x * WG;
    if (DTYPE == 0u) {
        for (var e = blk + wg.x * WG + tid; e < e_end; e += step) {
            let rel = e - blk;
            atomicStore(&dst_buf[e], src_buf[src + (rel / dim) * P.src_ss + rel % dim]);
        }
        return;
    }
    let w_end = ((e_end - 1u) >> 1u) + 1u;
    for (var w = (blk >> 1u) + wg.x * WG + tid; w < w_end; w += step) {
        let lo = 2u * w;
        let lo_ok = lo >= blk;
        let hi_ok = lo + 1u < e_end;
        var lb = 0u;
        var hb = 0u;
        if (lo_ok) {
            let rel = lo - blk;
            lb = src_bits(src + (rel / dim) * P.src_ss + rel % dim);
        }
        if (hi_ok) {
            let rel = lo + 1u - blk;
            hb = src_bits(src + (rel / dim) * P.src_ss + rel % dim);
        }
        put_dst(w, lo_ok, lb, hi_ok, hb);
    }
}

// K transposed of (kv head wg.y, sequence wg.z): row i holds K[j, i] for j < len.
@compute @workgroup_size(256)
fn sparq_fill_t(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) tid: u32) {
    let g = wg.y;
    let b = wg.z;
    let len = lens_buf[b];
    if (len == 0u || len > P.capacity) {
        return;
    }
    let dim = P.head_dim;
    let cap = P.capacity;
    let blk = (b * P.kv_heads + g) * dim * cap;
    let src = P.src_off + b * P.src_sb + g * P.src_sh;
    let step = nwg.x * WG;
    // Words per row, at most: a row of len elements spans up to (len + 3) / 2 words.
    let wpr = select(len, (len + 3u) >> 1u, DTYPE != 0u);
    let total = dim * wpr;
    for (var t = wg.x * WG + tid; t < total; t += step) {
        let i = t / wpr;
        let wi = t % wpr;
        let rs = blk + i * cap;
        let re = rs + len;
        if (DTYPE == 0u) {
            atomicStore(&dst_buf[rs + wi], src_buf[src + wi * P.src_ss + i]);
            continue;
        }
        let w = (rs >> 1u) + wi;
        if (w > ((re - 1u) >> 1u)) {
            continue;
        }
        let lo = 2u * w;
        let lo_ok = lo >= rs;
        let hi_ok = lo + 1u < re;
        var lb = 0u;
        var hb = 0u;
        if (lo_ok) {
            lb = src_bits(src + (lo - rs) * P.src_ss + i);
        }
        if (hi_ok) {
            hb = src_bits(src + (lo + 1u - rs) * P.src_ss + i);
        }
        put_dst(w, lo_ok, lb, hi_ok, hb);
    }
}

// Mean of V over the len rows of (kv head wg.y, sequence wg.z), dims
// wg.x * 64 .. + 64: 4 row lanes of 64 dims, each lane summing every 4th row.
@compute @workgroup_size(256)
fn sparq_fill_mean(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let g = wg.y;
    let b = wg.z;
    let c = tid % FILL_DIMS;
    let rl = tid / FILL_DIMS;
    let d = wg.x * FILL_DIMS + c;
    let dim = P.head_dim;
    let len = lens_buf[b];
    let ok = len > 0u && len <= P.capacity;
    var s = 0.0;
    if (ok && d < dim) {
        let src = P.src_off + b * P.src_sb + g * P.src_sh + d;
        for (var j = rl; j < len; j += WG / FILL_DIMS) {
            let e = src + j * P.src_ss;
            s += unpack_elem(src_buf[elem_word(e)], e);
        }
    }
    red_sh[tid] = s;
    workgroupBarrier();
    if (rl == 0u && d < dim) {
        let sum = (red_sh[c] + red_sh[c + 64u]) + (red_sh[c + 128u] + red_sh[c + 192u]);
        mean_rw[(b * P.kv_heads + g) * dim + d] = select(0.0, sum / f32(len), ok);
    }
}

// ---------------------------------------------------------------- append

fn put_half(i: u32, bits: u32, which: u32) {
    if (DTYPE == 0u) {
        switch which {
            case 0u: { atomicStore(&k_rw[i], bits); }
            case 1u: { atomicStore(&kt_rw[i], bits); }
            default: { atomicStore(&v_rw[i], bits); }
        }
        return;
    }
    let r = half_write(i, bits);
    let w = i >> 1u;
    switch which {
        case 0u: {
            atomicAnd(&k_rw[w], r.x);
            atomicOr(&k_rw[w], r.y);
        }
        case 1u: {
            atomicAnd(&kt_rw[w], r.x);
            atomicOr(&kt_rw[w], r.y);
        }
        default: {
            atomicAnd(&v_rw[w], r.x);
            atomicOr(&v_rw[w], r.y);
        }
    }
}

// One token per sequence (workgroup wg.x = sequence b): k_new / v_new
// [batch, kv_heads, head_dim] at src_off / src2_off go to position len[b] of
// every kv head; the running mean moves by (v - mean) / (len + 1); then len[b] += 1.
@compute @workgroup_size(256)
fn sparq_append(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let b = wg.x;
    if (tid == 0u) {
        len_sh = lens_rw[b];
    }
    let len = workgroupUniformLoad(&len_sh);
    if (len >= P.capacity) {
        return;
    }
    let dim = P.head_dim;
    let cap = P.capacity;
    let n = P.kv_heads * dim;
    let cnt = f32(len + 1u);
    for (var t = tid; t < n; t += WG) {
        let g = t / dim;
        let d = t % dim;
        let bg = b * P.kv_heads + g;
        let ks = P.src_off + b * n + t;
        let vs = P.src2_off + b * n + t;
        let kb = elem_bits(src_buf[elem_word(ks)], ks);
        let vw = src2_buf[elem_word(vs)];
        put_half((bg * cap + len) * dim + d, kb, 0u);
        put_half((bg * dim + d) * cap + len, kb, 1u);
        put_half((bg * cap + len) * dim + d, elem_bits(vw, vs), 2u);
        let mi = bg * dim + d;
        let m = mean_rw[mi];
        mean_rw[mi] = m + (unpack_elem(vw, vs) - m) / cnt;
    }
    if (tid == 0u) {
        lens_rw[b] = len + 1u;
    }
}
