//! CUDA launchers for blockwise attention (`kernels-cuda/blockwise.cu`).
//!
//! Every launcher records work on the caller's stream and returns: nothing is
//! waited for or allocated. `q`, `k`, `v`, `d_o` and the finalized `out` hold
//! `T`; `o`, `lse`, `delta`, `dq`, `dk`, `dv` are f32. A tensor a launcher
//! writes must not overlap any other argument in memory.

use super::{check_lens, BlockParams, BlockShape, Mask};
use crate::backend::cuda::{check_no_alias, launch_err, span, CudaBackend};
use crate::dtype::{DType, Element};
use crate::error::{ensure, Result};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

/// Mirrors `struct BwParams` of blockwise.cu (144 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct KernelParams {
    q_st: [i64; 3],
    k_st: [i64; 3],
    v_st: [i64; 3],
    o_st: [i64; 3],
    batch: i32,
    q_heads: i32,
    kv_heads: i32,
    head_dim: i32,
    q_len: i32,
    kv_len: i32,
    q0: i32,
    k0: i32,
    causal: i32,
    accumulate: i32,
    scale: f32,
    pad: i32,
}

// SAFETY: plain-old-data, layout fixed by repr(C) and checked against the kernel's static_assert.
unsafe impl cudarc::driver::DeviceRepr for KernelParams {}
const _: () = assert!(std::mem::size_of::<KernelParams>() == 144);

/// Threads per block of every kernel.
const THREADS: u32 = 128;
/// Keys per staged tile of the forward and dQ kernels; query rows per tile of the dK/dV and dQ kernels.
const TILE: usize = 32;

/// The kernel family for a head dimension: its `D_MAX` and the forward's rows
/// per thread (`RM`) and the dK/dV kernel's keys per thread (`KPT`); mirrors
/// the instantiations at the end of blockwise.cu.
#[derive(Clone, Copy)]
struct Variant {
    d_max: usize,
    rm: usize,
    kpt: usize,
}

fn variant(head_dim: usize) -> Variant {
    match head_dim {
        0..=64 => Variant { d_max: 64, rm: 4, kpt: 2 },
        65..=128 => Variant { d_max: 128, rm: 4, kpt: 2 },
        _ => Variant { d_max: 256, rm: 2, kpt: 1 },
    }
}

/// Shared-memory row stride in floats (odd, so rows fall in different banks).
fn row_stride(head_dim: usize) -> usize {
    head_dim | 1
}

/// Dynamic shared memory of each kernel, in bytes (mirrors the carve-up in blockwise.cu).
fn forward_smem(head_dim: usize) -> usize {
    let (bq, ds) = (16 * variant(head_dim).rm, row_stride(head_dim));
    4 * (bq * ds + TILE * ds + bq * (TILE + 1))
}

fn dkv_smem(head_dim: usize) -> usize {
    let (bkv, ds) = (16 * variant(head_dim).kpt, row_stride(head_dim));
    4 * (2 * bkv * ds + 2 * TILE * ds + 2 * TILE * (bkv + 1))
}

fn dq_smem(head_dim: usize) -> usize {
    let ds = row_stride(head_dim);
    4 * (4 * TILE * ds + TILE * (TILE + 1))
}

/// Query rows per block and keys per KV tile of the tensor-core forward (`kMmaRows`, `kMmaKeys`).
const MMA_ROWS: usize = 64;
const MMA_KEYS: usize = 64;

