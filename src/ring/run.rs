//! Host-level driver: shard whole-sequence host tensors, run the ring on any
//! [`Backend`] (the CPU transport, the wgpu virtual ranks, the CUDA in-process
//! ranks), put the results back together. Tests, the CLI and the benches use
//! it; engines call the transports on their own shards.

use super::wgpu::WgpuRing;
use super::{cpu, RingGrads, RingParams, RingState};
use crate::backend::Backend;
use crate::backend::WgpuBackend;
use crate::blockwise::{reference, BlockParams, BlockShape, Mask};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::host::{HostData, Rng};
use crate::with_host_data;
use std::time::Instant;

/// Whole-sequence inputs, contiguous `[B, H, S, D]`: `q` and `d_o` with the
/// query heads, `k` and `v` with the KV heads.
#[derive(Debug, Clone)]
pub struct RingInputs {
    pub q: HostData,
    pub k: HostData,
    pub v: HostData,
    pub d_o: HostData,
}

impl RingInputs {
    /// Uniform random values in [-1, 1).
    pub fn random(p: &RingParams, dtype: DType, rng: &mut Rng) -> Self {
        let (qn, kn) = (p.q_elems(), p.kv_elems());
        RingInputs {
            q: HostData::random(dtype, qn, rng),
            k: HostData::random(dtype, kn, rng),
            v: HostData::random(dtype, kn, rng),
            d_o: HostData::random(dtype, qn, rng),
        }
    }

    pub fn dtype(&self) -> DType {
        self.q.dtype()
    }
}

impl RingParams {
    /// Elements of a whole-sequence `Q`/`dO`/output and of a `K`/`V`.
    pub fn q_elems(&self) -> usize {
        self.batch * self.q_heads * self.plan.seq_len * self.head_dim
    }

    pub fn kv_elems(&self) -> usize {
        self.batch * self.kv_heads * self.plan.seq_len * self.head_dim
    }

    /// The dense problem over the whole sequence (`q0 = k0 = 0`).
    pub fn dense(&self) -> BlockParams {
        let s = self.plan.seq_len;
        let shape = BlockShape {
            batch: self.batch,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            q_len: s,
            kv_len: s,
        };
        let mask = if self.plan.causal { Mask::Causal } else { Mask::None };
        BlockParams::new(shape, mask).with_scale(self.scale)
    }
}

/// Whole-sequence results, contiguous, in f64: `out` `[B, H_q, S, D]` (cast to
/// the input dtype first, as the ring writes it), `lse` `[B, H_q, S]`, and the
/// gradients when the backward ran (`dq` like `out`, `dk`/`dv` `[B, H_kv, S, D]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RingOutput {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    pub grads: Option<Grads>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// Dense attention over the whole sequence by the f64 blockwise reference: what the ring must equal.
pub fn reference(p: &RingParams, x: &RingInputs, backward: bool) -> Result<RingOutput> {
    p.validate()?;
    check_inputs(p, x)?;
    let bp = p.dense();
    with_host_data!(&x.q, q, T => {
        let (k, v, d_o) = (typed::<T>(&x.k), typed::<T>(&x.v), typed::<T>(&x.d_o));
        let part = reference::forward(&bp, q, k, v)?;
        let grads = if backward {
            let g = reference::backward(&bp, q, k, v, d_o, &part.o, &part.lse)?;
            Some(Grads { dq: g.dq, dk: g.dk, dv: g.dv })
        } else {
            None
        };
        Ok(RingOutput { out: part.o, lse: part.lse, grads })
    })
}

/// Runs the ring forward (and the backward) on `backend` and gathers the results.
pub fn run(backend: &Backend, p: &RingParams, x: &RingInputs, backward: bool) -> Result<RingOutput> {
    p.validate()?;
    check_inputs(p, x)?;
    with_host_data!(&x.q, q, T => {
        let sh = Shards::<T>::new(p, q, x)?;
        let (out, states, grads) = match backend {
            Backend::Cpu => sh.run_cpu(backward)?,
            Backend::Wgpu(w) => sh.run_wgpu(w, backward)?,
            Backend::Cuda(c) => sh.run_cuda(c, backward)?,
        };
        gather(p, &out, &states, grads.as_deref())
    })
}

