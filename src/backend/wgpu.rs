//! wgpu plumbing: adapter choice (as wgpu's own environment helpers do), the
//! device and queue, a pipeline cache, buffers, and the caller-owned workspace.

use crate::dtype::DType;
use crate::error::{ensure, Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wgpu::util::DeviceExt;

const NAME: &str = "wgpu";

/// Helpers every WGSL kernel file is prefixed with (dtype conversion, packing).
pub const COMMON_WGSL: &str = include_str!("../../kernels-wgsl/common.wgsl");

/// A wgpu device with a pipeline cache.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<(&'static str, &'static str, DType), wgpu::ComputePipeline>>,
    errors: Arc<Mutex<Vec<String>>>,
    exclusive: Mutex<()>,
}

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend").field("adapter", &self.info.name).finish()
    }
}

impl WgpuBackend {
    /// Picks an adapter the way wgpu's helpers do: `WGPU_BACKEND` limits the
    /// backends, `WGPU_ADAPTER_NAME` picks by a case-insensitive substring of the
    /// adapter name, `WGPU_POWER_PREF` otherwise. No adapter is an `Err`.
    pub fn new() -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        let adapter = match std::env::var("WGPU_ADAPTER_NAME") {
            Ok(want) => {
                let want = want.to_lowercase();
                let all = pollster::block_on(instance.enumerate_adapters(backends));
                let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
                all.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&want)).ok_or_else(|| {
                    Error::unavailable(NAME, format!("no adapter matches WGPU_ADAPTER_NAME={want:?} (found {names:?})"))
                })?
            }
            Err(_) => pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::from_env().unwrap_or(wgpu::PowerPreference::HighPerformance),
                ..Default::default()
            }))
            .map_err(|e| Error::unavailable(NAME, format!("no adapter found ({e})")))?,
        };
        let info = adapter.get_info();
        // Take everything the adapter offers: big caches need big storage bindings.
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("frugal-attn"),
            required_features: wgpu::Features::empty(),
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| Error::unavailable(NAME, format!("request_device on {}: {e}", info.name)))?;
        Ok(Self::from_device(device, queue, info))
    }

    /// Wraps a device an engine already owns. Kernel errors are collected
    /// rather than sent to wgpu's default handler (which panics).
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(e.to_string());
        }));
        let limits = device.limits();
        WgpuBackend {
            device,
            queue,
            info,
            limits,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            errors,
            exclusive: Mutex::new(()),
        }
    }

    /// Serialises the host-level helpers (upload, launch, wait, read back) of
    /// different threads: wgpu's GL backend gives up on its context lock after
    /// a second, which a long dispatch on a software rasteriser outlasts.
    pub fn exclusive(&self) -> std::sync::MutexGuard<'_, ()> {
        self.exclusive.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Refuses a dispatch with more workgroups along one axis than this device
    /// allows; `dims` are `(argument that sets the count, count)`.
    pub(crate) fn check_workgroups(&self, dims: &[(&str, usize)]) -> Result<()> {
        let max = self.limits.max_compute_workgroups_per_dimension as usize;
        for &(arg, n) in dims {
            ensure(n <= max, arg, || format!("needs {n} workgroups along one axis, the device allows {max}"))?;
        }
        Ok(())
    }

    /// Workgroups of `wg` threads for one thread per item: `(x, y)` with
    /// `x * y * wg >= items`, each within the device limit (`Err` naming `arg` beyond it).
    pub(crate) fn flat_groups(&self, items: usize, wg: usize, arg: &str) -> Result<(u32, u32)> {
        let max = self.limits.max_compute_workgroups_per_dimension as usize;
        let groups = items.div_ceil(wg).max(1);
        let x = groups.min(max);
        let y = groups.div_ceil(x);
        ensure(y <= max, arg, || format!("needs {groups} workgroups, more than this device dispatches"))?;
        Ok((x as u32, y as u32))
    }

    /// `"<adapter name> (<backend>)"`.
    pub fn device_name(&self) -> String {
        format!("{} ({:?})", self.info.name, self.info.backend)
    }

    /// A compute pipeline for `entry` of the kernel file `file` (prefixed with
    /// [`COMMON_WGSL`]), specialised for `dtype` through the `DTYPE` override.
    pub fn pipeline(
        &self,
        file: &'static str,
        source: &'static str,
        entry: &'static str,
        dtype: DType,
    ) -> Result<wgpu::ComputePipeline> {
        let key = (file, entry, dtype);
        if let Some(p) = self.pipelines.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(p.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            modules
                .entry(file)
                .or_insert_with(|| {
                    let src = format!("{COMMON_WGSL}\n{source}");
                    self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(file),
                        source: wgpu::ShaderSource::Wgsl(src.into()),
                    })
                })
                .clone()
        };
        let constants = [("DTYPE", dtype_code(dtype) as f64)];
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants: &constants, ..Default::default() },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::device(NAME, format!("building pipeline {file}:{entry} ({dtype}): {e}")));
        }
        self.pipelines.lock().unwrap_or_else(|e| e.into_inner()).insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// A small uniform buffer holding one launch's parameters (the wgpu
    /// counterpart of CUDA kernel arguments).
    pub(crate) fn uniform<P: bytemuck::Pod>(&self, params: &P) -> wgpu::Buffer {
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("frugal-attn params"),
            contents: bytemuck::bytes_of(params),
            usage: wgpu::BufferUsages::UNIFORM,
        })
    }

    /// Uploads bytes into a new storage buffer (padded to a multiple of 4 bytes).
    pub fn upload(&self, bytes: &[u8]) -> wgpu::Buffer {
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(4).max(4), 0);
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("frugal-attn upload"),
            contents: &padded,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// Copies `len` bytes from the start of `buffer` back to the host (waits for the queue).
    pub fn read_back(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<u8>> {
        let size = (len.next_multiple_of(4).max(4)) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("frugal-attn readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
        self.submit_and_wait(enc)?;
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| Error::device(NAME, e))?
            .map_err(|e| Error::device(NAME, format!("mapping the readback buffer: {e}")))?;
        let bytes = slice
            .get_mapped_range()
            .map_err(|e| Error::device(NAME, format!("reading the readback buffer: {e}")))?[..len]
            .to_vec();
        staging.unmap();
        Ok(bytes)
    }

    /// Submits `encoder`, waits for the queue to drain and returns the wall time,
    /// or the first error wgpu reported meanwhile.
    pub fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<Duration> {
        let t0 = Instant::now();
        self.queue.submit([encoder.finish()]);
        self.wait()?;
        Ok(t0.elapsed())
    }

    /// Seconds per call of `record`, from `iters` calls recorded into one
    /// encoder, submitted together (wall time around submit and wait).
    pub fn time(&self, iters: usize, mut record: impl FnMut(&mut wgpu::CommandEncoder) -> Result<()>) -> Result<f64> {
        let mut enc = self.device.create_command_encoder(&Default::default());
        for _ in 0..iters.max(1) {
            record(&mut enc)?;
        }
        Ok(self.submit_and_wait(enc)?.as_secs_f64() / iters.max(1) as f64)
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| Error::device(NAME, format!("waiting for the queue: {e}")))?;
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::device(NAME, errors.drain(..).collect::<Vec<_>>().join("; ")))
        }
    }
}

