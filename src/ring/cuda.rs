//! The CUDA in-process transport: N ranks on the CUDA devices given (rank `r`
//! on `backends[r % len]`; several ranks may share one GPU). Each rank has a
//! compute stream and a copy stream of its device's context, its own buffers,
//! and double receive buffers. At step `t` rank `r` computes on the block in
//! receive slot `t % 2` (its own shard at step 0) while its copy stream sends
//! that block into slot `(t + 1) % 2` of rank `r + 1`, so the copy overlaps
//! the compute. Events order the two streams of neighbouring ranks:
//! - `sent[s]` (recorded on the sender's copy stream): the block landed in the
//!   next rank's slot `s`; the next rank's compute stream waits on it.
//! - `computed[t % 2]` (recorded on the rank's compute stream after step `t`):
//!   the previous rank's copy stream waits on it before overwriting the slot
//!   read at step `t`, and before sending dK/dV accumulated at step `t`.
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

/// One rank. `q`, `d_o`, `out`, `o`, `lse`, `delta` and `dq` hold the rank's
/// query segments one after the other (segment `i` at element
/// `B * H_q * seg.local * D`, or `B * H_q * seg.local` for `lse`/`delta`).
struct CudaRank<T> {
    backend: Arc<CudaBackend>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
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
    sent: [CudaEvent; 2],
    computed: [CudaEvent; 2],
}

