//! WGSL launchers for cross-layer attention and slot writes (`kernels-wgsl/crosslayer.wgsl`).

use super::{AttnBuffers, AttnParams, WriteParams};
use crate::backend::wgpu::{
    check_distinct_buffers, index_u32, strides_u32, Dispatch, WgpuBackend, WgpuTensor, WgpuWorkspace, WgslFile,
};
use crate::decode::wgpu::{record as record_split_kv, KeyRule, SplitKvArgs};
use crate::dtype::DType;
use crate::error::Result;

const KERNELS: WgslFile =
    WgslFile { name: "crosslayer.wgsl", source: include_str!("../../kernels-wgsl/crosslayer.wgsl") };

/// Mirrors `struct AttnParams` of crosslayer.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct KernelAttn {
    q_off: u32,
    k_off: u32,
    v_off: u32,
    o_off: u32,
    pos_off: u32,
    lens_off: u32,
    q: [u32; 3],
    k: [u32; 3],
    v: [u32; 3],
    o: [u32; 3],
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    rows: u32,
    mask: u32,
    window: u32,
    ring: u32,
    scale: f32,
    pad: [u32; 2],
}

/// Mirrors `struct WriteParams` of crosslayer.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct KernelWrite {
    new_k_off: u32,
    new_v_off: u32,
    k_off: u32,
    v_off: u32,
    start_off: u32,
    new: [u32; 3],
    slot: [u32; 3],
    tokens: u32,
    kv_heads: u32,
    head_dim: u32,
    rows: u32,
    ring: u32,
}

/// Records attention of `queries` tokens per sequence over one slot into
/// `encoder` (module docs of [`super`] for positions, masks and the ring).
/// `q_pos` and `kv_lens` hold one `u32` per sequence. The decode form
/// (`queries == 1`) runs decode.wgsl's split-KV kernels and needs a
/// `workspace` of [`AttnParams::workspace_bytes`]; a chunk needs none (any
/// workspace will do). Nothing is submitted; the workspace must stay
/// untouched until the work has run.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    params: &AttnParams,
    dtype: DType,
    q: WgpuTensor<'_>,
    k_slot: WgpuTensor<'_>,
    v_slot: WgpuTensor<'_>,
    q_pos: WgpuTensor<'_>,
    kv_lens: WgpuTensor<'_>,
    out: WgpuTensor<'_>,
    workspace: &WgpuWorkspace,
) -> Result<()> {
    let (limits, es) = (backend.limits(), dtype.size() as u64);
    params.validate_buffers(AttnBuffers {
        q: q.checked_len("q", es, limits)?,
        k: k_slot.checked_len("k_slot", es, limits)?,
        v: v_slot.checked_len("v_slot", es, limits)?,
        q_pos: q_pos.checked_len("q_pos", 4, limits)?,
        kv_lens: kv_lens.checked_len("kv_lens", 4, limits)?,
        o: out.checked_len("out", es, limits)?,
        workspace_bytes: workspace.bytes(),
    })?;
    // The chunk form binds no workspace; refusing an aliased one in both forms keeps one rule.
    check_distinct_buffers(&[
        ("q", q.buffer, false),
        ("k_slot", k_slot.buffer, false),
        ("v_slot", v_slot.buffer, false),
        ("q_pos", q_pos.buffer, false),
        ("kv_lens", kv_lens.buffer, false),
        ("out", out.buffer, true),
        workspace.bound(),
    ])?;
    if let Some(d) = params.decode_params() {
        let keys = KeyRule {
            pos: q_pos,
            mask: params.mask.code(),
            window: params.window.unwrap_or(0) as u32,
            ring: params.ring,
        };
        let args =
            SplitKvArgs { q, k: k_slot, v: v_slot, lens: kv_lens, out, names: ["k_slot", "v_slot", "kv_lens", "rows"] };
        return record_split_kv(backend, encoder, &d, dtype, args, keys, workspace);
    }
    let s = &params.shape;
    backend.check_workgroups(&[("queries", s.queries), ("q_heads", s.q_heads), ("batch", s.batch)])?;
    for (arg, t, len) in [
        ("q", &q, params.q_len()),
        ("k_slot", &k_slot, params.k_len()),
        ("v_slot", &v_slot, params.v_len()),
        ("out", &out, params.o_len()),
    ] {
        index_u32(t.offset + len as u64, arg)?;
    }
    let l = &params.layout;
    let off = |t: &WgpuTensor<'_>, arg: &str| index_u32(t.offset, arg);
    let p = KernelAttn {
        q_off: off(&q, "q")?,
        k_off: off(&k_slot, "k_slot")?,
        v_off: off(&v_slot, "v_slot")?,
        o_off: off(&out, "out")?,
        pos_off: off(&q_pos, "q_pos")?,
        lens_off: off(&kv_lens, "kv_lens")?,
        q: strides_u32(&l.q, "q_strides")?,
        k: strides_u32(&l.k, "k_strides")?,
        v: strides_u32(&l.v, "v_strides")?,
        o: strides_u32(&l.o, "o_strides")?,
        q_heads: s.q_heads as u32,
        kv_heads: s.kv_heads as u32,
        head_dim: s.head_dim as u32,
        rows: s.rows as u32,
        mask: params.mask.code(),
        window: params.window.unwrap_or(0) as u32,
        ring: params.ring as u32,
        scale: params.scale,
        pad: [0; 2],
    };
    let uniform = backend.uniform(&p);
    let bindings = [
        (0, &uniform),
        (1, q.buffer),
        (2, k_slot.buffer),
        (3, v_slot.buffer),
        (4, q_pos.buffer),
        (5, kv_lens.buffer),
        (6, out.buffer),
    ];
    let groups = (s.queries as u32, s.q_heads as u32, s.batch as u32);
    backend.record_pass(
        encoder,
        "xl_attend",
        KERNELS,
        dtype,
        &[Dispatch { entry: "xl_attend", bindings: &bindings, groups }],
    )
}

