//! Dense decode throughput per backend (criterion, `Throughput::Bytes` = the K/V
//! bytes one decode step must read). GPU shapes include the target:
//! batch 16, 32 query heads, 8 KV heads, S = 16k, D = 128, f16.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use frugal_attn::decode::run::{DecodeInputs, Session};
use frugal_attn::decode::{DecodeParams, DecodeShape};
use frugal_attn::host::Rng;
use frugal_attn::{Backend, BackendKind, DType};
use std::time::Duration;

fn shape(batch: usize, q_heads: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> DecodeShape {
    DecodeShape { batch, q_heads, kv_heads, head_dim, capacity }
}

/// (label, shape, dtype) per backend: full-size on a GPU, small where the
/// "device" is a CPU (the f64 reference, or lavapipe).
fn cases(backend: &Backend) -> Vec<(String, DecodeShape, DType)> {
    let on_cpu = match backend {
        Backend::Cpu => return vec![("b1_h8x2_s1k_d128".into(), shape(1, 8, 2, 128, 1024), DType::F32)],
        Backend::Wgpu(w) => w.info().device_type == wgpu::DeviceType::Cpu,
        Backend::Cuda(_) => false,
    };
    if on_cpu {
        return vec![
            ("b1_h8x2_s4k_d128".into(), shape(1, 8, 2, 128, 4096), DType::F16),
            ("b1_h8x2_s4k_d128".into(), shape(1, 8, 2, 128, 4096), DType::F32),
        ];
    }
    let mut v = Vec::new();
    for (b, s) in [(16, 4096), (16, 16384), (1, 4096), (1, 65536)] {
        v.push((format!("b{b}_h32x8_s{}k_d128", s / 1024), shape(b, 32, 8, 128, s), DType::F16));
    }
    v.push(("b16_h32x8_s16k_d128".into(), shape(16, 32, 8, 128, 16384), DType::Bf16));
    v.push(("b16_h32x8_s16k_d128".into(), shape(16, 32, 8, 128, 16384), DType::F32));
    v
}

fn bench_decode(c: &mut Criterion) {
    for kind in BackendKind::ALL {
        let backend = match kind.open() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("decode bench: skipping {kind}: {e}");
                continue;
            }
        };
        let mut group = c.benchmark_group(format!("decode/{kind}"));
        group.sample_size(10);
        for (label, s, dtype) in cases(&backend) {
            let params = DecodeParams::new(s);
            let lens = vec![s.capacity as u32; s.batch];
            let x = DecodeInputs::random(&params, dtype, lens.clone(), &mut Rng::new(1));
            let mut session = match Session::new(&backend, &params, &x) {
                Ok(session) => session,
                Err(e) => {
                    eprintln!("decode bench: {kind} {label} {dtype}: {e}");
                    continue;
                }
            };
            group.throughput(Throughput::Bytes(params.bytes_moved(&lens, dtype)));
            group.bench_function(BenchmarkId::new(dtype.name(), &label), |b| {
                b.iter_custom(|iters| {
                    let per_launch = session.time(iters as usize).expect("decode launch failed");
                    Duration::from_secs_f64(per_launch * iters as f64)
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