/// Mean seconds per ring call (forward, or forward and backward) over `iters` calls, inputs sharded once.
pub fn time(backend: &Backend, p: &RingParams, x: &RingInputs, backward: bool, iters: usize) -> Result<f64> {
    p.validate()?;
    check_inputs(p, x)?;
    with_host_data!(&x.q, q, T => {
        let sh = Shards::<T>::new(p, q, x)?;
        match backend {
            Backend::Cpu => {
                let t0 = Instant::now();
                for _ in 0..iters.max(1) {
                    sh.run_cpu(backward)?;
                }
                Ok(t0.elapsed().as_secs_f64() / iters.max(1) as f64)
            }
            Backend::Wgpu(w) => {
                let _gate = w.exclusive();
                let ring = sh.wgpu_ring(w)?;
                let record = |enc: &mut wgpu::CommandEncoder| {
                    ring.record_forward(enc)?;
                    if backward {
                        ring.record_backward(enc)?;
                    }
                    Ok(())
                };
                w.time(1, record)?;
                w.time(iters.max(1), record)
            }
            Backend::Cuda(c) => {
                let mut ring = super::cuda::CudaRing::new(std::slice::from_ref(c), p, &sh.q, &sh.k, &sh.v, &sh.d_o)?;
                let once = |ring: &mut super::cuda::CudaRing<T>| -> Result<()> {
                    ring.forward()?;
                    if backward {
                        ring.backward()?;
                    }
                    Ok(())
                };
                once(&mut ring)?;
                ring.synchronize()?;
                let t0 = Instant::now();
                for _ in 0..iters.max(1) {
                    once(&mut ring)?;
                }
                ring.synchronize()?;
                Ok(t0.elapsed().as_secs_f64() / iters.max(1) as f64)
            }
        }
    })
}

fn check_inputs(p: &RingParams, x: &RingInputs) -> Result<()> {
    let dtype = x.dtype();
    for (arg, d, need) in
        [("q", &x.q, p.q_elems()), ("k", &x.k, p.kv_elems()), ("v", &x.v, p.kv_elems()), ("d_o", &x.d_o, p.q_elems())]
    {
        if d.dtype() != dtype {
            return Err(Error::invalid(arg, format!("is {} while q is {dtype}", d.dtype())));
        }
        if d.len() != need {
            return Err(Error::invalid(arg, format!("holds {} elements, [B, H, S, D] needs {need}", d.len())));
        }
    }
    Ok(())
}

pub(crate) fn typed<T: Element>(d: &HostData) -> &[T] {
    bytemuck::cast_slice(d.as_bytes())
}

/// Every rank's input shards.
pub(crate) struct Shards<T> {
    pub p: RingParams,
    pub q: Vec<Vec<T>>,
    pub k: Vec<Vec<T>>,
    pub v: Vec<Vec<T>>,
    pub d_o: Vec<Vec<T>>,
}

type RunResult<T> = (Vec<Vec<T>>, Vec<RingState>, Option<Vec<RingGrads>>);

impl<T: Element> Shards<T> {
    pub fn new(p: &RingParams, q: &[T], x: &RingInputs) -> Result<Self> {
        let (plan, d) = (&p.plan, p.head_dim);
        let (qo, ko) = (p.batch * p.q_heads, p.batch * p.kv_heads);
        Ok(Shards {
            p: *p,
            q: plan.shard(q, qo, d)?,
            k: plan.shard(typed::<T>(&x.k), ko, d)?,
            v: plan.shard(typed::<T>(&x.v), ko, d)?,
            d_o: plan.shard(typed::<T>(&x.d_o), qo, d)?,
        })
    }

