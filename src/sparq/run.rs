//! Host-level driver for SparQ on any [`Backend`]: build a cache from host
//! data (bulk fill, then optional appends), launch, read back. Tests, the
//! command-line checks and the benches use it.

use super::reference::{self, HostCache, SelectionTrace};
use super::{SparqCacheShape, SparqParams};
use crate::backend::{Backend, CudaBackend, CudaWorkspace, WgpuBackend, WgpuTensor, WgpuWorkspace};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::host::{bytes_to_vec, HostData, Rng};
use crate::with_host_data;
use cudarc::driver::CudaSlice;

/// Host copies of one step's inputs: the query (`params.q_strides`) and the
/// cache content, K and V as `[batch, kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone)]
pub struct SparqInputs {
    pub q: HostData,
    pub k: HostData,
    pub v: HostData,
    pub seq_lens: Vec<u32>,
}

impl SparqInputs {
    pub fn random(params: &SparqParams, dtype: DType, seq_lens: Vec<u32>, rng: &mut Rng) -> Self {
        let n = params.cache.kv_len();
        SparqInputs {
            q: HostData::random(dtype, params.q_len(), rng),
            k: HostData::random(dtype, n, rng),
            v: HostData::random(dtype, n, rng),
            seq_lens,
        }
    }

    pub fn dtype(&self) -> DType {
        self.q.dtype()
    }
}

fn typed<T: Element>(d: &HostData) -> &[T] {
    bytemuck::cast_slice(d.as_bytes())
}

/// Strides of the host K/V arrays (`[batch, kv_heads, capacity, head_dim]`).
fn cache_strides(s: &SparqCacheShape) -> [usize; 3] {
    [s.kv_heads * s.capacity * s.head_dim, s.capacity * s.head_dim, s.head_dim]
}

/// The f64 reference output, contiguous `[batch, q_heads, head_dim]`.
pub fn reference(params: &SparqParams, x: &SparqInputs) -> Result<Vec<f64>> {
    with_host_data!(&x.q, q, T => {
        reference::sparq::<T>(params, q, &HostCache { k: typed(&x.k), v: typed(&x.v), seq_lens: &x.seq_lens })
    })
}

/// Steps 1-3 of the reference, per selection row.
pub fn trace(params: &SparqParams, x: &SparqInputs) -> Result<Vec<SelectionTrace>> {
    with_host_data!(&x.q, q, T => {
        reference::trace::<T>(params, q, &HostCache { k: typed(&x.k), v: typed(&x.v), seq_lens: &x.seq_lens })
    })
}

/// One step on `backend` (cache built by a bulk fill), output gathered into
/// contiguous `[batch, q_heads, head_dim]`.
pub fn run(backend: &Backend, params: &SparqParams, x: &SparqInputs) -> Result<Vec<f64>> {
    run_appending(backend, params, x, 0)
}

/// Like [`run`], but the cache is filled with all but the last `appends`
/// tokens of every sequence and the rest arrive through the append kernel.
/// Every length must be at least `appends`.
pub fn run_appending(backend: &Backend, params: &SparqParams, x: &SparqInputs, appends: usize) -> Result<Vec<f64>> {
    let mut s = Session::new(backend, params, x, appends)?;
    let out = s.output()?;
    let (c, o) = (&params.cache, &params.o_strides);
    let out = out.to_f64();
    let mut g = Vec::with_capacity(c.batch * params.q_heads * c.head_dim);
    for b in 0..c.batch {
        for h in 0..params.q_heads {
            g.extend_from_slice(&out[b * o[0] + h * o[1]..][..c.head_dim]);
        }
    }
    Ok(g)
}

/// Mean seconds per step over `iters` steps (cache resident, one warm-up step).
pub fn time(backend: &Backend, params: &SparqParams, x: &SparqInputs, iters: usize) -> Result<f64> {
    let mut s = Session::new(backend, params, x, 0)?;
    s.output()?;
    s.time(iters)
}

/// What a cache holds after it was built, read back from the device:
/// K, K^T, V (as f64), the mean of V, and the device lengths.
#[derive(Debug, Clone)]
pub struct CacheDump {
    pub k: Vec<f64>,
    pub kt: Vec<f64>,
    pub v: Vec<f64>,
    pub mean: Vec<f32>,
    pub seq_lens: Vec<u32>,
}

/// Builds the cache as [`run_appending`] does and reads it back (GPU backends only).
pub fn cache_dump(
    backend: &Backend,
    params: &SparqParams,
    x: &SparqInputs,
    appends: usize,
) -> Result<Option<CacheDump>> {
    let s = Session::new(backend, params, x, appends)?;
    s.0.dump()
}

/// A cache resident on a backend plus a query, ready to be stepped many times.
pub struct Session<'a>(Box<dyn Step + 'a>);

