//! The specification of blockwise attention, in f64 and straight loops, and
//! the CPU backend's launchers built on it.

use super::{merge_weights, need_elems, BlockParams, BlockShape};
use crate::dtype::Element;
use crate::error::Result;

/// A normalised partial: `o` shaped `[B, H_q, q_len, D]`, `lse` `[B, H_q, q_len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    pub o: Vec<f64>,
    pub lse: Vec<f64>,
}

/// Gradients of one pair: `dq` like `O`, `dk`/`dv` as `[B, H_kv, kv_len, D]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

fn check_inputs<T>(p: &BlockParams, q: &[T], k: &[T], v: &[T]) -> Result<()> {
    p.validate()?;
    need_elems("q", q.len(), p.q_elems())?;
    need_elems("k", k.len(), p.k_elems())?;
    need_elems("v", v.len(), p.v_elems())
}

/// `q[b, h, i, :]`, `k[b, g, j, :]` and `v[b, g, j, :]` as f64 rows.
struct Rows<'a, T> {
    p: &'a BlockParams,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
}

impl<T: Element> Rows<'_, T> {
    fn at(t: &[T], st: &[usize; 3], b: usize, h: usize, i: usize, d: usize) -> Vec<f64> {
        let base = b * st[0] + h * st[1] + i * st[2];
        t[base..base + d].iter().map(|x| x.to_f64()).collect()
    }
    fn q(&self, b: usize, h: usize, i: usize) -> Vec<f64> {
        Self::at(self.q, &self.p.layout.q, b, h, i, self.p.shape.head_dim)
    }
    fn k(&self, b: usize, g: usize, j: usize) -> Vec<f64> {
        Self::at(self.k, &self.p.layout.k, b, g, j, self.p.shape.head_dim)
    }
    fn v(&self, b: usize, g: usize, j: usize) -> Vec<f64> {
        Self::at(self.v, &self.p.layout.v, b, g, j, self.p.shape.head_dim)
    }
    /// Scaled scores of row `(b, h, i)` against every key; `-inf` where masked.
    fn scores(&self, b: usize, h: usize, i: usize) -> Vec<f64> {
        let (s, p) = (&self.p.shape, self.p);
        let qv = self.q(b, h, i);
        (0..s.kv_len)
            .map(|j| {
                if !p.mask.visible(p.q0 + i, p.k0 + j) {
                    return f64::NEG_INFINITY;
                }
                let kv = self.k(b, h / s.groups(), j);
                p.scale as f64 * qv.iter().zip(&kv).map(|(a, b)| a * b).sum::<f64>()
            })
            .collect()
    }
}

fn lse_of(scores: &[f64]) -> f64 {
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + scores.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
}

