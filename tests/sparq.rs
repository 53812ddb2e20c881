mod common;

use frugal_attn::decode;
use frugal_attn::host::{rel_l2, HostData, Rng};
use frugal_attn::sparq::reference::{tau, top_r, SelectionTrace};
use frugal_attn::sparq::run::{cache_dump, reference, run, run_appending, trace, SparqInputs};
use frugal_attn::sparq::{GqaMode, SparqCacheShape, SparqConfig, SparqParams};
use frugal_attn::{Backend, DType, Error};

fn params(b: usize, hq: usize, hkv: usize, d: usize, cap: usize, cfg: SparqConfig) -> SparqParams {
    SparqParams::new(SparqCacheShape { batch: b, kv_heads: hkv, head_dim: d, capacity: cap }, hq, cfg)
}

fn cfg(r: usize, k: usize, gqa: GqaMode) -> SparqConfig {
    SparqConfig { gqa, ..SparqConfig::new(r, k) }
}

/// True when f32 arithmetic cannot change what the f64 reference selects: at
/// the top-r boundary of |q| and the top-k boundary of the keys, the values on
/// either side are either exactly equal (a tie, broken by index the same way
/// everywhere) or clearly apart.
fn well_conditioned(p: &SparqParams, x: &SparqInputs, traces: &[SelectionTrace]) -> bool {
    let apart = |v: &[f64], cut: usize| -> bool {
        if cut == 0 || cut >= v.len() {
            return true;
        }
        let mut s = v.to_vec();
        s.sort_by(|a, b| b.total_cmp(a));
        let scale = s.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
        let gap = s[cut - 1] - s[cut];
        gap == 0.0 || gap > 1e-4 * scale
    };
    let q = x.q.to_f64();
    let d = p.cache.head_dim;
    traces.iter().all(|t| {
        let mut abs_sum = vec![0.0; d];
        for &h in &t.heads {
            for (i, a) in abs_sum.iter_mut().enumerate() {
                *a += q[t.batch * p.q_strides[0] + h * p.q_strides[1] + i].abs();
            }
        }
        let len = x.seq_lens[t.batch] as usize;
        let (n, w) = p.config.selection(len);
        apart(&abs_sum, p.config.r) && apart(&t.keys[..len - w], n - w)
    })
}

/// Random inputs whose selection is well conditioned (reseeding until it is).
fn inputs(p: &SparqParams, dtype: DType, lens: &[u32], seed: u64) -> SparqInputs {
    for attempt in 0..50 {
        let x = SparqInputs::random(p, dtype, lens.to_vec(), &mut Rng::new(seed * 1000 + attempt));
        if well_conditioned(p, &x, &trace(p, &x).unwrap()) {
            return x;
        }
    }
    panic!("no well-conditioned input found for {p:?}");
}

fn check_inputs(backend: &Backend, p: &SparqParams, x: &SparqInputs) {
    let want = reference(p, x).unwrap();
    let got = run(backend, p, x).unwrap_or_else(|e| panic!("{backend:?}: {e}"));
    let err = rel_l2(&got, &want);
    let tol = x.dtype().tolerance();
    assert!(err <= tol, "{backend:?} {} {p:?} lens {:?}: rel L2 error {err:e} > {tol:e}", x.dtype(), x.seq_lens);
}

fn check(backend: &Backend, p: &SparqParams, dtype: DType, lens: &[u32], seed: u64) {
    check_inputs(backend, p, &inputs(p, dtype, lens, seed));
}

/// Shapes of DESIGN.md section 5 with k = 1, length 1, length < k, GQA 1/4/7, both modes, every dtype.
fn matches_reference(backend: &Backend) {
    let cases: [(SparqParams, &[u32]); 7] = [
        (params(1, 1, 1, 64, 1, cfg(8, 1, GqaMode::Shared)), &[1]),
        (params(2, 4, 1, 80, 7, cfg(10, 4, GqaMode::PerHead)), &[7, 3]),
        (params(1, 7, 1, 96, 1000, cfg(12, 1, GqaMode::Shared)), &[1000]),
        (params(2, 8, 2, 128, 4097, cfg(16, 256, GqaMode::Shared)), &[4097, 2000]),
        (params(2, 8, 2, 128, 4097, cfg(16, 256, GqaMode::PerHead)), &[4097, 100]),
        (params(1, 4, 4, 64, 300, cfg(64, 300, GqaMode::Shared)), &[300]),
        (params(3, 14, 2, 64, 1000, cfg(7, 100, GqaMode::PerHead)), &[999, 0, 64]),
    ];
    for (i, (p, lens)) in cases.iter().enumerate() {
        for dtype in DType::ALL {
            check(backend, p, dtype, lens, i as u64);
        }
    }
}

