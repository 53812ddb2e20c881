//! The commands behind `frugal-attn`. Every technique is one entry of
//! [`TECHNIQUES`]: it names the case the report runs and builds a [`Case`]
//! from the shared shape flags; the commands only ever talk to the traits.

mod blockwise;
pub mod crosslayer;
mod decode;
pub mod eval;
mod ring;
mod sparq;
mod table;
mod topk;

use clap::Args;
use frugal_attn::backend::{self, Backend, BackendKind};
use frugal_attn::ring::RingLayout;
use frugal_attn::sparq::GqaMode;
use frugal_attn::{DType, Error, Result};
use std::time::Instant;
use table::Table;

/// Every technique the CLI knows, in report order. A new technique adds one line here.
pub const TECHNIQUES: &[&dyn Technique] =
    &[&decode::Decode, &sparq::Sparq, &topk::Topk, &blockwise::Blockwise, &ring::Ring, &crosslayer::CrossLayer];

/// Seconds of timed launches to aim for when no `--iters` is given.
const TARGET_SECS: f64 = 0.5;
/// Upper bound on automatically chosen iterations.
const MAX_ITERS: usize = 10_000;

const DEFAULT_BATCH: usize = 2;
const DEFAULT_Q_HEADS: usize = 8;
const DEFAULT_KV_HEADS: usize = 2;
const DEFAULT_SEQ: u32 = 1024;
const DEFAULT_HEAD_DIM: usize = 128;
const DEFAULT_DTYPE: DType = DType::F16;

/// The case flags shared by every technique; each ignores those it has no use for.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct CaseArgs {
    /// Sequences in the batch
    #[arg(long, default_value_t = DEFAULT_BATCH, conflicts_with = "seq_lens")]
    pub batch: usize,
    /// Query heads
    #[arg(long, default_value_t = DEFAULT_Q_HEADS)]
    pub q_heads: usize,
    /// Key/value heads (q-heads must be a multiple)
    #[arg(long, default_value_t = DEFAULT_KV_HEADS)]
    pub kv_heads: usize,
    /// Length of every sequence
    #[arg(long, default_value_t = DEFAULT_SEQ, conflicts_with = "seq_lens")]
    pub seq: u32,
    /// Per-sequence lengths, e.g. 5,300,0 (sets the batch size)
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub seq_lens: Option<Vec<u32>>,
    /// Cache positions per sequence [default: the longest length]
    #[arg(long)]
    pub capacity: Option<usize>,
    /// Head dimension
    #[arg(long, default_value_t = DEFAULT_HEAD_DIM)]
    pub head_dim: usize,
    /// Storage type: f32, f16 or bf16
    #[arg(long, default_value_t = DEFAULT_DTYPE)]
    pub dtype: DType,
    /// Seed of the random inputs
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Softmax scale [default: 1/sqrt(head-dim)]
    #[arg(long)]
    pub scale: Option<f32>,
    /// SparQ: query components for the approximate scores [default: head-dim / 8]
    #[arg(long)]
    pub r: Option<usize>,
    /// SparQ: positions attended exactly [default: longest length / 16]; topk: the k
    #[arg(long)]
    pub k: Option<usize>,
    /// SparQ: newest positions always attended [default: k / 4]
    #[arg(long)]
    pub local_window: Option<usize>,
    /// SparQ: GQA selection mode, shared or per-head
    #[arg(long, default_value_t = GqaMode::Shared)]
    pub gqa: GqaMode,
    /// SparQ: no reallocation to the mean value (out = y)
    #[arg(long)]
    pub no_mean: bool,
    #[command(flatten)]
    pub crosslayer: crosslayer::CrossLayerArgs,
    /// Ring: ranks the sequence is split over [default: 4]
    #[arg(long)]
    pub ranks: Option<usize>,
    /// Ring: how tokens are spread over the ranks, contiguous, zigzag or stripe
    #[arg(long, default_value_t = RingLayout::Zigzag)]
    pub layout: RingLayout,
    /// Blockwise, ring: the causal mask (blockwise: the diagonal block, q0 = k0 = 0)
    #[arg(long)]
    pub causal: bool,
    /// Blockwise, ring: check and time the backward too (pre-pass + dQ/dK/dV)
    #[arg(long)]
    pub backward: bool,
}

