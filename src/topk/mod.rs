//! Exact top-k over rows (DESIGN.md 4.3), usable alone and inside SparQ.
//!
//! For each of `rows` rows of `n` values, the `k` positions with the largest
//! values under a total order: larger ranks higher, `-0.0 == +0.0`, NaN (any
//! payload) ranks below every number and all NaNs tie, ties go to the lower
//! index. Outputs, `[rows, k]` each: the positions in ascending order, and the
//! values at those positions, copied bit for bit.

pub mod cuda;
pub mod reference;
pub mod run;
pub mod wgpu;

use crate::dtype::DType;
use crate::error::{ensure, Result};

/// The problem: `rows` rows of `n` elements, row `r` starting at element `r * row_stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopkParams {
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    pub row_stride: usize,
}

impl TopkParams {
    /// Contiguous rows.
    pub fn new(rows: usize, n: usize, k: usize) -> Self {
        TopkParams { rows, n, k, row_stride: n }
    }

    pub fn with_row_stride(mut self, row_stride: usize) -> Self {
        self.row_stride = row_stride;
        self
    }

    pub fn validate(&self) -> Result<()> {
        ensure(self.rows >= 1, "rows", || "must be at least 1 (empty batch)".into())?;
        ensure(self.rows <= i32::MAX as usize, "rows", || format!("{} exceeds i32::MAX", self.rows))?;
        ensure(self.n >= 1, "n", || "must be at least 1".into())?;
        ensure(self.n <= i32::MAX as usize, "n", || format!("{} exceeds i32::MAX", self.n))?;
        ensure(self.k >= 1, "k", || "must be at least 1".into())?;
        ensure(self.k <= self.n, "k", || format!("{} exceeds the row length n = {}", self.k, self.n))?;
        ensure(self.rows == 1 || self.row_stride >= self.n, "row_stride", || {
            format!("{} is shorter than the row length n = {}", self.row_stride, self.n)
        })
    }

    /// Elements the input buffer must hold.
    pub fn x_len(&self) -> usize {
        (self.rows.max(1) - 1) * self.row_stride + self.n
    }

    /// Elements of each output (`indices` and `values`).
    pub fn out_len(&self) -> usize {
        self.rows * self.k
    }

    /// Bytes one launch must move: every input element once, both outputs.
    pub fn bytes_moved(&self, dtype: DType) -> u64 {
        let (x, out) = ((self.rows * self.n) as u64, self.out_len() as u64);
        x * dtype.size() as u64 + out * (4 + dtype.size() as u64)
    }

    /// Checks buffer lengths, in elements.
    pub(crate) fn validate_buffers(&self, x: usize, indices: usize, values: usize) -> Result<()> {
        self.validate()?;
        let need = |arg: &'static str, have: usize, need: usize| {
            ensure(have >= need, arg, || format!("holds {have} elements, the problem needs {need}"))
        };
        need("x", x, self.x_len())?;
        need("indices", indices, self.out_len())?;
        need("values", values, self.out_len())
    }
}
