mod common;

use frugal_attn::backend::{CudaWorkspace, WgpuTensor, WgpuWorkspace};
use frugal_attn::crosslayer::reference::{HostKv, TinyModel};
use frugal_attn::crosslayer::run::{reference, run, AttnInputs, CrossLayerCache};
use frugal_attn::crosslayer::{
    ring_rows, AttnLayout, AttnParams, AttnShape, LayerMap, LayerMapError, MaskMode, WriteParams,
};
use frugal_attn::host::{rel_l2, HostData, Rng};
use frugal_attn::{Backend, DType};

fn shape(batch: usize, queries: usize, q_heads: usize, kv_heads: usize, head_dim: usize, rows: usize) -> AttnShape {
    AttnShape { batch, queries, q_heads, kv_heads, head_dim, rows }
}

fn check(backend: &Backend, p: &AttnParams, dtype: DType, q_pos: Vec<u32>, kv_lens: Vec<u32>, seed: u64) {
    let mut rng = Rng::new(seed);
    let x = AttnInputs::random(p, dtype, q_pos, kv_lens, &mut rng);
    let want = reference(p, &x).unwrap();
    let got = run(backend, p, &x).unwrap_or_else(|e| panic!("{backend:?}: {e}"));
    let err = rel_l2(&got, &want);
    assert!(
        err <= dtype.tolerance(),
        "{backend:?} {dtype} {:?} {:?} w={:?} ring={} pos {:?} lens {:?}: rel L2 {err:e}",
        p.shape,
        p.mask,
        p.window,
        p.ring,
        x.q_pos,
        x.kv_lens
    );
}

// ---------------------------------------------------------------- LayerMap

const LCKV22: &str = "0_20_20_20_20_20_20_20_20_20_20_20_20_20_20_20_20_20_20_20_20_21";
const CLA22: &str = "0_0_2_2_4_4_6_6_8_8_10_10_12_12_14_14_16_16_18_18_20_20";
const YOCO22: &str = "0s_1s_2s_3s_4s_5s_6s_7s_8s_9s_10s_11_11_11_11_11_11_11_11_11_11_11";

#[test]
fn constructors_match_the_lckv_strings() {
    assert_eq!(LayerMap::lckv(22, 2).layer_types(), LCKV22);
    assert_eq!(LayerMap::cla(22, 2).layer_types(), CLA22);
    assert_eq!(LayerMap::yoco(22, 64).layer_types(), YOCO22);
    for (text, map) in [(LCKV22, LayerMap::lckv(22, 2)), (CLA22, LayerMap::cla(22, 2))] {
        assert_eq!(LayerMap::parse(text, 22).unwrap(), map);
    }
    assert_eq!(LayerMap::parse(YOCO22, 22).unwrap().with_window(64), LayerMap::yoco(22, 64));
    assert_eq!(LayerMap::lckv(4, 4), LayerMap::standard(4));
}

#[test]
fn derived_facts() {
    let m = LayerMap::lckv(22, 2);
    assert_eq!(m.slot_layers(), vec![0, 20, 21]);
    assert_eq!((m.slot_of(0), m.slot_of(5), m.slot_of(20), m.slot_of(21)), (0, 1, 1, 2));
    assert!(m.attends_upward(1) && m.attends_upward(19) && !m.attends_upward(20) && !m.attends_upward(0));
    assert_eq!(m.prefill_groups(), vec![1..=20]);
    assert_eq!((m.mask(5), m.mask(20), m.mask(21)), (MaskMode::Strict, MaskMode::Causal, MaskMode::Causal));
    assert_eq!(m.clone().with_force_nodiag(true).mask(21), MaskMode::Strict);
    let c = LayerMap::cla(22, 2);
    assert_eq!(c.slot_layers().len(), 11);
    assert!(c.prefill_groups().is_empty());
    let y = LayerMap::yoco(22, 8);
    assert_eq!(y.slot_layers(), (0..12).collect::<Vec<_>>());
    assert_eq!((y.window_of(3), y.window_of(11)), (Some(8), None));
    // Two separate upward groups, and one that a later target extends.
    let g = LayerMap::parse("0_2_2_3_5_5_6", 7).unwrap();
    assert_eq!(g.prefill_groups(), vec![1..=2, 4..=5]);
    let g = LayerMap::parse("0_2_2_4_4", 5).unwrap();
    assert_eq!(g.prefill_groups(), vec![1..=2, 3..=4]);
    let g = LayerMap::parse("0_3_4_3_4", 5).unwrap();
    assert_eq!(g.prefill_groups(), vec![1..=4]);
}

