//! SmolLM2-135M with this crate's attention (feature `eval`): the tokenizer
//! built from the GGUF, dense perplexity in the sane range, SparQ exact when it
//! keeps everything, and SparQ at 1/2 of dense traffic no worse than measured
//! (BENCHMARKS.md): a fidelity regression fails. Needs the model
//! (`scripts/fetch_smollm2.sh`, or `FRUGAL_MODEL=PATH`); skipped without it
//! unless `FRUGAL_REQUIRE` names `model`.
#![cfg(feature = "eval")]

use frugal_attn::backend::{self, Backend, BackendKind};
use frugal_attn::eval::attention::{SparqBudget, SparqKnobs};
use frugal_attn::eval::{self, Method, Model};
use std::path::PathBuf;

/// Tokens of dense context, then tokens scored with the method attending over
/// them: the attention runs on the f64 reference launchers, whose cost grows
/// with the square of the length; CI's two cores in the dev profile.
const CONTEXT: usize = 256;
const SCORED: usize = 128;

fn model_path() -> Option<PathBuf> {
    let path = std::env::var_os("FRUGAL_MODEL").map(PathBuf::from).unwrap_or_else(eval::default_model_path);
    if path.is_file() {
        return Some(path);
    }
    let required =
        std::env::var("FRUGAL_REQUIRE").is_ok_and(|v| v.split(',').any(|s| s.trim().eq_ignore_ascii_case("model")));
    assert!(!required, "FRUGAL_REQUIRE names `model` but there is none at {}: {}", path.display(), eval::HOW_TO_GET);
    eprintln!("skipped: no model at {} ({})", path.display(), eval::HOW_TO_GET);
    None
}

fn text() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/alice-ch1-2.txt")).unwrap()
}

#[test]
fn smollm2_dense_and_sparq() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path).unwrap();
    let tok = eval::tokenizer::from_gguf(&model.content).unwrap();
    let text = text();
    let mut ids = eval::tokenizer::encode(&tok, &text).unwrap();
    assert!(ids.len() > 4000, "{} tokens", ids.len());
    // Byte-level BPE round-trips the text exactly.
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    // Digits are split one by one; the control tokens are special.
    assert_eq!(eval::tokenizer::encode(&tok, "1865").unwrap().len(), 4);
    assert_eq!(eval::tokenizer::encode(&tok, "<|im_start|>").unwrap().len(), 1);

    ids.truncate(CONTEXT + SCORED);
    let past = eval::prefill(&model, &ids[..CONTEXT], |_, _| {}).unwrap();
    let dense = eval::evaluate(&model, &Backend::Cpu, &past, &ids, Method::Dense, |_, _| {}).unwrap();
    assert_eq!(dense.logp.len(), SCORED - 1);
    let ppl = dense.perplexity();
    eprintln!("{}\n{}", eval::table_header(), eval::table_row(&dense, &dense));
    // Measured 17.676 (tokens 256..384 of the chapter, no BOS); half-rotated RoPE gives ~10x.
    assert!((15.0..21.0).contains(&ppl), "dense perplexity {ppl}");
    assert_eq!(dense.traffic.fraction(), 1.0);
    // Continuing from the prefill is the same computation as one pass over the whole text.
    let whole = eval::evaluate(&model, &Backend::Cpu, &eval::Past::default(), &ids, Method::Dense, |_, _| {}).unwrap();
    let tail = &whole.logp[CONTEXT..];
    let worst = tail.iter().zip(&dense.logp).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-3, "log-probabilities after a prefill differ from one pass by {worst}");

    let run = |m: Method| {
        let e = eval::evaluate(&model, &Backend::Cpu, &past, &ids, m, |_, _| {}).unwrap();
        eprintln!("{}", eval::table_row(&e, &dense));
        (e.perplexity() / ppl - 1.0, e.agreement(&dense), e.traffic.fraction())
    };
    // Every component and every position: exactly dense attention.
    let (rel, agree, _) = run(Method::sparq(SparqBudget::Fixed { r: model.config.head_dim, k: CONTEXT + SCORED }));
    assert!(rel.abs() < 1e-4 && agree > 0.99, "exact SparQ: perplexity {rel:+e}, agreement {agree}");
    // Half the traffic, shared GQA selection: measured +4.75%, 89.76% agreement.
    let (rel, agree, frac) = run(Method::sparq(SparqBudget::Fraction(0.5)));
    assert!((0.45..0.55).contains(&frac), "traffic fraction {frac}");
    assert!(rel < 0.08 && agree > 0.86, "SparQ 1/2: perplexity {rel:+.3}, agreement {agree}");
    // A quarter, no reallocation to the mean: measured +17.70%, 82.68% agreement
    // (with it: +48.9%; BENCHMARKS.md has why).
    let knobs = SparqKnobs { reallocate_to_mean: false, ..Method::default_knobs() };
    let (rel, agree, frac) = run(Method::Sparq(SparqBudget::Fraction(0.25), knobs));
    assert!((0.2..0.3).contains(&frac), "traffic fraction {frac}");
    assert!(rel < 0.22 && agree > 0.78, "SparQ 1/4 no-mean: perplexity {rel:+.3}, agreement {agree}");
}

/// Dense and SparQ attention on the GPU backends inside the model: the same
/// text scored as by the CPU reference (a short one: a launch per position and layer).
#[test]
fn smollm2_on_gpu_backends() {
    let Some(path) = model_path() else { return };
    let model = Model::load(&path).unwrap();
    let tok = eval::tokenizer::from_gguf(&model.content).unwrap();
    let mut ids = eval::tokenizer::encode(&tok, &text()).unwrap();
    let (context, scored) = (96, 24);
    ids.truncate(context + scored);
    let past = eval::prefill(&model, &ids[..context], |_, _| {}).unwrap();
    let methods = [Method::Dense, Method::sparq(SparqBudget::Fraction(0.25))];
    let want: Vec<_> =
        methods.iter().map(|&m| eval::evaluate(&model, &Backend::Cpu, &past, &ids, m, |_, _| {}).unwrap()).collect();
    let mut ran = 0;
    for kind in [BackendKind::Wgpu, BackendKind::Cuda] {
        let Some(b) = backend::open_for_test(kind).unwrap() else {
            eprintln!("skipped on {}: not available", kind.name());
            continue;
        };
        for (m, want) in methods.iter().zip(&want) {
            let got = eval::evaluate(&model, &b, &past, &ids, *m, |_, _| {}).unwrap();
            let worst = got.logp.iter().zip(&want.logp).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            eprintln!("{} on {}: largest log-probability difference {worst:.2e}", m, kind.name());
            assert_eq!(got.traffic, want.traffic, "{m} on {}", kind.name());
            assert!(worst < 1e-2, "{m} on {}: log-probabilities differ from the CPU by {worst}", kind.name());
            assert!(got.agreement(want) > 0.95, "{m} on {}: top-1 agreement {}", kind.name(), got.agreement(want));
        }
        ran += 1;
    }
    eprintln!("{ran} GPU backend(s) checked");
}
