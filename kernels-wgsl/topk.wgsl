// Exact top-k per row (DESIGN.md 4.3): one workgroup per row. A radix select
// over order-preserving keys (8 bits a pass, from the top) finds the k-th key T
// and how many of the elements equal to T to keep; an ordered compaction then
// writes the chosen positions in ascending order, the lowest-indexed ties first.

struct Params {
    x_off: u32, row_stride: u32, rows: u32, n: u32,
    k: u32, idx_off: u32, val_off: u32, pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x_buf: array<u32>;
@group(0) @binding(2) var<storage, read_write> idx_buf: array<u32>;
@group(0) @binding(3) var<storage, read_write> val_buf: array<atomic<u32>>;

const WG: u32 = 256u;

var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> scan_sh: array<u32, 256>;
var<workgroup> digit_sh: u32;
var<workgroup> remaining_sh: u32;
var<workgroup> total_sh: u32;

fn bits_at(i: u32) -> u32 {
    return elem_bits(x_buf[elem_word(i)], i);
}

// Unsigned key whose order is the ranking order: -0 == +0, NaN lowest (key 0),
// and no number maps to 0.
fn rank_key(bits: u32) -> u32 {
    if (DTYPE == 0u) {
        var u = bits;
        if (u == 0x80000000u) {
            u = 0u;
        }
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            return 0u;
        }
        return select(u | 0x80000000u, ~u, (u & 0x80000000u) != 0u);
    }
    var h = bits & 0xffffu;
    if (h == 0x8000u) {
        h = 0u;
    }
    let is_nan = select((h & 0x7fffu) > 0x7f80u, (h & 0x7fffu) > 0x7c00u, DTYPE == 1u);
    if (is_nan) {
        return 0u;
    }
    return select(h | 0x8000u, (~h) & 0xffffu, (h & 0x8000u) != 0u);
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

@compute @workgroup_size(256)
fn topk_row(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = wg.x;
    let base = P.x_off + row * P.row_stride;
    let n = P.n;
    let k = P.k;
    let passes = select(2u, 4u, DTYPE == 0u);

    // Radix select: after the passes, `prefix` is the k-th largest key and
    // `remaining` the number of elements equal to it to keep.
    var prefix = 0u;
    var remaining = k;
    for (var step = 0u; step < passes; step++) {
        let shift = (passes - 1u - step) * 8u;
        let hi_mask = select(0u, 0xffffffffu << (shift + 8u), shift + 8u < 32u);
        atomicStore(&hist[tid], 0u);
        workgroupBarrier();
        for (var i = tid; i < n; i += WG) {
            let key = rank_key(bits_at(base + i));
            if ((key & hi_mask) == prefix) {
                atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
        }
        workgroupBarrier();
        if (tid == 0u) {
            // The bucket counts above the prefix sum to at least `remaining`.
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

    // Ordered compaction, a tile of WG positions at a time.
    let out_row = row * k;
    var eq_seen = 0u;
    var written = 0u;
    for (var tile = 0u; tile < n; tile += WG) {
        let i = tile + tid;
        let live = i < n;
        var bits = 0u;
        var key = 0u;
        if (live) {
            bits = bits_at(base + i);
            key = rank_key(bits);
        }
        let is_eq = live && key == prefix;
        let eq_incl = workgroup_scan(tid, u32(is_eq));
        let eq_total = workgroupUniformLoad(&total_sh);
        let chosen = (live && key > prefix) || (is_eq && eq_seen + eq_incl - 1u < remaining);
        let slot_incl = workgroup_scan(tid, u32(chosen));
        let chosen_total = workgroupUniformLoad(&total_sh);
        if (chosen) {
            let slot = out_row + written + slot_incl - 1u;
            idx_buf[P.idx_off + slot] = i;
            let o = P.val_off + slot;
            if (DTYPE == 0u) {
                atomicStore(&val_buf[o], bits);
            } else {
                let r = half_write(o, bits);
                atomicAnd(&val_buf[o >> 1u], r.x);
                atomicOr(&val_buf[o >> 1u], r.y);
            }
        }
        eq_seen += eq_total;
        written += chosen_total;
        if (written >= k) {
            break;
        }
    }
}
