// Dense decode attention (DESIGN.md 4.1), split-KV with a log-sum-exp merge.
// decode_partial*: one workgroup per (wg_splits splits, kv head x head chunk,
// sequence); each K/V row is read once for all query heads of the chunk.
// decode_merge: one workgroup per (query head, sequence).
// The keys of sequence b are the positions key_interval (common.wgsl) gives
// for its length lens[b] and query position pos[b] under (mask, window, ring);
// position p sits at cache row p (p % capacity in a ring slot). Dense decode
// is mask 2 (full), no window, no ring: [0, len). Cross-layer decode
// (src/crosslayer) sets them from its slot. Split s covers positions
// lo + [s chunk_len, (s + 1) chunk_len); an empty interval outputs 0, a
// refused one NaN.
//
// decode_partial layout. Query heads sit in the components of vec4s ("quads":
// heads 0-3, and 4-7 in the variants for more than 4 heads; NQ quads). The 64
// threads form R row lanes x C column lanes: column lane c owns EPT = 16 / NQ
// consecutive elements of every K/V row, from f = c EPT, with C the smallest
// power of two >= 4 such that C EPT >= head_dim, so adjacent threads read
// adjacent 16-byte words (coalesced). A thread keeps its q and its output
// accumulator in registers as four mat4x4 (columns: 4 elements, rows: the 4
// heads of a quad), so no index into them is dynamic:
//   NQ = 1: matrix m holds elements f + 4m .. f + 4m + 3 of quad 0;
//   NQ = 2: matrix m holds elements f + 4 (m % 2) .. of quad m / 2.
// Per tile of TK = 4 R keys (row lane r takes keys s R + r, s < 4): each thread
// forms partial dot products over its elements, the partials are summed over
// the C column lanes through workgroup memory, then each thread runs an online
// softmax over its row lane's 4 keys and accumulates p V for its elements. Row
// lanes keep separate (max, sum, acc) states, merged at the end.
//
// Software adapters (llvmpipe) run 8 lanes in SIMD with every memory access
// scalarised, and execute masked-off if bodies: the kernel keeps memory
// accesses wide (16-byte words, vec4 partials) and few, and guards blocks
// that whole rows skip with loops of 0 or 1 trips, which such drivers skip.

