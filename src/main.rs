//! `frugal-attn`: finds the backends on this machine, checks every technique's
//! kernels against the f64 reference and times them. `frugal-attn --help` for usage.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "frugal-attn",
    version,
    about = "Checks and times the frugal-attn kernels on every backend found here"
)]
struct Cli {
    /// What to do; with none, `report`.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Lists the backends, then checks and times every technique on each available one (the default).
    Report,
    /// Runs one case against the f64 reference; the last line is PASS or FAIL.
    Check(cli::CheckArgs),
    /// Times one case; prints time per launch, GB/s and bytes moved.
    Bench(cli::BenchArgs),
    /// Lists each backend with its device, or why it is unavailable.
    Devices,
    /// KV-cache bytes per token of a cross-layer map against the standard cache.
    KvMemory(cli::crosslayer::KvMemoryArgs),
    /// SmolLM2-135M perplexity and top-1 agreement with this crate's attention
    /// (needs `--features eval`); the last line is the method's table row.
    Eval(cli::eval::EvalArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command.unwrap_or(Command::Report) {
        Command::Report => cli::report(),
        Command::Check(args) => cli::check(&args),
        Command::Bench(args) => cli::bench(&args),
        Command::KvMemory(args) => cli::crosslayer::kv_memory(&args),
        Command::Eval(args) => cli::eval::eval(&args),
        Command::Devices => {
            cli::devices();
            Ok(true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
