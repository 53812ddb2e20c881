//! WGSL launchers for blockwise attention (`kernels-wgsl/blockwise.wgsl`).
//!
//! Every launcher records into the caller's encoder and returns; nothing is
//! submitted, waited for or allocated beyond a small uniform buffer. `o`,
//! `lse`, `delta`, `dq`, `dk`, `dv` are f32 tensors (offsets in f32 elements);
//! `q`, `k`, `v`, `d_o` and the finalized `out` hold `dtype` elements. A
//! tensor a launcher writes must not share its buffer with any other argument.

use super::{check_lens, BlockParams, BlockShape, Mask};
use crate::backend::wgpu::{
    check_distinct_buffers, index_u32, strides_u32, Dispatch, WgpuBackend, WgpuTensor, WgslFile,
};
use crate::dtype::DType;
use crate::error::Result;

const KERNELS: WgslFile =
    WgslFile { name: "blockwise.wgsl", source: include_str!("../../kernels-wgsl/blockwise.wgsl") };
/// Threads per workgroup of every entry point.
const WG: usize = 64;
/// Query rows per workgroup (`BQ` of the kernel).
const BQ: usize = 16;

/// Keys per workgroup of `bw_backward_dkv`: its dK and dV tiles of `bk * head_dim`
/// floats are spread over 16 private accumulators per thread (1024 floats), at most 16 keys.
fn dkv_tile_keys(head_dim: usize) -> usize {
    (1024 / head_dim).min(16)
}

/// Mirrors `struct Params` of blockwise.wgsl (one struct for every entry point).
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    q_off: u32,
    k_off: u32,
    v_off: u32,
    do_off: u32,
    q_st: [u32; 3],
    k_st: [u32; 3],
    v_st: [u32; 3],
    do_st: [u32; 3],
    batch: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    q_len: u32,
    kv_len: u32,
    q0: u32,
    k0: u32,
    causal: u32,
    scale: f32,
    accumulate: u32,
    bk: u32,
    o_off: u32,
    lse_off: u32,
    ob_off: u32,
    lseb_off: u32,
    delta_off: u32,
    dq_off: u32,
    dk_off: u32,
    dv_off: u32,
    out_off: u32,
    rows: u32,
    groups_x: u32,
    pad: u32,
}

const _: () = assert!(std::mem::size_of::<Params>() == 160);

/// The shape fields of `Params` (sizes were validated to fit i32).
fn shape_params(s: &BlockShape) -> Params {
    Params {
        batch: s.batch as u32,
        q_heads: s.q_heads as u32,
        kv_heads: s.kv_heads as u32,
        head_dim: s.head_dim as u32,
        q_len: s.q_len as u32,
        kv_len: s.kv_len as u32,
        rows: s.lse_elems() as u32,
        ..Params::default()
    }
}

/// Shape, offsets, mask and the strides of the input-dtype tensors.
fn block_params(p: &BlockParams) -> Result<Params> {
    let l = &p.layout;
    Ok(Params {
        q_st: strides_u32(&l.q, "q_strides")?,
        k_st: strides_u32(&l.k, "k_strides")?,
        v_st: strides_u32(&l.v, "v_strides")?,
        do_st: strides_u32(&l.o, "o_strides")?,
        q0: p.q0 as u32,
        k0: p.k0 as u32,
        causal: (p.mask == Mask::Causal) as u32,
        scale: p.scale,
        ..shape_params(&p.shape)
    })
}

/// Checks each tensor's buffer and returns its length in elements past the offset.
fn lens(backend: &WgpuBackend, tensors: &[(&'static str, &WgpuTensor<'_>, u64)]) -> Result<Vec<usize>> {
    tensors.iter().map(|(arg, t, es)| t.checked_len(arg, *es, backend.limits())).collect()
}

fn off(t: &WgpuTensor<'_>, arg: &str) -> Result<u32> {
    index_u32(t.offset, arg)
}

/// Records one dispatch of `entry` with `params` (binding 0) and the given bindings.
fn dispatch(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    entry: &'static str,
    dtype: DType,
    params: &Params,
    bindings: &[(u32, &wgpu::Buffer)],
    groups: (u32, u32, u32),
) -> Result<()> {
    let uniform = backend.uniform(params);
    let bindings = [[(0, &uniform)].as_slice(), bindings].concat();
    backend.record_pass(encoder, entry, KERNELS, dtype, &[Dispatch { entry, bindings: &bindings, groups }])
}