struct Params {
    q_off: u32, k_off: u32, v_off: u32, o_off: u32,
    q_sb: u32, q_sh: u32, k_sb: u32, k_sh: u32,
    k_ss: u32, v_sb: u32, v_sh: u32, v_ss: u32,
    o_sb: u32, o_sh: u32, batch: u32, q_heads: u32,
    kv_heads: u32, head_dim: u32, capacity: u32, chunk_len: u32,
    num_splits: u32, head_chunks: u32, lens_off: u32, lse_off: u32,
    scale: f32, wg_splits: u32, pos_off: u32, mask: u32,
    window: u32, ring: u32, pad1: u32, pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> q_buf: array<u32>;
@group(0) @binding(2) var<storage, read> k_buf: array<u32>;
@group(0) @binding(3) var<storage, read> v_buf: array<u32>;
@group(0) @binding(4) var<storage, read> lens_buf: array<u32>;
@group(0) @binding(5) var<storage, read_write> ws: array<f32>;
@group(0) @binding(6) var<storage, read_write> o_buf: array<atomic<u32>>;
// The K and V buffers again, as 16-byte words; the u32 views above reach the
// last bytes of a buffer whose size is not a multiple of 16.
@group(0) @binding(7) var<storage, read> k4_buf: array<vec4<u32>>;
@group(0) @binding(8) var<storage, read> v4_buf: array<vec4<u32>>;
// Query positions (dense decode binds its lengths here; mask 2 ignores them).
@group(0) @binding(9) var<storage, read> pos_buf: array<u32>;

const WG: u32 = 64u;
const HPB: u32 = 8u;           // query heads per workgroup (HEADS_PER_BLOCK)
const STEPS: u32 = 4u;         // keys per row lane per tile

// A tile's partial dot products [key][quad][column lane]; before the tiles,
// the staged q; after them, the accumulators the row lanes exchange.
var<workgroup> part_sh: array<vec4<f32>, 512>;
var<workgroup> sc_sh: array<vec4<f32>, 128>;   // scores [key][quad] of a tile
var<workgroup> ml_sh: array<vec4<f32>, 64>;    // per row lane: max, sum (x quad)
var<workgroup> span_sh: vec3<u32>;
var<workgroup> red: array<vec2<f32>, 64>;
var<workgroup> wt_sh: array<f32, 64>;

// Sequence b's key interval (lo, hi, refused), the same for every invocation.
fn load_span(b: u32, tid: u32) -> vec3<u32> {
    if (tid == 0u) {
        span_sh = key_interval(lens_buf[P.lens_off + b], pos_buf[P.pos_off + b], P.mask, P.window, P.ring, P.capacity);
    }
    return workgroupUniformLoad(&span_sh);
}

// The cache row of key position p.
fn key_row(p: u32) -> u32 {
    if (P.ring == 1u) {
        return p % P.capacity;
    }
    return p;
}

fn load_q(i: u32) -> f32 { return unpack_elem(q_buf[elem_word(i)], i); }

// Up to 16 consecutive 32-bit words of a row.
struct Words {
    a: vec4<u32>,
    b: vec4<u32>,
    c: vec4<u32>,
    d: vec4<u32>,
}

// 16-byte words a thread reads per row: EPT elements.
fn row_vecs(nq: u32) -> u32 {
    if (DTYPE == 0u) {
        return 4u / nq;
    }
    return 2u / nq;
}

// Words sh .. sh + 3 of the concatenation (lo, hi), shifted down by half a
// word when odd (16-bit rows at odd element offsets).
fn realign(lo: vec4<u32>, hi: vec4<u32>, sh: u32, odd: bool) -> vec4<u32> {
    var m = lo;
    var x = hi.x;
    if (sh == 1u) {
        m = vec4<u32>(lo.yzw, hi.x);
        x = hi.y;
    } else if (sh == 2u) {
        m = vec4<u32>(lo.zw, hi.xy);
        x = hi.z;
    } else if (sh == 3u) {
        m = vec4<u32>(lo.w, hi.xyz);
        x = hi.w;
    }
    if (odd) {
        m = (m >> vec4<u32>(16u)) | (vec4<u32>(m.yzw, x) << vec4<u32>(16u));
    }
    return m;
}

// The 16-byte word at index i of a buffer holding n4 whole ones followed by
// `tail` (its last, partial 16 bytes, zero-padded), given the 16-byte view's
// load x: that view cannot reach the tail, so it is loaded once, word by word.
fn fix16(x: vec4<u32>, i: u32, n4: u32, tail: vec4<u32>) -> vec4<u32> {
    return select(x, select(vec4<u32>(0u), tail, i == n4), i >= n4);
}

// The thread's words, from the 16-byte words l it overlaps and x (the one
// after them), when its first word sits sh words into l.a.
fn realign_all(l: Words, x: vec4<u32>, nv: u32, sh: u32, odd: bool) -> Words {
    var w: Words;
    if (nv == 1u) {
        w.a = realign(l.a, x, sh, odd);
    } else if (nv == 2u) {
        w.a = realign(l.a, l.b, sh, odd);
        w.b = realign(l.b, x, sh, odd);
    } else {
        w.a = realign(l.a, l.b, sh, odd);
        w.b = realign(l.b, l.c, sh, odd);
        w.c = realign(l.c, l.d, sh, odd);
        w.d = realign(l.d, x, sh, odd);
    }
    return w;
}

// The EPT elements from f of the K row that starts at element e0, as words.
// al: rows are 16-byte aligned inside the 16-byte view (the launcher checks).
fn k_words(e0: u32, f: u32, nq: u32, al: bool, n4: u32, tail: vec4<u32>) -> Words {
    let nv = row_vecs(nq);
    var l: Words;
    if (al) {
        let i = (e0 + f) / select(8u, 4u, DTYPE == 0u);
        l.a = k4_buf[i];
        if (nv > 1u) {
            l.b = k4_buf[i + 1u];
        }
        if (nv > 2u) {
            l.c = k4_buf[i + 2u];
            l.d = k4_buf[i + 3u];
        }
        return l;
    }
    var w = e0 + f;
    var odd = false;
    if (DTYPE != 0u) {
        w = (e0 + f) >> 1u;
        odd = (e0 & 1u) != 0u;
    }
    let i = w >> 2u;
    let sh = w & 3u;
    l.a = fix16(k4_buf[i], i, n4, tail);
    if (nv > 1u) {
        l.b = fix16(k4_buf[i + 1u], i + 1u, n4, tail);
    }
    if (nv > 2u) {
        l.c = fix16(k4_buf[i + 2u], i + 2u, n4, tail);
        l.d = fix16(k4_buf[i + 3u], i + 3u, n4, tail);
    }
    var x = vec4<u32>(0u);
    if (sh != 0u || odd) {
        x = fix16(k4_buf[i + nv], i + nv, n4, tail);
    }
    return realign_all(l, x, nv, sh, odd);
}

fn v_words(e0: u32, f: u32, nq: u32, al: bool, n4: u32, tail: vec4<u32>) -> Words {
    let nv = row_vecs(nq);
    var l: Words;
    if (al) {
        let i = (e0 + f) / select(8u, 4u, DTYPE == 0u);
        l.a = v4_buf[i];
        if (nv > 1u) {
            l.b = v4_buf[i + 1u];
        }
        if (nv > 2u) {
            l.c = v4_buf[i + 2u];
            l.d = v4_buf[i + 3u];
        }
        return l;
    }
    var w = e0 + f;
    var odd = false;
    if (DTYPE != 0u) {
        w = (e0 + f) >> 1u;
        odd = (e0 & 1u) != 0u;
    }
    let i = w >> 2u;
    let sh = w & 3u;
    l.a = fix16(v4_buf[i], i, n4, tail);
    if (nv > 1u) {
        l.b = fix16(v4_buf[i + 1u], i + 1u, n4, tail);
    }
    if (nv > 2u) {
        l.c = fix16(v4_buf[i + 2u], i + 2u, n4, tail);
        l.d = fix16(v4_buf[i + 3u], i + 3u, n4, tail);
    }
    var x = vec4<u32>(0u);
    if (sh != 0u || odd) {
        x = fix16(v4_buf[i + nv], i + nv, n4, tail);
    }
    return realign_all(l, x, nv, sh, odd);
}

// The partial 16 bytes after the n4 whole ones of the K (which = 0) or V buffer.
fn tail16(n4: u32, which: u32) -> vec4<u32> {
    var t = vec4<u32>(0u);
    for (var i = 0u; i < 3u; i++) {
        let w = 4u * n4 + i;
        if (which == 0u) {
            if (w < arrayLength(&k_buf)) {
                t[i] = k_buf[w];
            }
        } else if (w < arrayLength(&v_buf)) {
            t[i] = v_buf[w];
        }
    }
    return t;
}

// A thread's elements as 4 columns of 4 (columns past its share unused).
fn elems(w: Words) -> mat4x4<f32> {
    if (DTYPE == 0u) {
        return mat4x4<f32>(bitcast<vec4<f32>>(w.a), bitcast<vec4<f32>>(w.b), bitcast<vec4<f32>>(w.c),
                           bitcast<vec4<f32>>(w.d));
    }
    if (DTYPE == 1u) {
        return mat4x4<f32>(vec4<f32>(unpack2x16float(w.a.x), unpack2x16float(w.a.y)),
                           vec4<f32>(unpack2x16float(w.a.z), unpack2x16float(w.a.w)),
                           vec4<f32>(unpack2x16float(w.b.x), unpack2x16float(w.b.y)),
                           vec4<f32>(unpack2x16float(w.b.z), unpack2x16float(w.b.w)));
    }
    let lo = vec4<u32>(16u);
    let hi = vec4<u32>(0xffff0000u);
    let a0 = bitcast<vec4<f32>>(w.a << lo);
    let a1 = bitcast<vec4<f32>>(w.a & hi);
    let b0 = bitcast<vec4<f32>>(w.b << lo);
    let b1 = bitcast<vec4<f32>>(w.b & hi);
    return mat4x4<f32>(vec4<f32>(a0.x, a1.x, a0.y, a1.y), vec4<f32>(a0.z, a1.z, a0.w, a1.w),
                       vec4<f32>(b0.x, b1.x, b0.y, b1.y), vec4<f32>(b0.z, b1.z, b0.w, b1.w));
}

// Zeroes the elements at or past `lim` (elements left in the row from the
// thread's first one): they belong to other rows or lie outside the buffer.
fn mask_elems(e: mat4x4<f32>, lim: u32) -> mat4x4<f32> {
    let l = vec4<u32>(lim);
    let i = vec4<u32>(0u, 1u, 2u, 3u);
    return mat4x4<f32>(select(vec4<f32>(0.0), e[0], i < l), select(vec4<f32>(0.0), e[1], i + 4u < l),
                       select(vec4<f32>(0.0), e[2], i + 8u < l), select(vec4<f32>(0.0), e[3], i + 12u < l));
}

// q of heads 4 hq .. 4 hq + 3 at dim d, scaled; zero for absent heads.
fn q_quad(q_row: u32, hq: u32, d: u32, nh: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        let h = hq * 4u + i;
        if (h < nh) {
            v[i] = load_q(q_row + h * P.q_sh + d) * P.scale;
        }
    }
    return v;
}

