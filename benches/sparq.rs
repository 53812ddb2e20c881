//! SparQ decode against this crate's dense decode on the same shapes, side by
//! side in one group (criterion, `Throughput::Bytes` = the bytes each reads per
//! step). GPU cases: batch 16, 32 query heads, 8 KV heads, D = 128, f16,
//! r = 16, k = S/16 at S = 4k, 16k, 64k, and batch 1 at S = 4k.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use frugal_attn::decode::run::{DecodeInputs, Session as DenseSession};
use frugal_attn::decode::DecodeParams;
use frugal_attn::host::Rng;
use frugal_attn::sparq::run::{Session, SparqInputs};
use frugal_attn::sparq::{bytes_model, SparqCacheShape, SparqConfig, SparqParams};
use frugal_attn::{Backend, BackendKind, DType};
use std::time::Duration;

fn cases(backend: &Backend) -> Vec<(usize, usize, usize, usize)> {
    // (batch, q_heads, kv_heads, S)
    match backend {
        Backend::Cpu => vec![],
        Backend::Wgpu(w) if w.info().device_type == wgpu::DeviceType::Cpu => vec![(1, 8, 2, 4096)],
        _ => vec![(16, 32, 8, 4096), (16, 32, 8, 16384), (16, 32, 8, 65536), (1, 32, 8, 4096)],
    }
}

fn bench_sparq(c: &mut Criterion) {
    for kind in [BackendKind::Cuda, BackendKind::Wgpu] {
        let backend = match kind.open() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("sparq bench: skipping {kind}: {e}");
                continue;
            }
        };
        let mut group = c.benchmark_group(format!("sparq/{kind}"));
        group.sample_size(10);
        for (batch, q_heads, kv_heads, s) in cases(&backend) {
            let dtype = DType::F16;
            let cache = SparqCacheShape { batch, kv_heads, head_dim: 128, capacity: s };
            let p = SparqParams::new(cache, q_heads, SparqConfig::new(16, s / 16));
            let lens = vec![s as u32; batch];
            let x = SparqInputs::random(&p, dtype, lens.clone(), &mut Rng::new(1));
            let label = format!("b{batch}_h{q_heads}x{kv_heads}_s{}k", s / 1024);
            let (sparq_bytes, dense_bytes) = bytes_model(&p, &lens, dtype);
            // The SparQ cache is freed before the dense inputs are uploaded.
            {
                let session = Session::new(&backend, &p, &x, 0);
                match session {
                    Ok(mut session) => {
                        group.throughput(Throughput::Bytes(sparq_bytes));
                        group.bench_function(BenchmarkId::new("sparq_f16", &label), |b| {
                            b.iter_custom(|iters| {
                                let per = session.time(iters as usize).expect("sparq launch failed");
                                Duration::from_secs_f64(per * iters as f64)
                            })
                        });
                    }
                    Err(e) => eprintln!("sparq bench: {kind} {label}: {e}"),
                }
            }
            let dp = DecodeParams::new(p.decode_shape());
            let dx = DecodeInputs { q: x.q, k: x.k, v: x.v, seq_lens: lens };
            let dense = DenseSession::new(&backend, &dp, &dx);
            match dense {
                Ok(mut session) => {
                    group.throughput(Throughput::Bytes(dense_bytes));
                    group.bench_function(BenchmarkId::new("dense_f16", &label), |b| {
                        b.iter_custom(|iters| {
                            let per = session.time(iters as usize).expect("decode launch failed");
                            Duration::from_secs_f64(per * iters as f64)
                        })
                    });
                }
                Err(e) => eprintln!("sparq bench: dense {kind} {label}: {e}"),
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_sparq);
criterion_main!(benches);