#[test]
fn memory_formula() {
    let m = LayerMap::lckv(22, 2).memory(4, 64, DType::F16);
    assert_eq!(m.standard_per_token, 2 * 22 * 4 * 64 * 2);
    assert_eq!(m.mapped_per_token, 2 * 3 * 4 * 64 * 2);
    let y = LayerMap::yoco(22, 8).memory(4, 64, DType::F32);
    assert_eq!((y.mapped_per_token, y.full_slots_per_token, y.windowed_slots), (12 * 2048, 2048, 11));
}

#[test]
fn bad_layer_types() {
    let e = |t: &str, n| LayerMap::parse(t, n).unwrap_err();
    assert_eq!(e("0_0_2", 4), LayerMapError::WrongLayerCount { expected: 4, got: 3 });
    assert_eq!(e("0_5_2", 3), LayerMapError::TargetOutOfRange { layer: 1, target: 5, layers: 3 });
    assert_eq!(e("0_2_1", 3), LayerMapError::TargetComputesNoKv { layer: 1, target: 2 });
    assert_eq!(e("0s_0_2", 3), LayerMapError::SlidingMismatch { layer: 1, target: 0 });
    for bad in ["0__1", "0_x", "0_1ss", "", "0_-1", "0_ 1", "s_1"] {
        assert!(matches!(LayerMap::parse(bad, 2), Err(LayerMapError::Malformed { .. })), "{bad:?}");
    }
    let err: frugal_attn::Error = e("0_5", 2).into();
    assert_eq!(err.argument(), Some("layer_types"));
    // Sliding layers need a window before a cache or model is built.
    let no_window = LayerMap::parse("0s_1", 2).unwrap();
    assert_eq!(no_window.validate().unwrap_err().argument(), Some("window"));
}

// ------------------------------------------------------- kernels vs reference

/// Every mask, with and without a window, GQA 1/4/7, head dims 64/80/96/128, every dtype.
fn masks_and_windows(backend: &Backend) {
    let cases = [
        (shape(2, 7, 4, 1, 64, 40), vec![0, 20], vec![7, 27]),
        (shape(1, 5, 7, 1, 80, 100), vec![95], vec![100]),
        (shape(3, 1, 8, 2, 96, 300), vec![299, 0, 150], vec![300, 1, 150]),
        (shape(1, 3, 2, 2, 128, 70), vec![3], vec![6]),
    ];
    let mut seed = 0;
    for (s, pos, lens) in cases {
        for mask in [MaskMode::Causal, MaskMode::Strict, MaskMode::Full] {
            for window in [None, Some(1), Some(13)] {
                for dtype in DType::ALL {
                    seed += 1;
                    let p = AttnParams::new(s, mask).with_window(window);
                    check(backend, &p, dtype, pos.clone(), lens.clone(), seed);
                }
            }
        }
    }
}

/// Ring-buffer slots: positions far past the rows, chunks, windows.
fn ring_slots(backend: &Backend) {
    let (w, n) = (16, 5);
    let s = shape(2, n, 4, 2, 64, ring_rows(w, n));
    for mask in [MaskMode::Causal, MaskMode::Strict] {
        for dtype in DType::ALL {
            let p = AttnParams::new(s, mask).with_window(Some(w)).with_ring(true);
            check(backend, &p, dtype, vec![1000, 3], vec![1005, 8], 40);
        }
    }
    let d = shape(3, 1, 7, 1, 96, 33);
    for dtype in DType::ALL {
        let p = AttnParams::new(d, MaskMode::Full).with_window(Some(33)).with_ring(true);
        check(backend, &p, dtype, vec![70, 5, 33], vec![70, 5, 33], 41);
    }
}

/// Rows with no key are exactly 0; a plain slot given too long a length is NaN.
fn empty_rows_and_bad_lengths(backend: &Backend) {
    let s = shape(2, 3, 2, 1, 64, 8);
    let p = AttnParams::new(s, MaskMode::Strict);
    let mut rng = Rng::new(5);
    let x = AttnInputs::random(&p, DType::F16, vec![0, 0], vec![3, 9], &mut rng);
    let got = run(backend, &p, &x).unwrap();
    let d = 64 * 2;
    assert!(got[..d].iter().all(|&v| v == 0.0), "position 0 strict must be exactly 0");
    assert!(got[d..3 * d].iter().all(|v| v.is_finite()));
    assert!(got[3 * d..].iter().all(|v| v.is_nan()), "kv_len 9 > 8 rows must give NaN");
    let full = AttnParams::new(shape(1, 1, 2, 1, 64, 8), MaskMode::Full);
    let x = AttnInputs::random(&full, DType::F32, vec![0], vec![0], &mut rng);
    assert!(run(backend, &full, &x).unwrap().iter().all(|&v| v == 0.0));
}

