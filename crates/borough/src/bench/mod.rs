//! `borough bench <scenario>`: whole-system benchmarks with their baselines.
//!
//! Each scenario starts a fresh `borough serve` child on loopback (with a
//! temporary data directory), drives it from a load generator running on its
//! own tokio runtime, measures the baselines next to it, prints a table and
//! writes every figure as JSON.

mod auth;
mod cluster;
mod common;
mod dashboard;
mod entities;
mod federation;
mod geo;
mod geo_pg;
mod load;
mod mqtt;
mod notify;
mod postgres;
mod query;
mod query_pg;
mod report;
mod server;
mod temporal;
mod temporal_data;
mod temporal_http;
mod temporal_pg;
mod temporal_vm;

use clap::Args;
use std::path::PathBuf;

/// Default PostgreSQL connection string of the `postgres-jsonb` baseline.
pub const DEFAULT_PG: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Scenario to run: entities, query, geo, notify, temporal, dashboard, mqtt, federation, cluster.
    pub scenario: String,
    /// Tiny sizes, for CI: checks the harness works, measures nothing meaningful.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the results as JSON [default: bench-results/<scenario>.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// PostgreSQL connection string of the baselines (postgres-jsonb, PostGIS, temporal).
    #[arg(long, env = "BOROUGH_BENCH_PG", default_value = DEFAULT_PG)]
    pub pg: String,
    /// entities and query: measure Borough's phases again with access control
    /// on, by API key and by OpenID Connect token (Node.js runs the provider
    /// of scripts/oidc-provider), next to the same phases without it.
    /// `--quick` does this too, at its tiny sizes.
    #[arg(long)]
    pub auth: bool,
}

pub fn run(args: BenchArgs) -> Result<(), String> {
    if args.auth && !matches!(args.scenario.as_str(), "entities" | "query") {
        return Err(format!(
            "--auth applies to the entities and query scenarios, not to '{}'",
            args.scenario
        ));
    }
    let opts = common::Options {
        out: args
            .out
            .unwrap_or_else(|| PathBuf::from(format!("bench-results/{}.json", args.scenario))),
        quick: args.quick,
        pg: args.pg,
        auth: args.auth,
    };
    match args.scenario.as_str() {
        "entities" => entities::run(&opts),
        "query" => query::run(&opts),
        "geo" => geo::run(&opts),
        "notify" => notify::run(&opts),
        "temporal" => temporal::run(&opts),
        "dashboard" => dashboard::run(&opts),
        "mqtt" => mqtt::run(&opts),
        "federation" => federation::run(&opts),
        "cluster" => cluster::run(&opts),
        other => Err(format!(
            "unknown scenario '{other}'; available: entities, query, geo, notify, temporal, dashboard, mqtt, federation, cluster"
        )),
    }
}

/// An error and its sources on one line (`tokio-postgres` and `hyper` keep
/// the cause out of `Display`).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}
