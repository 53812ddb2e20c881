//! Ring attention, DESIGN.md 4.4: a sequence sharded over N ranks; each rank
//! keeps its queries and passes key/value blocks around a ring, so at step `t`
//! rank `r` holds the KV block that started on rank `(r - t) mod N` and
//! computes its queries against it with the blockwise kernels
//! ([`crate::blockwise`]), merging partial outputs by the log-sum-exp rule.
//! The backward sends `(K, V, dK, dV)` together; `dK`/`dV` accumulate in f32
//! on the way and arrive home after N hops while `dQ` stays home.
//!
//! This module is the schedule as data: [`RingLayout`] (which tokens a rank
//! holds), [`RingPlan`] (shard and unshard, and for every step and rank the
//! [`Step`]: the source of the KV block held and the [`Part`]s computed) and
//! [`RingParams`] (the blockwise launch parameters of every part). The
//! drivers that move the blocks live in [`run`].
//!
//! Every rank's tokens are a few *segments*: runs of rows of its shard whose
//! global positions are `global + i * stride`. A part pairs one query segment
//! with one KV segment and is either fully visible ([`Mask::None`]), causal
//! with the segments' global offsets ([`Mask::Causal`], `k0 + j <= q0 + i`),
//! or invisible (skipped). Under the stripe layout (stride N) query row `i` of
//! rank `r` sees key row `j` of rank `s` iff `j < i`, or `j == i` and `s <= r`:
//! causal with `(q0, k0) = (0, 0)` for `s <= r` and `(0, 1)` for `s > r`.

pub mod cpu;
pub mod cuda;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod run;
pub mod wgpu;

use crate::blockwise::{BlockLayout, BlockParams, BlockShape, Mask};
use crate::error::{ensure, Result};
use std::fmt;
use std::str::FromStr;

/// Which tokens of the sequence each rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RingLayout {
    /// Rank `r` holds tokens `[r*c, (r+1)*c)` with `c = ceil(S / N)`; the last
    /// block may be short. Unbalanced under a causal mask.
    Contiguous,
    /// The sequence cut in `2N` equal chunks; rank `r` holds chunks `r` and
    /// `2N-1-r`, so every rank does the same causal work. Needs `S % 2N == 0`.
    Zigzag,
    /// Token `t` on rank `t mod N`. Balanced under a causal mask for any `S`.
    Stripe,
}

impl RingLayout {
    pub const ALL: [RingLayout; 3] = [RingLayout::Contiguous, RingLayout::Zigzag, RingLayout::Stripe];

    pub fn name(self) -> &'static str {
        match self {
            RingLayout::Contiguous => "contiguous",
            RingLayout::Zigzag => "zigzag",
            RingLayout::Stripe => "stripe",
        }
    }
}

impl fmt::Display for RingLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RingLayout {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "contiguous" => Ok(RingLayout::Contiguous),
            "zigzag" => Ok(RingLayout::Zigzag),
            "stripe" | "striped" => Ok(RingLayout::Stripe),
            o => Err(format!("unknown ring layout `{o}` (expected contiguous, zigzag or stripe)")),
        }
    }
}

/// A run of rows of a rank's shard: local rows `local..local + len` hold the
/// tokens at global positions `global + i * stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub local: usize,
    pub global: usize,
    pub len: usize,
    /// 1, or N under the stripe layout.
    pub stride: usize,
}

/// One blockwise launch of a step: query segment `q_seg` of the rank against
/// KV segment `kv_seg` of the block it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub q_seg: usize,
    pub kv_seg: usize,
    /// First local query row and row count.
    pub q_start: usize,
    pub q_len: usize,
    /// First row of the KV block and row count.
    pub kv_start: usize,
    pub kv_len: usize,
    pub mask: Mask,
    /// Offsets for [`Mask::Causal`] (global positions, or the stripe mapping).
    pub q0: usize,
    pub k0: usize,
}

