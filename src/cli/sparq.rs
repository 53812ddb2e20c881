//! SparQ attention (`frugal_attn::sparq`): the decode shape flags plus `--r`,
//! `--k`, `--local-window`, `--gqa`, `--no-mean`.

use super::{Case, CaseArgs, Technique};
use frugal_attn::decode::run::{self as dense, DecodeInputs};
use frugal_attn::decode::DecodeParams;
use frugal_attn::host::{rel_l2, Rng};
use frugal_attn::sparq::run::{self, SparqInputs};
use frugal_attn::sparq::{bytes_model, SparqCacheShape, SparqConfig, SparqParams};
use frugal_attn::{Backend, DType, Error, Result};
use std::cell::OnceCell;

const MAX_HOST_BYTES: u128 = 32 << 30;

pub struct Sparq;

impl Technique for Sparq {
    fn name(&self) -> &'static str {
        "sparq"
    }

    fn report_case(&self) -> CaseArgs {
        let seq = 4096;
        CaseArgs {
            q_heads: 16,
            kv_heads: 4,
            head_dim: 128,
            seq_lens: Some(vec![seq, seq * 3 / 4, seq / 2, seq / 4 + 1]),
            r: Some(16),
            k: Some(seq as usize / 16),
            dtype: DType::F16,
            ..CaseArgs::default()
        }
    }

    fn prepare(&self, args: &CaseArgs) -> Result<Box<dyn Case>> {
        let (batch, longest) = args.batch_and_longest();
        let cache =
            SparqCacheShape { batch, kv_heads: args.kv_heads, head_dim: args.head_dim, capacity: args.capacity()? };
        let elems = batch as u128 * 2 * args.kv_heads as u128 * cache.capacity as u128 * args.head_dim as u128;
        if elems * args.dtype.size() as u128 > MAX_HOST_BYTES {
            return Err(Error::invalid("shape", "K and V would exceed the host memory limit"));
        }
        let config = SparqConfig {
            r: args.r.unwrap_or((args.head_dim / 8).max(1)),
            k: args.k.unwrap_or((longest / 16).max(1)),
            local_window: args.local_window,
            reallocate_to_mean: !args.no_mean,
            gqa: args.gqa,
        };
        let params = SparqParams::new(cache, args.q_heads, config);
        params.validate()?;
        let x = SparqInputs::random(&params, args.dtype, args.lengths(), &mut Rng::new(args.seed));
        let dense_params = DecodeParams::new(params.decode_shape());
        let dense_x = DecodeInputs { q: x.q.clone(), k: x.k.clone(), v: x.v.clone(), seq_lens: x.seq_lens.clone() };
        Ok(Box::new(SparqCase { params, x, dense_params, dense_x, seed: args.seed, reference: OnceCell::new() }))
    }
}

struct SparqCase {
    params: SparqParams,
    x: SparqInputs,
    dense_params: DecodeParams,
    dense_x: DecodeInputs,
    seed: u64,
    reference: OnceCell<Vec<f64>>,
}

impl Case for SparqCase {
    fn dtype(&self) -> DType {
        self.x.dtype()
    }

    fn shape(&self) -> String {
        let (c, cfg) = (&self.params.cache, &self.params.config);
        let lens: Vec<String> = self.x.seq_lens.iter().map(u32::to_string).collect();
        format!(
            "B={} Hq={} Hkv={} D={} S={} r={} k={} {}",
            c.batch,
            self.params.q_heads,
            c.kv_heads,
            c.head_dim,
            lens.join(","),
            cfg.r,
            cfg.k,
            cfg.gqa
        )
    }

    fn json(&self) -> serde_json::Value {
        let (c, cfg) = (&self.params.cache, &self.params.config);
        serde_json::json!({
            "batch": c.batch, "q_heads": self.params.q_heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
            "capacity": c.capacity, "seq_lens": self.x.seq_lens, "r": cfg.r, "k": cfg.k,
            "local_window": cfg.local_window(), "gqa": cfg.gqa.to_string(), "reallocate_to_mean": cfg.reallocate_to_mean,
            "seed": self.seed, "dtype": self.dtype().to_string(),
        })
    }

    fn bytes(&self) -> u64 {
        bytes_model(&self.params, &self.x.seq_lens, self.dtype()).0
    }

    fn check(&self, backend: &Backend) -> Result<f64> {
        if self.reference.get().is_none() {
            let _ = self.reference.set(run::reference(&self.params, &self.x)?);
        }
        let got = run::run(backend, &self.params, &self.x)?;
        Ok(rel_l2(&got, self.reference.get().expect("set just above")))
    }

    fn time(&self, backend: &Backend, iters: usize) -> Result<f64> {
        run::time(backend, &self.params, &self.x, iters)
    }

    /// Traffic from the bytes model and measured time, both against dense decode on the same backend.
    fn note(&self, backend: &Backend, secs: f64) -> Option<String> {
        let (sparq, dense) = bytes_model(&self.params, &self.x.seq_lens, self.dtype());
        let bytes =
            format!("sparq on {}: reads 1/{:.1} of dense decode's bytes", backend.kind(), dense as f64 / sparq as f64);
        if matches!(backend, Backend::Cpu) {
            return Some(format!("{bytes} (cpu times references, no ratio)"));
        }
        let iters = ((0.3 / secs.max(1e-9)) as usize).clamp(1, 1000);
        Some(match dense::time(backend, &self.dense_params, &self.dense_x, iters) {
            Ok(t) => format!("{bytes}; runs in 1/{:.2} of dense decode's time ({} vs {})", t / secs, fmt(secs), fmt(t)),
            Err(e) => format!("{bytes}; dense decode failed: {e}"),
        })
    }
}

fn fmt(s: f64) -> String {
    if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}
