//! Ring attention over NCCL: one process per GPU, forward and backward, each
//! rank checking its shard of the output and gradients against dense
//! attention by the f64 reference. Rank 0 makes the NCCL id and writes it to
//! a file the others wait for (any channel the launcher has will do).
//!
//! ```sh
//! cargo build --release --features nccl --example ring_nccl
//! rm -f /tmp/ring.id
//! for r in 0 1; do
//!   CUDA_VISIBLE_DEVICES=$r target/release/examples/ring_nccl $r 2 /tmp/ring.id &
//! done; wait
//! ```
//! Across machines: the same command on each, with the id file on a shared
//! path (or copied), and NCCL's usual environment (`NCCL_SOCKET_IFNAME`, ...).

use frugal_attn::backend::CudaBackend;
use frugal_attn::host::{rel_l2, HostData, Rng};
use frugal_attn::ring::nccl::{id_from_bytes, id_to_bytes, new_id, NcclRing};
use frugal_attn::ring::run::{self, RingInputs};
use frugal_attn::ring::{RingLayout, RingParams, RingPlan};
use frugal_attn::DType;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, rank, world, id_path] = args.as_slice() else {
        return Err("usage: ring_nccl RANK WORLD_SIZE ID_FILE".into());
    };
    let (rank, world): (usize, usize) = (rank.parse()?, world.parse()?);
    let id = if rank == 0 {
        let id = new_id()?;
        // Written under another name and renamed, so no rank reads half a file.
        let tmp = format!("{id_path}.tmp");
        std::fs::write(&tmp, id_to_bytes(&id))?;
        std::fs::rename(&tmp, id_path)?;
        id
    } else {
        let t0 = Instant::now();
        loop {
            match std::fs::read(id_path) {
                Ok(bytes) if bytes.len() == 128 => break id_from_bytes(&bytes)?,
                _ if t0.elapsed() > Duration::from_secs(60) => return Err("rank 0 wrote no id in 60 s".into()),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    };

    let plan = RingPlan::new(world, 256 * world, RingLayout::Zigzag, true)?;
    let p = RingParams::new(1, 8, 2, 64, plan);
    // The same seed everywhere: every process generates the same whole-sequence inputs.
    let x = RingInputs::random(&p, DType::F32, &mut Rng::new(7));
    let f32s = |d: &HostData| d.to_f64().into_iter().map(|v| v as f32).collect::<Vec<f32>>();
    let (qo, ko, d) = (p.batch * p.q_heads, p.batch * p.kv_heads, p.head_dim);
    let mine = |x: &[f32], outer: usize| p.plan.shard(x, outer, d).map(|mut s| s.swap_remove(rank));
    let (q, k, v, d_o) =
        (mine(&f32s(&x.q), qo)?, mine(&f32s(&x.k), ko)?, mine(&f32s(&x.v), ko)?, mine(&f32s(&x.d_o), qo)?);

    let backend = Arc::new(CudaBackend::new(0)?);
    let mut ring = NcclRing::new(backend, &p, rank, id, &q, &k, &v, &d_o)?;
    let t0 = Instant::now();
    ring.forward()?;
    ring.backward()?;
    let (out, _state) = ring.read_forward()?;
    let grads = ring.read_grads()?;
    let secs = t0.elapsed().as_secs_f64();

    let want = run::reference(&p, &x, true)?;
    let w = want.grads.expect("the reference ran the backward");
    let shard64 = |x: &[f64], outer: usize| p.plan.shard(x, outer, d).map(|mut s| s.swap_remove(rank));
    let join = |g: &[Vec<f32>], outer: usize| -> Vec<f64> {
        p.join_segments(rank, g, outer, d).into_iter().map(f64::from).collect()
    };
    let out64: Vec<f64> = out.iter().map(|&x| x as f64).collect();
    let errs = [
        ("out", rel_l2(&out64, &shard64(&want.out, qo)?)),
        ("dq", rel_l2(&join(&grads.dq, qo), &shard64(&w.dq, qo)?)),
        ("dk", rel_l2(&join(&grads.dk, ko), &shard64(&w.dk, ko)?)),
        ("dv", rel_l2(&join(&grads.dv, ko), &shard64(&w.dv, ko)?)),
    ];
    let worst = errs.iter().map(|e| e.1).fold(0.0, f64::max);
    println!("rank {rank}/{world}: {errs:?} in {secs:.3} s: {}", if worst <= 1e-5 { "PASS" } else { "FAIL" });
    if worst > 1e-5 {
        std::process::exit(1);
    }
    Ok(())
}