/// What one rank does at one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The rank whose KV block is held (where it started).
    pub source: usize,
    /// Launches, query segment major; empty when nothing is visible.
    pub parts: Vec<Part>,
}

/// How a sequence of `seq_len` tokens is spread over `ranks` ranks, and the step schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingPlan {
    pub ranks: usize,
    pub seq_len: usize,
    pub layout: RingLayout,
    pub causal: bool,
}

impl RingPlan {
    /// Checks that `layout` can split `seq_len` tokens over `ranks` ranks with
    /// none left empty; the `Err` names `ranks` or `seq_len`.
    pub fn new(ranks: usize, seq_len: usize, layout: RingLayout, causal: bool) -> Result<Self> {
        ensure(ranks >= 1, "ranks", || "must be at least 1".into())?;
        ensure(seq_len >= 1, "seq_len", || "must be at least 1".into())?;
        let plan = RingPlan { ranks, seq_len, layout, causal };
        match layout {
            RingLayout::Contiguous => {
                let c = seq_len.div_ceil(ranks);
                ensure((ranks - 1) * c < seq_len, "seq_len", || {
                    format!(
                        "{seq_len} tokens in blocks of ceil({seq_len}/{ranks}) = {c} leave rank {} empty \
                         (the contiguous layout needs seq_len > (ranks - 1) * ceil(seq_len / ranks))",
                        ranks - 1
                    )
                })?;
            }
            RingLayout::Zigzag => ensure(seq_len.is_multiple_of(2 * ranks), "seq_len", || {
                format!(
                    "{seq_len} is not a multiple of 2 * ranks = {} (the zigzag layout cuts 2N equal chunks)",
                    2 * ranks
                )
            })?,
            RingLayout::Stripe => ensure(seq_len >= ranks, "seq_len", || {
                format!("{seq_len} tokens leave ranks empty (the stripe layout needs seq_len >= ranks = {ranks})")
            })?,
        }
        Ok(plan)
    }

    /// Tokens per contiguous block / zigzag chunk.
    fn chunk(&self) -> usize {
        match self.layout {
            RingLayout::Contiguous => self.seq_len.div_ceil(self.ranks),
            RingLayout::Zigzag => self.seq_len / (2 * self.ranks),
            RingLayout::Stripe => 1,
        }
    }

    /// Tokens rank `r` holds.
    pub fn rank_len(&self, r: usize) -> usize {
        self.segments(r).iter().map(|s| s.len).sum()
    }

    /// The longest shard (what a transport's receive buffers must hold).
    pub fn max_rank_len(&self) -> usize {
        (0..self.ranks).map(|r| self.rank_len(r)).max().unwrap_or(0)
    }

    /// Rank `r`'s segments, in local row order.
    pub fn segments(&self, r: usize) -> Vec<Segment> {
        let (n, s, c) = (self.ranks, self.seq_len, self.chunk());
        match self.layout {
            RingLayout::Contiguous => {
                let start = (r * c).min(s);
                vec![Segment { local: 0, global: start, len: (start + c).min(s) - start, stride: 1 }]
            }
            RingLayout::Zigzag => vec![
                Segment { local: 0, global: r * c, len: c, stride: 1 },
                Segment { local: c, global: (2 * n - 1 - r) * c, len: c, stride: 1 },
            ],
            RingLayout::Stripe => vec![Segment { local: 0, global: r, len: (s - r.min(s)).div_ceil(n), stride: n }],
        }
    }

    /// Global position of local row `i` of rank `r`.
    pub fn global_position(&self, r: usize, i: usize) -> usize {
        let seg = self.segments(r).into_iter().rfind(|s| s.local <= i).expect("a rank has a segment at row 0");
        seg.global + (i - seg.local) * seg.stride
    }

    /// Where the KV block rank `r` holds at step `t` started.
    pub fn source(&self, t: usize, r: usize) -> usize {
        (r + self.ranks - t % self.ranks) % self.ranks
    }