/// A technique's WGSL kernel file: its name (the pipeline cache's key) and source.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WgslFile {
    pub name: &'static str,
    pub source: &'static str,
}

/// One dispatch of a compute pass: an entry point of the pass's kernel file,
/// its storage and uniform buffers as `(binding, buffer)` of bind group 0, and
/// the workgroup counts.
pub(crate) struct Dispatch<'a> {
    pub entry: &'static str,
    pub bindings: &'a [(u32, &'a wgpu::Buffer)],
    pub groups: (u32, u32, u32),
}

impl WgpuBackend {
    /// Records `dispatches`, in order, in one compute pass labelled `label`;
    /// each runs its entry point of `file` specialised for `dtype`.
    pub(crate) fn record_pass(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        label: &str,
        file: WgslFile,
        dtype: DType,
        dispatches: &[Dispatch<'_>],
    ) -> Result<()> {
        // Pipelines and bind groups first: building one fails with an Err, and a pass must not be left half recorded.
        let mut steps = Vec::with_capacity(dispatches.len());
        for d in dispatches {
            let pipeline = self.pipeline(file.name, file.source, d.entry, dtype)?;
            let entries: Vec<_> = d
                .bindings
                .iter()
                .map(|&(binding, buffer)| wgpu::BindGroupEntry { binding, resource: buffer.as_entire_binding() })
                .collect();
            let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(d.entry),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            steps.push((pipeline, bind_group, d.groups));
        }
        let mut pass =
            encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(label), timestamp_writes: None });
        for (pipeline, bind_group, (x, y, z)) in &steps {
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, bind_group, &[]);
            pass.dispatch_workgroups(*x, *y, *z);
        }
        Ok(())
    }
}

/// `x` as one of a kernel's 32-bit indices (an offset, stride or extent), or
/// an `Err` naming `arg`.
pub(crate) fn index_u32<N: Copy + TryInto<u32> + std::fmt::Display>(x: N, arg: &str) -> Result<u32> {
    x.try_into().map_err(|_| Error::invalid(arg, format!("{x} does not fit the kernels' 32-bit indices")))
}