impl Default for CaseArgs {
    fn default() -> Self {
        CaseArgs {
            batch: DEFAULT_BATCH,
            q_heads: DEFAULT_Q_HEADS,
            kv_heads: DEFAULT_KV_HEADS,
            seq: DEFAULT_SEQ,
            seq_lens: None,
            capacity: None,
            head_dim: DEFAULT_HEAD_DIM,
            dtype: DEFAULT_DTYPE,
            seed: 0,
            scale: None,
            r: None,
            k: None,
            local_window: None,
            gqa: GqaMode::Shared,
            no_mean: false,
            crosslayer: Default::default(),
            ranks: None,
            layout: RingLayout::Zigzag,
            causal: false,
            backward: false,
        }
    }
}

impl CaseArgs {
    /// `(batch, longest length)` before any per-sequence vector is allocated.
    pub fn batch_and_longest(&self) -> (usize, usize) {
        match &self.seq_lens {
            Some(l) => (l.len(), l.iter().copied().max().unwrap_or(0) as usize),
            None => (self.batch, self.seq as usize),
        }
    }

    /// `--capacity`, or the longest length; never shorter than a sequence.
    pub fn capacity(&self) -> Result<usize> {
        let (_, longest) = self.batch_and_longest();
        match self.capacity {
            Some(c) if c < longest => {
                Err(Error::invalid("capacity", format!("{c} is shorter than the longest sequence ({longest})")))
            }
            Some(c) => Ok(c),
            None => Ok(longest.max(1)),
        }
    }

    /// The per-sequence lengths; call once the batch size has been validated.
    pub fn lengths(&self) -> Vec<u32> {
        self.seq_lens.clone().unwrap_or_else(|| vec![self.seq; self.batch])
    }
}

/// `check TECHNIQUE [flags]`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The technique to run
    #[arg(value_parser = technique_parser())]
    pub technique: String,
    /// cpu, cuda or wgpu [default: the best available]
    #[arg(long)]
    pub backend: Option<BackendKind>,
    #[command(flatten)]
    pub case: CaseArgs,
}

/// `bench TECHNIQUE [flags]`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The technique to time
    #[arg(value_parser = technique_parser())]
    pub technique: String,
    /// cpu, cuda or wgpu [default: every available backend]
    #[arg(long)]
    pub backend: Option<BackendKind>,
    /// Timed launches [default: as many as fill about half a second]
    #[arg(long)]
    pub iters: Option<usize>,
    /// One JSON object per line instead of a table
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub case: CaseArgs,
}

/// One attention technique: its report case and how to build a case from the flags.
pub trait Technique: Sync {
    fn name(&self) -> &'static str;
    /// The moderate case `report` runs on every backend: a few seconds on the
    /// CPU reference and on a software rasteriser.
    fn report_case(&self) -> CaseArgs;
    /// Validates the flags and generates the inputs; bad flags are an `Err` naming the argument.
    fn prepare(&self, args: &CaseArgs) -> Result<Box<dyn Case>>;
}

/// A prepared case: inputs generated, reference computed on first use.
pub trait Case {
    fn dtype(&self) -> DType;
    /// Short shape description for tables.
    fn shape(&self) -> String;
    /// The full case (shape, dtype, seed...) for `--json`.
    fn json(&self) -> serde_json::Value;
    /// Bytes one launch reads and writes (the roofline numerator).
    fn bytes(&self) -> u64;
    /// Relative L2 error of one launch on `backend` against the f64 reference.
    fn check(&self, backend: &Backend) -> Result<f64>;
    /// Mean seconds per launch over `iters` launches.
    fn time(&self, backend: &Backend, iters: usize) -> Result<f64>;
    /// Largest passing relative error.
    fn tolerance(&self) -> f64 {
        self.dtype().tolerance()
    }
    /// FLOPs of one launch, for compute-bound techniques (reported as TFLOP/s).
    fn flops(&self) -> Option<f64> {
        None
    }
    /// A line printed under the report table after this case ran on `backend`
    /// in `secs` per launch (SparQ: its traffic and time against dense decode).
    fn note(&self, _backend: &Backend, _secs: f64) -> Option<String> {
        None
    }
}

