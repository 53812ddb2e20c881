//! The specification, in f64 and straight loops: masked attention over one
//! slot, the slot write, and a tiny random multi-layer model that runs
//! iterative prefill and token-by-token decode through any [`KvEngine`].

use super::{AttnBuffers, AttnParams, LayerMap, MaskMode, WriteParams, DEFAULT_PREFILL_PASSES};
use crate::dtype::Element;
use crate::error::{ensure, Result};
use crate::host::Rng;

/// True when key position `j` is visible to query position `i` (module docs of
/// [`super`]), given the slot holds positions `0..kv_len` in `rows` rows.
pub fn visible(p: &AttnParams, i: u64, j: u64, kv_len: u64) -> bool {
    let window_ok = p.window.is_none_or(|w| j + w as u64 > i);
    let held = !p.ring || j + p.shape.rows as u64 >= kv_len;
    j < kv_len && p.mask.admits(i, j) && window_ok && held
}

/// The CPU backend's launcher: the reference rounded into the strided `out`.
#[allow(clippy::too_many_arguments)]
pub fn attend_into<T: Element>(
    p: &AttnParams,
    q: &[T],
    k: &[T],
    v: &[T],
    q_pos: &[u32],
    kv_lens: &[u32],
    out: &mut [T],
) -> Result<()> {
    let r = attend(p, q, k, v, q_pos, kv_lens)?;
    ensure(out.len() >= p.o_len(), "out", || format!("holds {} elements, the layout needs {}", out.len(), p.o_len()))?;
    let (s, o) = (&p.shape, &p.layout.o);
    for b in 0..s.batch {
        for t in 0..s.queries {
            for h in 0..s.q_heads {
                let src = &r[((b * s.queries + t) * s.q_heads + h) * s.head_dim..][..s.head_dim];
                for (d, x) in src.iter().enumerate() {
                    out[b * o[0] + t * o[1] + h * o[2] + d] = T::from_f32(*x as f32);
                }
            }
        }
    }
    Ok(())
}

/// Returns the output as a contiguous `[batch, queries, q_heads, head_dim]` f64 array.
pub fn attend<T: Element>(
    p: &AttnParams,
    q: &[T],
    k: &[T],
    v: &[T],
    q_pos: &[u32],
    kv_lens: &[u32],
) -> Result<Vec<f64>> {
    let o = p.o_len();
    p.validate_buffers(AttnBuffers {
        q: q.len(),
        k: k.len(),
        v: v.len(),
        q_pos: q_pos.len(),
        kv_lens: kv_lens.len(),
        o,
        // The host loops need no scratch.
        workspace_bytes: p.workspace_bytes(),
    })?;
    let f = |x: &[T]| x.iter().map(|e| e.to_f64()).collect::<Vec<f64>>();
    attend_f64(p, &f(q), &f(k), &f(v), q_pos, kv_lens)
}

