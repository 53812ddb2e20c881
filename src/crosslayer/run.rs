//! Host-level drivers: device buffers on any [`Backend`], one-shot attention
//! runs against the reference, and [`CrossLayerCache`], a KV cache with one
//! slot per distinct target layer that the tiny model (and an engine
//! prototype) can prefill and decode through. Engines with their own buffers
//! call the per-backend launchers instead.

use super::reference::{self, KvEngine, SlotSpec};
use super::{AttnParams, LayerMap, MaskMode, WriteParams};
use crate::backend::{Backend, CudaBackend, CudaWorkspace, WgpuTensor, WgpuWorkspace};
use crate::dtype::{DType, Element};
use crate::error::{ensure, Result};
use crate::host::{bytes_to_vec, HostData, Rng};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use std::time::Instant;

/// Runs `$body` with `$t` naming the element type of `$dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::Bf16 => {
                type $t = bf16;
                $body
            }
        }
    };
}

/// A buffer on one backend. CPU buffers are `u32` words so any element type
/// can be viewed in place.
pub enum DevBuf {
    Cpu(Vec<u32>),
    Cuda(CudaSlice<u8>),
    Wgpu(wgpu::Buffer),
}

impl DevBuf {
    /// Bytes this buffer occupies on its device.
    pub fn bytes(&self) -> usize {
        match self {
            DevBuf::Cpu(w) => w.len() * 4,
            DevBuf::Cuda(s) => s.len(),
            DevBuf::Wgpu(b) => b.size() as usize,
        }
    }
}

/// Copies `bytes` (padded to whole 4-byte words) into a new buffer on `backend`.
pub fn upload(backend: &Backend, bytes: &[u8]) -> Result<DevBuf> {
    let mut padded = bytes.to_vec();
    padded.resize(bytes.len().next_multiple_of(4).max(4), 0);
    Ok(match backend {
        Backend::Cpu => DevBuf::Cpu(bytes_to_vec(&padded)),
        Backend::Cuda(c) => DevBuf::Cuda(c.stream().clone_htod(&padded).map_err(CudaBackend::device_error)?),
        Backend::Wgpu(w) => {
            let _gate = w.exclusive();
            DevBuf::Wgpu(w.upload(&padded))
        }
    })
}

/// Reads the first `len` bytes of `buf` back (waits for the device).
pub fn download(backend: &Backend, buf: &DevBuf, len: usize) -> Result<Vec<u8>> {
    Ok(match (backend, buf) {
        (_, DevBuf::Cpu(w)) => bytemuck::cast_slice(w)[..len].to_vec(),
        (Backend::Cuda(c), DevBuf::Cuda(s)) => {
            let v: Vec<u8> = c.stream().clone_dtoh(s).map_err(CudaBackend::device_error)?;
            v[..len].to_vec()
        }
        (Backend::Wgpu(w), DevBuf::Wgpu(b)) => {
            let _gate = w.exclusive();
            w.read_back(b, len)?
        }
        _ => unreachable!("a buffer is only ever used with the backend that made it"),
    })
}

fn cpu_view<T: bytemuck::Pod>(w: &[u32]) -> &[T] {
    bytemuck::cast_slice(w)
}

fn cpu_view_mut<T: bytemuck::Pod>(w: &mut [u32]) -> &mut [T] {
    bytemuck::cast_slice_mut(w)
}

fn cuda_err(what: &str) -> crate::error::Error {
    CudaBackend::device_error(format!("{what}: buffer is too small for its element type"))
}

