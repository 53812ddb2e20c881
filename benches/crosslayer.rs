//! Cross-layer attention throughput per backend (criterion,
//! `Throughput::Bytes` = the K/V rows a launch must read plus q and o):
//! decode of a layer over a shared slot (the whole existing cache, as a layer
//! reading an upper layer's KV sees it), and a chunked-prefill launch
//! (strict mask, many queries).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use frugal_attn::crosslayer::run::{AttnInputs, AttnSession};
use frugal_attn::crosslayer::{AttnParams, AttnShape, MaskMode};
use frugal_attn::host::Rng;
use frugal_attn::{Backend, BackendKind, DType};
use std::time::Duration;

fn shape(batch: usize, queries: usize, q_heads: usize, kv_heads: usize, rows: usize) -> AttnShape {
    AttnShape { batch, queries, q_heads, kv_heads, head_dim: 128, rows }
}

/// (label, params, dtype) per backend: full-size on a GPU, small on a CPU "device".
fn cases(backend: &Backend) -> Vec<(String, AttnParams, DType)> {
    let small = match backend {
        Backend::Cpu => true,
        Backend::Wgpu(w) => w.info().device_type == wgpu::DeviceType::Cpu,
        Backend::Cuda(_) => false,
    };
    let decode = |b, s| AttnParams::new(shape(b, 1, 32, 8, s), MaskMode::Full);
    let chunk = |t, s| AttnParams::new(shape(1, t, 32, 8, s), MaskMode::Strict);
    if small {
        return vec![
            ("decode_b1_h8x2_s2k".into(), AttnParams::new(shape(1, 1, 8, 2, 2048), MaskMode::Full), DType::F32),
            ("chunk16_h8x2_s1k".into(), AttnParams::new(shape(1, 16, 8, 2, 1024), MaskMode::Strict), DType::F32),
        ];
    }
    vec![
        ("decode_b16_h32x8_s16k".into(), decode(16, 16384), DType::F16),
        ("decode_b1_h32x8_s64k".into(), decode(1, 65536), DType::F16),
        ("chunk512_h32x8_s4k".into(), chunk(512, 4096), DType::F16),
    ]
}

fn bench_crosslayer(c: &mut Criterion) {
    for kind in BackendKind::ALL {
        let backend = match kind.open() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("crosslayer bench: skipping {kind}: {e}");
                continue;
            }
        };
        let mut group = c.benchmark_group(format!("crosslayer/{kind}"));
        group.sample_size(10);
        for (label, params, dtype) in cases(&backend) {
            let s = params.shape;
            let lens = vec![s.rows as u32; s.batch];
            // The chunk is the last `queries` positions of the cache.
            let pos: Vec<u32> = lens.iter().map(|&n| n - s.queries as u32).collect();
            let x = AttnInputs::random(&params, dtype, pos, lens.clone(), &mut Rng::new(1));
            let mut session = match AttnSession::new(&backend, &params, &x) {
                Ok(session) => session,
                Err(e) => {
                    eprintln!("crosslayer bench: {kind} {label} {dtype}: {e}");
                    continue;
                }
            };
            group.throughput(Throughput::Bytes(params.bytes_moved(&lens, dtype)));
            group.bench_function(BenchmarkId::new(dtype.name(), &label), |b| {
                b.iter_custom(|iters| {
                    let per_launch = session.time(iters as usize).expect("crosslayer launch failed");
                    Duration::from_secs_f64(per_launch * iters as f64)
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_crosslayer);
criterion_main!(benches);
