mod common;

use frugal_attn::host::{HostData, Rng};
use frugal_attn::topk::run::{reference, run};
use frugal_attn::topk::TopkParams;
use frugal_attn::{Backend, DType, Error};

/// Values with many ties, both zeros, infinities and NaNs (payloads differ).
fn nasty_values(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.range(0, 19) {
            0 => f32::NAN,
            1 => f32::from_bits(0x7fc0_1234),
            2 => f32::NEG_INFINITY,
            3 => f32::INFINITY,
            4 => 0.0,
            5 => -0.0,
            6..=11 => rng.range(0, 7) as f32 * 0.5 - 2.0, // ties
            _ => rng.uniform(-3.0, 3.0),
        })
        .collect()
}

/// Exact agreement with the sort-based reference: same positions, bit-identical values.
fn check(backend: &Backend, p: &TopkParams, x: &HostData) {
    let want = reference(p, x).unwrap();
    let got = run(backend, p, x).unwrap_or_else(|e| panic!("{backend:?}: {e}"));
    assert_eq!(got.indices, want.indices, "{backend:?} {} {p:?}: positions differ", x.dtype());
    assert_eq!(got.values.as_bytes(), want.values.as_bytes(), "{backend:?} {} {p:?}: values differ", x.dtype());
}

fn matches_reference(backend: &Backend) {
    let cases = [(1, 1, 1), (3, 7, 3), (2, 1000, 1), (2, 1000, 1000), (1, 4097, 300), (2, 20000, 2500)];
    for (i, (rows, n, k)) in cases.into_iter().enumerate() {
        for dtype in DType::ALL {
            let mut rng = Rng::new(100 + i as u64);
            let p = TopkParams::new(rows, n, k);
            check(backend, &p, &HostData::from_f32(dtype, &nasty_values(p.x_len(), &mut rng)));
        }
    }
}

/// Rows further apart than their length; plain random data; all-equal rows (every choice is a tie).
fn strides_and_ties(backend: &Backend) {
    let mut rng = Rng::new(7);
    for dtype in DType::ALL {
        let p = TopkParams::new(3, 777, 100).with_row_stride(801);
        let v: Vec<f32> = (0..p.x_len()).map(|_| rng.uniform(-1.0, 1.0)).collect();
        check(backend, &p, &HostData::from_f32(dtype, &v));
        let p = TopkParams::new(2, 513, 17);
        check(backend, &p, &HostData::from_f32(dtype, &vec![1.5; p.x_len()]));
        check(backend, &p, &HostData::from_f32(dtype, &vec![f32::NAN; p.x_len()]));
    }
}

/// The reference itself against hand-worked answers.
#[test]
fn reference_examples() {
    let x = [1.0, f32::NAN, 3.0, -0.0, 3.0, f32::NEG_INFINITY, 0.0, 2.0];
    let cases: [(usize, &[u32]); 5] =
        [(1, &[2]), (2, &[2, 4]), (4, &[0, 2, 4, 7]), (6, &[0, 2, 3, 4, 6, 7]), (8, &[0, 1, 2, 3, 4, 5, 6, 7])];
    for (k, want) in cases {
        let got = reference(&TopkParams::new(1, 8, k), &HostData::from_f32(DType::F32, &x)).unwrap();
        assert_eq!(got.indices, want, "k = {k}");
    }
}

fn launch_with(backend: &Backend, p: &TopkParams, (x, idx, val): (usize, usize, usize)) -> Result<(), Error> {
    match backend {
        Backend::Cpu => {
            frugal_attn::topk::reference::topk_into(p, &vec![0f32; x], &mut vec![0; idx], &mut vec![0f32; val])
        }
        Backend::Wgpu(w) => {
            let _gate = w.exclusive();
            use frugal_attn::backend::WgpuTensor;
            let buf = |elems: usize| w.upload(&vec![0u8; elems * 4]);
            let (xb, ib, vb) = (buf(x), buf(idx), buf(val));
            let mut enc = w.device().create_command_encoder(&Default::default());
            let t = WgpuTensor::new;
            frugal_attn::topk::wgpu::topk(w, &mut enc, p, DType::F32, t(&xb), t(&ib), t(&vb))
        }
        Backend::Cuda(c) => {
            let st = c.stream();
            let xb = st.alloc_zeros::<f32>(x.max(1)).unwrap();
            let mut ib = st.alloc_zeros::<u32>(idx.max(1)).unwrap();
            let mut vb = st.alloc_zeros::<f32>(val.max(1)).unwrap();
            frugal_attn::topk::cuda::topk(c, st, p, &xb, &mut ib, &mut vb)
        }
    }
}