/// Window sizes, no reallocation to the mean, and GQA groups larger than one block's heads.
fn options(backend: &Backend) {
    let base = params(2, 12, 1, 64, 600, cfg(8, 64, GqaMode::Shared));
    let variants = [
        SparqConfig { local_window: Some(0), ..base.config },
        SparqConfig { local_window: Some(64), ..base.config },
        SparqConfig { local_window: Some(1000), ..base.config },
        SparqConfig { reallocate_to_mean: false, ..base.config },
        SparqConfig { gqa: GqaMode::PerHead, reallocate_to_mean: false, ..base.config },
    ];
    for (i, c) in variants.into_iter().enumerate() {
        check(backend, &SparqParams { config: c, ..base }, DType::F32, &[600, 333], 50 + i as u64);
    }
}

/// With k covering the sequence and no window, SparQ is dense attention (alpha = 1).
fn dense_when_k_covers(backend: &Backend) {
    for (gqa, r) in [(GqaMode::Shared, 5), (GqaMode::PerHead, 64)] {
        let c = SparqConfig { local_window: Some(0), ..cfg(r, 500, gqa) };
        let p = params(2, 8, 2, 64, 500, c);
        let x = SparqInputs::random(&p, DType::F32, vec![500, 123], &mut Rng::new(3));
        let got = run(backend, &p, &x).unwrap();
        let dp = decode::DecodeParams::new(p.decode_shape());
        let dx =
            decode::run::DecodeInputs { q: x.q.clone(), k: x.k.clone(), v: x.v.clone(), seq_lens: x.seq_lens.clone() };
        let want = decode::run::reference(&dp, &dx).unwrap();
        let err = rel_l2(&got, &want);
        assert!(err <= 1e-5, "{backend:?} {gqa}: SparQ with k >= S differs from dense decode by {err:e}");
    }
}

/// Duplicated K rows give exactly equal scores: the lower position must win, on every backend.
fn duplicated_rows(backend: &Backend) {
    for gqa in [GqaMode::Shared, GqaMode::PerHead] {
        let p = params(1, 4, 2, 64, 512, cfg(8, 40, gqa));
        let mut x = inputs(&p, DType::F32, &[512], 77);
        let mut k = x.k.to_f64();
        let d = 64;
        for row in 0..2 * 512 {
            if row % 3 != 0 {
                let src = (row - row % 3) * d;
                k.copy_within(src..src + d, row * d);
            }
        }
        x.k = HostData::from_f32(DType::F32, &k.iter().map(|&v| v as f32).collect::<Vec<_>>());
        let t = trace(&p, &x).unwrap();
        assert!(t.iter().any(|t| t.i2.iter().any(|&j| j % 3 == 0 && !t.i2.contains(&(j + 1)))), "no tie decided");
        assert!(well_conditioned(&p, &x, &t), "the duplicated input must only have exact ties at the boundary");
        check_inputs(backend, &p, &x);
    }
}

/// A cache built by appends equals one built by a bulk fill; the device cache holds K^T and the mean.
fn append_matches_fill(backend: &Backend) {
    let p = params(3, 8, 2, 64, 300, cfg(8, 32, GqaMode::Shared));
    for dtype in DType::ALL {
        let x = inputs(&p, dtype, &[300, 5, 129], 9);
        let want = reference(&p, &x).unwrap();
        let got = run_appending(backend, &p, &x, 5).unwrap_or_else(|e| panic!("{backend:?}: {e}"));
        let err = rel_l2(&got, &want);
        assert!(err <= dtype.tolerance(), "{backend:?} {dtype}: appended cache: rel L2 {err:e}");
        let Some(dump) = cache_dump(backend, &p, &x, 5).unwrap() else { continue };
        assert_eq!(dump.seq_lens, x.seq_lens, "{backend:?}: device lengths");
        let s = &p.cache;
        let (k, v) = (x.k.to_f64(), x.v.to_f64());
        for b in 0..s.batch {
            let len = x.seq_lens[b] as usize;
            for g in 0..s.kv_heads {
                let base = (b * s.kv_heads + g) * s.capacity * s.head_dim;
                for j in 0..len {
                    for i in 0..s.head_dim {
                        let want = k[base + j * s.head_dim + i];
                        assert_eq!(dump.k[base + j * s.head_dim + i], want, "{backend:?} K[{b},{g},{j},{i}]");
                        assert_eq!(dump.kt[base + i * s.capacity + j], want, "{backend:?} K^T[{b},{g},{i},{j}]");
                        assert_eq!(dump.v[base + j * s.head_dim + i], v[base + j * s.head_dim + i], "{backend:?} V");
                    }
                }
                for i in 0..s.head_dim {
                    let mean = (0..len).map(|j| v[base + j * s.head_dim + i]).sum::<f64>() / len.max(1) as f64;
                    let got = dump.mean[(b * s.kv_heads + g) * s.head_dim + i] as f64;
                    assert!((got - mean).abs() <= 1e-5, "{backend:?} mean[{b},{g},{i}] = {got}, want {mean}");
                }
            }
        }
    }
}