// q matrix m of a thread (see the layout above), from the staged [dim][quad] vec4s.
fn q_mat(f: u32, m: u32, nq: u32) -> mat4x4<f32> {
    let d = f + 4u * select(m & 1u, m, nq == 1u);
    let hq = select(m >> 1u, 0u, nq == 1u);
    let last = P.head_dim - 1u;
    var q: mat4x4<f32>;
    for (var j = 0u; j < 4u; j++) {
        q[j] = select(vec4<f32>(0.0), part_sh[2u * min(d + j, last) + hq], d + j < P.head_dim);
    }
    return q;
}

// p (per head) times the 4 elements v: column j is p v[j].
fn outer4(p: vec4<f32>, v: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(p * v.x, p * v.y, p * v.z, p * v.w);
}

// a with row (head) i scaled by s[i].
fn scale4(a: mat4x4<f32>, s: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(a[0] * s, a[1] * s, a[2] * s, a[3] * s);
}

// Score x as a probability against max m; keys masked to NEG_BIG give 0.
fn prob(x: vec4<f32>, m: vec4<f32>) -> vec4<f32> {
    return select(vec4<f32>(0.0), exp(x - m), x > vec4<f32>(NEG_BIG));
}

struct Acc {
    a0: mat4x4<f32>,
    a1: mat4x4<f32>,
    a2: mat4x4<f32>,
    a3: mat4x4<f32>,
}

