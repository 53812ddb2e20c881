//! Host-level drivers: upload host data, launch on any [`Backend`], read the
//! results back, and time resident launches. Tests, the command-line checks
//! and the benches use them; engines (and `crate::ring`) call the per-backend
//! launchers on their own buffers instead.

use super::{reference, BlockParams, BlockShape};
use crate::backend::{Backend, CudaBackend, WgpuBackend, WgpuTensor};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::host::{HostData, Rng};
use crate::with_host_data;
use cudarc::driver::{CudaSlice, CudaStream};
use std::time::Instant;

/// Host copies of one pair's inputs, laid out as `params.layout` says; `d_o`
/// (the output gradient) uses the `o` strides.
#[derive(Debug, Clone)]
pub struct BlockInputs {
    pub q: HostData,
    pub k: HostData,
    pub v: HostData,
    pub d_o: HostData,
}

impl BlockInputs {
    /// Uniform random values in [-1, 1) (padding between rows included).
    pub fn random(params: &BlockParams, dtype: DType, rng: &mut Rng) -> Self {
        BlockInputs {
            q: HostData::random(dtype, params.q_elems(), rng),
            k: HostData::random(dtype, params.k_elems(), rng),
            v: HostData::random(dtype, params.v_elems(), rng),
            d_o: HostData::random(dtype, params.o_elems(), rng),
        }
    }

    pub fn dtype(&self) -> DType {
        self.q.dtype()
    }
}

/// A running f32 partial: `o` `[B, Hq, q_len, D]` and `lse` `[B, Hq, q_len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
}

impl State {
    /// NaN everywhere: what a non-accumulating launch must overwrite.
    pub fn poisoned(s: &BlockShape) -> Self {
        State { o: vec![f32::NAN; s.o_elems()], lse: vec![f32::NAN; s.lse_elems()] }
    }
}

/// f32 gradients: `dq` like `O`, `dk`/`dv` `[B, Hkv, kv_len, D]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads32 {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

impl Grads32 {
    pub fn zeros(s: &BlockShape) -> Self {
        Grads32 { dq: vec![0.0; s.o_elems()], dk: vec![0.0; s.kv_grad_elems()], dv: vec![0.0; s.kv_grad_elems()] }
    }
}

