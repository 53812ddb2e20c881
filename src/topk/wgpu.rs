//! WGSL launcher for top-k (`kernels-wgsl/topk.wgsl`).

use super::TopkParams;
use crate::backend::wgpu::{check_distinct_buffers, index_u32, Dispatch, WgpuBackend, WgpuTensor, WgslFile};
use crate::dtype::DType;
use crate::error::Result;

const KERNELS: WgslFile = WgslFile { name: "topk.wgsl", source: include_str!("../../kernels-wgsl/topk.wgsl") };

/// Mirrors `struct Params` of topk.wgsl.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    x_off: u32,
    row_stride: u32,
    rows: u32,
    n: u32,
    k: u32,
    idx_off: u32,
    val_off: u32,
    pad: u32,
}

/// Records top-k into `encoder`: `indices` (u32) and `values` (`dtype`), `[rows, k]` each.
pub fn topk(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    params: &TopkParams,
    dtype: DType,
    x: WgpuTensor<'_>,
    indices: WgpuTensor<'_>,
    values: WgpuTensor<'_>,
) -> Result<()> {
    let limits = backend.limits();
    let es = dtype.size() as u64;
    params.validate_buffers(
        x.checked_len("x", es, limits)?,
        indices.checked_len("indices", 4, limits)?,
        values.checked_len("values", es, limits)?,
    )?;
    check_distinct_buffers(&[
        ("x", x.buffer, false),
        ("indices", indices.buffer, true),
        ("values", values.buffer, true),
    ])?;
    backend.check_workgroups(&[("rows", params.rows)])?;
    let u = index_u32::<usize>;
    u(x.offset as usize + params.x_len(), "x")?;
    u(indices.offset as usize + params.out_len(), "indices")?;
    u(values.offset as usize + params.out_len(), "values")?;
    let p = Params {
        x_off: u(x.offset as usize, "x")?,
        row_stride: u(params.row_stride, "row_stride")?,
        rows: params.rows as u32,
        n: params.n as u32,
        k: params.k as u32,
        idx_off: u(indices.offset as usize, "indices")?,
        val_off: u(values.offset as usize, "values")?,
        pad: 0,
    };
    let uniform = backend.uniform(&p);
    let bindings = [(0, &uniform), (1, x.buffer), (2, indices.buffer), (3, values.buffer)];
    let groups = (params.rows as u32, 1, 1);
    backend.record_pass(encoder, "topk", KERNELS, dtype, &[Dispatch { entry: "topk_row", bindings: &bindings, groups }])
}
