//! The CPU transport: one thread per rank, `std::sync::mpsc` channels between
//! neighbours, each rank calling the CPU blockwise launchers
//! ([`crate::blockwise::reference`]). The forward sends a copy of the block it
//! holds before computing on it, so the send overlaps the step's compute; the
//! backward sends `(K, V, dK, dV)` after accumulating into `dK`/`dV`.

use super::{RingGrads, RingParams, RingState};
use crate::blockwise::reference::{backward_into, backward_prepass_into, finalize_into, forward_into};
use crate::dtype::Element;
use crate::error::{Error, Result};
use std::sync::mpsc::{channel, Receiver, Sender};

/// The KV block travelling around the ring, tagged with its home rank.
#[derive(Clone)]
struct Block<T> {
    source: usize,
    k: Vec<T>,
    v: Vec<T>,
    /// f32 per KV segment of the block (backward only).
    dk: Vec<Vec<f32>>,
    dv: Vec<Vec<f32>>,
}

/// The ring forward: rank `r` holds shards `q[r]`, `k[r]`, `v[r]` (contiguous
/// `[B, H, rank_len(r), D]`) and gets its output in `out[r]`. Returns every
/// rank's final `(O, lse)`, which the backward needs.
pub fn forward<T: Element>(
    p: &RingParams,
    q: &[Vec<T>],
    k: &[Vec<T>],
    v: &[Vec<T>],
    out: &mut [Vec<T>],
) -> Result<Vec<RingState>> {
    p.check_shards("q", q.iter().map(Vec::len), true)?;
    p.check_shards("k", k.iter().map(Vec::len), false)?;
    p.check_shards("v", v.iter().map(Vec::len), false)?;
    p.check_shards("out", out.iter().map(Vec::len), true)?;
    let results = on_ring(p.plan.ranks, |r, tx, rx| {
        let (state, o) = forward_rank(p, r, &q[r], &k[r], &v[r], tx, rx)?;
        Ok((state, o))
    });
    let mut states = Vec::with_capacity(results.len());
    for (r, res) in results.into_iter().enumerate() {
        let (state, o) = res?;
        out[r].copy_from_slice(&o);
        states.push(state);
    }
    Ok(states)
}

/// The ring backward given the forward's final states and `d_o[r]` (shaped
/// like `q[r]`): every rank's f32 `dQ` (per query segment, stayed home) and
/// `dK`/`dV` (per KV segment, home after N hops).
pub fn backward<T: Element>(
    p: &RingParams,
    q: &[Vec<T>],
    k: &[Vec<T>],
    v: &[Vec<T>],
    d_o: &[Vec<T>],
    states: &[RingState],
) -> Result<Vec<RingGrads>> {
    p.check_shards("q", q.iter().map(Vec::len), true)?;
    p.check_shards("k", k.iter().map(Vec::len), false)?;
    p.check_shards("v", v.iter().map(Vec::len), false)?;
    p.check_shards("d_o", d_o.iter().map(Vec::len), true)?;
    p.check_states(states)?;
    on_ring(p.plan.ranks, |r, tx, rx| backward_rank(p, r, &q[r], &k[r], &v[r], &d_o[r], &states[r], tx, rx))
        .into_iter()
        .collect()
}

/// Runs `rank(r, to_next, from_previous)` on one thread per rank, wired in a
/// ring. A rank that fails drops its channels, so its neighbours fail too
/// instead of waiting; the failure that started it is the one reported.
fn on_ring<T: Send, R: Send>(
    ranks: usize,
    rank: impl Fn(usize, Sender<Block<T>>, Receiver<Block<T>>) -> Result<R> + Sync,
) -> Vec<Result<R>> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..ranks).map(|_| channel::<Block<T>>()).unzip();
    // Rank r receives on rxs[r] and sends on txs[(r + 1) % ranks].
    let mut txs: Vec<Option<Sender<Block<T>>>> = txs.into_iter().map(Some).collect();
    let wired: Vec<_> = rxs.into_iter().enumerate().map(|(r, rx)| (txs[(r + 1) % ranks].take(), rx)).collect();
    let mut results: Vec<Result<R>> = std::thread::scope(|s| {
        let handles: Vec<_> = wired
            .into_iter()
            .enumerate()
            .map(|(r, (tx, rx))| {
                let rank = &rank;
                s.spawn(move || rank(r, tx.expect("each sender is taken once"), rx))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::device("cpu", "a ring rank thread panicked"))))
            .collect()
    });
    // Report the root cause: a hang-up is only a consequence of another rank's error.
    if let Some(root) = results.iter().position(|r| matches!(r, Err(e) if !is_hangup(e))) {
        let cause = results[root].as_ref().err().cloned().expect("position found an Err");
        for r in results.iter_mut() {
            if matches!(r, Err(e) if is_hangup(e)) {
                *r = Err(cause.clone());
            }
        }
    }
    results
}

