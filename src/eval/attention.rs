//! The attention of one layer for every new position `t` of a text (`start..n`
//! of [`LayerQkv`]), each seeing keys `0..=t` exactly as decode would: dense
//! (this crate's decode launchers), SparQ (this crate's SparQ launchers), on
//! any [`Backend`] (the CPU one is the f64 reference), and two cache-eviction
//! baselines at the same KV budget, written here because they are baselines,
//! not kernels: StreamingLLM's sink tokens plus a sliding window, and H2O's
//! heavy hitters by accumulated attention plus a recent window.

use super::model::LayerQkv;
use crate::backend::Backend;
use crate::decode::{self, DecodeLayout, DecodeParams, DecodeShape};
use crate::dtype::DType;
use crate::error::Result;
use crate::host::HostData;
use crate::sparq::reference::HostCache;
use crate::sparq::{self, GqaMode, SparqCacheShape, SparqConfig, SparqParams};

/// Sink tokens the window baseline always keeps (StreamingLLM uses 4).
pub const SINKS: usize = 4;

/// Bytes read from the KV cache, summed over positions and layers: `(method, dense)`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    pub method: u64,
    pub dense: u64,
}

impl Traffic {
    pub fn fraction(&self) -> f64 {
        self.method as f64 / self.dense.max(1) as f64
    }
}

/// Shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Dense bytes one position of length `len` reads (f32 K and V rows).
fn dense_bytes(h: &Heads, len: usize) -> u64 {
    (h.kv_heads * 2 * len * h.head_dim * 4) as u64
}

fn f32_data(x: &[f32]) -> HostData {
    HostData::F32(x.to_vec())
}

/// Dense attention for every new position in one decode launch on `backend`:
/// one batch entry per query position, all sharing the layer's cache (batch stride 0).
pub fn dense(backend: &Backend, h: &Heads, x: &LayerQkv<'_>, traffic: &mut Traffic) -> Result<Vec<f32>> {
    let (n, d) = (x.n, h.head_dim);
    let m = n - x.start;
    let shape = DecodeShape { batch: m, q_heads: h.q_heads, kv_heads: h.kv_heads, head_dim: d, capacity: n };
    let kv = [0, n * d, d];
    let layout = DecodeLayout { q: [h.q_heads * d, d], k: kv, v: kv, o: [h.q_heads * d, d] };
    let p = DecodeParams::new(shape).with_layout(layout);
    let lens: Vec<u32> = (x.start as u32 + 1..=n as u32).collect();
    let mut out = vec![0f32; m * h.q_heads * d];
    if let Backend::Cpu = backend {
        decode::reference::decode_into(&p, x.q, x.k, x.v, &lens, &mut out)?;
    } else {
        let inputs = decode::run::DecodeInputs { q: f32_data(x.q), k: f32_data(x.k), v: f32_data(x.v), seq_lens: lens };
        for (o, r) in out.iter_mut().zip(decode::run::run(backend, &p, &inputs)?) {
            *o = r as f32;
        }
    }
    for len in x.start + 1..=n {
        let b = dense_bytes(h, len);
        traffic.method += b;
        traffic.dense += b;
    }
    Ok(out)
}

/// How SparQ's `r` and `k` are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SparqBudget {
    /// Fixed `r` and `k` at every position.
    Fixed { r: usize, k: usize },
    /// A fraction `f` of dense traffic at every position: half of it to the
    /// approximate scores (`r = f * D`), half to the `k = (f - r / 2D) * len`
    /// rows of K and V (DESIGN.md 4.2's model `S*r + 2*k*D` against `2*S*D`).
    Fraction(f64),
}

impl SparqBudget {
    pub fn r(&self, head_dim: usize) -> usize {
        match *self {
            SparqBudget::Fixed { r, .. } => r,
            SparqBudget::Fraction(f) => ((f * head_dim as f64).round() as usize).clamp(1, head_dim),
        }
    }

