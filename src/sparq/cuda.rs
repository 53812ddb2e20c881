//! CUDA side of SparQ (`kernels-cuda/sparq.cu`): the cache ([`SparqCache`]:
//! bulk fill, append) and the decode step ([`sparq`]: scores, select, gather,
//! merge, recorded on one stream over the caller's workspace).

use super::{GqaMode, SparqCacheShape, SparqParams};
use crate::backend::cuda::{check_no_alias, launch_err, span, CudaBackend, CudaWorkspace};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Mirrors `struct frugal::sparq::StepParams` of sparq.cu (160 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct StepParams {
    q_stride: [i64; 2],
    o_stride: [i64; 2],
    /// Workspace offsets in 32-bit words: logits, norm, lse, keys, indices, partials.
    offsets: [i64; 6],
    batch: i32,
    q_heads: i32,
    kv_heads: i32,
    head_dim: i32,
    capacity: i32,
    groups: i32,
    heads_per_block: i32,
    head_chunks: i32,
    r: i32,
    k: i32,
    window: i32,
    reallocate: i32,
    shared: i32,
    score_chunk: i32,
    score_splits: i32,
    gather_chunk: i32,
    gather_splits: i32,
    k_cap: i32,
    scale: f32,
    pad: i32,
}

/// Mirrors `struct frugal::sparq::CacheParams` of sparq.cu (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CacheParams {
    k_stride: [i64; 3],
    v_stride: [i64; 3],
    batch: i32,
    kv_heads: i32,
    head_dim: i32,
    capacity: i32,
}

// SAFETY: plain-old-data, layouts fixed by repr(C) and checked against the kernels' static_asserts.
unsafe impl DeviceRepr for StepParams {}
unsafe impl DeviceRepr for CacheParams {}
const _: () = assert!(std::mem::size_of::<StepParams>() == 160);
const _: () = assert!(std::mem::size_of::<CacheParams>() == 64);

/// Block sizes compiled into the kernels.
const SCORE_THREADS: u32 = 256;
const SELECT_THREADS: u32 = 1024;
const GATHER_THREADS: u32 = 128;
const MERGE_THREADS: u32 = 128;
const FILL_TILE: u32 = 32;
const FILL_ROWS: u32 = 8;
const MEAN_THREADS: u32 = 256;
const APPEND_THREADS: u32 = 256;
/// Kernel limits the plan must respect.
const MAX_HEADS_PER_BLOCK: usize = 8;
const MAX_GATHER_CHUNK: usize = 256;

struct Names {
    scores_vec: &'static str,
    scores_scalar: &'static str,
    /// Indexed by `[head_dim > 128][vectorized]`.
    gather: [[&'static str; 2]; 2],
    merge: &'static str,
    fill: &'static str,
    fill_mean: &'static str,
    append: &'static str,
}

fn names(dtype: DType) -> Names {
    macro_rules! names {
        ($dt:literal) => {
            Names {
                scores_vec: concat!("sparq_scores_", $dt, "_vec"),
                scores_scalar: concat!("sparq_scores_", $dt, "_scalar"),
                gather: [
                    [concat!("sparq_gather_", $dt, "_d128_scalar"), concat!("sparq_gather_", $dt, "_d128_vec")],
                    [concat!("sparq_gather_", $dt, "_d256_scalar"), concat!("sparq_gather_", $dt, "_d256_vec")],
                ],
                merge: concat!("sparq_merge_", $dt),
                fill: concat!("sparq_fill_", $dt),
                fill_mean: concat!("sparq_fill_mean_", $dt),
                append: concat!("sparq_append_", $dt),
            }
        };
    }
    match dtype {
        DType::F32 => names!("f32"),
        DType::F16 => names!("f16"),
        DType::Bf16 => names!("bf16"),
    }
}

const SELECT: &str = "sparq_select";

fn launch_cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: 0 }
}

