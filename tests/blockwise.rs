mod common;

use frugal_attn::blockwise::reference::{self, Partial};
use frugal_attn::blockwise::run::{self, BlockInputs, Grads32, State};
use frugal_attn::blockwise::{BlockLayout, BlockParams, BlockShape, Mask};
use frugal_attn::host::{rel_l2, HostData, Rng};
use frugal_attn::{Backend, DType, Error};

fn shape(batch: usize, q_heads: usize, kv_heads: usize, head_dim: usize, q_len: usize, kv_len: usize) -> BlockShape {
    BlockShape { batch, q_heads, kv_heads, head_dim, q_len, kv_len }
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Rows of `lse` that saw no key must be exactly `-inf` with `O` exactly 0.
fn assert_empty_rows_exact(what: &str, st: &State, want: &Partial, d: usize) {
    for (r, &l) in want.lse.iter().enumerate() {
        if l == f64::NEG_INFINITY {
            assert_eq!(st.lse[r], f32::NEG_INFINITY, "{what}: row {r} sees no key, lse must be -inf");
            assert!(st.o[r * d..][..d].iter().all(|&x| x == 0.0), "{what}: row {r} sees no key, O must be 0");
        }
    }
}

/// One forward on `backend` against the f64 reference.
fn check_forward(backend: &Backend, p: &BlockParams, dtype: DType, seed: u64) {
    let x = BlockInputs::random(p, dtype, &mut Rng::new(seed));
    let want = run::reference_forward(p, &x).unwrap();
    let got = run::forward(backend, p, &x, None).unwrap_or_else(|e| panic!("{backend:?}: {e}"));
    let what = format!("{backend:?} {dtype} {:?} q0={} k0={} {:?}", p.shape, p.q0, p.k0, p.mask);
    let (eo, el) = run::forward_error(&got, &want);
    // f32 state: lse and O carry f32 rounding whatever the input dtype.
    let tol = dtype.tolerance();
    assert!(eo <= tol && el <= tol, "{what}: rel L2 O {eo:e}, lse {el:e} > {tol:e}");
    assert_empty_rows_exact(&what, &got, &want, p.shape.head_dim);
}

/// GQA 1/4/7, head dims 64/80/128/256 and an odd small one, lengths that are
/// not tile multiples, no mask and causal with offsets: the diagonal block,
/// partially masked blocks (rows that see nothing), and a block fully masked.
fn forward_matches_reference(backend: &Backend) {
    let cases = [
        (BlockParams::new(shape(1, 1, 1, 64, 1, 1), Mask::None), 0, 0),
        (BlockParams::new(shape(2, 4, 1, 80, 7, 100), Mask::Causal), 100, 50),
        (BlockParams::new(shape(1, 7, 1, 128, 100, 37), Mask::Causal), 0, 0),
        (BlockParams::new(shape(1, 7, 1, 128, 40, 70), Mask::Causal), 0, 0),
        (BlockParams::new(shape(1, 2, 2, 5, 33, 70), Mask::Causal), 10, 20),
        (BlockParams::new(shape(1, 2, 1, 64, 20, 30), Mask::Causal), 0, 100),
        (BlockParams::new(shape(1, 2, 1, 256, 20, 45), Mask::None), 0, 0),
        (BlockParams::new(shape(2, 8, 2, 96, 50, 65), Mask::None), 3, 9),
    ];
    for (n, (p, q0, k0)) in cases.into_iter().enumerate() {
        for dtype in DType::ALL {
            check_forward(backend, &p.with_offsets(q0, k0), dtype, n as u64);
        }
    }
}

/// Token-major tensors and padded strides (dO/out strides with gaps too).
fn forward_strided_layouts(backend: &Backend) {
    let s = shape(2, 6, 3, 72, 19, 41);
    let bshd = BlockParams::new(s, Mask::Causal).with_layout(BlockLayout::bshd(&s)).with_offsets(30, 0);
    let padded = BlockParams::new(s, Mask::None).with_layout(BlockLayout {
        q: [6 * 20 * 75 + 3, 20 * 75, 75],
        k: [3 * 41 * 80 + 1, 80, 3 * 80],
        v: [72, 2 * 3 * 72 * 41, 2 * 72], // [S, B, H] interleaved with V rows of the other sequence
        o: [72, 2 * 72 * 19 + 5, 2 * 72],
    });
    for dtype in DType::ALL {
        check_forward(backend, &bshd, dtype, 21);
        check_forward(backend, &padded.with_scale(0.3), dtype, 22);
    }
}

/// The shapes the CUDA tensor-core kernels take (f16/bf16, head_dim 64/128,
/// rows 16-byte aligned; f32 runs the same cases on the FMA kernels): several
/// 64-row query tiles and 64-key KV tiles with ragged ends, causal offsets that
/// skip tiles and leave rows of a tile with no key, GQA 4/7, token-major and
/// padded strides, and row strides off the 8-element grid (the FMA fallback):
/// Q's (both passes), and dO's alone (the backward falls back, the forward does not).
fn tensor_core_cases() -> Vec<BlockParams> {
    let a = shape(2, 4, 1, 64, 130, 190);
    let b = shape(1, 4, 4, 128, 100, 150);
    let c = shape(1, 7, 1, 128, 65, 129);
    let d = shape(1, 2, 2, 64, 90, 70);
    // Several 128-row query tiles and 128-key KV tiles (the Hopper kernel's), the diagonal mid-tile.
    let e = shape(1, 2, 1, 128, 260, 390);
    let f = shape(1, 4, 2, 64, 200, 300);
    let padded = BlockLayout {
        q: [7 * 65 * 136 + 8, 65 * 136, 136],
        k: [129 * 144 + 16, 129 * 144, 144],
        v: [129 * 128, 128, 128],
        o: BlockLayout::bhsd(&c).o,
    };
    let off_grid = BlockLayout { q: [2 * 90 * 68, 90 * 68, 68], ..BlockLayout::bhsd(&d) };
    let d_o_off_grid = BlockLayout { o: [2 * 90 * 68, 90 * 68, 68], ..BlockLayout::bhsd(&d) };
    vec![
        BlockParams::new(a, Mask::Causal).with_offsets(70, 10),
        BlockParams::new(a, Mask::None),
        BlockParams::new(b, Mask::None).with_layout(BlockLayout::bshd(&b)),
        BlockParams::new(b, Mask::Causal).with_layout(BlockLayout::bshd(&b)).with_offsets(0, 0),
        BlockParams::new(c, Mask::Causal).with_layout(padded).with_offsets(200, 0).with_scale(0.2),
        BlockParams::new(d, Mask::Causal).with_offsets(10, 40),
        BlockParams::new(d, Mask::Causal).with_layout(off_grid).with_offsets(10, 40),
        BlockParams::new(d, Mask::None).with_layout(d_o_off_grid).with_offsets(5, 0),
        BlockParams::new(e, Mask::Causal).with_offsets(130, 0),
        BlockParams::new(f, Mask::None),
        BlockParams::new(f, Mask::Causal).with_layout(BlockLayout::bshd(&f)).with_offsets(0, 60),
    ]
}

fn forward_tensor_core_shapes(backend: &Backend) {
    for (n, p) in tensor_core_cases().iter().enumerate() {
        for dtype in DType::ALL {
            check_forward(backend, p, dtype, 60 + n as u64);
        }
    }
}

/// Accumulate mode onto a state with empty and non-empty rows, where the
/// block leaves some rows unseen (causal offsets): the LSE merge of the two.
fn forward_accumulates_onto_state(backend: &Backend) {
    for s in [shape(1, 4, 1, 128, 80, 100), shape(2, 2, 1, 64, 70, 66)] {
        let p = BlockParams::new(s, Mask::Causal).with_offsets(20, 50);
        for dtype in DType::ALL {
            let mut rng = Rng::new(90);
            let x = BlockInputs::random(&p, dtype, &mut rng);
            let init = random_state(&s, &mut rng, |r| r % 3 == 0);
            let got = run::forward(backend, &p, &x, Some(&init)).unwrap_or_else(|e| panic!("{backend:?}: {e}"));
            let mut want = partial(&init);
            reference::merge(&mut want, &run::reference_forward(&p, &x).unwrap(), s.head_dim);
            let (eo, el) = run::forward_error(&got, &want);
            let tol = dtype.tolerance();
            assert!(eo <= tol && el <= tol, "{backend:?} {dtype} {s:?}: accumulated O {eo:e}, lse {el:e} > {tol:e}");
            assert_empty_rows_exact(&format!("{backend:?} {dtype} accumulate"), &got, &want, s.head_dim);
            // Rows this block does not reach keep a non-empty state bit for bit
            // (an empty one becomes exactly (0, -inf), checked above).
            for r in 0..s.lse_elems() {
                let i = r % s.q_len;
                if p.q0 + i < p.k0 && init.lse[r] != f32::NEG_INFINITY {
                    assert_eq!(got.lse[r].to_bits(), init.lse[r].to_bits(), "{backend:?} {dtype}: row {r} lse changed");
                    assert_eq!(&got.o[r * s.head_dim..][..s.head_dim], &init.o[r * s.head_dim..][..s.head_dim]);
                }
            }
        }
    }
}

/// Rows `start..start + len` of a contiguous `[B, H, S, D]` tensor of `s_len` rows.
fn slice_rows(x: &HostData, b: usize, h: usize, s_len: usize, d: usize, start: usize, len: usize) -> HostData {
    let all = x.to_f64();
    let mut out = Vec::with_capacity(b * h * len * d);
    for bh in 0..b * h {
        out.extend(all[(bh * s_len + start) * d..][..len * d].iter().map(|&v| v as f32));
    }
    HostData::from_f32(x.dtype(), &out)
}

/// Accumulating over several KV blocks (one of them fully masked, one before
/// the queries saw anything) equals one forward over their concatenation.
fn accumulate_equals_concatenation(backend: &Backend) {
    let full = shape(2, 4, 2, 64, 40, 100);
    let (q0, k0) = (30, 0);
    let cuts = [(0, 37), (37, 27), (64, 36)];
    for dtype in DType::ALL {
        for mask in [Mask::None, Mask::Causal] {
            let p = BlockParams::new(full, mask).with_offsets(q0, k0);
            let x = BlockInputs::random(&p, dtype, &mut Rng::new(7));
            let want = run::reference_forward(&p, &x).unwrap();
            // Back to front: with the causal mask the first launch (keys 64..100) leaves
            // the rows before position 64 empty, and later launches fill them.
            let mut st: Option<State> = None;
            for &(start, len) in cuts.iter().rev() {
                let bs = BlockShape { kv_len: len, ..full };
                let bp = BlockParams::new(bs, mask).with_offsets(q0, k0 + start);
                let bx = BlockInputs {
                    q: x.q.clone(),
                    k: slice_rows(&x.k, 2, 2, 100, 64, start, len),
                    v: slice_rows(&x.v, 2, 2, 100, 64, start, len),
                    d_o: x.d_o.clone(),
                };
                st = Some(run::forward(backend, &bp, &bx, st.as_ref()).unwrap_or_else(|e| panic!("{backend:?}: {e}")));
            }
            // And a block no query sees: nothing changes.
            let st = st.unwrap();
            let far = BlockParams::new(BlockShape { kv_len: 10, ..full }, Mask::Causal).with_offsets(q0, 1000);
            let fx = BlockInputs::random(&far, dtype, &mut Rng::new(8));
            let after = run::forward(backend, &far, &fx, Some(&st)).unwrap();
            assert_eq!(after, st, "{backend:?}: a fully masked block must leave (O, lse) unchanged");
            let (eo, el) = run::forward_error(&st, &want);
            let tol = dtype.tolerance();
            assert!(eo <= tol && el <= tol, "{backend:?} {dtype} {mask:?}: chained O {eo:e}, lse {el:e} > {tol:e}");
        }
    }
}

/// A random f32 state with rows of `lse = -inf` (O = 0) where `empty(r)`.
fn random_state(s: &BlockShape, rng: &mut Rng, empty: impl Fn(usize) -> bool) -> State {
    let d = s.head_dim;
    let mut st = State { o: vec![0.0; s.o_elems()], lse: vec![0.0; s.lse_elems()] };
    for r in 0..s.lse_elems() {
        // An empty row's O is left as garbage: lse = -inf alone marks the row
        // empty (an engine may set only lse), and the merge rule ignores that O.
        st.lse[r] = if empty(r) { f32::NEG_INFINITY } else { rng.uniform(-3.0, 6.0) };
        for x in &mut st.o[r * d..][..d] {
            *x = rng.uniform(-1.0, 1.0);
        }
    }
    st
}

fn partial(st: &State) -> Partial {
    Partial { o: to_f64(&st.o), lse: to_f64(&st.lse) }
}

/// Merge, with `-inf` on either side and on both.
fn merge_matches_reference(backend: &Backend) {
    let s = shape(2, 3, 1, 40, 9, 1);
    let mut rng = Rng::new(3);
    let a = random_state(&s, &mut rng, |r| r % 3 == 0);
    let b = random_state(&s, &mut rng, |r| r % 2 == 0);
    let got = run::merge(backend, &s, &a, &b).unwrap_or_else(|e| panic!("{backend:?}: {e}"));
    let mut want = partial(&a);
    reference::merge(&mut want, &partial(&b), s.head_dim);
    assert!(rel_l2(&to_f64(&got.o), &want.o) <= 1e-6, "{backend:?}: merged O");
    assert!(run::lse_error(&got.lse, &want.lse) <= 1e-6, "{backend:?}: merged lse");
    assert_empty_rows_exact(&format!("{backend:?} merge"), &got, &want, s.head_dim);
}

/// Finalize casts O into the strided output; rows with `lse = -inf` give exact zeros.
fn finalize_matches_reference(backend: &Backend) {
    let s = shape(2, 3, 3, 24, 7, 1);
    let layouts = [
        BlockLayout::bhsd(&s),
        BlockLayout::bshd(&s),
        BlockLayout { o: [24, 2 * 24 + 3, 2 * 3 * 27], ..BlockLayout::bhsd(&s) },
    ];
    let mut rng = Rng::new(4);
    let mut st = random_state(&s, &mut rng, |r| r % 4 == 1);
    // A stale non-zero O under -inf must not leak through.
    st.o[s.head_dim] = 5.0;
    for layout in layouts {
        let p = BlockParams::new(s, Mask::None).with_layout(layout);
        for dtype in DType::ALL {
            let got = run::finalize(backend, &p, dtype, &st).unwrap_or_else(|e| panic!("{backend:?}: {e}"));
            let want = run::finalize(&Backend::Cpu, &p, dtype, &st).unwrap();
            let (g, w) = (got.to_f64(), want.to_f64());
            // Bit-identical where the layout writes; NaN (the poison) where it does not.
            for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                assert!(
                    a == b || (a.is_nan() && b.is_nan()),
                    "{backend:?} {dtype} {layout:?}: element {i}: {a} vs {b}"
                );
            }
        }
    }
}