trait Step {
    fn output(&mut self) -> Result<HostData>;
    fn time(&mut self, iters: usize) -> Result<f64>;
    fn dump(&self) -> Result<Option<CacheDump>>;
}

impl<'a> Session<'a> {
    pub fn new(backend: &'a Backend, params: &'a SparqParams, x: &'a SparqInputs, appends: usize) -> Result<Self> {
        if let Some(b) = x.seq_lens.iter().position(|&l| (l as usize) < appends) {
            return Err(crate::Error::invalid("seq_lens", format!("sequence {b} is shorter than {appends} appends")));
        }
        Ok(Session(match backend {
            Backend::Cpu => Box::new(CpuStep { params, x }),
            Backend::Cuda(c) => with_host_data!(&x.q, q, T => Box::new(CudaStep::<T>::new(c, params, q, x, appends)?)),
            Backend::Wgpu(w) => Box::new(WgpuStep::new(w, params, x, appends)?),
        }))
    }

    pub fn output(&mut self) -> Result<HostData> {
        self.0.output()
    }

    pub fn time(&mut self, iters: usize) -> Result<f64> {
        self.0.time(iters.max(1))
    }
}

/// The token at position `pos` of every (sequence, kv head): `[batch, kv_heads, head_dim]`.
fn token<T: Element>(s: &SparqCacheShape, all: &[T], lens: &[u32], back: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(s.mean_len());
    for (b, &len) in lens.iter().enumerate() {
        for g in 0..s.kv_heads {
            let pos = len as usize - back;
            out.extend_from_slice(&all[((b * s.kv_heads + g) * s.capacity + pos) * s.head_dim..][..s.head_dim]);
        }
    }
    out
}

fn filled_lens(x: &SparqInputs, appends: usize) -> Vec<u32> {
    x.seq_lens.iter().map(|&l| l - appends as u32).collect()
}

struct CpuStep<'a> {
    params: &'a SparqParams,
    x: &'a SparqInputs,
}

impl Step for CpuStep<'_> {
    fn output(&mut self) -> Result<HostData> {
        let (p, x) = (self.params, self.x);
        with_host_data!(&x.q, q, T => {
            let mut out = vec![T::from_f32(f32::NAN); p.o_len()];
            let cache = HostCache { k: typed(&x.k), v: typed(&x.v), seq_lens: &x.seq_lens };
            reference::sparq_into::<T>(p, q, &cache, &mut out)?;
            Ok(HostData::from_bytes(T::DTYPE, bytemuck::cast_slice(&out)))
        })
    }

    fn time(&mut self, iters: usize) -> Result<f64> {
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            self.output()?;
        }
        Ok(t0.elapsed().as_secs_f64() / iters as f64)
    }

    fn dump(&self) -> Result<Option<CacheDump>> {
        Ok(None)
    }
}

struct CudaStep<'a, T: Element> {
    c: &'a CudaBackend,
    params: &'a SparqParams,
    cache: super::cuda::SparqCache<T>,
    q: CudaSlice<T>,
    out: CudaSlice<T>,
    ws: CudaWorkspace,
}

impl<'a, T: Element> CudaStep<'a, T> {
    fn new(c: &'a CudaBackend, params: &'a SparqParams, q: &[T], x: &SparqInputs, appends: usize) -> Result<Self> {
        let (st, err) = (c.stream(), CudaBackend::device_error);
        let s = &params.cache;
        let mut cache = super::cuda::SparqCache::<T>::new(st, *s)?;
        let k = st.clone_htod(typed::<T>(&x.k)).map_err(err)?;
        let v = st.clone_htod(typed::<T>(&x.v)).map_err(err)?;
        let strides = cache_strides(s);
        cache.fill(c, st, &k, strides, &v, strides, &filled_lens(x, appends))?;
        for t in (1..=appends).rev() {
            let kn = st.clone_htod(&token(s, typed::<T>(&x.k), &x.seq_lens, t)).map_err(err)?;
            let vn = st.clone_htod(&token(s, typed::<T>(&x.v), &x.seq_lens, t)).map_err(err)?;
            cache.append(c, st, &kn, &vn)?;
        }
        Ok(CudaStep {
            c,
            params,
            cache,
            q: st.clone_htod(q).map_err(err)?,
            out: st.clone_htod(&vec![T::from_f32(f32::NAN); params.o_len()]).map_err(err)?,
            ws: CudaWorkspace::new(st, params.workspace_bytes())?,
        })
    }

    fn launch(&mut self) -> Result<()> {
        let s = self;
        super::cuda::sparq(s.c, s.c.stream(), s.params, &s.cache, &s.q, &mut s.out, &mut s.ws)
    }
}

