//! Cross-layer KV mapping (DESIGN.md 4.5): LCKV (Wu & Tu 2024, arXiv
//! 2405.10637), cross-layer attention (CLA) and YOCO, all described by one
//! [`LayerMap`]: layer `l` reads the K/V of layer `a(l)`, and only the distinct
//! targets own a cache slot.
//!
//! # Positions, masks and windows
//! A launch attends `queries` consecutive query tokens per sequence (a prefill
//! chunk; `queries = 1` is decode). Query `t` of sequence `b` sits at the
//! global position `i = q_pos[b] + t`; `q_pos[b]` is the position of the
//! chunk's first query. The slot of sequence `b` holds the key positions
//! `0..kv_lens[b]`. Key `j` is visible to query `i` when `j < kv_lens[b]` and
//! - [`MaskMode::Causal`]: `j <= i`;
//! - [`MaskMode::Strict`]: `j < i` (a layer reading an upper layer's KV, or
//!   `force_nodiag`);
//! - [`MaskMode::Full`]: every stored key (decode of a layer that attends
//!   upward: the whole existing cache, no slot for the current token);
//! - and, with a sliding window `w`, also `i - w < j` (the window holds the
//!   `w` newest positions up to and including `i`: keys `i - w < j <= i`).
//!
//! A query with no visible key outputs exactly 0.
//!
//! # Ring-buffer slots
//! A sliding-window slot keeps `rows` rows and stores position `p` at row
//! `p mod rows`; only the positions `kv_lens[b] - rows <= j` are still held, and
//! the kernels never read an older one. A chunk of `n` queries over a window
//! `w` needs `rows >= w + n - 1` ([`ring_rows`]), so decode needs exactly `w`.
//! A plain slot stores position `p` at row `p` and needs `kv_lens[b] <= rows`;
//! a larger length (which lives in device memory, so only the kernel sees it)
//! makes that sequence's output rows NaN.

pub mod cuda;
pub mod reference;
pub mod run;
pub mod wgpu;

use crate::decode::{extent, no_overlap, DecodeLayout, DecodeParams, DecodePlan, DecodeShape};
use crate::dtype::DType;
use crate::error::{ensure, Error, Result};
use std::fmt;
use std::ops::RangeInclusive;

/// Largest head dimension the kernels accept.
pub const MAX_HEAD_DIM: usize = 256;
/// Passes of iterative prefill over a group that attends upward when the
/// caller does not choose (the LCKV default: 7 + 2).
pub const DEFAULT_PREFILL_PASSES: usize = 9;

/// Why a `layer_types` string or a map was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerMapError {
    /// The string names `got` layers, the model has `expected`.
    WrongLayerCount { expected: usize, got: usize },
    /// Layer `layer` reads layer `target`, which does not exist.
    TargetOutOfRange { layer: usize, target: usize, layers: usize },
    /// Layer `layer` reads layer `target`, which itself reads another layer's KV
    /// and so computes none.
    TargetComputesNoKv { layer: usize, target: usize },
    /// Layer `layer` and its target disagree on being a sliding-window layer,
    /// so one slot would need two storage schemes.
    SlidingMismatch { layer: usize, target: usize },
    /// Text that is not `_`-joined integers with an optional `s` suffix.
    Malformed { token: String },
}

impl fmt::Display for LayerMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerMapError::WrongLayerCount { expected, got } => {
                write!(f, "names {got} layers, the model has {expected}")
            }
            LayerMapError::TargetOutOfRange { layer, target, layers } => {
                write!(f, "layer {layer} reads layer {target}, outside 0..{layers}")
            }
            LayerMapError::TargetComputesNoKv { layer, target } => {
                write!(f, "layer {layer} reads layer {target}, which computes no KV of its own")
            }
            LayerMapError::SlidingMismatch { layer, target } => {
                write!(f, "layer {layer} and its target {target} disagree on the sliding-window suffix `s`")
            }
            LayerMapError::Malformed { token } => {
                write!(f, "`{token}` is not a layer index with an optional `s` suffix")
            }
        }
    }
}

impl std::error::Error for LayerMapError {}

impl From<LayerMapError> for Error {
    fn from(e: LayerMapError) -> Self {
        Error::invalid("layer_types", e.to_string())
    }
}

