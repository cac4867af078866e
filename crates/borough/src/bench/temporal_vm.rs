//! Baseline of the `temporal` scenario, "victoria-metrics": Debian's
//! VictoriaMetrics started by the bench on a free loopback port with a
//! temporary `-storageDataPath`, loaded with the same readings through its
//! InfluxDB line-protocol endpoint (`POST /write`), one stream per
//! connection as for Borough. Measured: the ingest rate up to the moment
//! every point is queryable, and the bytes per point on disk once its
//! background merges have settled. Dropping a [`Victoria`] kills the child
//! and removes its directory.

use super::temporal_data::{Format, Readings};
use super::temporal_http::{self, ChannelBody, GetConn, Upload};
use hyper::StatusCode;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Environment variable naming the VictoriaMetrics binary.
pub const BINARY_ENV: &str = "BOROUGH_BENCH_VICTORIA_METRICS";
const DEFAULT_BINARY: &str = "/usr/bin/victoria-metrics";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for every point to become queryable after the writes.
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest wait for the merges to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(100);
/// The metric that `temperature,entity=… value=…` becomes.
const METRIC: &str = "temperature_value";

pub struct Victoria {
    child: Child,
    addr: SocketAddr,
    version: String,
    // Declared last: removed after `Drop::drop` has killed the child.
    data: tempfile::TempDir,
}

/// What [`Victoria::ingest`] measured.
pub struct Ingested {
    /// From the first byte to the last `204` of the writes.
    pub acked: Duration,
    /// From the first byte to the sending of the count query that first saw
    /// every point (after `/internal/force_flush`).
    pub queryable: Duration,
    /// Count queries sent until every point was seen.
    pub polls: usize,
}

/// What [`Victoria::settle`] measured.
pub struct OnDisk {
    /// Sum of the file sizes under `-storageDataPath`.
    pub bytes: u64,
    /// Right after the flush, before any merge.
    pub bytes_after_flush: u64,
    /// From the force-merge request to a stable size.
    pub settle: Duration,
}

