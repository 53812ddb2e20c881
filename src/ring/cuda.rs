//! The CUDA in-process transport: N ranks on the CUDA devices given (rank `r`
//! on `backends[r % len]`; several ranks may share one GPU). Each rank has a
//! compute stream and a copy stream of its device's context, its own buffers,
//! and double receive buffers. At step `t` rank `r` computes on the block in
//! receive slot `t % 2` (its own shard at step 0) while its copy stream sends
//! that block into slot `(t + 1) % 2` of rank `r + 1`, so the copy overlaps
//! the compute. Events order the two streams of neighbouring ranks:
//! - `sent[s]` (recorded on the sender's copy stream): the block landed in the
//!   next rank's slot `s`; the next rank's compute stream waits on it. It
//!   also marks the sender's own send of the slot it held as read: the
//!   previous rank's copy stream waits on it before overwriting that slot.
//! - `computed[t % 2]` (recorded on the rank's compute stream after step `t`):
//!   the previous rank's copy stream waits on it before overwriting the slot
//!   read at step `t`, and before sending dK/dV accumulated at step `t`.
//!
//! A slot is read twice at step `t`, by the compute stream and by the copy
//! stream forwarding it, so overwriting it waits on both. Each forward and
//! backward call first orders every copy stream after all the work issued on
//! the next rank's streams (the previous call's reads of the slots, or the
//! uploads that initialised them), so calls may follow each other without
//! waiting. These orders hold without cudarc's automatic event tracking
//! (whose one read event per buffer keeps only the last of two readers on
//! different streams).
//!
//! The backward sends K and V at the start of a step (overlapped) and dK/dV
//! once the step's launches have accumulated into them; after the last step
//! dK/dV make one more hop, home. Copies are `cuMemcpyDtoDAsync`, which with
//! unified addressing also copies between devices.

use super::{RingGrads, RingParams, RingState, Segment};
use crate::backend::CudaBackend;
use crate::blockwise::cuda as bw;
use crate::dtype::Element;
use crate::error::Result;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use std::sync::Arc;

/// Every rank's streams, events and buffers, allocated once and reused by every call.
pub struct CudaRing<T: Element> {
    p: RingParams,
    ranks: Vec<CudaRank<T>>,
}

/// One rank: its buffers and compute stream, a copy stream, and the events
/// that order its streams against its neighbours'.
struct CudaRank<T> {
    bufs: RankBuffers<T>,
    copy: Arc<CudaStream>,
    sent: [CudaEvent; 2],
    computed: [CudaEvent; 2],
}

/// One rank's device buffers, its compute stream and the blockwise launches
/// of its steps: shared by this transport and NCCL's, which differ only in
/// how blocks move between ranks. `q`, `d_o`, `out`, `o`, `lse`, `delta` and
/// `dq` hold the rank's query segments one after the other (segment `i` at
/// element `B * H_q * seg.local * D`, or `B * H_q * seg.local` for
/// `lse`/`delta`); `k_in`/`v_in`/`dk`/`dv` are the double receive slots.
pub(super) struct RankBuffers<T> {
    pub(super) backend: Arc<CudaBackend>,
    pub(super) compute: Arc<CudaStream>,
    q: CudaSlice<T>,
    d_o: CudaSlice<T>,
    out: CudaSlice<T>,
    pub(super) k: CudaSlice<T>,
    pub(super) v: CudaSlice<T>,
    pub(super) k_in: [CudaSlice<T>; 2],
    pub(super) v_in: [CudaSlice<T>; 2],
    pub(super) dk: [CudaSlice<f32>; 2],
    pub(super) dv: [CudaSlice<f32>; 2],
    o: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    dq: CudaSlice<f32>,
}

pub(super) fn err(e: impl std::fmt::Display) -> crate::Error {
    CudaBackend::device_error(e)
}