backend_tests!(matches_reference, options, dense_when_k_covers, duplicated_rows, append_matches_fill, bad_input);

#[test]
fn reference_invariants() {
    // r = D: tau = sqrt(D), exactly.
    let q: Vec<f64> = (0..96).map(|i| (i as f64 * 0.37).sin()).collect();
    let all: Vec<usize> = (0..96).collect();
    assert_eq!(tau(&q, &all), (96f64).sqrt());
    assert_eq!(top_r(&q.iter().map(|x| x.abs()).collect::<Vec<_>>(), 96), all);
    // Ties in top-r go to the lower index.
    assert_eq!(top_r(&[1.0, 3.0, 3.0, 2.0, 3.0], 2), vec![1, 2]);
    // A sequence shorter than k is read whole, alpha = 1; the window is forced in.
    let p = params(1, 2, 1, 32, 50, cfg(4, 64, GqaMode::Shared));
    let x = SparqInputs::random(&p, DType::F32, vec![40], &mut Rng::new(1));
    let t = trace(&p, &x).unwrap();
    assert_eq!(t[0].i2, (0..40).collect::<Vec<_>>());
    assert!(t[0].alpha.iter().all(|a| (a - 1.0).abs() < 1e-12));
    let p = params(1, 2, 1, 32, 500, cfg(4, 16, GqaMode::Shared));
    let x = SparqInputs::random(&p, DType::F32, vec![500], &mut Rng::new(2));
    let t = trace(&p, &x).unwrap();
    assert_eq!(t[0].i2.len(), 16);
    assert!((496..500).all(|j| t[0].i2.contains(&j)), "the last k/4 = 4 positions are always attended");
}

/// Calls the backend's own launcher (not the host helper) with a broken argument.
fn launch_with(
    backend: &Backend,
    p: &SparqParams,
    cache: SparqCacheShape,
    q: usize,
    o: usize,
    ws: usize,
) -> Result<(), Error> {
    use frugal_attn::backend::{CudaWorkspace, WgpuTensor, WgpuWorkspace};
    match backend {
        Backend::Cpu => {
            let x = SparqInputs {
                q: HostData::from_f32(DType::F32, &vec![0.5; q]),
                k: HostData::from_f32(DType::F32, &vec![0.5; cache.kv_len()]),
                v: HostData::from_f32(DType::F32, &vec![0.5; cache.kv_len()]),
                seq_lens: vec![1; cache.batch],
            };
            let p = SparqParams { cache, ..*p };
            let cache = frugal_attn::sparq::reference::HostCache {
                k: bytemuck::cast_slice(x.k.as_bytes()),
                v: bytemuck::cast_slice(x.v.as_bytes()),
                seq_lens: &x.seq_lens,
            };
            let q: &[f32] = bytemuck::cast_slice(x.q.as_bytes());
            frugal_attn::sparq::reference::sparq_into(&p, q, &cache, &mut vec![0f32; o])
        }
        Backend::Wgpu(w) => {
            let _gate = w.exclusive();
            let cache = frugal_attn::sparq::wgpu::SparqCache::new(w, cache, DType::F32)?;
            let (qb, ob) = (w.upload(&vec![0u8; q * 4]), w.upload(&vec![0u8; o * 4]));
            let wsb = WgpuWorkspace::new(w, ws);
            let mut enc = w.device().create_command_encoder(&Default::default());
            frugal_attn::sparq::wgpu::sparq(w, &mut enc, p, &cache, WgpuTensor::new(&qb), WgpuTensor::new(&ob), &wsb)
        }
        Backend::Cuda(c) => {
            let st = c.stream();
            let cache = frugal_attn::sparq::cuda::SparqCache::<f32>::new(st, cache)?;
            let qb = st.alloc_zeros::<f32>(q.max(1)).unwrap();
            let mut ob = st.alloc_zeros::<f32>(o.max(1)).unwrap();
            let mut wsb = CudaWorkspace::new(st, ws)?;
            frugal_attn::sparq::cuda::sparq(c, st, p, &cache, &qb, &mut ob, &mut wsb)
        }
    }
}

