//! HTTP load generator: keep-alive HTTP/1.1 connections (one per worker),
//! a batch uploader, time-bounded workers (a request mix, or a scenario's
//! own), failure counts and latency statistics.

use super::chain;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Longest wait for one batch or one verification request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Most of a response body quoted in an error message.
const QUOTE_BYTES: usize = 300;

/// Where requests go, and the headers every request carries besides its
/// own (the tenant, the credential of `bench --auth`).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub headers: HeaderMap,
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            headers: HeaderMap::new(),
        }
    }
}

/// One keep-alive HTTP/1.1 connection to the server.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: HeaderValue,
    /// Kept for [`Conn::reopen_before`].
    endpoint: Endpoint,
}

impl Conn {
    pub async fn open(to: impl Into<Endpoint>) -> Result<Conn, String> {
        let endpoint = to.into();
        let addr = endpoint.addr;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {addr} failed: {}", chain(&e)))?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the server closes the socket;
            // request errors surface on the sender side.
            let _ = connection.await;
        });
        let host = HeaderValue::from_str(&addr.to_string())
            .map_err(|e| format!("invalid Host header '{addr}': {e}"))?;
        Ok(Conn {
            sender,
            host,
            endpoint,
        })
    }

    /// Sends one request and reads the whole response body. The body is kept
    /// when `keep_body` is set or the status is not 2xx (for error messages),
    /// otherwise it is read and discarded frame by frame.
    pub async fn request(
        &mut self,
        method: Method,
        uri: Uri,
        body: Option<Bytes>,
        keep_body: bool,
    ) -> Result<(StatusCode, Bytes), String> {
        let has_body = body.is_some();
        let mut req = Request::new(Full::new(body.unwrap_or_default()));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        req.headers_mut().insert(HOST, self.host.clone());
        for (name, value) in &self.endpoint.headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        if has_body {
            req.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection lost: {}", chain(&e)))?;
        let response = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {}", chain(&e)))?;
        let status = response.status();
        let mut incoming = response.into_body();
        if keep_body || !status.is_success() {
            let bytes = incoming
                .collect()
                .await
                .map_err(|e| format!("cannot read the response body: {}", chain(&e)))?
                .to_bytes();
            return Ok((status, bytes));
        }
        while let Some(frame) = incoming.frame().await {
            frame.map_err(|e| format!("cannot read the response body: {}", chain(&e)))?;
        }
        Ok((status, Bytes::new()))
    }

    /// [`Conn::request`] with [`REQUEST_TIMEOUT`].
    pub async fn request_with_timeout(
        &mut self,
        method: Method,
        uri: Uri,
        body: Option<Bytes>,
        keep_body: bool,
    ) -> Result<(StatusCode, Bytes), String> {
        let what = format!("{method} {uri}");
        tokio::time::timeout(REQUEST_TIMEOUT, self.request(method, uri, body, keep_body))
            .await
            .map_err(|_| format!("{what}: no response within {} s", REQUEST_TIMEOUT.as_secs()))?
            .map_err(|e| format!("{what}: {e}"))
    }

    /// [`Conn::request`], body discarded, unless `deadline` cuts it off
    /// (`None`); with its latency in microseconds.
    pub async fn request_before(
        &mut self,
        deadline: Instant,
        method: Method,
        uri: Uri,
        body: Option<Bytes>,
    ) -> Option<(Result<(StatusCode, Bytes), String>, u64)> {
        let t = Instant::now();
        let result = tokio::time::timeout_at(deadline, self.request(method, uri, body, false))
            .await
            .ok()?;
        Some((result, micros(t.elapsed())))
    }

    /// Replaces a connection that a failed request left unusable, unless
    /// `deadline` passes first (`Ok(false)`).
    pub async fn reopen_before(&mut self, deadline: Instant) -> Result<bool, String> {
        match tokio::time::timeout_at(deadline, Conn::open(self.endpoint.clone())).await {
            Ok(Ok(conn)) => {
                *self = conn;
                Ok(true)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(false),
        }
    }
}

/// `n` connections to `to`, opened before any clock starts.
pub async fn open_conns(to: impl Into<Endpoint>, n: usize) -> Result<Vec<Conn>, String> {
    let to = to.into();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(Conn::open(to.clone()).await?);
    }
    Ok(conns)
}