/// A zero-filled device buffer of `len` elements of `T`.
fn zeros<T: Element>(stream: &Arc<CudaStream>, len: usize) -> Result<CudaSlice<T>> {
    let err = CudaBackend::device_error;
    // SAFETY: the memory is zero-filled on `stream` before anything can read
    // it (every later use is ordered after this on the stream, or waits for it
    // through cudarc's events), and all-zero bits are a valid f32 / f16 / bf16.
    let mut buf = unsafe { stream.alloc::<T>(len) }.map_err(err)?;
    let bytes = buf.num_bytes();
    {
        let (ptr, _sync) = buf.device_ptr_mut(stream);
        // SAFETY: `ptr` addresses the `bytes` bytes that `buf` owns.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, bytes, stream.cu_stream()) }.map_err(err)?;
    }
    Ok(buf)
}

/// Borrowed (k, kt, v, mean, lens) of a [`SparqCache`].
pub type CacheBuffers<'a, T> =
    (&'a CudaSlice<T>, &'a CudaSlice<T>, &'a CudaSlice<T>, &'a CudaSlice<f32>, &'a CudaSlice<u32>);

/// A SparQ cache resident on one CUDA context: per sequence and kv head, K
/// row-major `[capacity, head_dim]`, K transposed `[head_dim, capacity]`,
/// V row-major, the f32 mean of the V rows, and the lengths (device and host
/// copies; the cache is their only writer).
pub struct SparqCache<T: Element> {
    shape: SparqCacheShape,
    k: CudaSlice<T>,
    kt: CudaSlice<T>,
    v: CudaSlice<T>,
    mean: CudaSlice<f32>,
    lens: CudaSlice<u32>,
    host_lens: Vec<u32>,
}

impl<T: Element> SparqCache<T> {
    /// Empty cache (all lengths 0), zero-initialised device buffers. Validates the shape.
    pub fn new(stream: &Arc<CudaStream>, shape: SparqCacheShape) -> Result<Self> {
        shape.validate()?;
        let n = shape.kv_len();
        Ok(SparqCache {
            shape,
            k: zeros(stream, n)?,
            kt: zeros(stream, n)?,
            v: zeros(stream, n)?,
            mean: stream.alloc_zeros::<f32>(shape.mean_len()).map_err(CudaBackend::device_error)?,
            lens: stream.alloc_zeros::<u32>(shape.batch).map_err(CudaBackend::device_error)?,
            host_lens: vec![0; shape.batch],
        })
    }

    pub fn shape(&self) -> &SparqCacheShape {
        &self.shape
    }

    /// Host copy of the lengths (the cache is their only writer).
    pub fn seq_lens(&self) -> &[u32] {
        &self.host_lens
    }

    /// (k, kt, v, mean, lens), for tests that read the cache back.
    pub fn buffers(&self) -> CacheBuffers<'_, T> {
        (&self.k, &self.kt, &self.v, &self.mean, &self.lens)
    }

    /// Refuses a stream of another context than the one holding the buffers.
    fn check_context(&self, stream: &CudaStream) -> Result<()> {
        if self.k.context().cu_ctx() == stream.context().cu_ctx() {
            Ok(())
        } else {
            Err(Error::invalid("cache", "lives in a different CUDA context than the stream"))
        }
    }

    fn cache_params(&self, k_strides: [usize; 3], v_strides: [usize; 3]) -> CacheParams {
        let s = &self.shape;
        let i = |st: [usize; 3]| st.map(|x| x as i64);
        CacheParams {
            k_stride: i(k_strides),
            v_stride: i(v_strides),
            batch: s.batch as i32,
            kv_heads: s.kv_heads as i32,
            head_dim: s.head_dim as i32,
            capacity: s.capacity as i32,
        }
    }

    /// Bulk fill from an engine's K/V: `k[b, g, j, :]` at `b * k_strides[0] +
    /// g * k_strides[1] + j * k_strides[2]` (elements, head dim contiguous),
    /// same for `v`. Sets the lengths to `seq_lens`, writes K, K^T and V for
    /// the positions `j < len` and the f32 mean of those V rows (0 when
    /// `len == 0`). Asynchronous on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn fill(
        &mut self,
        backend: &CudaBackend,
        stream: &CudaStream,
        k: &impl DevicePtr<T>,
        k_strides: [usize; 3],
        v: &impl DevicePtr<T>,
        v_strides: [usize; 3],
        seq_lens: &[u32],
    ) -> Result<()> {
        backend.check_stream(stream)?;
        self.check_context(stream)?;
        super::validate_fill(&self.shape, (k.len(), k_strides), (v.len(), v_strides), seq_lens)?;
        let s = self.shape;
        let nm = names(T::DTYPE);
        let (fill, mean) = (backend.function(nm.fill)?, backend.function(nm.fill_mean)?);
        let kp = self.cache_params(k_strides, v_strides);
        let longest = seq_lens.iter().copied().max().unwrap_or(0);

        let (k_ptr, _k_sync) = k.device_ptr(stream);
        let (v_ptr, _v_sync) = v.device_ptr(stream);
        let (kc_ptr, _kc_sync) = self.k.device_ptr_mut(stream);
        let (kt_ptr, _kt_sync) = self.kt.device_ptr_mut(stream);
        let (vc_ptr, _vc_sync) = self.v.device_ptr_mut(stream);
        let (mean_ptr, _mean_sync) = self.mean.device_ptr_mut(stream);
        let (lens_ptr, _lens_sync) = self.lens.device_ptr_mut(stream);
        stream.context().bind_to_thread().map_err(CudaBackend::device_error)?;
        // SAFETY: `lens` holds `batch` u32 and validate_fill checked seq_lens.len() == batch.
        // A copy from pageable memory returns once the source was staged, so the slice may go.
        unsafe { cudarc::driver::result::memcpy_htod_async(lens_ptr, seq_lens, stream.cu_stream()) }
            .map_err(CudaBackend::device_error)?;
        // SAFETY: validate_fill checked that every position j < seq_lens[b] of the
        // strided K/V lies inside `k` / `v`; the cache buffers hold the shape;
        // the kernels read the lengths just copied and stay below them.
        unsafe {
            if longest > 0 {
                let grid = ((longest as usize).div_ceil(FILL_TILE as usize) as u32, s.kv_heads as u32, s.batch as u32);
                stream
                    .launch_builder(&fill)
                    .arg(&k_ptr)
                    .arg(&v_ptr)
                    .arg(&kc_ptr)
                    .arg(&kt_ptr)
                    .arg(&vc_ptr)
                    .arg(&lens_ptr)
                    .arg(&kp)
                    .launch(launch_cfg(grid, (FILL_TILE, FILL_ROWS, 1)))
                    .map_err(launch_err(nm.fill))?;
            }
            stream
                .launch_builder(&mean)
                .arg(&vc_ptr)
                .arg(&mean_ptr)
                .arg(&lens_ptr)
                .arg(&kp)
                .launch(launch_cfg((s.kv_heads as u32, s.batch as u32, 1), (MEAN_THREADS, 1, 1)))
                .map_err(launch_err(nm.fill_mean))?;
        }
        self.host_lens.copy_from_slice(seq_lens);
        Ok(())
    }

    /// Appends one token to every sequence: `k_new` / `v_new` are
    /// `[batch, kv_heads, head_dim]` contiguous. Writes position `len[b]` of K,
    /// K^T and V, updates the mean, bumps the lengths (device and host).
    /// `Err` naming `cache` when a sequence is full.
    pub fn append(
        &mut self,
        backend: &CudaBackend,
        stream: &CudaStream,
        k_new: &impl DevicePtr<T>,
        v_new: &impl DevicePtr<T>,
    ) -> Result<()> {
        backend.check_stream(stream)?;
        self.check_context(stream)?;
        super::validate_append(&self.shape, &self.host_lens, k_new.len(), v_new.len())?;
        let nm = names(T::DTYPE);
        let f = backend.function(nm.append)?;
        let kp = self.cache_params([0; 3], [0; 3]);
        let (kn_ptr, _kn_sync) = k_new.device_ptr(stream);
        let (vn_ptr, _vn_sync) = v_new.device_ptr(stream);
        let (kc_ptr, _kc_sync) = self.k.device_ptr_mut(stream);
        let (kt_ptr, _kt_sync) = self.kt.device_ptr_mut(stream);
        let (vc_ptr, _vc_sync) = self.v.device_ptr_mut(stream);
        let (mean_ptr, _mean_sync) = self.mean.device_ptr_mut(stream);
        let (lens_ptr, _lens_sync) = self.lens.device_ptr_mut(stream);
        // SAFETY: k_new / v_new hold [batch, kv_heads, head_dim] (validated), no
        // sequence is full (validated against the exact host copy of the
        // lengths), so position len[b] < capacity lies inside every cache buffer.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&kn_ptr)
                .arg(&vn_ptr)
                .arg(&kc_ptr)
                .arg(&kt_ptr)
                .arg(&vc_ptr)
                .arg(&mean_ptr)
                .arg(&lens_ptr)
                .arg(&kp)
                .launch(launch_cfg((self.shape.batch as u32, 1, 1), (APPEND_THREADS, 1, 1)))
                .map_err(launch_err(nm.append))?;
        }
        for l in &mut self.host_lens {
            *l += 1;
        }
        Ok(())
    }
}