/// Which layer's K/V each layer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMap {
    targets: Vec<usize>,
    sliding: Vec<bool>,
    /// Window of the sliding layers, from the model config (not the string).
    pub window: Option<usize>,
    /// Every layer masks its diagonal (`j < i`), as the released LCKV checkpoints do.
    pub force_nodiag: bool,
}

impl LayerMap {
    /// Parses the whyNLP/LCKV `layer_types` string of a model with `layers` layers.
    pub fn parse(text: &str, layers: usize) -> std::result::Result<Self, LayerMapError> {
        let mut targets = Vec::new();
        let mut sliding = Vec::new();
        for token in text.trim().split('_') {
            let (digits, s) = match token.strip_suffix('s') {
                Some(d) => (d, true),
                None => (token, false),
            };
            let ok = !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit());
            let target = ok
                .then(|| digits.parse::<usize>().ok())
                .flatten()
                .ok_or_else(|| LayerMapError::Malformed { token: token.to_string() })?;
            targets.push(target);
            sliding.push(s);
        }
        Self::from_parts(targets, sliding, layers)
    }

    /// A map from explicit targets and sliding flags, checked like [`Self::parse`].
    pub fn from_parts(
        targets: Vec<usize>,
        sliding: Vec<bool>,
        layers: usize,
    ) -> std::result::Result<Self, LayerMapError> {
        if targets.len() != layers || sliding.len() != layers {
            return Err(LayerMapError::WrongLayerCount { expected: layers, got: targets.len() });
        }
        for (layer, &target) in targets.iter().enumerate() {
            if target >= layers {
                return Err(LayerMapError::TargetOutOfRange { layer, target, layers });
            }
            if targets[target] != target {
                return Err(LayerMapError::TargetComputesNoKv { layer, target });
            }
            if sliding[layer] != sliding[target] {
                return Err(LayerMapError::SlidingMismatch { layer, target });
            }
        }
        Ok(LayerMap { targets, sliding, window: None, force_nodiag: false })
    }

    /// The identity map: every layer keeps its own KV (the standard cache).
    pub fn standard(layers: usize) -> Self {
        LayerMap { targets: (0..layers).collect(), sliding: vec![false; layers], window: None, force_nodiag: false }
    }

    /// LCKV with `warmup` standard layers, `ceil(warmup / 2)` at the bottom and
    /// the rest at the top; every layer between reads the KV of the highest of
    /// them (22 layers, warmup 2: `0_20_20_..._20_21`). `warmup >= layers` is the
    /// standard cache.
    pub fn lckv(layers: usize, warmup: usize) -> Self {
        let bottom = warmup.div_ceil(2).min(layers);
        let top = (warmup - warmup.div_ceil(2)).min(layers - bottom);
        let mut map = Self::standard(layers);
        if bottom + top < layers {
            let kv_layer = layers - top - 1;
            map.targets[bottom..=kv_layer].fill(kv_layer);
        }
        map
    }

    /// Cross-layer attention: groups of `share` consecutive layers read the KV
    /// of the group's first layer (`0_0_2_2_...` for `share = 2`).
    pub fn cla(layers: usize, share: usize) -> Self {
        let share = share.max(1);
        let mut map = Self::standard(layers);
        for (l, t) in map.targets.iter_mut().enumerate() {
            *t = l / share * share;
        }
        map
    }

    /// YOCO: the lower half (`layers / 2`) are sliding-window self-attention
    /// layers with their own slots; every upper layer reads the KV of the first
    /// upper layer (22 layers: `0s_1s_..._10s_11_11_..._11`).
    pub fn yoco(layers: usize, window: usize) -> Self {
        let half = layers / 2;
        let mut map = Self::standard(layers);
        for l in 0..layers {
            map.sliding[l] = l < half;
            if l >= half {
                map.targets[l] = half;
            }
        }
        map.window = Some(window);
        map
    }

    pub fn with_window(mut self, window: usize) -> Self {
        self.window = Some(window);
        self
    }

    pub fn with_force_nodiag(mut self, on: bool) -> Self {
        self.force_nodiag = on;
        self
    }

    pub fn layers(&self) -> usize {
        self.targets.len()
    }

    /// `a(l)`: the layer whose KV layer `l` reads.
    pub fn target(&self, layer: usize) -> usize {
        self.targets[layer]
    }

    /// True for a layer marked `s`: it attends only the newest `window` positions.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding[layer]
    }

    /// The window of `layer`, or `None` for a full-context layer.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        if self.sliding[layer] {
            self.window
        } else {
            None
        }
    }

    /// True when layer `l` computes and stores its own KV (it owns a slot).
    pub fn owns_slot(&self, layer: usize) -> bool {
        self.targets[layer] == layer
    }

    /// The layers that own a slot (the distinct targets), ascending.
    pub fn slot_layers(&self) -> Vec<usize> {
        (0..self.layers()).filter(|&l| self.owns_slot(l)).collect()
    }

    /// Index, among [`Self::slot_layers`], of the slot layer `l` reads.
    pub fn slot_of(&self, layer: usize) -> usize {
        let t = self.targets[layer];
        (0..t).filter(|&l| self.owns_slot(l)).count()
    }

    /// True when layer `l` reads the KV of a layer above it (`a(l) > l`).
    pub fn attends_upward(&self, layer: usize) -> bool {
        self.targets[layer] > layer
    }

    /// The mask layer `l` uses over a chunk: strict when it attends upward or
    /// the model sets `force_nodiag`, causal otherwise.
    pub fn mask(&self, layer: usize) -> MaskMode {
        if self.attends_upward(layer) || self.force_nodiag {
            MaskMode::Strict
        } else {
            MaskMode::Causal
        }
    }

    /// The cyclic groups prefill must iterate: each is the smallest range of
    /// layers that starts at a layer attending upward and contains the targets
    /// of every layer in it. Layers outside every group run once.
    pub fn prefill_groups(&self) -> Vec<RangeInclusive<usize>> {
        let mut groups = Vec::new();
        let mut l = 0;
        while l < self.layers() {
            if !self.attends_upward(l) {
                l += 1;
                continue;
            }
            let (lo, mut hi) = (l, self.targets[l]);
            while l <= hi {
                hi = hi.max(self.targets[l]);
                l += 1;
            }
            groups.push(lo..=hi);
        }
        groups
    }

    /// Checks what a cache or the model needs beyond the string: sliding layers need a window >= 1.
    pub fn validate(&self) -> Result<()> {
        ensure(self.layers() >= 1, "layers", || "must be at least 1".into())?;
        if self.sliding.iter().any(|&s| s) {
            ensure(self.window.is_some_and(|w| w >= 1), "window", || {
                "sliding-window layers (`s`) need a window of at least 1".into()
            })?;
        }
        Ok(())
    }

    /// The map as a `layer_types` string.
    pub fn layer_types(&self) -> String {
        let parts: Vec<String> =
            self.targets.iter().zip(&self.sliding).map(|(t, &s)| format!("{t}{}", if s { "s" } else { "" })).collect();
        parts.join("_")
    }

    /// Bytes per token of K and V: `2 * slots * kv_heads * head_dim * bytes`
    /// for this map (every slot counted, windowed or not) and for the standard cache.
    pub fn memory(&self, kv_heads: usize, head_dim: usize, dtype: DType) -> KvMemory {
        let row = 2 * kv_heads * head_dim * dtype.size();
        let windowed = self.slot_layers().iter().filter(|&&l| self.sliding[l]).count();
        KvMemory {
            standard_per_token: self.layers() * row,
            mapped_per_token: self.slot_layers().len() * row,
            full_slots_per_token: (self.slot_layers().len() - windowed) * row,
            windowed_slots: windowed,
            row_bytes: row,
        }
    }
}

