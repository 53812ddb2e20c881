//! Ring attention against one blockwise call over the whole sequence
//! (criterion): each case times the ring over N ranks and the same problem as
//! a 1-rank ring, which is exactly one blockwise forward (and one backward)
//! over the whole sequence. Throughput is the dense FLOP count.
//! The H100 target (for later): fwd+bwd over 8 in-process ranks on one GPU,
//! zigzag, causal, 64k tokens, at most 1.1x the single call.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use frugal_attn::host::Rng;
use frugal_attn::ring::run::{self, RingInputs};
use frugal_attn::ring::{RingLayout, RingParams, RingPlan};
use frugal_attn::{Backend, BackendKind, DType};
use std::time::Duration;

/// `(batch, q_heads, kv_heads, head_dim, seq, ranks, dtype)` per backend; the
/// CPU and software adapters get shapes they finish in seconds.
fn cases(backend: &Backend) -> Vec<(usize, usize, usize, usize, usize, usize, DType)> {
    let software = match backend {
        Backend::Cpu => true,
        Backend::Wgpu(w) => w.info().device_type == wgpu::DeviceType::Cpu,
        Backend::Cuda(_) => false,
    };
    if software {
        vec![(1, 2, 1, 32, 128, 4, DType::F32)]
    } else {
        vec![(1, 16, 4, 128, 8192, 8, DType::F16), (1, 16, 4, 128, 65536, 8, DType::Bf16)]
    }
}

fn bench_ring(c: &mut Criterion) {
    for kind in BackendKind::ALL {
        let backend = match kind.open() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("ring bench: skipping {kind}: {e}");
                continue;
            }
        };
        let mut group = c.benchmark_group(format!("ring/{kind}"));
        group.sample_size(10);
        for (batch, hq, hkv, d, seq, ranks, dtype) in cases(&backend) {
            for backward in [false, true] {
                for n in [ranks, 1] {
                    let plan = RingPlan::new(n, seq, RingLayout::Zigzag, true).expect("seq splits");
                    let p = RingParams::new(batch, hq, hkv, d, plan);
                    let x = RingInputs::random(&p, dtype, &mut Rng::new(1));
                    let flops = p.forward_flops() * if backward { 3.5 } else { 1.0 };
                    group.throughput(Throughput::Elements(flops as u64));
                    let what = if n == 1 { "one_blockwise_call".to_string() } else { format!("ring{n}_zigzag") };
                    let pass = if backward { "fwd_bwd" } else { "fwd" };
                    let id = BenchmarkId::new(format!("{dtype}_{pass}_causal"), format!("S{seq}_{what}"));
                    if let Err(e) = run::time(&backend, &p, &x, backward, 1) {
                        eprintln!("ring bench: {kind} S={seq} N={n} backward={backward}: {e}");
                        continue;
                    }
                    group.bench_function(id, |b| {
                        b.iter_custom(|iters| {
                            let per = run::time(&backend, &p, &x, backward, iters as usize).expect("ring failed");
                            Duration::from_secs_f64(per * iters as f64)
                        })
                    });
                }
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_ring);
criterion_main!(benches);
