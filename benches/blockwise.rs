//! Blockwise attention throughput per backend (criterion; `Throughput::Elements`
//! counts FLOPs by the DESIGN.md 6 convention, `4 Sq Sk D heads`, halved for
//! causal, x2.5 for the backward, so criterion's "elem/s" reads as FLOP/s).
//! GPU shapes are the target: bf16, D = 128, Sq = Sk = 8k, 32 heads.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use frugal_attn::blockwise::run::{self, BlockInputs, Pass};
use frugal_attn::blockwise::{BlockParams, BlockShape, Mask};
use frugal_attn::host::Rng;
use frugal_attn::{Backend, BackendKind, DType};
use std::time::Duration;

fn shape(q_heads: usize, kv_heads: usize, head_dim: usize, seq: usize) -> BlockShape {
    BlockShape { batch: 1, q_heads, kv_heads, head_dim, q_len: seq, kv_len: seq }
}

/// (label, shape, dtype) per backend: the shape on a GPU, tiny where the
/// "device" is a CPU (the f64 reference, or lavapipe).
fn cases(backend: &Backend) -> Vec<(String, BlockShape, DType)> {
    let on_cpu = match backend {
        Backend::Cpu => return vec![("h4_s128_d64".into(), shape(4, 4, 64, 128), DType::F32)],
        Backend::Wgpu(w) => w.info().device_type == wgpu::DeviceType::Cpu,
        Backend::Cuda(_) => false,
    };
    if on_cpu {
        return vec![("h4_s512_d64".into(), shape(4, 4, 64, 512), DType::F16)];
    }
    vec![
        ("h32_s8k_d128".into(), shape(32, 32, 128, 8192), DType::Bf16),
        ("h32x8_s8k_d128".into(), shape(32, 8, 128, 8192), DType::Bf16),
        ("h32_s8k_d128".into(), shape(32, 32, 128, 8192), DType::F16),
    ]
}

fn bench_blockwise(c: &mut Criterion) {
    for kind in BackendKind::ALL {
        let backend = match kind.open() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("blockwise bench: skipping {kind}: {e}");
                continue;
            }
        };
        let mut group = c.benchmark_group(format!("blockwise/{kind}"));
        group.sample_size(10);
        for (label, s, dtype) in cases(&backend) {
            for mask in [Mask::None, Mask::Causal] {
                let params = BlockParams::new(s, mask);
                let x = BlockInputs::random(&params, dtype, &mut Rng::new(1));
                for pass in [Pass::Forward, Pass::Backward] {
                    let flops = match pass {
                        Pass::Forward => params.forward_flops(),
                        Pass::Backward => params.backward_flops(),
                    };
                    let id = format!(
                        "{}_{}_{}",
                        dtype.name(),
                        if mask == Mask::Causal { "causal" } else { "full" },
                        match pass {
                            Pass::Forward => "fwd",
                            Pass::Backward => "bwd",
                        }
                    );
                    if let Err(e) = run::time(&backend, &params, &x, pass, 1) {
                        eprintln!("blockwise bench: {kind} {label} {id}: {e}");
                        continue;
                    }
                    group.throughput(Throughput::Elements(flops as u64));
                    group.bench_function(BenchmarkId::new(id, &label), |b| {
                        b.iter_custom(|iters| {
                            let per = run::time(&backend, &params, &x, pass, iters as usize)
                                .expect("blockwise launch failed");
                            Duration::from_secs_f64(per * iters as f64)
                        })
                    });
                }
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_blockwise);
criterion_main!(benches);
