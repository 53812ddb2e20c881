//! Cross-layer KV mapping (`frugal_attn::crosslayer`): `check crosslayer`,
//! `bench crosslayer` and `kv-memory`.

use super::{Case, CaseArgs, Technique};
use clap::Args;
use frugal_attn::crosslayer::run::{self, AttnInputs, AttnSession};
use frugal_attn::crosslayer::{ring_rows, AttnParams, AttnShape, LayerMap, MaskMode};
use frugal_attn::host::{rel_l2, Rng};
use frugal_attn::{backend, Backend, DType, Error, Result};
use std::cell::OnceCell;

const DEFAULT_LAYERS: usize = 22;
const DEFAULT_WARMUP: usize = 2;
/// Inputs larger than this (q, K and V on the host) are refused before anything is allocated.
const MAX_HOST_BYTES: u128 = 32 << 30;

/// The layer map flags, shared by `check`/`bench crosslayer` and `kv-memory`.
#[derive(Args, Debug, Clone, PartialEq, Default)]
pub struct CrossLayerArgs {
    /// Cross-layer: layers of the model
    #[arg(long)]
    pub layers: Option<usize>,
    /// Cross-layer: whyNLP/LCKV `layer_types` string, e.g. 0_2_2_3 or 0s_1s_2_2
    #[arg(long, conflicts_with_all = ["lckv_warmup", "cla", "yoco_window"])]
    pub layer_types: Option<String>,
    /// Cross-layer: LCKV with this many warmup layers [the default map: LCKV, 2]
    #[arg(long, conflicts_with_all = ["cla", "yoco_window"])]
    pub lckv_warmup: Option<usize>,
    /// Cross-layer: CLA, groups of this many layers share one KV
    #[arg(long, conflicts_with = "yoco_window")]
    pub cla: Option<usize>,
    /// Cross-layer: YOCO with this sliding window in the lower half
    #[arg(long)]
    pub yoco_window: Option<usize>,
    /// Cross-layer: window of the `s` layers of --layer-types
    #[arg(long)]
    pub window: Option<usize>,
    /// Cross-layer: every layer masks its diagonal (released LCKV checkpoints)
    #[arg(long)]
    pub force_nodiag: bool,
    /// Cross-layer: query tokens per launch (1 = decode, more = a prefill chunk)
    #[arg(long)]
    pub chunk: Option<usize>,
}

impl CrossLayerArgs {
    pub fn map(&self) -> Result<LayerMap> {
        let layers = self.layers.unwrap_or(DEFAULT_LAYERS);
        let map = match (&self.layer_types, self.cla, self.yoco_window) {
            (Some(text), _, _) => LayerMap::parse(text, layers)?,
            (None, Some(share), _) => LayerMap::cla(layers, share),
            (None, None, Some(w)) => LayerMap::yoco(layers, w),
            (None, None, None) => LayerMap::lckv(layers, self.lckv_warmup.unwrap_or(DEFAULT_WARMUP)),
        };
        let map = match self.window {
            Some(w) => map.with_window(w),
            None => map,
        };
        let map = map.with_force_nodiag(self.force_nodiag);
        map.validate()?;
        Ok(map)
    }
}

pub struct CrossLayer;