impl<T: Element> Step for CudaStep<'_, T> {
    fn output(&mut self) -> Result<HostData> {
        self.launch()?;
        let out: Vec<T> = self.c.stream().clone_dtoh(&self.out).map_err(CudaBackend::device_error)?;
        Ok(HostData::from_bytes(T::DTYPE, bytemuck::cast_slice(&out)))
    }

    fn time(&mut self, iters: usize) -> Result<f64> {
        let c = self.c;
        c.time(iters, || self.launch())
    }

    fn dump(&self) -> Result<Option<CacheDump>> {
        let (st, err) = (self.c.stream(), CudaBackend::device_error);
        let (k, kt, v, mean, lens) = self.cache.buffers();
        let f = |b: &CudaSlice<T>| -> Result<Vec<f64>> {
            Ok(st.clone_dtoh(b).map_err(err)?.iter().map(|x: &T| x.to_f64()).collect())
        };
        Ok(Some(CacheDump {
            k: f(k)?,
            kt: f(kt)?,
            v: f(v)?,
            mean: st.clone_dtoh(mean).map_err(err)?,
            seq_lens: st.clone_dtoh(lens).map_err(err)?,
        }))
    }
}

struct WgpuStep<'a> {
    w: &'a WgpuBackend,
    params: &'a SparqParams,
    cache: super::wgpu::SparqCache,
    q: wgpu::Buffer,
    out: wgpu::Buffer,
    out_bytes: usize,
    ws: WgpuWorkspace,
}

impl<'a> WgpuStep<'a> {
    fn new(w: &'a WgpuBackend, params: &'a SparqParams, x: &SparqInputs, appends: usize) -> Result<Self> {
        let _gate = w.exclusive();
        let (s, dtype) = (&params.cache, x.dtype());
        let mut cache = super::wgpu::SparqCache::new(w, *s, dtype)?;
        let (k, v) = (w.upload(x.k.as_bytes()), w.upload(x.v.as_bytes()));
        let strides = cache_strides(s);
        let mut enc = w.device().create_command_encoder(&Default::default());
        let t = WgpuTensor::new;
        cache.fill(w, &mut enc, t(&k), strides, t(&v), strides, &filled_lens(x, appends))?;
        let mut tokens = Vec::new();
        for back in (1..=appends).rev() {
            let (kn, vn) = with_host_data!(&x.k, kd, T => {
                let vd: &[T] = typed(&x.v);
                (bytemuck::cast_slice::<T, u8>(&token(s, kd, &x.seq_lens, back)).to_vec(),
                 bytemuck::cast_slice::<T, u8>(&token(s, vd, &x.seq_lens, back)).to_vec())
            });
            tokens.push((w.upload(&kn), w.upload(&vn)));
        }
        for (kn, vn) in &tokens {
            cache.append(w, &mut enc, t(kn), t(vn))?;
        }
        w.submit_and_wait(enc)?;
        let out = HostData::poisoned(dtype, params.o_len());
        Ok(WgpuStep {
            w,
            params,
            cache,
            q: w.upload(x.q.as_bytes()),
            out: w.upload(out.as_bytes()),
            out_bytes: out.as_bytes().len(),
            ws: WgpuWorkspace::new(w, params.workspace_bytes()),
        })
    }

    fn record(&self, enc: &mut wgpu::CommandEncoder) -> Result<()> {
        let t = WgpuTensor::new;
        super::wgpu::sparq(self.w, enc, self.params, &self.cache, t(&self.q), t(&self.out), &self.ws)
    }
}

impl Step for WgpuStep<'_> {
    fn output(&mut self) -> Result<HostData> {
        let _gate = self.w.exclusive();
        self.w.time(1, |enc| self.record(enc))?;
        Ok(HostData::from_bytes(self.cache.dtype(), &self.w.read_back(&self.out, self.out_bytes)?))
    }

    fn time(&mut self, iters: usize) -> Result<f64> {
        let _gate = self.w.exclusive();
        self.w.time(iters, |enc| self.record(enc))
    }

    fn dump(&self) -> Result<Option<CacheDump>> {
        let _gate = self.w.exclusive();
        let (s, dtype) = (&self.params.cache, self.cache.dtype());
        let [k, kt, v, mean, lens] = self.cache.buffers();
        let elems = |b: &wgpu::Buffer| -> Result<Vec<f64>> {
            Ok(HostData::from_bytes(dtype, &self.w.read_back(b, s.kv_len() * dtype.size())?).to_f64())
        };
        Ok(Some(CacheDump {
            k: elems(k)?,
            kt: elems(kt)?,
            v: elems(v)?,
            mean: bytes_to_vec(&self.w.read_back(mean, s.mean_len() * 4)?),
            seq_lens: bytes_to_vec(&self.w.read_back(lens, s.batch * 4)?),
        }))
    }
}
