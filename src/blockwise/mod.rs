//! Blockwise attention, DESIGN.md 4.4: one query block against one KV block
//! with global position offsets `q0` and `k0`, producing a normalised partial
//! output `O` (f32) and its log-sum-exp `lse` (natural log, f32) per query row,
//! so that partials over different KV blocks merge exactly by the LSE rule.
//! The building block of ring attention (`crate::ring`).
//!
//! Conventions every backend follows:
//! - Query row `i` has global position `q0 + i`, key row `j` has `k0 + j`;
//!   [`Mask::Causal`] lets row `i` see key `j` iff `k0 + j <= q0 + i`.
//! - A row with no visible key has `lse = -inf` and `O = 0`.
//! - `O` and `lse` are f32 and contiguous: `O[b, h, i, d]` at
//!   `((b * q_heads + h) * q_len + i) * head_dim + d`, `lse[b, h, i]` at
//!   `(b * q_heads + h) * q_len + i`. `O` is always kept normalised, so the
//!   finalize step only casts it (and writes 0 for `-inf` rows).
//! - Backward takes the final `O`, `lse` and `dO` and accumulates (`+=`) into
//!   f32 gradients: `dQ` shaped like `O`, `dK`/`dV` as `[B, H_kv, kv_len, D]`
//!   contiguous; `delta = rowsum(dO * O)` comes from a pre-pass, shaped like `lse`.

pub mod cuda;
pub mod reference;
pub mod run;
pub mod wgpu;

use crate::decode::{extent, no_overlap};
use crate::error::{ensure, Result};

/// Largest head dimension the kernels accept.
pub const MAX_HEAD_DIM: usize = 256;

/// Which keys a query row sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mask {
    /// Every key of the block.
    None,
    /// Keys at global positions `<=` the query's.
    Causal,
}

impl Mask {
    /// Whether the query at global position `qi` sees the key at global position `kj`.
    pub fn visible(self, qi: usize, kj: usize) -> bool {
        match self {
            Mask::None => true,
            Mask::Causal => kj <= qi,
        }
    }
}

/// The problem size of one (Q block, KV block) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Query rows in the Q block.
    pub q_len: usize,
    /// Key/value rows in the KV block.
    pub kv_len: usize,
}

impl BlockShape {
    /// Checks the sizes: everything at least 1, GQA divisibility, the head
    /// dimension, and f32 state small enough for 32-bit indices.
    pub fn validate(&self) -> Result<()> {
        let s = self;
        ensure(s.batch >= 1, "batch", || "must be at least 1 (empty batch)".into())?;
        ensure(s.kv_heads >= 1, "kv_heads", || "must be at least 1".into())?;
        ensure(s.q_heads >= 1, "q_heads", || "must be at least 1".into())?;
        ensure(s.q_heads.is_multiple_of(s.kv_heads), "q_heads", || {
            format!("{} is not a multiple of kv_heads = {}", s.q_heads, s.kv_heads)
        })?;
        ensure(s.head_dim >= 1 && s.head_dim <= MAX_HEAD_DIM, "head_dim", || {
            format!("{} is outside 1..={MAX_HEAD_DIM}", s.head_dim)
        })?;
        ensure(s.q_len >= 1, "q_len", || "must be at least 1".into())?;
        ensure(s.kv_len >= 1, "kv_len", || "must be at least 1".into())?;
        let lim = i32::MAX as u128;
        let o = s.batch as u128 * s.q_heads as u128 * s.q_len as u128 * s.head_dim as u128;
        let kv = s.batch as u128 * s.kv_heads as u128 * s.kv_len as u128 * s.head_dim as u128;
        ensure(o <= lim && kv <= lim, "shape", || "the f32 outputs exceed i32::MAX elements".into())
    }

    pub fn groups(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    /// Elements of `O` / `dQ` (f32, contiguous).
    pub fn o_elems(&self) -> usize {
        self.batch * self.q_heads * self.q_len * self.head_dim
    }

    /// Elements of `lse` / `delta` (f32, contiguous).
    pub fn lse_elems(&self) -> usize {
        self.batch * self.q_heads * self.q_len
    }

    /// Elements of `dK` / `dV` (f32, contiguous).
    pub fn kv_grad_elems(&self) -> usize {
        self.batch * self.kv_heads * self.kv_len * self.head_dim
    }
}

/// Strides in elements of the caller's input-dtype tensors; the head dimension
/// is contiguous. `q[b, h, i, d]` at `b*q[0] + h*q[1] + i*q[2] + d`, `K[b, g, j, d]`
/// at `b*k[0] + g*k[1] + j*k[2] + d` (likewise `V`); `o` addresses both `dO` and
/// the finalized output `[b, h, i, d]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    pub q: [usize; 3],
    pub k: [usize; 3],
    pub v: [usize; 3],
    pub o: [usize; 3],
}