impl Technique for CrossLayer {
    fn name(&self) -> &'static str {
        "crosslayer"
    }

    fn report_case(&self) -> CaseArgs {
        CaseArgs {
            q_heads: 16,
            kv_heads: 4,
            head_dim: 128,
            seq_lens: Some(vec![2048, 1536, 1024, 513]),
            dtype: DType::F16,
            ..CaseArgs::default()
        }
    }

    fn prepare(&self, args: &CaseArgs) -> Result<Box<dyn Case>> {
        let map = args.crosslayer.map()?;
        let queries = args.crosslayer.chunk.unwrap_or(1);
        let (batch, _) = args.batch_and_longest();
        let capacity = args.capacity()?;
        let layer = most_shared_layer(&map);
        let window = map.window_of(layer);
        // A sliding slot is a ring buffer unless the context fits it anyway.
        let ring = window.is_some_and(|w| ring_rows(w, queries) < capacity);
        let rows = match window {
            Some(w) if ring => ring_rows(w, queries),
            _ => capacity,
        };
        let shape =
            AttnShape { batch, queries, q_heads: args.q_heads, kv_heads: args.kv_heads, head_dim: args.head_dim, rows };
        let elems = (batch as u128)
            * (2 * queries as u128 * args.q_heads as u128 + 2 * args.kv_heads as u128 * rows as u128)
            * args.head_dim as u128;
        if elems * args.dtype.size() as u128 > MAX_HOST_BYTES {
            return Err(Error::invalid("shape", "the inputs would exceed the 32 GiB host limit"));
        }
        // Decode of a layer reading an upper layer sees the whole existing cache.
        let mask = match map.mask(layer) {
            MaskMode::Strict if queries == 1 && map.attends_upward(layer) => MaskMode::Full,
            m => m,
        };
        let mut params = AttnParams::new(shape, mask).with_window(window).with_ring(ring);
        if let Some(scale) = args.scale {
            params = params.with_scale(scale);
        }
        params.validate()?;
        // The chunk's queries are the last `queries` positions of each sequence (all of its keys written).
        let lens = args.lengths();
        let q_pos: Vec<u32> = lens.iter().map(|&n| n.saturating_sub(queries as u32)).collect();
        let inputs = AttnInputs::random(&params, args.dtype, q_pos, lens, &mut Rng::new(args.seed));
        Ok(Box::new(CrossLayerCase { map, layer, params, inputs, seed: args.seed, reference: OnceCell::new() }))
    }
}

/// A layer that reads the slot most layers share (the slot the savings come from).
fn most_shared_layer(map: &LayerMap) -> usize {
    let readers = |t: usize| (0..map.layers()).filter(|&l| map.target(l) == t).count();
    let slot = map.slot_layers().into_iter().max_by_key(|&t| (readers(t), std::cmp::Reverse(t))).unwrap_or(0);
    (0..map.layers()).find(|&l| map.target(l) == slot).unwrap_or(0)
}

struct CrossLayerCase {
    map: LayerMap,
    layer: usize,
    params: AttnParams,
    inputs: AttnInputs,
    seed: u64,
    reference: OnceCell<Vec<f64>>,
}

impl CrossLayerCase {
    fn reference(&self) -> Result<&[f64]> {
        if self.reference.get().is_none() {
            let _ = self.reference.set(run::reference(&self.params, &self.inputs)?);
        }
        Ok(self.reference.get().expect("set just above"))
    }
}

impl Case for CrossLayerCase {
    fn dtype(&self) -> DType {
        self.inputs.dtype()
    }

    fn shape(&self) -> String {
        let s = &self.params.shape;
        let max = self.inputs.kv_lens.iter().max().copied().unwrap_or(0);
        let win = self.params.window.map(|w| format!(" w={w}{}", if self.params.ring { " ring" } else { "" }));
        format!(
            "L={} slots={} layer {}->{} {:?} B={} T={} Hq={} Hkv={} D={} S<={max}{}",
            self.map.layers(),
            self.map.slot_layers().len(),
            self.layer,
            self.map.target(self.layer),
            self.params.mask,
            s.batch,
            s.queries,
            s.q_heads,
            s.kv_heads,
            s.head_dim,
            win.unwrap_or_default()
        )
    }

    fn json(&self) -> serde_json::Value {
        let s = &self.params.shape;
        serde_json::json!({
            "layer_types": self.map.layer_types(),
            "layer": self.layer,
            "mask": format!("{:?}", self.params.mask),
            "window": self.params.window,
            "ring": self.params.ring,
            "batch": s.batch,
            "queries": s.queries,
            "q_heads": s.q_heads,
            "kv_heads": s.kv_heads,
            "head_dim": s.head_dim,
            "rows": s.rows,
            "kv_lens": self.inputs.kv_lens,
            "seed": self.seed,
            "dtype": self.dtype().to_string(),
        })
    }

