//! The specification of dense decode, in f64 and straight loops.

use super::{BufferLens, DecodeParams};
use crate::dtype::Element;
use crate::error::Result;

/// Returns `o` as a contiguous `[batch, q_heads, head_dim]` array in f64.
pub fn decode<T: Element>(p: &DecodeParams, q: &[T], k: &[T], v: &[T], seq_lens: &[u32]) -> Result<Vec<f64>> {
    p.validate_buffers(BufferLens {
        q: q.len(),
        k: k.len(),
        v: v.len(),
        seq_lens: seq_lens.len(),
        o: p.o_len(),
        workspace_bytes: usize::MAX,
    })?;
    let s = &p.shape;
    let (l, d) = (&p.layout, s.head_dim);
    let mut out = vec![0.0f64; s.batch * s.q_heads * d];
    for b in 0..s.batch {
        let len = seq_lens[b] as usize;
        for h in 0..s.q_heads {
            let g = h / s.groups();
            let row = &mut out[(b * s.q_heads + h) * d..][..d];
            if len > s.capacity {
                row.fill(f64::NAN);
                continue;
            }
            let qv: Vec<f64> = (0..d).map(|i| q[b * l.q[0] + h * l.q[1] + i].to_f64()).collect();
            let scores: Vec<f64> = (0..len)
                .map(|j| {
                    let kr = b * l.k[0] + g * l.k[1] + j * l.k[2];
                    p.scale as f64 * (0..d).map(|i| qv[i] * k[kr + i].to_f64()).sum::<f64>()
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|&x| (x - m).exp()).collect();
            let z: f64 = weights.iter().sum();
            for (j, w) in weights.iter().enumerate() {
                let vr = b * l.v[0] + g * l.v[1] + j * l.v[2];
                for (i, o) in row.iter_mut().enumerate() {
                    *o += w / z * v[vr + i].to_f64();
                }
            }
        }
    }
    Ok(out)
}
