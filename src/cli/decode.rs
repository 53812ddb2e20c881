//! Dense decode attention (`frugal_attn::decode`), the baseline technique.

use super::{Case, CaseArgs, Technique};
use frugal_attn::decode::run::{self, DecodeInputs};
use frugal_attn::decode::{DecodeParams, DecodeShape};
use frugal_attn::host::{rel_l2, Rng};
use frugal_attn::{Backend, DType, Error, Result};
use std::cell::OnceCell;

/// Inputs larger than this (q, K and V on the host) are refused before anything is allocated.
const MAX_HOST_BYTES: u128 = 32 << 30;

pub struct Decode;

impl Technique for Decode {
    fn name(&self) -> &'static str {
        "decode"
    }

    fn report_case(&self) -> CaseArgs {
        let seq = 2048;
        CaseArgs {
            q_heads: 16,
            kv_heads: 4,
            head_dim: 128,
            seq_lens: Some(vec![seq, seq * 3 / 4, seq / 2, seq / 4 + 1]),
            dtype: DType::F16,
            ..CaseArgs::default()
        }
    }

    fn prepare(&self, args: &CaseArgs) -> Result<Box<dyn Case>> {
        let (batch, _) = args.batch_and_longest();
        let shape = DecodeShape {
            batch,
            q_heads: args.q_heads,
            kv_heads: args.kv_heads,
            head_dim: args.head_dim,
            capacity: args.capacity()?,
        };
        // Checked in u128 first: the layout arithmetic must not overflow, nor the inputs exhaust memory.
        let elems = (shape.batch as u128)
            * (shape.q_heads as u128 + 2 * shape.kv_heads as u128 * shape.capacity as u128)
            * shape.head_dim as u128;
        let bytes = elems * args.dtype.size() as u128;
        if bytes > MAX_HOST_BYTES {
            let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
            return Err(Error::invalid(
                "shape",
                format!("q, K and V would take {:.1} GiB, more than the {} GiB limit", gib(bytes), gib(MAX_HOST_BYTES)),
            ));
        }
        let mut params = DecodeParams::new(shape);
        if let Some(scale) = args.scale {
            params = params.with_scale(scale);
        }
        params.validate()?;
        let inputs = DecodeInputs::random(&params, args.dtype, args.lengths(), &mut Rng::new(args.seed));
        Ok(Box::new(DecodeCase { params, inputs, seed: args.seed, reference: OnceCell::new() }))
    }
}

struct DecodeCase {
    params: DecodeParams,
    inputs: DecodeInputs,
    seed: u64,
    reference: OnceCell<Vec<f64>>,
}

impl DecodeCase {
    fn reference(&self) -> Result<&[f64]> {
        if self.reference.get().is_none() {
            let _ = self.reference.set(run::reference(&self.params, &self.inputs)?);
        }
        Ok(self.reference.get().expect("set just above"))
    }
}

impl Case for DecodeCase {
    fn dtype(&self) -> DType {
        self.inputs.dtype()
    }

    fn shape(&self) -> String {
        let (s, lens) = (&self.params.shape, &self.inputs.seq_lens);
        let seq = match lens.as_slice() {
            [first, rest @ ..] if rest.iter().all(|n| n == first) => format!("S={first}"),
            l if l.len() <= 8 => format!("S={}", l.iter().map(u32::to_string).collect::<Vec<_>>().join(",")),
            l => format!("S={}..{}", l.iter().min().unwrap_or(&0), l.iter().max().unwrap_or(&0)),
        };
        let longest = lens.iter().copied().max().unwrap_or(0) as usize;
        let cap = if s.capacity == longest { String::new() } else { format!(" cap={}", s.capacity) };
        format!("B={} Hq={} Hkv={} D={} {seq}{cap}", s.batch, s.q_heads, s.kv_heads, s.head_dim)
    }

    fn json(&self) -> serde_json::Value {
        let s = &self.params.shape;
        serde_json::json!({
            "batch": s.batch,
            "q_heads": s.q_heads,
            "kv_heads": s.kv_heads,
            "head_dim": s.head_dim,
            "capacity": s.capacity,
            "seq_lens": self.inputs.seq_lens,
            "scale": self.params.scale,
            "seed": self.seed,
            "dtype": self.dtype().to_string(),
        })
    }

    fn bytes(&self) -> u64 {
        self.params.bytes_moved(&self.inputs.seq_lens, self.dtype())
    }

    fn check(&self, backend: &Backend) -> Result<f64> {
        let got = run::run(backend, &self.params, &self.inputs)?;
        Ok(rel_l2(&got, self.reference()?))
    }

    fn time(&self, backend: &Backend, iters: usize) -> Result<f64> {
        run::time(backend, &self.params, &self.inputs, iters)
    }
}