    fn run_cpu(&self, backward: bool) -> Result<RunResult<T>> {
        let p = &self.p;
        let mut out: Vec<Vec<T>> = (0..p.plan.ranks).map(|r| vec![T::from_f32(f32::NAN); p.q_shard_elems(r)]).collect();
        let states = cpu::forward(p, &self.q, &self.k, &self.v, &mut out)?;
        let grads =
            if backward { Some(cpu::backward(p, &self.q, &self.k, &self.v, &self.d_o, &states)?) } else { None };
        Ok((out, states, grads))
    }
}

impl<T: Element> Shards<T> {
    fn wgpu_ring<'w>(&self, w: &'w WgpuBackend) -> Result<WgpuRing<'w>> {
        let bytes = |v: &[Vec<T>]| -> Vec<Vec<u8>> { v.iter().map(|x| bytemuck::cast_slice(x).to_vec()).collect() };
        let (q, k, v, d_o) = (bytes(&self.q), bytes(&self.k), bytes(&self.v), bytes(&self.d_o));
        fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
            v.iter().map(|x| &x[..]).collect()
        }
        WgpuRing::new(w, &self.p, T::DTYPE, &refs(&q), &refs(&k), &refs(&v), &refs(&d_o))
    }

    fn run_wgpu(&self, w: &WgpuBackend, backward: bool) -> Result<RunResult<T>> {
        let _gate = w.exclusive();
        let ring = self.wgpu_ring(w)?;
        w.time(1, |enc| {
            ring.record_forward(enc)?;
            if backward {
                ring.record_backward(enc)?;
            }
            Ok(())
        })?;
        let (outs, states) = ring.read_forward()?;
        let outs = outs.iter().map(|b| crate::host::bytes_to_vec::<T>(b)).collect();
        let grads = if backward { Some(ring.read_grads()?) } else { None };
        Ok((outs, states, grads))
    }

    /// Every rank on the backend's GPU (in-process ranks sharing one device).
    fn run_cuda(&self, c: &std::sync::Arc<crate::backend::CudaBackend>, backward: bool) -> Result<RunResult<T>> {
        let mut ring =
            super::cuda::CudaRing::new(std::slice::from_ref(c), &self.p, &self.q, &self.k, &self.v, &self.d_o)?;
        ring.forward()?;
        if backward {
            ring.backward()?;
        }
        let (outs, states) = ring.read_forward()?;
        let grads = if backward { Some(ring.read_grads()?) } else { None };
        Ok((outs, states, grads))
    }
}

/// Puts every rank's output shard, forward state and gradients (as each
/// transport's `read_forward`/`read_grads` return them, rank by rank) back
/// into whole-sequence order, as [`run`] returns them. For ranks run
/// elsewhere, e.g. NCCL's processes, once their results are in one place.
pub fn gather<T: Element>(
    p: &RingParams,
    out: &[Vec<T>],
    states: &[RingState],
    grads: Option<&[RingGrads]>,
) -> Result<RingOutput> {
    let (plan, d, n) = (&p.plan, p.head_dim, p.plan.ranks);
    let (qo, ko) = (p.batch * p.q_heads, p.batch * p.kv_heads);
    let out: Vec<Vec<f64>> = out.iter().map(|o| o.iter().map(|x| x.to_f64()).collect()).collect();
    let join = |per_rank: Vec<&[Vec<f32>]>, outer: usize, row: usize| -> Result<Vec<f64>> {
        let shards: Vec<Vec<f64>> =
            (0..n).map(|r| p.join_segments(r, per_rank[r], outer, row).into_iter().map(f64::from).collect()).collect();
        plan.unshard(&shards, outer, row)
    };
    let lse = join(states.iter().map(|s| &s.lse[..]).collect(), qo, 1)?;
    let grads = match grads {
        Some(g) => Some(Grads {
            dq: join(g.iter().map(|g| &g.dq[..]).collect(), qo, d)?,
            dk: join(g.iter().map(|g| &g.dk[..]).collect(), ko, d)?,
            dv: join(g.iter().map(|g| &g.dv[..]).collect(), ko, d)?,
        }),
        None => None,
    };
    Ok(RingOutput { out: plan.unshard(&out, qo, d)?, lse, grads })
}