/// Upsert bodies: the documents as JSON arrays of `batch` documents each.
pub fn json_arrays(docs: &[String], batch: usize) -> Vec<Bytes> {
    docs.chunks(batch.max(1))
        .map(|chunk| {
            let len = chunk.iter().map(|d| d.len() + 1).sum::<usize>() + 1;
            let mut body = Vec::with_capacity(len);
            body.push(b'[');
            for (k, doc) in chunk.iter().enumerate() {
                if k > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(doc.as_bytes());
            }
            body.push(b']');
            Bytes::from(body)
        })
        .collect()
}

/// Percent-encodes every byte but ASCII alphanumerics and `-._~`, for a
/// query-string value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response body as a short single line, for error messages.
pub fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(QUOTE_BYTES)]);
    let mut line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if body.len() > QUOTE_BYTES {
        line.push_str(" ...");
    }
    line
}

/// Latency percentiles of one set of requests, nearest-rank on the sorted
/// sample.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub count: usize,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Summary {
    /// Sorts `latencies_us` in place and reads the percentiles.
    pub fn of(latencies_us: &mut [u64]) -> Summary {
        latencies_us.sort_unstable();
        let n = latencies_us.len();
        if n == 0 {
            return Summary::default();
        }
        let at = |p: f64| {
            let rank = (p * n as f64).ceil() as usize;
            latencies_us[rank.clamp(1, n) - 1]
        };
        let sum: u64 = latencies_us.iter().sum();
        Summary {
            count: n,
            mean_us: sum as f64 / n as f64,
            p50_us: at(0.50),
            p95_us: at(0.95),
            p99_us: at(0.99),
            max_us: latencies_us[n - 1],
        }
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "mean_ms": ms(self.mean_us),
            "p50_ms": ms(self.p50_us as f64),
            "p95_ms": ms(self.p95_us as f64),
            "p99_ms": ms(self.p99_us as f64),
            "max_ms": ms(self.max_us as f64),
        })
    }
}

/// Microseconds to milliseconds, rounded to the microsecond.
pub fn ms(us: f64) -> f64 {
    us.round() / 1000.0
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Failed requests (error answers, transport errors): how many, and the
/// first one's message.
#[derive(Clone, Debug, Default)]
pub struct Failures {
    pub count: u64,
    pub first: Option<String>,
}

impl Failures {
    /// Counts one failure; the message is only built for the first.
    pub fn record(&mut self, message: impl FnOnce() -> String) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(message());
        }
    }

    /// Adds another worker's failures (the first one seen stays first).
    pub fn merge(&mut self, other: Failures) {
        self.count += other.count;
        if self.first.is_none() {
            self.first = other.first;
        }
    }
}

/// What [`post_all`] measured.
#[derive(Default)]
pub struct BatchRun {
    pub elapsed: Duration,
    /// Latency of each batch, in microseconds.
    pub latencies_us: Vec<u64>,
}

impl BatchRun {
    /// Runs of parts of one upload as one: their times added up.
    pub fn merge(runs: Vec<BatchRun>) -> BatchRun {
        runs.into_iter()
            .fold(BatchRun::default(), |mut all, mut run| {
                all.elapsed += run.elapsed;
                all.latencies_us.append(&mut run.latencies_us);
                all
            })
    }
}

