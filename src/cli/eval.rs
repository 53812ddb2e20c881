//! `frugal-attn eval`: SmolLM2-135M perplexity and top-1 agreement with dense
//! attention, with this crate's attention in every layer (feature `eval`).

use clap::{Args, ValueEnum};
use frugal_attn::sparq::GqaMode;
use frugal_attn::Result;
use std::path::PathBuf;

// Without the feature only the message below reads these.
#[cfg_attr(not(feature = "eval"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvalMethod {
    Dense,
    Sparq,
    Window,
    H2o,
    /// dense, then SparQ (with and without reallocation to the mean), window
    /// and H2O at 1/2, 1/4 and 1/8 of dense traffic
    All,
}

#[cfg_attr(not(feature = "eval"), allow(dead_code))]
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// The GGUF file [default: the model cache that scripts/fetch_smollm2.sh fills]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The text to score
    #[arg(long, default_value = "data/alice-ch1-2.txt")]
    pub text: PathBuf,
    #[arg(long, value_enum, default_value_t = EvalMethod::Sparq)]
    pub method: EvalMethod,
    /// SparQ: query components for the approximate scores (with --k: fixed at every position)
    #[arg(long, requires = "k", conflicts_with = "fraction")]
    pub r: Option<usize>,
    /// SparQ: positions attended exactly (with --r)
    #[arg(long, requires = "r")]
    pub k: Option<usize>,
    /// Fraction of dense KV traffic at every scored position: SparQ r = F*D,
    /// k = (F - r/2D)*len; the baselines keep F*len positions
    #[arg(long, default_value_t = 0.125)]
    pub fraction: f64,
    /// Tokens of the text prefilled with dense attention before scoring starts
    /// (the context every scored token attends over, as after a prompt); 0: none
    #[arg(long, default_value_t = 2048)]
    pub context: usize,
    /// Tokens scored after the context, each attending with the method
    #[arg(long, default_value_t = 512)]
    pub score: usize,
    /// SparQ: GQA selection mode, shared or per-head
    #[arg(long, default_value_t = GqaMode::Shared)]
    pub gqa: GqaMode,
    /// SparQ: local window as a fraction of k [default: the crate's k/4]
    #[arg(long)]
    pub local_fraction: Option<f64>,
    /// SparQ: no reallocation to the mean value (out = y)
    #[arg(long)]
    pub no_mean: bool,
    /// SparQ diagnostic: also print the mean alpha the kernel estimates against
    /// the exact softmax mass of the positions it selected (costs a dense pass)
    #[arg(long)]
    pub alpha: bool,
    /// SparQ diagnostic: reallocate to the mean with the exact alpha instead of
    /// the estimate (CPU; costs a dense pass)
    #[arg(long, conflicts_with = "no_mean")]
    pub exact_alpha: bool,
    /// Where dense and SparQ attention run (the baselines and the dense prefill
    /// of the context run on the CPU) [default: cpu, the f64 reference]
    #[arg(long)]
    pub backend: Option<frugal_attn::BackendKind>,
}

#[cfg(not(feature = "eval"))]
pub fn eval(_: &EvalArgs) -> Result<bool> {
    eprintln!("`eval` needs the model runtime: rebuild with `--features eval`, e.g.");
    eprintln!("  cargo run --release --features eval -- eval --method all");
    Ok(false)
}