fn err(e: impl std::fmt::Display) -> crate::Error {
    CudaBackend::device_error(e)
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
        let kv_max = p.batch * p.kv_heads * p.plan.max_rank_len() * p.head_dim;
        let mut ranks = Vec::with_capacity(p.plan.ranks);
        for r in 0..p.plan.ranks {
            let backend = backends[r % backends.len()].clone();
            let ctx = backend.context().clone();
            let compute = ctx.new_stream().map_err(err)?;
            let copy = ctx.new_stream().map_err(err)?;
            let s = &compute;
            let rows = p.batch * p.q_heads * p.plan.rank_len(r);
            let poison_t = |n: usize| s.clone_htod(&vec![T::from_f32(f32::NAN); n.max(1)]).map_err(err);
            let zeros = |n: usize| s.alloc_zeros::<f32>(n.max(1)).map_err(err);
            let event = || ctx.new_event(None).map_err(err);
            ranks.push(CudaRank {
                q: s.clone_htod(&q[r]).map_err(err)?,
                d_o: s.clone_htod(&d_o[r]).map_err(err)?,
                out: poison_t(rows * p.head_dim)?,
                k: s.clone_htod(&k[r]).map_err(err)?,
                v: s.clone_htod(&v[r]).map_err(err)?,
                k_in: [poison_t(kv_max)?, poison_t(kv_max)?],
                v_in: [poison_t(kv_max)?, poison_t(kv_max)?],
                dk: [zeros(kv_max)?, zeros(kv_max)?],
                dv: [zeros(kv_max)?, zeros(kv_max)?],
                o: zeros(rows * p.head_dim)?,
                lse: zeros(rows)?,
                delta: zeros(rows)?,
                dq: zeros(rows * p.head_dim)?,
                sent: [event()?, event()?],
                computed: [event()?, event()?],
                backend,
                compute,
                copy,
            });
        }
        // Uploads went on the compute streams; the copy streams must not run ahead of them.
        for rank in &ranks {
            rank.copy.join(&rank.compute).map_err(err)?;
        }
        Ok(CudaRing { p: *p, ranks })
    }

    fn seg_offsets(&self, seg: &Segment) -> (usize, usize) {
        let rows = self.p.batch * self.p.q_heads * seg.local;
        (rows * self.p.head_dim, rows)
    }

    fn kv_seg_offset(&self, seg: &Segment) -> usize {
        self.p.batch * self.p.kv_heads * seg.local * self.p.head_dim
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
            }
            let (a, b) = two_mut(&mut self.ranks, r, next);
            let (k, v) = if t == 0 { (&a.k, &a.v) } else { (&a.k_in[t % 2], &a.v_in[t % 2]) };
            copy.memcpy_dtod(&k.slice(..elems), &mut b.k_in[slot].slice_mut(..elems)).map_err(err)?;
            copy.memcpy_dtod(&v.slice(..elems), &mut b.v_in[slot].slice_mut(..elems)).map_err(err)?;
        }
        Ok(())
    }

    /// Records the ring forward on the ranks' streams (returns without waiting).
    pub fn forward(&mut self) -> Result<()> {
        let (n, p) = (self.p.plan.ranks, self.p);
        for t in 0..n {
            if t + 1 < n {
                self.send_kv(t)?;
                for r in 0..n {
                    let rank = &self.ranks[r];
                    rank.sent[(t + 1) % 2].record(&rank.copy).map_err(err)?;
                }
            }
            for r in 0..n {
                let prev = (r + n - 1) % n;
                if t > 0 {
                    let (c, e) = (&self.ranks[r].compute, &self.ranks[prev].sent[t % 2]);
                    c.wait(e).map_err(err)?;
                }
                let step = p.plan.step(t, r);
                let segs = p.plan.segments(r);
                // Step 0 computes every query segment against itself first (its diagonal is
                // visible), so later steps always accumulate.
                let mut started = vec![t > 0; segs.len()];
                for part in &step.parts {
                    let bp = p.part_params(r, step.source, part);
                    let (qo, ko) = (p.q_offset(part.q_start), p.kv_offset(part.kv_start));
                    let (oo, lo) = self.seg_offsets(&segs[part.q_seg]);
                    let rank = &mut self.ranks[r];
                    let (k, v) = if t == 0 { (&rank.k, &rank.v) } else { (&rank.k_in[t % 2], &rank.v_in[t % 2]) };
                    #[rustfmt::skip]
                    bw::forward(
                        &rank.backend, &rank.compute, &bp,
                        &rank.q.slice(qo..), &k.slice(ko..), &v.slice(ko..),
                        &mut rank.o.slice_mut(oo..), &mut rank.lse.slice_mut(lo..),
                        started[part.q_seg],
                    )?;
                    started[part.q_seg] = true;
                }
                let rank = &self.ranks[r];
                rank.computed[t % 2].record(&rank.compute).map_err(err)?;
            }
        }
        for r in 0..n {
            // Step 0 computes every segment against itself, so every (O, lse) was written.
            for seg in p.plan.segments(r) {
                let (oo, lo) = self.seg_offsets(&seg);
                let sp = p.segment_params(r, &seg);
                let rank = &mut self.ranks[r];
                let out = &mut rank.out.slice_mut(p.q_offset(seg.local)..);
                bw::finalize(&rank.backend, &rank.compute, &sp, &rank.o.slice(oo..), &rank.lse.slice(lo..), out)?;
            }
        }
        Ok(())
    }

    /// Records the ring backward after [`Self::forward`] (returns without waiting).
    pub fn backward(&mut self) -> Result<()> {
        let (n, p) = (self.p.plan.ranks, self.p);
        for r in 0..n {
            let segs = p.plan.segments(r);
            let rank = &mut self.ranks[r];
            let c = rank.compute.clone();
            // The copy stream may still be sending the forward's blocks into slots we clear.
            c.join(&rank.copy).map_err(err)?;
            c.memset_zeros(&mut rank.dq).map_err(err)?;
            c.memset_zeros(&mut rank.dk[0]).map_err(err)?;
            c.memset_zeros(&mut rank.dv[0]).map_err(err)?;
            for seg in &segs {
                let rows = p.batch * p.q_heads * seg.local;
                let (oo, lo) = (rows * p.head_dim, rows);
                let sp = p.segment_params(r, seg);
                let d_o = rank.d_o.slice(p.q_offset(seg.local)..);
                bw::backward_prepass(
                    &rank.backend,
                    &c,
                    &sp,
                    &rank.o.slice(oo..),
                    &d_o,
                    &mut rank.delta.slice_mut(lo..),
                )?;
            }
        }
        // The forward's last reads of the receive slots finish before this backward's sends overwrite them.
        for r in 0..n {
            let next = (r + 1) % n;
            let (copy, compute) = (self.ranks[r].copy.clone(), self.ranks[next].compute.clone());
            copy.join(&compute).map_err(err)?;
        }
        for t in 0..n {
            if t + 1 < n {
                self.send_kv(t)?;
            }
            for r in 0..n {
                let prev = (r + n - 1) % n;
                if t > 0 {
                    let (c, e) = (&self.ranks[r].compute, &self.ranks[prev].sent[t % 2]);
                    c.wait(e).map_err(err)?;
                }
                let step = p.plan.step(t, r);
                let (qsegs, ksegs) = (p.plan.segments(r), p.plan.segments(step.source));
                for part in &step.parts {
                    let bp = p.part_params(r, step.source, part);
                    let (qo, ko) = (p.q_offset(part.q_start), p.kv_offset(part.kv_start));
                    let (oo, lo) = self.seg_offsets(&qsegs[part.q_seg]);
                    let go = self.kv_seg_offset(&ksegs[part.kv_seg]);
                    let rank = &mut self.ranks[r];
                    let slot = t % 2;
                    let (k, v) = if t == 0 { (&rank.k, &rank.v) } else { (&rank.k_in[slot], &rank.v_in[slot]) };
                    let (mut dk, mut dv) = (rank.dk[slot].slice_mut(go..), rank.dv[slot].slice_mut(go..));
                    #[rustfmt::skip]
                    bw::backward(
                        &rank.backend, &rank.compute, &bp,
                        &rank.q.slice(qo..), &k.slice(ko..), &v.slice(ko..), &rank.d_o.slice(qo..),
                        &rank.lse.slice(lo..), &rank.delta.slice(lo..),
                        &mut rank.dq.slice_mut(oo..), &mut dk, &mut dv,
                    )?;
                }
                let rank = &self.ranks[r];
                rank.computed[t % 2].record(&rank.compute).map_err(err)?;
            }
            // dK/dV move on once this step has accumulated into them (after the last step: home).
            for r in 0..n {
                let next = (r + 1) % n;
                let elems = p.kv_shard_elems(p.plan.source(t, r));
                let copy = self.ranks[r].copy.clone();
                copy.wait(&self.ranks[r].computed[t % 2]).map_err(err)?;
                if t > 0 && next != r {
                    copy.wait(&self.ranks[next].computed[(t - 1) % 2]).map_err(err)?;
                }
                let (from, to) = (t % 2, (t + 1) % 2);
                if next == r {
                    let rank = &mut self.ranks[r];
                    let [d0, d1] = &mut rank.dk;
                    let (src, dst) = if from == 0 { (&*d0, d1) } else { (&*d1, d0) };
                    copy.memcpy_dtod(&src.slice(..elems), &mut dst.slice_mut(..elems)).map_err(err)?;
                    let [v0, v1] = &mut rank.dv;
                    let (src, dst) = if from == 0 { (&*v0, v1) } else { (&*v1, v0) };
                    copy.memcpy_dtod(&src.slice(..elems), &mut dst.slice_mut(..elems)).map_err(err)?;
                } else {
                    let (a, b) = two_mut(&mut self.ranks, r, next);
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
            let (c, e) = (&self.ranks[r].compute, &self.ranks[prev].sent[n % 2]);
            c.wait(e).map_err(err)?;
        }
        Ok(())
    }

    /// Waits for every rank and reads the output shards and forward states back.
    pub fn read_forward(&self) -> Result<(Vec<Vec<T>>, Vec<RingState>)> {
        let p = &self.p;
        let mut outs = Vec::new();
        let mut states = Vec::new();
        for (r, rank) in self.ranks.iter().enumerate() {
            let c = &rank.compute;
            c.join(&rank.copy).map_err(err)?;
            let mut out: Vec<T> = c.clone_dtoh(&rank.out).map_err(err)?;
            out.truncate(p.q_shard_elems(r));
            outs.push(out);
            let o: Vec<f32> = c.clone_dtoh(&rank.o).map_err(err)?;
            let lse: Vec<f32> = c.clone_dtoh(&rank.lse).map_err(err)?;
            let (qh, b) = (p.q_heads, p.batch);
            let split = |x: &[f32], per: usize| -> Vec<Vec<f32>> {
                p.plan.segments(r).iter().map(|s| x[b * s.local * per..][..b * s.len * per].to_vec()).collect()
            };
            states.push(RingState { o: split(&o, qh * p.head_dim), lse: split(&lse, qh) });
        }
        Ok((outs, states))
    }

    /// Waits for every rank and reads the gradients back.
    pub fn read_grads(&self) -> Result<Vec<RingGrads>> {
        let (p, n) = (&self.p, self.p.plan.ranks);
        self.ranks
            .iter()
            .enumerate()
            .map(|(r, rank)| {
                let c = &rank.compute;
                c.join(&rank.copy).map_err(err)?;
                let dq: Vec<f32> = c.clone_dtoh(&rank.dq).map_err(err)?;
                let dk: Vec<f32> = c.clone_dtoh(&rank.dk[n % 2]).map_err(err)?;
                let dv: Vec<f32> = c.clone_dtoh(&rank.dv[n % 2]).map_err(err)?;
                let b = p.batch;
                let split = |x: &[f32], per: usize| -> Vec<Vec<f32>> {
                    p.plan.segments(r).iter().map(|s| x[b * s.local * per..][..b * s.len * per].to_vec()).collect()
                };
                let (qd, kd) = (p.q_heads * p.head_dim, p.kv_heads * p.head_dim);
                Ok(RingGrads { dq: split(&dq, qd), dk: split(&dk, kd), dv: split(&dv, kd) })
            })
            .collect()
    }

    /// Waits for every rank's streams.
    pub fn synchronize(&self) -> Result<()> {
        for rank in &self.ranks {
            rank.copy.synchronize().map_err(err)?;
            rank.compute.synchronize().map_err(err)?;
        }
        Ok(())
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
