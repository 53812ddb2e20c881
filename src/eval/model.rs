//! SmolLM2 (a Llama) from a GGUF file: weights read and dequantized to f32 once
//! by candle, the forward pass built from candle's ops, and the attention of
//! every layer handed to a caller-supplied function (this crate's kernels).
//!
//! The text runs layer by layer: per layer, Q, K and V for every new position,
//! then each new position's attention over keys `0..=t` by the caller.
//! Causality makes this exactly what token-by-token decode computes. A
//! [`Past`] (the per-layer Q, K and V of a prefix, e.g. a dense prefill) lets
//! several methods continue from the same prefix without recomputing it.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor, D};
use std::fs::File;
use std::path::Path;

pub(crate) fn candle_err(e: candle_core::Error) -> Error {
    Error::device("candle", e)
}

/// The hyperparameters read from `llama.*` metadata.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub embed: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub rms_eps: f64,
    pub vocab: usize,
}

struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    // Projections stored transposed, (in, out), so `x.matmul(w)` needs no copy.
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// What one layer hands to the attention: row-major f32 arrays; positions
/// `start..n` are new and need their attention, `0..start` come from a [`Past`].
pub struct LayerQkv<'a> {
    pub layer: usize,
    pub n: usize,
    pub start: usize,
    /// `[start, q_heads, head_dim]`: the past positions' queries (RoPE applied).
    pub q_past: &'a [f32],
    /// `[n - start, q_heads, head_dim]`: the new positions' queries (RoPE applied).
    pub q: &'a [f32],
    /// `[kv_heads, n, head_dim]`, RoPE applied.
    pub k: &'a [f32],
    /// `[kv_heads, n, head_dim]`.
    pub v: &'a [f32],
}