/// One backward on `backend`, accumulated onto non-zero dQ/dK/dV, against the
/// f64 reference (given the same f32 O and lse). f16/bf16 inputs are rounded
/// before both sides see them, so every dtype meets its forward tolerance.
fn check_backward(backend: &Backend, p: &BlockParams, dtype: DType, seed: u64) {
    let mut rng = Rng::new(seed);
    let x = BlockInputs::random(p, dtype, &mut rng);
    let st = run::forward(&Backend::Cpu, p, &x, None).unwrap();
    let s = &p.shape;
    let init = Grads32 {
        dq: (0..s.o_elems()).map(|_| rng.uniform(-0.1, 0.1)).collect(),
        dk: (0..s.kv_grad_elems()).map(|_| rng.uniform(-0.1, 0.1)).collect(),
        dv: (0..s.kv_grad_elems()).map(|_| rng.uniform(-0.1, 0.1)).collect(),
    };
    let mut want = run::reference_backward(p, &x, &st).unwrap();
    for (w, i) in [(&mut want.dq, &init.dq), (&mut want.dk, &init.dk), (&mut want.dv, &init.dv)] {
        for (a, b) in w.iter_mut().zip(i.iter()) {
            *a += *b as f64;
        }
    }
    let got = run::backward(backend, p, &x, &st, &init).unwrap_or_else(|e| panic!("{backend:?}: {e}"));
    let err = run::grads_error(&got, &want);
    let tol = dtype.tolerance().max(1e-5);
    let what = format!("{backend:?} {dtype} {:?} q0={} k0={} {:?}", p.shape, p.q0, p.k0, p.mask);
    assert!(err <= tol, "{what}: grads rel L2 {err:e} > {tol:e}");
}