    /// What rank `r` computes at step `t` (`t < ranks`).
    pub fn step(&self, t: usize, r: usize) -> Step {
        let source = self.source(t, r);
        let mut parts = Vec::new();
        for (qi, qs) in self.segments(r).iter().enumerate() {
            for (ki, ks) in self.segments(source).iter().enumerate() {
                let (q0, k0) = match self.layout {
                    RingLayout::Stripe => (0, usize::from(source > r)),
                    _ => (qs.global, ks.global),
                };
                let mask = if self.causal { classify(qs.len, ks.len, q0, k0) } else { Some(Mask::None) };
                if let Some(mask) = mask {
                    parts.push(Part {
                        q_seg: qi,
                        kv_seg: ki,
                        q_start: qs.local,
                        q_len: qs.len,
                        kv_start: ks.local,
                        kv_len: ks.len,
                        mask,
                        q0,
                        k0,
                    });
                }
            }
        }
        Step { source, parts }
    }

    /// Splits `x`, laid out `[outer, seq_len, row]` (e.g. `outer = batch * heads`,
    /// `row = head_dim`), into one `[outer, rank_len(r), row]` shard per rank.
    pub fn shard<T: Copy>(&self, x: &[T], outer: usize, row: usize) -> Result<Vec<Vec<T>>> {
        self.check_full("x", x.len(), outer, row)?;
        Ok((0..self.ranks)
            .map(|r| {
                let len = self.rank_len(r);
                let mut out = Vec::with_capacity(outer * len * row);
                for o in 0..outer {
                    for i in 0..len {
                        let t = self.global_position(r, i);
                        out.extend_from_slice(&x[(o * self.seq_len + t) * row..][..row]);
                    }
                }
                out
            })
            .collect())
    }

    /// Puts shards made by [`Self::shard`] back into one `[outer, seq_len, row]` array.
    pub fn unshard<T: Copy + Default>(&self, shards: &[Vec<T>], outer: usize, row: usize) -> Result<Vec<T>> {
        ensure(shards.len() == self.ranks, "shards", || format!("{} shards for {} ranks", shards.len(), self.ranks))?;
        let mut x = vec![T::default(); outer * self.seq_len * row];
        for (r, sh) in shards.iter().enumerate() {
            let len = self.rank_len(r);
            ensure(sh.len() == outer * len * row, "shards", || {
                format!("shard {r} holds {} elements, rank {r} needs {}", sh.len(), outer * len * row)
            })?;
            for o in 0..outer {
                for i in 0..len {
                    let t = self.global_position(r, i);
                    x[(o * self.seq_len + t) * row..][..row].copy_from_slice(&sh[(o * len + i) * row..][..row]);
                }
            }
        }
        Ok(x)
    }

    fn check_full(&self, arg: &'static str, have: usize, outer: usize, row: usize) -> Result<()> {
        let need = outer * self.seq_len * row;
        ensure(have == need, arg, || format!("holds {have} elements, [{outer}, {}, {row}] needs {need}", self.seq_len))
    }
}

/// The mask of a causal pair of `q_len` query rows at `q0 + i` and `kv_len`
/// keys at `k0 + j`: `None` when no key is visible, [`Mask::None`] when every key is.
fn classify(q_len: usize, kv_len: usize, q0: usize, k0: usize) -> Option<Mask> {
    if q0 + q_len <= k0 {
        None
    } else if q0 + 1 >= k0 + kv_len {
        Some(Mask::None)
    } else {
        Some(Mask::Causal)
    }
}

/// The whole problem: heads and head dimension, the plan, the softmax scale.
/// Every rank's shards are contiguous `[B, H, rank_len, D]` (`Q`, `dO` and the
/// output with `q_heads`, `K`/`V` with `kv_heads`); `O`, `lse`, `delta` and `dQ`
/// are f32 per query segment, `dK`/`dV` f32 per KV segment, contiguous as
/// [`crate::blockwise`] lays them out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RingParams {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub plan: RingPlan,
    /// Multiplies `q . k`; `1/sqrt(head_dim)` unless set.
    pub scale: f32,
}

