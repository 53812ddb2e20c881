//! WGSL launchers for SparQ attention (`kernels-wgsl/sparq.wgsl`): the cache
//! (bulk fill, one-token append) and one decode step in four launches
//! (scores, select, gather, merge) sharing one workspace.

use super::{validate_append, validate_fill, GqaMode, SparqCacheShape, SparqParams};
use crate::backend::wgpu::{
    check_distinct_buffers, index_u32, BoundBuffer, Dispatch, WgpuBackend, WgpuTensor, WgpuWorkspace, WgslFile,
};
use crate::dtype::DType;
use crate::error::{ensure, Result};

const KERNELS: WgslFile = WgslFile { name: "sparq.wgsl", source: include_str!("../../kernels-wgsl/sparq.wgsl") };
/// Threads per workgroup of every entry point but `sparq_merge`.
const WG: usize = 256;
/// Head dims per workgroup of `sparq_fill_mean`.
const FILL_DIMS: usize = 64;

/// Mirrors `struct Params` of sparq.wgsl (one struct for every entry point).
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    q_off: u32,
    o_off: u32,
    q_sb: u32,
    q_sh: u32,
    o_sb: u32,
    o_sh: u32,
    batch: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    capacity: u32,
    groups: u32,
    r: u32,
    k: u32,
    window: u32,
    realloc: u32,
    gqa_shared: u32,
    score_chunk: u32,
    score_splits: u32,
    gather_chunk: u32,
    gather_splits: u32,
    k_cap: u32,
    hpb: u32,
    head_chunks: u32,
    logits_off: u32,
    norm_off: u32,
    lse_off: u32,
    keys_off: u32,
    idx_off: u32,
    part_off: u32,
    scale: f32,
    src_off: u32,
    src_sb: u32,
    src_sh: u32,
    src_ss: u32,
    src2_off: u32,
}

/// A SparQ cache on a wgpu device: K, K^T and V in `dtype` (packed into u32
/// words), the mean of V in f32 and the lengths in u32, plus the host copy of
/// the lengths.
pub struct SparqCache {
    shape: SparqCacheShape,
    dtype: DType,
    k: wgpu::Buffer,
    kt: wgpu::Buffer,
    v: wgpu::Buffer,
    mean: wgpu::Buffer,
    lens: wgpu::Buffer,
    host_lens: Vec<u32>,
}

impl std::fmt::Debug for SparqCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparqCache")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("seq_lens", &self.host_lens)
            .finish()
    }
}