#[cfg(feature = "eval")]
pub fn eval(a: &EvalArgs) -> Result<bool> {
    use frugal_attn::eval::attention::{SparqBudget, SparqKnobs};
    use frugal_attn::eval::{self, Method, Model};
    use frugal_attn::Error;
    use std::io::IsTerminal;

    let path = a.model.clone().unwrap_or_else(eval::default_model_path);
    if !path.is_file() {
        eprintln!("no model at {}: {}", path.display(), eval::HOW_TO_GET);
        return Ok(false);
    }
    let text =
        std::fs::read_to_string(&a.text).map_err(|e| Error::invalid("text", format!("{}: {e}", a.text.display())))?;
    let kind = a.backend.unwrap_or(frugal_attn::BackendKind::Cpu);
    let backend = kind.open()?;
    let model = Model::load(&path)?;
    let tok = eval::tokenizer::from_gguf(&model.content)?;
    let mut ids = eval::tokenizer::encode(&tok, &text)?;
    let want = a.context + a.score.max(2);
    if ids.len() < want {
        return Err(Error::invalid(
            "text",
            format!("{} tokens; --context {} and --score {} need {want}", ids.len(), a.context, a.score.max(2)),
        ));
    }
    ids.truncate(want);
    let knobs = SparqKnobs {
        gqa: a.gqa,
        local_fraction: a.local_fraction,
        reallocate_to_mean: !a.no_mean,
        measure_alpha: a.alpha,
        exact_alpha: a.exact_alpha,
    };
    let sparq_budget = |f: f64| match (a.r, a.k) {
        (Some(r), Some(k)) => SparqBudget::Fixed { r, k },
        _ => SparqBudget::Fraction(f),
    };
    let methods: Vec<Method> = match a.method {
        EvalMethod::Dense => vec![],
        EvalMethod::Sparq => vec![Method::Sparq(sparq_budget(a.fraction), knobs)],
        EvalMethod::Window => vec![Method::Window(a.fraction)],
        EvalMethod::H2o => vec![Method::H2o(a.fraction)],
        EvalMethod::All => [0.5, 0.25, 0.125]
            .into_iter()
            .flat_map(|f| {
                let no_mean = SparqKnobs { reallocate_to_mean: false, ..knobs };
                let sparq = [Method::Sparq(sparq_budget(f), knobs), Method::Sparq(sparq_budget(f), no_mean)];
                let sparq = if knobs.reallocate_to_mean { &sparq[..] } else { &sparq[1..] };
                sparq.iter().copied().chain([Method::Window(f), Method::H2o(f)]).collect::<Vec<_>>()
            })
            .collect(),
    };
    println!(
        "SmolLM2-135M, {}: {} tokens of dense context, then {} tokens scored (perplexity of their \
         next tokens), dense and SparQ attention on {} ({}); \
         traffic = KV-cache bytes read / dense, over the scored positions and all layers",
        a.text.display(),
        a.context,
        ids.len() - a.context,
        kind.name(),
        backend.device_name()
    );
    let tty = std::io::stderr().is_terminal();
    let show = move |m: &dyn std::fmt::Display, done: usize, all: usize| {
        if tty {
            eprint!("\r{m}: layer {done}/{all}  ");
        }
    };
    let start = std::time::Instant::now();
    let past = eval::prefill(&model, &ids[..a.context], |done, all| show(&"prefill", done, all))?;
    if tty {
        eprintln!("\rprefill: {:.1} s          ", start.elapsed().as_secs_f64());
    }
    let run = |m: Method| {
        let start = std::time::Instant::now();
        let e = eval::evaluate(&model, &backend, &past, &ids, m, |done, all| show(&m, done, all))?;
        if tty {
            eprintln!("\r{m}: {:.1} s          ", start.elapsed().as_secs_f64());
        }
        Ok::<_, Error>(e)
    };
    let dense = run(Method::Dense)?;
    println!("{}", eval::table_header());
    println!("{}", eval::table_row(&dense, &dense));
    for m in methods {
        let e = run(m)?;
        if let Some(s) = e.alpha {
            eprintln!(
                "{m}: alpha estimated {:.4}, exact {:.4}, |difference| {:.4} (means over {} position x head x layer steps)",
                s.mean_estimated(),
                s.mean_exact(),
                s.mean_abs_error(),
                s.count
            );
        }
        println!("{}", eval::table_row(&e, &dense));
    }
    Ok(true)
}