/// Records the forward of one (Q block, KV block) pair: the normalised partial
/// into f32 `o` `[B, Hq, q_len, D]` and its log-sum-exp into f32 `lse`
/// `[B, Hq, q_len]` (`-inf` and 0 for rows that see no key). With `accumulate`
/// the pair is merged into the running `(o, lse)` in place instead.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    params: &BlockParams,
    dtype: DType,
    q: WgpuTensor<'_>,
    k: WgpuTensor<'_>,
    v: WgpuTensor<'_>,
    o: WgpuTensor<'_>,
    lse: WgpuTensor<'_>,
    accumulate: bool,
) -> Result<()> {
    params.validate()?;
    let es = dtype.size() as u64;
    let have = lens(backend, &[("q", &q, es), ("k", &k, es), ("v", &v, es), ("o", &o, 4), ("lse", &lse, 4)])?;
    check_lens(&params.forward_needs(), &have)?;
    check_distinct_buffers(&[
        ("q", q.buffer, false),
        ("k", k.buffer, false),
        ("v", v.buffer, false),
        ("o", o.buffer, true),
        ("lse", lse.buffer, true),
    ])?;
    let s = &params.shape;
    let tiles = s.q_len.div_ceil(BQ);
    backend.check_workgroups(&[("q_len", tiles), ("q_heads", s.q_heads), ("batch", s.batch)])?;
    let p = Params {
        q_off: off(&q, "q")?,
        k_off: off(&k, "k")?,
        v_off: off(&v, "v")?,
        o_off: off(&o, "o")?,
        lse_off: off(&lse, "lse")?,
        accumulate: accumulate as u32,
        ..block_params(params)?
    };
    let bindings = [(1, q.buffer), (2, k.buffer), (3, v.buffer), (5, o.buffer), (6, lse.buffer)];
    dispatch(backend, encoder, "bw_forward", dtype, &p, &bindings, (tiles as u32, s.q_heads as u32, s.batch as u32))
}

/// Records the merge of the partial `(o_b, lse_b)` into `(o, lse)` in place
/// (all f32, contiguous as `shape` says), stable when either side is `-inf`.
#[allow(clippy::too_many_arguments)]
pub fn merge(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    shape: &BlockShape,
    o: WgpuTensor<'_>,
    lse: WgpuTensor<'_>,
    o_b: WgpuTensor<'_>,
    lse_b: WgpuTensor<'_>,
) -> Result<()> {
    shape.validate()?;
    let have = lens(backend, &[("o", &o, 4), ("lse", &lse, 4), ("o_b", &o_b, 4), ("lse_b", &lse_b, 4)])?;
    check_lens(&shape.merge_needs(), &have)?;
    check_distinct_buffers(&[
        ("o", o.buffer, true),
        ("lse", lse.buffer, true),
        ("o_b", o_b.buffer, false),
        ("lse_b", lse_b.buffer, false),
    ])?;
    let (gx, gy) = backend.flat_groups(shape.lse_elems(), WG, "shape")?;
    let p = Params {
        o_off: off(&o, "o")?,
        lse_off: off(&lse, "lse")?,
        ob_off: off(&o_b, "o_b")?,
        lseb_off: off(&lse_b, "lse_b")?,
        groups_x: gx,
        ..shape_params(shape)
    };
    let bindings = [(5, o.buffer), (6, lse.buffer), (9, o_b.buffer), (10, lse_b.buffer)];
    dispatch(backend, encoder, "bw_merge", DType::F32, &p, &bindings, (gx, gy, 1))
}

/// Records the cast of the final f32 `o` into `out` (`dtype`, strided as
/// `params.layout.o`); rows whose `lse` is `-inf` become exactly 0.
#[allow(clippy::too_many_arguments)]
pub fn finalize(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    params: &BlockParams,
    dtype: DType,
    o: WgpuTensor<'_>,
    lse: WgpuTensor<'_>,
    out: WgpuTensor<'_>,
) -> Result<()> {
    params.validate()?;
    let have = lens(backend, &[("o", &o, 4), ("lse", &lse, 4), ("out", &out, dtype.size() as u64)])?;
    check_lens(&params.finalize_needs(), &have)?;
    check_distinct_buffers(&[("o", o.buffer, false), ("lse", lse.buffer, false), ("out", out.buffer, true)])?;
    let (gx, gy) = backend.flat_groups(params.shape.o_elems(), WG, "shape")?;
    let p = Params {
        o_off: off(&o, "o")?,
        lse_off: off(&lse, "lse")?,
        out_off: off(&out, "out")?,
        groups_x: gx,
        ..block_params(params)?
    };
    let bindings = [(7, o.buffer), (8, lse.buffer), (16, out.buffer)];
    dispatch(backend, encoder, "bw_finalize", dtype, &p, &bindings, (gx, gy, 1))
}

