//! The wgpu transport: N virtual ranks on one device, so the whole schedule
//! runs anywhere wgpu does (lavapipe in CI). Each rank has its own buffers;
//! a send is a `copy_buffer_to_buffer` of the block it holds into the next
//! rank's receive buffer, double-buffered: at step `t` rank `r` computes on
//! receive buffer `t % 2` (its own shard at step 0) while its block is copied
//! into buffer `(t + 1) % 2` of rank `r + 1`, which nobody reads at step `t`.
//! Everything is recorded into the caller's encoder; wgpu orders the copies
//! after the dispatches that read the same buffers.

use super::{RingGrads, RingParams, RingState, Segment};
use crate::backend::{WgpuBackend, WgpuTensor};
use crate::blockwise::wgpu as bw;
use crate::dtype::DType;
use crate::error::{ensure, Result};

/// Every rank's buffers, allocated once for a problem and reused by every call.
pub struct WgpuRing<'a> {
    w: &'a WgpuBackend,
    p: RingParams,
    dtype: DType,
    ranks: Vec<RankBuffers>,
}

/// One virtual rank. `q`, `d_o`, `out`, `o`, `lse`, `delta` and `dq` hold the
/// rank's query segments one after the other (segment `i` at element
/// `B * H_q * seg.local * D`, or `B * H_q * seg.local` for `lse`/`delta`).
struct RankBuffers {
    q: wgpu::Buffer,
    d_o: wgpu::Buffer,
    out: wgpu::Buffer,
    /// The rank's own K/V shard, read at step 0.
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    /// Receive buffers for the blocks of other ranks.
    k_in: [wgpu::Buffer; 2],
    v_in: [wgpu::Buffer; 2],
    /// The travelling dK/dV, f32 per KV segment (same offsets as `q` with H_kv).
    dk: [wgpu::Buffer; 2],
    dv: [wgpu::Buffer; 2],
    o: wgpu::Buffer,
    lse: wgpu::Buffer,
    delta: wgpu::Buffer,
    dq: wgpu::Buffer,
}

fn bytes4(n: usize) -> u64 {
    (n.next_multiple_of(4).max(4)) as u64
}