impl RingParams {
    pub fn new(batch: usize, q_heads: usize, kv_heads: usize, head_dim: usize, plan: RingPlan) -> Self {
        let scale = 1.0 / (head_dim.max(1) as f32).sqrt();
        RingParams { batch, q_heads, kv_heads, head_dim, plan, scale }
    }

    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// Checks the heads, the head dimension and the scale through the
    /// blockwise validation of the largest part.
    pub fn validate(&self) -> Result<()> {
        let n = self.plan.max_rank_len().max(1);
        self.block((n, n), (n, n), Mask::None, 0, 0).validate()
    }

    /// Elements of a rank's `Q`/`dO`/output shard and of its `K`/`V` shard.
    pub fn q_shard_elems(&self, r: usize) -> usize {
        self.batch * self.q_heads * self.plan.rank_len(r) * self.head_dim
    }

    pub fn kv_shard_elems(&self, r: usize) -> usize {
        self.batch * self.kv_heads * self.plan.rank_len(r) * self.head_dim
    }

    /// The launch of `lens = (q_len, kv_len)` rows within shards of
    /// `rank_lens = (q_rank_len, kv_rank_len)` rows (contiguous `[B, H, S, D]` strides).
    fn block(&self, rank_lens: (usize, usize), lens: (usize, usize), mask: Mask, q0: usize, k0: usize) -> BlockParams {
        let ((q_rank_len, kv_rank_len), (q_len, kv_len)) = (rank_lens, lens);
        let d = self.head_dim;
        let shape = BlockShape {
            batch: self.batch,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: d,
            q_len,
            kv_len,
        };
        let q = [self.q_heads * q_rank_len * d, q_rank_len * d, d];
        let kv = [self.kv_heads * kv_rank_len * d, kv_rank_len * d, d];
        let layout = BlockLayout { q, k: kv, v: kv, o: q };
        BlockParams { shape, layout, q0, k0, mask, scale: self.scale }
    }

    /// The launch of `part` by rank `r` on the block of rank `source`. Its
    /// `Q`/`dO`/output tensors start at element [`Self::q_offset`] of the
    /// rank's shards, `K`/`V` at [`Self::kv_offset`] of the block's.
    pub fn part_params(&self, r: usize, source: usize, part: &Part) -> BlockParams {
        let (qn, kn) = (self.plan.rank_len(r), self.plan.rank_len(source));
        self.block((qn, kn), (part.q_len, part.kv_len), part.mask, part.q0, part.k0)
    }

    /// The per-segment launches (finalize, backward pre-pass) of query segment `seg` of rank `r`.
    pub fn segment_params(&self, r: usize, seg: &Segment) -> BlockParams {
        let n = self.plan.rank_len(r);
        self.block((n, n), (seg.len, seg.len), Mask::None, 0, 0)
    }

    /// Element offset of local row `row` in a `Q`-shaped shard.
    pub fn q_offset(&self, row: usize) -> usize {
        row * self.head_dim
    }

    /// Element offset of row `row` in a `K`-shaped block.
    pub fn kv_offset(&self, row: usize) -> usize {
        row * self.head_dim
    }

    /// Forward FLOPs of the whole ring by the DESIGN.md 6 convention (the dense count).
    pub fn forward_flops(&self) -> f64 {
        let s = self.plan.seq_len as f64;
        let full = 4.0 * (self.batch * self.q_heads) as f64 * s * s * self.head_dim as f64;
        if self.plan.causal {
            full / 2.0
        } else {
            full
        }
    }

    /// Bytes each rank sends per forward step (`K` and `V` of the largest block).
    pub fn forward_step_bytes(&self, elem_bytes: usize) -> usize {
        2 * self.batch * self.kv_heads * self.plan.max_rank_len() * self.head_dim * elem_bytes
    }
}