// acc plus p V for one key (elements v; quads as in the layout above).
fn pv_key(acc: Acc, v: mat4x4<f32>, pa: vec4<f32>, pb: vec4<f32>, nq: u32) -> Acc {
    if (nq == 1u) {
        return Acc(acc.a0 + outer4(pa, v[0]), acc.a1 + outer4(pa, v[1]), acc.a2 + outer4(pa, v[2]),
                   acc.a3 + outer4(pa, v[3]));
    }
    return Acc(acc.a0 + outer4(pa, v[0]), acc.a1 + outer4(pa, v[1]), acc.a2 + outer4(pb, v[0]),
               acc.a3 + outer4(pb, v[1]));
}

// The columns of a at o, o + n, o + 2n, o + 3n of part_sh, and back.
fn put_mat(o: u32, n: u32, a: mat4x4<f32>) {
    part_sh[o] = a[0];
    part_sh[o + n] = a[1];
    part_sh[o + 2u * n] = a[2];
    part_sh[o + 3u * n] = a[3];
}

fn get_mat(o: u32, n: u32) -> mat4x4<f32> {
    return mat4x4<f32>(part_sh[o], part_sh[o + n], part_sh[o + 2u * n], part_sh[o + 3u * n]);
}

// Writes accumulator matrix m of a thread, normalised by inv per head.
fn write_mat(m: u32, a: mat4x4<f32>, f: u32, row0: u32, inv: vec4<f32>, nh: u32, nq: u32) {
    let d = f + 4u * select(m & 1u, m, nq == 1u);
    let h = 4u * select(m >> 1u, 0u, nq == 1u);
    for (var i = 0u; i < 4u; i++) {
        if (h + i < nh) {
            let row = (row0 + (h + i) * P.num_splits) * P.head_dim;
            for (var j = 0u; j < 4u; j++) {
                if (d + j < P.head_dim) {
                    ws[row + d + j] = a[j][i] * inv[i];
                }
            }
        }
    }
}

