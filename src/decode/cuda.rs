//! CUDA launchers for dense decode (`kernels-cuda/decode.cu`).

use super::{BufferLens, DecodeParams};
use crate::backend::cuda::{CudaBackend, CudaWorkspace};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

/// Mirrors `struct DecodeParams` of decode.cu (112 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct KernelParams {
    q_stride: [i64; 2],
    k_stride: [i64; 3],
    v_stride: [i64; 3],
    o_stride: [i64; 2],
    batch: i32,
    q_heads: i32,
    kv_heads: i32,
    head_dim: i32,
    capacity: i32,
    chunk_len: i32,
    num_splits: i32,
    scale: f32,
}

// SAFETY: plain-old-data, layout fixed by repr(C) and checked against the kernel's static_assert.
unsafe impl cudarc::driver::DeviceRepr for KernelParams {}
const _: () = assert!(std::mem::size_of::<KernelParams>() == 112);

const BLOCK: u32 = 128;

fn kernel_names(dtype: DType, head_dim: usize, vectorized: bool) -> (&'static str, &'static str) {
    macro_rules! pick {
        ($dt:literal) => {
            match (head_dim <= 128, vectorized) {
                (true, true) => (concat!("decode_partial_", $dt, "_d128_vec"), concat!("decode_merge_", $dt)),
                (true, false) => (concat!("decode_partial_", $dt, "_d128_scalar"), concat!("decode_merge_", $dt)),
                (false, true) => (concat!("decode_partial_", $dt, "_d256_vec"), concat!("decode_merge_", $dt)),
                (false, false) => (concat!("decode_partial_", $dt, "_d256_scalar"), concat!("decode_merge_", $dt)),
            }
        };
    }
    match dtype {
        DType::F32 => pick!("f32"),
        DType::F16 => pick!("f16"),
        DType::Bf16 => pick!("bf16"),
    }
}

/// Records dense decode on `stream`: `out[b, h, :] = softmax(q K^T * scale) V`
/// over the first `seq_lens[b]` cache rows. Asynchronous: nothing is waited
/// for, nothing is allocated; `workspace` serves one stream at a time.
#[allow(clippy::too_many_arguments)]
pub fn decode<T: Element>(
    backend: &CudaBackend,
    stream: &CudaStream,
    params: &DecodeParams,
    q: &impl DevicePtr<T>,
    k_cache: &impl DevicePtr<T>,
    v_cache: &impl DevicePtr<T>,
    seq_lens: &impl DevicePtr<u32>,
    out: &mut impl DevicePtrMut<T>,
    workspace: &mut CudaWorkspace,
) -> Result<()> {
    backend.check_stream(stream)?;
    params.validate_buffers(BufferLens {
        q: q.len(),
        k: k_cache.len(),
        v: v_cache.len(),
        seq_lens: seq_lens.len(),
        o: out.len(),
        workspace_bytes: workspace.bytes(),
    })?;
    let (s, l, plan) = (&params.shape, &params.layout, params.plan());
    let (q_ptr, _q_sync) = q.device_ptr(stream);
    let (k_ptr, _k_sync) = k_cache.device_ptr(stream);
    let (v_ptr, _v_sync) = v_cache.device_ptr(stream);
    let (lens_ptr, _lens_sync) = seq_lens.device_ptr(stream);
    let (o_ptr, _o_sync) = out.device_ptr_mut(stream);
    let ws_ptr = workspace.device_ptr(stream);
    let lse_ptr = ws_ptr + 4 * params.lse_offset() as u64;

    // 8-byte loads need aligned bases, strides and head dim.
    let vec = (8 / std::mem::size_of::<T>()) as u64;
    let vectorized = (s.head_dim as u64).is_multiple_of(vec)
        && [q_ptr, k_ptr, v_ptr].iter().all(|p| p % 8 == 0)
        && l.q.iter().chain(&l.k).chain(&l.v).all(|&st| (st as u64).is_multiple_of(vec));
    let (partial_name, merge_name) = kernel_names(T::DTYPE, s.head_dim, vectorized);
    let partial = backend.function(partial_name)?;
    let merge = backend.function(merge_name)?;

    let i = |x: usize| x as i64;
    let kp = KernelParams {
        q_stride: [i(l.q[0]), i(l.q[1])],
        k_stride: [i(l.k[0]), i(l.k[1]), i(l.k[2])],
        v_stride: [i(l.v[0]), i(l.v[1]), i(l.v[2])],
        o_stride: [i(l.o[0]), i(l.o[1])],
        batch: s.batch as i32,
        q_heads: s.q_heads as i32,
        kv_heads: s.kv_heads as i32,
        head_dim: s.head_dim as i32,
        capacity: s.capacity as i32,
        chunk_len: plan.chunk_len as i32,
        num_splits: plan.num_splits as i32,
        scale: params.scale,
    };
    let grid_y = (s.kv_heads * plan.head_chunks) as u32;
    let launch_err = |e| Error::device("cuda", format!("launching {partial_name}/{merge_name}: {e}"));
    // SAFETY: every pointer was checked against the layout's extent above, the
    // kernels index only inside those extents, and KernelParams matches the ABI.
    unsafe {
        stream
            .launch_builder(&partial)
            .arg(&q_ptr)
            .arg(&k_ptr)
            .arg(&v_ptr)
            .arg(&lens_ptr)
            .arg(&ws_ptr)
            .arg(&lse_ptr)
            .arg(&kp)
            .launch(LaunchConfig {
                grid_dim: (plan.num_splits as u32, grid_y, s.batch as u32),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(launch_err)?;
        stream
            .launch_builder(&merge)
            .arg(&ws_ptr)
            .arg(&lse_ptr)
            .arg(&lens_ptr)
            .arg(&o_ptr)
            .arg(&kp)
            .launch(LaunchConfig {
                grid_dim: (s.q_heads as u32, s.batch as u32, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(launch_err)?;
    }
    Ok(())
}