/// strict(q[0..n], k[0..n]) = [0; causal(q[1..n], k[0..n-1])].
fn strict_equals_shifted_causal(backend: &Backend) {
    let (n, d) = (37, 80);
    let s = shape(1, n, 4, 1, d, n);
    let strict = AttnParams::new(s, MaskMode::Strict);
    let mut rng = Rng::new(9);
    let x = AttnInputs::random(&strict, DType::F32, vec![0], vec![n as u32], &mut rng);
    let got = run(backend, &strict, &x).unwrap();
    // causal over the queries 1..n at positions 0..n-1 and the keys 0..n-1.
    let causal = AttnParams::new(shape(1, n - 1, 4, 1, d, n), MaskMode::Causal);
    let qh = x.q.to_f64();
    let shifted = HostData::from_f32(DType::F32, &qh[4 * d..].iter().map(|&v| v as f32).collect::<Vec<_>>());
    let y = AttnInputs { q: shifted, q_pos: vec![0], kv_lens: vec![n as u32 - 1], ..x.clone() };
    let want = run(backend, &causal, &y).unwrap();
    assert!(got[..4 * d].iter().all(|&v| v == 0.0));
    let err = rel_l2(&got[4 * d..], &want);
    assert!(err <= 1e-6, "{backend:?}: {err:e}");
}

/// The window convention: keys `i - w < j <= i` (causal), `i - w < j < i` (strict).
#[test]
fn window_convention() {
    use frugal_attn::crosslayer::reference::visible;
    let s = shape(1, 1, 1, 1, 8, 100);
    let keys = |mask, w: usize, i: u64, len: u64| -> Vec<u64> {
        let p = AttnParams::new(s, mask).with_window(Some(w));
        (0..len).filter(|&j| visible(&p, i, j, len)).collect()
    };
    assert_eq!(keys(MaskMode::Causal, 3, 5, 50), vec![3, 4, 5]);
    assert_eq!(keys(MaskMode::Strict, 3, 5, 50), vec![3, 4]);
    assert_eq!(keys(MaskMode::Causal, 3, 1, 50), vec![0, 1]);
    // Decode of an upward layer at position i = kv_len: the window's newest key is i - 1.
    assert_eq!(keys(MaskMode::Full, 3, 7, 7), vec![5, 6]);
    // A ring slot of 4 rows holding positions 0..10 still has 6..10 only.
    let ring = AttnParams::new(shape(1, 1, 1, 1, 8, 4), MaskMode::Causal).with_window(Some(4)).with_ring(true);
    assert_eq!((0..10).filter(|&j| visible(&ring, 9, j, 10)).collect::<Vec<_>>(), vec![6, 7, 8, 9]);
}

/// Window 1 under the causal mask attends exactly the query's own position: the output is that V row.
fn window_one_is_own_value(backend: &Backend) {
    let (n, d) = (9, 64);
    let p = AttnParams::new(shape(1, n, 2, 1, d, n), MaskMode::Causal).with_window(Some(1));
    let x = AttnInputs::random(&p, DType::F32, vec![0], vec![n as u32], &mut Rng::new(77));
    let got = run(backend, &p, &x).unwrap();
    let v = x.v.to_f64();
    for t in 0..n {
        for h in 0..2 {
            let row = &got[(t * 2 + h) * d..][..d];
            assert!(rel_l2(row, &v[t * d..][..d]) <= 1e-6, "{backend:?} t={t}");
        }
    }
}

/// Padded, token-major strides.
fn strided_layouts(backend: &Backend) {
    let s = shape(2, 3, 6, 3, 64, 50);
    let layout = AttnLayout {
        q: [3 * 6 * 70, 6 * 70, 70],
        k: [50 * 3 * 64 + 9, 64, 3 * 64],
        v: [3 * 50 * 64, 50 * 64, 64],
        o: [64, 2 * 64 + 4, 6 * (2 * 64 + 4) * 3],
    };
    for dtype in DType::ALL {
        let p = AttnParams::new(s, MaskMode::Causal).with_layout(layout).with_window(Some(20));
        check(backend, &p, dtype, vec![40, 10], vec![43, 13], 50);
    }
}