impl BlockLayout {
    /// Every tensor `[B, H, S, D]` contiguous.
    pub fn bhsd(s: &BlockShape) -> Self {
        let d = s.head_dim;
        let q = [s.q_heads * s.q_len * d, s.q_len * d, d];
        let kv = [s.kv_heads * s.kv_len * d, s.kv_len * d, d];
        BlockLayout { q, k: kv, v: kv, o: q }
    }

    /// Every tensor `[B, S, H, D]` contiguous (token-major, as most engines hold activations).
    pub fn bshd(s: &BlockShape) -> Self {
        let d = s.head_dim;
        let q = [s.q_len * s.q_heads * d, d, s.q_heads * d];
        let kv = [s.kv_len * s.kv_heads * d, d, s.kv_heads * d];
        BlockLayout { q, k: kv, v: kv, o: q }
    }
}

/// Everything a launch needs besides the buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockParams {
    pub shape: BlockShape,
    pub layout: BlockLayout,
    /// Global position of query row 0.
    pub q0: usize,
    /// Global position of key row 0.
    pub k0: usize,
    pub mask: Mask,
    /// Multiplies `q . k`; `1/sqrt(head_dim)` unless set.
    pub scale: f32,
}

impl BlockParams {
    /// Contiguous `[B, H, S, D]` tensors, offsets 0, `scale = 1/sqrt(D)`.
    pub fn new(shape: BlockShape, mask: Mask) -> Self {
        let scale = 1.0 / (shape.head_dim.max(1) as f32).sqrt();
        BlockParams { shape, layout: BlockLayout::bhsd(&shape), q0: 0, k0: 0, mask, scale }
    }

    pub fn with_layout(mut self, layout: BlockLayout) -> Self {
        self.layout = layout;
        self
    }

    pub fn with_offsets(mut self, q0: usize, k0: usize) -> Self {
        self.q0 = q0;
        self.k0 = k0;
        self
    }

    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    /// Checks the shape, the offsets, the strides and the scale.
    pub fn validate(&self) -> Result<()> {
        let s = &self.shape;
        s.validate()?;
        let lim = i32::MAX as usize;
        ensure(self.q0.checked_add(s.q_len).is_some_and(|e| e <= lim), "q0", || {
            format!("q0 + q_len = {} + {} exceeds i32::MAX", self.q0, s.q_len)
        })?;
        ensure(self.k0.checked_add(s.kv_len).is_some_and(|e| e <= lim), "k0", || {
            format!("k0 + kv_len = {} + {} exceeds i32::MAX", self.k0, s.kv_len)
        })?;
        ensure(self.scale.is_finite(), "scale", || format!("{} is not finite", self.scale))?;
        let (d, l) = (s.head_dim, &self.layout);
        ensure(no_overlap(&[(s.batch, l.o[0]), (s.q_heads, l.o[1]), (s.q_len, l.o[2])], d), "o_strides", || {
            format!("{:?} make output rows of length {d} overlap", l.o)
        })?;
        Ok(())
    }

    /// Elements the query buffer must hold.
    pub fn q_elems(&self) -> usize {
        let (s, l) = (&self.shape, &self.layout.q);
        extent(&[(s.batch, l[0]), (s.q_heads, l[1]), (s.q_len, l[2])], s.head_dim)
    }

    pub fn k_elems(&self) -> usize {
        self.kv_elems(&self.layout.k)
    }

    pub fn v_elems(&self) -> usize {
        self.kv_elems(&self.layout.v)
    }

    /// Elements `dO` and the finalized output must hold.
    pub fn o_elems(&self) -> usize {
        let (s, l) = (&self.shape, &self.layout.o);
        extent(&[(s.batch, l[0]), (s.q_heads, l[1]), (s.q_len, l[2])], s.head_dim)
    }