/// Three strides as 32-bit indices (`Err` naming `arg`).
pub(crate) fn strides_u32(st: &[usize; 3], arg: &str) -> Result<[u32; 3]> {
    Ok([index_u32(st[0], arg)?, index_u32(st[1], arg)?, index_u32(st[2], arg)?])
}

/// The `DTYPE` override value of `kernels-wgsl/common.wgsl`.
pub(crate) fn dtype_code(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Bf16 => 2,
    }
}

/// A tensor in a caller's buffer: the buffer and the element offset where the tensor starts.
#[derive(Debug, Clone, Copy)]
pub struct WgpuTensor<'a> {
    pub buffer: &'a wgpu::Buffer,
    /// In elements of the tensor's dtype.
    pub offset: u64,
}

impl<'a> WgpuTensor<'a> {
    pub fn new(buffer: &'a wgpu::Buffer) -> Self {
        WgpuTensor { buffer, offset: 0 }
    }

    pub fn at(buffer: &'a wgpu::Buffer, offset: u64) -> Self {
        WgpuTensor { buffer, offset }
    }

    /// Checks that the buffer can be bound as storage here and returns how many
    /// elements of `elem_bytes` it holds past the offset.
    pub(crate) fn checked_len(&self, arg: &str, elem_bytes: u64, limits: &wgpu::Limits) -> Result<usize> {
        let size = self.buffer.size();
        let fail = |c: String| Err(Error::invalid(arg, c));
        if !self.buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return fail("buffer lacks BufferUsages::STORAGE".into());
        }
        if !size.is_multiple_of(4) {
            return fail(format!("buffer size {size} is not a multiple of 4 bytes"));
        }
        if size > limits.max_storage_buffer_binding_size {
            return fail(format!(
                "buffer of {size} bytes exceeds this device's max_storage_buffer_binding_size {}",
                limits.max_storage_buffer_binding_size
            ));
        }
        let elems = size / elem_bytes;
        if self.offset > elems {
            return fail(format!("offset {} is past the end of a buffer of {elems} elements", self.offset));
        }
        // Kernels index 32-bit words with u32.
        if elems > u32::MAX as u64 {
            return fail("buffer holds more than 2^32 elements".into());
        }
        Ok((elems - self.offset) as usize)
    }
}

/// One buffer a launch binds, as [`check_distinct_buffers`] sees it: the
/// argument's name, its buffer, and whether the launch writes it.
pub(crate) type BoundBuffer<'a> = (&'a str, &'a wgpu::Buffer, bool);

/// Refuses a buffer a launch writes that is also bound as another of its
/// arguments, naming the written one. wgpu cannot bind one buffer read-only
/// and writable in a dispatch (a validation error that loses the whole
/// submission), and two writable bindings of one buffer pass validation but
/// clobber each other (an output in the workspace is silently overwritten).
/// Buffers, not byte ranges, are compared: bindings cover whole buffers.
pub(crate) fn check_distinct_buffers(args: &[BoundBuffer<'_>]) -> Result<()> {
    for (i, &(a, buf_a, writes_a)) in args.iter().enumerate() {
        for &(b, buf_b, writes_b) in &args[i + 1..] {
            if (writes_a || writes_b) && buf_a == buf_b {
                let (written, other) = if writes_a { (a, b) } else { (b, a) };
                return Err(Error::invalid(written, format!("shares its buffer with `{other}`")));
            }
        }
    }
    Ok(())
}

/// Scratch memory a caller allocates once and hands to every launch.
pub struct WgpuWorkspace {
    buffer: wgpu::Buffer,
}

impl WgpuWorkspace {
    pub fn new(backend: &WgpuBackend, bytes: usize) -> Self {
        let buffer = backend.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("frugal-attn workspace"),
            size: bytes.next_multiple_of(4).max(256) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        WgpuWorkspace { buffer }
    }

    pub fn bytes(&self) -> usize {
        self.buffer.size() as usize
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// The workspace as a written argument of [`check_distinct_buffers`].
    pub(crate) fn bound(&self) -> BoundBuffer<'_> {
        ("workspace", &self.buffer, true)
    }

    /// Checks that the workspace can be bound as storage on this device and returns its size in bytes.
    pub(crate) fn checked_bytes(&self, limits: &wgpu::Limits) -> Result<usize> {
        let max = limits.max_storage_buffer_binding_size;
        ensure(self.buffer.size() <= max, "workspace", || {
            format!("{} bytes exceed this device's max_storage_buffer_binding_size {max}", self.buffer.size())
        })?;
        Ok(self.bytes())
    }
}
