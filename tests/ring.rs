//! Ring attention: the schedule as data, shard/unshard, and the ring forward
//! and its gradients against dense attention by the f64 reference, on every
//! backend's transport.

mod common;

use frugal_attn::blockwise::Mask;
use frugal_attn::host::{rel_l2, Rng};
use frugal_attn::ring::run::{self, RingInputs, RingOutput};
use frugal_attn::ring::{RingLayout, RingParams, RingPlan};
use frugal_attn::{Backend, DType};

const RANKS: [usize; 5] = [1, 2, 3, 4, 8];

/// A sequence length each layout can split over `n` ranks, never a multiple of
/// anything convenient: zigzag needs `2N | S`; contiguous gets a short last
/// block; stripe an uneven split.
fn seq_for(layout: RingLayout, n: usize) -> usize {
    match layout {
        RingLayout::Zigzag => 6 * n,
        RingLayout::Contiguous => 3 * n - 1 + usize::from(n == 1),
        RingLayout::Stripe => 3 * n + 1,
    }
}

struct Case {
    ranks: usize,
    seq: usize,
    layout: RingLayout,
    causal: bool,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
}

/// A ring transport under test: runs the forward and backward over every rank
/// on whole-sequence inputs and gathers the results (`run::run` on a backend,
/// or NCCL's ranks as threads).
trait Transport {
    fn run(&self, p: &RingParams, x: &RingInputs) -> RingOutput;
}

impl Transport for Backend {
    fn run(&self, p: &RingParams, x: &RingInputs) -> RingOutput {
        run::run(self, p, x, true).unwrap_or_else(|e| panic!("{e}"))
    }
}

fn check(t: &impl Transport, c: &Case, seed: u64) {
    let plan = RingPlan::new(c.ranks, c.seq, c.layout, c.causal).unwrap();
    let p = RingParams::new(c.batch, c.q_heads, c.kv_heads, c.head_dim, plan);
    let x = RingInputs::random(&p, c.dtype, &mut Rng::new(seed));
    let want = run::reference(&p, &x, true).unwrap();
    let got = t.run(&p, &x);
    let what = format!("N={} S={} {} causal={} {}", c.ranks, c.seq, c.layout, c.causal, c.dtype);
    let tol = c.dtype.tolerance();
    let (g, w) = (got.grads.as_ref().unwrap(), want.grads.as_ref().unwrap());
    for (name, got, want) in [
        ("out", &got.out, &want.out),
        ("lse", &got.lse, &want.lse),
        ("dq", &g.dq, &w.dq),
        ("dk", &g.dk, &w.dk),
        ("dv", &g.dv, &w.dv),
    ] {
        let err = rel_l2(got, want);
        assert!(err <= tol, "{what}: {name} rel err {err:e} > {tol:e}");
    }
}

fn every_rank_count_layout_and_mask(b: &Backend) {
    every_layout_and_mask(b, &RANKS);
}

fn every_layout_and_mask(t: &impl Transport, rank_counts: &[usize]) {
    let mut seed = 0;
    for &ranks in rank_counts {
        for layout in RingLayout::ALL {
            for causal in [false, true] {
                seed += 1;
                let seq = seq_for(layout, ranks);
                let c = Case {
                    ranks,
                    seq,
                    layout,
                    causal,
                    batch: 1,
                    q_heads: 2,
                    kv_heads: 1,
                    head_dim: 16,
                    dtype: DType::F32,
                };
                check(t, &c, seed);
            }
        }
    }
}

fn gqa_batches_and_dtypes(t: &impl Transport) {
    let cases = [
        (3, RingLayout::Zigzag, 2, 4, 4, 64, DType::F32),
        (4, RingLayout::Stripe, 2, 7, 1, 80, DType::F16),
        (3, RingLayout::Contiguous, 1, 8, 2, 24, DType::Bf16),
        (2, RingLayout::Zigzag, 1, 4, 1, 96, DType::F16),
    ];
    for (i, (ranks, layout, batch, q_heads, kv_heads, head_dim, dtype)) in cases.into_iter().enumerate() {
        let seq = seq_for(layout, ranks);
        let c = Case { ranks, seq, layout, causal: true, batch, q_heads, kv_heads, head_dim, dtype };
        check(t, &c, 100 + i as u64);
    }
}