/// A cache's write then attend equals the reference over the same contents.
fn cache_write_and_device_bytes(backend: &Backend) {
    let map = LayerMap::yoco(4, 6);
    let mut cache = CrossLayerCache::new(backend, &map, DType::F32, 2, 4, 2, 64, 100, 4).unwrap();
    // Slots: layers 0 and 1 are rings of 6 + 4 - 1 = 9 rows, layer 2 a plain slot of 100.
    assert_eq!(cache.spec.slots, vec![(9, true), (9, true), (100, false)]);
    assert_eq!(cache.device_bytes(), 2 * 2 * 2 * 64 * 4 * (9 + 9 + 100));
    let mut rng = Rng::new(3);
    let (kv_rows, q_rows) = (2 * 2 * 64, 2 * 4 * 64);
    let mut hk: Vec<Vec<f32>> = vec![Vec::new(); 2];
    let mut hv: Vec<Vec<f32>> = vec![Vec::new(); 2];
    // 7 appends of 3 tokens into ring slot 0; track the logical history per sequence.
    for step in 0..7u32 {
        let nk = HostData::random(DType::F32, 3 * kv_rows, &mut rng);
        let nv = HostData::random(DType::F32, 3 * kv_rows, &mut rng);
        cache.write(0, &[3 * step, 3 * step], &nk, &nv).unwrap();
        for (dst, src) in [(&mut hk, &nk), (&mut hv, &nv)] {
            let f = src.to_f64();
            for (b, h) in dst.iter_mut().enumerate() {
                h.extend(f[b * 3 * 128..][..3 * 128].iter().map(|&x| x as f32));
            }
        }
    }
    assert_eq!(cache.lens(0), &[21, 21]);
    let q = HostData::random(DType::F32, 3 * q_rows, &mut rng);
    let got = cache.attend(0, &q, &[18, 18], &[21, 21], MaskMode::Causal, Some(6)).unwrap();
    // Reference: the same history in a plain slot of 21 rows ([B, T, H_kv, D] -> [B, H_kv, S, D]).
    let mut k = vec![0f32; 2 * 2 * 21 * 64];
    let mut v = k.clone();
    for b in 0..2 {
        for t in 0..21 {
            for g in 0..2 {
                for d in 0..64 {
                    k[((b * 2 + g) * 21 + t) * 64 + d] = hk[b][(t * 2 + g) * 64 + d];
                    v[((b * 2 + g) * 21 + t) * 64 + d] = hv[b][(t * 2 + g) * 64 + d];
                }
            }
        }
    }
    let p = AttnParams::new(shape(2, 3, 4, 2, 64, 21), MaskMode::Causal).with_window(Some(6));
    let qv: Vec<f32> = q.to_f64().iter().map(|&x| x as f32).collect();
    let want = frugal_attn::crosslayer::reference::attend::<f32>(&p, &qv, &k, &v, &[18, 18], &[21, 21]).unwrap();
    let err = rel_l2(&got, &want);
    assert!(err <= 1e-5, "{backend:?}: {err:e}");
}

/// The saving as the device's allocations show it: full slots cost exactly
/// (distinct targets / layers) of the standard cache; sliding-window slots
/// cost their window, whatever the context.
fn memory_from_device_allocations(backend: &Backend) {
    let (tokens, kv_heads, d) = (1000, 2, 64);
    for map in [LayerMap::lckv(22, 2), LayerMap::cla(22, 2), LayerMap::cla(7, 3)] {
        let (mapped, standard) =
            frugal_attn::crosslayer::run::allocated_bytes(backend, &map, DType::F16, kv_heads, d, tokens).unwrap();
        let m = map.memory(kv_heads, d, DType::F16);
        assert_eq!(standard, tokens * m.standard_per_token, "{backend:?} {map}");
        assert_eq!(mapped, tokens * m.mapped_per_token, "{backend:?} {map}");
        assert_eq!(mapped * map.layers(), standard * map.slot_layers().len(), "{backend:?} {map}");
    }
    let yoco = LayerMap::yoco(8, 16);
    let (mapped, standard) =
        frugal_attn::crosslayer::run::allocated_bytes(backend, &yoco, DType::F32, 2, 64, 300).unwrap();
    let row = 2 * 2 * 64 * 4;
    // Layers 0..3 own ring slots of 16 rows, layer 4 a full slot; the standard cache has 8 full ones.
    assert_eq!((mapped, standard), (row * (4 * 16 + 300), row * 8 * 300), "{backend:?}");
}

// ------------------------------------------------------------- tiny model

fn model(map: LayerMap, rope: bool, seed: u64) -> TinyModel {
    TinyModel::random(map, 4, 2, 16, rope, &mut Rng::new(seed)).unwrap()
}

fn embeddings(n: usize, e: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    (0..n * e).map(|_| rng.uniform(-1.0, 1.0) as f64).collect()
}

