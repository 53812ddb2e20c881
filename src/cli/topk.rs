//! Exact top-k (`frugal_attn::topk`): rows = `--batch`, row length = `--seq`, `--k`.

use super::{Case, CaseArgs, Technique};
use frugal_attn::host::{HostData, Rng};
use frugal_attn::topk::run::{self, TopkOutput};
use frugal_attn::topk::TopkParams;
use frugal_attn::{Backend, DType, Error, Result};
use std::cell::OnceCell;

const MAX_HOST_BYTES: u128 = 16 << 30;

pub struct Topk;

impl Technique for Topk {
    fn name(&self) -> &'static str {
        "topk"
    }

    fn report_case(&self) -> CaseArgs {
        CaseArgs { batch: 8, seq: 32768, k: Some(2048), dtype: DType::F32, ..CaseArgs::default() }
    }

    fn prepare(&self, args: &CaseArgs) -> Result<Box<dyn Case>> {
        let (rows, n) = args.batch_and_longest();
        let k = args.k.unwrap_or((n / 16).max(1));
        let params = TopkParams::new(rows, n, k);
        params.validate()?;
        let bytes = rows as u128 * n as u128 * args.dtype.size() as u128;
        if bytes > MAX_HOST_BYTES {
            return Err(Error::invalid("shape", format!("the input would take {bytes} bytes, over the host limit")));
        }
        let x = HostData::random(args.dtype, params.x_len(), &mut Rng::new(args.seed));
        Ok(Box::new(TopkCase { params, x, seed: args.seed, reference: OnceCell::new() }))
    }
}

struct TopkCase {
    params: TopkParams,
    x: HostData,
    seed: u64,
    reference: OnceCell<TopkOutput>,
}

impl Case for TopkCase {
    fn dtype(&self) -> DType {
        self.x.dtype()
    }

    fn shape(&self) -> String {
        let p = &self.params;
        format!("rows={} n={} k={}", p.rows, p.n, p.k)
    }

    fn json(&self) -> serde_json::Value {
        let p = &self.params;
        serde_json::json!({"rows": p.rows, "n": p.n, "k": p.k, "seed": self.seed, "dtype": self.dtype().to_string()})
    }

    fn bytes(&self) -> u64 {
        self.params.bytes_moved(self.dtype())
    }

    /// The fraction of output slots that differ from the reference (positions or value bits).
    fn check(&self, backend: &Backend) -> Result<f64> {
        if self.reference.get().is_none() {
            let _ = self.reference.set(run::reference(&self.params, &self.x)?);
        }
        let want = self.reference.get().expect("set just above");
        let got = run::run(backend, &self.params, &self.x)?;
        let es = self.dtype().size();
        let (gv, wv) = (got.values.as_bytes(), want.values.as_bytes());
        let wrong = (0..want.indices.len())
            .filter(|&i| got.indices[i] != want.indices[i] || gv[i * es..][..es] != wv[i * es..][..es])
            .count();
        Ok(wrong as f64 / want.indices.len() as f64)
    }

    fn time(&self, backend: &Backend, iters: usize) -> Result<f64> {
        run::time(backend, &self.params, &self.x, iters)
    }

    /// Top-k is exact: any differing slot fails.
    fn tolerance(&self) -> f64 {
        0.0
    }
}