fn typed<T: Element>(d: &HostData) -> &[T] {
    bytemuck::cast_slice(d.as_bytes())
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// The f64 reference forward (`o`, `lse`).
pub fn reference_forward(params: &BlockParams, x: &BlockInputs) -> Result<reference::Partial> {
    with_host_data!(&x.q, q, T => reference::forward::<T>(params, q, typed(&x.k), typed(&x.v)))
}

/// The f64 reference backward given the final f32 `o` and `lse`.
pub fn reference_backward(params: &BlockParams, x: &BlockInputs, st: &State) -> Result<reference::Grads> {
    with_host_data!(&x.q, q, T => {
        reference::backward::<T, f32>(params, q, typed(&x.k), typed(&x.v), typed(&x.d_o), &st.o, &st.lse)
    })
}

/// One forward launch on `backend`. With `init` the launch accumulates into it;
/// without, into NaN-poisoned buffers.
pub fn forward(backend: &Backend, params: &BlockParams, x: &BlockInputs, init: Option<&State>) -> Result<State> {
    let accumulate = init.is_some();
    let mut st = init.cloned().unwrap_or_else(|| State::poisoned(&params.shape));
    match backend {
        Backend::Cpu => with_host_data!(&x.q, q, T => {
            reference::forward_into::<T>(params, q, typed(&x.k), typed(&x.v), &mut st.o, &mut st.lse, accumulate)
        })?,
        Backend::Wgpu(w) => {
            let _gate = w.exclusive();
            let [q, k, v] = [&x.q, &x.k, &x.v].map(|d| w.upload(d.as_bytes()));
            let [o, lse] = [&st.o, &st.lse].map(|d| w.upload(bytemuck::cast_slice(d)));
            let t = WgpuTensor::new;
            let mut enc = w.device().create_command_encoder(&Default::default());
            super::wgpu::forward(w, &mut enc, params, x.dtype(), t(&q), t(&k), t(&v), t(&o), t(&lse), accumulate)?;
            w.submit_and_wait(enc)?;
            st = State { o: read_f32(w, &o, st.o.len())?, lse: read_f32(w, &lse, st.lse.len())? };
        }
        Backend::Cuda(c) => with_host_data!(&x.q, q, T => {
            let (s, err) = (c.stream(), CudaBackend::device_error);
            let (dq, dk, dv) = (s.clone_htod(q).map_err(err)?, htod::<T>(s, &x.k)?, htod::<T>(s, &x.v)?);
            let (mut o, mut lse) = (s.clone_htod(&st.o).map_err(err)?, s.clone_htod(&st.lse).map_err(err)?);
            super::cuda::forward(c, s, params, &dq, &dk, &dv, &mut o, &mut lse, accumulate)?;
            st = State { o: s.clone_dtoh(&o).map_err(err)?, lse: s.clone_dtoh(&lse).map_err(err)? };
        }),
    }
    Ok(st)
}

/// Merges `b` into `a` on `backend` and returns the result.
pub fn merge(backend: &Backend, shape: &BlockShape, a: &State, b: &State) -> Result<State> {
    let mut st = a.clone();
    match backend {
        Backend::Cpu => reference::merge_into(shape, &mut st.o, &mut st.lse, &b.o, &b.lse)?,
        Backend::Wgpu(w) => {
            let _gate = w.exclusive();
            let [o, lse, ob, lseb] = [&a.o, &a.lse, &b.o, &b.lse].map(|d| w.upload(bytemuck::cast_slice(d)));
            let t = WgpuTensor::new;
            let mut enc = w.device().create_command_encoder(&Default::default());
            super::wgpu::merge(w, &mut enc, shape, t(&o), t(&lse), t(&ob), t(&lseb))?;
            w.submit_and_wait(enc)?;
            st = State { o: read_f32(w, &o, a.o.len())?, lse: read_f32(w, &lse, a.lse.len())? };
        }
        Backend::Cuda(c) => {
            let (s, err) = (c.stream(), CudaBackend::device_error);
            let (mut o, mut lse) = (s.clone_htod(&a.o).map_err(err)?, s.clone_htod(&a.lse).map_err(err)?);
            let (ob, lseb) = (s.clone_htod(&b.o).map_err(err)?, s.clone_htod(&b.lse).map_err(err)?);
            super::cuda::merge(c, s, shape, &mut o, &mut lse, &ob, &lseb)?;
            st = State { o: s.clone_dtoh(&o).map_err(err)?, lse: s.clone_dtoh(&lse).map_err(err)? };
        }
    }
    Ok(st)
}

/// Finalizes `st` into a NaN-poisoned output of `dtype` (strided as `params.layout.o`).
pub fn finalize(backend: &Backend, params: &BlockParams, dtype: DType, st: &State) -> Result<HostData> {
    let poisoned = HostData::poisoned(dtype, params.o_elems());
    with_host_data!(poisoned, out, T => {
        let mut out = out;
        match backend {
            Backend::Cpu => reference::finalize_into::<T>(params, &st.o, &st.lse, &mut out)?,
            Backend::Wgpu(w) => {
                let _gate = w.exclusive();
                let [o, lse] = [&st.o, &st.lse].map(|d| w.upload(bytemuck::cast_slice(d)));
                let ob = w.upload(bytemuck::cast_slice(&out));
                let t = WgpuTensor::new;
                let mut enc = w.device().create_command_encoder(&Default::default());
                super::wgpu::finalize(w, &mut enc, params, dtype, t(&o), t(&lse), t(&ob))?;
                w.submit_and_wait(enc)?;
                out = crate::host::bytes_to_vec(&w.read_back(&ob, out.len() * dtype.size())?);
            }
            Backend::Cuda(c) => {
                let (s, err) = (c.stream(), CudaBackend::device_error);
                let (o, lse) = (s.clone_htod(&st.o).map_err(err)?, s.clone_htod(&st.lse).map_err(err)?);
                let mut ob = s.clone_htod(&out).map_err(err)?;
                super::cuda::finalize::<T>(c, s, params, &o, &lse, &mut ob)?;
                out = s.clone_dtoh(&ob).map_err(err)?;
            }
        }
        Ok(HostData::from_bytes(dtype, bytemuck::cast_slice(&out)))
    })
}

/// The pre-pass and the backward of one pair on `backend`, accumulated into `init`.
pub fn backward(
    backend: &Backend,
    params: &BlockParams,
    x: &BlockInputs,
    st: &State,
    init: &Grads32,
) -> Result<Grads32> {
    let mut g = init.clone();
    let dtype = x.dtype();
    match backend {
        Backend::Cpu => with_host_data!(&x.q, q, T => {
            let mut delta = vec![f32::NAN; params.shape.lse_elems()];
            reference::backward_prepass_into::<T>(params, &st.o, typed(&x.d_o), &mut delta)?;
            reference::backward_into::<T>(
                params, q, typed(&x.k), typed(&x.v), typed(&x.d_o), &st.o, &st.lse, &delta,
                &mut g.dq, &mut g.dk, &mut g.dv,
            )
        })?,
        Backend::Wgpu(w) => {
            let _gate = w.exclusive();
            let [q, k, v, d_o] = [&x.q, &x.k, &x.v, &x.d_o].map(|d| w.upload(d.as_bytes()));
            let delta = w.upload(bytemuck::cast_slice(&vec![f32::NAN; params.shape.lse_elems()]));
            let [o, lse, dq, dk, dv] = [&st.o, &st.lse, &g.dq, &g.dk, &g.dv].map(|d| w.upload(bytemuck::cast_slice(d)));
            let t = WgpuTensor::new;
            let mut enc = w.device().create_command_encoder(&Default::default());
            super::wgpu::backward_prepass(w, &mut enc, params, dtype, t(&o), t(&d_o), t(&delta))?;
            super::wgpu::backward(
                w,
                &mut enc,
                params,
                dtype,
                t(&q),
                t(&k),
                t(&v),
                t(&d_o),
                t(&lse),
                t(&delta),
                t(&dq),
                t(&dk),
                t(&dv),
            )?;
            w.submit_and_wait(enc)?;
            g = Grads32 {
                dq: read_f32(w, &dq, g.dq.len())?,
                dk: read_f32(w, &dk, g.dk.len())?,
                dv: read_f32(w, &dv, g.dv.len())?,
            };
        }
        Backend::Cuda(c) => with_host_data!(&x.q, q, T => {
            let (s, err) = (c.stream(), CudaBackend::device_error);
            let (dq_, dk_, dv_, ddo) = (s.clone_htod(q).map_err(err)?, htod::<T>(s, &x.k)?, htod::<T>(s, &x.v)?, htod::<T>(s, &x.d_o)?);
            let (o, lse) = (s.clone_htod(&st.o).map_err(err)?, s.clone_htod(&st.lse).map_err(err)?);
            let mut delta = s.clone_htod(&vec![f32::NAN; params.shape.lse_elems()]).map_err(err)?;
            let mut gq = s.clone_htod(&g.dq).map_err(err)?;
            let mut gk = s.clone_htod(&g.dk).map_err(err)?;
            let mut gv = s.clone_htod(&g.dv).map_err(err)?;
            super::cuda::backward_prepass(c, s, params, &o, &ddo, &mut delta)?;
            super::cuda::backward(c, s, params, &dq_, &dk_, &dv_, &ddo, &lse, &delta, &mut gq, &mut gk, &mut gv)?;
            g = Grads32 {
                dq: s.clone_dtoh(&gq).map_err(err)?,
                dk: s.clone_dtoh(&gk).map_err(err)?,
                dv: s.clone_dtoh(&gv).map_err(err)?,
            };
        }),
    }
    Ok(g)
}

/// Relative L2 errors of a run against the reference: `(o, lse)` of a forward.
pub fn forward_error(got: &State, want: &reference::Partial) -> (f64, f64) {
    (crate::host::rel_l2(&f64s(&got.o), &want.o), lse_error(&got.lse, &want.lse))
}

/// Relative L2 error of `lse` over the rows that saw a key; infinite when the
/// two disagree on which rows saw none.
pub fn lse_error(got: &[f32], want: &[f64]) -> f64 {
    let mut g = Vec::new();
    let mut w = Vec::new();
    for (&a, &b) in got.iter().zip(want) {
        if (a == f32::NEG_INFINITY) != (b == f64::NEG_INFINITY) {
            return f64::INFINITY;
        }
        if b != f64::NEG_INFINITY {
            g.push(a as f64);
            w.push(b);
        }
    }
    if w.is_empty() {
        0.0
    } else {
        crate::host::rel_l2(&g, &w)
    }
}

/// Relative L2 error of gradients (dq, dk, dv concatenated) against the reference.
pub fn grads_error(got: &Grads32, want: &reference::Grads) -> f64 {
    let g: Vec<f64> = [&got.dq, &got.dk, &got.dv].into_iter().flat_map(|x| f64s(x)).collect();
    let w: Vec<f64> = [&want.dq, &want.dk, &want.dv].into_iter().flatten().copied().collect();
    crate::host::rel_l2(&g, &w)
}

fn read_f32(w: &WgpuBackend, b: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
    Ok(crate::host::bytes_to_vec(&w.read_back(b, n * 4)?))
}

fn htod<T: Element>(s: &std::sync::Arc<CudaStream>, d: &HostData) -> Result<CudaSlice<T>> {
    s.clone_htod(typed::<T>(d)).map_err(CudaBackend::device_error)
}

/// Which launches a timing covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// `forward` (not accumulating).
    Forward,
    /// `backward_prepass` + `backward`.
    Backward,
}