impl SparqCache {
    /// Empty cache (all lengths 0). Buffers STORAGE | COPY_SRC | COPY_DST.
    pub fn new(backend: &WgpuBackend, shape: SparqCacheShape, dtype: DType) -> Result<Self> {
        shape.validate()?;
        let limits = backend.limits();
        let kv_len = shape.kv_len();
        // Element indices stay below 2^31, so index arithmetic in the kernels never wraps.
        ensure(kv_len <= i32::MAX as usize, "capacity", || {
            format!("{kv_len} elements per K/V copy exceed the kernels' 32-bit indices")
        })?;
        let kv_bytes = (kv_len * dtype.size()).next_multiple_of(4) as u64;
        let max = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        ensure(kv_bytes <= max, "capacity", || {
            format!("a K/V copy of {kv_bytes} bytes exceeds this device's largest storage binding ({max} bytes)")
        })?;
        let device = backend.device();
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        // New buffers are zeroed: lengths 0, mean 0.
        let buffer = |label: &str, size: u64| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: size.max(4),
                usage,
                mapped_at_creation: false,
            })
        };
        Ok(SparqCache {
            shape,
            dtype,
            k: buffer("sparq k", kv_bytes),
            kt: buffer("sparq kt", kv_bytes),
            v: buffer("sparq v", kv_bytes),
            mean: buffer("sparq mean", 4 * shape.mean_len() as u64),
            lens: buffer("sparq lens", 4 * shape.batch as u64),
            host_lens: vec![0; shape.batch],
        })
    }

    pub fn shape(&self) -> &SparqCacheShape {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Host copy of the lengths (the cache is their only writer, so it is exact).
    pub fn seq_lens(&self) -> &[u32] {
        &self.host_lens
    }

    /// Buffers, for tests that read the cache back: (k, kt, v, mean, lens).
    pub fn buffers(&self) -> [&wgpu::Buffer; 5] {
        [&self.k, &self.kt, &self.v, &self.mean, &self.lens]
    }

    /// The cache's buffers as arguments of [`check_distinct_buffers`], all named `cache`.
    fn bound(&self, written: bool) -> [BoundBuffer<'_>; 5] {
        self.buffers().map(|b| ("cache", b, written))
    }

    fn base_params(&self) -> Params {
        let s = &self.shape;
        Params {
            batch: s.batch as u32,
            kv_heads: s.kv_heads as u32,
            head_dim: s.head_dim as u32,
            capacity: s.capacity as u32,
            ..Params::default()
        }
    }

    /// Bulk fill from an engine's K/V: `k[b, g, j, :]` at
    /// `k.offset + b*k_strides[0] + g*k_strides[1] + j*k_strides[2]` (elements of
    /// the cache's dtype), same for `v`; sets the lengths to `seq_lens` and rewrites K, K^T, V for `j < len` and
    /// the mean of V (f32, over the `len` rows; 0 for `len` 0). Recorded into
    /// `encoder`: the lengths reach the device through a small buffer copied
    /// inside the encoder, so ordering with other recorded work holds.
    #[allow(clippy::too_many_arguments)]
    pub fn fill(
        &mut self,
        backend: &WgpuBackend,
        encoder: &mut wgpu::CommandEncoder,
        k: WgpuTensor<'_>,
        k_strides: [usize; 3],
        v: WgpuTensor<'_>,
        v_strides: [usize; 3],
        seq_lens: &[u32],
    ) -> Result<()> {
        let limits = backend.limits();
        let es = self.dtype.size() as u64;
        let k_len = k.checked_len("k", es, limits)?;
        let v_len = v.checked_len("v", es, limits)?;
        let s = self.shape;
        validate_fill(&s, (k_len, k_strides), (v_len, v_strides), seq_lens)?;
        check_distinct_buffers(
            &[[("k", k.buffer, false), ("v", v.buffer, false)].as_slice(), &self.bound(true)].concat(),
        )?;
        backend.check_workgroups(&[("kv_heads", s.kv_heads), ("batch", s.batch)])?;
        let longest = seq_lens.iter().copied().max().unwrap_or(0) as usize;
        let extent = |st: &[usize; 3]| {
            crate::decode::extent(&[(s.batch, st[0]), (s.kv_heads, st[1]), (longest.max(1), st[2])], s.head_dim)
        };
        let mut pk = self.base_params();
        pk.src_off = index_u32(k.offset as usize, "k")?;
        index_u32(k.offset as usize + extent(&k_strides), "k")?;
        pk.src_sb = index_u32(k_strides[0], "k_strides")?;
        pk.src_sh = index_u32(k_strides[1], "k_strides")?;
        pk.src_ss = index_u32(k_strides[2], "k_strides")?;
        let mut pv = self.base_params();
        pv.src_off = index_u32(v.offset as usize, "v")?;
        index_u32(v.offset as usize + extent(&v_strides), "v")?;
        pv.src_sb = index_u32(v_strides[0], "v_strides")?;
        pv.src_sh = index_u32(v_strides[1], "v_strides")?;
        pv.src_ss = index_u32(v_strides[2], "v_strides")?;

        let max_dim = limits.max_compute_workgroups_per_dimension as usize;
        let d = s.head_dim;
        // Grid-stride loops: enough workgroups for the longest sequence, at most the device's limit.
        let per_block = |words: usize| words.div_ceil(WG).clamp(1, max_dim) as u32;
        let row_words = if self.dtype == DType::F32 { longest * d } else { (longest * d).div_ceil(2) + 1 };
        let t_words = d * if self.dtype == DType::F32 { longest } else { (longest + 3) / 2 };

        let uk = backend.uniform(&pk);
        let uv = backend.uniform(&pv);
        let rows_k = [(0, &uk), (6, &self.lens), (9, k.buffer), (11, &self.k)];
        let rows_v = [(0, &uv), (6, &self.lens), (9, v.buffer), (11, &self.v)];
        let trans_k = [(0, &uk), (6, &self.lens), (9, k.buffer), (11, &self.kt)];
        let mean_v = [(0, &uv), (6, &self.lens), (9, v.buffer), (12, &self.mean)];
        let (y, z) = (s.kv_heads as u32, s.batch as u32);
        let mut dispatches = Vec::new();
        if longest > 0 {
            let rows = |bindings| Dispatch { entry: "sparq_fill_rows", bindings, groups: (per_block(row_words), y, z) };
            dispatches.push(rows(&rows_k));
            dispatches.push(rows(&rows_v));
            dispatches.push(Dispatch { entry: "sparq_fill_t", bindings: &trans_k, groups: (per_block(t_words), y, z) });
        }
        let mean_groups = (d.div_ceil(FILL_DIMS) as u32, y, z);
        dispatches.push(Dispatch { entry: "sparq_fill_mean", bindings: &mean_v, groups: mean_groups });

        // Pipelines first, so that an Err records nothing: the lengths' copy must precede the pass.
        for d in &dispatches {
            backend.pipeline(KERNELS.name, KERNELS.source, d.entry, self.dtype)?;
        }
        let staged = backend.upload(bytemuck::cast_slice(seq_lens));
        encoder.copy_buffer_to_buffer(&staged, 0, &self.lens, 0, 4 * s.batch as u64);
        backend.record_pass(encoder, "sparq_fill", KERNELS, self.dtype, &dispatches)?;
        self.host_lens = seq_lens.to_vec();
        Ok(())
    }

    /// Appends one token to every sequence: `k_new` / `v_new` are `[batch,
    /// kv_heads, head_dim]` contiguous; writes position `len[b]` of K, K^T, V,
    /// updates the running mean (`mean += (v - mean) / (len + 1)`) and increments
    /// the device lengths (one workgroup per sequence, in the same launch) and the
    /// host copy. `Err` (arg `cache`) if any sequence is full.
    pub fn append(
        &mut self,
        backend: &WgpuBackend,
        encoder: &mut wgpu::CommandEncoder,
        k_new: WgpuTensor<'_>,
        v_new: WgpuTensor<'_>,
    ) -> Result<()> {
        let limits = backend.limits();
        let es = self.dtype.size() as u64;
        let k_len = k_new.checked_len("k_new", es, limits)?;
        let v_len = v_new.checked_len("v_new", es, limits)?;
        validate_append(&self.shape, &self.host_lens, k_len, v_len)?;
        let new = [("k_new", k_new.buffer, false), ("v_new", v_new.buffer, false)];
        check_distinct_buffers(&[new.as_slice(), &self.bound(true)].concat())?;
        backend.check_workgroups(&[("batch", self.shape.batch)])?;
        let need = self.shape.mean_len();
        let mut p = self.base_params();
        p.src_off = index_u32(k_new.offset as usize, "k_new")?;
        p.src2_off = index_u32(v_new.offset as usize, "v_new")?;
        index_u32(k_new.offset as usize + need, "k_new")?;
        index_u32(v_new.offset as usize + need, "v_new")?;
        let uniform = backend.uniform(&p);
        let bindings = [
            (0, &uniform),
            (9, k_new.buffer),
            (10, v_new.buffer),
            (12, &self.mean),
            (13, &self.lens),
            (14, &self.k),
            (15, &self.kt),
            (16, &self.v),
        ];
        let groups = (self.shape.batch as u32, 1, 1);
        backend.record_pass(
            encoder,
            "sparq_append",
            KERNELS,
            self.dtype,
            &[Dispatch { entry: "sparq_append", bindings: &bindings, groups }],
        )?;
        for l in &mut self.host_lens {
            *l += 1;
        }
        Ok(())
    }
}

