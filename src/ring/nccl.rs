//! The NCCL transport (crate feature `nccl`): one process (or thread) per GPU,
//! on one machine or many. Each step is one NCCL group: send the held block
//! to rank `r + 1`, receive the next one from rank `r - 1`, on a
//! communication stream, while the compute stream works on the current block
//! (double receive buffers, events between the two streams). The backward
//! sends `(K, V, dK, dV)` in one group after each step's launches; after the
//! last step dK/dV make one more hop, home.
//!
//! Setting up: rank 0 calls [`new_id`], hands [`id_to_bytes`] to every other
//! process (a file, an environment variable, its own launcher's channel);
//! each process rebuilds it with [`id_from_bytes`] and calls
//! [`NcclRing::new`] with its rank. libnccl is loaded at run time.

use super::{RingGrads, RingParams, RingState, Segment};
use crate::backend::CudaBackend;
use crate::blockwise::cuda as bw;
use crate::dtype::Element;
use crate::error::{ensure, Error, Result};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use cudarc::nccl::{group_end, group_start, Comm, Id, NcclType};
use std::sync::Arc;

fn err(e: impl std::fmt::Display) -> Error {
    CudaBackend::device_error(e)
}

fn nccl_err(e: cudarc::nccl::result::NcclError) -> Error {
    Error::device("nccl", format!("{e:?}"))
}

/// A fresh unique id, made once by rank 0.
pub fn new_id() -> Result<Id> {
    Id::new().map_err(nccl_err)
}

/// The id's 128 bytes, to hand to the other processes.
pub fn id_to_bytes(id: &Id) -> [u8; 128] {
    id.internal().map(|c| c as u8)
}

/// Rebuilds an id from the bytes of [`id_to_bytes`].
pub fn id_from_bytes(bytes: &[u8]) -> Result<Id> {
    ensure(bytes.len() == 128, "id", || format!("{} bytes, an NCCL unique id has 128", bytes.len()))?;
    let mut internal = [0 as std::ffi::c_char; 128];
    for (d, &b) in internal.iter_mut().zip(bytes) {
        *d = b as std::ffi::c_char;
    }
    Ok(Id::uninit(internal))
}

/// This process's rank of the ring: its shards, buffers, streams and communicator.
pub struct NcclRing<T: Element + NcclType> {
    p: RingParams,
    rank: usize,
    backend: Arc<CudaBackend>,
    compute: Arc<CudaStream>,
    comm: Comm,
    comm_stream: Arc<CudaStream>,
    q: CudaSlice<T>,
    d_o: CudaSlice<T>,
    out: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    k_in: [CudaSlice<T>; 2],
    v_in: [CudaSlice<T>; 2],
    dk: [CudaSlice<f32>; 2],
    dv: [CudaSlice<f32>; 2],
    o: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    dq: CudaSlice<f32>,
    /// Recorded on the communication stream once slot `s` has been received.
    received: [CudaEvent; 2],
    /// Recorded on the compute stream after step `t` (in `computed[t % 2]`).
    computed: [CudaEvent; 2],
}