/// Mean seconds per launch (of `pass`) over `iters` launches, inputs resident,
/// after one warm-up. The CPU backend times the f64 reference launchers.
pub fn time(backend: &Backend, params: &BlockParams, x: &BlockInputs, pass: Pass, iters: usize) -> Result<f64> {
    let iters = iters.max(1);
    match backend {
        Backend::Cpu => {
            let st = forward(backend, params, x, None)?;
            let g = Grads32::zeros(&params.shape);
            let t0 = Instant::now();
            for _ in 0..iters {
                match pass {
                    Pass::Forward => drop(forward(backend, params, x, None)?),
                    Pass::Backward => drop(backward(backend, params, x, &st, &g)?),
                }
            }
            Ok(t0.elapsed().as_secs_f64() / iters as f64)
        }
        Backend::Wgpu(w) => time_wgpu(w, params, x, pass, iters),
        Backend::Cuda(c) => with_host_data!(&x.q, q, T => time_cuda::<T>(c, params, q, x, pass, iters)),
    }
}

fn time_wgpu(w: &WgpuBackend, params: &BlockParams, x: &BlockInputs, pass: Pass, iters: usize) -> Result<f64> {
    let _gate = w.exclusive();
    let s = &params.shape;
    let dtype = x.dtype();
    let [q, k, v, d_o] = [&x.q, &x.k, &x.v, &x.d_o].map(|d| w.upload(d.as_bytes()));
    let f32buf = |n: usize| w.upload(bytemuck::cast_slice(&vec![0f32; n]));
    let (o, lse, delta) = (f32buf(s.o_elems()), f32buf(s.lse_elems()), f32buf(s.lse_elems()));
    let (dq, dk, dv) = (f32buf(s.o_elems()), f32buf(s.kv_grad_elems()), f32buf(s.kv_grad_elems()));
    let t = WgpuTensor::new;
    let fwd = |enc: &mut wgpu::CommandEncoder| {
        super::wgpu::forward(w, enc, params, dtype, t(&q), t(&k), t(&v), t(&o), t(&lse), false)
    };
    let bwd = |enc: &mut wgpu::CommandEncoder| {
        super::wgpu::backward_prepass(w, enc, params, dtype, t(&o), t(&d_o), t(&delta))?;
        super::wgpu::backward(
            w,
            enc,
            params,
            dtype,
            t(&q),
            t(&k),
            t(&v),
            t(&d_o),
            t(&lse),
            t(&delta),
            t(&dq),
            t(&dk),
            t(&dv),
        )
    };
    w.time(1, fwd)?;
    match pass {
        Pass::Forward => w.time(iters, fwd),
        Pass::Backward => {
            w.time(1, bwd)?;
            w.time(iters, bwd)
        }
    }
}

