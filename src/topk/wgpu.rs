//! WGSL launcher for top-k (`kernels-wgsl/topk.wgsl`).

use super::TopkParams;
use crate::backend::wgpu::{check_distinct_buffers, WgpuBackend, WgpuTensor};
use crate::dtype::DType;
use crate::error::{Error, Result};

const FILE: &str = "topk.wgsl";
const SOURCE: &str = include_str!("../../kernels-wgsl/topk.wgsl");

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
    let u = |v: usize, arg: &str| -> Result<u32> {
        u32::try_from(v).map_err(|_| Error::invalid(arg, format!("{v} does not fit the kernel's 32-bit indices")))
    };
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
    let pipeline = backend.pipeline(FILE, SOURCE, "topk_row", dtype)?;
    let bind = backend.device().create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("topk_row"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 1, resource: x.buffer.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 2, resource: indices.buffer.as_entire_binding() },
            wgpu::BindGroupEntry { binding: 3, resource: values.buffer.as_entire_binding() },
        ],
    });
    let mut pass =
        encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("topk"), timestamp_writes: None });
    pass.set_pipeline(&pipeline);
    pass.set_bind_group(0, &bind, &[]);
    pass.dispatch_workgroups(params.rows as u32, 1, 1);
    Ok(())
}
