//! `borough bench <scenario>`: whole-system benchmarks with their baselines.

use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Scenario to run: entities.
    pub scenario: String,
    /// Tiny sizes, for CI: checks the harness works, measures nothing meaningful.
    #[arg(long)]
    pub quick: bool,
}

pub fn run(args: BenchArgs) -> Result<(), String> {
    Err(format!("unknown scenario '{}'", args.scenario))
}