// nq: head quads per workgroup (1: up to 4 heads, 2: up to 8). al: every K
// and V row starts 16-byte aligned and the 16-byte views cover the caches.
fn partial(wg: vec3<u32>, tid: u32, nq: u32, al: bool) {
    // A workgroup covers wg_splits consecutive splits (more than one only on
    // CPU adapters, where a few threads run the workgroups and each one's
    // fixed cost counts): it writes their combined result as the first one
    // and a log-sum-exp of NEG_BIG (weight 0 in the merge) for the others.
    let split = wg.x * P.wg_splits;
    let g = wg.y / P.head_chunks;
    let hc = wg.y % P.head_chunks;
    let b = wg.z;
    let span = load_span(b, tid);
    let n_keys = span.y - span.x;
    // The merge never reads splits past the interval, nor anything of a
    // refused sequence.
    if (span.z != 0u || split * P.chunk_len >= n_keys) {
        return;
    }
    let start = span.x + split * P.chunk_len;
    let d_len = P.head_dim;
    let groups = P.q_heads / P.kv_heads;
    let h0 = g * groups + hc * HPB;
    let nh = min(HPB, groups - hc * HPB);
    let end = start + min(P.wg_splits * P.chunk_len, span.y - start);

    let ept = 16u / nq;
    var lc = 2u;
    while ((ept << lc) < d_len) {
        lc += 1u;
    }
    let cols = 1u << lc;
    let rows = WG >> lc;
    let r = tid >> lc;
    let c = tid & (cols - 1u);
    let tk = rows * STEPS;
    let f = c * ept;
    let live = f < d_len;
    let lim = select(0u, d_len - f, live);

    // q, scaled, staged in workgroup memory as [dim][quad] vec4s of heads.
    let q_row = P.q_off + b * P.q_sb + h0 * P.q_sh;
    for (var i = tid; i < d_len * nq; i += WG) {
        let d = i % d_len;
        let hq = i / d_len;
        part_sh[2u * d + hq] = q_quad(q_row, hq, d, nh);
    }
    workgroupBarrier();
    let q0 = q_mat(f, 0u, nq);
    let q1 = q_mat(f, 1u, nq);
    let q2 = q_mat(f, 2u, nq);
    let q3 = q_mat(f, 3u, nq);
    workgroupBarrier();

    let k_head = P.k_off + b * P.k_sb + g * P.k_sh;
    let v_head = P.v_off + b * P.v_sb + g * P.v_sh;
    let kn4 = arrayLength(&k4_buf);
    let vn4 = arrayLength(&v4_buf);
    var k_tail = vec4<u32>(0u);
    var v_tail = vec4<u32>(0u);
    if (!al) {
        k_tail = tail16(kn4, 0u);
        v_tail = tail16(vn4, 1u);
    }
    var ma = vec4<f32>(NEG_BIG);
    var mb = vec4<f32>(NEG_BIG);
    var la = vec4<f32>(0.0);
    var lb = vec4<f32>(0.0);
    var a0 = mat4x4<f32>();
    var a1 = mat4x4<f32>();
    var a2 = mat4x4<f32>();
    var a3 = mat4x4<f32>();
    for (var t0 = start; t0 < end; t0 += tk) {
        // Partial dot products over this thread's elements, key s R + r of the tile.
        for (var s = 0u; s < STEPS; s++) {
            let kk = s * rows + r;
            var pa = vec4<f32>(0.0);
            var pb = vec4<f32>(0.0);
            if (live) {
                let e0 = k_head + key_row(min(t0 + kk, end - 1u)) * P.k_ss;
                let k = mask_elems(elems(k_words(e0, f, nq, al, kn4, k_tail)), lim);
                if (nq == 1u) {
                    pa = (q0 * k[0] + q1 * k[1]) + (q2 * k[2] + q3 * k[3]);
                } else {
                    pa = q0 * k[0] + q1 * k[1];
                    pb = q2 * k[0] + q3 * k[1];
                }
            }
            let o = kk * nq * cols + c;
            part_sh[o] = pa;
            if (nq > 1u) {
                part_sh[o + cols] = pb;
            }
        }
        workgroupBarrier();
        // Sum over the column lanes: one (key, quad) per thread.
        for (var it = tid; it < tk * nq; it += WG) {
            var sum = vec4<f32>(0.0);
            let base = it * cols;
            for (var i = 0u; i < cols; i++) {
                sum += part_sh[base + ((i + it) & (cols - 1u))];
            }
            sc_sh[it] = select(vec4<f32>(NEG_BIG), sum, t0 + it / nq < end);
        }
        workgroupBarrier();
        // Online softmax over this row lane's 4 keys, then p V.
        let i0 = r * nq;
        let st = rows * nq;
        let sa0 = sc_sh[i0];
        let sa1 = sc_sh[i0 + st];
        let sa2 = sc_sh[i0 + 2u * st];
        let sa3 = sc_sh[i0 + 3u * st];
        let na = max(ma, max(max(sa0, sa1), max(sa2, sa3)));
        let fa = exp(ma - na);
        ma = na;
        let pa0 = prob(sa0, na);
        let pa1 = prob(sa1, na);
        let pa2 = prob(sa2, na);
        let pa3 = prob(sa3, na);
        la = la * fa + ((pa0 + pa1) + (pa2 + pa3));
        var fb = fa;
        var pb0 = vec4<f32>(0.0);
        var pb1 = vec4<f32>(0.0);
        var pb2 = vec4<f32>(0.0);
        var pb3 = vec4<f32>(0.0);
        if (nq > 1u) {
            let sb0 = sc_sh[i0 + 1u];
            let sb1 = sc_sh[i0 + 1u + st];
            let sb2 = sc_sh[i0 + 1u + 2u * st];
            let sb3 = sc_sh[i0 + 1u + 3u * st];
            let nb = max(mb, max(max(sb0, sb1), max(sb2, sb3)));
            fb = exp(mb - nb);
            mb = nb;
            pb0 = prob(sb0, nb);
            pb1 = prob(sb1, nb);
            pb2 = prob(sb2, nb);
            pb3 = prob(sb3, nb);
            lb = lb * fb + ((pb0 + pb1) + (pb2 + pb3));
        }
        a0 = scale4(a0, fa);
        a1 = scale4(a1, fa);
        a2 = scale4(a2, fb);
        a3 = scale4(a3, fb);
        if (live) {
            var acc = Acc(a0, a1, a2, a3);
            acc = pv_key(acc, elems(v_words(v_head + key_row(min(t0 + r, end - 1u)) * P.v_ss, f, nq, al, vn4, v_tail)), pa0, pb0, nq);
            acc = pv_key(acc, elems(v_words(v_head + key_row(min(t0 + rows + r, end - 1u)) * P.v_ss, f, nq, al, vn4, v_tail)), pa1, pb1, nq);
            acc = pv_key(acc, elems(v_words(v_head + key_row(min(t0 + 2u * rows + r, end - 1u)) * P.v_ss, f, nq, al, vn4, v_tail)), pa2, pb2, nq);
            acc = pv_key(acc, elems(v_words(v_head + key_row(min(t0 + 3u * rows + r, end - 1u)) * P.v_ss, f, nq, al, vn4, v_tail)), pa3, pb3, nq);
            a0 = acc.a0;
            a1 = acc.a1;
            a2 = acc.a2;
            a3 = acc.a3;
        }
    }

    // Merge the row lanes: common max and sum per quad, then a tree sum of the
    // rescaled accumulators.
    if (c == 0u) {
        ml_sh[4u * r] = ma;
        ml_sh[4u * r + 1u] = mb;
        ml_sh[4u * r + 2u] = la;
        ml_sh[4u * r + 3u] = lb;
    }
    workgroupBarrier();
    for (var hq = tid; hq < nq; hq += WG) {
        var gm = vec4<f32>(NEG_BIG);
        for (var i = 0u; i < rows; i++) {
            gm = max(gm, ml_sh[4u * i + hq]);
        }
        var gl = vec4<f32>(0.0);
        for (var i = 0u; i < rows; i++) {
            gl += ml_sh[4u * i + 2u + hq] * exp(ml_sh[4u * i + hq] - gm);
        }
        sc_sh[hq] = gm;
        sc_sh[2u + hq] = gl;
    }
    workgroupBarrier();
    let sa = exp(ma - sc_sh[0]);
    var sb = sa;
    if (nq > 1u) {
        sb = exp(mb - sc_sh[1]);
    }
    a0 = scale4(a0, sa);
    a1 = scale4(a1, sa);
    a2 = scale4(a2, sb);
    a3 = scale4(a3, sb);
    for (var half = rows >> 1u; half > 0u; half >>= 1u) {
        // Row lanes [half, 2 half) hand their accumulators to [0, half), as
        // 16 vec4s per thread at stride half C (conflict-free).
        let n = half * cols;
        for (var once = select(1u, 0u, r >= half && r < 2u * half); once < 1u; once++) {
            let o = (r - half) * cols + c;
            put_mat(o, n, a0);
            put_mat(o + 4u * n, n, a1);
            put_mat(o + 8u * n, n, a2);
            put_mat(o + 12u * n, n, a3);
        }
        workgroupBarrier();
        for (var once = select(1u, 0u, r < half); once < 1u; once++) {
            let o = r * cols + c;
            a0 += get_mat(o, n);
            a1 += get_mat(o + 4u * n, n);
            a2 += get_mat(o + 8u * n, n);
            a3 += get_mat(o + 12u * n, n);
        }
        workgroupBarrier();
    }

    let row0 = (b * P.q_heads + h0) * P.num_splits + split;
    for (var once = select(1u, 0u, r == 0u && live); once < 1u; once++) {
        let ia = vec4<f32>(1.0) / sc_sh[2];
        var ib = ia;
        if (nq > 1u) {
            ib = vec4<f32>(1.0) / sc_sh[3];
        }
        write_mat(0u, a0, f, row0, ia, nh, nq);
        write_mat(1u, a1, f, row0, ia, nh, nq);
        write_mat(2u, a2, f, row0, ib, nh, nq);
        write_mat(3u, a3, f, row0, ib, nh, nq);
    }
    if (tid < nh) {
        let hq = tid >> 2u;
        ws[P.lse_off + row0 + tid * P.num_splits] = sc_sh[hq][tid & 3u] + log(sc_sh[2u + hq][tid & 3u]);
        for (var i = 1u; i < P.wg_splits && (split + i) * P.chunk_len < n_keys; i++) {
            ws[P.lse_off + row0 + tid * P.num_splits + i] = NEG_BIG;
        }
    }
}

