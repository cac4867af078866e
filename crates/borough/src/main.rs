//! The `borough` binary: the server and the commands around it.

mod bench;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "borough",
    version,
    about = "Borough: a smart-city data platform speaking NGSI-LD"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (production entry point).
    Serve(serve::ServeArgs),
    /// Run a benchmark scenario against a fresh server on loopback, with its baselines.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("borough: {e}");
            ExitCode::FAILURE
        }
    }
}
