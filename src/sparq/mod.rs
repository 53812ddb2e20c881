//! SparQ attention (Ribar et al. 2023, DESIGN.md 4.2): per decode step,
//! approximate scores from the `r` largest query components, exact attention
//! over the `k` best positions only, mixed with the mean value.
//!
//! For sequence `b`, query head `h` (kv head `g`), cache length `S`:
//! 1. `i1 = argtopk(|q|, r)` (shared GQA mode: of `sum_h |q_h|` over the group);
//! 2. `s_hat = softmax(q[i1] . K[:, i1]^T / tau)`, `tau = sqrt(D * |q[i1]|_1 / |q|_1)`;
//! 3. `i2`: the `min(k, S)` best positions by `s_hat` (shared mode: by the
//!    group's sum of `s_hat`), the newest `min(l, k, S)` always among them;
//!    `alpha = sum(s_hat[i2])` per head;
//! 4. `y = softmax(q . K[i2]^T / sqrt(D)) V[i2]`;
//! 5. `out = alpha * y + (1 - alpha) * v_bar` (or `y` when reallocation is off).
//!
//! Ties in steps 1 and 3 go to the lower index. A sequence shorter than `k` is
//! read whole: exact attention, `alpha = 1`. A sequence of length 0 gives zeros.
//!
//! The cache ([`SparqCacheShape`], owned per backend by `cuda::SparqCache` /
//! `wgpu::SparqCache`) holds, per sequence and kv head, K row-major
//! `[S_cap, D]`, K transposed `[D, S_cap]` (step 2 reads `r` contiguous rows
//! of it), V row-major, and the running mean of V in f32.

pub mod cuda;
pub mod reference;
pub mod run;
pub mod wgpu;

use crate::decode::{DecodeShape, HEADS_PER_BLOCK};
use crate::dtype::DType;
use crate::error::{ensure, Result};
use std::fmt;

/// How query heads of one GQA group select positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GqaMode {
    /// The paper's appendix: one `i1` from `sum_h |q_h|`, one `i2` from the sum
    /// of the heads' `s_hat`; each K^T column and K/V row is read once per group.
    Shared,
    /// Every query head selects alone.
    PerHead,
}

impl fmt::Display for GqaMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GqaMode::Shared => "shared",
            GqaMode::PerHead => "per-head",
        })
    }
}

impl std::str::FromStr for GqaMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "shared" => Ok(GqaMode::Shared),
            "per-head" | "per_head" => Ok(GqaMode::PerHead),
            o => Err(format!("unknown GQA mode `{o}` (expected shared or per-head)")),
        }
    }
}

/// SparQ's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparqConfig {
    /// Query components used for the approximate scores, `1..=head_dim`.
    pub r: usize,
    /// Positions attended exactly, `>= 1`.
    pub k: usize,
    /// Newest positions always attended; `None` means `k / 4`.
    pub local_window: Option<usize>,
    /// Mix `y` with the mean value by `alpha` (`out = y` when false).
    pub reallocate_to_mean: bool,
    pub gqa: GqaMode,
}

impl SparqConfig {
    pub fn new(r: usize, k: usize) -> Self {
        SparqConfig { r, k, local_window: None, reallocate_to_mean: true, gqa: GqaMode::Shared }
    }

    pub fn local_window(&self) -> usize {
        self.local_window.unwrap_or(self.k / 4)
    }

    /// Positions attended and forced-in window for a sequence of length `len`:
    /// `(min(k, len), min(l, k, len))`.
    pub fn selection(&self, len: usize) -> (usize, usize) {
        let n = self.k.min(len);
        (n, self.local_window().min(n))
    }
}

/// The cache's size: contiguous `[batch, kv_heads, capacity, head_dim]` for K and V,
/// `[batch, kv_heads, head_dim, capacity]` for K transposed, `[batch, kv_heads, head_dim]`
/// (f32) for the mean of V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparqCacheShape {
    pub batch: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
}

