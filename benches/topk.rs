//! Exact top-k throughput against the row length n (criterion, `Throughput::Bytes` =
//! input bytes read plus outputs written). GPU cases include the target
//! shape: 64 rows x 128k f32, k = 8192.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use frugal_attn::host::{HostData, Rng};
use frugal_attn::topk::run::Session;
use frugal_attn::topk::TopkParams;
use frugal_attn::{Backend, BackendKind, DType};
use std::time::Duration;

fn cases(backend: &Backend) -> Vec<TopkParams> {
    let software = match backend {
        Backend::Cpu => return vec![TopkParams::new(4, 8192, 512)],
        Backend::Wgpu(w) => w.info().device_type == wgpu::DeviceType::Cpu,
        Backend::Cuda(_) => false,
    };
    let (rows, ns): (usize, &[usize]) =
        if software { (8, &[4096, 32768]) } else { (64, &[8192, 32768, 131072, 1 << 20]) };
    ns.iter().map(|&n| TopkParams::new(rows, n, n / 16)).collect()
}

fn bench_topk(c: &mut Criterion) {
    for kind in BackendKind::ALL {
        let backend = match kind.open() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("topk bench: skipping {kind}: {e}");
                continue;
            }
        };
        let mut group = c.benchmark_group(format!("topk/{kind}"));
        group.sample_size(10);
        for p in cases(&backend) {
            let x = HostData::random(DType::F32, p.x_len(), &mut Rng::new(1));
            let mut session = match Session::new(&backend, &p, &x) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("topk bench: {kind} {p:?}: {e}");
                    continue;
                }
            };
            group.throughput(Throughput::Bytes(p.bytes_moved(DType::F32)));
            let id = BenchmarkId::new("f32", format!("rows{}_n{}_k{}", p.rows, p.n, p.k));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let per = session.time(iters as usize).expect("topk launch failed");
                    Duration::from_secs_f64(per * iters as f64)
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_topk);
criterion_main!(benches);