// Up to 8 query heads per workgroup, any cache layout.
@compute @workgroup_size(64)
fn decode_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    partial(wg, tid, 2u, false);
}

// At most 4 query heads (GQA groups of 4 or fewer), any cache layout.
@compute @workgroup_size(64)
fn decode_partial4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    partial(wg, tid, 1u, false);
}

// As decode_partial, for 16-byte aligned caches.
@compute @workgroup_size(64)
fn decode_partial_al(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    partial(wg, tid, 2u, true);
}

// As decode_partial4, for 16-byte aligned caches.
@compute @workgroup_size(64)
fn decode_partial4_al(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    partial(wg, tid, 1u, true);
}

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

@compute @workgroup_size(64)
fn decode_merge(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let h = wg.x;
    let b = wg.y;
    let span = load_span(b, tid);
    let n_keys = span.y - span.x;
    let d_len = P.head_dim;
    let out = P.o_off + b * P.o_sb + h * P.o_sh;
    if (span.z != 0u || n_keys == 0u) {
        let bits = select(pack_elem(0.0), nan_bits(), span.z != 0u);
        for (var d = tid; d < d_len; d += WG) {
            store_bits(out + d, bits);
        }
        return;
    }
    // Clamped so a mis-sized num_splits can never read outside the workspace.
    let n_active = min((n_keys + P.chunk_len - 1u) / P.chunk_len, P.num_splits);
    let rows = (b * P.q_heads + h) * P.num_splits;

    // Max and sum of exp of the splits' log-sum-exps: online per thread, then a tree.
    var m = NEG_BIG;
    var z = 0.0;
    for (var s = tid; s < n_active; s += WG) {
        let x = ws[P.lse_off + rows + s];
        let mn = max(m, x);
        z = z * exp(m - mn) + exp(x - mn);
        m = mn;
    }
    red[tid] = vec2<f32>(m, z);
    workgroupBarrier();
    for (var off = WG / 2u; off > 0u; off >>= 1u) {
        if (tid < off) {
            let u = red[tid];
            let v = red[tid + off];
            let mn = max(u.x, v.x);
            red[tid] = vec2<f32>(mn, u.y * exp(u.x - mn) + v.y * exp(v.x - mn));
        }
        workgroupBarrier();
    }
    let mz = red[0];
    // Split weights, 64 at a time, then the weighted sum of the partial rows;
    // thread tid takes dims tid, tid + 64, ...
    for (var d0 = 0u; d0 < d_len; d0 += WG) {
        let d = min(d0 + tid, d_len - 1u);
        var o = 0.0;
        for (var s0 = 0u; s0 < n_active; s0 += WG) {
            workgroupBarrier();
            if (s0 + tid < n_active) {
                wt_sh[tid] = exp(ws[P.lse_off + rows + s0 + tid] - mz.x) / mz.y;
            }
            workgroupBarrier();
            for (var j = 0u; j < min(WG, n_active - s0); j++) {
                // A zero weight also marks a split another one absorbed: its row holds no data.
                let w = wt_sh[j];
                o += select(0.0, w * ws[(rows + s0 + j) * d_len + d], w > 0.0);
            }
        }
        if (d0 + tid < d_len) {
            store_bits(out + d, pack_elem(o));
        }
    }
}