impl SparqCacheShape {
    pub fn validate(&self) -> Result<()> {
        ensure(self.batch >= 1, "batch", || "must be at least 1 (empty batch)".into())?;
        ensure(self.batch <= 65535, "batch", || format!("{} exceeds 65535", self.batch))?;
        ensure(self.kv_heads >= 1 && self.kv_heads <= 65535, "kv_heads", || {
            format!("{} is outside 1..=65535", self.kv_heads)
        })?;
        ensure(self.head_dim >= 1 && self.head_dim <= crate::decode::MAX_HEAD_DIM, "head_dim", || {
            format!("{} is outside 1..={}", self.head_dim, crate::decode::MAX_HEAD_DIM)
        })?;
        ensure(self.capacity >= 1 && self.capacity <= i32::MAX as usize, "capacity", || {
            format!("{} is outside 1..=i32::MAX", self.capacity)
        })
    }

    /// Elements of each of K, K^T and V.
    pub fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.capacity * self.head_dim
    }

    /// f32 elements of the mean of V.
    pub fn mean_len(&self) -> usize {
        self.batch * self.kv_heads * self.head_dim
    }

    /// Device bytes the cache holds for `dtype` (three copies of the keys and
    /// values minus one, the mean, the lengths).
    pub fn bytes(&self, dtype: DType) -> usize {
        3 * self.kv_len() * dtype.size() + 4 * self.mean_len() + 4 * self.batch
    }
}

/// Everything one decode step needs besides the buffers. `scale` of the exact
/// attention is `1/sqrt(head_dim)`, as in the paper.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparqParams {
    pub cache: SparqCacheShape,
    pub q_heads: usize,
    /// Strides of `q[b, h, :]` in elements.
    pub q_strides: [usize; 2],
    /// Strides of `out[b, h, :]` in elements.
    pub o_strides: [usize; 2],
    pub config: SparqConfig,
}

/// Positions per split of the gather stage (and per scores split, times 16).
const GATHER_CHUNK: usize = 256;
const SCORE_CHUNK: usize = 4096;

/// How a step is split over blocks, and where each scratch array lives inside
/// the workspace (offsets in 32-bit words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparqPlan {
    /// Positions per block of the scores stage.
    pub score_chunk: usize,
    pub score_splits: usize,
    /// Entries of the position list per block of the gather stage.
    pub gather_chunk: usize,
    pub gather_splits: usize,
    /// `min(k, capacity)`: the length of each position list.
    pub k_cap: usize,
    /// Selection rows: `batch * kv_heads` (shared) or `batch * q_heads` (per head).
    pub select_rows: usize,
    /// Query heads per block in the scores and gather stages (1 in per-head mode).
    pub heads_per_block: usize,
    pub head_chunks: usize,
    /// `[batch, q_heads, capacity]` f32: approximate logits `q[i1] . K[:, i1] / tau`.
    pub logits: usize,
    /// `[batch, q_heads, score_splits, 2]` f32: (max, sum of exp) per scores block.
    pub norm: usize,
    /// `[batch, q_heads]` f32: log-sum-exp of each head's approximate logits.
    pub lse: usize,
    /// `[batch, kv_heads, capacity]` f32, shared mode only: the group's sum of `s_hat`.
    pub keys: usize,
    /// `[select_rows, k_cap]` u32: selected positions, ascending.
    pub indices: usize,
    /// `[batch, q_heads, gather_splits, head_dim + 2]` f32: normalised partial
    /// output, its log-sum-exp, and the partial `alpha`.
    pub partials: usize,
    /// Total words.
    pub words: usize,
}

impl SparqParams {
    /// Contiguous `[batch, q_heads, head_dim]` query and output.
    pub fn new(cache: SparqCacheShape, q_heads: usize, config: SparqConfig) -> Self {
        let d = cache.head_dim;
        SparqParams { cache, q_heads, q_strides: [q_heads * d, d], o_strides: [q_heads * d, d], config }
    }

    /// The equivalent dense-decode shape (same cache size and heads).
    pub fn decode_shape(&self) -> DecodeShape {
        let c = &self.cache;
        DecodeShape {
            batch: c.batch,
            q_heads: self.q_heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            capacity: c.capacity,
        }
    }

