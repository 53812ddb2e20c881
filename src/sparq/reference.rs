//! The specification of SparQ, in f64 and straight loops (DESIGN.md 4.2).

use super::{GqaMode, SparqParams};
use crate::dtype::Element;
use crate::error::{ensure, Result};

/// Indices of the `r` largest values, ties to the lower index, in ascending index order.
pub fn top_r(a: &[f64], r: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..a.len()).collect();
    order.sort_by(|&i, &j| a[j].total_cmp(&a[i]).then(i.cmp(&j)));
    let mut chosen = order[..r.min(a.len())].to_vec();
    chosen.sort_unstable();
    chosen
}

/// `tau = sqrt(D * |q[i1]|_1 / |q|_1)`; `sqrt(D)` for an all-zero query.
pub fn tau(q: &[f64], i1: &[usize]) -> f64 {
    let all: f64 = q.iter().map(|x| x.abs()).sum();
    let part: f64 = i1.iter().map(|&i| q[i].abs()).sum();
    let ratio = if all > 0.0 { part / all } else { 1.0 };
    (q.len() as f64 * ratio).sqrt()
}

/// What SparQ decided for one selection row (a kv head's group in shared mode,
/// a query head in per-head mode) of one sequence.
#[derive(Debug, Clone)]
pub struct SelectionTrace {
    pub batch: usize,
    /// Query heads served by this row.
    pub heads: Vec<usize>,
    /// Step 1 per head (identical across heads in shared mode).
    pub i1: Vec<Vec<usize>>,
    pub tau: Vec<f64>,
    /// Step 2 per head: `s_hat` over the sequence.
    pub s_hat: Vec<Vec<f64>>,
    /// Step 3: the selection key per position (`s_hat`, or its sum over the group).
    pub keys: Vec<f64>,
    /// Step 3: attended positions, ascending.
    pub i2: Vec<usize>,
    pub alpha: Vec<f64>,
}

/// The host copy of a SparQ cache's content: K and V as `[batch, kv_heads, capacity, head_dim]`.
pub struct HostCache<'a, T> {
    pub k: &'a [T],
    pub v: &'a [T],
    pub seq_lens: &'a [u32],
}

fn check<T>(p: &SparqParams, q: &[T], c: &HostCache<'_, T>) -> Result<()> {
    p.validate()?;
    let s = &p.cache;
    ensure(q.len() >= p.q_len(), "q", || format!("holds {} elements, the layout needs {}", q.len(), p.q_len()))?;
    ensure(c.k.len() >= s.kv_len() && c.v.len() >= s.kv_len(), "cache", || "K/V shorter than the cache shape".into())?;
    ensure(c.seq_lens.len() == s.batch, "seq_lens", || {
        format!("{} lengths for a batch of {}", c.seq_lens.len(), s.batch)
    })?;
    for (b, &len) in c.seq_lens.iter().enumerate() {
        ensure(len as usize <= s.capacity, "seq_lens", || {
            format!("sequence {b} has length {len} > capacity {}", s.capacity)
        })?;
    }
    Ok(())
}

