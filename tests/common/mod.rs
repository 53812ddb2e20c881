//! The per-backend test macro: each test body is a function of `&Backend`, run
//! once per backend. An absent backend is reported as skipped by name (written
//! straight to stderr, past the harness's capture), unless `FRUGAL_REQUIRE`
//! names it, in which case the test fails.

#![allow(dead_code)]

use frugal_attn::backend::{self, Backend, BackendKind};
use std::io::Write;
use std::sync::OnceLock;

static CUDA: OnceLock<Result<Option<Backend>, String>> = OnceLock::new();
static WGPU: OnceLock<Result<Option<Backend>, String>> = OnceLock::new();

/// The backend for `kind`, opened once per test binary; `None` means skip.
pub fn backend(kind: BackendKind, test: &str) -> Option<Backend> {
    let cell = match kind {
        BackendKind::Cpu => return Some(Backend::Cpu),
        BackendKind::Cuda => &CUDA,
        BackendKind::Wgpu => &WGPU,
    };
    let opened = cell.get_or_init(|| backend::open_for_test(kind).map_err(|e| e.to_string()));
    match opened {
        Ok(Some(b)) => Some(b.clone()),
        Ok(None) => {
            let why = kind.open().err().map(|e| e.to_string()).unwrap_or_default();
            let _ = writeln!(std::io::stderr(), "SKIPPED {test} on {kind}: {why}");
            None
        }
        Err(e) => panic!("{kind} is required by FRUGAL_REQUIRE but unavailable: {e}"),
    }
}

/// A CUDA backend on a context of its own with cudarc's automatic event
/// tracking off (cudarc otherwise records and waits on an event around every
/// buffer a launch or copy touches), so only the crate's own events and waits
/// order its streams, as for an engine that manages its streams itself. On
/// the emulated driver, which defers each stream's work and runs the
/// last-issued ready work first, a missing wait then fails the test. `None`
/// means skip, as for [`backend`].
pub fn cuda_untracked(test: &str) -> Option<Backend> {
    let Backend::Cuda(shared) = backend(BackendKind::Cuda, test)? else {
        unreachable!("the cuda backend is a Backend::Cuda")
    };
    Some(Backend::Cuda(cuda_untracked_on(shared.context().ordinal())))
}

/// A CUDA backend as [`cuda_untracked`]'s on device `ordinal` (CUDA is present).
pub fn cuda_untracked_on(ordinal: usize) -> std::sync::Arc<backend::CudaBackend> {
    let ctx = cudarc::driver::CudaContext::new(ordinal).expect("a second CUDA context object");
    // SAFETY: off before any stream or buffer of this context exists; the code
    // under test orders its streams with its own events.
    unsafe { ctx.disable_event_tracking() };
    std::sync::Arc::new(backend::CudaBackend::from_context(ctx).expect("the kernels load into the new context"))
}

/// True when `FRUGAL_REQUIRE` (a comma-separated list) names `what`.
pub fn required(what: &str) -> bool {
    std::env::var("FRUGAL_REQUIRE").is_ok_and(|v| v.split(',').any(|s| s.trim().eq_ignore_ascii_case(what)))
}

/// For NCCL's transport (crate feature `nccl`): the CUDA backend of
/// [`cuda_untracked`] when libnccl loads, else `None` (skip, reported by
/// name as for a backend), or a failure when `FRUGAL_REQUIRE` names `nccl`.
#[cfg(feature = "nccl")]
pub fn nccl(test: &str) -> Option<Backend> {
    // SAFETY: only tries to load the library, as cudarc would on first use.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        let why =
            "no libnccl.so on the library path (scripts/cuda_emu_tests.sh --features nccl builds an emulated one)";
        assert!(!required("nccl"), "nccl is required by FRUGAL_REQUIRE but unavailable: {why}");
        let _ = writeln!(std::io::stderr(), "SKIPPED {test} on nccl: {why}");
        return None;
    }
    let b = cuda_untracked(test);
    assert!(b.is_some() || !required("nccl"), "nccl is required by FRUGAL_REQUIRE but CUDA is unavailable");
    b
}

/// `backend_tests!(f, g)` makes modules `f` and `g`, each with tests `cpu`,
/// `wgpu` and `cuda` calling `f(&backend)` / `g(&backend)`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use frugal_attn::backend::BackendKind;
                #[test]
                fn cpu() {
                    super::$name(&frugal_attn::Backend::Cpu);
                }
                #[test]
                fn wgpu() {
                    if let Some(b) = $crate::common::backend(BackendKind::Wgpu, stringify!($name)) {
                        super::$name(&b);
                    }
                }
                #[test]
                fn cuda() {
                    if let Some(b) = $crate::common::backend(BackendKind::Cuda, stringify!($name)) {
                        super::$name(&b);
                    }
                }
            }
        )*
    };
}

/// Asserts that a launch was refused with an error naming `arg`; `case` says which launch, for the message.
pub fn assert_refused(result: Result<(), frugal_attn::Error>, arg: &str, case: &str) {
    match result {
        Err(e) => assert_eq!(e.argument(), Some(arg), "{case}: expected an error naming `{arg}`, got: {e}"),
        Ok(()) => panic!("{case}: expected an error naming `{arg}`, the launch was accepted"),
    }
}

/// A `CudaSlice` over `len` elements of `buf`'s memory from byte `byte_offset`
/// on, as an engine that wraps its own allocations
/// (`CudaStream::upgrade_device_ptr`) can make: safe Rust cannot alias a
/// launcher's `&mut` argument, this can, and the launchers must refuse it.
/// Leaked on drop, so only `buf` frees the memory.
pub struct CudaAlias<T>(Option<cudarc::driver::CudaSlice<T>>);

impl<T> CudaAlias<T> {
    pub fn of<U>(
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        buf: &cudarc::driver::CudaSlice<U>,
        byte_offset: usize,
        len: usize,
    ) -> Self {
        use cudarc::driver::DevicePtr;
        let bytes = buf.len() * std::mem::size_of::<U>();
        assert!(byte_offset + len * std::mem::size_of::<T>() <= bytes, "the alias must stay inside `buf`");
        let (ptr, _sync) = buf.device_ptr(stream);
        // SAFETY: inside `buf`'s allocation, which the tests keep alive longer
        // than the alias; the alias is leaked, never freed.
        CudaAlias(Some(unsafe { stream.upgrade_device_ptr(ptr + byte_offset as u64, len) }))
    }
}

impl<T> std::ops::Deref for CudaAlias<T> {
    type Target = cudarc::driver::CudaSlice<T>;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("present until drop")
    }
}

impl<T> std::ops::DerefMut for CudaAlias<T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("present until drop")
    }
}

impl<T> Drop for CudaAlias<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.leak();
        }
    }
}