impl<'a> WgpuRing<'a> {
    /// Uploads every rank's shards (`q[r]`, `k[r]`, `v[r]`, `d_o[r]`: raw
    /// little-endian `dtype` bytes of contiguous `[B, H, rank_len(r), D]`).
    pub fn new(
        w: &'a WgpuBackend,
        p: &RingParams,
        dtype: DType,
        q: &[&[u8]],
        k: &[&[u8]],
        v: &[&[u8]],
        d_o: &[&[u8]],
    ) -> Result<Self> {
        let es = dtype.size();
        p.check_shards("q", q.iter().map(|b| b.len() / es), true)?;
        p.check_shards("k", k.iter().map(|b| b.len() / es), false)?;
        p.check_shards("v", v.iter().map(|b| b.len() / es), false)?;
        p.check_shards("d_o", d_o.iter().map(|b| b.len() / es), true)?;
        for (arg, shards) in [("q", q), ("k", k), ("v", v), ("d_o", d_o)] {
            ensure(shards.iter().all(|b| b.len() % es == 0), arg, || {
                format!("shard bytes are not whole {dtype} elements")
            })?;
        }
        let dev = w.device();
        let buffer = |bytes: u64| {
            dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some("frugal-attn ring"),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let n = p.plan.max_rank_len();
        let kv_max = p.batch * p.kv_heads * n * p.head_dim;
        let ranks = (0..p.plan.ranks)
            .map(|r| {
                let rows = p.batch * p.q_heads * p.plan.rank_len(r);
                RankBuffers {
                    q: w.upload(q[r]),
                    d_o: w.upload(d_o[r]),
                    out: buffer(bytes4(rows * p.head_dim * es)),
                    k: w.upload(k[r]),
                    v: w.upload(v[r]),
                    k_in: [buffer(bytes4(kv_max * es)), buffer(bytes4(kv_max * es))],
                    v_in: [buffer(bytes4(kv_max * es)), buffer(bytes4(kv_max * es))],
                    dk: [buffer(bytes4(kv_max * 4)), buffer(bytes4(kv_max * 4))],
                    dv: [buffer(bytes4(kv_max * 4)), buffer(bytes4(kv_max * 4))],
                    o: buffer(bytes4(rows * p.head_dim * 4)),
                    lse: buffer(bytes4(rows * 4)),
                    delta: buffer(bytes4(rows * 4)),
                    dq: buffer(bytes4(rows * p.head_dim * 4)),
                }
            })
            .collect();
        Ok(WgpuRing { w, p: *p, dtype, ranks })
    }

    /// Element offsets of query segment `seg` in `o`/`dq` and in `lse`/`delta`.
    fn seg_offsets(&self, seg: &Segment) -> (u64, u64) {
        let rows = (self.p.batch * self.p.q_heads * seg.local) as u64;
        (rows * self.p.head_dim as u64, rows)
    }

    /// Element offset of KV segment `seg` in `dk`/`dv`.
    fn kv_seg_offset(&self, seg: &Segment) -> u64 {
        (self.p.batch * self.p.kv_heads * seg.local * self.p.head_dim) as u64
    }

    /// K and V of the block rank `r` holds at step `t`.
    fn kv_at(&self, r: usize, t: usize) -> (&wgpu::Buffer, &wgpu::Buffer) {
        let b = &self.ranks[r];
        if t == 0 {
            (&b.k, &b.v)
        } else {
            (&b.k_in[t % 2], &b.v_in[t % 2])
        }
    }

    /// Sends the block every rank holds at step `t` to its next rank.
    fn send_kv(&self, enc: &mut wgpu::CommandEncoder, t: usize) {
        let (p, n) = (&self.p, self.p.plan.ranks);
        for r in 0..n {
            let src = p.plan.source(t, r);
            let bytes = bytes4(p.kv_shard_elems(src) * self.dtype.size());
            let (k, v) = self.kv_at(r, t);
            let next = &self.ranks[(r + 1) % n];
            enc.copy_buffer_to_buffer(k, 0, &next.k_in[(t + 1) % 2], 0, bytes);
            enc.copy_buffer_to_buffer(v, 0, &next.v_in[(t + 1) % 2], 0, bytes);
        }
    }

    /// Records the ring forward: every rank's `(O, lse)` and finalized output.
    pub fn record_forward(&self, enc: &mut wgpu::CommandEncoder) -> Result<()> {
        let (p, n, w, dt) = (&self.p, self.p.plan.ranks, self.w, self.dtype);
        let at = WgpuTensor::at;
        let mut started: Vec<Vec<bool>> = (0..n).map(|r| vec![false; p.plan.segments(r).len()]).collect();
        for t in 0..n {
            for (r, b) in self.ranks.iter().enumerate() {
                let step = p.plan.step(t, r);
                let (k, v) = self.kv_at(r, t);
                let segs = p.plan.segments(r);
                for part in &step.parts {
                    let bp = p.part_params(r, step.source, part);
                    let (qo, ko) = (p.q_offset(part.q_start) as u64, p.kv_offset(part.kv_start) as u64);
                    let (oo, lo) = self.seg_offsets(&segs[part.q_seg]);
                    let acc = started[r][part.q_seg];
                    bw::forward(
                        w,
                        enc,
                        &bp,
                        dt,
                        at(&b.q, qo),
                        at(k, ko),
                        at(v, ko),
                        at(&b.o, oo),
                        at(&b.lse, lo),
                        acc,
                    )?;
                    started[r][part.q_seg] = true;
                }
            }
            if t + 1 < n {
                self.send_kv(enc, t);
            }
        }
        for (r, b) in self.ranks.iter().enumerate() {
            for (i, seg) in p.plan.segments(r).iter().enumerate() {
                // Step 0 always computes a segment against itself (its diagonal is visible).
                ensure(started[r][i], "plan", || format!("rank {r} segment {i} has no visible key"))?;
                let (oo, lo) = self.seg_offsets(seg);
                let sp = p.segment_params(r, seg);
                bw::finalize(w, enc, &sp, dt, at(&b.o, oo), at(&b.lse, lo), at(&b.out, p.q_offset(seg.local) as u64))?;
            }
        }
        Ok(())
    }

    /// Records the ring backward, after [`Self::record_forward`] (it reads the
    /// final `O` and `lse` that left in the rank buffers): `dQ` stays home,
    /// `(K, V, dK, dV)` travel, and `dK`/`dV` end in buffer `N % 2` of their home rank.
    pub fn record_backward(&self, enc: &mut wgpu::CommandEncoder) -> Result<()> {
        let (p, n, w, dt) = (&self.p, self.p.plan.ranks, self.w, self.dtype);
        let at = WgpuTensor::at;
        for (r, b) in self.ranks.iter().enumerate() {
            enc.clear_buffer(&b.dq, 0, None);
            enc.clear_buffer(&b.dk[0], 0, None);
            enc.clear_buffer(&b.dv[0], 0, None);
            for seg in p.plan.segments(r) {
                let (oo, lo) = self.seg_offsets(&seg);
                let sp = p.segment_params(r, &seg);
                let d_o = at(&b.d_o, p.q_offset(seg.local) as u64);
                bw::backward_prepass(w, enc, &sp, dt, at(&b.o, oo), d_o, at(&b.delta, lo))?;
            }
        }
        for t in 0..n {
            for (r, b) in self.ranks.iter().enumerate() {
                let step = p.plan.step(t, r);
                let (k, v) = self.kv_at(r, t);
                let (qsegs, ksegs) = (p.plan.segments(r), p.plan.segments(step.source));
                let (dk, dv) = (&b.dk[t % 2], &b.dv[t % 2]);
                for part in &step.parts {
                    let bp = p.part_params(r, step.source, part);
                    let (qo, ko) = (p.q_offset(part.q_start) as u64, p.kv_offset(part.kv_start) as u64);
                    let (oo, lo) = self.seg_offsets(&qsegs[part.q_seg]);
                    let go = self.kv_seg_offset(&ksegs[part.kv_seg]);
                    #[rustfmt::skip]
                    bw::backward(
                        w, enc, &bp, dt,
                        at(&b.q, qo), at(k, ko), at(v, ko), at(&b.d_o, qo),
                        at(&b.lse, lo), at(&b.delta, lo),
                        at(&b.dq, oo), at(dk, go), at(dv, go),
                    )?;
                }
            }
            // (K, V, dK, dV) move on together; after the last step only dK/dV
            // still have somewhere to go: home.
            if t + 1 < n {
                self.send_kv(enc, t);
            }
            for r in 0..n {
                let src = p.plan.source(t, r);
                let bytes = bytes4(p.kv_shard_elems(src) * 4);
                let (b, next) = (&self.ranks[r], &self.ranks[(r + 1) % n]);
                enc.copy_buffer_to_buffer(&b.dk[t % 2], 0, &next.dk[(t + 1) % 2], 0, bytes);
                enc.copy_buffer_to_buffer(&b.dv[t % 2], 0, &next.dv[(t + 1) % 2], 0, bytes);
            }
        }
        Ok(())
    }

    /// Reads every rank's output shard (raw `dtype` bytes) and forward state back (waits for the queue).
    pub fn read_forward(&self) -> Result<(Vec<Vec<u8>>, Vec<RingState>)> {
        let (p, w) = (&self.p, self.w);
        let mut outs = Vec::new();
        let mut states = Vec::new();
        for (r, b) in self.ranks.iter().enumerate() {
            outs.push(w.read_back(&b.out, p.q_shard_elems(r) * self.dtype.size())?);
            let rows = p.batch * p.q_heads * p.plan.rank_len(r);
            let o = read_f32(w, &b.o, rows * p.head_dim)?;
            let lse = read_f32(w, &b.lse, rows)?;
            states
                .push(RingState { o: self.split(r, &o, p.q_heads * p.head_dim), lse: self.split(r, &lse, p.q_heads) });
        }
        Ok((outs, states))
    }

    /// Reads every rank's gradients back (waits for the queue).
    pub fn read_grads(&self) -> Result<Vec<RingGrads>> {
        let (p, w, n) = (&self.p, self.w, self.p.plan.ranks);
        (0..n)
            .map(|r| {
                let b = &self.ranks[r];
                let len = p.plan.rank_len(r);
                let q_elems = p.batch * p.q_heads * len * p.head_dim;
                let kv_elems = p.batch * p.kv_heads * len * p.head_dim;
                let dq = read_f32(w, &b.dq, q_elems)?;
                let dk = read_f32(w, &b.dk[n % 2], kv_elems)?;
                let dv = read_f32(w, &b.dv[n % 2], kv_elems)?;
                let (qh, kh) = (p.q_heads * p.head_dim, p.kv_heads * p.head_dim);
                Ok(RingGrads { dq: self.split(r, &dq, qh), dk: self.split(r, &dk, kh), dv: self.split(r, &dv, kh) })
            })
            .collect()
    }

    /// Segment-major flat rank data into one `Vec` per segment (`per_row` elements per row and batch).
    fn split(&self, r: usize, flat: &[f32], per_row: usize) -> Vec<Vec<f32>> {
        let b = self.p.batch;
        self.p.plan.segments(r).iter().map(|s| flat[b * s.local * per_row..][..b * s.len * per_row].to_vec()).collect()
    }
}

fn read_f32(w: &WgpuBackend, buf: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
    Ok(crate::host::bytes_to_vec(&w.read_back(buf, n * 4)?))
}