impl fmt::Display for LayerMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.layer_types())
    }
}

/// KV-cache bytes per token of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvMemory {
    /// `2 * L * kv_heads * D * bytes`.
    pub standard_per_token: usize,
    /// `2 * |distinct targets| * kv_heads * D * bytes`.
    pub mapped_per_token: usize,
    /// The part of `mapped_per_token` that grows with the context: sliding
    /// slots are ring buffers bounded by their window.
    pub full_slots_per_token: usize,
    pub windowed_slots: usize,
    /// Bytes of one position's K and V in one slot.
    pub row_bytes: usize,
}

impl KvMemory {
    /// `mapped / standard`.
    pub fn ratio(&self) -> f64 {
        self.mapped_per_token as f64 / self.standard_per_token.max(1) as f64
    }
}

/// Rows a sliding-window slot needs so chunks of `chunk` queries over a window
/// `window` never read an overwritten row: `window + chunk - 1`.
pub fn ring_rows(window: usize, chunk: usize) -> usize {
    window + chunk.max(1) - 1
}

/// Which keys a query sees (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskMode {
    /// `j <= i`.
    Causal,
    /// `j < i`.
    Strict,
    /// Every stored key.
    Full,
}

impl MaskMode {
    pub(crate) fn code(self) -> u32 {
        match self {
            MaskMode::Causal => 0,
            MaskMode::Strict => 1,
            MaskMode::Full => 2,
        }
    }