    pub fn k(&self, head_dim: usize, len: usize) -> usize {
        match *self {
            SparqBudget::Fixed { k, .. } => k,
            SparqBudget::Fraction(f) => {
                let rest = f - self.r(head_dim) as f64 / (2 * head_dim) as f64;
                ((rest * len as f64).round() as usize).max(1)
            }
        }
    }
}

/// SparQ's knobs besides `r` and `k`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparqKnobs {
    pub gqa: GqaMode,
    /// Newest positions always attended, as a fraction of `k` (`None`: the crate's `k / 4`).
    pub local_fraction: Option<f64>,
    pub reallocate_to_mean: bool,
    /// Diagnostic (CPU only, costs a dense pass): compare SparQ's estimate of
    /// alpha with the exact softmax mass of the selected positions ([`AlphaStats`]).
    pub measure_alpha: bool,
    /// Diagnostic (CPU, costs a dense pass): reallocate to the mean with the
    /// exact alpha instead of SparQ's estimate.
    pub exact_alpha: bool,
}

/// SparQ's `alpha` (the share of softmax mass on the selected positions),
/// estimated from the approximate scores as the kernel does, against its exact
/// value from the full softmax; summed over (position, query head, layer).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AlphaStats {
    pub estimated: f64,
    pub exact: f64,
    /// Sum of `|estimated - exact|`.
    pub abs_error: f64,
    pub count: u64,
}

impl AlphaStats {
    pub fn mean_estimated(&self) -> f64 {
        self.estimated / self.count.max(1) as f64
    }

    pub fn mean_exact(&self) -> f64 {
        self.exact / self.count.max(1) as f64
    }

    pub fn mean_abs_error(&self) -> f64 {
        self.abs_error / self.count.max(1) as f64
    }

    fn add(&mut self, alphas: &[(usize, f64, f64)]) {
        for &(_, est, exact) in alphas {
            self.exact += exact;
            self.estimated += est;
            self.abs_error += (est - exact).abs();
            self.count += 1;
        }
    }
}