/// Records the backward pre-pass `delta = rowsum(d_o * o)` (f32 `delta` shaped like `lse`).
#[allow(clippy::too_many_arguments)]
pub fn backward_prepass(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    params: &BlockParams,
    dtype: DType,
    o: WgpuTensor<'_>,
    d_o: WgpuTensor<'_>,
    delta: WgpuTensor<'_>,
) -> Result<()> {
    params.validate()?;
    let have = lens(backend, &[("o", &o, 4), ("d_o", &d_o, dtype.size() as u64), ("delta", &delta, 4)])?;
    check_lens(&params.prepass_needs(), &have)?;
    check_distinct_buffers(&[("o", o.buffer, false), ("d_o", d_o.buffer, false), ("delta", delta.buffer, true)])?;
    let (gx, gy) = backend.flat_groups(params.shape.lse_elems(), WG, "shape")?;
    let p = Params {
        o_off: off(&o, "o")?,
        do_off: off(&d_o, "d_o")?,
        delta_off: off(&delta, "delta")?,
        groups_x: gx,
        ..block_params(params)?
    };
    let bindings = [(4, d_o.buffer), (7, o.buffer), (11, delta.buffer)];
    dispatch(backend, encoder, "bw_backward_prepass", dtype, &p, &bindings, (gx, gy, 1))
}

/// Records the backward of one pair given the final `lse`, `d_o` and `delta`
/// (from [`backward_prepass`]), accumulating (`+=`) into f32 `dq`
/// `[B, Hq, q_len, D]` and `dk`/`dv` `[B, Hkv, kv_len, D]`. Two dispatches:
/// dK/dV per KV tile and dQ per Q tile, so no two workgroups write one element.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    params: &BlockParams,
    dtype: DType,
    q: WgpuTensor<'_>,
    k: WgpuTensor<'_>,
    v: WgpuTensor<'_>,
    d_o: WgpuTensor<'_>,
    lse: WgpuTensor<'_>,
    delta: WgpuTensor<'_>,
    dq: WgpuTensor<'_>,
    dk: WgpuTensor<'_>,
    dv: WgpuTensor<'_>,
) -> Result<()> {
    params.validate()?;
    let es = dtype.size() as u64;
    let have = lens(
        backend,
        &[
            ("q", &q, es),
            ("k", &k, es),
            ("v", &v, es),
            ("d_o", &d_o, es),
            ("lse", &lse, 4),
            ("delta", &delta, 4),
            ("dq", &dq, 4),
            ("dk", &dk, 4),
            ("dv", &dv, 4),
        ],
    )?;
    check_lens(&params.backward_needs(), &have)?;
    check_distinct_buffers(&[
        ("q", q.buffer, false),
        ("k", k.buffer, false),
        ("v", v.buffer, false),
        ("d_o", d_o.buffer, false),
        ("lse", lse.buffer, false),
        ("delta", delta.buffer, false),
        ("dq", dq.buffer, true),
        ("dk", dk.buffer, true),
        ("dv", dv.buffer, true),
    ])?;
    let s = &params.shape;
    let (q_tiles, kv_tiles) = (s.q_len.div_ceil(BQ), s.kv_len.div_ceil(dkv_tile_keys(s.head_dim)));
    backend.check_workgroups(&[("q_len", q_tiles), ("q_heads", s.q_heads), ("batch", s.batch)])?;
    backend.check_workgroups(&[("kv_len", kv_tiles), ("kv_heads", s.kv_heads), ("batch", s.batch)])?;
    let base = Params {
        q_off: off(&q, "q")?,
        k_off: off(&k, "k")?,
        v_off: off(&v, "v")?,
        do_off: off(&d_o, "d_o")?,
        lse_off: off(&lse, "lse")?,
        delta_off: off(&delta, "delta")?,
        dq_off: off(&dq, "dq")?,
        dk_off: off(&dk, "dk")?,
        dv_off: off(&dv, "dv")?,
        ..block_params(params)?
    };
    let inputs = [(1, q.buffer), (2, k.buffer), (3, v.buffer), (4, d_o.buffer), (8, lse.buffer), (12, delta.buffer)];
    let dkv = Params { bk: dkv_tile_keys(s.head_dim) as u32, ..base };
    let mut bindings = inputs.to_vec();
    bindings.extend([(14, dk.buffer), (15, dv.buffer)]);
    dispatch(
        backend,
        encoder,
        "bw_backward_dkv",
        dtype,
        &dkv,
        &bindings,
        (kv_tiles as u32, s.kv_heads as u32, s.batch as u32),
    )?;
    let mut bindings = inputs.to_vec();
    bindings.push((13, dq.buffer));
    dispatch(
        backend,
        encoder,
        "bw_backward_dq",
        dtype,
        &base,
        &bindings,
        (q_tiles as u32, s.q_heads as u32, s.batch as u32),
    )
}