/// One rank's forward result, which its backward needs: the final normalised
/// `O` (f32, `[B, H_q, seg.len, D]`) and `lse` (`[B, H_q, seg.len]`) of every query segment.
#[derive(Debug, Clone, PartialEq)]
pub struct RingState {
    pub o: Vec<Vec<f32>>,
    pub lse: Vec<Vec<f32>>,
}

/// One rank's gradients, f32: `dq` per query segment (`[B, H_q, seg.len, D]`),
/// `dk`/`dv` per KV segment of the rank's own block (`[B, H_kv, seg.len, D]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RingGrads {
    pub dq: Vec<Vec<f32>>,
    pub dk: Vec<Vec<f32>>,
    pub dv: Vec<Vec<f32>>,
}

impl RingParams {
    /// Rows of `[outer, seg.len, row]` per-segment arrays of rank `r`, joined into
    /// one `[outer, rank_len, row]` shard (the layout [`RingPlan::unshard`] takes).
    pub fn join_segments<T: Copy>(&self, r: usize, per_seg: &[Vec<T>], outer: usize, row: usize) -> Vec<T> {
        let segs = self.plan.segments(r);
        let mut out = Vec::with_capacity(outer * self.plan.rank_len(r) * row);
        for o in 0..outer {
            for (seg, x) in segs.iter().zip(per_seg) {
                out.extend_from_slice(&x[o * seg.len * row..][..seg.len * row]);
            }
        }
        out
    }

    /// NaN-filled per-segment state for rank `r` (every element is written before it is read).
    pub fn empty_state(&self, r: usize) -> RingState {
        let rows = |len: usize| self.batch * self.q_heads * len;
        let segs = self.plan.segments(r);
        RingState {
            o: segs.iter().map(|s| vec![f32::NAN; rows(s.len) * self.head_dim]).collect(),
            lse: segs.iter().map(|s| vec![f32::NAN; rows(s.len)]).collect(),
        }
    }

    /// Zeroed gradients for rank `r` (the backward accumulates into them).
    pub fn zero_grads(&self, r: usize) -> RingGrads {
        let segs = self.plan.segments(r);
        let (d, b) = (self.head_dim, self.batch);
        let kv: Vec<Vec<f32>> = segs.iter().map(|s| vec![0.0; b * self.kv_heads * s.len * d]).collect();
        RingGrads { dq: segs.iter().map(|s| vec![0.0; b * self.q_heads * s.len * d]).collect(), dk: kv.clone(), dv: kv }
    }

    /// Checks one shard per rank of exactly the rank's size (`Q`-shaped or `K`-shaped).
    pub fn check_shards(
        &self,
        arg: &'static str,
        lens: impl ExactSizeIterator<Item = usize>,
        q_like: bool,
    ) -> Result<()> {
        self.validate()?;
        let n = lens.len();
        ensure(n == self.plan.ranks, arg, || format!("{n} shards for {} ranks", self.plan.ranks))?;
        for (r, have) in lens.enumerate() {
            let need = if q_like { self.q_shard_elems(r) } else { self.kv_shard_elems(r) };
            ensure(have == need, arg, || format!("shard {r} holds {have} elements, rank {r} needs {need}"))?;
        }
        Ok(())
    }

    /// Checks that `states` are the forward states of this plan.
    pub fn check_states(&self, states: &[RingState]) -> Result<()> {
        ensure(states.len() == self.plan.ranks, "states", || {
            format!("{} states for {} ranks", states.len(), self.plan.ranks)
        })?;
        for (r, st) in states.iter().enumerate() {
            let want = self.empty_state(r);
            let same =
                |a: &[Vec<f32>], b: &[Vec<f32>]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.len() == y.len());
            ensure(same(&st.o, &want.o) && same(&st.lse, &want.lse), "states", || {
                format!("state {r} does not match rank {r}'s segments")
            })?;
        }
        Ok(())
    }
}
