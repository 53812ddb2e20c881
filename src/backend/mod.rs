//! Device plumbing only: which backends exist here, and how to open them.

pub mod cuda;
pub mod wgpu;

pub use self::cuda::{CudaBackend, CudaWorkspace};
pub use self::wgpu::{WgpuBackend, WgpuTensor, WgpuWorkspace};

use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Cpu,
    Cuda,
    Wgpu,
}

impl BackendKind {
    /// Preference order for the report: the fastest first.
    pub const ALL: [BackendKind; 3] = [BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Cpu];

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
        }
    }

    /// Opens this backend (CUDA device 0, the wgpu adapter the environment picks).
    pub fn open(self) -> Result<Backend> {
        Ok(match self {
            BackendKind::Cpu => Backend::Cpu,
            BackendKind::Cuda => Backend::Cuda(Arc::new(CudaBackend::new(0)?)),
            BackendKind::Wgpu => Backend::Wgpu(Arc::new(WgpuBackend::new()?)),
        })
    }

    /// True when `FRUGAL_REQUIRE` (a comma-separated list) names this backend,
    /// so its absence is a failure rather than a skip.
    pub fn required(self) -> bool {
        std::env::var("FRUGAL_REQUIRE")
            .map(|v| v.split(',').any(|s| s.trim().eq_ignore_ascii_case(self.name())))
            .unwrap_or(false)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            "wgpu" => Ok(BackendKind::Wgpu),
            o => Err(format!("unknown backend `{o}` (expected cpu, cuda or wgpu)")),
        }
    }
}

/// An opened backend: what the host-level helpers (`run` modules, tests, the
/// CLI) dispatch on. Engines use the per-backend launchers directly.
#[derive(Clone)]
pub enum Backend {
    /// The f64 reference.
    Cpu,
    Cuda(Arc<CudaBackend>),
    Wgpu(Arc<WgpuBackend>),
}

impl Backend {
    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Cpu => BackendKind::Cpu,
            Backend::Cuda(_) => BackendKind::Cuda,
            Backend::Wgpu(_) => BackendKind::Wgpu,
        }
    }

    pub fn device_name(&self) -> String {
        match self {
            Backend::Cpu => format!("host ({} threads)", std::thread::available_parallelism().map_or(1, |n| n.get())),
            Backend::Cuda(c) => c.device_name().to_string(),
            Backend::Wgpu(w) => w.device_name(),
        }
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind(), self.device_name())
    }
}

/// Tries every backend, fastest first; each entry is the opened backend or why it is absent.
pub fn probe_all() -> Vec<(BackendKind, Result<Backend>)> {
    BackendKind::ALL.iter().map(|&k| (k, k.open())).collect()
}

/// The first backend that opens, in the order CUDA, wgpu, CPU.
pub fn best() -> Backend {
    BackendKind::ALL.iter().find_map(|k| k.open().ok()).unwrap_or(Backend::Cpu)
}

/// For tests: the backend, `Ok(None)` when it is absent and may be skipped, or
/// `Err` when it is absent but `FRUGAL_REQUIRE` names it.
pub fn open_for_test(kind: BackendKind) -> std::result::Result<Option<Backend>, Error> {
    match kind.open() {
        Ok(b) => Ok(Some(b)),
        Err(e) if kind.required() => Err(e),
        Err(_) => Ok(None),
    }
}