/// Accepts exactly the registered technique names (and lists them in `--help` and errors).
pub fn technique_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(TECHNIQUES.iter().map(|t| t.name()))
}

pub fn find(name: &str) -> Result<&'static dyn Technique> {
    TECHNIQUES.iter().copied().find(|t| t.name() == name).ok_or_else(|| {
        let known: Vec<_> = TECHNIQUES.iter().map(|t| t.name()).collect();
        Error::invalid("technique", format!("unknown technique `{name}` (known: {})", known.join(", ")))
    })
}

/// Backend, and device name or why it is absent, one row each. Returns the opened backends
/// and whether every backend `FRUGAL_REQUIRE` names is present.
fn probe() -> (Table, Vec<Backend>, bool) {
    let mut table = Table::new(["backend", "device"]);
    let (mut open, mut ok) = (Vec::new(), true);
    for (kind, opened) in backend::probe_all() {
        let status = match opened {
            Ok(b) => {
                let name = b.device_name();
                open.push(b);
                name
            }
            Err(e) => {
                let why = match e {
                    Error::BackendUnavailable { reason, .. } => reason,
                    e => e.to_string(),
                };
                let required = kind.required();
                ok &= !required;
                format!("unavailable{}: {why}", if required { " (required by FRUGAL_REQUIRE)" } else { "" })
            }
        };
        table.row([kind.to_string(), status]);
    }
    (table, open, ok)
}

pub fn devices() {
    print!("{}", probe().0);
}

/// `report`: every technique's report case on every available backend.
pub fn report() -> Result<bool> {
    let (devices, backends, mut ok) = probe();
    println!("{devices}");
    let mut table =
        Table::new(["technique", "backend", "device", "shape", "dtype", "rel err", "result", "time/launch", "GB/s"]);
    let (mut errors, mut notes) = (Vec::new(), Vec::new());
    for t in TECHNIQUES {
        let case = t.prepare(&t.report_case())?;
        for b in &backends {
            let mut row =
                vec![t.name().to_string(), b.kind().to_string(), device(b), case.shape(), case.dtype().to_string()];
            let t0 = Instant::now();
            let measured = case.check(b).and_then(|err| {
                // The CPU backend is the f64 reference: its check was one launch, and a slow one.
                let secs = match b {
                    Backend::Cpu => t0.elapsed().as_secs_f64(),
                    _ => measure(case.as_ref(), b, None)?.0,
                };
                Ok((err, secs))
            });
            match measured {
                Ok((err, secs)) => {
                    notes.extend(case.note(b, secs));
                    let pass = err <= case.tolerance();
                    ok &= pass;
                    row.extend([
                        format!("{err:.2e}"),
                        verdict(pass).into(),
                        fmt_secs(secs),
                        fmt_gbps(case.bytes(), secs),
                    ]);
                }
                // A technique without a transport for this backend yet is skipped, not failed.
                Err(Error::BackendUnavailable { reason, .. }) => {
                    notes.push(format!("{} on {}: skipped ({reason})", t.name(), b.kind()));
                    row.extend(["-".into(), "skipped".into(), "-".into(), "-".into()]);
                }
                Err(e) => {
                    ok = false;
                    errors.push(format!("{} on {}: {e}", t.name(), b.kind()));
                    row.extend(["-".into(), "ERROR".into(), "-".into(), "-".into()]);
                }
            }
            table.row(row);
        }
    }
    print!("{table}");
    for n in &notes {
        println!("{n}");
    }
    for e in &errors {
        eprintln!("error: {e}");
    }
    if backends.iter().any(|b| b.kind() == BackendKind::Cpu) {
        println!("(cpu rows time the f64 reference, not a kernel)");
    }
    println!("{}", if ok { "all checks passed" } else { "SOME CHECKS FAILED" });
    Ok(ok)
}