/// POSTs every body to `uri`, `workers` requests at a time (each worker on its
/// own connection, taking the next body in order). Any status outside
/// `accepted` is a hard error.
pub async fn post_all(
    to: impl Into<Endpoint>,
    uri: Uri,
    bodies: Arc<Vec<Bytes>>,
    workers: usize,
    accepted: &'static [StatusCode],
) -> Result<BatchRun, String> {
    let conns = open_conns(to, workers).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for mut conn in conns {
        let (uri, bodies, next) = (uri.clone(), bodies.clone(), next.clone());
        set.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let t = Instant::now();
                let (status, reply) = conn
                    .request_with_timeout(Method::POST, uri.clone(), Some(body.clone()), false)
                    .await
                    .map_err(|e| format!("batch {i}: {e}"))?;
                latencies.push(micros(t.elapsed()));
                if !accepted.contains(&status) {
                    return Err(format!(
                        "batch {i}: POST {uri} answered {status}: {}",
                        quote(&reply)
                    ));
                }
            }
            Ok(latencies)
        });
    }
    let mut latencies_us = Vec::with_capacity(bodies.len());
    while let Some(joined) = set.join_next().await {
        let mut worker = joined.map_err(|e| format!("an upload worker crashed: {e}"))??;
        latencies_us.append(&mut worker);
    }
    Ok(BatchRun {
        elapsed: start.elapsed(),
        latencies_us,
    })
}

/// The requests of a timed run.
pub enum Mix {
    /// `GET` of one fixed path.
    Static(Uri),
    /// `GET` of one of these URIs, picked at random (never empty).
    Gets(Vec<Uri>),
    /// `GET` of a random entity or, `patch_percent` % of the time, `PATCH`
    /// of a random entity's attributes with one of `bodies`.
    Entities {
        get: Vec<Uri>,
        patch: Vec<Uri>,
        bodies: Vec<Bytes>,
        patch_percent: u32,
    },
}

#[derive(Clone, Copy)]
enum Op {
    Get,
    Patch,
}

impl Op {
    fn method(self) -> Method {
        match self {
            Op::Get => Method::GET,
            Op::Patch => Method::PATCH,
        }
    }
}

/// One request of a [`Mix`]: its kind, the entity (index) and the body (index).
#[derive(Clone, Copy)]
struct Pick {
    op: Op,
    target: usize,
    body: Option<usize>,
}

impl Mix {
    fn pick(&self, rng: &mut SmallRng) -> Pick {
        match self {
            Mix::Static(_) => Pick {
                op: Op::Get,
                target: 0,
                body: None,
            },
            Mix::Gets(uris) => Pick {
                op: Op::Get,
                target: rng.random_range(0..uris.len().max(1)),
                body: None,
            },
            Mix::Entities {
                get,
                bodies,
                patch_percent,
                ..
            } => {
                let target = rng.random_range(0..get.len());
                if rng.random_range(0..100) < *patch_percent {
                    let body = rng.random_range(0..bodies.len());
                    Pick {
                        op: Op::Patch,
                        target,
                        body: Some(body),
                    }
                } else {
                    Pick {
                        op: Op::Get,
                        target,
                        body: None,
                    }
                }
            }
        }
    }

    fn uri(&self, pick: Pick) -> &Uri {
        match (self, pick.op) {
            (Mix::Static(uri), _) => uri,
            // `pick` drew the index below the length; `run_timed` refuses an empty list.
            (Mix::Gets(uris), _) => &uris[pick.target],
            (Mix::Entities { get, .. }, Op::Get) => &get[pick.target],
            (Mix::Entities { patch, .. }, Op::Patch) => &patch[pick.target],
        }
    }

    fn body(&self, pick: Pick) -> Option<Bytes> {
        match (self, pick.body) {
            (Mix::Entities { bodies, .. }, Some(b)) => bodies.get(b).cloned(),
            _ => None,
        }
    }

    fn describe(&self, pick: Pick) -> String {
        format!("{} {}", pick.op.method(), self.uri(pick))
    }
}