    /// True when key position `j` passes this mask for query position `i`.
    pub fn admits(self, i: u64, j: u64) -> bool {
        match self {
            MaskMode::Causal => j <= i,
            MaskMode::Strict => j < i,
            MaskMode::Full => true,
        }
    }
}

/// The problem size of one attention launch over one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    /// Query tokens per sequence in this launch (1 for decode).
    pub queries: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rows the slot holds per sequence and kv head.
    pub rows: usize,
}

impl AttnShape {
    pub fn groups(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }
}

/// Strides in elements; the head dimension is contiguous. `q[b, t, h, d]` is
/// at `b*q[0] + t*q[1] + h*q[2] + d` (likewise `o`); the slot's
/// `K[b, g, r, d]` at `b*k[0] + g*k[1] + r*k[2] + d` (likewise `V`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnLayout {
    pub q: [usize; 3],
    pub k: [usize; 3],
    pub v: [usize; 3],
    pub o: [usize; 3],
}

impl AttnLayout {
    /// Queries and outputs `[B, T, H_q, D]`, slots `[B, H_kv, rows, D]`.
    pub fn contiguous(s: &AttnShape) -> Self {
        let d = s.head_dim;
        let q = [s.queries * s.q_heads * d, s.q_heads * d, d];
        let kv = [s.kv_heads * s.rows * d, s.rows * d, d];
        AttnLayout { q, k: kv, v: kv, o: q }
    }
}

/// Everything an attention launch needs besides the buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    pub shape: AttnShape,
    pub layout: AttnLayout,
    pub mask: MaskMode,
    /// Sliding window `w >= 1`: keys `i - w < j <= i` only.
    pub window: Option<usize>,
    /// The slot is a ring buffer (position `p` at row `p mod rows`).
    pub ring: bool,
    /// Multiplies `q . k`; `1/sqrt(head_dim)` unless set.
    pub scale: f32,
}