/// [`attend`] on f64 storage (the tiny model's host cache).
pub fn attend_f64(p: &AttnParams, q: &[f64], k: &[f64], v: &[f64], q_pos: &[u32], kv_lens: &[u32]) -> Result<Vec<f64>> {
    let o = p.o_len();
    p.validate_buffers(AttnBuffers {
        q: q.len(),
        k: k.len(),
        v: v.len(),
        q_pos: q_pos.len(),
        kv_lens: kv_lens.len(),
        o,
        // The host loops need no scratch.
        workspace_bytes: p.workspace_bytes(),
    })?;
    let (s, l, d) = (&p.shape, &p.layout, p.shape.head_dim);
    let mut out = vec![0.0f64; s.batch * s.queries * s.q_heads * d];
    for b in 0..s.batch {
        let len = kv_lens[b] as u64;
        for t in 0..s.queries {
            let i = q_pos[b] as u64 + t as u64;
            for h in 0..s.q_heads {
                let g = h / s.groups();
                let row = &mut out[((b * s.queries + t) * s.q_heads + h) * d..][..d];
                if !p.ring && len > s.rows as u64 {
                    row.fill(f64::NAN);
                    continue;
                }
                let qr = b * l.q[0] + t * l.q[1] + h * l.q[2];
                let slot_row = |j: u64| (if p.ring { j % s.rows as u64 } else { j }) as usize;
                let keys: Vec<u64> = (0..len).filter(|&j| visible(p, i, j, len)).collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        let kr = b * l.k[0] + g * l.k[1] + slot_row(j) * l.k[2];
                        p.scale as f64 * (0..d).map(|x| q[qr + x] * k[kr + x]).sum::<f64>()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|&x| (x - m).exp()).collect();
                let z: f64 = weights.iter().sum();
                for (&j, w) in keys.iter().zip(&weights) {
                    let vr = b * l.v[0] + g * l.v[1] + slot_row(j) * l.v[2];
                    for (x, o) in row.iter_mut().enumerate() {
                        *o += w / z * v[vr + x];
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The CPU backend's slot write (any element type, f64 included).
pub fn write<X: Copy>(
    p: &WriteParams,
    new_k: &[X],
    new_v: &[X],
    start: &[u32],
    k: &mut [X],
    v: &mut [X],
) -> Result<()> {
    p.validate_buffers(new_k.len(), new_v.len(), start.len(), k.len(), v.len())?;
    for (b, &first) in start.iter().enumerate().take(p.batch) {
        for t in 0..p.tokens {
            let Some(r) = p.row_of(first as u64 + t as u64) else { continue };
            for g in 0..p.kv_heads {
                let src = b * p.new[0] + t * p.new[1] + g * p.new[2];
                let dst = b * p.slot[0] + g * p.slot[1] + r * p.slot[2];
                k[dst..dst + p.head_dim].copy_from_slice(&new_k[src..src + p.head_dim]);
                v[dst..dst + p.head_dim].copy_from_slice(&new_v[src..src + p.head_dim]);
            }
        }
    }
    Ok(())
}

/// Where the tiny model keeps its slots: batch 1, slots `[H_kv, rows, D]`.
pub trait KvEngine {
    /// Writes positions `start..start + n` of slot `slot`; `k`, `v` are `[n, H_kv, D]`.
    fn write(&mut self, slot: usize, start: usize, k: &[f64], v: &[f64]) -> Result<()>;
    /// Attends `n` queries `[n, H_q, D]` at positions `q_pos..` over the first
    /// `kv_len` positions of slot `slot`; returns `[n, H_q, D]`.
    fn attend(
        &mut self,
        slot: usize,
        q_pos: usize,
        q: &[f64],
        kv_len: usize,
        mask: MaskMode,
        window: Option<usize>,
    ) -> Result<Vec<f64>>;
}

/// The shape of the slots a map needs: plain slots of `capacity` rows, ring
/// slots of `ring_rows(window, chunk)` rows.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotSpec {
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Per slot: rows, and whether it is a ring buffer.
    pub slots: Vec<(usize, bool)>,
    pub q_heads: usize,
}

impl SlotSpec {
    /// `chunk` is the longest prefill chunk the slots must serve.
    pub fn new(
        map: &LayerMap,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        chunk: usize,
    ) -> Result<Self> {
        map.validate()?;
        let slots = map
            .slot_layers()
            .iter()
            .map(|&l| match map.window_of(l) {
                Some(w) => (super::ring_rows(w, chunk).min(capacity.max(1)), super::ring_rows(w, chunk) < capacity),
                None => (capacity, false),
            })
            .collect();
        Ok(SlotSpec { kv_heads, head_dim, slots, q_heads })
    }

    pub fn attn_params(&self, slot: usize, queries: usize, mask: MaskMode, window: Option<usize>) -> AttnParams {
        let (rows, ring) = self.slots[slot];
        let shape = super::AttnShape {
            batch: 1,
            queries,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            rows,
        };
        AttnParams::new(shape, mask).with_window(window).with_ring(ring)
    }

    pub fn write_params(&self, slot: usize, tokens: usize) -> WriteParams {
        let (rows, ring) = self.slots[slot];
        WriteParams::new(1, tokens, self.kv_heads, self.head_dim, rows, ring)
    }
}

/// The reference engine: f64 slots on the host.
pub struct HostKv {
    pub spec: SlotSpec,
    k: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
}

impl HostKv {
    pub fn new(spec: SlotSpec) -> Self {
        let n = |&(rows, _): &(usize, bool)| vec![0.0; spec.kv_heads * rows * spec.head_dim];
        HostKv { k: spec.slots.iter().map(n).collect(), v: spec.slots.iter().map(n).collect(), spec }
    }
}

impl KvEngine for HostKv {
    fn write(&mut self, slot: usize, start: usize, k: &[f64], v: &[f64]) -> Result<()> {
        let n = k.len() / (self.spec.kv_heads * self.spec.head_dim);
        let p = self.spec.write_params(slot, n);
        write(&p, k, v, &[start as u32], &mut self.k[slot], &mut self.v[slot])
    }

    fn attend(
        &mut self,
        slot: usize,
        q_pos: usize,
        q: &[f64],
        kv_len: usize,
        mask: MaskMode,
        window: Option<usize>,
    ) -> Result<Vec<f64>> {
        let n = q.len() / (self.spec.q_heads * self.spec.head_dim);
        let p = self.spec.attn_params(slot, n, mask, window);
        attend_f64(&p, q, &self.k[slot], &self.v[slot], &[q_pos as u32], &[kv_len as u32])
    }
}

/// A tiny random decoder: per layer `q = Wq h`, and for a layer that owns a
/// slot `k = Wk h`, `v = Wv h` (RoPE optional); then `h += tanh(Wo attn)`.
/// Hidden size `q_heads * head_dim`; batch 1; inputs are embeddings.
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub map: LayerMap,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: bool,
    wq: Vec<Vec<f64>>,
    wk: Vec<Vec<f64>>,
    wv: Vec<Vec<f64>>,
    wo: Vec<Vec<f64>>,
}

impl TinyModel {
    pub fn random(
        map: LayerMap,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        rope: bool,
        rng: &mut Rng,
    ) -> Result<Self> {
        map.validate()?;
        ensure(q_heads >= 1 && kv_heads >= 1 && q_heads.is_multiple_of(kv_heads), "q_heads", || {
            format!("{q_heads} is not a positive multiple of kv_heads = {kv_heads}")
        })?;
        ensure(head_dim >= 1 && (!rope || head_dim.is_multiple_of(2)), "head_dim", || {
            format!("{head_dim}: RoPE needs an even head dimension of at least 2")
        })?;
        let e = q_heads * head_dim;
        let kv = kv_heads * head_dim;
        let scale = 1.5 / (e as f32).sqrt();
        let mut mat = |rows: usize| -> Vec<f64> { (0..rows * e).map(|_| rng.uniform(-scale, scale) as f64).collect() };
        let layers = map.layers();
        let (mut wq, mut wk, mut wv, mut wo) = (vec![], vec![], vec![], vec![]);
        for _ in 0..layers {
            wq.push(mat(e));
            wk.push(mat(kv));
            wv.push(mat(kv));
            wo.push(mat(e));
        }
        Ok(TinyModel { map, q_heads, kv_heads, head_dim, rope, wq, wk, wv, wo })
    }

    pub fn hidden(&self) -> usize {
        self.q_heads * self.head_dim
    }

    /// The slots this model needs for a context of `capacity` and prefill chunks of at most `chunk`.
    pub fn slot_spec(&self, capacity: usize, chunk: usize) -> Result<SlotSpec> {
        SlotSpec::new(&self.map, self.q_heads, self.kv_heads, self.head_dim, capacity, chunk)
    }

    /// Prefill of the `n` tokens `x` (`[n, hidden]`) at positions `start..start + n`
    /// (every earlier position already in `engine`); groups that attend upward
    /// run `passes` times, each pass overwriting the chunk's rows of the target
    /// slot. Returns the final hidden states `[n, hidden]`.
    pub fn prefill(&self, engine: &mut dyn KvEngine, x: &[f64], start: usize, passes: usize) -> Result<Vec<f64>> {
        let e = self.hidden();
        ensure(!x.is_empty() && x.len().is_multiple_of(e), "x", || format!("{} values is not n x {e}", x.len()))?;
        let n = x.len() / e;
        let mut h = x.to_vec();
        // Positions each slot holds for this chunk: the chunk's rows exist once written.
        let mut held = vec![start; self.map.slot_layers().len()];
        let groups = self.map.prefill_groups();
        let mut l = 0;
        while l < self.map.layers() {
            match groups.iter().find(|g| *g.start() == l) {
                Some(g) => {
                    let input = h.clone();
                    for _ in 0..passes.max(1) {
                        h = input.clone();
                        for layer in g.clone() {
                            h = self.layer(engine, layer, &h, start, n, &mut held, false)?;
                        }
                    }
                    l = g.end() + 1;
                }
                None => {
                    h = self.layer(engine, l, &h, start, n, &mut held, false)?;
                    l += 1;
                }
            }
        }
        Ok(h)
    }

    /// [`Self::prefill`] with the default number of passes.
    pub fn prefill_default(&self, engine: &mut dyn KvEngine, x: &[f64], start: usize) -> Result<Vec<f64>> {
        self.prefill(engine, x, start, DEFAULT_PREFILL_PASSES)
    }

    /// One token at position `pos`: layers in order; a layer attending upward
    /// sees its target's whole existing cache (`0..pos`) and no slot for this token.
    pub fn decode(&self, engine: &mut dyn KvEngine, x: &[f64], pos: usize) -> Result<Vec<f64>> {
        let e = self.hidden();
        ensure(x.len() == e, "x", || format!("{} values, expected {e}", x.len()))?;
        let mut held = vec![pos; self.map.slot_layers().len()];
        let mut h = x.to_vec();
        for l in 0..self.map.layers() {
            h = self.layer(engine, l, &h, pos, 1, &mut held, true)?;
        }
        Ok(h)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        engine: &mut dyn KvEngine,
        l: usize,
        h: &[f64],
        start: usize,
        n: usize,
        held: &mut [usize],
        decoding: bool,
    ) -> Result<Vec<f64>> {
        let (e, d) = (self.hidden(), self.head_dim);
        let kv = self.kv_heads * d;
        let slot = self.map.slot_of(l);
        let mut q = vec![0.0; n * e];
        for t in 0..n {
            matvec(&self.wq[l], &h[t * e..][..e], &mut q[t * e..][..e]);
            self.rope_rows(&mut q[t * e..][..e], start + t);
        }
        if self.map.owns_slot(l) {
            let (mut k, mut v) = (vec![0.0; n * kv], vec![0.0; n * kv]);
            for t in 0..n {
                matvec(&self.wk[l], &h[t * e..][..e], &mut k[t * kv..][..kv]);
                matvec(&self.wv[l], &h[t * e..][..e], &mut v[t * kv..][..kv]);
                self.rope_rows(&mut k[t * kv..][..kv], start + t);
            }
            engine.write(slot, start, &k, &v)?;
            held[slot] = start + n;
        }
        let mask = match self.map.mask(l) {
            MaskMode::Strict if decoding && self.map.attends_upward(l) => MaskMode::Full,
            m => m,
        };
        let a = engine.attend(slot, start, &q, held[slot], mask, self.map.window_of(l))?;
        let mut out = h.to_vec();
        let mut proj = vec![0.0; e];
        for t in 0..n {
            matvec(&self.wo[l], &a[t * e..][..e], &mut proj);
            for (o, p) in out[t * e..][..e].iter_mut().zip(&proj) {
                *o += p.tanh();
            }
        }
        Ok(out)
    }

    /// Rotates consecutive pairs of every head by position `pos` (RoPE, base 10000).
    fn rope_rows(&self, x: &mut [f64], pos: usize) {
        if !self.rope {
            return;
        }
        let d = self.head_dim;
        for head in x.chunks_mut(d) {
            for m in 0..d / 2 {
                let theta = pos as f64 * 10000f64.powf(-2.0 * m as f64 / d as f64);
                let (c, s) = (theta.cos(), theta.sin());
                let (a, b) = (head[2 * m], head[2 * m + 1]);
                head[2 * m] = a * c - b * s;
                head[2 * m + 1] = a * s + b * c;
            }
        }
    }
}

/// `y = W x` for a row-major `W` of `y.len()` rows.
fn matvec(w: &[f64], x: &[f64], y: &mut [f64]) {
    for (r, out) in y.iter_mut().enumerate() {
        *out = w[r * x.len()..][..x.len()].iter().zip(x).map(|(a, b)| a * b).sum();
    }
}