/// Token-by-token decode equals the parallel prefill iterated to convergence
/// (n passes make every position exact).
fn decode_matches_converged_prefill(map: LayerMap, rope: bool, n: usize, chunk: usize) {
    let m = model(map, rope, 7);
    let e = m.hidden();
    let x = embeddings(n, e, 8);
    let mut par = HostKv::new(m.slot_spec(n, n).unwrap());
    let want = m.prefill(&mut par, &x, 0, n).unwrap();
    // Token by token.
    let mut seq = HostKv::new(m.slot_spec(n, 1).unwrap());
    let mut got = Vec::new();
    for i in 0..n {
        got.extend(m.decode(&mut seq, &x[i * e..][..e], i).unwrap());
    }
    let err = rel_l2(&got, &want);
    assert!(err <= 1e-12, "{}: decode vs prefill {err:e}", m.map);
    // Chunked prefill of the first part, decode of the rest.
    let mut mixed = HostKv::new(m.slot_spec(n, chunk).unwrap());
    let mut got = Vec::new();
    let mut start = 0;
    while start + chunk <= n / 2 {
        got.extend(m.prefill(&mut mixed, &x[start * e..(start + chunk) * e], start, chunk).unwrap());
        start += chunk;
    }
    for i in start..n {
        got.extend(m.decode(&mut mixed, &x[i * e..][..e], i).unwrap());
    }
    let err = rel_l2(&got, &want);
    assert!(err <= 1e-12, "{}: chunked prefill + decode vs prefill {err:e}", m.map);
}

#[test]
fn tiny_model_lckv() {
    decode_matches_converged_prefill(LayerMap::lckv(6, 2), true, 12, 3);
    decode_matches_converged_prefill(LayerMap::lckv(6, 2).with_force_nodiag(true), false, 10, 4);
}

#[test]
fn tiny_model_cla() {
    decode_matches_converged_prefill(LayerMap::cla(6, 2), true, 12, 3);
    decode_matches_converged_prefill(LayerMap::cla(5, 3), false, 9, 2);
}

#[test]
fn tiny_model_yoco() {
    decode_matches_converged_prefill(LayerMap::yoco(6, 4), true, 13, 3);
    decode_matches_converged_prefill(LayerMap::yoco(4, 1), false, 7, 2);
}

/// Fewer passes than tokens leave the later positions unconverged: the
/// iteration is doing the work (and the default suffices for short chunks).
#[test]
fn prefill_passes_matter() {
    let m = model(LayerMap::lckv(6, 2), false, 11);
    let (n, e) = (12, m.hidden());
    let x = embeddings(n, e, 12);
    let exact = m.prefill(&mut HostKv::new(m.slot_spec(n, n).unwrap()), &x, 0, n).unwrap();
    let one = m.prefill(&mut HostKv::new(m.slot_spec(n, n).unwrap()), &x, 0, 1).unwrap();
    assert!(rel_l2(&one, &exact) > 1e-6);
    // Position p is exact after p + 1 passes.
    assert!(rel_l2(&one[..e], &exact[..e]) <= 1e-14);
    let short = &x[..9 * e];
    let default = m.prefill_default(&mut HostKv::new(m.slot_spec(9, 9).unwrap()), short, 0).unwrap();
    assert!(rel_l2(&default, &exact[..9 * e]) <= 1e-14);
}

/// The model on each backend's cache equals the f64 host model.
fn tiny_model_on_backend(backend: &Backend) {
    for (map, dtype) in
        [(LayerMap::lckv(4, 2), DType::F32), (LayerMap::cla(4, 2), DType::F16), (LayerMap::yoco(4, 3), DType::Bf16)]
    {
        let m = model(map, true, 21);
        let (n, e) = (8, m.hidden());
        let x = embeddings(n, e, 22);
        let want = m.prefill(&mut HostKv::new(m.slot_spec(n, 4).unwrap()), &x[..4 * e], 0, 4).unwrap();
        let mut cache = CrossLayerCache::new(backend, &m.map, dtype, 1, 4, 2, 16, n, 4).unwrap();
        let got = m.prefill(&mut cache, &x[..4 * e], 0, 4).unwrap();
        let err = rel_l2(&got, &want);
        assert!(err <= 10.0 * dtype.tolerance(), "{backend:?} {} {dtype}: prefill {err:e}", m.map);
        let mut want_dec = HostKv::new(m.slot_spec(n, 4).unwrap());
        m.prefill(&mut want_dec, &x[..4 * e], 0, 4).unwrap();
        for i in 4..n {
            let w = m.decode(&mut want_dec, &x[i * e..][..e], i).unwrap();
            let g = m.decode(&mut cache, &x[i * e..][..e], i).unwrap();
            let err = rel_l2(&g, &w);
            assert!(err <= 10.0 * dtype.tolerance(), "{backend:?} {} {dtype}: decode {i} {err:e}", m.map);
        }
    }
}