/// One SparQ decode step recorded on `stream`: `q[b, h, :]` at
/// `params.q_strides`, `out[b, h, :]` at `params.o_strides`, over the content
/// of `cache`. Asynchronous: nothing is waited for, nothing is allocated;
/// `workspace` (at least `params.workspace_bytes()`) serves one stream at a time.
pub fn sparq<T: Element>(
    backend: &CudaBackend,
    stream: &CudaStream,
    params: &SparqParams,
    cache: &SparqCache<T>,
    q: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
    workspace: &mut CudaWorkspace,
) -> Result<()> {
    backend.check_stream(stream)?;
    params.validate_step(cache.shape(), q.len(), out.len(), workspace.bytes())?;
    cache.check_context(stream)?;
    let (s, c, plan) = (&params.cache, &params.config, params.plan());
    if plan.heads_per_block > MAX_HEADS_PER_BLOCK || plan.gather_chunk > MAX_GATHER_CHUNK || plan.score_chunk % 4 != 0 {
        return Err(Error::device("cuda", format!("the SparQ plan {plan:?} exceeds the kernels' limits")));
    }

    let (q_ptr, _q_sync) = q.device_ptr(stream);
    let (o_ptr, _o_sync) = out.device_ptr_mut(stream);
    let (k_ptr, _k_sync) = cache.k.device_ptr(stream);
    let (kt_ptr, _kt_sync) = cache.kt.device_ptr(stream);
    let (v_ptr, _v_sync) = cache.v.device_ptr(stream);
    let (mean_ptr, _mean_sync) = cache.mean.device_ptr(stream);
    let (lens_ptr, _lens_sync) = cache.lens.device_ptr(stream);
    let ws_ptr = workspace.device_ptr(stream);
    let kv_len = cache.shape().kv_len();
    check_no_alias(&[
        span::<T>("q", q_ptr, params.q_len(), false),
        span::<T>("out", o_ptr, params.o_len(), true),
        workspace.span(),
        span::<T>("cache", k_ptr, kv_len, false),
        span::<T>("cache", kt_ptr, kv_len, false),
        span::<T>("cache", v_ptr, kv_len, false),
        span::<f32>("cache", mean_ptr, cache.shape().mean_len(), false),
        span::<u32>("cache", lens_ptr, cache.shape().batch, false),
    ])?;

    // 8-byte loads: K^T rows start at multiples of the capacity (scores; the
    // logits are then stored as aligned 2- or 4-float vectors), K/V rows at
    // multiples of the head dim (gather), q rows at its strides.
    let vec = 8 / std::mem::size_of::<T>();
    let scores_vec = s.capacity.is_multiple_of(vec)
        && kt_ptr.is_multiple_of(8)
        && ws_ptr.is_multiple_of(16)
        && plan.logits.is_multiple_of(4);
    let gather_vec = s.head_dim.is_multiple_of(vec)
        && [q_ptr, k_ptr, v_ptr].iter().all(|p| p.is_multiple_of(8))
        && params.q_strides.iter().all(|st| st.is_multiple_of(vec));
    let nm = names(T::DTYPE);
    let scores_name = if scores_vec { nm.scores_vec } else { nm.scores_scalar };
    let gather_name = nm.gather[usize::from(s.head_dim > 128)][usize::from(gather_vec)];
    let scores = backend.function(scores_name)?;
    let select = backend.function(SELECT)?;
    let gather = backend.function(gather_name)?;
    let merge = backend.function(nm.merge)?;

    let i = |x: usize| x as i32;
    let kp = StepParams {
        q_stride: params.q_strides.map(|x| x as i64),
        o_stride: params.o_strides.map(|x| x as i64),
        offsets: [plan.logits, plan.norm, plan.lse, plan.keys, plan.indices, plan.partials].map(|x| x as i64),
        batch: i(s.batch),
        q_heads: i(params.q_heads),
        kv_heads: i(s.kv_heads),
        head_dim: i(s.head_dim),
        capacity: i(s.capacity),
        groups: i(params.groups()),
        heads_per_block: i(plan.heads_per_block),
        head_chunks: i(plan.head_chunks),
        r: i(c.r),
        k: i(c.k),
        window: i(c.local_window().min(c.k)),
        reallocate: i32::from(c.reallocate_to_mean),
        shared: i32::from(c.gqa == GqaMode::Shared),
        score_chunk: i(plan.score_chunk),
        score_splits: i(plan.score_splits),
        gather_chunk: i(plan.gather_chunk),
        gather_splits: i(plan.gather_splits),
        k_cap: i(plan.k_cap),
        scale: 1.0 / (s.head_dim as f32).sqrt(),
        pad: 0,
    };

    // Splits past the longest sequence (the host copy of the lengths is exact)
    // would exit at once: leave them out of the grids.
    let longest = cache.seq_lens().iter().copied().max().unwrap_or(0) as usize;
    let score_x = longest.div_ceil(plan.score_chunk).clamp(1, plan.score_splits) as u32;
    let gather_x = longest.min(c.k).div_ceil(plan.gather_chunk).clamp(1, plan.gather_splits) as u32;
    let heads_y = (s.kv_heads * plan.head_chunks) as u32;
    let select_x = (plan.select_rows / s.batch) as u32;
    let b = s.batch as u32;
    let ws = &ws_ptr;
    // SAFETY: validate_step checked q, out and the workspace against the
    // layout; the cache buffers hold `params.cache` (checked equal to their
    // shape); every kernel stays inside those extents (64-bit offsets, lengths
    // read from the cache, which never exceed the capacity); StepParams
    // matches the kernels' ABI.
    unsafe {
        stream
            .launch_builder(&scores)
            .arg(&q_ptr)
            .arg(&kt_ptr)
            .arg(&lens_ptr)
            .arg(ws)
            .arg(&kp)
            .launch(launch_cfg((score_x, heads_y, b), (SCORE_THREADS, 1, 1)))
            .map_err(launch_err(scores_name))?;
        stream
            .launch_builder(&select)
            .arg(&lens_ptr)
            .arg(ws)
            .arg(&kp)
            .launch(launch_cfg((select_x, b, 1), (SELECT_THREADS, 1, 1)))
            .map_err(launch_err(SELECT))?;
        stream
            .launch_builder(&gather)
            .arg(&q_ptr)
            .arg(&k_ptr)
            .arg(&v_ptr)
            .arg(&lens_ptr)
            .arg(ws)
            .arg(&kp)
            .launch(launch_cfg((gather_x, heads_y, b), (GATHER_THREADS, 1, 1)))
            .map_err(launch_err(gather_name))?;
        stream
            .launch_builder(&merge)
            .arg(ws)
            .arg(&mean_ptr)
            .arg(&lens_ptr)
            .arg(&o_ptr)
            .arg(&kp)
            .launch(launch_cfg((params.q_heads as u32, b, 1), (MERGE_THREADS, 1, 1)))
            .map_err(launch_err(nm.merge))?;
    }
    Ok(())
}