/// `check`: one case on one backend; the last line is the verdict.
pub fn check(args: &CheckArgs) -> Result<bool> {
    let t = find(&args.technique)?;
    let case = t.prepare(&args.case)?;
    let b = match args.backend {
        Some(k) => k.open()?,
        None => backend::best(),
    };
    println!("{} on {} ({}): {} {}", t.name(), b.kind(), b.device_name(), case.shape(), case.dtype());
    let err = case.check(&b)?;
    let pass = err <= case.tolerance();
    if pass {
        println!("PASS rel_err={err:.3e}");
    } else {
        println!("FAIL rel_err={err:.3e} (tolerance {:.0e})", case.tolerance());
    }
    Ok(pass)
}

/// `bench`: times one case on the chosen backend, or on every available one.
/// A backend that fails is reported on stderr and makes the exit status non-zero.
pub fn bench(args: &BenchArgs) -> Result<bool> {
    let t = find(&args.technique)?;
    let case = t.prepare(&args.case)?;
    let backends = match args.backend {
        Some(k) => vec![k.open()?],
        None => backend::probe_all().into_iter().filter_map(|(_, b)| b.ok()).collect(),
    };
    let mut table =
        Table::new(["technique", "backend", "device", "shape", "dtype", "iters", "time/launch", "GB/s", "bytes"]);
    let (bytes, mut ok, mut notes) = (case.bytes(), true, Vec::new());
    for b in &backends {
        let (secs, n) = match measure(case.as_ref(), b, args.iters) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("error: {} on {}: {e}", t.name(), b.kind());
                ok = false;
                continue;
            }
        };
        if let Some(flops) = case.flops() {
            notes.push(format!("{} on {}: {:.3} TFLOP/s", t.name(), b.kind(), flops / secs / 1e12));
        }
        if args.json {
            let line = serde_json::json!({
                "technique": t.name(),
                "backend": b.kind().to_string(),
                "device": b.device_name(),
                "case": case.json(),
                "iters": n,
                "seconds": secs,
                "bytes": bytes,
                "gbps": bytes as f64 / secs / 1e9,
                "tflops": case.flops().map(|f| f / secs / 1e12),
            });
            println!("{line}");
        } else {
            table.row([
                t.name().to_string(),
                b.kind().to_string(),
                device(b),
                case.shape(),
                case.dtype().to_string(),
                n.to_string(),
                fmt_secs(secs),
                fmt_gbps(bytes, secs),
                bytes.to_string(),
            ]);
        }
    }
    if !args.json {
        print!("{table}");
        for n in &notes {
            println!("{n}");
        }
    }
    Ok(ok)
}

/// Seconds per launch and the launches timed: `iters` when given, else a one-launch
/// probe scaled up to about [`TARGET_SECS`] (the probe itself when that is already long).
fn measure(case: &dyn Case, b: &Backend, iters: Option<usize>) -> Result<(f64, usize)> {
    if let Some(n) = iters {
        return Ok((case.time(b, n.max(1))?, n.max(1)));
    }
    let probe = case.time(b, 1)?;
    let n = ((TARGET_SECS / probe.max(1e-9)) as usize).min(MAX_ITERS);
    if n < 3 {
        return Ok((probe, 1));
    }
    Ok((case.time(b, n)?, n))
}

/// The device column; the CPU backend is the f64 reference.
fn device(b: &Backend) -> String {
    match b {
        Backend::Cpu => format!("{} f64 reference", b.device_name()),
        _ => b.device_name(),
    }
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "pass"
    } else {
        "FAIL"
    }
}

fn fmt_secs(s: f64) -> String {
    match s {
        s if s >= 1.0 => format!("{s:.2} s"),
        s if s >= 1e-3 => format!("{:.2} ms", s * 1e3),
        s => format!("{:.1} us", s * 1e6),
    }
}

fn fmt_gbps(bytes: u64, secs: f64) -> String {
    match bytes as f64 / secs / 1e9 {
        g if g >= 100.0 => format!("{g:.0}"),
        g if g >= 10.0 => format!("{g:.1}"),
        g if g >= 1.0 => format!("{g:.2}"),
        g => format!("{g:.3}"),
    }
}