/// The tensor-core kernels, `bw_<kind>_<family>_<dtype>_d<D>` with kind
/// `forward`, `dkv` or `dq` and family `mma` (mma.sync) or `wgmma` (Hopper):
/// f16/bf16 at head_dim 64 or 128 (mirrors `BW_MMA_FORWARD`,
/// `BW_MMA_BACKWARD` and `BW_WGMMA_KERNELS`).
fn tensor_core_kernel_name(family: &str, kind: &str, dtype: DType, head_dim: usize) -> Option<&'static str> {
    macro_rules! table {
        ($(($f:literal, $k:literal)),*) => {
            match (family, kind, dtype, head_dim) {
                $(
                    ($f, $k, DType::F16, 64) => Some(concat!("bw_", $k, "_", $f, "_f16_d64")),
                    ($f, $k, DType::F16, 128) => Some(concat!("bw_", $k, "_", $f, "_f16_d128")),
                    ($f, $k, DType::Bf16, 64) => Some(concat!("bw_", $k, "_", $f, "_bf16_d64")),
                    ($f, $k, DType::Bf16, 128) => Some(concat!("bw_", $k, "_", $f, "_bf16_d128")),
                )*
                _ => None,
            }
        };
    }
    table!(("mma", "forward"), ("mma", "dkv"), ("mma", "dq"), ("wgmma", "forward"), ("wgmma", "dkv"), ("wgmma", "dq"))
}

/// Whether every row of each `(base address, strides)` tensor starts on a
/// 16-byte boundary, as the tensor-core kernels' 16-byte `cp.async` copies
/// need: base addresses 16-byte aligned and every stride a multiple of 8
/// (2-byte) elements.
fn rows_16b_aligned(tensors: &[(u64, [usize; 3])]) -> bool {
    tensors.iter().all(|(ptr, st)| ptr % 16 == 0 && st.iter().all(|s| s % 8 == 0))
}

/// The tensor-core kernel of `kind` when it applies to this dtype, head
/// dimension and the `(base address, strides)` of every 2-byte tensor it
/// reads; `None` means the f32-FMA kernel.
fn mma_kernel(kind: &str, dtype: DType, head_dim: usize, tensors: &[(u64, [usize; 3])]) -> Option<&'static str> {
    tensor_core_kernel_name("mma", kind, dtype, head_dim).filter(|_| rows_16b_aligned(tensors))
}

/// The Hopper kernel of `kind` where the mma.sync one applies and the backend
/// runs Hopper kernels (their code exists only as sm_90a SASS).
fn wgmma_kernel(backend: &CudaBackend, kind: &str, dtype: DType, head_dim: usize) -> Option<&'static str> {
    tensor_core_kernel_name("wgmma", kind, dtype, head_dim).filter(|_| backend.hopper_kernels())
}

/// Query rows per block, keys per KV tile and threads of the Hopper forward
/// (`kWgRows`, `kWgKeys`, `kWgThreads`).
const WGMMA_ROWS: usize = 128;
const WGMMA_KEYS: usize = 128;
const WGMMA_THREADS: u32 = 256;

/// Shared memory of the Hopper forward: the Q tile and two stages of K and V
/// tiles of `head_dim` 2-byte columns, plus 1 KiB to align them to the
/// 1024-byte swizzle atoms (mirrors blockwise.cu).
fn wgmma_forward_smem(head_dim: usize) -> usize {
    1024 + 2 * (WGMMA_ROWS + 2 * 2 * WGMMA_KEYS) * head_dim
}

/// Shared memory of the Hopper dK/dV kernel: 128-key K and V tiles, two
/// stages of Q and dO steps and of the steps' f32 (lse, delta), 1 KiB of
/// alignment (mirrors blockwise.cu).
fn wgmma_dkv_smem(head_dim: usize) -> usize {
    let bq = mma_dkv_q_rows(head_dim);
    1024 + 2 * (2 * WGMMA_ROWS + 2 * 2 * bq) * head_dim + 4 * 2 * 2 * bq
}

/// Keys per KV tile of the Hopper dQ kernel.
const WGMMA_DQ_KEYS: usize = 64;

/// Shared memory of the Hopper dQ kernel: 128-row Q and dO tiles and two
/// stages of 64-key K and V tiles, 1 KiB of alignment (mirrors blockwise.cu).
fn wgmma_dq_smem(head_dim: usize) -> usize {
    1024 + 2 * (2 * WGMMA_ROWS + 2 * 2 * WGMMA_DQ_KEYS) * head_dim
}