impl<T: Element> RankBuffers<T> {
    /// Uploads rank `rank`'s shards (contiguous `[B, H, rank_len(rank), D]`,
    /// lengths checked by the caller) on a new compute stream of `backend`;
    /// receive slots and the output start as NaN, accumulators as 0.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        backend: Arc<CudaBackend>,
        p: &RingParams,
        rank: usize,
        q: &[T],
        k: &[T],
        v: &[T],
        d_o: &[T],
    ) -> Result<Self> {
        let compute = backend.context().new_stream().map_err(err)?;
        let s = &compute;
        let kv_max = p.batch * p.kv_heads * p.plan.max_rank_len() * p.head_dim;
        let rows = p.batch * p.q_heads * p.plan.rank_len(rank);
        let poison = |n: usize| s.clone_htod(&vec![T::from_f32(f32::NAN); n.max(1)]).map_err(err);
        let zeros = |n: usize| s.alloc_zeros::<f32>(n.max(1)).map_err(err);
        Ok(RankBuffers {
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
            backend,
            compute,
        })
    }

    /// The K/V block held at step `t`: the rank's own at step 0, else receive slot `t % 2`.
    pub(super) fn held_kv(&self, t: usize) -> (&CudaSlice<T>, &CudaSlice<T>) {
        if t == 0 {
            (&self.k, &self.v)
        } else {
            (&self.k_in[t % 2], &self.v_in[t % 2])
        }
    }

    fn seg_offsets(p: &RingParams, seg: &Segment) -> (usize, usize) {
        let rows = p.batch * p.q_heads * seg.local;
        (rows * p.head_dim, rows)
    }

    /// Records rank `r`'s forward launches of step `t` on the compute stream.
    pub(super) fn forward_step(&mut self, p: &RingParams, r: usize, t: usize) -> Result<()> {
        let step = p.plan.step(t, r);
        let segs = p.plan.segments(r);
        // Step 0 computes every query segment against itself first (its diagonal is
        // visible), so later steps always accumulate.
        let mut started = vec![t > 0; segs.len()];
        for part in &step.parts {
            let bp = p.part_params(r, step.source, part);
            let (qo, ko) = (p.q_offset(part.q_start), p.kv_offset(part.kv_start));
            let (oo, lo) = Self::seg_offsets(p, &segs[part.q_seg]);
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
        Ok(())
    }

    /// Records the cast of every segment's (O, lse) into `out` (after the last step).
    pub(super) fn finalize(&mut self, p: &RingParams, r: usize) -> Result<()> {
        // Step 0 computes every segment against itself, so every (O, lse) was written.
        for seg in p.plan.segments(r) {
            let (oo, lo) = Self::seg_offsets(p, &seg);
            let sp = p.segment_params(r, &seg);
            let out = &mut self.out.slice_mut(p.q_offset(seg.local)..);
            bw::finalize(&self.backend, &self.compute, &sp, &self.o.slice(oo..), &self.lse.slice(lo..), out)?;
        }
        Ok(())
    }

    /// Records the zeroing of dQ and of the first dK/dV slot, and the pre-pass
    /// `delta = rowsum(dO * O)` of every segment. The caller has ordered the
    /// compute stream after any transfer still writing those slots.
    pub(super) fn start_backward(&mut self, p: &RingParams, r: usize) -> Result<()> {
        let c = self.compute.clone();
        c.memset_zeros(&mut self.dq).map_err(err)?;
        c.memset_zeros(&mut self.dk[0]).map_err(err)?;
        c.memset_zeros(&mut self.dv[0]).map_err(err)?;
        for seg in p.plan.segments(r) {
            let (oo, lo) = Self::seg_offsets(p, &seg);
            let sp = p.segment_params(r, &seg);
            let d_o = self.d_o.slice(p.q_offset(seg.local)..);
            bw::backward_prepass(&self.backend, &c, &sp, &self.o.slice(oo..), &d_o, &mut self.delta.slice_mut(lo..))?;
        }
        Ok(())
    }

    /// Records rank `r`'s backward launches of step `t`, accumulating into dQ
    /// and into the dK/dV slot `t % 2` that travels with the K/V block.
    pub(super) fn backward_step(&mut self, p: &RingParams, r: usize, t: usize) -> Result<()> {
        let step = p.plan.step(t, r);
        let (qsegs, ksegs) = (p.plan.segments(r), p.plan.segments(step.source));
        let slot = t % 2;
        for part in &step.parts {
            let bp = p.part_params(r, step.source, part);
            let (qo, ko) = (p.q_offset(part.q_start), p.kv_offset(part.kv_start));
            let (oo, lo) = Self::seg_offsets(p, &qsegs[part.q_seg]);
            let go = p.batch * p.kv_heads * ksegs[part.kv_seg].local * p.head_dim;
            let (k, v) = if t == 0 { (&self.k, &self.v) } else { (&self.k_in[slot], &self.v_in[slot]) };
            let (mut dk, mut dv) = (self.dk[slot].slice_mut(go..), self.dv[slot].slice_mut(go..));
            #[rustfmt::skip]
            bw::backward(
                &self.backend, &self.compute, &bp,
                &self.q.slice(qo..), &k.slice(ko..), &v.slice(ko..), &self.d_o.slice(qo..),
                &self.lse.slice(lo..), &self.delta.slice(lo..),
                &mut self.dq.slice_mut(oo..), &mut dk, &mut dv,
            )?;
        }
        Ok(())
    }

    /// Reads the output shard and the forward state back (the caller has
    /// ordered the compute stream after every transfer).
    pub(super) fn read_forward(&self, p: &RingParams, r: usize) -> Result<(Vec<T>, RingState)> {
        let c = &self.compute;
        let mut out: Vec<T> = c.clone_dtoh(&self.out).map_err(err)?;
        out.truncate(p.q_shard_elems(r));
        let o: Vec<f32> = c.clone_dtoh(&self.o).map_err(err)?;
        let lse: Vec<f32> = c.clone_dtoh(&self.lse).map_err(err)?;
        let state = RingState { o: split(p, r, &o, p.q_heads * p.head_dim), lse: split(p, r, &lse, p.q_heads) };
        Ok((out, state))
    }

    /// Reads dQ and the rank's own dK/dV (home in slot `ranks % 2`) back.
    pub(super) fn read_grads(&self, p: &RingParams, r: usize) -> Result<RingGrads> {
        let (c, n) = (&self.compute, p.plan.ranks);
        let dq: Vec<f32> = c.clone_dtoh(&self.dq).map_err(err)?;
        let dk: Vec<f32> = c.clone_dtoh(&self.dk[n % 2]).map_err(err)?;
        let dv: Vec<f32> = c.clone_dtoh(&self.dv[n % 2]).map_err(err)?;
        let (qd, kd) = (p.q_heads * p.head_dim, p.kv_heads * p.head_dim);
        Ok(RingGrads { dq: split(p, r, &dq, qd), dk: split(p, r, &dk, kd), dv: split(p, r, &dv, kd) })
    }
}