fn bad_input(b: &Backend) {
    let plan = RingPlan::new(2, 8, RingLayout::Zigzag, true).unwrap();
    let p = RingParams::new(1, 3, 2, 16, plan);
    let x = RingInputs::random(&RingParams { q_heads: 2, ..p }, DType::F32, &mut Rng::new(1));
    assert_eq!(run::run(b, &p, &x, false).unwrap_err().argument(), Some("q_heads"));
    let p = RingParams { q_heads: 2, ..p };
    let mut short = x.clone();
    short.k = frugal_attn::host::HostData::random(DType::F32, p.kv_elems() - 1, &mut Rng::new(2));
    assert_eq!(run::run(b, &p, &short, false).unwrap_err().argument(), Some("k"));
    let mut mixed = x.clone();
    mixed.v = frugal_attn::host::HostData::random(DType::F16, p.kv_elems(), &mut Rng::new(3));
    assert_eq!(run::run(b, &p, &mixed, true).unwrap_err().argument(), Some("v"));
}

backend_tests!(every_rank_count_layout_and_mask, gqa_batches_and_dtypes, bad_input);

/// The CUDA ring called back to back without waiting, read in either order,
/// and dropped with its work in flight (an engine returning early): each
/// call's sends wait for the previous call's reads, the gradients wait for
/// their last hop home, the drop for the copies into buffers it frees. The
/// results equal one call's on a fresh ring.
fn back_to_back(b: &Backend) {
    let Backend::Cuda(c) = b else { return };
    let plan = RingPlan::new(4, seq_for(RingLayout::Zigzag, 4), RingLayout::Zigzag, true).unwrap();
    let p = RingParams::new(1, 2, 1, 16, plan);
    let x = RingInputs::random(&p, DType::F32, &mut Rng::new(7));
    let shards = |d: &frugal_attn::host::HostData, heads: usize| {
        plan.shard(&frugal_attn::host::bytes_to_vec::<f32>(d.as_bytes()), p.batch * heads, p.head_dim).unwrap()
    };
    let (q, k, v, d_o) = (shards(&x.q, 2), shards(&x.k, 1), shards(&x.v, 1), shards(&x.d_o, 2));
    let ring = || frugal_attn::ring::cuda::CudaRing::new(std::slice::from_ref(c), &p, &q, &k, &v, &d_o).unwrap();
    let mut once = ring();
    once.forward().unwrap();
    once.backward().unwrap();
    let (want_grads, (want_out, want_states)) = (once.read_grads().unwrap(), once.read_forward().unwrap());
    let mut twice = ring();
    for _ in 0..2 {
        twice.forward().unwrap();
        twice.backward().unwrap();
    }
    assert!(twice.read_grads().unwrap() == want_grads, "gradients of the second call");
    let (out, states) = twice.read_forward().unwrap();
    assert!(out == want_out && states == want_states, "output of the second call");
    twice.forward().unwrap();
    twice.backward().unwrap();
    drop(twice);
}

/// The CUDA ring with cudarc's event tracking off: only the ring's own events
/// order each rank's compute and copy streams and its neighbours', so a
/// missing wait fails here on the emulated driver (scripts/cuda_emu_tests.sh).
mod own_events {
    #[test]
    fn cuda() {
        if let Some(b) = crate::common::cuda_untracked("own_events") {
            super::every_rank_count_layout_and_mask(&b);
            super::gqa_batches_and_dtypes(&b);
            super::back_to_back(&b);
        }
    }
}

/// NCCL's transport (crate feature `nccl`): every rank a thread of this
/// process with its own `NcclRing`, as separate processes would run it: rank
/// 0 makes the id and hands its bytes to the others through channels, each
/// rank uploads its shards, runs the forward and backward and reads its
/// results, and the gathered results are checked as every transport's. On
/// the emulated libcuda and libnccl (scripts/cuda_emu_tests.sh --features
/// nccl) the ranks share the one emulated device, cudarc's event tracking is
/// off, and each send and receive is a stream-ordered copy between two ranks'
/// communication streams, so a missing wait between a rank's streams fails
/// here. Real NCCL wants a GPU per rank: with fewer than 4 GPUs it is skipped.
#[cfg(feature = "nccl")]
mod nccl_threads {
    use super::{RingOutput, Transport};
    use frugal_attn::backend::CudaBackend;
    use frugal_attn::host::bytes_to_vec;
    use frugal_attn::ring::nccl::{id_from_bytes, id_to_bytes, new_id, NcclRing};
    use frugal_attn::ring::run::{self, RingInputs};
    use frugal_attn::ring::{RingLayout, RingParams, RingPlan};
    use frugal_attn::{with_host_data, Backend, DType, Element};
    use std::sync::{mpsc, Arc};