/// One attention launch on `backend` over buffers it made. Records and, on
/// wgpu, submits; `iters` back-to-back launches (for timing) return seconds per launch.
#[allow(clippy::too_many_arguments)]
pub fn launch_attend(
    backend: &Backend,
    params: &AttnParams,
    dtype: DType,
    bufs: [&DevBuf; 5],
    out: &mut DevBuf,
    iters: usize,
) -> Result<f64> {
    let [q, k, v, pos, lens] = bufs;
    let t0 = Instant::now();
    match (backend, q, k, v, pos, lens, &mut *out) {
        (
            Backend::Cpu,
            DevBuf::Cpu(q),
            DevBuf::Cpu(k),
            DevBuf::Cpu(v),
            DevBuf::Cpu(pos),
            DevBuf::Cpu(lens),
            DevBuf::Cpu(o),
        ) => {
            with_dtype!(dtype, T => {
                for _ in 0..iters.max(1) {
                    reference::attend_into::<T>(params, cpu_view(q), cpu_view(k), cpu_view(v), pos, lens, cpu_view_mut(o))?;
                }
            });
            Ok(t0.elapsed().as_secs_f64() / iters.max(1) as f64)
        }
        (
            Backend::Cuda(c),
            DevBuf::Cuda(q),
            DevBuf::Cuda(k),
            DevBuf::Cuda(v),
            DevBuf::Cuda(pos),
            DevBuf::Cuda(lens),
            DevBuf::Cuda(o),
        ) => {
            with_dtype!(dtype, T => {
                let n = |b: &CudaSlice<u8>| b.len() / std::mem::size_of::<T>();
                let (nq, nk, nv, no) = (n(q), n(k), n(v), n(o));
                // SAFETY: every bit pattern is a valid f32/f16/bf16/u32.
                let (qv, kv, vv, pv, lv) = unsafe {
                    (
                        q.transmute::<T>(nq).ok_or_else(|| cuda_err("q"))?,
                        k.transmute::<T>(nk).ok_or_else(|| cuda_err("k_slot"))?,
                        v.transmute::<T>(nv).ok_or_else(|| cuda_err("v_slot"))?,
                        pos.transmute::<u32>(pos.len() / 4).ok_or_else(|| cuda_err("q_pos"))?,
                        lens.transmute::<u32>(lens.len() / 4).ok_or_else(|| cuda_err("kv_lens"))?,
                    )
                };
                // SAFETY: as above.
                let mut ov = unsafe { o.transmute_mut::<T>(no) }.ok_or_else(|| cuda_err("out"))?;
                // Allocated once per call, outside the timed launches.
                let mut ws = CudaWorkspace::new(c.stream(), params.workspace_bytes())?;
                c.time(iters, || {
                    super::cuda::attend::<T>(c, c.stream(), params, &qv, &kv, &vv, &pv, &lv, &mut ov, &mut ws)
                })
            })
        }
        (
            Backend::Wgpu(w),
            DevBuf::Wgpu(q),
            DevBuf::Wgpu(k),
            DevBuf::Wgpu(v),
            DevBuf::Wgpu(pos),
            DevBuf::Wgpu(lens),
            DevBuf::Wgpu(o),
        ) => {
            let _gate = w.exclusive();
            let t = WgpuTensor::new;
            let ws = WgpuWorkspace::new(w, params.workspace_bytes());
            w.time(iters, |enc| {
                super::wgpu::attend(w, enc, params, dtype, t(q), t(k), t(v), t(pos), t(lens), t(o), &ws)
            })
        }
        _ => unreachable!("a buffer is only ever used with the backend that made it"),
    }
}

/// One slot write on `backend` over buffers it made (submitted on wgpu).
pub fn launch_write(
    backend: &Backend,
    params: &WriteParams,
    dtype: DType,
    new: [&DevBuf; 3],
    k_slot: &mut DevBuf,
    v_slot: &mut DevBuf,
) -> Result<()> {
    let [nk, nv, start] = new;
    match (backend, nk, nv, start, k_slot, v_slot) {
        (Backend::Cpu, DevBuf::Cpu(nk), DevBuf::Cpu(nv), DevBuf::Cpu(st), DevBuf::Cpu(k), DevBuf::Cpu(v)) => {
            with_dtype!(dtype, T => reference::write::<T>(params, cpu_view(nk), cpu_view(nv), st, cpu_view_mut(k), cpu_view_mut(v)))
        }
        (Backend::Cuda(c), DevBuf::Cuda(nk), DevBuf::Cuda(nv), DevBuf::Cuda(st), DevBuf::Cuda(k), DevBuf::Cuda(v)) => {
            with_dtype!(dtype, T => {
                let n = |b: &CudaSlice<u8>| b.len() / std::mem::size_of::<T>();
                let (nnk, nnv, nk_s, nv_s) = (n(nk), n(nv), n(k), n(v));
                // SAFETY: every bit pattern is a valid f32/f16/bf16/u32.
                let (nkv, nvv, sv) = unsafe {
                    (
                        nk.transmute::<T>(nnk).ok_or_else(|| cuda_err("new_k"))?,
                        nv.transmute::<T>(nnv).ok_or_else(|| cuda_err("new_v"))?,
                        st.transmute::<u32>(st.len() / 4).ok_or_else(|| cuda_err("start"))?,
                    )
                };
                // SAFETY: as above.
                let mut kv = unsafe { k.transmute_mut::<T>(nk_s) }.ok_or_else(|| cuda_err("k_slot"))?;
                // SAFETY: as above.
                let mut vv = unsafe { v.transmute_mut::<T>(nv_s) }.ok_or_else(|| cuda_err("v_slot"))?;
                super::cuda::write::<T>(c, c.stream(), params, &nkv, &nvv, &sv, &mut kv, &mut vv)
            })
        }
        (Backend::Wgpu(w), DevBuf::Wgpu(nk), DevBuf::Wgpu(nv), DevBuf::Wgpu(st), DevBuf::Wgpu(k), DevBuf::Wgpu(v)) => {
            let _gate = w.exclusive();
            let t = WgpuTensor::new;
            w.time(1, |enc| super::wgpu::write(w, enc, params, dtype, t(nk), t(nv), t(st), t(k), t(v))).map(|_| ())
        }
        _ => unreachable!("a buffer is only ever used with the backend that made it"),
    }
}