/// One SparQ decode step recorded into `encoder`: `q` `[batch, q_heads,
/// head_dim]` with `params.q_strides` at `q.offset`, `out` (the cache's dtype)
/// with `params.o_strides`. Nothing is submitted or waited for; `workspace`
/// must stay untouched until the work has run.
pub fn sparq(
    backend: &WgpuBackend,
    encoder: &mut wgpu::CommandEncoder,
    params: &SparqParams,
    cache: &SparqCache,
    q: WgpuTensor<'_>,
    out: WgpuTensor<'_>,
    workspace: &WgpuWorkspace,
) -> Result<()> {
    let limits = backend.limits();
    let dtype = cache.dtype;
    let es = dtype.size() as u64;
    let q_len = q.checked_len("q", es, limits)?;
    let o_len = out.checked_len("out", es, limits)?;
    params.validate_step(&cache.shape, q_len, o_len, workspace.checked_bytes(limits)?)?;
    let args = [("q", q.buffer, false), ("out", out.buffer, true), workspace.bound()];
    check_distinct_buffers(&[args.as_slice(), &cache.bound(false)].concat())?;

    let plan = params.plan();
    let s = &params.cache;
    let cfg = &params.config;
    let groups_y = s.kv_heads * plan.head_chunks;
    let select_x = if cfg.gqa == GqaMode::Shared { s.kv_heads } else { params.q_heads };
    backend.check_workgroups(&[
        ("capacity", plan.score_splits),
        ("k", plan.gather_splits),
        ("kv_heads", groups_y),
        ("q_heads", params.q_heads),
        ("q_heads", select_x),
        ("batch", s.batch),
    ])?;
    index_u32(plan.words, "workspace")?;
    index_u32(q.offset as usize + params.q_len(), "q")?;
    index_u32(out.offset as usize + params.o_len(), "out")?;

    let p = Params {
        q_off: index_u32(q.offset as usize, "q")?,
        o_off: index_u32(out.offset as usize, "out")?,
        q_sb: index_u32(params.q_strides[0], "q_strides")?,
        q_sh: index_u32(params.q_strides[1], "q_strides")?,
        o_sb: index_u32(params.o_strides[0], "o_strides")?,
        o_sh: index_u32(params.o_strides[1], "o_strides")?,
        batch: s.batch as u32,
        q_heads: params.q_heads as u32,
        kv_heads: s.kv_heads as u32,
        head_dim: s.head_dim as u32,
        capacity: s.capacity as u32,
        groups: params.groups() as u32,
        r: cfg.r as u32,
        k: cfg.k as u32,
        // Only min(window, k) matters.
        window: cfg.local_window().min(cfg.k) as u32,
        realloc: cfg.reallocate_to_mean as u32,
        gqa_shared: (cfg.gqa == GqaMode::Shared) as u32,
        score_chunk: plan.score_chunk as u32,
        score_splits: plan.score_splits as u32,
        gather_chunk: plan.gather_chunk as u32,
        gather_splits: plan.gather_splits as u32,
        k_cap: plan.k_cap as u32,
        hpb: plan.heads_per_block as u32,
        head_chunks: plan.head_chunks as u32,
        logits_off: plan.logits as u32,
        norm_off: plan.norm as u32,
        lse_off: plan.lse as u32,
        keys_off: plan.keys as u32,
        idx_off: plan.indices as u32,
        part_off: plan.partials as u32,
        scale: 1.0 / (s.head_dim as f32).sqrt(),
        ..Params::default()
    };

    let uniform = backend.uniform(&p);
    let ws = workspace.buffer();
    let scores = [(0, &uniform), (1, q.buffer), (2, &cache.kt), (6, &cache.lens), (7, ws)];
    let select = [(0, &uniform), (6, &cache.lens), (7, ws)];
    let gather = [(0, &uniform), (1, q.buffer), (3, &cache.k), (4, &cache.v), (6, &cache.lens), (7, ws)];
    let merge = [(0, &uniform), (5, &cache.mean), (6, &cache.lens), (7, ws), (8, out.buffer)];
    let (b, y) = (s.batch as u32, groups_y as u32);
    backend.record_pass(
        encoder,
        "sparq",
        KERNELS,
        dtype,
        &[
            Dispatch { entry: "sparq_scores", bindings: &scores, groups: (plan.score_splits as u32, y, b) },
            Dispatch { entry: "sparq_select", bindings: &select, groups: (select_x as u32, b, 1) },
            Dispatch { entry: "sparq_gather", bindings: &gather, groups: (plan.gather_splits as u32, y, b) },
            Dispatch { entry: "sparq_merge", bindings: &merge, groups: (params.q_heads as u32, b, 1) },
        ],
    )
}
