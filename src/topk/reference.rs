//! The specification of top-k: a sort, straight from the ordering rules.

use super::TopkParams;
use crate::dtype::Element;
use crate::error::Result;
use std::cmp::Ordering;

/// Ranking order of two values: `Greater` when `a` ranks above `b`.
/// `-0.0 == +0.0`; NaN ranks below every number; NaNs tie.
pub fn rank(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => a.partial_cmp(&b).expect("non-NaN values compare"),
    }
}

/// The CPU backend's launcher: per row, the top-k positions in ascending order
/// and the values there, into `indices` / `values` (`[rows, k]`).
pub fn topk_into<T: Element>(p: &TopkParams, x: &[T], indices: &mut [u32], values: &mut [T]) -> Result<()> {
    p.validate_buffers(x.len(), indices.len(), values.len())?;
    for r in 0..p.rows {
        let row = &x[r * p.row_stride..][..p.n];
        let mut order: Vec<usize> = (0..p.n).collect();
        // Best first; equal values keep the lower index first.
        order.sort_by(|&i, &j| rank(row[j].to_f64(), row[i].to_f64()).then(i.cmp(&j)));
        let mut chosen = order[..p.k].to_vec();
        chosen.sort_unstable();
        for (slot, &i) in chosen.iter().enumerate() {
            indices[r * p.k + slot] = i as u32;
            values[r * p.k + slot] = row[i];
        }
    }
    Ok(())
}