/// Every argument, broken one at a time, gives an `Err` naming it.
fn bad_input(backend: &Backend) {
    let p = params(2, 8, 2, 64, 300, cfg(8, 32, GqaMode::Shared));
    let (q, o, ws) = (p.q_len(), p.o_len(), p.workspace_bytes());
    launch_with(backend, &p, p.cache, q, o, ws).unwrap_or_else(|e| panic!("{backend:?}: exact sizes rejected: {e}"));
    let with = |c: SparqConfig| SparqParams { config: c, ..p };
    let cases: [(SparqParams, &str); 6] = [
        (with(cfg(0, 32, GqaMode::Shared)), "r"),
        (with(cfg(65, 32, GqaMode::Shared)), "r"),
        (with(cfg(8, 0, GqaMode::PerHead)), "k"),
        (SparqParams { q_heads: 7, ..p }, "q_heads"),
        (SparqParams { cache: SparqCacheShape { batch: 0, ..p.cache }, ..p }, "batch"),
        (SparqParams { o_strides: [512, 32], ..p }, "o_strides"),
    ];
    for (bp, arg) in cases {
        let e = launch_with(backend, &bp, bp.cache, q, o, ws).expect_err(arg);
        assert_eq!(e.argument(), Some(arg), "{backend:?}: {e}");
    }
    let e = launch_with(backend, &p, p.cache, q - 1, o, ws).expect_err("q");
    assert_eq!(e.argument(), Some("q"), "{backend:?}: {e}");
    let e = launch_with(backend, &p, p.cache, q, o - 1, ws).expect_err("out");
    assert_eq!(e.argument(), Some("out"), "{backend:?}: {e}");
    if !matches!(backend, Backend::Cpu) {
        let e = launch_with(backend, &p, p.cache, q, o, ws - 1024).expect_err("workspace");
        assert_eq!(e.argument(), Some("workspace"), "{backend:?}: {e}");
        let other = SparqCacheShape { capacity: 200, ..p.cache };
        let e = launch_with(backend, &p, other, q, o, ws).expect_err("cache");
        assert_eq!(e.argument(), Some("cache"), "{backend:?}: {e}");
    }
    // Appending to a full sequence, filling past the capacity.
    let full = SparqInputs::random(&p, DType::F32, vec![300, 10], &mut Rng::new(4));
    if !matches!(backend, Backend::Cpu) {
        let e = appended_past_capacity(backend, &p, &full).expect_err("cache");
        assert_eq!(e.argument(), Some("cache"), "{backend:?}: {e}");
    }
    let over = SparqInputs { seq_lens: vec![301, 10], ..full };
    let e = run(backend, &p, &over).expect_err("seq_lens");
    assert_eq!(e.argument(), Some("seq_lens"), "{backend:?}: {e}");
}