impl AttnParams {
    pub fn new(shape: AttnShape, mask: MaskMode) -> Self {
        AttnParams {
            shape,
            layout: AttnLayout::contiguous(&shape),
            mask,
            window: None,
            ring: false,
            scale: 1.0 / (shape.head_dim.max(1) as f32).sqrt(),
        }
    }

    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.window = window;
        self
    }

    /// A ring-buffer slot; needs a window.
    pub fn with_ring(mut self, ring: bool) -> Self {
        self.ring = ring;
        self
    }

    pub fn with_layout(mut self, layout: AttnLayout) -> Self {
        self.layout = layout;
        self
    }

    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = scale;
        self
    }

    pub fn validate(&self) -> Result<()> {
        let s = &self.shape;
        validate_heads(s.batch, s.q_heads, s.kv_heads, s.head_dim)?;
        ensure(s.queries >= 1, "queries", || "must be at least 1".into())?;
        ensure(s.queries <= 65535, "queries", || format!("{} exceeds 65535", s.queries))?;
        ensure(s.q_heads <= 65535, "q_heads", || format!("{} exceeds 65535", s.q_heads))?;
        ensure(s.rows >= 1, "rows", || "the slot must hold at least 1 row".into())?;
        ensure(s.rows <= i32::MAX as usize, "rows", || format!("{} exceeds i32::MAX", s.rows))?;
        if let Some(w) = self.window {
            ensure(w >= 1, "window", || "must be at least 1".into())?;
            ensure(w <= i32::MAX as usize, "window", || format!("{w} exceeds i32::MAX"))?;
        }
        if self.ring {
            let w = self.window.ok_or_else(|| Error::invalid("window", "a ring-buffer slot needs a window"))?;
            let need = ring_rows(w, s.queries);
            ensure(s.rows >= need, "rows", || {
                format!("a ring slot for window {w} and {} queries needs {need} rows, has {}", s.queries, s.rows)
            })?;
        }
        ensure(self.scale.is_finite(), "scale", || format!("{} is not finite", self.scale))?;
        let (d, o) = (s.head_dim, &self.layout.o);
        ensure(no_overlap(&[(s.batch, o[0]), (s.queries, o[1]), (s.q_heads, o[2])], d), "o_strides", || {
            format!("{o:?} make output rows of length {d} overlap")
        })
    }

    pub fn q_len(&self) -> usize {
        let (s, q) = (&self.shape, &self.layout.q);
        extent(&[(s.batch, q[0]), (s.queries, q[1]), (s.q_heads, q[2])], s.head_dim)
    }

    pub fn o_len(&self) -> usize {
        let (s, o) = (&self.shape, &self.layout.o);
        extent(&[(s.batch, o[0]), (s.queries, o[1]), (s.q_heads, o[2])], s.head_dim)
    }

    pub fn k_len(&self) -> usize {
        slot_len(&self.shape, &self.layout.k)
    }

    pub fn v_len(&self) -> usize {
        slot_len(&self.shape, &self.layout.v)
    }

    /// The decode form (`queries == 1`) as a dense-decode launch over the
    /// slot (capacity = rows): the GPU launchers run it through the split-KV
    /// kernels with this plan and workspace. `None` for a chunk of queries.
    pub fn decode_params(&self) -> Option<DecodeParams> {
        let (s, l) = (&self.shape, &self.layout);
        (s.queries == 1).then(|| DecodeParams {
            shape: DecodeShape {
                batch: s.batch,
                q_heads: s.q_heads,
                kv_heads: s.kv_heads,
                head_dim: s.head_dim,
                capacity: s.rows,
            },
            layout: DecodeLayout { q: [l.q[0], l.q[2]], k: l.k, v: l.v, o: [l.o[0], l.o[2]] },
            scale: self.scale,
        })
    }

    /// How the decode form splits its keys; `None` for a chunk of queries.
    pub fn plan(&self) -> Option<DecodePlan> {
        self.decode_params().map(|d| d.plan())
    }

    /// Scratch bytes a GPU launch needs: for the decode form, a partial
    /// output row and log-sum-exp per (sequence, query head, split)
    /// ([`DecodeParams::workspace_bytes`]); none for a chunk of queries (one
    /// pass of online softmax per query row).
    pub fn workspace_bytes(&self) -> usize {
        self.decode_params().map_or(0, |d| d.workspace_bytes())
    }

    pub(crate) fn validate_buffers(&self, b: AttnBuffers) -> Result<()> {
        self.validate()?;
        let need = |arg: &'static str, have: usize, need: usize| {
            ensure(have >= need, arg, || format!("holds {have} elements, the layout needs {need}"))
        };
        need("q", b.q, self.q_len())?;
        need("k_slot", b.k, self.k_len())?;
        need("v_slot", b.v, self.v_len())?;
        need("q_pos", b.q_pos, self.shape.batch)?;
        need("kv_lens", b.kv_lens, self.shape.batch)?;
        need("out", b.o, self.o_len())?;
        if let Some(d) = self.decode_params() {
            d.validate()?;
        }
        let ws = self.workspace_bytes();
        ensure(b.workspace_bytes >= ws, "workspace", || {
            format!("holds {} bytes, this shape needs {ws}", b.workspace_bytes)
        })
    }

    /// Bytes one launch moves at least: every visible K and V row once, plus
    /// the queries and outputs (the host knows the lengths).
    pub fn bytes_moved(&self, kv_lens: &[u32], dtype: DType) -> u64 {
        let s = &self.shape;
        let kv: u64 = kv_lens.iter().map(|&n| (n as usize).min(s.rows) as u64).sum();
        let elems =
            2 * kv * (s.kv_heads * s.head_dim) as u64 + 2 * (s.batch * s.queries * s.q_heads * s.head_dim) as u64;
        elems * dtype.size() as u64
    }
}

fn validate_heads(batch: usize, q_heads: usize, kv_heads: usize, head_dim: usize) -> Result<()> {
    ensure(batch >= 1, "batch", || "must be at least 1 (empty batch)".into())?;
    ensure(batch <= 65535, "batch", || format!("{batch} exceeds 65535"))?;
    ensure(kv_heads >= 1, "kv_heads", || "must be at least 1".into())?;
    ensure(q_heads >= 1, "q_heads", || "must be at least 1".into())?;
    ensure(q_heads.is_multiple_of(kv_heads), "q_heads", || {
        format!("{q_heads} is not a multiple of kv_heads = {kv_heads}")
    })?;
    ensure((1..=MAX_HEAD_DIM).contains(&head_dim), "head_dim", || format!("{head_dim} is outside 1..={MAX_HEAD_DIM}"))
}

