//! The `borough` binary: the server and the commands around it.

mod access;
mod bench;
mod demo;
mod import;
mod serve;
mod simulate;

use clap::{Parser, Subcommand};

/// glibc's allocator spends much of a busy server's time growing and
/// protecting per-thread arenas (measured with perf under batch ingest);
/// mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
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
    Serve(Box<serve::ServeArgs>),
    /// Run a server with a simulated city streaming live data.
    Demo(demo::DemoArgs),
    /// Provision a simulated city on a running server and stream its measurements.
    Simulate(simulate::SimulateArgs),
    /// Import historic points from a CSV file into a running server.
    Import(import::ImportArgs),
    /// Run a benchmark scenario against a fresh server on loopback, with its baselines.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Demo(args) => demo::run(args),
        Command::Simulate(args) => simulate::run(args),
        Command::Import(args) => import::run(args),
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