impl<T: Element + NcclType> NcclRing<T> {
    /// Joins the communicator as `rank` of `p.plan.ranks` (blocks until every
    /// rank has joined) and uploads this rank's shards (contiguous
    /// `[B, H, rank_len(rank), D]`) to `backend`'s device.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: Arc<CudaBackend>,
        p: &RingParams,
        rank: usize,
        id: Id,
        q: &[T],
        k: &[T],
        v: &[T],
        d_o: &[T],
    ) -> Result<Self> {
        p.validate()?;
        ensure(rank < p.plan.ranks, "rank", || format!("{rank} is not below the {} ranks", p.plan.ranks))?;
        for (arg, have, need) in [
            ("q", q.len(), p.q_shard_elems(rank)),
            ("k", k.len(), p.kv_shard_elems(rank)),
            ("v", v.len(), p.kv_shard_elems(rank)),
            ("d_o", d_o.len(), p.q_shard_elems(rank)),
        ] {
            ensure(have == need, arg, || format!("holds {have} elements, rank {rank} needs {need}"))?;
        }
        let ctx = backend.context().clone();
        let compute = ctx.new_stream().map_err(err)?;
        let comm_stream = ctx.new_stream().map_err(err)?;
        let s = &compute;
        let kv_max = p.batch * p.kv_heads * p.plan.max_rank_len() * p.head_dim;
        let rows = p.batch * p.q_heads * p.plan.rank_len(rank);
        let poison = |n: usize| s.clone_htod(&vec![T::from_f32(f32::NAN); n.max(1)]).map_err(err);
        let zeros = |n: usize| s.alloc_zeros::<f32>(n.max(1)).map_err(err);
        let event = || ctx.new_event(None).map_err(err);
        let ring = NcclRing {
            q: s.clone_htod(q).map_err(err)?,
            d_o: s.clone_htod(d_o).map_err(err)?,
            out: poison(rows * p.head_dim)?,
            k: s.clone_htod(k).map_err(err)?,
            v: s.clone_htod(v).map_err(err)?,
            k_in: [poison(kv_max)?, poison(kv_max)?],
            v_in: [poison(kv_max)?, poison(kv_max)?],
            dk: [zeros(kv_max)?, zeros(kv_max)?],
            dv: [zeros(kv_max)?, zeros(kv_max)?],
            o: zeros(rows * p.head_dim)?,
            lse: zeros(rows)?,
            delta: zeros(rows)?,
            dq: zeros(rows * p.head_dim)?,
            received: [event()?, event()?],
            computed: [event()?, event()?],
            comm: Comm::from_rank(comm_stream.clone(), rank, p.plan.ranks, id).map_err(nccl_err)?,
            comm_stream: comm_stream.clone(),
            p: *p,
            rank,
            backend,
            compute,
        };
        comm_stream.join(&ring.compute).map_err(err)?;
        Ok(ring)
    }

    fn comm_stream(&self) -> &Arc<CudaStream> {
        &self.comm_stream
    }

    fn peers(&self) -> (i32, i32) {
        let n = self.p.plan.ranks;
        (((self.rank + 1) % n) as i32, ((self.rank + n - 1) % n) as i32)
    }

    /// One group: send K/V held at step `t` (and dK/dV when `grads`) to the
    /// next rank, receive the block of step `t + 1` (when `kv_in`) into slot `(t + 1) % 2`.
    fn exchange(&mut self, t: usize, kv: bool, grads: bool) -> Result<()> {
        let (p, r) = (self.p, self.rank);
        let (next, prev) = self.peers();
        let send_n = p.kv_shard_elems(p.plan.source(t, r));
        let recv_n = p.kv_shard_elems(p.plan.source(t + 1, r));
        let (now, slot) = (t % 2, (t + 1) % 2);
        group_start().map_err(nccl_err)?;
        let res: Result<()> = (|| {
            let comm = &self.comm;
            if kv {
                let (k, v) = if t == 0 { (&self.k, &self.v) } else { (&self.k_in[now], &self.v_in[now]) };
                comm.send(&k.slice(..send_n), next).map_err(nccl_err)?;
                comm.send(&v.slice(..send_n), next).map_err(nccl_err)?;
            }
            if grads {
                comm.send(&self.dk[now].slice(..send_n), next).map_err(nccl_err)?;
                comm.send(&self.dv[now].slice(..send_n), next).map_err(nccl_err)?;
            }
            if kv {
                comm.recv(&mut self.k_in[slot].slice_mut(..recv_n), prev).map_err(nccl_err)?;
                comm.recv(&mut self.v_in[slot].slice_mut(..recv_n), prev).map_err(nccl_err)?;
            }
            if grads {
                comm.recv(&mut self.dk[slot].slice_mut(..recv_n), prev).map_err(nccl_err)?;
                comm.recv(&mut self.dv[slot].slice_mut(..recv_n), prev).map_err(nccl_err)?;
            }
            Ok(())
        })();
        group_end().map_err(nccl_err)?;
        res?;
        self.received[slot].record(self.comm_stream()).map_err(err)
    }

    fn seg_offsets(&self, seg: &Segment) -> (usize, usize) {
        let rows = self.p.batch * self.p.q_heads * seg.local;
        (rows * self.p.head_dim, rows)
    }

    /// Records the forward on this rank's streams (every rank must call it).
    pub fn forward(&mut self) -> Result<()> {
        let (p, r, n) = (self.p, self.rank, self.p.plan.ranks);
        for t in 0..n {
            if t + 1 < n {
                // The slot received into was read by this rank's step t - 1.
                if t > 0 {
                    self.comm_stream().wait(&self.computed[(t - 1) % 2]).map_err(err)?;
                }
                self.exchange(t, true, false)?;
            }
            if t > 0 {
                self.compute.wait(&self.received[t % 2]).map_err(err)?;
            }
            let step = p.plan.step(t, r);
            let segs = p.plan.segments(r);
            // Step 0 computes every query segment against itself first, so later steps accumulate.
            let mut started = vec![t > 0; segs.len()];
            for part in &step.parts {
                let bp = p.part_params(r, step.source, part);
                let (qo, ko) = (p.q_offset(part.q_start), p.kv_offset(part.kv_start));
                let (oo, lo) = self.seg_offsets(&segs[part.q_seg]);
                let (k, v) = if t == 0 { (&self.k, &self.v) } else { (&self.k_in[t % 2], &self.v_in[t % 2]) };
                #[rustfmt::skip]
                bw::forward(
                    &self.backend, &self.compute, &bp,
                    &self.q.slice(qo..), &k.slice(ko..), &v.slice(ko..),
                    &mut self.o.slice_mut(oo..), &mut self.lse.slice_mut(lo..),
                    started[part.q_seg],
                )?;
                started[part.q_seg] = true;
            }
            self.computed[t % 2].record(&self.compute).map_err(err)?;
        }
        for seg in p.plan.segments(r) {
            let (oo, lo) = self.seg_offsets(&seg);
            let sp = p.segment_params(r, &seg);
            let out = &mut self.out.slice_mut(p.q_offset(seg.local)..);
            bw::finalize(&self.backend, &self.compute, &sp, &self.o.slice(oo..), &self.lse.slice(lo..), out)?;
        }
        Ok(())
    }

    /// Records the backward after [`Self::forward`] (every rank must call it).
    pub fn backward(&mut self) -> Result<()> {
        let (p, r, n) = (self.p, self.rank, self.p.plan.ranks);
        let c = self.compute.clone();
        c.join(self.comm_stream()).map_err(err)?;
        c.memset_zeros(&mut self.dq).map_err(err)?;
        c.memset_zeros(&mut self.dk[0]).map_err(err)?;
        c.memset_zeros(&mut self.dv[0]).map_err(err)?;
        for seg in p.plan.segments(r) {
            let (oo, lo) = self.seg_offsets(&seg);
            let sp = p.segment_params(r, &seg);
            let d_o = self.d_o.slice(p.q_offset(seg.local)..);
            bw::backward_prepass(&self.backend, &c, &sp, &self.o.slice(oo..), &d_o, &mut self.delta.slice_mut(lo..))?;
        }
        for t in 0..n {
            if t > 0 {
                c.wait(&self.received[t % 2]).map_err(err)?;
            }
            let step = p.plan.step(t, r);
            let (qsegs, ksegs) = (p.plan.segments(r), p.plan.segments(step.source));
            let slot = t % 2;
            for part in &step.parts {
                let bp = p.part_params(r, step.source, part);
                let (qo, ko) = (p.q_offset(part.q_start), p.kv_offset(part.kv_start));
                let (oo, lo) = self.seg_offsets(&qsegs[part.q_seg]);
                let go = p.batch * p.kv_heads * ksegs[part.kv_seg].local * p.head_dim;
                let (k, v) = if t == 0 { (&self.k, &self.v) } else { (&self.k_in[slot], &self.v_in[slot]) };
                let (mut dk, mut dv) = (self.dk[slot].slice_mut(go..), self.dv[slot].slice_mut(go..));
                #[rustfmt::skip]
                bw::backward(
                    &self.backend, &c, &bp,
                    &self.q.slice(qo..), &k.slice(ko..), &v.slice(ko..), &self.d_o.slice(qo..),
                    &self.lse.slice(lo..), &self.delta.slice(lo..),
                    &mut self.dq.slice_mut(oo..), &mut dk, &mut dv,
                )?;
            }
            self.computed[t % 2].record(&c).map_err(err)?;
            // (K, V, dK, dV) leave after this step's launches; after the last
            // step only dK/dV travel, home.
            self.comm_stream().wait(&self.computed[t % 2]).map_err(err)?;
            self.exchange(t, t + 1 < n, true)?;
        }
        c.wait(&self.received[n % 2]).map_err(err)
    }

    /// Waits and reads this rank's output shard and forward state back.
    pub fn read_forward(&self) -> Result<(Vec<T>, RingState)> {
        let (p, r, c) = (&self.p, self.rank, &self.compute);
        c.join(self.comm_stream()).map_err(err)?;
        let mut out: Vec<T> = c.clone_dtoh(&self.out).map_err(err)?;
        out.truncate(p.q_shard_elems(r));
        let o: Vec<f32> = c.clone_dtoh(&self.o).map_err(err)?;
        let lse: Vec<f32> = c.clone_dtoh(&self.lse).map_err(err)?;
        let state = RingState { o: self.split(&o, p.q_heads * p.head_dim), lse: self.split(&lse, p.q_heads) };
        Ok((out, state))
    }

    /// Waits and reads this rank's gradients back (`dK`/`dV` of its own block).
    pub fn read_grads(&self) -> Result<RingGrads> {
        let (p, c, n) = (&self.p, &self.compute, self.p.plan.ranks);
        c.join(self.comm_stream()).map_err(err)?;
        let dq: Vec<f32> = c.clone_dtoh(&self.dq).map_err(err)?;
        let dk: Vec<f32> = c.clone_dtoh(&self.dk[n % 2]).map_err(err)?;
        let dv: Vec<f32> = c.clone_dtoh(&self.dv[n % 2]).map_err(err)?;
        let (qd, kd) = (p.q_heads * p.head_dim, p.kv_heads * p.head_dim);
        Ok(RingGrads { dq: self.split(&dq, qd), dk: self.split(&dk, kd), dv: self.split(&dv, kd) })
    }

    fn split(&self, x: &[f32], per: usize) -> Vec<Vec<f32>> {
        let b = self.p.batch;
        self.p.plan.segments(self.rank).iter().map(|s| x[b * s.local * per..][..b * s.len * per].to_vec()).collect()
    }
}
