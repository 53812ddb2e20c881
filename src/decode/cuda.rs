//! CUDA launchers for dense decode (`kernels-cuda/decode.cu`).

use super::{BufferLens, DecodeParams};
use crate::backend::cuda::{check_no_alias, launch_err, span, CudaBackend, CudaWorkspace};
use crate::dtype::{DType, Element};
use crate::error::Result;
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

/// Mirrors `struct XlKeyParams` of crosslayer.cu (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotKeyParams {
    pub mask: i32,
    pub window: i32,
    pub ring: i32,
    pub pad: i32,
}

// SAFETY: plain-old-data, layout fixed by repr(C) and checked against the kernel's static_assert.
unsafe impl cudarc::driver::DeviceRepr for SlotKeyParams {}
const _: () = assert!(std::mem::size_of::<SlotKeyParams>() == 16);

/// Which keys each sequence attends, and so which kernel family runs.
#[derive(Clone, Copy)]
pub(crate) enum Keys {
    /// `decode_*`: positions `[0, seq_lens[b])` at rows `0..`.
    Dense { seq_lens: u64 },
    /// `xl_decode_*` / `xl_decode_ring_*` (crosslayer.cu, by `params.ring`):
    /// the slot interval of `q_pos[b]`, `kv_lens[b]`.
    Slot { q_pos: u64, kv_lens: u64, params: SlotKeyParams },
}

impl Keys {
    /// The kernel name prefix: `decode`, `xl_decode` (plain slot) or `xl_decode_ring`.
    fn family(&self) -> u8 {
        match self {
            Keys::Dense { .. } => 0,
            Keys::Slot { params, .. } if params.ring == 0 => 1,
            Keys::Slot { .. } => 2,
        }
    }
}

fn kernel_names(dtype: DType, head_dim: usize, vectorized: bool, family: u8) -> (&'static str, &'static str) {
    macro_rules! pick {
        ($pre:literal, $dt:literal) => {
            match (head_dim <= 128, vectorized) {
                (true, true) => (concat!($pre, "_partial_", $dt, "_d128_vec"), concat!($pre, "_merge_", $dt)),
                (true, false) => (concat!($pre, "_partial_", $dt, "_d128_scalar"), concat!($pre, "_merge_", $dt)),
                (false, true) => (concat!($pre, "_partial_", $dt, "_d256_vec"), concat!($pre, "_merge_", $dt)),
                (false, false) => (concat!($pre, "_partial_", $dt, "_d256_scalar"), concat!($pre, "_merge_", $dt)),
            }
        };
    }
    match (dtype, family) {
        (DType::F32, 0) => pick!("decode", "f32"),
        (DType::F16, 0) => pick!("decode", "f16"),
        (DType::Bf16, 0) => pick!("decode", "bf16"),
        (DType::F32, 1) => pick!("xl_decode", "f32"),
        (DType::F16, 1) => pick!("xl_decode", "f16"),
        (DType::Bf16, 1) => pick!("xl_decode", "bf16"),
        (DType::F32, _) => pick!("xl_decode_ring", "f32"),
        (DType::F16, _) => pick!("xl_decode_ring", "f16"),
        (DType::Bf16, _) => pick!("xl_decode_ring", "bf16"),
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
    let (q_ptr, _q_sync) = q.device_ptr(stream);
    let (k_ptr, _k_sync) = k_cache.device_ptr(stream);
    let (v_ptr, _v_sync) = v_cache.device_ptr(stream);
    let (lens_ptr, _lens_sync) = seq_lens.device_ptr(stream);
    let (o_ptr, _o_sync) = out.device_ptr_mut(stream);
    check_no_alias(&[
        span::<T>("q", q_ptr, params.q_len(), false),
        span::<T>("k_cache", k_ptr, params.k_len(), false),
        span::<T>("v_cache", v_ptr, params.v_len(), false),
        span::<u32>("seq_lens", lens_ptr, params.shape.batch, false),
        span::<T>("out", o_ptr, params.o_len(), true),
        workspace.span(),
    ])?;
    launch_split_kv::<T>(
        backend,
        stream,
        params,
        [q_ptr, k_ptr, v_ptr, o_ptr],
        Keys::Dense { seq_lens: lens_ptr },
        workspace,
    )
}

/// Records the partial and merge kernels over device addresses `[q, k, v, out]`
/// the caller has checked against `params` (and the workspace size), while
/// their sync guards are alive.
pub(crate) fn launch_split_kv<T: Element>(
    backend: &CudaBackend,
    stream: &CudaStream,
    params: &DecodeParams,
    ptrs: [u64; 4],
    keys: Keys,
    workspace: &mut CudaWorkspace,
) -> Result<()> {
    let (s, l, plan) = (&params.shape, &params.layout, params.plan());
    let [q_ptr, k_ptr, v_ptr, o_ptr] = ptrs;
    let ws_ptr = workspace.device_ptr(stream);
    let lse_ptr = ws_ptr + 4 * params.lse_offset() as u64;

    // 8-byte loads need aligned bases, strides and head dim.
    let vec = (8 / std::mem::size_of::<T>()) as u64;
    let vectorized = (s.head_dim as u64).is_multiple_of(vec)
        && [q_ptr, k_ptr, v_ptr].iter().all(|p| p % 8 == 0)
        && l.q.iter().chain(&l.k).chain(&l.v).all(|&st| (st as u64).is_multiple_of(vec));
    let (partial_name, merge_name) = kernel_names(T::DTYPE, s.head_dim, vectorized, keys.family());
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
    let partial_cfg = LaunchConfig {
        grid_dim: (plan.num_splits as u32, grid_y, s.batch as u32),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let merge_cfg =
        LaunchConfig { grid_dim: (s.q_heads as u32, s.batch as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // Dense: (q, k, v, seq_lens, part_o, part_lse, p) and (part_o, part_lse,
    // seq_lens, o, p). Slot: q_pos, kv_lens in place of seq_lens, and the key
    // params last.
    let mut pb = stream.launch_builder(&partial);
    pb.arg(&q_ptr).arg(&k_ptr).arg(&v_ptr);
    let mut mb = stream.launch_builder(&merge);
    mb.arg(&ws_ptr).arg(&lse_ptr);
    match &keys {
        Keys::Dense { seq_lens } => {
            pb.arg(seq_lens);
            mb.arg(seq_lens);
        }
        Keys::Slot { q_pos, kv_lens, .. } => {
            pb.arg(q_pos).arg(kv_lens);
            mb.arg(q_pos).arg(kv_lens);
        }
    }
    pb.arg(&ws_ptr).arg(&lse_ptr).arg(&kp);
    mb.arg(&o_ptr).arg(&kp);
    if let Keys::Slot { params: sp, .. } = &keys {
        pb.arg(sp);
        mb.arg(sp);
    }
    // SAFETY: every pointer was checked against the layout's extent by the
    // caller, the kernels index only inside those extents, the arguments match
    // the kernels' signatures above, and KernelParams/SlotKeyParams match the ABI.
    unsafe {
        pb.launch(partial_cfg).map_err(launch_err(partial_name))?;
        mb.launch(merge_cfg).map_err(launch_err(merge_name))?;
    }
    Ok(())
}