/// Shared memory of the tensor-core forward: the Q tile and two stages of K
/// and V tiles, rows of `head_dim + 8` 2-byte elements (mirrors blockwise.cu).
fn mma_forward_smem(head_dim: usize) -> usize {
    2 * (MMA_ROWS + 2 * 2 * MMA_KEYS) * (head_dim + 8)
}

/// Query rows per step of the tensor-core dK/dV kernels, mma.sync and wgmma (`DkvMma<D>::kQRows`).
fn mma_dkv_q_rows(head_dim: usize) -> usize {
    if head_dim == 64 {
        64
    } else {
        32
    }
}

/// Shared memory of the tensor-core dK/dV kernel: the K and V tiles, two
/// stages of Q and dO steps (rows of `head_dim + 8` 2-byte elements) and two
/// stages of the steps' f32 (lse, delta) (mirrors blockwise.cu).
fn mma_dkv_smem(head_dim: usize) -> usize {
    let bq = mma_dkv_q_rows(head_dim);
    2 * (2 * MMA_KEYS + 2 * 2 * bq) * (head_dim + 8) + 4 * 2 * 2 * bq
}

/// Shared memory of the tensor-core dQ kernel: the Q and dO tiles and two
/// stages of K and V tiles (mirrors blockwise.cu).
fn mma_dq_smem(head_dim: usize) -> usize {
    2 * (2 * MMA_ROWS + 2 * 2 * MMA_KEYS) * (head_dim + 8)
}

fn dtype_name(dtype: DType) -> &'static str {
    dtype.name()
}

/// Kernel names are `bw_<kind>_<dtype>` or `bw_<kind>_<dtype>_d<D_MAX>`; the
/// names are static strings for the backend's function cache.
fn kernel_name(kind: &str, dtype: DType, d_max: Option<usize>) -> &'static str {
    macro_rules! table {
        ($($k:literal),*) => {
            match (kind, dtype_name(dtype), d_max) {
                $(
                    ($k, "f32", None) => concat!("bw_", $k, "_f32"),
                    ($k, "f16", None) => concat!("bw_", $k, "_f16"),
                    ($k, "bf16", None) => concat!("bw_", $k, "_bf16"),
                    ($k, "f32", Some(64)) => concat!("bw_", $k, "_f32_d64"),
                    ($k, "f32", Some(128)) => concat!("bw_", $k, "_f32_d128"),
                    ($k, "f32", Some(_)) => concat!("bw_", $k, "_f32_d256"),
                    ($k, "f16", Some(64)) => concat!("bw_", $k, "_f16_d64"),
                    ($k, "f16", Some(128)) => concat!("bw_", $k, "_f16_d128"),
                    ($k, "f16", Some(_)) => concat!("bw_", $k, "_f16_d256"),
                    ($k, _, Some(64)) => concat!("bw_", $k, "_bf16_d64"),
                    ($k, _, Some(128)) => concat!("bw_", $k, "_bf16_d128"),
                    ($k, _, Some(_)) => concat!("bw_", $k, "_bf16_d256"),
                    ($k, _, None) => concat!("bw_", $k, "_bf16"),
                )*
                _ => "bw_unknown",
            }
        };
    }
    table!("forward", "finalize", "prepass", "dkv", "dq")
}

fn kernel_params(p: &BlockParams, accumulate: bool) -> KernelParams {
    let (s, l) = (&p.shape, &p.layout);
    let st = |x: &[usize; 3]| [x[0] as i64, x[1] as i64, x[2] as i64];
    KernelParams {
        q_st: st(&l.q),
        k_st: st(&l.k),
        v_st: st(&l.v),
        o_st: st(&l.o),
        batch: s.batch as i32,
        q_heads: s.q_heads as i32,
        kv_heads: s.kv_heads as i32,
        head_dim: s.head_dim as i32,
        q_len: s.q_len as i32,
        kv_len: s.kv_len as i32,
        q0: p.q0 as i32,
        k0: p.k0 as i32,
        causal: (p.mask == Mask::Causal) as i32,
        accumulate: accumulate as i32,
        scale: p.scale,
        pad: 0,
    }
}