/// Rank `r`'s per-segment pieces of a buffer holding its segments one after the other.
fn split(p: &RingParams, r: usize, x: &[f32], per: usize) -> Vec<Vec<f32>> {
    let b = p.batch;
    p.plan.segments(r).iter().map(|s| x[b * s.local * per..][..b * s.len * per].to_vec()).collect()
}

impl<T: Element> CudaRing<T> {
    /// Uploads every rank's shards (contiguous `[B, H, rank_len(r), D]`) to
    /// its device: rank `r` runs on `backends[r % backends.len()]`.
    pub fn new(
        backends: &[Arc<CudaBackend>],
        p: &RingParams,
        q: &[Vec<T>],
        k: &[Vec<T>],
        v: &[Vec<T>],
        d_o: &[Vec<T>],
    ) -> Result<Self> {
        crate::error::ensure(!backends.is_empty(), "backends", || "at least one CUDA device is needed".into())?;
        p.check_shards("q", q.iter().map(Vec::len), true)?;
        p.check_shards("k", k.iter().map(Vec::len), false)?;
        p.check_shards("v", v.iter().map(Vec::len), false)?;
        p.check_shards("d_o", d_o.iter().map(Vec::len), true)?;
        let mut ranks = Vec::with_capacity(p.plan.ranks);
        for r in 0..p.plan.ranks {
            let backend = backends[r % backends.len()].clone();
            let ctx = backend.context().clone();
            let bufs = RankBuffers::new(backend, p, r, &q[r], &k[r], &v[r], &d_o[r])?;
            let copy = ctx.new_stream().map_err(err)?;
            // Uploads went on the compute stream; the copy stream must not run ahead of them.
            copy.join(&bufs.compute).map_err(err)?;
            let event = || ctx.new_event(None).map_err(err);
            ranks.push(CudaRank { bufs, copy, sent: [event()?, event()?], computed: [event()?, event()?] });
        }
        Ok(CudaRing { p: *p, ranks })
    }

