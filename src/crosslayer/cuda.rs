//! CUDA launchers for cross-layer attention and slot writes (`kernels-cuda/crosslayer.cu`).

use super::{AttnBuffers, AttnParams, WriteParams};
use crate::backend::cuda::{check_no_alias, launch_err, span, CudaBackend, CudaWorkspace};
use crate::decode::cuda::{launch_split_kv, Keys, SlotKeyParams};
use crate::dtype::{DType, Element};
use crate::error::{ensure, Result};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

/// Mirrors `struct XlAttnParams` of crosslayer.cu (128 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct KernelAttn {
    q_stride: [i64; 3],
    k_stride: [i64; 3],
    v_stride: [i64; 3],
    o_stride: [i64; 3],
    q_heads: i32,
    kv_heads: i32,
    head_dim: i32,
    rows: i32,
    mask: i32,
    window: i32,
    ring: i32,
    scale: f32,
}

/// Mirrors `struct XlWriteParams` of crosslayer.cu (72 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct KernelWrite {
    new_stride: [i64; 3],
    slot_stride: [i64; 3],
    tokens: i32,
    kv_heads: i32,
    head_dim: i32,
    rows: i32,
    ring: i32,
    pad: i32,
}

// SAFETY: plain-old-data, layouts fixed by repr(C) and checked against the kernels' static_asserts.
unsafe impl cudarc::driver::DeviceRepr for KernelAttn {}
unsafe impl cudarc::driver::DeviceRepr for KernelWrite {}
const _: () = assert!(std::mem::size_of::<KernelAttn>() == 128);
const _: () = assert!(std::mem::size_of::<KernelWrite>() == 72);

const BLOCK: u32 = 128;

fn names(dtype: DType) -> (&'static str, &'static str) {
    match dtype {
        DType::F32 => ("xl_attend_f32", "xl_write_f32"),
        DType::F16 => ("xl_attend_f16", "xl_write_f16"),
        DType::Bf16 => ("xl_attend_bf16", "xl_write_bf16"),
    }
}

fn i64s(st: &[usize; 3]) -> [i64; 3] {
    [st[0] as i64, st[1] as i64, st[2] as i64]
}