fn backward_matches_reference(backend: &Backend) {
    let cases = [
        (BlockParams::new(shape(1, 1, 1, 64, 1, 1), Mask::None), 0, 0),
        (BlockParams::new(shape(2, 4, 1, 80, 7, 100), Mask::Causal), 100, 50),
        (BlockParams::new(shape(1, 7, 1, 128, 45, 37), Mask::Causal), 0, 0),
        (BlockParams::new(shape(1, 2, 2, 5, 33, 70), Mask::Causal), 10, 20),
        (BlockParams::new(shape(1, 2, 1, 64, 20, 30), Mask::Causal), 0, 100),
        (BlockParams::new(shape(1, 2, 1, 256, 20, 21), Mask::None), 0, 0),
    ];
    for (n, (p, q0, k0)) in cases.into_iter().enumerate() {
        for dtype in DType::ALL {
            check_backward(backend, &p.with_offsets(q0, k0), dtype, 40 + n as u64);
        }
    }
}

/// The tensor-core kernels' shapes (see `tensor_core_cases`) through the backward.
fn backward_tensor_core_shapes(backend: &Backend) {
    for (n, p) in tensor_core_cases().iter().enumerate() {
        for dtype in DType::ALL {
            check_backward(backend, p, dtype, 80 + n as u64);
        }
    }
}

