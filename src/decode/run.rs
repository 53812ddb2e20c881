//! Host-level driver: upload host data, launch on any [`Backend`], read the
//! result back. Tests, the command-line checks and the benches use it;
//! engines call the per-backend launchers on their own buffers instead.

use super::{reference, DecodeParams};
use crate::backend::{Backend, CudaBackend, CudaWorkspace, WgpuBackend, WgpuTensor, WgpuWorkspace};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::host::{HostData, Rng};
use crate::with_host_data;
use cudarc::driver::CudaSlice;
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
    let out = Session::new(backend, params, x)?.output()?;
    Ok(gather(params, &out.to_f64()))
}

/// Mean seconds per launch over `iters` launches (inputs uploaded once, one warm-up launch).
pub fn time(backend: &Backend, params: &DecodeParams, x: &DecodeInputs, iters: usize) -> Result<f64> {
    Session::new(backend, params, x)?.time(iters)
}

/// Inputs resident on a backend, ready to be launched many times (benches).
pub struct Session<'a>(Box<dyn Launch + 'a>);

trait Launch {
    /// Launches once and reads the (strided) output back.
    fn output(&mut self) -> Result<HostData>;
    /// Seconds per launch over `iters` back-to-back launches.
    fn time(&mut self, iters: usize) -> Result<f64>;
}

impl<'a> Session<'a> {
    pub fn new(backend: &'a Backend, params: &'a DecodeParams, x: &'a DecodeInputs) -> Result<Self> {
        Ok(Session(match backend {
            Backend::Cpu => Box::new(CpuSession { params, x }),
            Backend::Cuda(c) => with_host_data!(&x.q, q, T => Box::new(CudaSession::<T>::new(c, params, q, x)?)),
            Backend::Wgpu(w) => Box::new(WgpuSession::new(w, params, x)?),
        }))
    }

    pub fn output(&mut self) -> Result<HostData> {
        self.0.output()
    }

    /// Mean seconds per launch over `iters` launches, after one warm-up launch.
    pub fn time(&mut self, iters: usize) -> Result<f64> {
        self.0.output()?;
        self.0.time(iters.max(1))
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
struct CpuSession<'a> {
    params: &'a DecodeParams,
    x: &'a DecodeInputs,
}

impl Launch for CpuSession<'_> {
    fn output(&mut self) -> Result<HostData> {
        let (p, x) = (self.params, self.x);
        with_host_data!(&x.q, q, T => {
            let mut out = vec![T::from_f32(f32::NAN); p.o_len()];
            reference::decode_into(p, q, typed(&x.k), typed(&x.v), &x.seq_lens, &mut out)?;
            Ok(HostData::from_bytes(T::DTYPE, bytemuck::cast_slice(&out)))
        })
    }

    fn time(&mut self, iters: usize) -> Result<f64> {
        let t0 = Instant::now();
        for _ in 0..iters {
            self.output()?;
        }
        Ok(t0.elapsed().as_secs_f64() / iters as f64)
    }
}

struct CudaSession<'a, T: Element> {
    c: &'a CudaBackend,
    params: &'a DecodeParams,
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    lens: CudaSlice<u32>,
    out: CudaSlice<T>,
    ws: CudaWorkspace,
}

impl<'a, T: Element> CudaSession<'a, T> {
    fn new(c: &'a CudaBackend, params: &'a DecodeParams, q: &[T], x: &DecodeInputs) -> Result<Self> {
        let (err, st) = (CudaBackend::device_error, c.stream());
        Ok(CudaSession {
            c,
            params,
            q: st.clone_htod(q).map_err(err)?,
            k: st.clone_htod(typed::<T>(&x.k)).map_err(err)?,
            v: st.clone_htod(typed::<T>(&x.v)).map_err(err)?,
            lens: st.clone_htod(&x.seq_lens).map_err(err)?,
            out: st.clone_htod(&vec![T::from_f32(f32::NAN); params.o_len()]).map_err(err)?,
            ws: CudaWorkspace::new(st, params.workspace_bytes())?,
        })
    }

    fn launch(&mut self) -> Result<()> {
        let s = self;
        super::cuda::decode(s.c, s.c.stream(), s.params, &s.q, &s.k, &s.v, &s.lens, &mut s.out, &mut s.ws)
    }
}

impl<T: Element> Launch for CudaSession<'_, T> {
    fn output(&mut self) -> Result<HostData> {
        self.launch()?;
        let out: Vec<T> = self.c.stream().clone_dtoh(&self.out).map_err(CudaBackend::device_error)?;
        Ok(HostData::from_bytes(T::DTYPE, bytemuck::cast_slice(&out)))
    }

    fn time(&mut self, iters: usize) -> Result<f64> {
        let c = self.c;
        c.time(iters, || self.launch())
    }
}

struct WgpuSession<'a> {
    w: &'a WgpuBackend,
    params: &'a DecodeParams,
    dtype: DType,
    bufs: [wgpu::Buffer; 5],
    out_bytes: usize,
    ws: WgpuWorkspace,
}

impl<'a> WgpuSession<'a> {
    fn new(w: &'a WgpuBackend, params: &'a DecodeParams, x: &DecodeInputs) -> Result<Self> {
        let _gate = w.exclusive();
        let out = HostData::poisoned(x.dtype(), params.o_len());
        Ok(WgpuSession {
            w,
            params,
            dtype: x.dtype(),
            bufs: [
                w.upload(x.q.as_bytes()),
                w.upload(x.k.as_bytes()),
                w.upload(x.v.as_bytes()),
                w.upload(bytemuck::cast_slice(&x.seq_lens)),
                w.upload(out.as_bytes()),
            ],
            out_bytes: out.as_bytes().len(),
            ws: WgpuWorkspace::new(w, params.workspace_bytes()),
        })
    }

    fn record(&self, enc: &mut wgpu::CommandEncoder) -> Result<()> {
        let t = WgpuTensor::new;
        let [q, k, v, lens, out] = &self.bufs;
        super::wgpu::decode(self.w, enc, self.params, self.dtype, t(q), t(k), t(v), t(lens), t(out), &self.ws)
    }
}

impl Launch for WgpuSession<'_> {
    fn output(&mut self) -> Result<HostData> {
        let _gate = self.w.exclusive();
        self.w.time(1, |enc| self.record(enc))?;
        Ok(HostData::from_bytes(self.dtype, &self.w.read_back(&self.bufs[4], self.out_bytes)?))
    }

    fn time(&mut self, iters: usize) -> Result<f64> {
        let _gate = self.w.exclusive();
        self.w.time(iters, |enc| self.record(enc))
    }
}