/// The decode form (one query per sequence: split-KV, head-grouped kernels on
/// the GPUs): GQA 1/4/7, head dims 64/80/128, every dtype and mask, windows,
/// wrapped ring slots, ragged lengths, empty intervals, and a batch-1 case
/// long enough for several splits.
fn decode_form(backend: &Backend) {
    let mut seed = 100;
    for (q_heads, kv_heads, d) in [(2, 2, 64), (8, 2, 80), (7, 1, 128)] {
        let s = shape(3, 1, q_heads, kv_heads, d, 50);
        for mask in [MaskMode::Causal, MaskMode::Strict, MaskMode::Full] {
            for window in [None, Some(9)] {
                for dtype in DType::ALL {
                    seed += 1;
                    let p = AttnParams::new(s, mask).with_window(window);
                    // Ragged; sequence 1 strict at position 0 is empty.
                    check(backend, &p, dtype, vec![37, 0, 49], vec![38, 1, 50], seed);
                }
            }
        }
        let ring = AttnParams::new(shape(2, 1, q_heads, kv_heads, d, 12), MaskMode::Causal)
            .with_window(Some(12))
            .with_ring(true);
        check(backend, &ring, DType::F16, vec![130, 7], vec![131, 8], seed + 1);
    }
    let long = AttnParams::new(shape(1, 1, 8, 1, 64, 1500), MaskMode::Causal);
    assert!(long.plan().unwrap().num_splits > 1);
    check(backend, &long, DType::Bf16, vec![1400], vec![1401], 7);
    let long_ring =
        AttnParams::new(shape(1, 1, 4, 1, 64, 1100), MaskMode::Strict).with_window(Some(1100)).with_ring(true);
    check(backend, &long_ring, DType::F32, vec![5000], vec![5000], 8);
    // Empty intervals are exactly 0.
    let p = AttnParams::new(shape(2, 1, 4, 2, 64, 8), MaskMode::Strict);
    let x = AttnInputs::random(&p, DType::F32, vec![0, 0], vec![0, 5], &mut Rng::new(3));
    assert!(run(backend, &p, &x).unwrap().iter().all(|&v| v == 0.0));
}

/// A GPU launcher given a workspace smaller than `workspace_bytes` names it.
fn bad_workspace(backend: &Backend) {
    let p = AttnParams::new(shape(1, 1, 4, 1, 64, 5000), MaskMode::Causal);
    assert!(p.workspace_bytes() > 256);
    assert_eq!(AttnParams::new(shape(1, 2, 4, 1, 64, 10), MaskMode::Causal).workspace_bytes(), 0);
    if let Backend::Wgpu(w) = backend {
        let _gate = w.exclusive();
        let buf = |n: usize| w.upload(&vec![0u8; n.next_multiple_of(4)]);
        let (q, k, v, pos, lens, o) = (buf(1024), buf(5000 * 256), buf(5000 * 256), buf(4), buf(4), buf(1024));
        let ws = WgpuWorkspace::new(w, 256);
        let t = WgpuTensor::new;
        let mut enc = w.device().create_command_encoder(&Default::default());
        let err = frugal_attn::crosslayer::wgpu::attend(
            w,
            &mut enc,
            &p,
            DType::F32,
            t(&q),
            t(&k),
            t(&v),
            t(&pos),
            t(&lens),
            t(&o),
            &ws,
        )
        .unwrap_err();
        assert_eq!(err.argument(), Some("workspace"));
    }
    if let Backend::Cuda(c) = backend {
        let z = |n: usize| c.stream().alloc_zeros::<f32>(n).unwrap();
        let (q, k, v, mut o) = (z(256), z(5000 * 64), z(5000 * 64), z(256));
        let u = c.stream().alloc_zeros::<u32>(1).unwrap();
        let mut ws = CudaWorkspace::new(c.stream(), 256).unwrap();
        let err = frugal_attn::crosslayer::cuda::attend::<f32>(c, c.stream(), &p, &q, &k, &v, &u, &u, &mut o, &mut ws)
            .unwrap_err();
        assert_eq!(err.argument(), Some("workspace"));
    }
}

// ------------------------------------------------------------- bad input