backend_tests!(
    forward_matches_reference,
    forward_strided_layouts,
    accumulate_equals_concatenation,
    forward_tensor_core_shapes,
    forward_accumulates_onto_state,
    merge_matches_reference,
    finalize_matches_reference,
    backward_matches_reference,
    backward_tensor_core_shapes,
);

/// Which launcher a bad-input case calls.
#[derive(Clone, Copy, Debug)]
enum Op {
    Forward,
    Merge,
    Finalize,
    Prepass,
    Backward,
}

/// The buffer arguments of `op` in launcher order, with the lengths `p` needs.
fn needs(op: Op, p: &BlockParams) -> Vec<(&'static str, usize)> {
    let s = &p.shape;
    let (o, l, kv) = (s.o_elems(), s.lse_elems(), s.kv_grad_elems());
    match op {
        Op::Forward => vec![("q", p.q_elems()), ("k", p.k_elems()), ("v", p.v_elems()), ("o", o), ("lse", l)],
        Op::Merge => vec![("o", o), ("lse", l), ("o_b", o), ("lse_b", l)],
        Op::Finalize => vec![("o", o), ("lse", l), ("out", p.o_elems())],
        Op::Prepass => vec![("o", o), ("d_o", p.o_elems()), ("delta", l)],
        Op::Backward => vec![
            ("q", p.q_elems()),
            ("k", p.k_elems()),
            ("v", p.v_elems()),
            ("d_o", p.o_elems()),
            ("lse", l),
            ("delta", l),
            ("dq", o),
            ("dk", kv),
            ("dv", kv),
        ],
    }
}