/// Records the write of `tokens` new K/V rows per sequence into a slot
/// ([`WriteParams`]); `start` holds one `u32` position per sequence.
#[allow(clippy::too_many_arguments)]
pub fn write(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    params: &WriteParams,
    dtype: DType,
    new_k: WgpuTensor<'_>,
    new_v: WgpuTensor<'_>,
    start: WgpuTensor<'_>,
    k_slot: WgpuTensor<'_>,
    v_slot: WgpuTensor<'_>,
) -> Result<()> {
    let (limits, es) = (backend.limits(), dtype.size() as u64);
    params.validate_buffers(
        new_k.checked_len("new_k", es, limits)?,
        new_v.checked_len("new_v", es, limits)?,
        start.checked_len("start", 4, limits)?,
        k_slot.checked_len("k_slot", es, limits)?,
        v_slot.checked_len("v_slot", es, limits)?,
    )?;
    check_distinct_buffers(&[
        ("new_k", new_k.buffer, false),
        ("new_v", new_v.buffer, false),
        ("start", start.buffer, false),
        ("k_slot", k_slot.buffer, true),
        ("v_slot", v_slot.buffer, true),
    ])?;
    let rows_x = params.tokens * params.kv_heads;
    backend.check_workgroups(&[("tokens", rows_x), ("batch", params.batch)])?;
    for (arg, t, len) in [
        ("new_k", &new_k, params.new_len()),
        ("new_v", &new_v, params.new_len()),
        ("k_slot", &k_slot, params.slot_len()),
        ("v_slot", &v_slot, params.slot_len()),
    ] {
        index_u32(t.offset + len as u64, arg)?;
    }
    let off = |t: &WgpuTensor<'_>, arg: &str| index_u32(t.offset, arg);
    let p = KernelWrite {
        new_k_off: off(&new_k, "new_k")?,
        new_v_off: off(&new_v, "new_v")?,
        k_off: off(&k_slot, "k_slot")?,
        v_off: off(&v_slot, "v_slot")?,
        start_off: off(&start, "start")?,
        new: strides_u32(&params.new, "new_strides")?,
        slot: strides_u32(&params.slot, "slot_strides")?,
        tokens: params.tokens as u32,
        kv_heads: params.kv_heads as u32,
        head_dim: params.head_dim as u32,
        rows: params.rows as u32,
        ring: params.ring as u32,
    };
    let uniform = backend.uniform(&p);
    let bindings = [
        (10, &uniform),
        (11, new_k.buffer),
        (12, new_v.buffer),
        (13, start.buffer),
        (14, k_slot.buffer),
        (15, v_slot.buffer),
    ];
    let groups = (rows_x as u32, params.batch as u32, 1);
    backend.record_pass(
        encoder,
        "xl_write",
        KERNELS,
        dtype,
        &[Dispatch { entry: "xl_write", bindings: &bindings, groups }],
    )
}