fn slot_len(s: &AttnShape, st: &[usize; 3]) -> usize {
    extent(&[(s.batch, st[0]), (s.kv_heads, st[1]), (s.rows, st[2])], s.head_dim)
}

/// Buffer lengths an attention launcher was handed, in elements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnBuffers {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub q_pos: usize,
    pub kv_lens: usize,
    pub o: usize,
    pub workspace_bytes: usize,
}

/// A write of `tokens` new K/V rows per sequence into a slot: token `t` of
/// sequence `b` is position `start[b] + t` and lands at row `p` (or
/// `p mod rows` in a ring slot). Prefill passes overwrite the same range;
/// decode appends one token. Positions past a plain slot's rows are not
/// written (the next attention over that length then yields NaN rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteParams {
    pub batch: usize,
    pub tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rows: usize,
    pub ring: bool,
    /// `new[b, t, g, d]` at `b*new[0] + t*new[1] + g*new[2] + d` (K and V alike).
    pub new: [usize; 3],
    /// `slot[b, g, r, d]` at `b*slot[0] + g*slot[1] + r*slot[2] + d` (K and V alike).
    pub slot: [usize; 3],
}

impl WriteParams {
    /// New tokens `[B, T, H_kv, D]`, slot `[B, H_kv, rows, D]`.
    pub fn new(batch: usize, tokens: usize, kv_heads: usize, head_dim: usize, rows: usize, ring: bool) -> Self {
        let d = head_dim;
        WriteParams {
            batch,
            tokens,
            kv_heads,
            head_dim,
            rows,
            ring,
            new: [tokens * kv_heads * d, kv_heads * d, d],
            slot: [kv_heads * rows * d, rows * d, d],
        }
    }

    pub fn validate(&self) -> Result<()> {
        validate_heads(self.batch, self.kv_heads, self.kv_heads, self.head_dim)?;
        ensure(self.tokens >= 1, "tokens", || "must be at least 1".into())?;
        ensure(self.rows >= 1 && self.rows <= i32::MAX as usize, "rows", || {
            format!("{} is outside 1..=i32::MAX", self.rows)
        })?;
        if self.ring {
            // Two tokens of one launch must never land on the same row.
            ensure(self.tokens <= self.rows, "tokens", || {
                format!("{} new tokens would wrap a ring slot of {} rows onto itself", self.tokens, self.rows)
            })?;
        }
        let (s, d) = (&self.slot, self.head_dim);
        ensure(no_overlap(&[(self.batch, s[0]), (self.kv_heads, s[1]), (self.rows, s[2])], d), "slot_strides", || {
            format!("{s:?} make slot rows of length {d} overlap")
        })
    }

    pub fn new_len(&self) -> usize {
        let n = &self.new;
        extent(&[(self.batch, n[0]), (self.tokens, n[1]), (self.kv_heads, n[2])], self.head_dim)
    }

    pub fn slot_len(&self) -> usize {
        let s = &self.slot;
        extent(&[(self.batch, s[0]), (self.kv_heads, s[1]), (self.rows, s[2])], self.head_dim)
    }

    pub(crate) fn validate_buffers(&self, new_k: usize, new_v: usize, start: usize, k: usize, v: usize) -> Result<()> {
        self.validate()?;
        let need = |arg: &'static str, have: usize, need: usize| {
            ensure(have >= need, arg, || format!("holds {have} elements, the layout needs {need}"))
        };
        need("new_k", new_k, self.new_len())?;
        need("new_v", new_v, self.new_len())?;
        need("start", start, self.batch)?;
        need("k_slot", k, self.slot_len())?;
        need("v_slot", v, self.slot_len())
    }

    /// The slot row of position `p`, or `None` when a plain slot cannot hold it.
    pub fn row_of(&self, p: u64) -> Option<usize> {
        if self.ring {
            Some((p % self.rows as u64) as usize)
        } else {
            (p < self.rows as u64).then_some(p as usize)
        }
    }
}