/// Per query head of one step: (head, alpha as SparQ estimates it, the exact
/// softmax mass of the positions it selected).
fn alphas(p: &SparqParams, q: &[f32], c: &HostCache<'_, f32>) -> Result<Vec<(usize, f64, f64)>> {
    let (d, groups) = (p.cache.head_dim, p.groups());
    let len = c.seq_lens[0] as usize;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = Vec::new();
    for t in sparq::reference::trace(p, q, c)? {
        for (&h, &est) in t.heads.iter().zip(&t.alpha) {
            let (qh, kg) = (&q[h * d..][..d], &c.k[h / groups * p.cache.capacity * d..]);
            let logits: Vec<f64> = (0..len)
                .map(|j| scale * qh.iter().zip(&kg[j * d..][..d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>())
                .collect();
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            out.push((h, est, t.i2.iter().map(|&j| (logits[j] - m).exp()).sum::<f64>() / z));
        }
    }
    Ok(out)
}

/// Diagnostic: `out = alpha y + (1 - alpha) v_bar` with the exact alpha in
/// place of SparQ's estimate, given the step's `y` (SparQ without reallocation).
fn reallocate_exact(p: &SparqParams, c: &HostCache<'_, f32>, alphas: &[(usize, f64, f64)], y: &mut [f32]) {
    let (d, groups, len) = (p.cache.head_dim, p.groups(), c.seq_lens[0] as usize);
    for &(h, _, exact) in alphas {
        let vg = &c.v[h / groups * p.cache.capacity * d..];
        for (i, o) in y[h * d..][..d].iter_mut().enumerate() {
            let mean = (0..len).map(|j| vg[j * d + i] as f64).sum::<f64>() / len as f64;
            *o = (exact * *o as f64 + (1.0 - exact) * mean) as f32;
        }
    }
}

/// SparQ at every new position through the crate's launchers on `backend`, one
/// step per position on the layer's cache (`sparq::reference::sparq_into` on the
/// CPU; on a GPU `sparq::run::run`, which rebuilds the device cache by a bulk
/// fill per step: a fidelity harness, not a serving loop).
pub fn sparq(
    backend: &Backend,
    h: &Heads,
    x: &LayerQkv<'_>,
    budget: SparqBudget,
    knobs: SparqKnobs,
    traffic: &mut Traffic,
    mut alpha: Option<&mut AlphaStats>,
) -> Result<Vec<f32>> {
    let (n, d, hq) = (x.n, h.head_dim, h.q_heads);
    let cache = SparqCacheShape { batch: 1, kv_heads: h.kv_heads, head_dim: d, capacity: n };
    let mut out = vec![0f32; (n - x.start) * hq * d];
    // The layer's K and V as launcher inputs once; each step changes only the query and length.
    let mut inputs = match backend {
        Backend::Cpu => None,
        _ => {
            Some(sparq::run::SparqInputs { q: f32_data(&[]), k: f32_data(x.k), v: f32_data(x.v), seq_lens: Vec::new() })
        }
    };
    for (i, t) in (x.start..n).enumerate() {
        let len = t + 1;
        let k = budget.k(d, len);
        let mut cfg = SparqConfig::new(budget.r(d), k);
        cfg.gqa = knobs.gqa;
        cfg.reallocate_to_mean = knobs.reallocate_to_mean;
        cfg.local_window = knobs.local_fraction.map(|f| (f * k as f64).round() as usize);
        let p = SparqParams::new(cache, hq, cfg);
        let lens = [len as u32];
        let c = HostCache { k: x.k, v: x.v, seq_lens: &lens };
        let q = &x.q[i * hq * d..][..hq * d];
        let o = &mut out[i * hq * d..][..hq * d];
        let exact = knobs.exact_alpha && knobs.reallocate_to_mean;
        let a = if alpha.is_some() || exact { alphas(&p, q, &c)? } else { Vec::new() };
        if let Some(stats) = alpha.as_deref_mut() {
            stats.add(&a);
        }
        if exact {
            // The same selection (it does not depend on the reallocation), then the mix by hand.
            let p = SparqParams::new(cache, hq, SparqConfig { reallocate_to_mean: false, ..cfg });
            sparq::reference::sparq_into(&p, q, &c, o)?;
            reallocate_exact(&p, &c, &a, o);
        } else if let Some(inputs) = inputs.as_mut() {
            (inputs.q, inputs.seq_lens) = (f32_data(q), lens.to_vec());
            for (o, r) in o.iter_mut().zip(sparq::run::run(backend, &p, inputs)?) {
                *o = r as f32;
            }
        } else {
            sparq::reference::sparq_into(&p, q, &c, o)?;
        }
        let (s, dn) = sparq::bytes_model(&p, &lens, DType::F32);
        traffic.method += s;
        traffic.dense += dn;
    }
    Ok(out)
}

/// Positions a baseline keeps for a query of length `len` at traffic fraction `f`.
pub fn budget(f: f64, len: usize) -> usize {
    ((f * len as f64).round() as usize).clamp(1, len)
}

/// `softmax(q . K[keep] / sqrt(D)) V[keep]` for one query head, into `out`.
fn attend_subset(q: &[f32], k: &[f32], v: &[f32], d: usize, keep: &[usize], probs: &mut Vec<f64>, out: &mut [f32]) {
    let scale = 1.0 / (d as f64).sqrt();
    probs.clear();
    probs.extend(
        keep.iter().map(|&j| scale * q.iter().zip(&k[j * d..][..d]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()),
    );
    let m = probs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut z = 0.0;
    for p in probs.iter_mut() {
        *p = (*p - m).exp();
        z += *p;
    }
    let mut acc = vec![0f64; d];
    for (p, &j) in probs.iter_mut().zip(keep) {
        *p /= z;
        for (a, b) in acc.iter_mut().zip(&v[j * d..][..d]) {
            *a += *p * *b as f64;
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a as f32;
    }
}

/// StreamingLLM: the first `SINKS` positions plus the most recent ones,
/// `budget(f, len)` in all (the newest position always among them).
pub fn window(h: &Heads, x: &LayerQkv<'_>, f: f64, traffic: &mut Traffic) -> Result<Vec<f32>> {
    let (n, d, hq) = (x.n, h.head_dim, h.q_heads);
    let groups = hq / h.kv_heads;
    let mut out = vec![0f32; (n - x.start) * hq * d];
    let (mut keep, mut probs) = (Vec::new(), Vec::new());
    for (i, t) in (x.start..n).enumerate() {
        let len = t + 1;
        let b = budget(f, len);
        let recent = b.saturating_sub(SINKS).max(1);
        let sinks = b - recent;
        keep.clear();
        keep.extend(0..sinks);
        keep.extend(len - recent..len);
        for hh in 0..hq {
            let g = hh / groups;
            let kv = g * n * d..(g + 1) * n * d;
            let o = &mut out[(i * hq + hh) * d..][..d];
            attend_subset(&x.q[(i * hq + hh) * d..][..d], &x.k[kv.clone()], &x.v[kv], d, &keep, &mut probs, o);
        }
        traffic.method += (h.kv_heads * 2 * b * d * 4) as u64;
        traffic.dense += dense_bytes(h, len);
    }
    Ok(out)
}

/// H2O: per kv head, a cache of `budget(f, len)` positions, half of them the
/// most recent, the rest the heavy hitters by attention probability accumulated
/// (over the group's query heads) since each entered; the token evicted is the
/// lightest outside the recent half, and an evicted token never comes back.
/// Past positions attended densely (a prefill) add their whole attention rows
/// to the scores, as H2O's prefill does, and the cache is cut to budget at the
/// first new position.
pub fn h2o(h: &Heads, x: &LayerQkv<'_>, f: f64, traffic: &mut Traffic) -> Result<Vec<f32>> {
    let (n, d, hq) = (x.n, h.head_dim, h.q_heads);
    let groups = hq / h.kv_heads;
    let mut out = vec![0f32; (n - x.start) * hq * d];
    let (mut probs, mut scratch) = (Vec::new(), vec![0f32; d]);
    for g in 0..h.kv_heads {
        let kv = g * n * d..(g + 1) * n * d;
        let (k, v) = (&x.k[kv.clone()], &x.v[kv]);
        let mut kept: Vec<usize> = (0..x.start).collect();
        let mut score = vec![0f64; n];
        for t in 0..x.start {
            for hh in g * groups..(g + 1) * groups {
                attend_subset(&x.q_past[(t * hq + hh) * d..][..d], k, v, d, &kept[..=t], &mut probs, &mut scratch);
                for (s, p) in score.iter_mut().zip(&probs) {
                    *s += p;
                }
            }
        }
        for (i, t) in (x.start..n).enumerate() {
            let len = t + 1;
            let b = budget(f, len);
            let recent = b.div_ceil(2);
            kept.push(t);
            while kept.len() > b {
                // Lightest outside the newest `recent` positions; ties to the older.
                // (`kept` exceeds `b >= recent`, so there is always one.)
                let lightest = kept
                    .iter()
                    .enumerate()
                    .filter(|&(_, &j)| j + recent < len)
                    .min_by(|a, b| score[*a.1].total_cmp(&score[*b.1]))
                    .map(|(i, _)| i);
                match lightest {
                    Some(i) => kept.remove(i),
                    None => break,
                };
            }
            for hh in g * groups..(g + 1) * groups {
                let o = &mut out[(i * hq + hh) * d..][..d];
                attend_subset(&x.q[(i * hq + hh) * d..][..d], k, v, d, &kept, &mut probs, o);
                for (&j, p) in kept.iter().zip(&probs) {
                    score[j] += p;
                }
            }
        }
    }
    for len in x.start + 1..=n {
        traffic.method += (h.kv_heads * 2 * budget(f, len) * d * 4) as u64;
        traffic.dense += dense_bytes(h, len);
    }
    Ok(out)
}