/// Host copies of one attention launch's inputs, laid out as the params say.
#[derive(Debug, Clone)]
pub struct AttnInputs {
    pub q: HostData,
    pub k: HostData,
    pub v: HostData,
    pub q_pos: Vec<u32>,
    pub kv_lens: Vec<u32>,
}

impl AttnInputs {
    /// Random values in [-1, 1) for every element the layout addresses.
    pub fn random(p: &AttnParams, dtype: DType, q_pos: Vec<u32>, kv_lens: Vec<u32>, rng: &mut Rng) -> Self {
        AttnInputs {
            q: HostData::random(dtype, p.q_len(), rng),
            k: HostData::random(dtype, p.k_len(), rng),
            v: HostData::random(dtype, p.v_len(), rng),
            q_pos,
            kv_lens,
        }
    }

    pub fn dtype(&self) -> DType {
        self.q.dtype()
    }
}

/// The f64 reference, contiguous `[batch, queries, q_heads, head_dim]`.
pub fn reference(p: &AttnParams, x: &AttnInputs) -> Result<Vec<f64>> {
    with_dtype!(x.dtype(), T => reference::attend::<T>(p, typed(&x.q), typed(&x.k), typed(&x.v), &x.q_pos, &x.kv_lens))
}

fn typed<T: Element>(d: &HostData) -> &[T] {
    bytemuck::cast_slice(d.as_bytes())
}

/// Inputs resident on a backend with a NaN-poisoned output.
pub struct AttnSession<'a> {
    backend: &'a Backend,
    params: &'a AttnParams,
    dtype: DType,
    bufs: [DevBuf; 5],
    out: DevBuf,
}

impl<'a> AttnSession<'a> {
    pub fn new(backend: &'a Backend, params: &'a AttnParams, x: &AttnInputs) -> Result<Self> {
        let up = |b: &[u8]| upload(backend, b);
        let out = HostData::poisoned(x.dtype(), params.o_len());
        Ok(AttnSession {
            backend,
            params,
            dtype: x.dtype(),
            bufs: [
                up(x.q.as_bytes())?,
                up(x.k.as_bytes())?,
                up(x.v.as_bytes())?,
                up(bytemuck::cast_slice(&x.q_pos))?,
                up(bytemuck::cast_slice(&x.kv_lens))?,
            ],
            out: up(out.as_bytes())?,
        })
    }

    /// Launches once and returns the output gathered into `[batch, queries, q_heads, head_dim]`.
    pub fn output(&mut self) -> Result<Vec<f64>> {
        let [a, b, c, d, e] = &self.bufs;
        launch_attend(self.backend, self.params, self.dtype, [a, b, c, d, e], &mut self.out, 1)?;
        let n = self.params.o_len() * self.dtype.size();
        let raw = HostData::from_bytes(self.dtype, &download(self.backend, &self.out, n)?).to_f64();
        Ok(gather(self.params, &raw))
    }

    /// Seconds per launch over `iters` launches, after one warm-up launch.
    pub fn time(&mut self, iters: usize) -> Result<f64> {
        let [a, b, c, d, e] = &self.bufs;
        launch_attend(self.backend, self.params, self.dtype, [a, b, c, d, e], &mut self.out, 1)?;
        launch_attend(self.backend, self.params, self.dtype, [a, b, c, d, e], &mut self.out, iters)
    }
}