    /// How each rank calls its ring: `n` times the forward (and the backward),
    /// back to back without waiting, then reads its results back (`read`) or
    /// drops the ring with its work in flight.
    #[derive(Clone, Copy)]
    struct Calls {
        n: usize,
        backward: bool,
        read: bool,
    }

    /// Rank `r` runs on `devices[r % devices.len()]`.
    struct NcclThreads {
        devices: Vec<Arc<CudaBackend>>,
    }

    impl Transport for NcclThreads {
        fn run(&self, p: &RingParams, x: &RingInputs) -> RingOutput {
            let calls = Calls { n: 1, backward: true, read: true };
            with_host_data!(&x.q, _q, T => self.run_ranks::<T>(p, x, calls).expect("read"))
        }
    }

    impl NcclThreads {
        /// Every rank's thread runs its ring as `calls` says; the gathered results when read.
        fn run_ranks<T: Element + cudarc::nccl::NcclType>(
            &self,
            p: &RingParams,
            x: &RingInputs,
            calls: Calls,
        ) -> Option<RingOutput> {
            let n = p.plan.ranks;
            let shards = |h: &frugal_attn::host::HostData, heads: usize| {
                p.plan.shard(&bytes_to_vec::<T>(h.as_bytes()), p.batch * heads, p.head_dim).unwrap()
            };
            let (q, k, v, d_o) = (
                shards(&x.q, p.q_heads),
                shards(&x.k, p.kv_heads),
                shards(&x.v, p.kv_heads),
                shards(&x.d_o, p.q_heads),
            );
            let (mut to_others, from_zero): (Vec<_>, Vec<_>) = (1..n).map(|_| mpsc::channel::<[u8; 128]>()).unzip();
            let mut from_zero = from_zero.into_iter();
            let results: Vec<_> = std::thread::scope(|s| {
                let ranks: Vec<_> = (0..n)
                    .map(|r| {
                        let backend = self.devices[r % self.devices.len()].clone();
                        let (send_id, recv_id) = if r == 0 {
                            (std::mem::take(&mut to_others), None)
                        } else {
                            (Vec::new(), from_zero.next())
                        };
                        let (q, k, v, d_o) = (&q[r], &k[r], &v[r], &d_o[r]);
                        s.spawn(move || {
                            let rank = || -> frugal_attn::Result<_> {
                                let id = match recv_id {
                                    None => {
                                        let id = new_id()?;
                                        for tx in send_id {
                                            tx.send(id_to_bytes(&id)).expect("a rank waits for the id");
                                        }
                                        id
                                    }
                                    Some(rx) => id_from_bytes(&rx.recv().expect("rank 0 sends the id"))?,
                                };
                                let mut ring = NcclRing::new(backend, p, r, id, q, k, v, d_o)?;
                                for _ in 0..calls.n {
                                    ring.forward()?;
                                    if calls.backward {
                                        ring.backward()?;
                                    }
                                }
                                if !calls.read {
                                    return Ok(None);
                                }
                                let (out, state) = ring.read_forward()?;
                                Ok(Some((out, state, if calls.backward { Some(ring.read_grads()?) } else { None })))
                            };
                            rank().unwrap_or_else(|e| panic!("rank {r}: {e}"))
                        })
                    })
                    .collect();
                ranks.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
            });
            let results: Option<Vec<_>> = results.into_iter().collect();
            let (mut outs, mut states, mut grads) = (Vec::new(), Vec::new(), Vec::new());
            for (out, state, g) in results? {
                outs.push(out);
                states.push(state);
                grads.extend(g);
            }
            Some(run::gather(p, &outs, &states, calls.backward.then_some(&grads[..])).unwrap())
        }
    }