    /// On each rank's copy stream: send the K/V block held at step `t` to the
    /// next rank's slot `(t + 1) % 2`, once it has arrived here and the next
    /// rank has finished step `t - 1` (which read that slot).
    fn send_kv(&mut self, t: usize) -> Result<()> {
        let (n, p) = (self.p.plan.ranks, self.p);
        let slot = (t + 1) % 2;
        for r in 0..n {
            let elems = p.kv_shard_elems(p.plan.source(t, r));
            let prev = (r + n - 1) % n;
            let next = (r + 1) % n;
            let copy = self.ranks[r].copy.clone();
            if t > 0 {
                copy.wait(&self.ranks[prev].sent[t % 2]).map_err(err)?;
                copy.wait(&self.ranks[next].computed[(t - 1) % 2]).map_err(err)?;
                // The next rank's copy stream also read that slot at step t - 1, forwarding it.
                copy.wait(&self.ranks[next].sent[t % 2]).map_err(err)?;
            }
            let (a, b) = two_mut(&mut self.ranks, r, next);
            let (k, v) = a.bufs.held_kv(t);
            copy.memcpy_dtod(&k.slice(..elems), &mut b.bufs.k_in[slot].slice_mut(..elems)).map_err(err)?;
            copy.memcpy_dtod(&v.slice(..elems), &mut b.bufs.v_in[slot].slice_mut(..elems)).map_err(err)?;
        }
        Ok(())
    }

    /// Makes rank `r`'s compute stream wait for the block of step `t` (sent by the previous rank).
    fn wait_for_block(&self, r: usize, t: usize) -> Result<()> {
        if t == 0 {
            return Ok(());
        }
        let prev = (r + self.p.plan.ranks - 1) % self.p.plan.ranks;
        self.ranks[r].bufs.compute.wait(&self.ranks[prev].sent[t % 2]).map_err(err)
    }

    fn record_computed(&self, r: usize, t: usize) -> Result<()> {
        let rank = &self.ranks[r];
        rank.computed[t % 2].record(&rank.bufs.compute).map_err(err)
    }

    /// Orders every copy stream after everything issued so far on the next
    /// rank's streams: the receive slots it writes are free again (the
    /// previous call's reads, or the uploads that initialised them, are done).
    fn after_previous_reads(&self) -> Result<()> {
        let n = self.ranks.len();
        for rank in &self.ranks {
            rank.bufs.compute.join(&rank.copy).map_err(err)?;
        }
        for r in 0..n {
            let next = (r + 1) % n;
            self.ranks[r].copy.join(&self.ranks[next].bufs.compute).map_err(err)?;
        }
        Ok(())
    }

    /// Records the ring forward on the ranks' streams (returns without waiting).
    pub fn forward(&mut self) -> Result<()> {
        let (n, p) = (self.p.plan.ranks, self.p);
        self.after_previous_reads()?;
        for t in 0..n {
            if t + 1 < n {
                self.send_kv(t)?;
                for rank in &self.ranks {
                    rank.sent[(t + 1) % 2].record(&rank.copy).map_err(err)?;
                }
            }
            for r in 0..n {
                self.wait_for_block(r, t)?;
                self.ranks[r].bufs.forward_step(&p, r, t)?;
                self.record_computed(r, t)?;
            }
        }
        for (r, rank) in self.ranks.iter_mut().enumerate() {
            rank.bufs.finalize(&p, r)?;
        }
        Ok(())
    }

