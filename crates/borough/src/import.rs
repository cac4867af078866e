//! `borough import`: streams a CSV file of historic points to a running
//! server's bulk history endpoint (`POST /api/v1/history/import`), in parts
//! of whole lines, so that no request is made per point.

use clap::Args;
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

/// Bytes sent per request; each part ends at a line end.
const PART_BYTES: usize = 64 << 20;

#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// CSV file: entityId,entityType,attribute,observedAt,value per line.
    pub file: PathBuf,
    /// Base URL of the Borough server.
    #[arg(long, default_value = "http://127.0.0.1:1026")]
    pub target: String,
    /// Tenant to import into (the default tenant when not given).
    #[arg(long)]
    pub tenant: Option<String>,
    /// API key (or token) to send; the server's access control needs one
    /// that may write the tenant.
    #[arg(long, env = "BOROUGH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

pub fn run(args: ImportArgs) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(import(args))
}

async fn import(args: ImportArgs) -> Result<(), String> {
    let mut file = std::fs::File::open(&args.file)
        .map_err(|e| format!("cannot open {}: {e}", args.file.display()))?;
    let url = format!(
        "{}/api/v1/history/import",
        args.target.trim_end_matches('/')
    );
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut points = 0u64;
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let mut part = std::mem::take(&mut carry);
        let before = part.len();
        part.resize(before + PART_BYTES, 0);
        let n = read_full(&mut file, &mut part[before..])
            .map_err(|e| format!("cannot read {}: {e}", args.file.display()))?;
        part.truncate(before + n);
        let done = n == 0;
        if !done {
            // Keep the unfinished last line for the next part.
            let end = part.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            carry = part.split_off(end);
        }
        if part.is_empty() {
            if done {
                break;
            }
            continue;
        }
        let mut req = client
            .post(&url)
            .header("content-type", "text/csv")
            .body(part);
        if let Some(t) = &args.tenant {
            req = req.header("NGSILD-Tenant", t);
        }
        if let Some(k) = &args.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", args.target))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let detail = body
                .get("detail")
                .and_then(Value::as_str)
                .unwrap_or("no detail");
            return Err(format!(
                "import refused ({status}) after {points} points: {detail}"
            ));
        }
        points += body.get("points").and_then(Value::as_u64).unwrap_or(0);
        if done {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "imported {points} points in {secs:.1} s ({:.0} points/s)",
        points as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