    /// A bad id, rank or shard is refused naming it, before NCCL is called;
    /// on the emulator, an id NCCL rejects is an error naming NCCL's code.
    fn bad_input(b: &Arc<CudaBackend>, emulated: bool) {
        assert_eq!(id_from_bytes(&[0; 127]).err().and_then(|e| e.argument().map(str::to_owned)).as_deref(), Some("id"));
        let plan = RingPlan::new(2, 8, RingLayout::Zigzag, true).unwrap();
        let p = RingParams::new(1, 2, 1, 16, plan);
        let (q, kv) = (vec![0f32; p.q_shard_elems(0)], vec![0f32; p.kv_shard_elems(0)]);
        let new = |rank, id, q: &[f32]| NcclRing::new(b.clone(), &p, rank, id, q, &kv, &kv, q).err().expect("refused");
        assert_eq!(new(2, new_id().unwrap(), &q).argument(), Some("rank"));
        assert_eq!(new(0, new_id().unwrap(), &q[1..]).argument(), Some("q"));
        if emulated {
            let e = new(0, id_from_bytes(&[0; 128]).unwrap(), &q).to_string();
            assert!(e.contains("ncclInvalidArgument"), "{e}");
        }
    }

    #[test]
    fn cuda() {
        let Some(Backend::Cuda(b)) = crate::common::nccl("nccl_threads") else { return };
        let emulated = b.context().name().is_ok_and(|name| name.contains("emulator"));
        let devices = if emulated {
            vec![b]
        } else {
            let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
            if gpus < 4 {
                assert!(
                    !crate::common::required("nccl"),
                    "nccl is required by FRUGAL_REQUIRE but {gpus} GPUs cannot run 4 ranks"
                );
                eprintln!("SKIPPED nccl_threads on nccl: NCCL wants a GPU per rank, up to 4; {gpus} here");
                return;
            }
            (0..gpus).map(crate::common::cuda_untracked_on).collect()
        };
        bad_input(&devices[0], emulated);
        let t = NcclThreads { devices };
        super::every_layout_and_mask(&t, &[1, 2, 3, 4]);
        super::gqa_batches_and_dtypes(&t);
        // Calls back to back without waiting (forwards alone, as for inference,
        // or with backwards) equal one call, and a ring dropped with its work
        // in flight waits for it.
        for ranks in 1..=4 {
            let plan =
                RingPlan::new(ranks, super::seq_for(RingLayout::Zigzag, ranks), RingLayout::Zigzag, true).unwrap();
            let p = RingParams::new(1, 2, 1, 16, plan);
            let x = RingInputs::random(&p, DType::F32, &mut frugal_attn::host::Rng::new(7));
            for backward in [false, true] {
                let once = t.run_ranks::<f32>(&p, &x, Calls { n: 1, backward, read: true });
                let twice = t.run_ranks::<f32>(&p, &x, Calls { n: 2, backward, read: true });
                assert!(twice == once, "N={ranks} backward={backward}: the second of two calls back to back");
                t.run_ranks::<f32>(&p, &x, Calls { n: 2, backward, read: false });
            }
        }
    }
}

#[test]
fn a_layout_that_cannot_split_the_sequence_is_a_named_error() {
    let err = |n, s, l| RingPlan::new(n, s, l, true).unwrap_err();
    assert_eq!(err(4, 12, RingLayout::Zigzag).argument(), Some("seq_len"));
    assert_eq!(err(3, 7, RingLayout::Zigzag).argument(), Some("seq_len"));
    // ceil(9 / 4) = 3 tokens per block leaves rank 3 nothing.
    assert_eq!(err(4, 9, RingLayout::Contiguous).argument(), Some("seq_len"));
    assert_eq!(err(8, 7, RingLayout::Stripe).argument(), Some("seq_len"));
    assert_eq!(err(0, 8, RingLayout::Stripe).argument(), Some("ranks"));
    assert_eq!(err(2, 0, RingLayout::Contiguous).argument(), Some("seq_len"));
    let plan = RingPlan::new(2, 8, RingLayout::Stripe, true).unwrap();
    assert_eq!(plan.shard(&[0u8; 15], 1, 2).unwrap_err().argument(), Some("x"));
    assert_eq!(plan.unshard(&[vec![0u8; 8]], 1, 2).unwrap_err().argument(), Some("shards"));
}