fn bad_input(backend: &Backend) {
    let p = TopkParams::new(3, 100, 10);
    let exact = (p.x_len(), p.out_len(), p.out_len());
    launch_with(backend, &p, exact).unwrap_or_else(|e| panic!("{backend:?}: exact sizes rejected: {e}"));
    let cases: [(TopkParams, (usize, usize, usize), &str); 8] = [
        (TopkParams::new(0, 100, 10), exact, "rows"),
        (TopkParams::new(3, 0, 0), exact, "n"),
        (TopkParams::new(3, 100, 0), exact, "k"),
        (TopkParams::new(3, 100, 101), (exact.0, 303, 303), "k"),
        (p.with_row_stride(99), exact, "row_stride"),
        (p, (exact.0 - 1, exact.1, exact.2), "x"),
        (p, (exact.0, exact.1 - 1, exact.2), "indices"),
        (p, (exact.0, exact.1, exact.2 - 1), "values"),
    ];
    for (bp, lens, arg) in cases {
        match launch_with(backend, &bp, lens) {
            Err(e) => assert_eq!(e.argument(), Some(arg), "{backend:?} {bp:?}: {e}"),
            Ok(()) => panic!("{backend:?} {bp:?}: expected an error naming `{arg}`"),
        }
    }
}

/// An output sharing its wgpu buffer, or on CUDA its device memory, with
/// another argument is refused, naming it. The CPU launcher takes its outputs
/// by `&mut`, so safe Rust rules the aliasing out there; on CUDA an engine's
/// own allocations can alias.
fn aliasing(backend: &Backend) {
    use frugal_attn::backend::WgpuTensor;
    if let Backend::Cuda(c) = backend {
        let (st, p) = (c.stream(), TopkParams::new(3, 100, 10));
        let arena = st.alloc_zeros::<f32>(1024).unwrap();
        // Element offsets into one allocation of x, indices and values.
        let launch = |[x, i, v]: [usize; 3]| {
            let x = common::CudaAlias::<f32>::of(st, &arena, 4 * x, p.x_len());
            let mut i = common::CudaAlias::<u32>::of(st, &arena, 4 * i, p.out_len());
            let mut v = common::CudaAlias::<f32>::of(st, &arena, 4 * v, p.out_len());
            frugal_attn::topk::cuda::topk(c, st, &p, &*x, &mut *i, &mut *v)
        };
        // x 0..300, indices 300..330, values 330..360: adjacent, not overlapping.
        launch([0, 300, 330]).unwrap_or_else(|e| panic!("disjoint ranges of one allocation rejected: {e}"));
        common::assert_refused(launch([0, 290, 330]), "indices", "indices overlap x");
        common::assert_refused(launch([0, 300, 100]), "values", "values overlap x");
        common::assert_refused(launch([0, 300, 320]), "indices", "values overlap indices");
        st.synchronize().unwrap();
        return;
    }
    let Backend::Wgpu(w) = backend else { return };
    let _gate = w.exclusive();
    let p = TopkParams::new(3, 100, 10);
    let (x, idx, val) = (w.upload(&[0u8; 4096]), w.upload(&[0u8; 4096]), w.upload(&[0u8; 4096]));
    let launch = |[x, idx, val]: [&wgpu::Buffer; 3]| {
        let mut enc = w.device().create_command_encoder(&Default::default());
        let t = WgpuTensor::new;
        frugal_attn::topk::wgpu::topk(w, &mut enc, &p, DType::F32, t(x), t(idx), t(val))
    };
    launch([&x, &idx, &val]).unwrap_or_else(|e| panic!("distinct buffers rejected: {e}"));
    common::assert_refused(launch([&x, &x, &val]), "indices", "indices = x");
    common::assert_refused(launch([&x, &idx, &x]), "values", "values = x");
    common::assert_refused(launch([&x, &idx, &idx]), "indices", "values = indices");
}

backend_tests!(matches_reference, strides_and_ties, bad_input, aliasing);
