//! CUDA plumbing: the context, the module built from the fatbin that build.rs
//! embedded, a function cache, and the caller-owned workspace.

use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Every `kernels-cuda/*.cu`, compiled by build.rs into one fatbin (empty when nvcc was missing).
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/frugal_attn.fatbin"));
/// What build.rs did about the CUDA kernels, for error messages.
const BUILD_STATUS: &str = env!("FRUGAL_CUDA_BUILD");

const NAME: &str = "cuda";

/// True when build.rs compiled the CUDA kernels into this binary.
pub fn kernels_compiled() -> bool {
    !FATBIN.is_empty()
}

/// A CUDA device with this crate's kernels loaded.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    name: String,
    sm_count: usize,
    compute_capability: (u32, u32),
    hopper_kernels: bool,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("name", &self.name).finish()
    }
}

impl CudaBackend {
    /// Opens device `ordinal` (its primary context). Returns `Err`, never panics,
    /// when the kernels were not compiled, libcuda is missing, or there is no device.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !kernels_compiled() {
            return Err(Error::unavailable(
                NAME,
                format!(
                    "the CUDA kernels were not compiled into this build ({BUILD_STATUS}); install the CUDA 13 \
                     compiler (or set NVCC=/path/to/nvcc) and rebuild"
                ),
            ));
        }
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::unavailable(NAME, "libcuda (the NVIDIA driver) was not found"));
        }
        let count = std::panic::catch_unwind(CudaContext::device_count)
            .map_err(|_| Error::unavailable(NAME, "the CUDA driver could not be initialised"))?
            .map_err(|e| Error::unavailable(NAME, format!("cuInit/cuDeviceGetCount failed: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::unavailable(NAME, format!("no CUDA device {ordinal} ({count} present)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::device(NAME, e))?;
        Self::from_context(ctx)
    }

    /// Loads the kernels into a context the caller already owns (an engine's).
    pub fn from_context(ctx: Arc<CudaContext>) -> Result<Self> {
        if !kernels_compiled() {
            return Err(Error::unavailable(NAME, format!("the CUDA kernels were not compiled ({BUILD_STATUS})")));
        }
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec()))
            .map_err(|e| Error::device(NAME, format!("loading the kernel fatbin: {e}")))?;
        let name = ctx.name().map_err(|e| Error::device(NAME, e))?;
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| Error::device(NAME, e))? as usize;
        let attr = |a| ctx.attribute(a).map(|v| v as u32).map_err(|e| Error::device(NAME, e));
        use cudarc::driver::sys::CUdevice_attribute as A;
        let compute_capability = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let stream = ctx.new_stream().map_err(|e| Error::device(NAME, e))?;
        let functions = Mutex::new(HashMap::new());
        let hopper_kernels = compute_capability == (9, 0) && std::env::var_os("FRUGAL_CUDA_NO_WGMMA").is_none();
        Ok(CudaBackend { ctx, stream, module, functions, name, sm_count, compute_capability, hopper_kernels })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// A stream owned by the backend, used by the host-level helpers; engines pass their own.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    pub fn compute_capability(&self) -> (u32, u32) {
        self.compute_capability
    }

    /// Whether the Hopper kernels (wgmma, built only as sm_90a SASS) run:
    /// on compute capability 9.0, unless `FRUGAL_CUDA_NO_WGMMA` was set when
    /// the backend opened (to compare them with the `mma.sync` kernels on the
    /// same card, or to sidestep them).
    pub fn hopper_kernels(&self) -> bool {
        self.hopper_kernels
    }

    /// A kernel of the embedded module, looked up once.
    pub fn function(&self, name: &'static str) -> Result<CudaFunction> {
        self.cached_function(name, None)
    }

    /// A kernel that may use up to `max_smem` bytes of dynamic shared memory,
    /// looked up and configured once. The limit is the function's attribute,
    /// which bounds every later launch of it from any thread, so `max_smem`
    /// must be the most any launch of `name` uses, not this launch's size.
    pub fn function_with_smem(&self, name: &'static str, max_smem: usize) -> Result<CudaFunction> {
        self.cached_function(name, Some(max_smem))
    }

    fn cached_function(&self, name: &'static str, max_smem: Option<usize>) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(name)
            .map_err(|e| Error::device(NAME, format!("kernel `{name}` missing from the fatbin: {e}")))?;
        if let Some(bytes) = max_smem {
            let attr = cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            f.set_attribute(attr, bytes as i32)
                .map_err(|e| Error::device(NAME, format!("{name}: {bytes} bytes of shared memory: {e}")))?;
        }
        cache.insert(name, f.clone());
        Ok(f)
    }

    /// Refuses a stream that belongs to another context: the module lives in ours.
    pub(crate) fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() == self.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::invalid("stream", "belongs to a different CUDA context than the backend"))
        }
    }

    /// Seconds per call of `launch` (which records work on [`Self::stream`]),
    /// timed with events around `iters` back-to-back calls.
    pub fn time(&self, iters: usize, mut launch: impl FnMut() -> Result<()>) -> Result<f64> {
        let err = Self::device_error;
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self.ctx.new_event(flags).map_err(err)?;
        let end = self.ctx.new_event(flags).map_err(err)?;
        start.record(&self.stream).map_err(err)?;
        for _ in 0..iters.max(1) {
            launch()?;
        }
        end.record(&self.stream).map_err(err)?;
        end.synchronize().map_err(err)?;
        Ok(start.elapsed_ms(&end).map_err(err)? as f64 * 1e-3 / iters.max(1) as f64)
    }

    pub fn device_error(e: impl std::fmt::Display) -> Error {
        Error::device(NAME, e)
    }
}

