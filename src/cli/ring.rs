//! Ring attention (`frugal_attn::ring`): the sequence `--seq` over `--ranks`
//! ranks in a `--layout`, `--causal`, forward or `--backward`, on the chosen
//! backend's transport, against dense attention by the f64 reference.

use super::{Case, CaseArgs, Technique};
use frugal_attn::host::{rel_l2, Rng};
use frugal_attn::ring::run::{self, RingInputs, RingOutput};
use frugal_attn::ring::{RingLayout, RingParams, RingPlan};
use frugal_attn::{Backend, DType, Error, Result};
use std::cell::OnceCell;

/// Inputs larger than this (q, K, V and dO on the host) are refused before anything is allocated.
const MAX_HOST_BYTES: u128 = 16 << 30;
const DEFAULT_RANKS: usize = 4;

pub struct Ring;

impl Technique for Ring {
    fn name(&self) -> &'static str {
        "ring"
    }

    fn report_case(&self) -> CaseArgs {
        CaseArgs {
            batch: 1,
            q_heads: 4,
            kv_heads: 2,
            seq: 256,
            head_dim: 64,
            dtype: DType::F16,
            ranks: Some(DEFAULT_RANKS),
            layout: RingLayout::Zigzag,
            causal: true,
            backward: true,
            ..CaseArgs::default()
        }
    }

    fn prepare(&self, args: &CaseArgs) -> Result<Box<dyn Case>> {
        let (batch, seq) = args.batch_and_longest();
        if args.seq_lens.is_some() {
            return Err(Error::invalid("seq_lens", "ring attention takes one --seq for every sequence"));
        }
        let plan = RingPlan::new(args.ranks.unwrap_or(DEFAULT_RANKS), seq, args.layout, args.causal)?;
        let mut params = RingParams::new(batch, args.q_heads, args.kv_heads, args.head_dim, plan);
        if let Some(scale) = args.scale {
            params = params.with_scale(scale);
        }
        let elems = batch as u128
            * (2 * args.q_heads as u128 + 2 * args.kv_heads as u128)
            * seq as u128
            * args.head_dim as u128;
        if elems * args.dtype.size() as u128 > MAX_HOST_BYTES {
            return Err(Error::invalid("shape", format!("q, K, V and dO would take more than {MAX_HOST_BYTES} bytes")));
        }
        params.validate()?;
        let inputs = RingInputs::random(&params, args.dtype, &mut Rng::new(args.seed));
        Ok(Box::new(RingCase { params, inputs, backward: args.backward, seed: args.seed, reference: OnceCell::new() }))
    }
}

struct RingCase {
    params: RingParams,
    inputs: RingInputs,
    backward: bool,
    seed: u64,
    reference: OnceCell<RingOutput>,
}

impl Case for RingCase {
    fn dtype(&self) -> DType {
        self.inputs.dtype()
    }

    fn shape(&self) -> String {
        let (p, plan) = (&self.params, &self.params.plan);
        format!(
            "B={} Hq={} Hkv={} D={} S={} N={} {}{}{}",
            p.batch,
            p.q_heads,
            p.kv_heads,
            p.head_dim,
            plan.seq_len,
            plan.ranks,
            plan.layout,
            if plan.causal { " causal" } else { "" },
            if self.backward { " fwd+bwd" } else { " fwd" },
        )
    }

    fn json(&self) -> serde_json::Value {
        let (p, plan) = (&self.params, &self.params.plan);
        serde_json::json!({
            "batch": p.batch,
            "q_heads": p.q_heads,
            "kv_heads": p.kv_heads,
            "head_dim": p.head_dim,
            "seq": plan.seq_len,
            "ranks": plan.ranks,
            "layout": plan.layout.to_string(),
            "causal": plan.causal,
            "backward": self.backward,
            "scale": p.scale,
            "seed": self.seed,
            "dtype": self.dtype().to_string(),
        })
    }

    /// Bytes that travel the ring: every rank sends its K and V block on
    /// N - 1 forward hops; the backward adds N hops of (K, V, dK, dV).
    fn bytes(&self) -> u64 {
        let (p, n) = (&self.params, self.params.plan.ranks as u64);
        let kv = (p.batch * p.kv_heads * p.plan.seq_len * p.head_dim) as u64;
        let es = self.dtype().size() as u64;
        let fwd = (n - 1) * 2 * kv * es;
        let bwd = if self.backward { n * 2 * kv * (es + 4) } else { 0 };
        fwd + bwd
    }

    /// The largest relative error of the output and, with `--backward`, of dQ, dK and dV.
    fn check(&self, backend: &Backend) -> Result<f64> {
        if self.reference.get().is_none() {
            let _ = self.reference.set(run::reference(&self.params, &self.inputs, self.backward)?);
        }
        let want = self.reference.get().expect("set just above");
        let got = run::run(backend, &self.params, &self.inputs, self.backward)?;
        let mut err = rel_l2(&got.out, &want.out);
        if let (Some(g), Some(w)) = (&got.grads, &want.grads) {
            for (a, b) in [(&g.dq, &w.dq), (&g.dk, &w.dk), (&g.dv, &w.dv)] {
                err = err.max(rel_l2(a, b));
            }
        }
        Ok(err)
    }

    fn time(&self, backend: &Backend, iters: usize) -> Result<f64> {
        run::time(backend, &self.params, &self.inputs, self.backward, iters)
    }

    /// The ring's TFLOP/s, and the bytes column's meaning.
    fn note(&self, backend: &Backend, secs: f64) -> Option<String> {
        let p = &self.params;
        let flops = p.forward_flops() * if self.backward { 3.5 } else { 1.0 };
        Some(format!(
            "ring on {}: {} ranks {}, {:.3} TFLOP/s (dense count); GB/s counts the bytes sent around the ring",
            backend.kind(),
            p.plan.ranks,
            p.plan.layout,
            flops / secs / 1e12
        ))
    }
}