/// A written argument (`out`, the workspace, a slot) sharing its wgpu buffer,
/// or on CUDA its device memory, with another is refused, naming it, in both
/// attention forms and in slot writes. The CPU launchers take what they write
/// by `&mut`, so safe Rust rules the aliasing out there; on CUDA an engine's
/// own allocations can alias.
fn aliasing(backend: &Backend) {
    if let Backend::Cuda(c) = backend {
        let st = c.stream();
        let arena = st.alloc_zeros::<f32>(1024).unwrap();
        let f32s = |off: usize, len: usize| common::CudaAlias::<f32>::of(st, &arena, 4 * off, len);
        let u32s = |off: usize, len: usize| common::CudaAlias::<u32>::of(st, &arena, 4 * off, len);
        for queries in [1, 2] {
            let p = AttnParams::new(shape(1, queries, 2, 1, 16, 8), MaskMode::Causal);
            let mut ws = frugal_attn::backend::CudaWorkspace::new(st, p.workspace_bytes()).unwrap();
            // Element offsets into one allocation of q, k_slot, v_slot, q_pos, kv_lens and out.
            let mut launch = |[q, k, v, pos, lens, o]: [usize; 6]| {
                let (q, k, v) = (f32s(q, p.q_len()), f32s(k, p.k_len()), f32s(v, p.v_len()));
                let (pos, lens, mut o) = (u32s(pos, 1), u32s(lens, 1), f32s(o, p.o_len()));
                frugal_attn::crosslayer::cuda::attend(c, st, &p, &*q, &*k, &*v, &*pos, &*lens, &mut *o, &mut ws)
            };
            // q 0..64, k 64..192, v 192..320, q_pos 320, kv_lens 321, out 322..: adjacent, not overlapping.
            launch([0, 64, 192, 320, 321, 322]).unwrap_or_else(|e| panic!("{queries} queries, disjoint ranges: {e}"));
            let cases = [
                ([0, 64, 192, 320, 321, 10], "out overlaps q"),
                ([0, 64, 192, 320, 321, 100], "out overlaps k_slot"),
                ([0, 64, 192, 320, 330, 322], "kv_lens inside out"),
            ];
            for (offsets, case) in cases {
                common::assert_refused(launch(offsets), "out", &format!("{queries} queries, {case}"));
            }
        }
        let wp = WriteParams::new(1, 1, 1, 16, 8, false);
        let write = |[nk, nv, start, ks, vs]: [usize; 5]| {
            let (nk, nv, start) = (f32s(nk, wp.new_len()), f32s(nv, wp.new_len()), u32s(start, 1));
            let (mut ks, mut vs) = (f32s(ks, wp.slot_len()), f32s(vs, wp.slot_len()));
            frugal_attn::crosslayer::cuda::write(c, st, &wp, &*nk, &*nv, &*start, &mut *ks, &mut *vs)
        };
        // new_k 0..16, new_v 16..32, start 32, k_slot 33..161, v_slot 161..289.
        write([0, 16, 32, 33, 161]).unwrap_or_else(|e| panic!("write: disjoint ranges rejected: {e}"));
        common::assert_refused(write([0, 16, 32, 8, 161]), "k_slot", "write, k_slot overlaps new_k");
        common::assert_refused(write([0, 16, 32, 33, 100]), "k_slot", "write, v_slot overlaps k_slot");
        common::assert_refused(write([0, 16, 200, 33, 161]), "v_slot", "write, start inside v_slot");
        st.synchronize().unwrap();
        return;
    }
    let Backend::Wgpu(w) = backend else { return };
    let _gate = w.exclusive();
    let buf = || w.upload(&[0u8; 4096]);
    let (q, k, v, pos, lens, o) = (buf(), buf(), buf(), buf(), buf(), buf());
    for queries in [1, 2] {
        let p = AttnParams::new(shape(1, queries, 2, 1, 16, 8), MaskMode::Causal);
        let ws = WgpuWorkspace::new(w, p.workspace_bytes());
        let launch = |[q, k, v, pos, lens, o]: [&wgpu::Buffer; 6]| {
            let mut enc = w.device().create_command_encoder(&Default::default());
            let (dt, ws, t) = (DType::F32, &ws, WgpuTensor::new);
            frugal_attn::crosslayer::wgpu::attend(w, &mut enc, &p, dt, t(q), t(k), t(v), t(pos), t(lens), t(o), ws)
        };
        launch([&q, &k, &v, &pos, &lens, &o]).unwrap_or_else(|e| panic!("{queries} queries: distinct buffers: {e}"));
        let wsb = ws.buffer();
        let cases: [([&wgpu::Buffer; 6], &str, &str); 5] = [
            ([&q, &k, &v, &pos, &lens, &q], "out", "out = q"),
            ([&q, &k, &v, &pos, &lens, &k], "out", "out = k_slot"),
            ([&q, &k, &v, &pos, &o, &o], "out", "out = kv_lens"),
            ([wsb, &k, &v, &pos, &lens, &o], "workspace", "q = workspace"),
            ([&q, &k, &v, &pos, &lens, wsb], "out", "out = workspace"),
        ];
        for (buffers, arg, case) in cases {
            common::assert_refused(launch(buffers), arg, &format!("{queries} queries, {case}"));
        }
    }
    let wp = WriteParams::new(1, 1, 1, 16, 8, false);
    let write = |[nk, nv, start, ks, vs]: [&wgpu::Buffer; 5]| {
        let (mut enc, t) = (w.device().create_command_encoder(&Default::default()), WgpuTensor::new);
        frugal_attn::crosslayer::wgpu::write(w, &mut enc, &wp, DType::F32, t(nk), t(nv), t(start), t(ks), t(vs))
    };
    write([&q, &v, &pos, &k, &o]).unwrap_or_else(|e| panic!("write: distinct buffers rejected: {e}"));
    common::assert_refused(write([&q, &v, &pos, &q, &o]), "k_slot", "write, k_slot = new_k");
    common::assert_refused(write([&q, &v, &pos, &k, &k]), "k_slot", "write, v_slot = k_slot");
    common::assert_refused(write([&q, &v, &o, &k, &o]), "v_slot", "write, v_slot = start");
}