    pub fn groups(&self) -> usize {
        self.q_heads / self.cache.kv_heads.max(1)
    }

    pub fn validate(&self) -> Result<()> {
        let c = &self.cache;
        c.validate()?;
        ensure(self.q_heads >= 1, "q_heads", || "must be at least 1".into())?;
        ensure(self.q_heads.is_multiple_of(c.kv_heads), "q_heads", || {
            format!("{} is not a multiple of kv_heads = {}", self.q_heads, c.kv_heads)
        })?;
        let cfg = &self.config;
        ensure(cfg.r >= 1 && cfg.r <= c.head_dim, "r", || {
            format!("{} is outside 1..=head_dim = {}", cfg.r, c.head_dim)
        })?;
        ensure(cfg.k >= 1, "k", || "must be at least 1".into())?;
        ensure(cfg.k <= i32::MAX as usize, "k", || format!("{} exceeds i32::MAX", cfg.k))?;
        let d = c.head_dim;
        let no_overlap =
            crate::decode::no_overlap(&[(c.batch, self.o_strides[0]), (self.q_heads, self.o_strides[1])], d);
        ensure(no_overlap, "o_strides", || format!("{:?} make output rows of length {d} overlap", self.o_strides))?;
        let plan = self.plan();
        ensure(c.kv_heads * plan.head_chunks <= 65535, "q_heads", || {
            format!("{} blocks along one grid axis exceed 65535", c.kv_heads * plan.head_chunks)
        })
    }

    pub fn plan(&self) -> SparqPlan {
        let c = &self.cache;
        let (b, hq, d) = (c.batch, self.q_heads, c.head_dim);
        let k_cap = self.config.k.min(c.capacity);
        let shared = self.config.gqa == GqaMode::Shared;
        let heads_per_block = if shared { HEADS_PER_BLOCK.min(self.groups().max(1)) } else { 1 };
        let head_chunks = self.groups().max(1).div_ceil(heads_per_block);
        let score_splits = c.capacity.div_ceil(SCORE_CHUNK);
        let gather_splits = k_cap.div_ceil(GATHER_CHUNK);
        let select_rows = if shared { b * c.kv_heads } else { b * hq };
        let logits = 0;
        let norm = logits + b * hq * c.capacity;
        let lse = norm + b * hq * score_splits * 2;
        let keys = lse + b * hq;
        let indices = keys + if shared { b * c.kv_heads * c.capacity } else { 0 };
        let partials = indices + select_rows * k_cap;
        let words = partials + b * hq * gather_splits * (d + 2);
        SparqPlan {
            score_chunk: SCORE_CHUNK,
            score_splits,
            gather_chunk: GATHER_CHUNK,
            gather_splits,
            k_cap,
            select_rows,
            heads_per_block,
            head_chunks,
            logits,
            norm,
            lse,
            keys,
            indices,
            partials,
            words,
        }
    }

    pub fn workspace_bytes(&self) -> usize {
        4 * self.plan().words
    }

    /// Elements the query buffer must hold.
    pub fn q_len(&self) -> usize {
        crate::decode::extent(
            &[(self.cache.batch, self.q_strides[0]), (self.q_heads, self.q_strides[1])],
            self.cache.head_dim,
        )
    }

    pub fn o_len(&self) -> usize {
        crate::decode::extent(
            &[(self.cache.batch, self.o_strides[0]), (self.q_heads, self.o_strides[1])],
            self.cache.head_dim,
        )
    }

    /// Checks the cache a step runs on, buffer lengths (elements) and the workspace size (bytes).
    pub(crate) fn validate_step(
        &self,
        cache: &SparqCacheShape,
        q: usize,
        o: usize,
        workspace_bytes: usize,
    ) -> Result<()> {
        self.validate()?;
        ensure(*cache == self.cache, "cache", || {
            format!("has shape {cache:?}, the parameters describe {:?}", self.cache)
        })?;
        ensure(q >= self.q_len(), "q", || format!("holds {q} elements, the layout needs {}", self.q_len()))?;
        ensure(o >= self.o_len(), "out", || format!("holds {o} elements, the layout needs {}", self.o_len()))?;
        let need = self.workspace_bytes();
        ensure(workspace_bytes >= need, "workspace", || {
            format!("holds {workspace_bytes} bytes, this step needs {need}")
        })
    }
}