/// Scratch memory a caller allocates once and hands to every launch; each
/// technique's `workspace_bytes` says how much a shape needs.
pub struct CudaWorkspace {
    buf: CudaSlice<u8>,
    /// `buf`'s device address (fixed for its life), for [`CudaWorkspace::span`].
    base: u64,
}

impl CudaWorkspace {
    pub fn new(stream: &Arc<CudaStream>, bytes: usize) -> Result<Self> {
        // Never zero-sized: cudarc refuses empty allocations on some drivers.
        let buf = stream.alloc_zeros::<u8>(bytes.max(256)).map_err(|e| Error::device(NAME, e))?;
        let base = buf.device_ptr(stream).0;
        Ok(CudaWorkspace { buf, base })
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Base device address, 256-byte aligned by the allocator.
    pub(crate) fn device_ptr(&self, stream: &CudaStream) -> u64 {
        let (ptr, _sync) = self.buf.device_ptr(stream);
        ptr
    }

    /// The workspace as a written argument of [`check_no_alias`] (from the
    /// stored address: no stream synchronization on the launch path).
    pub(crate) fn span(&self) -> DeviceSpan {
        span::<u8>("workspace", self.base, self.bytes(), true)
    }
}

/// Maps a failed launch of kernel `name` to an `Err` that names it.
pub(crate) fn launch_err(name: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::device(NAME, format!("launching {name}: {e}"))
}

/// A launch argument's device memory for [`check_no_alias`]: its name, first
/// byte, one past its last byte, and whether the launch writes it.
pub(crate) type DeviceSpan = (&'static str, u64, u64, bool);

/// The span of `len` elements of `T` at device address `ptr`.
pub(crate) fn span<T>(name: &'static str, ptr: u64, len: usize, written: bool) -> DeviceSpan {
    (name, ptr, ptr + (len * std::mem::size_of::<T>()) as u64, written)
}

/// `Err` naming the written argument whose bytes overlap another argument's.
/// Safe Rust cannot hand a launcher a `&mut` slice that aliases another
/// argument, but an engine that wraps its own allocations
/// (`CudaStream::upgrade_device_ptr`) can, and a kernel would then read what
/// it is writing.
pub(crate) fn check_no_alias(spans: &[DeviceSpan]) -> Result<()> {
    for (i, &(a, a0, a1, aw)) in spans.iter().enumerate() {
        for &(b, b0, b1, bw) in &spans[i + 1..] {
            if (aw || bw) && a0 < b1 && b0 < a1 {
                let (written, other) = if aw { (a, b) } else { (b, a) };
                return Err(Error::invalid(written, format!("overlaps `{other}` in device memory")));
            }
        }
    }
    Ok(())
}