impl Victoria {
    /// The binary: `$BOROUGH_BENCH_VICTORIA_METRICS`, else Debian's.
    fn binary() -> Result<PathBuf, String> {
        let path = std::env::var_os(BINARY_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY));
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "VictoriaMetrics is not installed at {} (run scripts/setup-victoria-metrics.sh as root, or set {BINARY_ENV})",
                path.display()
            ))
        }
    }

    /// Starts VictoriaMetrics on a free loopback port with an empty data
    /// directory (retention long enough for data of 2025) and waits for
    /// `/health`.
    pub async fn start() -> Result<Victoria, String> {
        let binary = Victoria::binary()?;
        let version = Command::new(&binary)
            .arg("-version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let data = tempfile::Builder::new()
            .prefix("borough-bench-vm-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(&binary)
            .arg(format!("-storageDataPath={}", data.path().display()))
            .arg(format!("-httpListenAddr={addr}"))
            .args([
                "-retentionPeriod=100y",
                "-loggerLevel=ERROR",
                "-search.maxQueryDuration=600s",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut vm = Victoria {
            child,
            addr,
            version,
            data,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = vm.child.try_wait() {
                return Err(format!("VictoriaMetrics exited at start ({status})"));
            }
            if let Ok(mut conn) = GetConn::open(addr).await
                && let Ok(answer) = conn.get("/health", &[]).await
                && answer.status == StatusCode::OK
            {
                return Ok(vm);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "VictoriaMetrics did not answer /health on {addr} within {} s",
                    READY_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// `VmRSS` of the child, in kB.
    pub fn rss_kb(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Writes every reading over `streams` connections, forces a flush, and
    /// polls a count until every point is visible.
    pub async fn ingest(&mut self, readings: Readings, streams: usize) -> Result<Ingested, String> {
        let mut senders = Vec::with_capacity(streams);
        for _ in 0..streams {
            senders.push(temporal_http::open::<ChannelBody>(self.addr).await?);
        }
        let start = Instant::now();
        let mut set = JoinSet::new();
        for (k, sender) in senders.into_iter().enumerate() {
            let upload = Upload {
                addr: self.addr,
                uri: hyper::Uri::from_static("/write"),
                headers: vec![temporal_http::content_type("text/plain")],
                readings,
                sensors: readings.stream_sensors(k, streams),
                format: Format::InfluxLine,
            };
            set.spawn(upload.send(sender));
        }
        while let Some(joined) = set.join_next().await {
            let (status, body) = joined.map_err(|e| format!("a write worker crashed: {e}"))??;
            if status != StatusCode::NO_CONTENT && status != StatusCode::OK {
                return Err(format!(
                    "VictoriaMetrics /write answered {status}: {}",
                    super::load::quote(&body)
                ));
            }
        }
        let acked = start.elapsed();
        self.check_alive()?;

        let mut conn = GetConn::open(self.addr).await?;
        conn.get("/internal/force_flush", &[])
            .await?
            .expect("VictoriaMetrics force_flush", &[StatusCode::OK])?;
        let expected = readings.points() as f64;
        let days = readings.per_sensor.div_ceil(96) + 2;
        let at = readings.end_ms() / 1000 + 1;
        let query = format!(
            "/api/v1/query?query=sum(count_over_time({METRIC}%5B{days}d%5D))&time={at}&nocache=1"
        );
        let deadline = Instant::now() + VISIBLE_TIMEOUT;
        let mut polls = 0;
        loop {
            let sent = start.elapsed();
            polls += 1;
            let answer = conn.get(&query, &[]).await?;
            answer.expect("VictoriaMetrics count query", &[StatusCode::OK])?;
            let seen = count_of(&answer.json("VictoriaMetrics count query")?);
            if seen == Some(expected) {
                return Ok(Ingested {
                    acked,
                    queryable: sent,
                    polls,
                });
            }
            if seen.is_some_and(|n| n > expected) {
                return Err(format!(
                    "VictoriaMetrics counts {} points, more than the {expected} written",
                    seen.unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "VictoriaMetrics shows {seen:?} of {expected} points {} s after the writes",
                    VISIBLE_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Asks for a merge of every partition (`/internal/force_merge`, which
    /// returns at once and merges in the background) and waits until the
    /// data directory's size has not changed for three seconds and no merge
    /// is active: the size that VictoriaMetrics keeps at rest.
    pub async fn settle(&mut self) -> Result<OnDisk, String> {
        let mut conn = GetConn::open(self.addr).await?;
        let bytes_after_flush = dir_bytes(self.data.path());
        let start = Instant::now();
        conn.get("/internal/force_merge", &[])
            .await?
            .expect("VictoriaMetrics force_merge", &[StatusCode::OK])?;
        let mut last = bytes_after_flush;
        let mut stable_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.check_alive()?;
            let now = dir_bytes(self.data.path());
            let merging = active_merges(&mut conn).await?;
            if now != last || merging > 0.0 {
                last = now;
                stable_since = Instant::now();
            } else if stable_since.elapsed() >= Duration::from_secs(3) {
                return Ok(OnDisk {
                    bytes: now,
                    bytes_after_flush,
                    settle: start.elapsed(),
                });
            }
            if start.elapsed() > SETTLE_TIMEOUT {
                return Err(format!(
                    "VictoriaMetrics' data size did not settle within {} s",
                    SETTLE_TIMEOUT.as_secs()
                ));
            }
        }
    }

    fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("VictoriaMetrics exited unexpectedly ({status})")),
            Err(e) => Err(format!("cannot check the VictoriaMetrics process: {e}")),
        }
    }
}

impl Drop for Victoria {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number of an instant-query answer with one sample.
fn count_of(answer: &serde_json::Value) -> Option<f64> {
    let result = answer.pointer("/data/result")?.as_array()?;
    match result.first() {
        None => Some(0.0),
        Some(sample) => sample.pointer("/value/1")?.as_str()?.parse().ok(),
    }
}

/// Merges in progress, from `/metrics` (`vm_active_merges` and
/// `vm_active_force_merges`, summed over their labels).
async fn active_merges(conn: &mut GetConn) -> Result<f64, String> {
    let answer = conn.get("/metrics", &[]).await?;
    answer.expect("VictoriaMetrics /metrics", &[StatusCode::OK])?;
    let text = String::from_utf8_lossy(&answer.body);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("vm_active_merges") || l.starts_with("vm_active_force_merges"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Sum of the sizes of the files under `dir` (apparent sizes, as `du -b`).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&entry.path()),
            Ok(t) if t.is_file() => entry.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}