/// Steps 1-3 for every selection row.
pub fn trace<T: Element>(p: &SparqParams, q: &[T], c: &HostCache<'_, T>) -> Result<Vec<SelectionTrace>> {
    check(p, q, c)?;
    let s = &p.cache;
    let (d, groups) = (s.head_dim, p.groups());
    let qrow = |b: usize, h: usize| -> Vec<f64> {
        (0..d).map(|i| q[b * p.q_strides[0] + h * p.q_strides[1] + i].to_f64()).collect()
    };
    let krow = |b: usize, g: usize, j: usize| &c.k[((b * s.kv_heads + g) * s.capacity + j) * d..][..d];
    let mut out = Vec::new();
    for b in 0..s.batch {
        let len = c.seq_lens[b] as usize;
        for g in 0..s.kv_heads {
            let group: Vec<usize> = (g * groups..(g + 1) * groups).collect();
            let rows: Vec<Vec<usize>> = match p.config.gqa {
                GqaMode::Shared => vec![group],
                GqaMode::PerHead => group.into_iter().map(|h| vec![h]).collect(),
            };
            for heads in rows {
                let qs: Vec<Vec<f64>> = heads.iter().map(|&h| qrow(b, h)).collect();
                let mut abs_sum = vec![0.0; d];
                for qh in &qs {
                    for (a, x) in abs_sum.iter_mut().zip(qh) {
                        *a += x.abs();
                    }
                }
                let i1 = top_r(&abs_sum, p.config.r);
                let mut t = SelectionTrace {
                    batch: b,
                    heads: heads.clone(),
                    i1: vec![i1.clone(); heads.len()],
                    tau: Vec::new(),
                    s_hat: Vec::new(),
                    keys: vec![0.0; len],
                    i2: Vec::new(),
                    alpha: Vec::new(),
                };
                for qh in &qs {
                    let tau = tau(qh, &i1);
                    let logits: Vec<f64> = (0..len)
                        .map(|j| i1.iter().map(|&i| qh[i] * krow(b, g, j)[i].to_f64()).sum::<f64>() / tau)
                        .collect();
                    let s_hat = softmax(&logits);
                    for (key, x) in t.keys.iter_mut().zip(&s_hat) {
                        *key += x;
                    }
                    t.tau.push(tau);
                    t.s_hat.push(s_hat);
                }
                let (n, w) = p.config.selection(len);
                let mut i2 = top_r(&t.keys[..len - w], n - w);
                i2.extend(len - w..len);
                t.alpha = t.s_hat.iter().map(|sh| i2.iter().map(|&j| sh[j]).sum()).collect();
                t.i2 = i2;
                out.push(t);
            }
        }
    }
    Ok(out)
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|&v| (v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

/// The CPU backend's launcher: the reference, rounded into the strided output
/// `out` (`params.o_strides`) of the input dtype. Validates like the GPU launchers.
pub fn sparq_into<T: Element>(p: &SparqParams, q: &[T], c: &HostCache<'_, T>, out: &mut [T]) -> Result<()> {
    ensure(out.len() >= p.o_len(), "out", || format!("holds {} elements, the layout needs {}", out.len(), p.o_len()))?;
    let r = sparq(p, q, c)?;
    let (s, o) = (&p.cache, &p.o_strides);
    for b in 0..s.batch {
        for h in 0..p.q_heads {
            for d in 0..s.head_dim {
                out[b * o[0] + h * o[1] + d] = T::from_f32(r[(b * p.q_heads + h) * s.head_dim + d] as f32);
            }
        }
    }
    Ok(())
}

/// The SparQ output, contiguous `[batch, q_heads, head_dim]` in f64.
pub fn sparq<T: Element>(p: &SparqParams, q: &[T], c: &HostCache<'_, T>) -> Result<Vec<f64>> {
    let s = &p.cache;
    let d = s.head_dim;
    let mut out = vec![0.0; s.batch * p.q_heads * d];
    for t in trace(p, q, c)? {
        let b = t.batch;
        let len = c.seq_lens[b] as usize;
        if len == 0 {
            continue;
        }
        let g = t.heads[0] / p.groups();
        let row = |x: &[T], j: usize| -> Vec<f64> {
            x[((b * s.kv_heads + g) * s.capacity + j) * d..][..d].iter().map(|v| v.to_f64()).collect()
        };
        let mut v_bar = vec![0.0; d];
        for j in 0..len {
            for (m, x) in v_bar.iter_mut().zip(row(c.v, j)) {
                *m += x / len as f64;
            }
        }
        for (hi, &h) in t.heads.iter().enumerate() {
            let qh: Vec<f64> = (0..d).map(|i| q[b * p.q_strides[0] + h * p.q_strides[1] + i].to_f64()).collect();
            let logits: Vec<f64> =
                t.i2.iter()
                    .map(|&j| row(c.k, j).iter().zip(&qh).map(|(k, q)| k * q).sum::<f64>() / (d as f64).sqrt())
                    .collect();
            let w = softmax(&logits);
            let o = &mut out[(b * p.q_heads + h) * d..][..d];
            for (&j, wj) in t.i2.iter().zip(&w) {
                for (oi, vi) in o.iter_mut().zip(row(c.v, j)) {
                    *oi += wj * vi;
                }
            }
            if p.config.reallocate_to_mean {
                let a = t.alpha[hi];
                for (oi, m) in o.iter_mut().zip(&v_bar) {
                    *oi = a * *oi + (1.0 - a) * m;
                }
            }
        }
    }
    Ok(out)
}