/// A written argument (`out`, the workspace, the cache when filled or
/// appended to) sharing its wgpu buffer with another is refused, naming it;
/// on CUDA, `out` overlapping `q` in device memory. The CPU launchers take
/// what they write by `&mut`, so safe Rust rules the aliasing out there; on
/// CUDA an engine's own allocations can alias.
fn aliasing(backend: &Backend) {
    use frugal_attn::backend::{WgpuTensor, WgpuWorkspace};
    use frugal_attn::sparq::wgpu::{sparq, SparqCache};
    if let Backend::Cuda(c) = backend {
        let st = c.stream();
        let p = params(1, 2, 1, 16, 64, cfg(4, 8, GqaMode::Shared));
        let cache = frugal_attn::sparq::cuda::SparqCache::<f32>::new(st, p.cache).unwrap();
        let mut ws = frugal_attn::backend::CudaWorkspace::new(st, p.workspace_bytes()).unwrap();
        let arena = st.alloc_zeros::<f32>(1024).unwrap();
        // Element offsets into one allocation of q and out.
        let mut step = |q: usize, o: usize| {
            let q = common::CudaAlias::<f32>::of(st, &arena, 4 * q, p.q_len());
            let mut o = common::CudaAlias::<f32>::of(st, &arena, 4 * o, p.o_len());
            frugal_attn::sparq::cuda::sparq(c, st, &p, &cache, &*q, &mut *o, &mut ws)
        };
        // q 0..32, out 32..64: adjacent, not overlapping.
        step(0, 32).unwrap_or_else(|e| panic!("disjoint ranges of one allocation rejected: {e}"));
        common::assert_refused(step(0, 16), "out", "out overlaps q");
        common::assert_refused(step(31, 0), "out", "q overlaps out");
        st.synchronize().unwrap();
        return;
    }
    let Backend::Wgpu(w) = backend else { return };
    let _gate = w.exclusive();
    let p = params(1, 2, 1, 16, 64, cfg(4, 8, GqaMode::Shared));
    let mut cache = SparqCache::new(w, p.cache, DType::F32).unwrap();
    let (q, o, kv) = (w.upload(&[0u8; 4096]), w.upload(&[0u8; 4096]), w.upload(&[0u8; 4096]));
    let ws = WgpuWorkspace::new(w, p.workspace_bytes());
    let mut enc = w.device().create_command_encoder(&Default::default());
    fn t(buffer: &wgpu::Buffer) -> WgpuTensor<'_> {
        WgpuTensor::new(buffer)
    }
    let strides = [64 * 16, 64 * 16, 16];
    let cache_k = cache.buffers()[0].clone();
    let fill = |cache: &mut SparqCache, enc: &mut wgpu::CommandEncoder, k: &wgpu::Buffer| {
        cache.fill(w, enc, t(k), strides, t(&kv), strides, &[1])
    };
    fill(&mut cache, &mut enc, &kv).unwrap_or_else(|e| panic!("fill from distinct buffers rejected: {e}"));
    common::assert_refused(fill(&mut cache, &mut enc, &cache_k), "cache", "fill with k = the cache's K");
    common::assert_refused(
        cache.append(w, &mut enc, t(&cache_k), t(&kv)),
        "cache",
        "append with k_new = the cache's K",
    );
    let step =
        |enc: &mut wgpu::CommandEncoder, q: &wgpu::Buffer, o: &wgpu::Buffer| sparq(w, enc, &p, &cache, t(q), t(o), &ws);
    step(&mut enc, &q, &o).unwrap_or_else(|e| panic!("a step on distinct buffers rejected: {e}"));
    common::assert_refused(step(&mut enc, &q, &q), "out", "out = q");
    common::assert_refused(step(&mut enc, &q, &cache_k), "out", "out = the cache's K");
    common::assert_refused(step(&mut enc, ws.buffer(), &o), "workspace", "q = workspace");
    common::assert_refused(step(&mut enc, &q, ws.buffer()), "out", "out = workspace");
}

backend_tests!(aliasing);

/// Fills sequence 0 to the capacity, then appends one more token.
fn appended_past_capacity(backend: &Backend, p: &SparqParams, x: &SparqInputs) -> Result<(), Error> {
    use frugal_attn::backend::WgpuTensor;
    let s = p.cache;
    let zeros = vec![0f32; s.mean_len()];
    match backend {
        Backend::Wgpu(w) => {
            let _gate = w.exclusive();
            let mut cache = frugal_attn::sparq::wgpu::SparqCache::new(w, s, DType::F32)?;
            let (k, v) = (w.upload(x.k.as_bytes()), w.upload(x.v.as_bytes()));
            let t = w.upload(bytemuck::cast_slice(&zeros));
            let strides = [s.kv_heads * s.capacity * s.head_dim, s.capacity * s.head_dim, s.head_dim];
            let mut enc = w.device().create_command_encoder(&Default::default());
            cache.fill(w, &mut enc, WgpuTensor::new(&k), strides, WgpuTensor::new(&v), strides, &x.seq_lens)?;
            cache.append(w, &mut enc, WgpuTensor::new(&t), WgpuTensor::new(&t))?;
            Ok(())
        }
        Backend::Cuda(c) => {
            let st = c.stream();
            let mut cache = frugal_attn::sparq::cuda::SparqCache::<f32>::new(st, s)?;
            let k = st.clone_htod(&x.k.to_f64().iter().map(|&v| v as f32).collect::<Vec<_>>()).unwrap();
            let v = st.clone_htod(&x.v.to_f64().iter().map(|&v| v as f32).collect::<Vec<_>>()).unwrap();
            let t = st.clone_htod(&zeros).unwrap();
            let strides = [s.kv_heads * s.capacity * s.head_dim, s.capacity * s.head_dim, s.head_dim];
            cache.fill(c, st, &k, strides, &v, strides, &x.seq_lens)?;
            cache.append(c, st, &t, &t)?;
            Ok(())
        }
        Backend::Cpu => Ok(()),
    }
}