const HANGUP: &str = "a neighbouring ring rank hung up";

fn is_hangup(e: &Error) -> bool {
    matches!(e, Error::Device { message, .. } if message == HANGUP)
}

fn hangup<E>(_: E) -> Error {
    Error::device("cpu", HANGUP)
}

fn forward_rank<T: Element>(
    p: &RingParams,
    r: usize,
    q: &[T],
    k: &[T],
    v: &[T],
    tx: Sender<Block<T>>,
    rx: Receiver<Block<T>>,
) -> Result<(RingState, Vec<T>)> {
    let plan = &p.plan;
    let segs = plan.segments(r);
    let mut state = p.empty_state(r);
    let mut started = vec![false; segs.len()];
    let mut block = Block { source: r, k: k.to_vec(), v: v.to_vec(), dk: Vec::new(), dv: Vec::new() };
    for t in 0..plan.ranks {
        let step = plan.step(t, r);
        debug_assert_eq!(step.source, block.source);
        let last = t + 1 == plan.ranks;
        if !last {
            tx.send(block.clone()).map_err(hangup)?;
        }
        for part in &step.parts {
            let bp = p.part_params(r, block.source, part);
            let (qo, ko) = (p.q_offset(part.q_start), p.kv_offset(part.kv_start));
            let (o, lse) = (&mut state.o[part.q_seg], &mut state.lse[part.q_seg]);
            forward_into(&bp, &q[qo..], &block.k[ko..], &block.v[ko..], o, lse, started[part.q_seg])?;
            started[part.q_seg] = true;
        }
        if !last {
            block = rx.recv().map_err(hangup)?;
        }
    }
    let mut out = vec![T::from_f32(f32::NAN); p.q_shard_elems(r)];
    for (i, seg) in segs.iter().enumerate() {
        if !started[i] {
            // No key visible to any row of the segment: O = 0, lse = -inf.
            state.o[i].fill(0.0);
            state.lse[i].fill(f32::NEG_INFINITY);
        }
        finalize_into(&p.segment_params(r, seg), &state.o[i], &state.lse[i], &mut out[p.q_offset(seg.local)..])?;
    }
    Ok((state, out))
}

#[allow(clippy::too_many_arguments)]
fn backward_rank<T: Element>(
    p: &RingParams,
    r: usize,
    q: &[T],
    k: &[T],
    v: &[T],
    d_o: &[T],
    state: &RingState,
    tx: Sender<Block<T>>,
    rx: Receiver<Block<T>>,
) -> Result<RingGrads> {
    let plan = &p.plan;
    let segs = plan.segments(r);
    let mut delta: Vec<Vec<f32>> = state.lse.iter().map(|l| vec![f32::NAN; l.len()]).collect();
    for (i, seg) in segs.iter().enumerate() {
        let sp = p.segment_params(r, seg);
        backward_prepass_into(&sp, &state.o[i], &d_o[p.q_offset(seg.local)..], &mut delta[i])?;
    }
    let mut grads = p.zero_grads(r);
    let (dk, dv) = (std::mem::take(&mut grads.dk), std::mem::take(&mut grads.dv));
    let mut block = Block { source: r, k: k.to_vec(), v: v.to_vec(), dk, dv };
    for t in 0..plan.ranks {
        let step = plan.step(t, r);
        debug_assert_eq!(step.source, block.source);
        for part in &step.parts {
            let bp = p.part_params(r, block.source, part);
            let (qo, ko) = (p.q_offset(part.q_start), p.kv_offset(part.kv_start));
            let (s, i) = (state, part.q_seg);
            backward_into(
                &bp,
                &q[qo..],
                &block.k[ko..],
                &block.v[ko..],
                &d_o[qo..],
                &s.o[i],
                &s.lse[i],
                &delta[i],
                &mut grads.dq[i],
                &mut block.dk[part.kv_seg],
                &mut block.dv[part.kv_seg],
            )?;
        }
        // After step N-1 the block is one hop from home: this send brings it back.
        tx.send(block).map_err(hangup)?;
        block = rx.recv().map_err(hangup)?;
    }
    debug_assert_eq!(block.source, r);
    grads.dk = block.dk;
    grads.dv = block.dv;
    Ok(grads)
}
