//! Dense decode attention (flash-decoding), DESIGN.md 4.1: one query token per
//! sequence against its whole cache, `o = softmax(q K^T * scale) V` over the
//! positions `< seq_lens[b]`. The baseline every saving is measured against.
//!
//! The GPU kernels split each sequence into chunks of `chunk_len` keys
//! ([`DecodePlan`]), write one normalised partial output and log-sum-exp per
//! chunk into the caller's workspace, and merge the partials by the
//! log-sum-exp rule. Documented results on odd input:
//! - `seq_lens[b] == 0`: the output rows of sequence `b` are exactly zero.
//! - `seq_lens[b] > capacity`: the output rows of sequence `b` are NaN (the
//!   lengths live in device memory, so the launcher cannot check them; the
//!   kernels refuse loudly instead of reading past the cache).
//! - NaN or infinite inputs may produce NaN outputs; they never hang a kernel
//!   or send it out of bounds.

pub mod cuda;
pub mod reference;
pub mod run;
pub mod wgpu;

use crate::dtype::DType;
use crate::error::{ensure, Result};

/// Largest head dimension the kernels accept.
pub const MAX_HEAD_DIM: usize = 256;
/// Query heads of one GQA group that one GPU block / workgroup serves; larger
/// groups are split into `ceil(groups / HEADS_PER_BLOCK)` head chunks.
pub const HEADS_PER_BLOCK: usize = 8;
/// The plan aims for about this many blocks per launch, enough to fill every
/// SM of an H100 several times over.
const TARGET_BLOCKS: usize = 2048;
/// Keys per split never go below this, so a split amortises its merge cost.
const MIN_CHUNK: usize = 256;

/// The problem size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeShape {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `S_cap`: positions the cache can hold per sequence and kv head.
    pub capacity: usize,
}

impl DecodeShape {
    pub fn groups(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }
}

/// Strides in elements; the head dimension is always contiguous.
///
/// `q[b, h, d]` is at `b*q[0] + h*q[1] + d`, `K[b, g, j, d]` at
/// `b*k[0] + g*k[1] + j*k[2] + d` (likewise `V`), `o[b, h, d]` at `b*o[0] + h*o[1] + d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLayout {
    pub q: [usize; 2],
    pub k: [usize; 3],
    pub v: [usize; 3],
    pub o: [usize; 2],
}

impl DecodeLayout {
    /// Cache as `[B, H_kv, S_cap, D]`, query and output as `[B, H_q, D]`.
    pub fn bhsd(s: &DecodeShape) -> Self {
        let d = s.head_dim;
        let kv = [s.kv_heads * s.capacity * d, s.capacity * d, d];
        DecodeLayout { q: [s.q_heads * d, d], k: kv, v: kv, o: [s.q_heads * d, d] }
    }

    /// Cache as `[B, S_cap, H_kv, D]` (token-major), query and output as `[B, H_q, D]`.
    pub fn bshd(s: &DecodeShape) -> Self {
        let d = s.head_dim;
        let kv = [s.capacity * s.kv_heads * d, d, s.kv_heads * d];
        DecodeLayout { q: [s.q_heads * d, d], k: kv, v: kv, o: [s.q_heads * d, d] }
    }
}

/// How a launch splits the work; a function of the shape alone, so the
/// workspace size is known before any device is touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    pub chunk_len: usize,
    pub num_splits: usize,
    pub head_chunks: usize,
}

/// Everything a launch needs besides the buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeParams {
    pub shape: DecodeShape,
    pub layout: DecodeLayout,
    /// Multiplies `q . k`; `1/sqrt(head_dim)` unless set.
    pub scale: f32,
}

impl DecodeParams {
    /// Contiguous `[B, H_kv, S_cap, D]` cache, `scale = 1/sqrt(D)`.
    pub fn new(shape: DecodeShape) -> Self {
        DecodeParams { shape, layout: DecodeLayout::bhsd(&shape), scale: 1.0 / (shape.head_dim.max(1) as f32).sqrt() }
    }

    pub fn with_layout(mut self, layout: DecodeLayout) -> Self {
        self.layout = layout;
        self
    }

    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// Checks the shape, the strides and the scale.
    pub fn validate(&self) -> Result<()> {
        let s = &self.shape;
        ensure(s.batch >= 1, "batch", || "must be at least 1 (empty batch)".into())?;
        ensure(s.batch <= 65535, "batch", || format!("{} exceeds 65535", s.batch))?;
        ensure(s.kv_heads >= 1, "kv_heads", || "must be at least 1".into())?;
        ensure(s.q_heads >= 1, "q_heads", || "must be at least 1".into())?;
        ensure(s.q_heads.is_multiple_of(s.kv_heads), "q_heads", || {
            format!("{} is not a multiple of kv_heads = {}", s.q_heads, s.kv_heads)
        })?;
        ensure(s.head_dim >= 1 && s.head_dim <= MAX_HEAD_DIM, "head_dim", || {
            format!("{} is outside 1..={MAX_HEAD_DIM}", s.head_dim)
        })?;
        ensure(s.capacity >= 1, "capacity", || "must be at least 1".into())?;
        ensure(s.capacity <= i32::MAX as usize, "capacity", || format!("{} exceeds i32::MAX", s.capacity))?;
        let plan = self.plan();
        ensure(s.kv_heads * plan.head_chunks <= 65535, "kv_heads", || {
            format!("kv_heads x head chunks = {} exceeds 65535", s.kv_heads * plan.head_chunks)
        })?;
        ensure(self.scale.is_finite(), "scale", || format!("{} is not finite", self.scale))?;
        let (d, l) = (s.head_dim, &self.layout);
        ensure(no_overlap(&[(s.batch, l.o[0]), (s.q_heads, l.o[1])], d), "o_strides", || {
            format!("{:?} make output rows of length {d} overlap", l.o)
        })?;
        Ok(())
    }

