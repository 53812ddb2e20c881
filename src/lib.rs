// The README is the crate documentation; its examples compile as doc tests.
#![doc = include_str!("../README.md")]

pub mod backend;
pub mod blockwise;
pub mod crosslayer;
pub mod decode;
pub mod dtype;
pub mod error;
#[cfg(feature = "eval")]
pub mod eval;
pub mod host;
pub mod ring;
pub mod sparq;
pub mod topk;

pub use backend::{Backend, BackendKind};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
