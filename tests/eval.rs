//! SmolLM2-135M with this crate's attention (feature `eval`): the tokenizer
//! built from the GGUF, dense perplexity in the sane range, and SparQ at 1/8
//! of dense traffic close to dense. Needs the model (`scripts/fetch_smollm2.sh`,
//! or `FRUGAL_MODEL=PATH`); skipped without it unless `FRUGAL_REQUIRE` names `model`.
#![cfg(feature = "eval")]

use frugal_attn::eval::attention::SparqBudget;
use frugal_attn::eval::{self, Method, Model};
use std::path::PathBuf;

/// Tokens scored: long enough for SparQ at 1/8 to drop most of the cache,
/// short enough for CI's two cores in the dev profile.
const CONTEXT: usize = 768;

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
    let digits = eval::tokenizer::encode(&tok, "1865").unwrap();
    assert_eq!(digits.len(), 4);
    assert_eq!(eval::tokenizer::encode(&tok, "<|im_start|>").unwrap().len(), 1);

    ids.truncate(CONTEXT);
    let dense = eval::evaluate(&model, &ids, Method::Dense, |_, _| {}).unwrap();
    let ppl = dense.perplexity();
    eprintln!("dense perplexity {ppl:.3} over {} tokens", ids.len());
    assert!((3.0..20.0).contains(&ppl), "dense perplexity {ppl}");
    assert_eq!(dense.traffic.fraction(), 1.0);

    let sparq = eval::evaluate(&model, &ids, Method::sparq(SparqBudget::Fraction(0.125)), |_, _| {}).unwrap();
    eprintln!("{}\n{}", eval::table_header(), eval::table_row(&sparq, &dense));
    let frac = sparq.traffic.fraction();
    assert!((0.12..0.15).contains(&frac), "sparq traffic fraction {frac}");
    let rel = sparq.perplexity() / ppl - 1.0;
    assert!(rel.abs() < REL_PPL_1_8, "sparq 1/8 perplexity {} vs dense {ppl}", sparq.perplexity());
    let agree = sparq.agreement(&dense);
    assert!(agree > MIN_AGREE_1_8, "sparq 1/8 top-1 agreement {agree}");
}

/// Thresholds a little looser than measured (see BENCHMARKS.md), so a real
/// regression fails and noise does not.
const REL_PPL_1_8: f64 = 0.10;
const MIN_AGREE_1_8: f64 = 0.80;
