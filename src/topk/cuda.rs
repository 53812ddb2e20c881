//! CUDA launcher for top-k (`kernels-cuda/topk.cu`).

use super::TopkParams;
use crate::backend::cuda::{check_no_alias, launch_err, span, CudaBackend};
use crate::dtype::{DType, Element};
use crate::error::Result;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

/// Mirrors `struct TopkParams` of topk.cu (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct KernelParams {
    row_stride: i64,
    rows: i32,
    n: i32,
    k: i32,
    pad: i32,
}

// SAFETY: plain-old-data with the layout the kernel's static_assert checks.
unsafe impl cudarc::driver::DeviceRepr for KernelParams {}
const _: () = assert!(std::mem::size_of::<KernelParams>() == 24);

const THREADS: u32 = 1024;

/// Records top-k on `stream`: `indices` and `values`, `[rows, k]` each, positions ascending.
pub fn topk<T: Element>(
    backend: &CudaBackend,
    stream: &CudaStream,
    params: &TopkParams,
    x: &impl DevicePtr<T>,
    indices: &mut impl DevicePtrMut<u32>,
    values: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    backend.check_stream(stream)?;
    params.validate_buffers(x.len(), indices.len(), values.len())?;
    let name = match T::DTYPE {
        DType::F32 => "topk_f32",
        DType::F16 => "topk_f16",
        DType::Bf16 => "topk_bf16",
    };
    let f = backend.function(name)?;
    let (x_ptr, _x_sync) = x.device_ptr(stream);
    let (i_ptr, _i_sync) = indices.device_ptr_mut(stream);
    let (v_ptr, _v_sync) = values.device_ptr_mut(stream);
    check_no_alias(&[
        span::<T>("x", x_ptr, params.x_len(), false),
        span::<u32>("indices", i_ptr, params.out_len(), true),
        span::<T>("values", v_ptr, params.out_len(), true),
    ])?;
    let kp = KernelParams {
        row_stride: params.row_stride as i64,
        rows: params.rows as i32,
        n: params.n as i32,
        k: params.k as i32,
        pad: 0,
    };
    // SAFETY: buffers checked against the problem's extents; the kernel stays inside them.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&x_ptr)
            .arg(&i_ptr)
            .arg(&v_ptr)
            .arg(&kp)
            .launch(LaunchConfig {
                grid_dim: (params.rows as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(launch_err(name))?;
    }
    Ok(())
}
