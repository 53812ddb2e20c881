//! One error type for every launcher: bad arguments name the argument and the
//! constraint it broke; device failures carry the driver's message.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// An argument a caller passed breaks a documented constraint.
    InvalidArgument { arg: String, constraint: String },
    /// A backend (CUDA, wgpu) cannot be used here; the text says why and how to fix it.
    BackendUnavailable { backend: &'static str, reason: String },
    /// The device or its driver reported a failure.
    Device { backend: &'static str, message: String },
}

impl Error {
    pub fn invalid(arg: impl Into<String>, constraint: impl Into<String>) -> Self {
        Error::InvalidArgument { arg: arg.into(), constraint: constraint.into() }
    }

    pub fn unavailable(backend: &'static str, reason: impl Into<String>) -> Self {
        Error::BackendUnavailable { backend, reason: reason.into() }
    }

    pub fn device(backend: &'static str, message: impl fmt::Display) -> Self {
        Error::Device { backend, message: message.to_string() }
    }

    /// The argument named by an `InvalidArgument`, for tests and callers that branch on it.
    pub fn argument(&self) -> Option<&str> {
        match self {
            Error::InvalidArgument { arg, .. } => Some(arg),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { arg, constraint } => {
                write!(f, "invalid argument `{arg}`: {constraint}")
            }
            Error::BackendUnavailable { backend, reason } => {
                write!(f, "{backend} backend unavailable: {reason}")
            }
            Error::Device { backend, message } => write!(f, "{backend} device error: {message}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns `Err(InvalidArgument)` unless `cond` holds.
pub(crate) fn ensure(cond: bool, arg: &str, constraint: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::invalid(arg, constraint()))
    }
}