/// One launch on `backend` into a NaN-poisoned output, gathered like [`reference`].
pub fn run(backend: &Backend, p: &AttnParams, x: &AttnInputs) -> Result<Vec<f64>> {
    AttnSession::new(backend, p, x)?.output()
}

fn gather(p: &AttnParams, out: &[f64]) -> Vec<f64> {
    let (s, o) = (&p.shape, &p.layout.o);
    let mut g = Vec::with_capacity(s.batch * s.queries * s.q_heads * s.head_dim);
    for b in 0..s.batch {
        for t in 0..s.queries {
            for h in 0..s.q_heads {
                g.extend_from_slice(&out[b * o[0] + t * o[1] + h * o[2]..][..s.head_dim]);
            }
        }
    }
    g
}

/// Device bytes of a [`CrossLayerCache`] for `map` and of the standard cache
/// (every layer its own slot) of the same geometry, each allocated in turn on
/// `backend` for one sequence of `tokens` positions decoded a token at a time:
/// the saving as the device's allocations show it. Full slots hold `tokens`
/// rows, sliding-window slots `window` rows.
pub fn allocated_bytes(
    backend: &Backend,
    map: &LayerMap,
    dtype: DType,
    kv_heads: usize,
    head_dim: usize,
    tokens: usize,
) -> Result<(usize, usize)> {
    let bytes = |m: &LayerMap| {
        CrossLayerCache::new(backend, m, dtype, 1, kv_heads, kv_heads, head_dim, tokens, 1).map(|c| c.device_bytes())
    };
    Ok((bytes(map)?, bytes(&LayerMap::standard(map.layers()))?))
}

/// A cross-layer KV cache on one backend: one K and one V buffer per distinct
/// target layer (`[B, H_kv, rows, D]` each), ring buffers of
/// `ring_rows(window, chunk)` rows for sliding-window slots, and a host mirror
/// of every slot's per-sequence length.
pub struct CrossLayerCache {
    backend: Backend,
    pub map: LayerMap,
    pub dtype: DType,
    pub batch: usize,
    pub spec: SlotSpec,
    k: Vec<DevBuf>,
    v: Vec<DevBuf>,
    lens: Vec<Vec<u32>>,
}