/// What [`run_timed`] measured. Requests cut off by the time limit are not
/// counted.
#[derive(Default)]
pub struct TimedRun {
    pub elapsed: Duration,
    /// Latencies of completed GETs, in microseconds.
    pub get_us: Vec<u64>,
    /// Latencies of completed PATCHes, in microseconds.
    pub patch_us: Vec<u64>,
    /// Non-2xx answers and failed requests.
    pub failures: Failures,
}

impl TimedRun {
    /// Runs of slices of one phase as one: their times added up.
    pub fn merge(runs: Vec<TimedRun>) -> TimedRun {
        runs.into_iter()
            .fold(TimedRun::default(), |mut all, mut run| {
                all.elapsed += run.elapsed;
                all.get_us.append(&mut run.get_us);
                all.patch_us.append(&mut run.patch_us);
                all.failures.merge(run.failures);
                all
            })
    }
}

/// Runs `mix` for `duration` with `concurrency` workers, each on its own
/// keep-alive connection. Every request is bounded by the deadline, and each
/// worker stops by itself when it passes.
pub async fn run_timed(
    to: impl Into<Endpoint>,
    mix: Arc<Mix>,
    concurrency: usize,
    duration: Duration,
    seed: u64,
) -> Result<TimedRun, String> {
    if matches!(mix.as_ref(), Mix::Gets(uris) if uris.is_empty()) {
        return Err("the request mix has no URI".to_string());
    }
    let conns = open_conns(to, concurrency).await?;
    let (runs, elapsed) = run_workers(conns, duration, seed, |conn, deadline, rng| {
        timed_worker(conn, mix.clone(), deadline, rng)
    })
    .await?;
    let mut total = TimedRun {
        elapsed,
        ..TimedRun::default()
    };
    for mut run in runs {
        total.get_us.append(&mut run.get_us);
        total.patch_us.append(&mut run.patch_us);
        total.failures.merge(run.failures);
    }
    Ok(total)
}

/// Runs one `worker` per connection (each with its deadline and an RNG
/// seeded from `seed` and its number) and returns what they recorded, with
/// the time they took. Open the connections first (HTTP or PostgreSQL), so
/// the clock measures requests only.
pub async fn run_workers<C, R, F>(
    conns: Vec<C>,
    duration: Duration,
    seed: u64,
    worker: impl Fn(C, Instant, SmallRng) -> F,
) -> Result<(Vec<R>, Duration), String>
where
    F: Future<Output = Result<R, String>> + Send + 'static,
    R: Send + 'static,
{
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for (n, conn) in conns.into_iter().enumerate() {
        let rng = SmallRng::seed_from_u64(seed.wrapping_add(n as u64));
        set.spawn(worker(conn, deadline, rng));
    }
    let mut runs = Vec::with_capacity(set.len());
    while let Some(joined) = set.join_next().await {
        runs.push(joined.map_err(|e| format!("a load worker crashed: {e}"))??);
    }
    Ok((runs, start.elapsed()))
}

async fn timed_worker(
    mut conn: Conn,
    mix: Arc<Mix>,
    deadline: Instant,
    mut rng: SmallRng,
) -> Result<TimedRun, String> {
    let mut run = TimedRun::default();
    while Instant::now() < deadline {
        let pick = mix.pick(&mut rng);
        let request = conn.request_before(
            deadline,
            pick.op.method(),
            mix.uri(pick).clone(),
            mix.body(pick),
        );
        let Some((result, us)) = request.await else {
            break; // cut off by the time limit
        };
        match result {
            Ok((status, reply)) => {
                match pick.op {
                    Op::Get => run.get_us.push(us),
                    Op::Patch => run.patch_us.push(us),
                }
                if !status.is_success() {
                    run.failures.record(|| {
                        format!(
                            "{} answered {status}: {}",
                            mix.describe(pick),
                            quote(&reply)
                        )
                    });
                }
            }
            Err(e) => {
                run.failures
                    .record(|| format!("{}: {e}", mix.describe(pick)));
                if !conn.reopen_before(deadline).await? {
                    break;
                }
            }
        }
    }
    Ok(run)
}
