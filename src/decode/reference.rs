//! The specification of dense decode, in f64 and straight loops.

use super::{BufferLens, DecodeParams};
use crate::dtype::Element;
use crate::error::Result;

/// The CPU backend's launcher: the reference, rounded into the strided output
/// `out` of the input dtype. Validates like the GPU launchers.
pub fn decode_into<T: Element>(
    p: &DecodeParams,
    q: &[T],
    k: &[T],
    v: &[T],
    seq_lens: &[u32],
    out: &mut [T],
) -> Result<()> {
    check(p, q, k, v, seq_lens, out.len())?;
    let r = decode(p, q, k, v, seq_lens)?;
    let (s, o) = (&p.shape, &p.layout.o);
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for d in 0..s.head_dim {
                out[b * o[0] + h * o[1] + d] = T::from_f32(r[(b * s.q_heads + h) * s.head_dim + d] as f32);
            }
        }
    }
    Ok(())
}

fn check<T>(p: &DecodeParams, q: &[T], k: &[T], v: &[T], seq_lens: &[u32], o: usize) -> Result<()> {
    let (q, k, v, seq_lens) = (q.len(), k.len(), v.len(), seq_lens.len());
    p.validate_buffers(BufferLens { q, k, v, seq_lens, o, workspace_bytes: usize::MAX })
}

/// Returns `o` as a contiguous `[batch, q_heads, head_dim]` array in f64.
pub fn decode<T: Element>(p: &DecodeParams, q: &[T], k: &[T], v: &[T], seq_lens: &[u32]) -> Result<Vec<f64>> {
    check(p, q, k, v, seq_lens, p.o_len())?;
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