impl CrossLayerCache {
    /// Allocates the slots (zeroed) for `batch` sequences of up to `capacity`
    /// positions, prefilled in chunks of at most `chunk` tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: &Backend,
        map: &LayerMap,
        dtype: DType,
        batch: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        chunk: usize,
    ) -> Result<Self> {
        ensure(batch >= 1, "batch", || "must be at least 1".into())?;
        ensure(capacity >= 1, "capacity", || "must be at least 1".into())?;
        let spec = SlotSpec::new(map, q_heads, kv_heads, head_dim, capacity, chunk)?;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for &(rows, _) in &spec.slots {
            let bytes = vec![0u8; batch * kv_heads * rows * head_dim * dtype.size()];
            k.push(upload(backend, &bytes)?);
            v.push(upload(backend, &bytes)?);
        }
        let lens = vec![vec![0; batch]; spec.slots.len()];
        Ok(CrossLayerCache { backend: backend.clone(), map: map.clone(), dtype, batch, spec, k, v, lens })
    }

    /// Bytes of K/V storage allocated on the device, all slots together.
    pub fn device_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(DevBuf::bytes).sum()
    }

    /// Host mirror of the per-sequence lengths of slot `slot`.
    pub fn lens(&self, slot: usize) -> &[u32] {
        &self.lens[slot]
    }

    fn write_params(&self, slot: usize, tokens: usize) -> WriteParams {
        let (rows, ring) = self.spec.slots[slot];
        WriteParams::new(self.batch, tokens, self.spec.kv_heads, self.spec.head_dim, rows, ring)
    }

    /// Writes `new_k`, `new_v` (`[B, T, H_kv, D]`, this cache's dtype) at
    /// positions `start[b]..start[b] + T` of `slot` and raises the host lengths
    /// to cover them. A prefill pass overwrites the same range; decode appends
    /// with `start = lens`.
    pub fn write(&mut self, slot: usize, start: &[u32], new_k: &HostData, new_v: &HostData) -> Result<()> {
        ensure(slot < self.spec.slots.len(), "slot", || format!("{slot} >= {} slots", self.spec.slots.len()))?;
        ensure(start.len() == self.batch, "start", || {
            format!("{} positions for {} sequences", start.len(), self.batch)
        })?;
        ensure(new_k.dtype() == self.dtype && new_v.dtype() == self.dtype, "new_k", || {
            format!("must be {} like the cache", self.dtype)
        })?;
        let row = self.batch * self.spec.kv_heads * self.spec.head_dim;
        ensure(new_k.len().is_multiple_of(row) && !new_k.is_empty(), "new_k", || {
            format!("{} elements is not a whole number of [B, 1, H_kv, D] rows", new_k.len())
        })?;
        let tokens = new_k.len() / row;
        let p = self.write_params(slot, tokens);
        let (rows, ring) = self.spec.slots[slot];
        for &s in start {
            ensure(ring || s as usize + tokens <= rows, "start", || {
                format!("positions {s}..{} do not fit a slot of {rows} rows", s as usize + tokens)
            })?;
        }
        let b = &self.backend;
        let (nk, nv, st) =
            (upload(b, new_k.as_bytes())?, upload(b, new_v.as_bytes())?, upload(b, bytemuck::cast_slice(start))?);
        launch_write(b, &p, self.dtype, [&nk, &nv, &st], &mut self.k[slot], &mut self.v[slot])?;
        for (len, &s) in self.lens[slot].iter_mut().zip(start) {
            *len = (*len).max(s + tokens as u32);
        }
        Ok(())
    }

    /// Attends `q` (`[B, T, H_q, D]`, queries at `q_pos[b]..`) over the first
    /// `kv_lens[b]` positions of `slot`; returns `[B, T, H_q, D]` in f64.
    pub fn attend(
        &self,
        slot: usize,
        q: &HostData,
        q_pos: &[u32],
        kv_lens: &[u32],
        mask: MaskMode,
        window: Option<usize>,
    ) -> Result<Vec<f64>> {
        ensure(slot < self.spec.slots.len(), "slot", || format!("{slot} >= {} slots", self.spec.slots.len()))?;
        let row = self.batch * self.spec.q_heads * self.spec.head_dim;
        ensure(!q.is_empty() && q.len().is_multiple_of(row), "q", || {
            format!("{} elements is not [B, T, H_q, D]", q.len())
        })?;
        let (rows, ring) = self.spec.slots[slot];
        let shape = super::AttnShape {
            batch: self.batch,
            queries: q.len() / row,
            q_heads: self.spec.q_heads,
            kv_heads: self.spec.kv_heads,
            head_dim: self.spec.head_dim,
            rows,
        };
        let p = AttnParams::new(shape, mask).with_window(window).with_ring(ring);
        let b = &self.backend;
        let out_host = HostData::poisoned(self.dtype, p.o_len());
        let mut out = upload(b, out_host.as_bytes())?;
        let (qb, pb, lb) = (
            upload(b, q.as_bytes())?,
            upload(b, bytemuck::cast_slice(q_pos))?,
            upload(b, bytemuck::cast_slice(kv_lens))?,
        );
        launch_attend(b, &p, self.dtype, [&qb, &self.k[slot], &self.v[slot], &pb, &lb], &mut out, 1)?;
        let bytes = download(b, &out, p.o_len() * self.dtype.size())?;
        Ok(HostData::from_bytes(self.dtype, &bytes).to_f64())
    }
}

/// The tiny model on a device: values are rounded to the cache's dtype on the way in.
impl KvEngine for CrossLayerCache {
    fn write(&mut self, slot: usize, start: usize, k: &[f64], v: &[f64]) -> Result<()> {
        let f = |x: &[f64]| HostData::from_f32(self.dtype, &x.iter().map(|&e| e as f32).collect::<Vec<_>>());
        let (nk, nv) = (f(k), f(v));
        CrossLayerCache::write(self, slot, &vec![start as u32; self.batch], &nk, &nv)
    }

    fn attend(
        &mut self,
        slot: usize,
        q_pos: usize,
        q: &[f64],
        kv_len: usize,
        mask: MaskMode,
        window: Option<usize>,
    ) -> Result<Vec<f64>> {
        let qh = HostData::from_f32(self.dtype, &q.iter().map(|&e| e as f32).collect::<Vec<_>>());
        let n = self.batch;
        CrossLayerCache::attend(self, slot, &qh, &vec![q_pos as u32; n], &vec![kv_len as u32; n], mask, window)
    }
}
