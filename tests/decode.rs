mod common;

use frugal_attn::decode::run::{reference, run, DecodeInputs};
use frugal_attn::decode::{DecodeLayout, DecodeParams, DecodeShape};
use frugal_attn::host::{rel_l2, Rng};
use frugal_attn::{Backend, DType, Error};

fn shape(batch: usize, q_heads: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> DecodeShape {
    DecodeShape { batch, q_heads, kv_heads, head_dim, capacity }
}

/// Runs `params` with random inputs on `backend` and checks it against the f64 reference.
fn check(backend: &Backend, params: &DecodeParams, dtype: DType, seq_lens: Vec<u32>, seed: u64) {
    let mut rng = Rng::new(seed);
    let x = DecodeInputs::random(params, dtype, seq_lens, &mut rng);
    let want = reference(params, &x).unwrap();
    let got = run(backend, params, &x).unwrap_or_else(|e| panic!("{backend:?}: {e}"));
    let err = rel_l2(&got, &want);
    assert!(
        err <= dtype.tolerance(),
        "{backend:?} {dtype} {:?} lens {:?}: rel L2 error {err:e} > {:e}",
        params.shape,
        x.seq_lens,
        dtype.tolerance()
    );
}

fn full(n: usize, len: usize) -> Vec<u32> {
    vec![len as u32; n]
}

/// DESIGN.md section 5 shapes: S in {1, 7, 1000, 4097}, GQA 1/4/7, D in {64, 80, 96, 128}, every dtype.
fn matches_reference(backend: &Backend) {
    let cases = [
        (shape(1, 1, 1, 64, 1), 1),
        (shape(2, 4, 1, 80, 7), 7),
        (shape(1, 7, 1, 96, 1000), 1000),
        (shape(1, 8, 2, 128, 4097), 4097),
        (shape(3, 14, 2, 64, 1000), 999),
    ];
    for (i, (s, len)) in cases.into_iter().enumerate() {
        for dtype in DType::ALL {
            check(backend, &DecodeParams::new(s), dtype, full(s.batch, len), i as u64);
        }
    }
}

/// Different lengths in one launch, including empty and full sequences.
fn ragged_batch(backend: &Backend) {
    let s = shape(5, 8, 2, 64, 1500);
    for dtype in DType::ALL {
        check(backend, &DecodeParams::new(s), dtype, vec![1500, 0, 1, 257, 1023], 11);
    }
}

/// Token-major caches, padded strides, and a transposed output.
fn strided_layouts(backend: &Backend) {
    let s = shape(2, 6, 3, 96, 300);
    let bshd = DecodeParams::new(s).with_layout(DecodeLayout::bshd(&s));
    let padded = DecodeParams::new(s).with_layout(DecodeLayout {
        q: [6 * 100 + 3, 100],
        k: [3 * 301 * 97 + 5, 301 * 97, 97],
        v: [3 * 300 * 128, 300 * 128, 128],
        o: [96, 2 * 96 + 7], // [H, B, D] with a gap between heads
    });
    for dtype in DType::ALL {
        check(backend, &bshd, dtype, vec![300, 123], 21);
        check(backend, &padded, dtype, vec![17, 300], 22);
    }
}

/// Odd head dims (scalar paths), large GQA groups (several head chunks), D = 256.
fn odd_shapes(backend: &Backend) {
    let cases = [shape(1, 12, 1, 33, 70), shape(2, 18, 2, 256, 600), shape(1, 16, 1, 130, 513), shape(1, 3, 3, 1, 9)];
    for (i, s) in cases.into_iter().enumerate() {
        for dtype in DType::ALL {
            check(backend, &DecodeParams::new(s), dtype, full(s.batch, s.capacity - i), 30 + i as u64);
        }
    }
}

/// Many splits, lengths that end mid-chunk, and a custom scale.
fn long_split(backend: &Backend) {
    let s = shape(2, 4, 4, 64, 20000);
    let p = DecodeParams::new(s).with_scale(0.3);
    assert!(p.plan().num_splits > 8, "{:?}", p.plan());
    check(backend, &p, DType::F16, vec![19999, 4100], 41);
    check(backend, &p, DType::F32, vec![257, 20000], 42);
}

/// A length past the capacity gives NaN rows for that sequence only; zero length gives zeros.
fn documented_edges(backend: &Backend) {
    let s = shape(3, 2, 1, 64, 50);
    let p = DecodeParams::new(s);
    let mut rng = Rng::new(5);
    let x = DecodeInputs::random(&p, DType::F32, vec![51, 0, 50], &mut rng);
    let got = run(backend, &p, &x).unwrap();
    let want = reference(&p, &x).unwrap();
    let row = 2 * 64;
    assert!(got[..row].iter().all(|v| v.is_nan()), "{backend:?}: overlong sequence must give NaN");
    assert!(got[row..2 * row].iter().all(|&v| v == 0.0), "{backend:?}: empty sequence must give zeros");
    assert!(rel_l2(&got[2 * row..], &want[2 * row..]) <= 1e-5);
}

backend_tests!(matches_reference, ragged_batch, strided_layouts, odd_shapes, long_split, documented_edges);

/// Buffer lengths handed to a launcher: elements of q, k, v, seq_lens, out, and workspace bytes.
#[derive(Clone, Copy)]
struct Lens {
    q: usize,
    k: usize,
    v: usize,
    seq: usize,
    o: usize,
    ws: usize,
}

impl Lens {
    fn exact(p: &DecodeParams) -> Self {
        Lens { q: p.q_len(), k: p.k_len(), v: p.v_len(), seq: p.shape.batch, o: p.o_len(), ws: p.workspace_bytes() }
    }
}

/// Calls the backend's own launcher (not the host helper) on f32 buffers of the given lengths.
fn launch_with(backend: &Backend, p: &DecodeParams, n: Lens) -> Result<(), Error> {
    use frugal_attn::backend::{CudaWorkspace, WgpuTensor, WgpuWorkspace};
    let lens = vec![1u32; n.seq];
    match backend {
        Backend::Cpu => {
            let (q, k, v, mut o) = (vec![0.5f32; n.q], vec![0.5; n.k], vec![0.5; n.v], vec![0.0; n.o]);
            frugal_attn::decode::reference::decode_into(p, &q, &k, &v, &lens, &mut o)
        }
        Backend::Wgpu(w) => {
            let _gate = w.exclusive();
            let buf = |elems: usize| w.upload(&vec![0u8; elems * 4]);
            let (q, k, v, o) = (buf(n.q), buf(n.k), buf(n.v), buf(n.o));
            let s = w.upload(bytemuck::cast_slice(&lens));
            let ws = WgpuWorkspace::new(w, n.ws);
            let mut enc = w.device().create_command_encoder(&Default::default());
            let t = WgpuTensor::new;
            // WgpuWorkspace rounds tiny sizes up; a short workspace needs a real shortfall.
            frugal_attn::decode::wgpu::decode(w, &mut enc, p, DType::F32, t(&q), t(&k), t(&v), t(&s), t(&o), &ws)
        }
        Backend::Cuda(c) => {
            let st = c.stream();
            let z = |elems: usize| st.alloc_zeros::<f32>(elems.max(1)).unwrap();
            let (q, k, v, mut o) = (z(n.q), z(n.k), z(n.v), z(n.o));
            let s = st.clone_htod(&lens).unwrap();
            let mut ws = CudaWorkspace::new(st, n.ws)?;
            frugal_attn::decode::cuda::decode(c, st, p, &q, &k, &v, &s, &mut o, &mut ws)
        }
    }
}

fn expect_err(backend: &Backend, p: &DecodeParams, n: Lens, arg: &str) {
    match launch_with(backend, p, n) {
        Err(e) => assert_eq!(e.argument(), Some(arg), "{backend:?}: expected an error naming `{arg}`, got: {e}"),
        Ok(()) => panic!("{backend:?}: expected an error naming `{arg}`, the launch was accepted"),
    }
}

/// Every argument, broken one at a time, gives an `Err` naming it.
fn bad_input(backend: &Backend) {
    let good = shape(2, 8, 2, 64, 600);
    let p = DecodeParams::new(good);
    launch_with(backend, &p, Lens::exact(&p)).unwrap_or_else(|e| panic!("{backend:?}: exact sizes rejected: {e}"));

    let bad_shapes: [(DecodeShape, &str); 7] = [
        (DecodeShape { batch: 0, ..good }, "batch"),
        (DecodeShape { kv_heads: 0, ..good }, "kv_heads"),
        (DecodeShape { q_heads: 7, ..good }, "q_heads"),
        (DecodeShape { head_dim: 0, ..good }, "head_dim"),
        (DecodeShape { head_dim: 257, ..good }, "head_dim"),
        (DecodeShape { capacity: 0, ..good }, "capacity"),
        (DecodeShape { batch: 70000, ..good }, "batch"),
    ];
    for (s, arg) in bad_shapes {
        let bp = DecodeParams::new(s);
        expect_err(backend, &bp, Lens { seq: s.batch.min(4), ..Lens::exact(&p) }, arg);
    }
    expect_err(backend, &p.with_scale(f32::NAN), Lens::exact(&p), "scale");
    let overlapping = p.with_layout(DecodeLayout { o: [8 * 64, 32], ..p.layout });
    expect_err(backend, &overlapping, Lens::exact(&p), "o_strides");

    let n = Lens::exact(&p);
    expect_err(backend, &p, Lens { q: n.q - 1, ..n }, "q");
    expect_err(backend, &p, Lens { k: n.k - 1, ..n }, "k_cache");
    expect_err(backend, &p, Lens { v: n.v - 1, ..n }, "v_cache");
    expect_err(backend, &p, Lens { seq: 1, ..n }, "seq_lens");
    expect_err(backend, &p, Lens { o: n.o - 1, ..n }, "out");
    if !matches!(backend, Backend::Cpu) {
        assert!(n.ws > 1024, "the workspace case needs a workspace larger than the rounding");
        expect_err(backend, &p, Lens { ws: n.ws - 512, ..n }, "workspace");
    }
}

backend_tests!(bad_input);

/// A written tensor (`out`, the workspace) sharing its wgpu buffer, or on
/// CUDA its device memory, with another argument is refused, naming it. The
/// CPU launchers take what they write by `&mut`, so safe Rust rules the
/// aliasing out there; on CUDA an engine's own allocations can alias.
fn aliasing(backend: &Backend) {
    use frugal_attn::backend::{WgpuTensor, WgpuWorkspace};
    if let Backend::Cuda(c) = backend {
        let (st, p) = (c.stream(), DecodeParams::new(shape(1, 2, 1, 16, 8)));
        let arena = st.alloc_zeros::<f32>(1024).unwrap();
        let mut ws = frugal_attn::backend::CudaWorkspace::new(st, p.workspace_bytes()).unwrap();
        // Element offsets into one allocation of q, k_cache, v_cache, out and seq_lens.
        let mut launch = |[q, k, v, o, s]: [usize; 5]| {
            let a = |off: usize, len: usize| common::CudaAlias::<f32>::of(st, &arena, 4 * off, len);
            let (q, k, v, mut o) = (a(q, p.q_len()), a(k, p.k_len()), a(v, p.v_len()), a(o, p.o_len()));
            let s = common::CudaAlias::<u32>::of(st, &arena, 4 * s, 1);
            frugal_attn::decode::cuda::decode(c, st, &p, &*q, &*k, &*v, &*s, &mut *o, &mut ws)
        };
        // q 0..32, k 32..160, v 160..288, out 288..320, seq_lens 320: adjacent, not overlapping.
        launch([0, 32, 160, 288, 320]).unwrap_or_else(|e| panic!("disjoint ranges of one allocation rejected: {e}"));
        common::assert_refused(launch([0, 32, 160, 16, 320]), "out", "out overlaps q");
        common::assert_refused(launch([0, 32, 160, 100, 320]), "out", "out overlaps k_cache");
        common::assert_refused(launch([0, 32, 160, 288, 319]), "out", "seq_lens inside out");
        st.synchronize().unwrap();
        return;
    }
    let Backend::Wgpu(w) = backend else { return };
    let _gate = w.exclusive();
    let p = DecodeParams::new(shape(1, 2, 1, 16, 8));
    let buf = || w.upload(&[0u8; 4096]);
    let (q, k, v, o) = (buf(), buf(), buf(), buf());
    let lens = w.upload(bytemuck::cast_slice(&[1u32]));
    let ws = WgpuWorkspace::new(w, p.workspace_bytes());
    let launch = |[q, k, v, s, o]: [&wgpu::Buffer; 5]| {
        let mut enc = w.device().create_command_encoder(&Default::default());
        let t = WgpuTensor::new;
        frugal_attn::decode::wgpu::decode(w, &mut enc, &p, DType::F32, t(q), t(k), t(v), t(s), t(o), &ws)
    };
    launch([&q, &k, &v, &lens, &o]).unwrap_or_else(|e| panic!("distinct buffers rejected: {e}"));
    let wsb = ws.buffer();
    let cases: [([&wgpu::Buffer; 5], &str, &str); 5] = [
        ([&q, &k, &v, &lens, &q], "out", "out = q"),
        ([&q, &k, &v, &lens, &v], "out", "out = v_cache"),
        ([&q, &k, &v, &o, &o], "out", "out = seq_lens"),
        ([wsb, &k, &v, &lens, &o], "workspace", "q = workspace"),
        ([&q, &k, &v, &lens, wsb], "out", "out = workspace"),
    ];
    for (buffers, arg, case) in cases {
        common::assert_refused(launch(buffers), arg, case);
    }
}

backend_tests!(aliasing);

/// Engines keep K and V of many layers in one buffer: tensors at element offsets.
#[test]
fn wgpu_offsets_and_shared_buffers() {
    use frugal_attn::backend::{BackendKind, WgpuTensor, WgpuWorkspace};
    let Some(Backend::Wgpu(w)) = common::backend(BackendKind::Wgpu, "wgpu_offsets_and_shared_buffers") else {
        return;
    };
    let s = shape(2, 4, 2, 64, 100);
    let p = DecodeParams::new(s);
    let mut rng = Rng::new(9);
    let x = DecodeInputs::random(&p, DType::F16, vec![100, 37], &mut rng);
    let want = reference(&p, &x).unwrap();
    // One buffer: [pad 3][q][pad 5][k][v], an odd offset for f16 on purpose.
    let mut all: Vec<half::f16> = vec![half::f16::ZERO; 3];
    let q_off = all.len();
    all.extend(x.q.to_f64().iter().map(|&v| half::f16::from_f64(v)));
    all.extend([half::f16::ZERO; 5]);
    let k_off = all.len();
    all.extend(x.k.to_f64().iter().map(|&v| half::f16::from_f64(v)));
    let v_off = all.len();
    all.extend(x.v.to_f64().iter().map(|&v| half::f16::from_f64(v)));
    let _gate = w.exclusive();
    let cache = w.upload(bytemuck::cast_slice(&all));
    let lens = w.upload(bytemuck::cast_slice(&x.seq_lens));
    let out = w.upload(&vec![0xFFu8; (p.o_len() + 1) * 2 + 2]);
    let ws = WgpuWorkspace::new(&w, p.workspace_bytes());
    let mut enc = w.device().create_command_encoder(&Default::default());
    let at = |o: usize| WgpuTensor::at(&cache, o as u64);
    frugal_attn::decode::wgpu::decode(
        &w,
        &mut enc,
        &p,
        DType::F16,
        at(q_off),
        at(k_off),
        at(v_off),
        WgpuTensor::new(&lens),
        WgpuTensor::at(&out, 1),
        &ws,
    )
    .unwrap();
    w.submit_and_wait(enc).unwrap();
    let bytes = w.read_back(&out, (p.o_len() + 2) * 2).unwrap();
    let got: Vec<half::f16> = frugal_attn::host::bytes_to_vec(&bytes);
    assert_eq!(got[0].to_bits(), 0xFFFF, "the element before the output must be untouched");
    assert_eq!(got[p.o_len() + 1].to_bits(), 0xFFFF, "the element after the output must be untouched");
    let got: Vec<f64> = got[1..=p.o_len()].iter().map(|v| v.to_f64()).collect();
    assert!(rel_l2(&got, &want) <= DType::F16.tolerance());
    // An output that shares a buffer with an input is refused (wgpu forbids the aliasing).
    let mut enc = w.device().create_command_encoder(&Default::default());
    let e = frugal_attn::decode::wgpu::decode(
        &w,
        &mut enc,
        &p,
        DType::F16,
        at(q_off),
        at(k_off),
        at(v_off),
        WgpuTensor::new(&lens),
        at(0),
        &ws,
    )
    .unwrap_err();
    assert_eq!(e.argument(), Some("out"), "{e}");
}