    fn bytes(&self) -> u64 {
        self.params.bytes_moved(&self.inputs.kv_lens, self.dtype())
    }

    fn check(&self, backend: &Backend) -> Result<f64> {
        let got = run::run(backend, &self.params, &self.inputs)?;
        Ok(rel_l2(&got, self.reference()?))
    }

    fn time(&self, backend: &Backend, iters: usize) -> Result<f64> {
        AttnSession::new(backend, &self.params, &self.inputs)?.time(iters)
    }

    fn note(&self, backend: &Backend, _secs: f64) -> Option<String> {
        let s = &self.params.shape;
        let m = self.map.memory(s.kv_heads, s.head_dim, self.dtype());
        let tokens = self.inputs.kv_lens.iter().copied().max().unwrap_or(1).max(1) as usize;
        let allocated = allocated_line(backend, &self.map, self.dtype(), s.kv_heads, s.head_dim, tokens)
            .unwrap_or_else(|e| format!("allocating both caches failed: {e}"));
        Some(format!(
            "crosslayer {}: KV cache {} B/token against {} B/token standard ({:.3}x); {allocated}",
            self.map.layer_types(),
            m.mapped_per_token,
            m.standard_per_token,
            m.ratio()
        ))
    }
}

/// `kv-memory`: KV-cache bytes per token, standard against mapped.
#[derive(Args, Debug)]
pub struct KvMemoryArgs {
    /// Key/value heads
    #[arg(long)]
    pub kv_heads: usize,
    /// Head dimension
    #[arg(long)]
    pub head_dim: usize,
    /// Storage type: f32, f16 or bf16
    #[arg(long, default_value_t = DType::F16)]
    pub dtype: DType,
    #[command(flatten)]
    pub map: CrossLayerArgs,
    /// Also allocate both caches for this many positions of one sequence on
    /// the best backend and print their device bytes
    #[arg(long, value_name = "TOKENS")]
    pub allocate: Option<usize>,
}

pub fn kv_memory(args: &KvMemoryArgs) -> Result<bool> {
    let map = args.map.map()?;
    let m = map.memory(args.kv_heads, args.head_dim, args.dtype);
    println!("layer_types: {}", map.layer_types());
    println!("slots: {} of {} layers ({:?})", map.slot_layers().len(), map.layers(), map.slot_layers());
    println!("standard cache: {} bytes/token", m.standard_per_token);
    println!("mapped cache:   {} bytes/token", m.mapped_per_token);
    if m.windowed_slots > 0 {
        let w = map.window.unwrap_or(0);
        println!(
            "  of which {} sliding-window slots are rings of {w} rows: {} bytes/token grow with the context, \
             plus {} bytes per sequence",
            m.windowed_slots,
            m.full_slots_per_token,
            m.windowed_slots * w * m.row_bytes
        );
    }
    println!("reduction: {:.2}x ({:.1}% of the standard cache)", 1.0 / m.ratio(), 100.0 * m.ratio());
    if let Some(tokens) = args.allocate {
        let backend = backend::best();
        println!("{}", allocated_line(&backend, &map, args.dtype, args.kv_heads, args.head_dim, tokens)?);
    }
    Ok(true)
}

/// Both caches allocated on `backend` for `tokens` positions, as one line.
fn allocated_line(
    backend: &Backend,
    map: &LayerMap,
    dtype: DType,
    kv_heads: usize,
    head_dim: usize,
    tokens: usize,
) -> Result<String> {
    if tokens == 0 {
        return Err(Error::invalid("allocate", "must be at least 1 position"));
    }
    let (mapped, standard) = run::allocated_bytes(backend, map, dtype, kv_heads, head_dim, tokens)?;
    Ok(format!(
        "allocated on {} ({}) for {tokens} positions: mapped {mapped} bytes ({:.1}/token), standard {standard} bytes \
         ({:.1}/token): {:.1}% of the standard cache",
        backend.kind(),
        backend.device_name(),
        mapped as f64 / tokens as f64,
        standard as f64 / tokens as f64,
        100.0 * mapped as f64 / standard.max(1) as f64
    ))
}
