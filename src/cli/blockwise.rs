//! Blockwise attention (`frugal_attn::blockwise`): one Q block against one KV
//! block, `--seq` rows each (Sq = Sk), `--causal` for the causal mask on the
//! diagonal block, `--backward` to check and time the backward (pre-pass +
//! dQ/dK/dV) instead of the forward. Compute-bound: reported in TFLOP/s.

use super::{Case, CaseArgs, Technique};
use frugal_attn::blockwise::run::{self, BlockInputs, Grads32, Pass, State};
use frugal_attn::blockwise::{BlockParams, BlockShape, Mask};
use frugal_attn::host::Rng;
use frugal_attn::{Backend, DType, Error, Result};
use std::cell::OnceCell;

/// Inputs larger than this on the host are refused before anything is allocated.
const MAX_HOST_BYTES: u128 = 32 << 30;

pub struct Blockwise;

impl Technique for Blockwise {
    fn name(&self) -> &'static str {
        "blockwise"
    }

    fn report_case(&self) -> CaseArgs {
        CaseArgs {
            batch: 1,
            q_heads: 8,
            kv_heads: 2,
            seq: 256,
            head_dim: 64,
            dtype: DType::F16,
            causal: true,
            ..CaseArgs::default()
        }
    }

    fn prepare(&self, args: &CaseArgs) -> Result<Box<dyn Case>> {
        let (batch, seq) = args.batch_and_longest();
        let shape = BlockShape {
            batch,
            q_heads: args.q_heads,
            kv_heads: args.kv_heads,
            head_dim: args.head_dim,
            q_len: seq,
            kv_len: seq,
        };
        let elems =
            batch as u128 * (2 * args.q_heads + 2 * args.kv_heads) as u128 * seq as u128 * args.head_dim as u128;
        if elems * 4 > MAX_HOST_BYTES {
            return Err(Error::invalid(
                "shape",
                format!("the inputs would take {} bytes, over the host limit", elems * 4),
            ));
        }
        let mask = if args.causal { Mask::Causal } else { Mask::None };
        let mut params = BlockParams::new(shape, mask);
        if let Some(scale) = args.scale {
            params = params.with_scale(scale);
        }
        params.validate()?;
        let inputs = BlockInputs::random(&params, args.dtype, &mut Rng::new(args.seed));
        let pass = if args.backward { Pass::Backward } else { Pass::Forward };
        Ok(Box::new(BlockwiseCase { params, inputs, pass, seed: args.seed, state: OnceCell::new() }))
    }
}

struct BlockwiseCase {
    params: BlockParams,
    inputs: BlockInputs,
    pass: Pass,
    seed: u64,
    /// The CPU forward (f32 O and lse): the backward's input on every backend.
    state: OnceCell<State>,
}

impl BlockwiseCase {
    fn state(&self) -> Result<&State> {
        if self.state.get().is_none() {
            let _ = self.state.set(run::forward(&Backend::Cpu, &self.params, &self.inputs, None)?);
        }
        Ok(self.state.get().expect("set just above"))
    }

    fn pass_flops(&self) -> f64 {
        match self.pass {
            Pass::Forward => self.params.forward_flops(),
            Pass::Backward => self.params.backward_flops(),
        }
    }
}

impl Case for BlockwiseCase {
    fn dtype(&self) -> DType {
        self.inputs.dtype()
    }

    fn shape(&self) -> String {
        let s = &self.params.shape;
        let mask = if self.params.mask == Mask::Causal { " causal" } else { "" };
        let pass = if self.pass == Pass::Backward { " bwd" } else { " fwd" };
        format!("B={} Hq={} Hkv={} D={} S={}{mask}{pass}", s.batch, s.q_heads, s.kv_heads, s.head_dim, s.q_len)
    }

    fn json(&self) -> serde_json::Value {
        let s = &self.params.shape;
        serde_json::json!({
            "batch": s.batch,
            "q_heads": s.q_heads,
            "kv_heads": s.kv_heads,
            "head_dim": s.head_dim,
            "q_len": s.q_len,
            "kv_len": s.kv_len,
            "causal": self.params.mask == Mask::Causal,
            "pass": if self.pass == Pass::Backward { "backward" } else { "forward" },
            "scale": self.params.scale,
            "seed": self.seed,
            "dtype": self.dtype().to_string(),
            "flops": self.pass_flops(),
        })
    }

    /// Compulsory traffic: the inputs once, the f32 outputs (and, backward, dO and the f32 gradients).
    fn bytes(&self) -> u64 {
        let (s, es) = (&self.params.shape, self.dtype().size() as u64);
        let (q, kv) = (s.o_elems() as u64, s.kv_grad_elems() as u64);
        match self.pass {
            Pass::Forward => (q + 2 * kv) * es + 4 * (q + s.lse_elems() as u64),
            Pass::Backward => (2 * q + 2 * kv) * es + 4 * (2 * q + 2 * kv + 2 * s.lse_elems() as u64),
        }
    }

    fn check(&self, backend: &Backend) -> Result<f64> {
        let (p, x) = (&self.params, &self.inputs);
        match self.pass {
            Pass::Forward => {
                let want = run::reference_forward(p, x)?;
                let got = run::forward(backend, p, x, None)?;
                let (eo, el) = run::forward_error(&got, &want);
                Ok(eo.max(el))
            }
            Pass::Backward => {
                let st = self.state()?;
                let want = run::reference_backward(p, x, st)?;
                let got = run::backward(backend, p, x, st, &Grads32::zeros(&p.shape))?;
                Ok(run::grads_error(&got, &want))
            }
        }
    }

    fn time(&self, backend: &Backend, iters: usize) -> Result<f64> {
        run::time(backend, &self.params, &self.inputs, self.pass, iters)
    }

    fn flops(&self) -> Option<f64> {
        Some(self.pass_flops())
    }

    fn note(&self, backend: &Backend, secs: f64) -> Option<String> {
        let tflops = self.pass_flops() / secs / 1e12;
        Some(format!("blockwise on {}: {tflops:.3} TFLOP/s ({})", backend.kind(), self.shape()))
    }
}