fn shape_params(s: &BlockShape) -> KernelParams {
    let p = BlockParams::new(*s, Mask::None);
    kernel_params(&p, false)
}

fn check_grid(dims: [(usize, &'static str); 2]) -> Result<()> {
    for (n, arg) in dims {
        ensure(n <= 65535, arg, || format!("needs {n} blocks along grid y/z, CUDA allows 65535"))?;
    }
    Ok(())
}

fn flat_grid(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).max(1) as u32
}

/// Records the forward of one (Q block, KV block) pair into f32 `o`
/// `[B, Hq, q_len, D]` and `lse` `[B, Hq, q_len]` (`-inf` and 0 for rows
/// that see no key); with `accumulate` the pair is merged into `(o, lse)`.
/// f16/bf16 at head_dim 64 or 128 with every Q/K/V row 16-byte aligned run on
/// tensor cores (`wgmma` where [`CudaBackend::hopper_kernels`], else `mma.sync`);
/// everything else on the f32-FMA kernel.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Element>(
    backend: &CudaBackend,
    stream: &CudaStream,
    params: &BlockParams,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    o: &mut impl DevicePtrMut<f32>,
    lse: &mut impl DevicePtrMut<f32>,
    accumulate: bool,
) -> Result<()> {
    backend.check_stream(stream)?;
    params.validate()?;
    check_lens(&params.forward_needs(), &[q.len(), k.len(), v.len(), o.len(), lse.len()])?;
    let s = &params.shape;
    let var = variant(s.head_dim);
    let bq = 16 * var.rm;
    check_grid([(s.q_heads, "q_heads"), (s.batch, "batch")])?;
    let (q_ptr, _q_sync) = q.device_ptr(stream);
    let (k_ptr, _k_sync) = k.device_ptr(stream);
    let (v_ptr, _v_sync) = v.device_ptr(stream);
    let (o_ptr, _o_sync) = o.device_ptr_mut(stream);
    let (lse_ptr, _lse_sync) = lse.device_ptr_mut(stream);
    check_no_alias(&[
        span::<T>("q", q_ptr, q.len(), false),
        span::<T>("k", k_ptr, k.len(), false),
        span::<T>("v", v_ptr, v.len(), false),
        span::<f32>("o", o_ptr, s.o_elems(), true),
        span::<f32>("lse", lse_ptr, s.lse_elems(), true),
    ])?;
    // Tensor cores where they apply (wgmma on Hopper, else mma.sync), else f32 FMA.
    let l = &params.layout;
    let mma = mma_kernel("forward", T::DTYPE, s.head_dim, &[(q_ptr, l.q), (k_ptr, l.k), (v_ptr, l.v)]);
    let wgmma = mma.and_then(|_| wgmma_kernel(backend, "forward", T::DTYPE, s.head_dim));
    // (kernel, its shared memory now, the most any launch of it uses, rows per block, threads):
    // a tensor-core kernel has one head_dim, an FMA kernel serves head dims up to d_max.
    let (name, smem, max_smem, rows_per_block, threads) = match (wgmma, mma) {
        (Some(name), _) => {
            let smem = wgmma_forward_smem(s.head_dim);
            (name, smem, smem, WGMMA_ROWS, WGMMA_THREADS)
        }
        (None, Some(name)) => {
            let smem = mma_forward_smem(s.head_dim);
            (name, smem, smem, MMA_ROWS, THREADS)
        }
        (None, None) => {
            let name = kernel_name("forward", T::DTYPE, Some(var.d_max));
            (name, forward_smem(s.head_dim), forward_smem(var.d_max), bq, THREADS)
        }
    };
    let f = backend.function_with_smem(name, max_smem)?;
    let kp = kernel_params(params, accumulate);
    // SAFETY: every pointer was checked against the layout's extent above, the
    // kernel indexes only inside those extents, and KernelParams matches the ABI.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&q_ptr)
            .arg(&k_ptr)
            .arg(&v_ptr)
            .arg(&o_ptr)
            .arg(&lse_ptr)
            .arg(&kp)
            .launch(LaunchConfig {
                grid_dim: (s.q_len.div_ceil(rows_per_block) as u32, s.q_heads as u32, s.batch as u32),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: smem as u32,
            })
            .map_err(launch_err(name))?;
    }
    Ok(())
}