/// Bytes one decode step reads from the cache, per DESIGN.md 4.2: per sequence
/// and kv head, `r` rows of K^T of length `S`, `2 * min(k, S)` rows of K and V
/// of length `D`, and the mean and query (`4 * D`), in the cache's dtype; per
/// head in per-head mode. Returns `(sparq, dense)` for comparison.
pub fn bytes_model(p: &SparqParams, seq_lens: &[u32], dtype: DType) -> (u64, u64) {
    let c = &p.cache;
    let (d, r) = (c.head_dim as u64, p.config.r as u64);
    let readers = match p.config.gqa {
        GqaMode::Shared => 1,
        GqaMode::PerHead => p.groups() as u64,
    };
    let (mut sparq, mut dense) = (0u64, 0u64);
    for &len in seq_lens {
        let s = (len as usize).min(c.capacity) as u64;
        let (n, _) = p.config.selection(s as usize);
        sparq += c.kv_heads as u64 * (readers * (s * r + 2 * n as u64 * d) + 4 * d);
        dense += c.kv_heads as u64 * 2 * s * d;
    }
    let e = dtype.size() as u64;
    (sparq * e, dense * e)
}

/// Checks a bulk fill of a cache of shape `shape` from an engine's K/V
/// (`k_strides` / `v_strides` as in `DecodeLayout`: batch, kv head, position;
/// head dim contiguous) holding `k_len` / `v_len` elements, with lengths `seq_lens`.
pub(crate) fn validate_fill(
    shape: &SparqCacheShape,
    (k_len, k_strides): (usize, [usize; 3]),
    (v_len, v_strides): (usize, [usize; 3]),
    seq_lens: &[u32],
) -> Result<()> {
    shape.validate()?;
    ensure(seq_lens.len() == shape.batch, "seq_lens", || {
        format!("{} lengths for a batch of {}", seq_lens.len(), shape.batch)
    })?;
    for (b, &len) in seq_lens.iter().enumerate() {
        ensure(len as usize <= shape.capacity, "seq_lens", || {
            format!("sequence {b} has length {len}, the cache holds {}", shape.capacity)
        })?;
    }
    let longest = seq_lens.iter().copied().max().unwrap_or(0) as usize;
    let extent = |st: &[usize; 3]| {
        crate::decode::extent(&[(shape.batch, st[0]), (shape.kv_heads, st[1]), (longest.max(1), st[2])], shape.head_dim)
    };
    ensure(k_len >= extent(&k_strides), "k", || {
        format!("holds {k_len} elements, the layout needs {}", extent(&k_strides))
    })?;
    ensure(v_len >= extent(&v_strides), "v", || {
        format!("holds {v_len} elements, the layout needs {}", extent(&v_strides))
    })
}

/// Checks an append of one token per sequence: `k_new` / `v_new` hold
/// `[batch, kv_heads, head_dim]` contiguous, and no sequence may be full.
pub(crate) fn validate_append(shape: &SparqCacheShape, seq_lens: &[u32], k_new: usize, v_new: usize) -> Result<()> {
    let need = shape.mean_len();
    ensure(k_new >= need, "k_new", || format!("holds {k_new} elements, [batch, kv_heads, head_dim] needs {need}"))?;
    ensure(v_new >= need, "v_new", || format!("holds {v_new} elements, [batch, kv_heads, head_dim] needs {need}"))?;
    match seq_lens.iter().position(|&l| l as usize >= shape.capacity) {
        Some(b) => Err(crate::Error::invalid("cache", format!("sequence {b} is full ({} positions)", shape.capacity))),
        None => Ok(()),
    }
}
