//! WGSL launchers for dense decode (`kernels-wgsl/decode.wgsl`).

use super::{BufferLens, DecodeParams, HEADS_PER_BLOCK};
use crate::backend::wgpu::{
    check_distinct_buffers, index_u32, Dispatch, WgpuBackend, WgpuTensor, WgpuWorkspace, WgslFile,
};
use crate::dtype::DType;
use crate::error::Result;

const KERNELS: WgslFile = WgslFile { name: "decode.wgsl", source: include_str!("../../kernels-wgsl/decode.wgsl") };

/// Mirrors `struct Params` of decode.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    q_off: u32,
    k_off: u32,
    v_off: u32,
    o_off: u32,
    q_sb: u32,
    q_sh: u32,
    k_sb: u32,
    k_sh: u32,
    k_ss: u32,
    v_sb: u32,
    v_sh: u32,
    v_ss: u32,
    o_sb: u32,
    o_sh: u32,
    batch: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    chunk_len: u32,
    num_splits: u32,
    head_chunks: u32,
    lens_off: u32,
    lse_off: u32,
    scale: f32,
    wg_splits: u32,
    pos_off: u32,
    mask: u32,
    window: u32,
    ring: u32,
    pad: [u32; 2],
}

/// Which keys each sequence attends (`key_interval` of common.wgsl): dense
/// decode is `mask` 2 (full), no window, no ring, positions ignored.
#[derive(Clone, Copy)]
pub(crate) struct KeyRule<'a> {
    /// One `u32` query position per sequence.
    pub pos: WgpuTensor<'a>,
    /// 0 causal, 1 strict, 2 full.
    pub mask: u32,
    /// 0: none.
    pub window: u32,
    /// Position `p` at row `p % capacity`.
    pub ring: bool,
}

/// The tensors of one split-KV launch and the argument names errors use.
pub(crate) struct SplitKvArgs<'a> {
    pub q: WgpuTensor<'a>,
    pub k: WgpuTensor<'a>,
    pub v: WgpuTensor<'a>,
    pub lens: WgpuTensor<'a>,
    pub out: WgpuTensor<'a>,
    /// Names of `k`, `v`, `lens` and of the capacity.
    pub names: [&'static str; 4],
}

/// Records dense decode into `encoder`: `out[b, h, :] = softmax(q K^T * scale) V`
/// over the first `seq_lens[b]` cache rows. `q`, `k_cache`, `v_cache` and `out`
/// hold `dtype` elements; `seq_lens` holds `u32`. Nothing is submitted or
/// waited for; `workspace` must stay untouched until the work has run.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    params: &DecodeParams,
    dtype: DType,
    q: WgpuTensor<'_>,
    k_cache: WgpuTensor<'_>,
    v_cache: WgpuTensor<'_>,
    seq_lens: WgpuTensor<'_>,
    out: WgpuTensor<'_>,
    workspace: &WgpuWorkspace,
) -> Result<()> {
    let limits = backend.limits();
    let es = dtype.size() as u64;
    let lens = BufferLens {
        q: q.checked_len("q", es, limits)?,
        k: k_cache.checked_len("k_cache", es, limits)?,
        v: v_cache.checked_len("v_cache", es, limits)?,
        seq_lens: seq_lens.checked_len("seq_lens", 4, limits)?,
        o: out.checked_len("out", es, limits)?,
        workspace_bytes: workspace.bytes(),
    };
    params.validate_buffers(lens)?;
    check_distinct_buffers(&[
        ("q", q.buffer, false),
        ("k_cache", k_cache.buffer, false),
        ("v_cache", v_cache.buffer, false),
        ("seq_lens", seq_lens.buffer, false),
        ("out", out.buffer, true),
        workspace.bound(),
    ])?;
    let keys = KeyRule { pos: seq_lens, mask: 2, window: 0, ring: false };
    let args = SplitKvArgs {
        q,
        k: k_cache,
        v: v_cache,
        lens: seq_lens,
        out,
        names: ["k_cache", "v_cache", "seq_lens", "capacity"],
    };
    record(backend, encoder, params, dtype, args, keys, workspace)
}