/// Q, K and V of every layer for the first `len` tokens of a text.
#[derive(Debug, Clone, Default)]
pub struct Past {
    /// The tokens these were computed from.
    pub ids: Vec<u32>,
    /// Per layer `[len, q_heads, head_dim]`.
    pub q: Vec<Vec<f32>>,
    /// Per layer `[kv_heads, len, head_dim]`.
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl Past {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// What a forward pass scored: per new position `t < n - 1`, the log-probability
/// of `ids[t + 1]` and the arg-max token; and the [`Past`] of all `n` tokens.
pub struct Scored {
    pub logp: Vec<f64>,
    pub argmax: Vec<u32>,
    pub past: Past,
}

/// `[heads, len, d]` rows of `a` (length `la`) then of `b` (length `lb`), per head.
fn concat_rows(a: &[f32], la: usize, b: &[f32], lb: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads * (la + lb) * d);
    for h in 0..heads {
        out.extend_from_slice(&a[h * la * d..][..la * d]);
        out.extend_from_slice(&b[h * lb * d..][..lb * d]);
    }
    out
}

pub struct Model {
    pub config: ModelConfig,
    embed: Tensor,
    embed_t: Tensor,
    out_norm: Tensor,
    layers: Vec<Layer>,
    pub content: Content,
}

fn meta_usize(ct: &Content, key: &str) -> Result<usize> {
    let v = ct.metadata.get(key).ok_or_else(|| Error::invalid("model", format!("GGUF metadata lacks `{key}`")))?;
    v.to_u32().map(|x| x as usize).or_else(|_| v.to_u64().map(|x| x as usize)).map_err(candle_err)
}

fn meta_f32(ct: &Content, key: &str) -> Result<f32> {
    let v = ct.metadata.get(key).ok_or_else(|| Error::invalid("model", format!("GGUF metadata lacks `{key}`")))?;
    v.to_f32().map_err(candle_err)
}

impl Model {
    /// Reads a Llama-architecture GGUF (SmolLM2-135M is what this was checked on).
    pub fn load(path: &Path) -> Result<Model> {
        let mut f = File::open(path).map_err(|e| Error::invalid("model", format!("{}: {e}", path.display())))?;
        let ct = Content::read(&mut f).map_err(candle_err)?;
        let dev = Device::Cpu;
        let embed_len = meta_usize(&ct, "llama.embedding_length")?;
        let q_heads = meta_usize(&ct, "llama.attention.head_count")?;
        let config = ModelConfig {
            layers: meta_usize(&ct, "llama.block_count")?,
            q_heads,
            kv_heads: meta_usize(&ct, "llama.attention.head_count_kv")?,
            embed: embed_len,
            head_dim: embed_len / q_heads.max(1),
            rope_base: meta_f32(&ct, "llama.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: meta_f32(&ct, "llama.attention.layer_norm_rms_epsilon")? as f64,
            vocab: 0,
        };
        let mut get = |name: &str| -> Result<Tensor> {
            ct.tensor(&mut f, name, &dev).and_then(|q| q.dequantize(&dev)).map_err(candle_err)
        };
        let t = |w: Tensor| -> Result<Tensor> { w.t().and_then(|x| x.contiguous()).map_err(candle_err) };
        let embed = get("token_embd.weight")?;
        // No `output.weight`: the head is tied to the embedding.
        let embed_t = t(embed.clone())?;
        let out_norm = get("output_norm.weight")?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut w = |s: &str| get(&format!("blk.{i}.{s}.weight"));
            layers.push(Layer {
                attn_norm: w("attn_norm")?,
                ffn_norm: w("ffn_norm")?,
                wq: t(w("attn_q")?)?,
                wk: t(w("attn_k")?)?,
                wv: t(w("attn_v")?)?,
                wo: t(w("attn_output")?)?,
                gate: t(w("ffn_gate")?)?,
                up: t(w("ffn_up")?)?,
                down: t(w("ffn_down")?)?,
            });
        }
        let vocab = embed.dim(0).map_err(candle_err)?;
        Ok(Model { config: ModelConfig { vocab, ..config }, embed, embed_t, out_norm, layers, content: ct })
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + self.config.rms_eps)?.sqrt()?)?.broadcast_mul(w)
    }

    /// Interleaved RoPE (pairs `2i, 2i+1`, as the GGUF converter permuted Q and K)
    /// on `x` of shape `[n, heads, head_dim]`.
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let (n, h, d) = x.dims3()?;
        let x = x.reshape((n, h, d / 2, 2))?;
        let x0 = x.narrow(3, 0, 1)?.squeeze(3)?;
        let x1 = x.narrow(3, 1, 1)?.squeeze(3)?;
        let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
        let r1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
        Tensor::stack(&[r0, r1], 3)?.reshape((n, h, d))
    }

    /// Runs the tokens of `ids` after `past` (which must hold a prefix of `ids`;
    /// `None`: from the start) through the model with `attend` as every layer's
    /// attention (it returns `[n - start, q_heads, head_dim]`).
    pub fn forward(
        &self,
        ids: &[u32],
        past: Option<&Past>,
        mut attend: impl FnMut(&LayerQkv<'_>) -> Result<Vec<f32>>,
        mut progress: impl FnMut(usize),
    ) -> Result<Scored> {
        let c = self.config;
        let empty = Past::default();
        let past = past.unwrap_or(&empty);
        let (n, start) = (ids.len(), past.len());
        if !past.is_empty() && (past.q.len() != c.layers || !ids.starts_with(&past.ids) || n <= start) {
            return Err(Error::invalid("past", "must hold every layer of a proper prefix of the text"));
        }
        let m = n - start;
        let dev = Device::Cpu;
        let ids_t = Tensor::new(&ids[start..], &dev).map_err(candle_err)?;
        let mut x = self.embed.index_select(&ids_t, 0).map_err(candle_err)?;
        let (cos, sin) = self.rope_tables(start, n).map_err(candle_err)?;
        let mut next = Past { ids: ids.to_vec(), ..Past::default() };
        for (li, l) in self.layers.iter().enumerate() {
            let (q, k, v) = (|| {
                let h = self.rms_norm(&x, &l.attn_norm)?;
                let q = self.rope(&h.matmul(&l.wq)?.reshape((m, c.q_heads, c.head_dim))?, &cos, &sin)?;
                let k = self.rope(&h.matmul(&l.wk)?.reshape((m, c.kv_heads, c.head_dim))?, &cos, &sin)?;
                let v = h.matmul(&l.wv)?.reshape((m, c.kv_heads, c.head_dim))?;
                let flat = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
                Ok::<_, candle_core::Error>((flat(q)?, flat(k.transpose(0, 1)?)?, flat(v.transpose(0, 1)?)?))
            })()
            .map_err(candle_err)?;
            let (k, v) = match start {
                0 => (k, v),
                _ => (
                    concat_rows(&past.k[li], start, &k, m, c.kv_heads, c.head_dim),
                    concat_rows(&past.v[li], start, &v, m, c.kv_heads, c.head_dim),
                ),
            };
            let q_past: &[f32] = past.q.get(li).map_or(&[], |q| q);
            let o = attend(&LayerQkv { layer: li, n, start, q_past, q: &q, k: &k, v: &v })?;
            next.q.push([q_past, &q].concat());
            next.k.push(k);
            next.v.push(v);
            x = (|| {
                let o = Tensor::from_vec(o, (m, c.q_heads * c.head_dim), &dev)?;
                let x = (&x + o.matmul(&l.wo)?)?;
                let h = self.rms_norm(&x, &l.ffn_norm)?;
                let m = (h.matmul(&l.gate)?.silu()? * h.matmul(&l.up)?)?;
                &x + m.matmul(&l.down)?
            })()
            .map_err(candle_err)?;
            progress(li + 1);
        }
        let h = self.rms_norm(&x, &self.out_norm).map_err(candle_err)?;
        let (mut logp, mut argmax) = (Vec::with_capacity(m), Vec::with_capacity(m));
        // Logits in chunks: the full [m, vocab] matrix would be large.
        const CHUNK: usize = 256;
        for first in (0..m.saturating_sub(1)).step_by(CHUNK) {
            let rows = CHUNK.min(m - 1 - first);
            let logits = h
                .narrow(0, first, rows)
                .and_then(|x| x.matmul(&self.embed_t))
                .and_then(|l| l.to_dtype(DType::F32))
                .and_then(|l| l.to_vec2::<f32>())
                .map_err(candle_err)?;
            for (i, row) in logits.iter().enumerate() {
                let (mut best, mut m) = (0usize, f32::NEG_INFINITY);
                for (j, &v) in row.iter().enumerate() {
                    if v > m {
                        (best, m) = (j, v);
                    }
                }
                let z: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
                let target = ids[start + first + i + 1] as usize;
                logp.push((row[target] - m) as f64 - z.ln());
                argmax.push(best as u32);
            }
        }
        Ok(Scored { logp, argmax, past: next })
    }

    /// `cos`, `sin` of `pos * base^(-2i/D)` for positions `from..to`, shape `[to - from, 1, D/2]`.
    fn rope_tables(&self, from: usize, to: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let d = self.config.head_dim;
        let base = self.config.rope_base as f64;
        let inv: Vec<f64> = (0..d / 2).map(|i| base.powf(-((2 * i) as f64) / d as f64)).collect();
        let n = to - from;
        let mut cos = Vec::with_capacity(n * d / 2);
        let mut sin = Vec::with_capacity(n * d / 2);
        for p in from..to {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let dev = Device::Cpu;
        Ok((Tensor::from_vec(cos, (n, 1, d / 2), &dev)?, Tensor::from_vec(sin, (n, 1, d / 2), &dev)?))
    }
}