/// Calls the backend's own launcher for `op` on f32 buffers of lengths `n` (zeros).
fn launch_with(backend: &Backend, op: Op, p: &BlockParams, n: &[usize]) -> Result<(), Error> {
    use frugal_attn::backend::WgpuTensor;
    use frugal_attn::blockwise::{cuda, wgpu as bw};
    match backend {
        Backend::Cpu => {
            let mut v: Vec<Vec<f32>> = n.iter().map(|&len| vec![0.0; len]).collect();
            let o_full = vec![0.0f32; p.shape.o_elems()];
            match (op, v.as_mut_slice()) {
                (Op::Forward, [q, k, v, o, l]) => reference::forward_into(p, q, k, v, o, l, false),
                (Op::Merge, [o, l, ob, lb]) => reference::merge_into(&p.shape, o, l, ob, lb),
                (Op::Finalize, [o, l, out]) => reference::finalize_into(p, o, l, out),
                (Op::Prepass, [o, d_o, delta]) => reference::backward_prepass_into(p, o, d_o, delta),
                (Op::Backward, [q, k, v, d_o, l, delta, dq, dk, dv]) => {
                    reference::backward_into(p, q, k, v, d_o, &o_full, l, delta, dq, dk, dv)
                }
                _ => unreachable!(),
            }
        }
        Backend::Wgpu(w) => {
            let _gate = w.exclusive();
            let bufs: Vec<wgpu::Buffer> = n.iter().map(|&len| w.upload(&vec![0u8; len * 4])).collect();
            let t: Vec<WgpuTensor<'_>> = bufs.iter().map(WgpuTensor::new).collect();
            let mut enc = w.device().create_command_encoder(&Default::default());
            let (e, f) = (&mut enc, DType::F32);
            match op {
                Op::Forward => bw::forward(w, e, p, f, t[0], t[1], t[2], t[3], t[4], false),
                Op::Merge => bw::merge(w, e, &p.shape, t[0], t[1], t[2], t[3]),
                Op::Finalize => bw::finalize(w, e, p, f, t[0], t[1], t[2]),
                Op::Prepass => bw::backward_prepass(w, e, p, f, t[0], t[1], t[2]),
                Op::Backward => bw::backward(w, e, p, f, t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]),
            }
        }
        Backend::Cuda(c) => {
            let st = c.stream();
            let mut b: Vec<_> = n.iter().map(|&len| st.alloc_zeros::<f32>(len.max(1)).unwrap()).collect();
            // alloc_zeros(0) is refused: a length-0 request becomes a 1-element buffer, still short.
            match (op, b.as_mut_slice()) {
                (Op::Forward, [q, k, v, o, l]) => cuda::forward(c, st, p, q, k, v, o, l, false),
                (Op::Merge, [o, l, ob, lb]) => cuda::merge(c, st, &p.shape, o, l, ob, lb),
                (Op::Finalize, [o, l, out]) => cuda::finalize(c, st, p, o, l, out),
                (Op::Prepass, [o, d_o, delta]) => cuda::backward_prepass(c, st, p, o, d_o, delta),
                (Op::Backward, [q, k, v, d_o, l, delta, dq, dk, dv]) => {
                    cuda::backward(c, st, p, q, k, v, d_o, l, delta, dq, dk, dv)
                }
                _ => unreachable!(),
            }
        }
    }
}