/// Records the partial and merge passes over buffers whose lengths the caller
/// has checked against `params` (a workspace of `params.workspace_bytes()`)
/// and that share no buffer with a written one (`out`, the workspace).
pub(crate) fn record(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    params: &DecodeParams,
    dtype: DType,
    args: SplitKvArgs<'_>,
    keys: KeyRule<'_>,
    workspace: &WgpuWorkspace,
) -> Result<()> {
    let limits = backend.limits();
    let es = dtype.size() as u64;
    let SplitKvArgs { q, k: k_cache, v: v_cache, lens: seq_lens, out, names: [k_name, v_name, lens_name, cap_name] } =
        args;
    workspace.checked_bytes(limits)?;
    let plan = params.plan();
    let s = &params.shape;
    let groups_y = s.kv_heads * plan.head_chunks;
    // A CPU adapter runs workgroups on a few threads, so each one's fixed cost
    // (staging q, merging its row lanes) matters more than their number: give
    // each workgroup several consecutive splits, about 4 workgroups per thread.
    let wg_splits = if backend.info().device_type == wgpu::DeviceType::Cpu {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        (plan.num_splits * groups_y * s.batch / (4 * threads)).clamp(1, plan.num_splits)
    } else {
        1
    };
    backend.check_workgroups(&[
        (cap_name, plan.num_splits),
        ("kv_heads", groups_y),
        ("batch", s.batch),
        ("q_heads", s.q_heads),
    ])?;
    let u = index_u32::<usize>;
    let (l, off) = (&params.layout, |t: &WgpuTensor<'_>| t.offset as usize);
    let p = Params {
        q_off: u(off(&q), "q")?,
        k_off: u(off(&k_cache), k_name)?,
        v_off: u(off(&v_cache), v_name)?,
        o_off: u(off(&out), "out")?,
        q_sb: u(l.q[0], "q_strides")?,
        q_sh: u(l.q[1], "q_strides")?,
        k_sb: u(l.k[0], "k_strides")?,
        k_sh: u(l.k[1], "k_strides")?,
        k_ss: u(l.k[2], "k_strides")?,
        v_sb: u(l.v[0], "v_strides")?,
        v_sh: u(l.v[1], "v_strides")?,
        v_ss: u(l.v[2], "v_strides")?,
        o_sb: u(l.o[0], "o_strides")?,
        o_sh: u(l.o[1], "o_strides")?,
        batch: s.batch as u32,
        q_heads: s.q_heads as u32,
        kv_heads: s.kv_heads as u32,
        head_dim: s.head_dim as u32,
        capacity: s.capacity as u32,
        chunk_len: plan.chunk_len as u32,
        num_splits: plan.num_splits as u32,
        head_chunks: plan.head_chunks as u32,
        lens_off: u(off(&seq_lens), lens_name)?,
        lse_off: u(params.lse_offset(), "workspace")?,
        scale: params.scale,
        wg_splits: wg_splits as u32,
        pos_off: u(off(&keys.pos), "q_pos")?,
        mask: keys.mask,
        window: keys.window,
        ring: keys.ring as u32,
        pad: [0; 2],
    };
    // Offsets plus the layout extents must stay inside 32-bit element indices.
    for (arg, t, len) in [
        ("q", &q, params.q_len()),
        (k_name, &k_cache, params.k_len()),
        (v_name, &v_cache, params.v_len()),
        ("out", &out, params.o_len()),
    ] {
        u(off(t) + len, arg)?;
    }
    let uniform = backend.uniform(&p);
    // Groups of at most 4 query heads use the variant that keeps one vec4 of
    // heads; caches whose rows all start 16-byte aligned inside whole 16-byte
    // words of their buffers use the variant that reads them as such.
    let four = s.groups().min(HEADS_PER_BLOCK) <= 4;
    let aligned = aligned16(&k_cache, &l.k, params.k_len(), es) && aligned16(&v_cache, &l.v, params.v_len(), es);
    let partial_entry = match (four, aligned) {
        (false, false) => "decode_partial",
        (true, false) => "decode_partial4",
        (false, true) => "decode_partial_al",
        (true, true) => "decode_partial4_al",
    };
    let ws = workspace.buffer();
    let partial_bindings = [
        (0, &uniform),
        (1, q.buffer),
        (2, k_cache.buffer),
        (3, v_cache.buffer),
        (4, seq_lens.buffer),
        (5, ws),
        // K and V again, as arrays of 16-byte words.
        (7, k_cache.buffer),
        (8, v_cache.buffer),
        (9, keys.pos.buffer),
    ];
    let merge_bindings = [(0, &uniform), (4, seq_lens.buffer), (5, ws), (6, out.buffer), (9, keys.pos.buffer)];
    let partial_groups = (plan.num_splits.div_ceil(wg_splits) as u32, groups_y as u32, s.batch as u32);
    backend.record_pass(
        encoder,
        "decode",
        KERNELS,
        dtype,
        &[
            Dispatch { entry: partial_entry, bindings: &partial_bindings, groups: partial_groups },
            Dispatch {
                entry: "decode_merge",
                bindings: &merge_bindings,
                groups: (s.q_heads as u32, s.batch as u32, 1),
            },
        ],
    )
}

/// True when every row of a cache with strides `st` starts on a 16-byte
/// boundary and the tensor ends inside the buffer's whole 16-byte words.
fn aligned16(t: &WgpuTensor<'_>, st: &[usize; 3], len: usize, es: u64) -> bool {
    let e4 = 16 / es;
    let end_bytes = (t.offset + len as u64) * es;
    t.offset.is_multiple_of(e4)
        && st.iter().all(|&x| (x as u64).is_multiple_of(e4))
        && end_bytes <= t.buffer.size() / 16 * 16
}