    pub fn plan(&self) -> DecodePlan {
        let s = &self.shape;
        let head_chunks = s.groups().max(1).div_ceil(HEADS_PER_BLOCK);
        let blocks_per_split = (s.batch * s.kv_heads * head_chunks).max(1);
        let want_splits = TARGET_BLOCKS.div_ceil(blocks_per_split).max(1);
        let chunk_len = s.capacity.div_ceil(want_splits).next_multiple_of(64).max(MIN_CHUNK);
        DecodePlan { chunk_len, num_splits: s.capacity.max(1).div_ceil(chunk_len), head_chunks }
    }

    /// Bytes of f32 scratch a launch needs: a partial output row and a
    /// log-sum-exp per (sequence, query head, split).
    pub fn workspace_bytes(&self) -> usize {
        let rows = self.shape.batch * self.shape.q_heads * self.plan().num_splits;
        rows * (self.shape.head_dim + 1) * 4
    }

    /// Element offset, inside the workspace, where the log-sum-exp values start.
    pub(crate) fn lse_offset(&self) -> usize {
        self.shape.batch * self.shape.q_heads * self.plan().num_splits * self.shape.head_dim
    }

    /// Elements the query buffer must hold.
    pub fn q_len(&self) -> usize {
        extent(&[(self.shape.batch, self.layout.q[0]), (self.shape.q_heads, self.layout.q[1])], self.shape.head_dim)
    }

    pub fn k_len(&self) -> usize {
        self.cache_len(&self.layout.k)
    }

    pub fn v_len(&self) -> usize {
        self.cache_len(&self.layout.v)
    }

    pub fn o_len(&self) -> usize {
        extent(&[(self.shape.batch, self.layout.o[0]), (self.shape.q_heads, self.layout.o[1])], self.shape.head_dim)
    }

    fn cache_len(&self, st: &[usize; 3]) -> usize {
        let s = &self.shape;
        extent(&[(s.batch, st[0]), (s.kv_heads, st[1]), (s.capacity, st[2])], s.head_dim)
    }

    /// Checks buffer lengths (in elements) and the workspace size against the layout.
    pub(crate) fn validate_buffers(&self, b: BufferLens) -> Result<()> {
        self.validate()?;
        let need = |arg: &'static str, have: usize, need: usize| {
            ensure(have >= need, arg, || format!("holds {have} elements, the layout needs {need}"))
        };
        need("q", b.q, self.q_len())?;
        need("k_cache", b.k, self.k_len())?;
        need("v_cache", b.v, self.v_len())?;
        need("seq_lens", b.seq_lens, self.shape.batch)?;
        need("out", b.o, self.o_len())?;
        let ws = self.workspace_bytes();
        ensure(b.workspace_bytes >= ws, "workspace", || {
            format!("holds {} bytes, this shape needs {ws}", b.workspace_bytes)
        })
    }

    /// Bytes one decode step moves: the K and V rows read for every sequence,
    /// plus the query and the output.
    pub fn bytes_moved(&self, seq_lens: &[u32], dtype: DType) -> u64 {
        let s = &self.shape;
        let kv: u64 = seq_lens.iter().map(|&n| (n as usize).min(s.capacity) as u64).sum();
        let elems = 2 * kv * (s.kv_heads * s.head_dim) as u64 + 2 * (s.batch * s.q_heads * s.head_dim) as u64;
        elems * dtype.size() as u64
    }
}

/// Buffer lengths a launcher was handed, in elements (workspace in bytes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BufferLens {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub seq_lens: usize,
    pub o: usize,
    pub workspace_bytes: usize,
}

/// One past the largest element offset of a strided tensor with a contiguous last axis of `inner`.
pub(crate) fn extent(axes: &[(usize, usize)], inner: usize) -> usize {
    axes.iter().map(|&(n, st)| (n.max(1) - 1) * st).sum::<usize>() + inner
}

/// True when the rows of length `inner` addressed by `axes` never share an element.
pub(crate) fn no_overlap(axes: &[(usize, usize)], inner: usize) -> bool {
    let mut live: Vec<(usize, usize)> = axes.iter().copied().filter(|&(n, _)| n > 1).collect();
    live.sort_by_key(|&(_, st)| st);
    let mut span = inner;
    for (n, st) in live {
        if st < span {
            return false;
        }
        span += (n - 1) * st;
    }
    true
}