fn expect_err(backend: &Backend, op: Op, p: &BlockParams, n: &[usize], arg: &str) {
    match launch_with(backend, op, p, n) {
        Err(e) => assert_eq!(e.argument(), Some(arg), "{backend:?} {op:?}: expected an error naming `{arg}`, got: {e}"),
        Ok(()) => panic!("{backend:?} {op:?}: expected an error naming `{arg}`, the launch was accepted"),
    }
}

/// Every launcher: each buffer one element short, and every shape/parameter
/// constraint broken one at a time, gives an `Err` naming the argument.
fn bad_input(backend: &Backend) {
    let good = shape(2, 4, 2, 16, 9, 11);
    let p = BlockParams::new(good, Mask::Causal);
    for op in [Op::Forward, Op::Merge, Op::Finalize, Op::Prepass, Op::Backward] {
        let exact: Vec<usize> = needs(op, &p).iter().map(|&(_, n)| n).collect();
        launch_with(backend, op, &p, &exact)
            .unwrap_or_else(|e| panic!("{backend:?} {op:?}: exact sizes rejected: {e}"));
        for (i, &(arg, n)) in needs(op, &p).iter().enumerate() {
            let mut short = exact.clone();
            short[i] = n - 1;
            expect_err(backend, op, &p, &short, arg);
        }
        let bad_shapes: [(BlockShape, &str); 8] = [
            (BlockShape { batch: 0, ..good }, "batch"),
            (BlockShape { kv_heads: 0, ..good }, "kv_heads"),
            (BlockShape { q_heads: 0, ..good }, "q_heads"),
            (BlockShape { q_heads: 5, ..good }, "q_heads"),
            (BlockShape { head_dim: 0, ..good }, "head_dim"),
            (BlockShape { head_dim: 257, ..good }, "head_dim"),
            (BlockShape { q_len: 0, ..good }, "q_len"),
            (BlockShape { kv_len: 0, ..good }, "kv_len"),
        ];
        for (s, arg) in bad_shapes {
            expect_err(backend, op, &BlockParams::new(s, Mask::Causal), &exact, arg);
        }
        if matches!(op, Op::Merge) {
            continue; // merge takes only a shape
        }
        expect_err(backend, op, &p.with_scale(f32::NAN), &exact, "scale");
        expect_err(backend, op, &p.with_offsets(i32::MAX as usize, 0), &exact, "q0");
        expect_err(backend, op, &p.with_offsets(0, i32::MAX as usize - 5), &exact, "k0");
        let overlapping = p.with_layout(BlockLayout { o: [4 * 9 * 16, 9 * 16, 8], ..p.layout });
        expect_err(backend, op, &overlapping, &exact, "o_strides");
    }
}