fn bad_input(backend: &Backend) {
    let s = shape(1, 2, 4, 2, 64, 10);
    let arg = |p: AttnParams| {
        let mut rng = Rng::new(1);
        let x = AttnInputs::random(&AttnParams::new(s, MaskMode::Causal), DType::F32, vec![0], vec![1], &mut rng);
        run(backend, &p, &x).unwrap_err().argument().map(str::to_string)
    };
    let with = |f: fn(&mut AttnShape)| {
        let mut t = s;
        f(&mut t);
        AttnParams::new(t, MaskMode::Causal)
    };
    assert_eq!(arg(with(|t| t.batch = 0)).as_deref(), Some("batch"));
    assert_eq!(arg(with(|t| t.q_heads = 3)).as_deref(), Some("q_heads"));
    assert_eq!(arg(with(|t| t.head_dim = 257)).as_deref(), Some("head_dim"));
    assert_eq!(arg(with(|t| t.queries = 0)).as_deref(), Some("queries"));
    assert_eq!(arg(with(|t| t.rows = 11)).as_deref(), Some("k_slot"));
    assert_eq!(arg(with(|t| t.batch = 2)).as_deref(), Some("q"));
    let p = AttnParams::new(s, MaskMode::Causal);
    assert_eq!(arg(p.with_window(Some(0))).as_deref(), Some("window"));
    assert_eq!(arg(p.with_ring(true)).as_deref(), Some("window"));
    assert_eq!(arg(p.with_window(Some(10)).with_ring(true)).as_deref(), Some("rows"));
    assert_eq!(arg(p.with_scale(f32::NAN)).as_deref(), Some("scale"));
    let mut overlap = p;
    overlap.layout.o = [0, 64, 32];
    assert_eq!(arg(overlap).as_deref(), Some("o_strides"));
    // Cache writes.
    let map = LayerMap::standard(2);
    let mut cache = CrossLayerCache::new(backend, &map, DType::F16, 1, 2, 1, 64, 4, 1).unwrap();
    let nk = HostData::random(DType::F16, 2 * 64, &mut Rng::new(2));
    assert_eq!(cache.write(0, &[3], &nk, &nk).unwrap_err().argument(), Some("start"));
    assert_eq!(cache.write(5, &[0], &nk, &nk).unwrap_err().argument(), Some("slot"));
    let f32k = HostData::random(DType::F32, 64, &mut Rng::new(2));
    assert_eq!(cache.write(0, &[0], &f32k, &f32k).unwrap_err().argument(), Some("new_k"));
    let mut wp = WriteParams::new(1, 5, 1, 64, 4, true);
    assert_eq!(wp.validate().unwrap_err().argument(), Some("tokens"));
    wp.ring = false;
    wp.slot = [0, 0, 32];
    assert_eq!(wp.validate().unwrap_err().argument(), Some("slot_strides"));
    let nowin = LayerMap::parse("0s_1", 2).unwrap();
    assert!(CrossLayerCache::new(backend, &nowin, DType::F32, 1, 1, 1, 8, 8, 1).is_err());
}

backend_tests!(
    masks_and_windows,
    ring_slots,
    empty_rows_and_bad_lengths,
    strict_equals_shifted_causal,
    strided_layouts,
    window_one_is_own_value,
    cache_write_and_device_bytes,
    memory_from_device_allocations,
    tiny_model_on_backend,
    bad_input,
    decode_form,
    bad_workspace,
    aliasing,
);
