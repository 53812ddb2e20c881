mod common;

use frugal_attn::decode::run::{reference, run, DecodeInputs};
use frugal_attn::decode::{DecodeLayout, DecodeParams, DecodeShape};
use frugal_attn::host::{rel_l2, Rng};
use frugal_attn::{Backend, DType};

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