backend_tests!(bad_input);

/// Written tensors that share memory with another argument are refused.
fn aliasing(backend: &Backend) {
    use frugal_attn::backend::WgpuTensor;
    let p = BlockParams::new(shape(1, 2, 1, 8, 4, 5), Mask::None);
    match backend {
        Backend::Cpu => {} // Rust's borrow rules already forbid it
        Backend::Wgpu(w) => {
            let _gate = w.exclusive();
            let big = w.upload(&vec![0u8; 4096]);
            let other = w.upload(&vec![0u8; 4096]);
            let mut enc = w.device().create_command_encoder(&Default::default());
            let (t, at) = (WgpuTensor::new(&other), WgpuTensor::at(&big, 512));
            let e = frugal_attn::blockwise::wgpu::forward(
                w,
                &mut enc,
                &p,
                DType::F32,
                t,
                t,
                t,
                at,
                WgpuTensor::new(&big),
                false,
            )
            .unwrap_err();
            assert_eq!(e.argument(), Some("o"), "{e}");
            let e =
                frugal_attn::blockwise::wgpu::forward(w, &mut enc, &p, DType::F32, t, t, t, at, t, false).unwrap_err();
            assert_eq!(e.argument(), Some("lse"), "{e}");
        }
        // Safe Rust cannot alias a `&mut` slice; an engine's own allocations can.
        Backend::Cuda(c) => {
            let st = c.stream();
            let arena = st.alloc_zeros::<f32>(1024).unwrap();
            // Element offsets into one allocation of q, k, v, o and lse.
            let launch = |[q, k, v, o, lse]: [usize; 5]| {
                let a = |off: usize, len: usize| common::CudaAlias::<f32>::of(st, &arena, 4 * off, len);
                let (q, k, v) = (a(q, p.q_elems()), a(k, p.k_elems()), a(v, p.v_elems()));
                let (mut o, mut lse) = (a(o, p.shape.o_elems()), a(lse, p.shape.lse_elems()));
                frugal_attn::blockwise::cuda::forward(c, st, &p, &*q, &*k, &*v, &mut *o, &mut *lse, false)
            };
            // q 0..64, k 64..104, v 104..144, o 144..208, lse 208..216: adjacent, not overlapping.
            launch([0, 64, 104, 144, 208]).unwrap_or_else(|e| panic!("disjoint ranges of one allocation: {e}"));
            common::assert_refused(launch([0, 64, 104, 80, 208]), "o", "o overlaps k");
            common::assert_refused(launch([0, 64, 104, 144, 120]), "lse", "lse overlaps v");
            common::assert_refused(launch([0, 64, 104, 144, 200]), "o", "lse overlaps o");
            st.synchronize().unwrap();
        }
    }
}

backend_tests!(aliasing);
