//! SmolLM2's tokenizer, built with the `tokenizers` crate from the GGUF's own
//! vocabulary and merges. candle's `TokenizerFromGguf` does not know
//! `tokenizer.ggml.pre = "smollm"` and adds a prefix space (wrong ids), so the
//! pipeline is spelled out here as in the model's `tokenizer.json`: a BPE after
//! an individual-digits split and byte-level pre-tokenization without prefix
//! space, a byte-level decoder, and the control tokens as special tokens.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

/// `tokenizer.ggml.token_type` of control tokens (llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL`).
const CONTROL: i64 = 3;

fn bad(what: impl std::fmt::Display) -> Error {
    Error::invalid("model", format!("GGUF tokenizer: {what}"))
}

fn strings<'a>(ct: &'a Content, key: &str) -> Result<Vec<&'a str>> {
    let v = ct.metadata.get(key).ok_or_else(|| bad(format!("no `{key}`")))?;
    let items = v.to_vec().map_err(|_| bad(format!("`{key}` is not an array")))?;
    items
        .iter()
        .map(|x| x.to_string().map(String::as_str).map_err(|_| bad(format!("`{key}` holds a non-string"))))
        .collect()
}

fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::I32(x) => Some(*x as i64),
        Value::U32(x) => Some(*x as i64),
        Value::I64(x) => Some(*x),
        Value::U64(x) => Some(*x as i64),
        Value::I8(x) => Some(*x as i64),
        Value::U8(x) => Some(*x as i64),
        Value::I16(x) => Some(*x as i64),
        Value::U16(x) => Some(*x as i64),
        _ => None,
    }
}

/// The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
pub fn from_gguf(ct: &Content) -> Result<Tokenizer> {
    let tokens = strings(ct, "tokenizer.ggml.tokens")?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let merges = strings(ct, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| bad(format!("merge `{m}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(bad)?;
    let mut tok = Tokenizer::new(bpe);
    let pre = Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]);
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    if let Some(types) = ct.metadata.get("tokenizer.ggml.token_type") {
        let types = types.to_vec().map_err(|_| bad("`tokenizer.ggml.token_type` is not an array"))?;
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| integer(t) == Some(CONTROL))
            .map(|(_, s)| AddedToken::from(s.to_string(), true))
            .collect();
        tok.add_special_tokens(special).map_err(bad)?;
    }
    Ok(tok)
}

/// Token ids of `text` (no BOS: SmolLM2 adds none).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(text, false).map_err(bad)?.get_ids().to_vec())
}
