//! Host-level driver for top-k on any [`Backend`] (tests, CLI, benches).

use super::{reference, TopkParams};
use crate::backend::{Backend, CudaBackend, WgpuBackend, WgpuTensor};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::host::HostData;
use crate::with_host_data;
use cudarc::driver::CudaSlice;

/// Top-k of one launch: positions `[rows, k]` and the values there.
#[derive(Debug, Clone, PartialEq)]
pub struct TopkOutput {
    pub indices: Vec<u32>,
    pub values: HostData,
}

/// The reference result.
pub fn reference(params: &TopkParams, x: &HostData) -> Result<TopkOutput> {
    with_host_data!(x, xs, T => {
        let mut indices = vec![0u32; params.out_len()];
        let mut values = vec![T::default(); params.out_len()];
        reference::topk_into::<T>(params, xs, &mut indices, &mut values)?;
        Ok(TopkOutput { indices, values: HostData::from_bytes(T::DTYPE, bytemuck::cast_slice(&values)) })
    })
}

/// One launch on `backend`, outputs poisoned beforehand (indices `u32::MAX`, values NaN).
pub fn run(backend: &Backend, params: &TopkParams, x: &HostData) -> Result<TopkOutput> {
    Session::new(backend, params, x)?.output()
}

/// Mean seconds per launch over `iters` launches (after a warm-up launch).
pub fn time(backend: &Backend, params: &TopkParams, x: &HostData, iters: usize) -> Result<f64> {
    let mut s = Session::new(backend, params, x)?;
    s.output()?;
    s.time(iters)
}

/// Input resident on a backend, launched many times.
pub enum Session<'a> {
    Cpu { params: &'a TopkParams, x: &'a HostData },
    Cuda(Box<dyn CudaLaunch + 'a>),
    Wgpu { w: &'a WgpuBackend, params: &'a TopkParams, dtype: DType, bufs: [wgpu::Buffer; 3] },
}

/// The dtype-generic part of a CUDA session.
pub trait CudaLaunch {
    fn output(&mut self) -> Result<TopkOutput>;
    fn time(&mut self, iters: usize) -> Result<f64>;
}

struct CudaSession<'a, T: Element> {
    c: &'a CudaBackend,
    params: &'a TopkParams,
    x: CudaSlice<T>,
    indices: CudaSlice<u32>,
    values: CudaSlice<T>,
}

impl<T: Element> CudaSession<'_, T> {
    fn launch(&mut self) -> Result<()> {
        super::cuda::topk(self.c, self.c.stream(), self.params, &self.x, &mut self.indices, &mut self.values)
    }
}

impl<T: Element> CudaLaunch for CudaSession<'_, T> {
    fn output(&mut self) -> Result<TopkOutput> {
        self.launch()?;
        let err = CudaBackend::device_error;
        let indices = self.c.stream().clone_dtoh(&self.indices).map_err(err)?;
        let values: Vec<T> = self.c.stream().clone_dtoh(&self.values).map_err(err)?;
        Ok(TopkOutput { indices, values: HostData::from_bytes(T::DTYPE, bytemuck::cast_slice(&values)) })
    }

    fn time(&mut self, iters: usize) -> Result<f64> {
        let c = self.c;
        c.time(iters, || self.launch())
    }
}

impl<'a> Session<'a> {
    pub fn new(backend: &'a Backend, params: &'a TopkParams, x: &'a HostData) -> Result<Self> {
        let n = params.out_len();
        Ok(match backend {
            Backend::Cpu => Session::Cpu { params, x },
            Backend::Cuda(c) => with_host_data!(x, xs, T => {
                let (st, err) = (c.stream(), CudaBackend::device_error);
                Session::Cuda(Box::new(CudaSession::<T> {
                    c,
                    params,
                    x: st.clone_htod(xs).map_err(err)?,
                    indices: st.clone_htod(&vec![u32::MAX; n]).map_err(err)?,
                    values: st.clone_htod(&vec![T::from_f32(f32::NAN); n]).map_err(err)?,
                }))
            }),
            Backend::Wgpu(w) => {
                let _gate = w.exclusive();
                let bufs = [
                    w.upload(x.as_bytes()),
                    w.upload(bytemuck::cast_slice(&vec![u32::MAX; n])),
                    w.upload(HostData::poisoned(x.dtype(), n).as_bytes()),
                ];
                Session::Wgpu { w, params, dtype: x.dtype(), bufs }
            }
        })
    }

    pub fn output(&mut self) -> Result<TopkOutput> {
        match self {
            Session::Cpu { params, x } => reference(params, x),
            Session::Cuda(s) => s.output(),
            Session::Wgpu { w, params, dtype, bufs } => {
                let _gate = w.exclusive();
                w.time(1, |enc| record(w, enc, params, *dtype, bufs))?;
                let n = params.out_len();
                let indices = crate::host::bytes_to_vec(&w.read_back(&bufs[1], n * 4)?);
                let values = HostData::from_bytes(*dtype, &w.read_back(&bufs[2], n * dtype.size())?);
                Ok(TopkOutput { indices, values })
            }
        }
    }

    pub fn time(&mut self, iters: usize) -> Result<f64> {
        match self {
            Session::Cpu { params, x } => {
                let t0 = std::time::Instant::now();
                for _ in 0..iters.max(1) {
                    reference(params, x)?;
                }
                Ok(t0.elapsed().as_secs_f64() / iters.max(1) as f64)
            }
            Session::Cuda(s) => s.time(iters),
            Session::Wgpu { w, params, dtype, bufs } => {
                let _gate = w.exclusive();
                w.time(iters, |enc| record(w, enc, params, *dtype, bufs))
            }
        }
    }
}

fn record(
    w: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    params: &TopkParams,
    dtype: DType,
    bufs: &[wgpu::Buffer; 3],
) -> Result<()> {
    let t = WgpuTensor::new;
    super::wgpu::topk(w, enc, params, dtype, t(&bufs[0]), t(&bufs[1]), t(&bufs[2]))
}
