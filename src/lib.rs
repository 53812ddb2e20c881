//! frugal-attn: hand-written CUDA and WGSL kernels that make LLM attention read
//! less memory, each with an f64 CPU reference and safe, validating launchers.
//!
//! One module per technique (`decode`, ...); device plumbing in [`backend`].
//! See DESIGN.md for the math and the conventions.

pub mod backend;
pub mod decode;
pub mod dtype;
pub mod error;
pub mod host;

pub use backend::{Backend, BackendKind};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