/// Records the merge of the partial `(o_b, lse_b)` into `(o, lse)` in place.
pub fn merge(
    backend: &CudaBackend,
    stream: &CudaStream,
    shape: &BlockShape,
    o: &mut impl DevicePtrMut<f32>,
    lse: &mut impl DevicePtrMut<f32>,
    o_b: &impl DevicePtr<f32>,
    lse_b: &impl DevicePtr<f32>,
) -> Result<()> {
    backend.check_stream(stream)?;
    shape.validate()?;
    check_lens(&shape.merge_needs(), &[o.len(), lse.len(), o_b.len(), lse_b.len()])?;
    let (o_ptr, _o_sync) = o.device_ptr_mut(stream);
    let (lse_ptr, _lse_sync) = lse.device_ptr_mut(stream);
    let (ob_ptr, _ob_sync) = o_b.device_ptr(stream);
    let (lseb_ptr, _lseb_sync) = lse_b.device_ptr(stream);
    check_no_alias(&[
        span::<f32>("o", o_ptr, shape.o_elems(), true),
        span::<f32>("lse", lse_ptr, shape.lse_elems(), true),
        span::<f32>("o_b", ob_ptr, shape.o_elems(), false),
        span::<f32>("lse_b", lseb_ptr, shape.lse_elems(), false),
    ])?;
    let name = "bw_merge";
    let f = backend.function(name)?;
    let kp = shape_params(shape);
    // SAFETY: as in `forward`.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&o_ptr)
            .arg(&lse_ptr)
            .arg(&ob_ptr)
            .arg(&lseb_ptr)
            .arg(&kp)
            .launch(LaunchConfig {
                grid_dim: (flat_grid(shape.lse_elems()), 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(launch_err(name))?;
    }
    Ok(())
}

/// Records the cast of the final f32 `o` into `out` (strided as
/// `params.layout.o`); rows whose `lse` is `-inf` become exactly 0.
pub fn finalize<T: Element>(
    backend: &CudaBackend,
    stream: &CudaStream,
    params: &BlockParams,
    o: &impl DevicePtr<f32>,
    lse: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    backend.check_stream(stream)?;
    params.validate()?;
    check_lens(&params.finalize_needs(), &[o.len(), lse.len(), out.len()])?;
    let s = &params.shape;
    let (o_ptr, _o_sync) = o.device_ptr(stream);
    let (lse_ptr, _lse_sync) = lse.device_ptr(stream);
    let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
    check_no_alias(&[
        span::<f32>("o", o_ptr, s.o_elems(), false),
        span::<f32>("lse", lse_ptr, s.lse_elems(), false),
        span::<T>("out", out_ptr, params.o_elems(), true),
    ])?;
    let name = kernel_name("finalize", T::DTYPE, None);
    let f = backend.function(name)?;
    let kp = kernel_params(params, false);
    // SAFETY: as in `forward`.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&o_ptr)
            .arg(&lse_ptr)
            .arg(&out_ptr)
            .arg(&kp)
            .launch(LaunchConfig {
                grid_dim: (flat_grid(s.o_elems()), 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(launch_err(name))?;
    }
    Ok(())
}

/// Records the backward pre-pass `delta = rowsum(d_o * o)`.
pub fn backward_prepass<T: Element>(
    backend: &CudaBackend,
    stream: &CudaStream,
    params: &BlockParams,
    o: &impl DevicePtr<f32>,
    d_o: &impl DevicePtr<T>,
    delta: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    backend.check_stream(stream)?;
    params.validate()?;
    check_lens(&params.prepass_needs(), &[o.len(), d_o.len(), delta.len()])?;
    let s = &params.shape;
    let (o_ptr, _o_sync) = o.device_ptr(stream);
    let (do_ptr, _do_sync) = d_o.device_ptr(stream);
    let (delta_ptr, _delta_sync) = delta.device_ptr_mut(stream);
    check_no_alias(&[
        span::<f32>("o", o_ptr, s.o_elems(), false),
        span::<T>("d_o", do_ptr, params.o_elems(), false),
        span::<f32>("delta", delta_ptr, s.lse_elems(), true),
    ])?;
    let name = kernel_name("prepass", T::DTYPE, None);
    let f = backend.function(name)?;
    let kp = kernel_params(params, false);
    // SAFETY: as in `forward`.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&o_ptr)
            .arg(&do_ptr)
            .arg(&delta_ptr)
            .arg(&kp)
            .launch(LaunchConfig {
                // One warp per row.
                grid_dim: (s.lse_elems().div_ceil(THREADS as usize / 32) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(launch_err(name))?;
    }
    Ok(())
}

/// Records the backward of one pair given the final `lse`, `d_o` and `delta`
/// (from [`backward_prepass`]), accumulating (`+=`) into f32 `dq`
/// `[B, Hq, q_len, D]` and `dk`/`dv` `[B, Hkv, kv_len, D]`: one kernel per KV
/// tile for dK/dV and one per Q tile for dQ, so no element has two writers.
/// f16/bf16 at head_dim 64 or 128 with every Q/K/V/dO row 16-byte aligned run
/// on tensor cores (`wgmma` where [`CudaBackend::hopper_kernels`], else
/// `mma.sync`); everything else on the f32-FMA kernels.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element>(
    backend: &CudaBackend,
    stream: &CudaStream,
    params: &BlockParams,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    d_o: &impl DevicePtr<T>,
    lse: &impl DevicePtr<f32>,
    delta: &impl DevicePtr<f32>,
    dq: &mut impl DevicePtrMut<f32>,
    dk: &mut impl DevicePtrMut<f32>,
    dv: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    backend.check_stream(stream)?;
    params.validate()?;
    check_lens(
        &params.backward_needs(),
        &[q.len(), k.len(), v.len(), d_o.len(), lse.len(), delta.len(), dq.len(), dk.len(), dv.len()],
    )?;
    let s = &params.shape;
    check_grid([(s.q_heads, "q_heads"), (s.batch, "batch")])?;
    let (q_ptr, _q_sync) = q.device_ptr(stream);
    let (k_ptr, _k_sync) = k.device_ptr(stream);
    let (v_ptr, _v_sync) = v.device_ptr(stream);
    let (do_ptr, _do_sync) = d_o.device_ptr(stream);
    let (lse_ptr, _lse_sync) = lse.device_ptr(stream);
    let (delta_ptr, _delta_sync) = delta.device_ptr(stream);
    let (dq_ptr, _dq_sync) = dq.device_ptr_mut(stream);
    let (dk_ptr, _dk_sync) = dk.device_ptr_mut(stream);
    let (dv_ptr, _dv_sync) = dv.device_ptr_mut(stream);
    check_no_alias(&[
        span::<T>("q", q_ptr, q.len(), false),
        span::<T>("k", k_ptr, k.len(), false),
        span::<T>("v", v_ptr, v.len(), false),
        span::<T>("d_o", do_ptr, d_o.len(), false),
        span::<f32>("lse", lse_ptr, s.lse_elems(), false),
        span::<f32>("delta", delta_ptr, s.lse_elems(), false),
        span::<f32>("dq", dq_ptr, s.o_elems(), true),
        span::<f32>("dk", dk_ptr, s.kv_grad_elems(), true),
        span::<f32>("dv", dv_ptr, s.kv_grad_elems(), true),
    ])?;
    let var = variant(s.head_dim);
    let kp = kernel_params(params, false);
    // The tensor-core pair where it applies (dO read with the `o` strides; wgmma on Hopper, else
    // mma.sync), else the f32-FMA pair: (dK/dV kernel, its shared memory, keys per block),
    // (dQ kernel, its shared memory, rows per block), threads per block.
    let l = &params.layout;
    let rows_2b = [(q_ptr, l.q), (k_ptr, l.k), (v_ptr, l.v), (do_ptr, l.o)];
    let d = s.head_dim;
    let mma = mma_kernel("dkv", T::DTYPE, d, &rows_2b).zip(mma_kernel("dq", T::DTYPE, d, &rows_2b));
    let wgmma =
        mma.and_then(|_| wgmma_kernel(backend, "dkv", T::DTYPE, d).zip(wgmma_kernel(backend, "dq", T::DTYPE, d)));
    // Shared memory as in `forward`: (now, the most any launch of the kernel uses).
    let ((dkv_name, dkv_bytes, dkv_max, bkv), (dq_name, dq_bytes, dq_max, bq), threads) = match (wgmma, mma) {
        (Some((dkv, dq)), _) => {
            let (a, b) = (wgmma_dkv_smem(d), wgmma_dq_smem(d));
            ((dkv, a, a, WGMMA_ROWS), (dq, b, b, WGMMA_ROWS), WGMMA_THREADS)
        }
        (None, Some((dkv, dq))) => {
            let (a, b) = (mma_dkv_smem(d), mma_dq_smem(d));
            ((dkv, a, a, MMA_KEYS), (dq, b, b, MMA_ROWS), THREADS)
        }
        (None, None) => (
            (kernel_name("dkv", T::DTYPE, Some(var.d_max)), dkv_smem(d), dkv_smem(var.d_max), 16 * var.kpt),
            (kernel_name("dq", T::DTYPE, Some(var.d_max)), dq_smem(d), dq_smem(var.d_max), TILE),
            THREADS,
        ),
    };
    let dkv_f = backend.function_with_smem(dkv_name, dkv_max)?;
    let dq_f = backend.function_with_smem(dq_name, dq_max)?;
    // SAFETY: as in `forward`.
    unsafe {
        stream
            .launch_builder(&dkv_f)
            .arg(&q_ptr)
            .arg(&k_ptr)
            .arg(&v_ptr)
            .arg(&do_ptr)
            .arg(&lse_ptr)
            .arg(&delta_ptr)
            .arg(&dk_ptr)
            .arg(&dv_ptr)
            .arg(&kp)
            .launch(LaunchConfig {
                grid_dim: (s.kv_len.div_ceil(bkv) as u32, s.kv_heads as u32, s.batch as u32),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: dkv_bytes as u32,
            })
            .map_err(launch_err(dkv_name))?;
        stream
            .launch_builder(&dq_f)
            .arg(&q_ptr)
            .arg(&k_ptr)
            .arg(&v_ptr)
            .arg(&do_ptr)
            .arg(&lse_ptr)
            .arg(&delta_ptr)
            .arg(&dq_ptr)
            .arg(&kp)
            .launch(LaunchConfig {
                grid_dim: (s.q_len.div_ceil(bq) as u32, s.q_heads as u32, s.batch as u32),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: dq_bytes as u32,
            })
            .map_err(launch_err(dq_name))?;
    }
    Ok(())
}