    /// Records the ring backward after [`Self::forward`] (returns without waiting).
    pub fn backward(&mut self) -> Result<()> {
        let (n, p) = (self.p.plan.ranks, self.p);
        for (r, rank) in self.ranks.iter_mut().enumerate() {
            // The copy stream may still be sending the forward's blocks into slots we clear.
            rank.bufs.compute.join(&rank.copy).map_err(err)?;
            rank.bufs.start_backward(&p, r)?;
        }
        // The forward's last reads of the receive slots finish before this backward's sends overwrite them.
        for r in 0..n {
            let next = (r + 1) % n;
            let (copy, compute) = (self.ranks[r].copy.clone(), self.ranks[next].bufs.compute.clone());
            copy.join(&compute).map_err(err)?;
        }
        for t in 0..n {
            if t + 1 < n {
                self.send_kv(t)?;
            }
            for r in 0..n {
                self.wait_for_block(r, t)?;
                self.ranks[r].bufs.backward_step(&p, r, t)?;
                self.record_computed(r, t)?;
            }
            // dK/dV move on once this step has accumulated into them (after the last step: home).
            for r in 0..n {
                let next = (r + 1) % n;
                let elems = p.kv_shard_elems(p.plan.source(t, r));
                let copy = self.ranks[r].copy.clone();
                copy.wait(&self.ranks[r].computed[t % 2]).map_err(err)?;
                if t > 0 && next != r {
                    copy.wait(&self.ranks[next].computed[(t - 1) % 2]).map_err(err)?;
                    // ... and its copy stream's send of that slot at step t - 1.
                    copy.wait(&self.ranks[next].sent[t % 2]).map_err(err)?;
                }
                let (from, to) = (t % 2, (t + 1) % 2);
                if next == r {
                    let bufs = &mut self.ranks[r].bufs;
                    let [d0, d1] = &mut bufs.dk;
                    let (src, dst) = if from == 0 { (&*d0, d1) } else { (&*d1, d0) };
                    copy.memcpy_dtod(&src.slice(..elems), &mut dst.slice_mut(..elems)).map_err(err)?;
                    let [v0, v1] = &mut bufs.dv;
                    let (src, dst) = if from == 0 { (&*v0, v1) } else { (&*v1, v0) };
                    copy.memcpy_dtod(&src.slice(..elems), &mut dst.slice_mut(..elems)).map_err(err)?;
                } else {
                    let (a, b) = two_mut(&mut self.ranks, r, next);
                    let (a, b) = (&a.bufs, &mut b.bufs);
                    copy.memcpy_dtod(&a.dk[from].slice(..elems), &mut b.dk[to].slice_mut(..elems)).map_err(err)?;
                    copy.memcpy_dtod(&a.dv[from].slice(..elems), &mut b.dv[to].slice_mut(..elems)).map_err(err)?;
                }
                let rank = &self.ranks[r];
                rank.sent[(t + 1) % 2].record(&rank.copy).map_err(err)?;
            }
        }
        // dK/dV are home once the previous rank's last send landed.
        for r in 0..n {
            let prev = (r + n - 1) % n;
            let (c, e) = (&self.ranks[r].bufs.compute, &self.ranks[prev].sent[n % 2]);
            c.wait(e).map_err(err)?;
        }
        Ok(())
    }

    /// Waits for every rank and reads the output shards and forward states back.
    pub fn read_forward(&self) -> Result<(Vec<Vec<T>>, Vec<RingState>)> {
        let mut outs = Vec::new();
        let mut states = Vec::new();
        for (r, rank) in self.ranks.iter().enumerate() {
            rank.bufs.compute.join(&rank.copy).map_err(err)?;
            let (out, state) = rank.bufs.read_forward(&self.p, r)?;
            outs.push(out);
            states.push(state);
        }
        Ok((outs, states))
    }

    /// Waits for every rank and reads the gradients back.
    pub fn read_grads(&self) -> Result<Vec<RingGrads>> {
        self.ranks
            .iter()
            .enumerate()
            .map(|(r, rank)| {
                rank.bufs.compute.join(&rank.copy).map_err(err)?;
                rank.bufs.read_grads(&self.p, r)
            })
            .collect()
    }

    /// Waits for every rank's streams.
    pub fn synchronize(&self) -> Result<()> {
        for rank in &self.ranks {
            rank.copy.synchronize().map_err(err)?;
            rank.bufs.compute.synchronize().map_err(err)?;
        }
        Ok(())
    }
}

impl<T: Element> Drop for CudaRing<T> {
    /// A rank's buffers are freed on its compute stream, but the previous
    /// rank's copy stream writes them: work still in flight finishes first.
    fn drop(&mut self) {
        let _ = self.synchronize();
    }
}

/// Mutable references to two different ranks.
fn two_mut<X>(v: &mut [X], a: usize, b: usize) -> (&mut X, &mut X) {
    debug_assert_ne!(a, b);
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &mut lo[b])
    }
}
