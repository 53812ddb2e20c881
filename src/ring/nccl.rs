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

use super::cuda::{err, RankBuffers};
use super::{RingGrads, RingParams, RingState};
use crate::backend::CudaBackend;
use crate::dtype::Element;
use crate::error::{ensure, Error, Result};
use cudarc::driver::{CudaEvent, CudaStream};
use cudarc::nccl::{group_end, group_start, Comm, Id, NcclType};
use std::sync::Arc;

/// Names NCCL's result code (`NcclError`'s own Debug prints only "NcclError").
fn nccl_err(e: cudarc::nccl::result::NcclError) -> Error {
    Error::device("nccl", format!("{:?}", e.0))
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

/// This process's rank of the ring: its buffers and compute stream (shared
/// with the in-process transport), communicator and communication stream.
pub struct NcclRing<T: Element + NcclType> {
    p: RingParams,
    rank: usize,
    bufs: RankBuffers<T>,
    comm: Comm,
    comm_stream: Arc<CudaStream>,
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
        let bufs = RankBuffers::new(backend, p, rank, q, k, v, d_o)?;
        let comm_stream = ctx.new_stream().map_err(err)?;
        // Uploads went on the compute stream; the communication stream must not run ahead of them.
        comm_stream.join(&bufs.compute).map_err(err)?;
        let event = || ctx.new_event(None).map_err(err);
        Ok(NcclRing {
            received: [event()?, event()?],
            computed: [event()?, event()?],
            comm: Comm::from_rank(comm_stream.clone(), rank, p.plan.ranks, id).map_err(nccl_err)?,
            comm_stream,
            p: *p,
            rank,
            bufs,
        })
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
            let (comm, b) = (&self.comm, &mut self.bufs);
            if kv {
                let (k, v) = b.held_kv(t);
                comm.send(&k.slice(..send_n), next).map_err(nccl_err)?;
                comm.send(&v.slice(..send_n), next).map_err(nccl_err)?;
            }
            if grads {
                comm.send(&b.dk[now].slice(..send_n), next).map_err(nccl_err)?;
                comm.send(&b.dv[now].slice(..send_n), next).map_err(nccl_err)?;
            }
            if kv {
                comm.recv(&mut b.k_in[slot].slice_mut(..recv_n), prev).map_err(nccl_err)?;
                comm.recv(&mut b.v_in[slot].slice_mut(..recv_n), prev).map_err(nccl_err)?;
            }
            if grads {
                comm.recv(&mut b.dk[slot].slice_mut(..recv_n), prev).map_err(nccl_err)?;
                comm.recv(&mut b.dv[slot].slice_mut(..recv_n), prev).map_err(nccl_err)?;
            }
            Ok(())
        })();
        group_end().map_err(nccl_err)?;
        res?;
        self.received[slot].record(&self.comm_stream).map_err(err)
    }

    /// Records the forward on this rank's streams (every rank must call it).
    pub fn forward(&mut self) -> Result<()> {
        let (p, r, n) = (self.p, self.rank, self.p.plan.ranks);
        // A previous call's last steps may still read the slots this one receives into.
        self.comm_stream.join(&self.bufs.compute).map_err(err)?;
        for t in 0..n {
            if t + 1 < n {
                // The slot received into was read by this rank's step t - 1.
                if t > 0 {
                    self.comm_stream.wait(&self.computed[(t - 1) % 2]).map_err(err)?;
                }
                self.exchange(t, true, false)?;
            }
            if t > 0 {
                self.bufs.compute.wait(&self.received[t % 2]).map_err(err)?;
            }
            self.bufs.forward_step(&p, r, t)?;
            self.computed[t % 2].record(&self.bufs.compute).map_err(err)?;
        }
        self.bufs.finalize(&p, r)
    }

    /// Records the backward after [`Self::forward`] (every rank must call it).
    pub fn backward(&mut self) -> Result<()> {
        let (p, r, n) = (self.p, self.rank, self.p.plan.ranks);
        let c = self.bufs.compute.clone();
        c.join(&self.comm_stream).map_err(err)?;
        self.bufs.start_backward(&p, r)?;
        for t in 0..n {
            if t > 0 {
                c.wait(&self.received[t % 2]).map_err(err)?;
            }
            self.bufs.backward_step(&p, r, t)?;
            self.computed[t % 2].record(&c).map_err(err)?;
            // (K, V, dK, dV) leave after this step's launches; after the last
            // step only dK/dV travel, home.
            self.comm_stream.wait(&self.computed[t % 2]).map_err(err)?;
            self.exchange(t, t + 1 < n, true)?;
        }
        c.wait(&self.received[n % 2]).map_err(err)
    }

    /// Waits and reads this rank's output shard and forward state back.
    pub fn read_forward(&self) -> Result<(Vec<T>, RingState)> {
        self.bufs.compute.join(&self.comm_stream).map_err(err)?;
        self.bufs.read_forward(&self.p, self.rank)
    }

    /// Waits and reads this rank's gradients back (`dK`/`dV` of its own block).
    pub fn read_grads(&self) -> Result<RingGrads> {
        self.bufs.compute.join(&self.comm_stream).map_err(err)?;
        self.bufs.read_grads(&self.p, self.rank)
    }
}

impl<T: Element + NcclType> Drop for NcclRing<T> {
    /// The buffers are freed on the compute stream while the communication
    /// stream may still receive into them: work in flight finishes first.
    fn drop(&mut self) {
        let _ = self.comm_stream.synchronize();
        let _ = self.bufs.compute.synchronize();
    }
}