    fn kv_elems(&self, st: &[usize; 3]) -> usize {
        let s = &self.shape;
        extent(&[(s.batch, st[0]), (s.kv_heads, st[1]), (s.kv_len, st[2])], s.head_dim)
    }

    /// Query/key pairs that are visible (exact count for the offsets and mask).
    pub fn visible_pairs(&self) -> u64 {
        let s = &self.shape;
        (0..s.q_len)
            .map(|i| match self.mask {
                Mask::None => s.kv_len as u64,
                Mask::Causal => ((self.q0 + i + 1).saturating_sub(self.k0)).min(s.kv_len) as u64,
            })
            .sum()
    }

    /// Forward FLOPs by the DESIGN.md 6 convention: `4 * Sq * Sk * D * heads`
    /// per sequence, halved for causal (whatever the offsets).
    pub fn forward_flops(&self) -> f64 {
        let s = &self.shape;
        let full = 4.0 * (s.batch * s.q_heads) as f64 * s.q_len as f64 * s.kv_len as f64 * s.head_dim as f64;
        match self.mask {
            Mask::None => full,
            Mask::Causal => full / 2.0,
        }
    }

    /// Backward FLOPs: 2.5x the forward (five matmuls against two).
    pub fn backward_flops(&self) -> f64 {
        2.5 * self.forward_flops()
    }
}

/// What each launcher needs of its buffers, in argument order: `(name, elements)`.
/// The launchers of every backend check the lengths they were given against these.
impl BlockParams {
    pub(crate) fn forward_needs(&self) -> [(&'static str, usize); 5] {
        let s = &self.shape;
        [
            ("q", self.q_elems()),
            ("k", self.k_elems()),
            ("v", self.v_elems()),
            ("o", s.o_elems()),
            ("lse", s.lse_elems()),
        ]
    }

    pub(crate) fn finalize_needs(&self) -> [(&'static str, usize); 3] {
        [("o", self.shape.o_elems()), ("lse", self.shape.lse_elems()), ("out", self.o_elems())]
    }

    pub(crate) fn prepass_needs(&self) -> [(&'static str, usize); 3] {
        [("o", self.shape.o_elems()), ("d_o", self.o_elems()), ("delta", self.shape.lse_elems())]
    }

    pub(crate) fn backward_needs(&self) -> [(&'static str, usize); 9] {
        let s = &self.shape;
        [
            ("q", self.q_elems()),
            ("k", self.k_elems()),
            ("v", self.v_elems()),
            ("d_o", self.o_elems()),
            ("lse", s.lse_elems()),
            ("delta", s.lse_elems()),
            ("dq", s.o_elems()),
            ("dk", s.kv_grad_elems()),
            ("dv", s.kv_grad_elems()),
        ]
    }
}

impl BlockShape {
    pub(crate) fn merge_needs(&self) -> [(&'static str, usize); 4] {
        [("o", self.o_elems()), ("lse", self.lse_elems()), ("o_b", self.o_elems()), ("lse_b", self.lse_elems())]
    }
}

/// Checks buffer lengths `have` (elements, in the order of `needs`) against `needs`.
pub(crate) fn check_lens(needs: &[(&'static str, usize)], have: &[usize]) -> Result<()> {
    for (&(arg, need), &have) in needs.iter().zip(have) {
        need_elems(arg, have, need)?;
    }
    Ok(())
}

/// `Err` naming `arg` unless a buffer of `have` elements holds the `need` a layout asks for.
pub(crate) fn need_elems(arg: &'static str, have: usize, need: usize) -> Result<()> {
    ensure(have >= need, arg, || format!("holds {have} elements, the layout needs {need}"))
}

/// The LSE merge of DESIGN.md 4.4 for one row, stable when either side is `-inf`:
/// returns the merged `lse` and the weights of the two normalised partials.
pub fn merge_weights(lse_a: f64, lse_b: f64) -> (f64, f64, f64) {
    let (hi, lo) = if lse_a >= lse_b { (lse_a, lse_b) } else { (lse_b, lse_a) };
    if hi == f64::NEG_INFINITY {
        return (f64::NEG_INFINITY, 0.0, 0.0);
    }
    let lse = hi + (lo - hi).exp().ln_1p();
    (lse, (lse_a - lse).exp(), (lse_b - lse).exp())
}
