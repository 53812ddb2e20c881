//! Host-level driver: upload host data, launch on any [`Backend`], read the
//! result back. Tests, the command-line checks and the benches use it;
//! engines call the per-backend launchers on their own buffers instead.

use super::{reference, DecodeParams};
use crate::backend::{Backend, CudaBackend, CudaWorkspace, WgpuBackend, WgpuTensor, WgpuWorkspace};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::host::{HostData, Rng};
use crate::with_host_data;
use std::time::Instant;

/// Host copies of one decode step's inputs, laid out as `params.layout` says.
#[derive(Debug, Clone)]
pub struct DecodeInputs {
    pub q: HostData,
    pub k: HostData,
    pub v: HostData,
    pub seq_lens: Vec<u32>,
}

impl DecodeInputs {
    /// Uniform random values in [-1, 1) for every element the layout addresses
    /// (and for padding between them).
    pub fn random(params: &DecodeParams, dtype: DType, seq_lens: Vec<u32>, rng: &mut Rng) -> Self {
        DecodeInputs {
            q: HostData::random(dtype, params.q_len(), rng),
            k: HostData::random(dtype, params.k_len(), rng),
            v: HostData::random(dtype, params.v_len(), rng),
            seq_lens,
        }
    }

    pub fn dtype(&self) -> DType {
        self.q.dtype()
    }
}

/// The f64 reference output, contiguous `[batch, q_heads, head_dim]`.
pub fn reference(params: &DecodeParams, x: &DecodeInputs) -> Result<Vec<f64>> {
    with_host_data!(&x.q, q, T => {
        reference::decode::<T>(params, q, typed(&x.k), typed(&x.v), &x.seq_lens)
    })
}

/// Runs one launch on `backend` into a NaN-poisoned output and returns the
/// result, gathered into a contiguous `[batch, q_heads, head_dim]` f64 array.
pub fn run(backend: &Backend, params: &DecodeParams, x: &DecodeInputs) -> Result<Vec<f64>> {
    let out = match backend {
        Backend::Cpu => with_host_data!(&x.q, q, T => cpu::<T>(params, q, x)?),
        Backend::Cuda(c) => with_host_data!(&x.q, q, T => cuda::<T>(c, params, q, x, 0)?.0),
        Backend::Wgpu(w) => wgpu(w, params, x, 0)?.0,
    };
    Ok(gather(params, &out.to_f64()))
}

/// Mean seconds per launch over `iters` launches (after one warm-up launch).
pub fn time(backend: &Backend, params: &DecodeParams, x: &DecodeInputs, iters: usize) -> Result<f64> {
    let iters = iters.max(1);
    match backend {
        Backend::Cpu => with_host_data!(&x.q, q, T => {
            cpu::<T>(params, q, x)?;
            let t0 = Instant::now();
            for _ in 0..iters {
                cpu::<T>(params, q, x)?;
            }
            Ok(t0.elapsed().as_secs_f64() / iters as f64)
        }),
        Backend::Cuda(c) => with_host_data!(&x.q, q, T => Ok(cuda::<T>(c, params, q, x, iters)?.1)),
        Backend::Wgpu(w) => Ok(wgpu(w, params, x, iters)?.1),
    }
}

fn typed<T: Element>(d: &HostData) -> &[T] {
    bytemuck::cast_slice(d.as_bytes())
}

/// Output element `(b, h, d)` of the strided output, into contiguous order.
fn gather(params: &DecodeParams, out: &[f64]) -> Vec<f64> {
    let (s, o) = (&params.shape, &params.layout.o);
    let mut g = Vec::with_capacity(s.batch * s.q_heads * s.head_dim);
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            g.extend_from_slice(&out[b * o[0] + h * o[1]..][..s.head_dim]);
        }
    }
    g
}

/// The CPU backend: the reference launcher on a NaN-poisoned output.
fn cpu<T: Element>(params: &DecodeParams, q: &[T], x: &DecodeInputs) -> Result<HostData> {
    let mut out = vec![T::from_f32(f32::NAN); params.o_len()];
    reference::decode_into(params, q, typed(&x.k), typed(&x.v), &x.seq_lens, &mut out)?;
    Ok(HostData::from_bytes(T::DTYPE, bytemuck::cast_slice(&out)))
}

/// Runs once (and then `iters` timed launches); returns the output and seconds per launch.
fn cuda<T: Element>(
    c: &CudaBackend,
    params: &DecodeParams,
    q: &[T],
    x: &DecodeInputs,
    iters: usize,
) -> Result<(HostData, f64)> {
    let err = CudaBackend::device_error;
    let stream = c.stream();
    let q_d = stream.clone_htod(q).map_err(err)?;
    let k_d = stream.clone_htod(typed::<T>(&x.k)).map_err(err)?;
    let v_d = stream.clone_htod(typed::<T>(&x.v)).map_err(err)?;
    let lens_d = stream.clone_htod(&x.seq_lens).map_err(err)?;
    let poison = vec![T::from_f32(f32::NAN); params.o_len()];
    let mut o_d = stream.clone_htod(&poison).map_err(err)?;
    let mut ws = CudaWorkspace::new(stream, params.workspace_bytes())?;
    super::cuda::decode(c, stream, params, &q_d, &k_d, &v_d, &lens_d, &mut o_d, &mut ws)?;
    let out: Vec<T> = stream.clone_dtoh(&o_d).map_err(err)?;
    let mut secs = 0.0;
    if iters > 0 {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = c.context().new_event(flags).map_err(err)?;
        let end = c.context().new_event(flags).map_err(err)?;
        start.record(stream).map_err(err)?;
        for _ in 0..iters {
            super::cuda::decode(c, stream, params, &q_d, &k_d, &v_d, &lens_d, &mut o_d, &mut ws)?;
        }
        end.record(stream).map_err(err)?;
        end.synchronize().map_err(err)?;
        secs = start.elapsed_ms(&end).map_err(err)? as f64 * 1e-3 / iters as f64;
    }
    Ok((HostData::from_bytes(T::DTYPE, bytemuck::cast_slice(&out)), secs))
}

fn wgpu(w: &WgpuBackend, params: &DecodeParams, x: &DecodeInputs, iters: usize) -> Result<(HostData, f64)> {
    let _gate = w.exclusive();
    let dtype = x.dtype();
    let q = w.upload(x.q.as_bytes());
    let k = w.upload(x.k.as_bytes());
    let v = w.upload(x.v.as_bytes());
    let lens = w.upload(bytemuck::cast_slice(&x.seq_lens));
    let out_host = HostData::poisoned(dtype, params.o_len());
    let out = w.upload(out_host.as_bytes());
    let ws = WgpuWorkspace::new(w, params.workspace_bytes());
    let t = WgpuTensor::new;
    let launch = |enc: &mut wgpu::CommandEncoder| {
        super::wgpu::decode(w, enc, params, dtype, t(&q), t(&k), t(&v), t(&lens), t(&out), &ws)
    };
    let mut enc = w.device().create_command_encoder(&Default::default());
    launch(&mut enc)?;
    w.submit_and_wait(enc)?;
    let bytes = w.read_back(&out, out_host.as_bytes().len())?;
    let mut secs = 0.0;
    if iters > 0 {
        let mut enc = w.device().create_command_encoder(&Default::default());
        for _ in 0..iters {
            launch(&mut enc)?;
        }
        secs = w.submit_and_wait(enc)?.as_secs_f64() / iters as f64;
    }
    Ok((HostData::from_bytes(dtype, &bytes), secs))
}