#[test]
fn shard_and_unshard_round_trip_and_cover_every_token_once() {
    for ranks in RANKS {
        for layout in RingLayout::ALL {
            for seq in [seq_for(layout, ranks), 2 * seq_for(layout, ranks)] {
                let plan = RingPlan::new(ranks, seq, layout, true).unwrap();
                let (outer, row) = (3, 2);
                let x: Vec<u32> = (0..(outer * seq * row) as u32).collect();
                let shards = plan.shard(&x, outer, row).unwrap();
                assert_eq!(plan.unshard(&shards, outer, row).unwrap(), x, "{layout} N={ranks} S={seq}");
                let mut seen = vec![0; seq];
                for r in 0..ranks {
                    assert!(plan.rank_len(r) >= 1);
                    for i in 0..plan.rank_len(r) {
                        seen[plan.global_position(r, i)] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{layout} N={ranks} S={seq}: {seen:?}");
            }
        }
    }
    // The layouts' definitions.
    let z = RingPlan::new(3, 12, RingLayout::Zigzag, true).unwrap();
    assert_eq!((0..4).map(|i| z.global_position(1, i)).collect::<Vec<_>>(), [2, 3, 8, 9]);
    let s = RingPlan::new(3, 8, RingLayout::Stripe, true).unwrap();
    assert_eq!((0..s.rank_len(2)).map(|i| s.global_position(2, i)).collect::<Vec<_>>(), [2, 5]);
    let c = RingPlan::new(3, 8, RingLayout::Contiguous, true).unwrap();
    assert_eq!([c.rank_len(0), c.rank_len(1), c.rank_len(2)], [3, 3, 2]);
}

#[test]
fn every_step_holds_the_block_from_rank_minus_step() {
    for ranks in RANKS {
        let plan = RingPlan::new(ranks, 2 * ranks, RingLayout::Zigzag, false).unwrap();
        for r in 0..ranks {
            let sources: Vec<usize> = (0..ranks).map(|t| plan.step(t, r).source).collect();
            let want: Vec<usize> = (0..ranks).map(|t| (r + ranks - t) % ranks).collect();
            assert_eq!(sources, want);
            // Without a mask every pair is computed in full.
            assert!((0..ranks).all(|t| plan.step(t, r).parts.iter().all(|p| p.mask == Mask::None)));
            assert!((0..ranks).all(|t| plan.step(t, r).parts.len() == 4));
        }
    }
}

/// The zigzag pattern of the issue: step 0 is causal on the local chunks; for
/// `1 <= s <= rank` all of Q against the first half of the KV; for `s > rank`
/// the second half of Q against all of the KV; each in full.
#[test]
fn zigzag_schedule_is_balanced() {
    for ranks in RANKS {
        let c = 3;
        let plan = RingPlan::new(ranks, 2 * ranks * c, RingLayout::Zigzag, true).unwrap();
        for r in 0..ranks {
            let pairs = |t: usize| -> Vec<(usize, usize, Mask)> {
                plan.step(t, r).parts.iter().map(|p| (p.q_seg, p.kv_seg, p.mask)).collect()
            };
            assert_eq!(pairs(0), [(0, 0, Mask::Causal), (1, 0, Mask::None), (1, 1, Mask::Causal)], "rank {r}");
            for t in 1..ranks {
                let want = if t <= r {
                    vec![(0, 0, Mask::None), (1, 0, Mask::None)]
                } else {
                    vec![(1, 0, Mask::None), (1, 1, Mask::None)]
                };
                assert_eq!(pairs(t), want, "rank {r} step {t}");
                let rows: usize = plan.step(t, r).parts.iter().map(|p| p.q_len * p.kv_len).sum();
                assert_eq!(rows, 2 * c * c, "every step after the first does the same work");
            }
            // The causal diagonal carries the global offsets of the two chunks.
            let d = plan.step(0, r).parts[2];
            assert_eq!((d.q0, d.k0), ((2 * ranks - 1 - r) * c, (2 * ranks - 1 - r) * c));
        }
    }
}

#[test]
fn stripe_and_contiguous_schedules() {
    let n = 4;
    let stripe = RingPlan::new(n, 4 * n + 3, RingLayout::Stripe, true).unwrap();
    let contiguous = RingPlan::new(n, 4 * n + 3, RingLayout::Contiguous, true).unwrap();
    for r in 0..n {
        for t in 0..n {
            let st = stripe.step(t, r);
            assert_eq!(st.parts.len(), 1);
            let p = st.parts[0];
            // Key j of rank s sits at j*N + s: visible iff j < i, or j == i and s <= r.
            assert_eq!((p.mask, p.q0, p.k0), (Mask::Causal, 0, usize::from(st.source > r)));
            let ct = contiguous.step(t, r);
            match ct.source.cmp(&r) {
                std::cmp::Ordering::Less => assert_eq!(ct.parts[0].mask, Mask::None),
                std::cmp::Ordering::Equal => assert_eq!(ct.parts[0].mask, Mask::Causal),
                std::cmp::Ordering::Greater => assert!(ct.parts.is_empty()),
            }
        }
    }
}