/// Records attention of `queries` tokens per sequence over one slot on
/// `stream` (module docs of [`super`] for positions, masks and the ring).
/// The decode form (`queries == 1`) runs the split-KV kernels
/// (`xl_decode_partial_*`, `xl_decode_merge_*`) and needs a `workspace` of
/// [`AttnParams::workspace_bytes`]; a chunk needs none (any workspace will
/// do). Asynchronous; allocates nothing; `workspace` serves one stream at a time.
#[allow(clippy::too_many_arguments)]
pub fn attend<T: Element>(
    backend: &CudaBackend,
    stream: &CudaStream,
    params: &AttnParams,
    q: &impl DevicePtr<T>,
    k_slot: &impl DevicePtr<T>,
    v_slot: &impl DevicePtr<T>,
    q_pos: &impl DevicePtr<u32>,
    kv_lens: &impl DevicePtr<u32>,
    out: &mut impl DevicePtrMut<T>,
    workspace: &mut CudaWorkspace,
) -> Result<()> {
    backend.check_stream(stream)?;
    params.validate_buffers(AttnBuffers {
        q: q.len(),
        k: k_slot.len(),
        v: v_slot.len(),
        q_pos: q_pos.len(),
        kv_lens: kv_lens.len(),
        o: out.len(),
        workspace_bytes: workspace.bytes(),
    })?;
    let (q_ptr, _q_sync) = q.device_ptr(stream);
    let (k_ptr, _k_sync) = k_slot.device_ptr(stream);
    let (v_ptr, _v_sync) = v_slot.device_ptr(stream);
    let (pos_ptr, _pos_sync) = q_pos.device_ptr(stream);
    let (lens_ptr, _lens_sync) = kv_lens.device_ptr(stream);
    let (o_ptr, _o_sync) = out.device_ptr_mut(stream);
    // The chunk form uses no workspace; refusing an aliased one in both forms keeps one rule.
    let batch = params.shape.batch;
    check_no_alias(&[
        span::<T>("q", q_ptr, params.q_len(), false),
        span::<T>("k_slot", k_ptr, params.k_len(), false),
        span::<T>("v_slot", v_ptr, params.v_len(), false),
        span::<u32>("q_pos", pos_ptr, batch, false),
        span::<u32>("kv_lens", lens_ptr, batch, false),
        span::<T>("out", o_ptr, params.o_len(), true),
        workspace.span(),
    ])?;
    if let Some(d) = params.decode_params() {
        let sp = SlotKeyParams {
            mask: params.mask.code() as i32,
            window: params.window.unwrap_or(0) as i32,
            ring: params.ring as i32,
            pad: 0,
        };
        let keys = Keys::Slot { q_pos: pos_ptr, kv_lens: lens_ptr, params: sp };
        return launch_split_kv::<T>(backend, stream, &d, [q_ptr, k_ptr, v_ptr, o_ptr], keys, workspace);
    }
    let (s, l) = (&params.shape, &params.layout);
    let kp = KernelAttn {
        q_stride: i64s(&l.q),
        k_stride: i64s(&l.k),
        v_stride: i64s(&l.v),
        o_stride: i64s(&l.o),
        q_heads: s.q_heads as i32,
        kv_heads: s.kv_heads as i32,
        head_dim: s.head_dim as i32,
        rows: s.rows as i32,
        mask: params.mask.code() as i32,
        window: params.window.unwrap_or(0) as i32,
        ring: params.ring as i32,
        scale: params.scale,
    };
    let (name, _) = names(T::DTYPE);
    let f = backend.function(name)?;
    // SAFETY: every buffer was checked against the layout's extent, the kernel
    // indexes only inside those extents, and KernelAttn matches the ABI.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&q_ptr)
            .arg(&k_ptr)
            .arg(&v_ptr)
            .arg(&pos_ptr)
            .arg(&lens_ptr)
            .arg(&o_ptr)
            .arg(&kp)
            .launch(LaunchConfig {
                grid_dim: (s.queries as u32, s.q_heads as u32, s.batch as u32),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(launch_err(name))?;
    }
    Ok(())
}

/// Records the write of `tokens` new K/V rows per sequence into a slot
/// ([`WriteParams`]); `start` holds one position per sequence.
#[allow(clippy::too_many_arguments)]
pub fn write<T: Element>(
    backend: &CudaBackend,
    stream: &CudaStream,
    params: &WriteParams,
    new_k: &impl DevicePtr<T>,
    new_v: &impl DevicePtr<T>,
    start: &impl DevicePtr<u32>,
    k_slot: &mut impl DevicePtrMut<T>,
    v_slot: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    backend.check_stream(stream)?;
    params.validate_buffers(new_k.len(), new_v.len(), start.len(), k_slot.len(), v_slot.len())?;
    let grid_x = params.tokens * params.kv_heads;
    ensure(grid_x <= i32::MAX as usize, "tokens", || format!("tokens x kv_heads = {grid_x} exceeds i32::MAX"))?;
    let kp = KernelWrite {
        new_stride: i64s(&params.new),
        slot_stride: i64s(&params.slot),
        tokens: params.tokens as i32,
        kv_heads: params.kv_heads as i32,
        head_dim: params.head_dim as i32,
        rows: params.rows as i32,
        ring: params.ring as i32,
        pad: 0,
    };
    let (_, name) = names(T::DTYPE);
    let f = backend.function(name)?;
    let (nk_ptr, _nk_sync) = new_k.device_ptr(stream);
    let (nv_ptr, _nv_sync) = new_v.device_ptr(stream);
    let (start_ptr, _start_sync) = start.device_ptr(stream);
    let (k_ptr, _k_sync) = k_slot.device_ptr_mut(stream);
    let (v_ptr, _v_sync) = v_slot.device_ptr_mut(stream);
    check_no_alias(&[
        span::<T>("new_k", nk_ptr, params.new_len(), false),
        span::<T>("new_v", nv_ptr, params.new_len(), false),
        span::<u32>("start", start_ptr, params.batch, false),
        span::<T>("k_slot", k_ptr, params.slot_len(), true),
        span::<T>("v_slot", v_ptr, params.slot_len(), true),
    ])?;
    // SAFETY: as in `attend`; the slot rows written are < rows by construction.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&nk_ptr)
            .arg(&nv_ptr)
            .arg(&start_ptr)
            .arg(&k_ptr)
            .arg(&v_ptr)
            .arg(&kp)
            .launch(LaunchConfig {
                grid_dim: (grid_x as u32, params.batch as u32, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(launch_err(name))?;
    }
    Ok(())
}