fn time_cuda<T: Element>(
    c: &CudaBackend,
    params: &BlockParams,
    q: &[T],
    x: &BlockInputs,
    pass: Pass,
    iters: usize,
) -> Result<f64> {
    let (st, err) = (c.stream(), CudaBackend::device_error);
    let s = &params.shape;
    let (dq_, dk_, dv_, ddo) =
        (st.clone_htod(q).map_err(err)?, htod::<T>(st, &x.k)?, htod::<T>(st, &x.v)?, htod::<T>(st, &x.d_o)?);
    let z = |n: usize| st.alloc_zeros::<f32>(n).map_err(err);
    let (mut o, mut lse, mut delta) = (z(s.o_elems())?, z(s.lse_elems())?, z(s.lse_elems())?);
    let (mut gq, mut gk, mut gv) = (z(s.o_elems())?, z(s.kv_grad_elems())?, z(s.kv_grad_elems())?);
    super::cuda::forward(c, st, params, &dq_, &dk_, &dv_, &mut o, &mut lse, false)?;
    match pass {
        Pass::Forward => {
            c.time(iters, || super::cuda::forward(c, st, params, &dq_, &dk_, &dv_, &mut o, &mut lse, false))
        }
        Pass::Backward => c.time(iters, || {
            super::cuda::backward_prepass(c, st, params, &o, &ddo, &mut delta)?;
            super::cuda::backward(c, st, params, &dq_, &dk_, &dv_, &ddo, &lse, &delta, &mut gq, &mut gk, &mut gv)
        }),
    }
}