/// The forward of one pair.
pub fn forward<T: Element>(p: &BlockParams, q: &[T], k: &[T], v: &[T]) -> Result<Partial> {
    check_inputs(p, q, k, v)?;
    let (s, d) = (&p.shape, p.shape.head_dim);
    let rows = Rows { p, q, k, v };
    let mut out = Partial { o: vec![0.0; s.o_elems()], lse: vec![0.0; s.lse_elems()] };
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.q_len {
                let r = (b * s.q_heads + h) * s.q_len + i;
                let sc = rows.scores(b, h, i);
                let lse = lse_of(&sc);
                out.lse[r] = lse;
                if lse == f64::NEG_INFINITY {
                    continue;
                }
                let o = &mut out.o[r * d..][..d];
                for (j, &x) in sc.iter().enumerate() {
                    let w = (x - lse).exp();
                    if w > 0.0 {
                        for (oi, vi) in o.iter_mut().zip(rows.v(b, h / s.groups(), j)) {
                            *oi += w * vi;
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Merges partial `b` into partial `a` in place (rows of `head_dim` values).
pub fn merge(a: &mut Partial, b: &Partial, head_dim: usize) {
    for (r, lse_b) in b.lse.iter().enumerate() {
        let (lse, wa, wb) = merge_weights(a.lse[r], *lse_b);
        a.lse[r] = lse;
        for (oa, ob) in a.o[r * head_dim..][..head_dim].iter_mut().zip(&b.o[r * head_dim..][..head_dim]) {
            *oa = *oa * wa + ob * wb;
        }
    }
}

/// The backward of one pair given the final `o` (f32 as the kernels keep it, or
/// f64), the final `lse` and `d_o` (input dtype, at `layout.o`): `P = exp(S - lse)`,
/// `dV = P^T dO`, `dP = dO V^T`, `dS = P * (dP - delta)`, `dQ = scale dS K`,
/// `dK = scale dS^T Q`, with `delta = rowsum(dO * O)`.
pub fn backward<T: Element, O: Copy + Into<f64>>(
    p: &BlockParams,
    q: &[T],
    k: &[T],
    v: &[T],
    d_o: &[T],
    o: &[O],
    lse: &[O],
) -> Result<Grads> {
    check_inputs(p, q, k, v)?;
    let s = &p.shape;
    need_elems("d_o", d_o.len(), p.o_elems())?;
    need_elems("o", o.len(), s.o_elems())?;
    need_elems("lse", lse.len(), s.lse_elems())?;
    let d = s.head_dim;
    let rows = Rows { p, q, k, v };
    let mut g =
        Grads { dq: vec![0.0; s.o_elems()], dk: vec![0.0; s.kv_grad_elems()], dv: vec![0.0; s.kv_grad_elems()] };
    let scale = p.scale as f64;
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            let kvh = h / s.groups();
            for i in 0..s.q_len {
                let r = (b * s.q_heads + h) * s.q_len + i;
                let lse_r: f64 = lse[r].into();
                if lse_r == f64::NEG_INFINITY {
                    continue;
                }
                let dov = Rows::<T>::at(d_o, &p.layout.o, b, h, i, d);
                let delta: f64 = (0..d).map(|x| dov[x] * o[r * d + x].into()).sum();
                let qv = rows.q(b, h, i);
                let sc = rows.scores(b, h, i);
                for (j, &x) in sc.iter().enumerate() {
                    let pj = (x - lse_r).exp();
                    if pj == 0.0 {
                        continue;
                    }
                    let (kv, vv) = (rows.k(b, kvh, j), rows.v(b, kvh, j));
                    let dp: f64 = dov.iter().zip(&vv).map(|(a, b)| a * b).sum();
                    let ds = pj * (dp - delta);
                    let kr = ((b * s.kv_heads + kvh) * s.kv_len + j) * d;
                    for x in 0..d {
                        g.dv[kr + x] += pj * dov[x];
                        g.dq[r * d + x] += scale * ds * kv[x];
                        g.dk[kr + x] += scale * ds * qv[x];
                    }
                }
            }
        }
    }
    Ok(g)
}

// ---- The CPU backend's launchers: same contracts as the GPU ones, f32 state. ----

/// Forward of one pair into f32 `o`/`lse`; with `accumulate` the pair's partial
/// is merged into the running `(o, lse)` instead of overwriting it.
pub fn forward_into<T: Element>(
    p: &BlockParams,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &mut [f32],
    lse: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    p.validate()?;
    need_elems("o", o.len(), p.shape.o_elems())?;
    need_elems("lse", lse.len(), p.shape.lse_elems())?;
    let part = forward(p, q, k, v)?;
    if accumulate {
        merge_into(&p.shape, o, lse, &to_f32(&part.o), &to_f32(&part.lse))
    } else {
        o[..part.o.len()].copy_from_slice(&to_f32(&part.o));
        lse[..part.lse.len()].copy_from_slice(&to_f32(&part.lse));
        Ok(())
    }
}

/// Merges `(o_b, lse_b)` into `(o, lse)` in place.
pub fn merge_into(s: &BlockShape, o: &mut [f32], lse: &mut [f32], o_b: &[f32], lse_b: &[f32]) -> Result<()> {
    s.validate()?;
    for (arg, have, want) in [
        ("o", o.len(), s.o_elems()),
        ("lse", lse.len(), s.lse_elems()),
        ("o_b", o_b.len(), s.o_elems()),
        ("lse_b", lse_b.len(), s.lse_elems()),
    ] {
        need_elems(arg, have, want)?;
    }
    let d = s.head_dim;
    for r in 0..s.lse_elems() {
        let (m, wa, wb) = merge_weights(lse[r] as f64, lse_b[r] as f64);
        lse[r] = m as f32;
        for x in r * d..(r + 1) * d {
            o[x] = (o[x] as f64 * wa + o_b[x] as f64 * wb) as f32;
        }
    }
    Ok(())
}

/// Casts the normalised f32 `o` into the strided `out` (at `layout.o`) of the
/// input dtype; rows whose `lse` is `-inf` become exactly 0.
pub fn finalize_into<T: Element>(p: &BlockParams, o: &[f32], lse: &[f32], out: &mut [T]) -> Result<()> {
    p.validate()?;
    let s = &p.shape;
    need_elems("o", o.len(), s.o_elems())?;
    need_elems("lse", lse.len(), s.lse_elems())?;
    need_elems("out", out.len(), p.o_elems())?;
    let (d, st) = (s.head_dim, &p.layout.o);
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.q_len {
                let r = (b * s.q_heads + h) * s.q_len + i;
                let base = b * st[0] + h * st[1] + i * st[2];
                for x in 0..d {
                    let val = if lse[r] == f32::NEG_INFINITY { 0.0 } else { o[r * d + x] };
                    out[base + x] = T::from_f32(val);
                }
            }
        }
    }
    Ok(())
}

/// The backward pre-pass: `delta[r] = rowsum(dO * O)`.
pub fn backward_prepass_into<T: Element>(p: &BlockParams, o: &[f32], d_o: &[T], delta: &mut [f32]) -> Result<()> {
    p.validate()?;
    let s = &p.shape;
    need_elems("o", o.len(), s.o_elems())?;
    need_elems("d_o", d_o.len(), p.o_elems())?;
    need_elems("delta", delta.len(), s.lse_elems())?;
    let (d, st) = (s.head_dim, &p.layout.o);
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.q_len {
                let r = (b * s.q_heads + h) * s.q_len + i;
                let base = b * st[0] + h * st[1] + i * st[2];
                delta[r] = (0..d).map(|x| d_o[base + x].to_f64() * o[r * d + x] as f64).sum::<f64>() as f32;
            }
        }
    }
    Ok(())
}

/// The backward of one pair, accumulated (`+=`) into f32 `dq`, `dk`, `dv`.
/// `delta` comes from [`backward_prepass_into`] (the CPU path recomputes it from
/// `o` in f64 and only checks its size, so all backends share one signature).
#[allow(clippy::too_many_arguments)]
pub fn backward_into<T: Element>(
    p: &BlockParams,
    q: &[T],
    k: &[T],
    v: &[T],
    d_o: &[T],
    o: &[f32],
    lse: &[f32],
    delta: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    p.validate()?;
    let s = &p.shape;
    need_elems("delta", delta.len(), s.lse_elems())?;
    need_elems("dq", dq.len(), s.o_elems())?;
    need_elems("dk", dk.len(), s.kv_grad_elems())?;
    need_elems("dv", dv.len(), s.kv_grad_elems())?;
    let g = backward(p, q, k, v, d_o, o, lse)?;
    for (dst, src) in [(dq, &g.dq), (dk, &g.dk), (dv, &g.dv)] {
        for (a, b) in dst.iter_mut().zip(src) {
            *a = (*a as f64 + b) as f32;
        }
    }
    Ok(())
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}
