//! Borough's own HTTP/1.1 accept loop: connection caps, a header read
//! timeout that doubles as the idle timeout, graceful shutdown, and a
//! request-line sanitizer in front of hyper.

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// Limits of the accept loop.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Most open connections; more are answered 503 and closed.
    pub max_connections: usize,
    /// Most open connections from one client address.
    pub max_connections_per_ip: usize,
    /// Longest wait for a complete request head, which is also how long an
    /// idle keep-alive connection is kept.
    pub header_read_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 8192,
            max_connections_per_ip: 512,
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// How long open connections get to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Pause after an accept error such as EMFILE, which would otherwise repeat at once.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(200);
/// Most connections being turned away at once; beyond that they are just closed.
const MAX_REJECTING: usize = 256;
/// Time to write the 503 to a turned-away connection.
const REJECT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time to drain a turned-away connection's request after the 503, and the most bytes drained.
const REJECT_LINGER: Duration = Duration::from_millis(500);
const REJECT_LINGER_BYTES: usize = 64 << 10;
/// Least time between two warnings about the connection caps.
const CAP_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Serves `app` over HTTP/1.1 on `listener` until `shutdown` resolves, then
/// stops accepting, lets open connections finish their request in flight
/// (for at most 10 s) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut builder = http1::Builder::new();
    // hyper starts the header read timer in `Conn::poll_read_head` whenever
    // it waits for a request head (hyper-1.12.0/src/proto/h1/conn.rs), and
    // `State::idle` sets `notify_read` when this timeout is configured, so
    // the dispatcher (dispatch.rs `poll_loop`/`poll_read`) goes straight
    // back to `poll_read_head` after each response. The timer is therefore
    // running both while a slow client trickles its head (slowloris) and
    // while a keep-alive connection sits idle: one setting bounds both.
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.header_read_timeout);
    let counts = Arc::new(Mutex::new(Counts::default()));
    let rejecting = Arc::new(tokio::sync::Semaphore::new(MAX_REJECTING));
    let graceful = GracefulShutdown::new();
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_cap_warning: Option<Instant> = None;
    loop {
        // Reap finished connection tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // The peer gave up before we accepted: nothing to do.
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(error = %e, "a connection was lost before it was accepted");
                continue;
            }
            // EMFILE and the like: retrying at once would spin.
            Err(e) => {
                tracing::error!(error = %e, "cannot accept connections; retrying shortly");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        // Answers are written whole; Nagle's delay would only hold back the last segment.
        let _ = stream.set_nodelay(true);
        match Slot::take(&counts, peer.ip().to_canonical(), &limits) {
            Ok(slot) => {
                let (app, builder, watcher) = (app.clone(), builder.clone(), graceful.watcher());
                tasks.spawn(async move {
                    serve_connection(stream, peer, app, &builder, watcher).await;
                    drop(slot);
                });
            }
            Err(cap) => {
                if last_cap_warning.is_none_or(|t| t.elapsed() >= CAP_WARNING_EVERY) {
                    last_cap_warning = Some(Instant::now());
                    tracing::warn!(%peer, "turning connections away: {}", cap.detail());
                }
                // Past this many, saying 503 would itself hold too many sockets.
                if let Ok(permit) = rejecting.clone().try_acquire_owned() {
                    tasks.spawn(async move {
                        reject(stream, &cap).await;
                        drop(permit);
                    });
                }
            }
        }
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(open, "waiting for open connections to finish");
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
    }
    tasks.shutdown().await;
    Ok(())
}

/// Errors of one incoming connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection until the client closes it, it times out, or
/// shutdown lets its request in flight finish.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    builder: &http1::Builder,
    watcher: Watcher,
) {
    // Handlers read the peer with `ConnectInfo`, as with axum's own serve.
    let service = app.map_request(move |request: hyper::Request<Incoming>| {
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    });
    let io = TokioIo::new(RequestTargetSanitizer::new(stream));
    let connection = builder.serve_connection(io, TowerToHyperService::new(service));
    if let Err(e) = watcher.watch(connection).await {
        // Timeouts, resets and malformed requests: the client's business.
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Open connections, in total and per client address.
#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

fn lock(counts: &Mutex<Counts>) -> MutexGuard<'_, Counts> {
    // The counts stay consistent even if a holder panicked: each update is one step.
    counts.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's place under the caps, given back when dropped.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

/// The cap a connection ran into.
#[derive(Debug)]
enum Cap {
    Total(usize),
    PerIp(usize),
}

impl Cap {
    fn detail(&self) -> String {
        match self {
            Cap::Total(n) => format!("the server has reached its limit of {n} open connections"),
            Cap::PerIp(n) => format!(
                "this client address has reached its limit of {n} open connections; \
                 reuse connections or close idle ones"
            ),
        }
    }

    /// A complete HTTP/1.1 503 with a problem+json body.
    fn response(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "type": "urn:borough:problem:TooManyConnections",
            "title": "Too many connections",
            "status": 503,
            "detail": self.detail(),
        })
        .to_string();
        format!(
            "HTTP/1.1 503 Service Unavailable\r\n\
             Content-Type: application/problem+json\r\n\
             Content-Length: {}\r\n\
             Retry-After: 1\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

impl Slot {
    fn take(counts: &Arc<Mutex<Counts>>, ip: IpAddr, limits: &ServerLimits) -> Result<Slot, Cap> {
        let mut c = lock(counts);
        if c.total >= limits.max_connections {
            return Err(Cap::Total(limits.max_connections));
        }
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= limits.max_connections_per_ip {
            return Err(Cap::PerIp(limits.max_connections_per_ip));
        }
        c.total += 1;
        c.per_ip.insert(ip, from_ip + 1);
        Ok(Slot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total = c.total.saturating_sub(1);
        if let Entry::Occupied(mut e) = c.per_ip.entry(self.ip) {
            if *e.get() <= 1 {
                e.remove();
            } else {
                *e.get_mut() -= 1;
            }
        }
    }
}

/// Answers 503 without reading the request, then closes.
async fn reject(mut stream: TcpStream, cap: &Cap) {
    let response = cap.response();
    let written = tokio::time::timeout(REJECT_WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    // Closing a socket with unread bytes makes the kernel send RST, which
    // can discard the 503 before the client reads it: drain briefly first.
    let _ = tokio::time::timeout(REJECT_LINGER, async {
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < REJECT_LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Longest request line rewritten; a longer one passes as is (hyper answers 414).
const MAX_REQUEST_LINE: usize = 16 << 10;
/// Longest header, trailer or chunk-size line followed; a longer one ends the rewriting.
const MAX_LINE: usize = 8 << 10;
/// Capacity of the output buffer kept between reads.
const KEEP_PENDING_CAPACITY: usize = 64 << 10;

/// The read side of a connection with the request targets percent-encoded.
///
/// Clients send raw `"`, `<`, `>`, spaces and the like in request targets
/// (`GET /ngsi-ld/v1/entities?q=name=="x" HTTP/1.1`). `http::Uri` rejects
/// several of them (`"`, `<`, `>` and space in the query; `<`, `>`, backtick
/// and space in the path; bytes that are not UTF-8), and hyper then answers
/// an empty 400 and closes. Encoding them lets the request reach the API,
/// which serves it or explains the problem. The adapter follows HTTP/1.1
/// framing, so bodies pass untouched, and falls back to passing everything
/// through unchanged at the first thing it does not follow exactly: hyper
/// then sees the client's own bytes.
pub struct RequestTargetSanitizer<S> {
    inner: S,
    framing: Framing,
    /// Rewritten bytes not yet read; bounded by the reader's buffer size
    /// times three (one byte becomes `%XX`) plus one line.
    pending: Vec<u8>,
    pending_pos: usize,
    eof: bool,
}

impl<S> RequestTargetSanitizer<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            framing: Framing::default(),
            pending: Vec::new(),
            pending_pos: 0,
            eof: false,
        }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Moves pending output into `buf`.
    fn drain_pending(&mut self, buf: &mut ReadBuf<'_>) {
        let available = &self.pending[self.pending_pos..];
        if available.is_empty() {
            return;
        }
        let n = available.len().min(buf.remaining());
        buf.put_slice(&available[..n]);
        self.pending_pos += n;
        if self.pending_pos == self.pending.len() {
            self.pending_pos = 0;
            if self.pending.capacity() > KEEP_PENDING_CAPACITY {
                self.pending = Vec::new();
            } else {
                self.pending.clear();
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RequestTargetSanitizer<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let initial = buf.filled().len();
        loop {
            this.drain_pending(buf);
            if buf.filled().len() > initial || buf.remaining() == 0 || this.eof {
                return Poll::Ready(Ok(()));
            }
            // Read straight into the caller's buffer: bodies and passthrough
            // stay there untouched; whatever follows is rewritten into `pending`.
            let start = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let end = buf.filled().len();
            if end == start {
                this.eof = true;
                this.framing.finish(&mut this.pending);
                continue;
            }
            let kept = this.framing.pass(end - start);
            if kept < end - start {
                this.framing
                    .feed(&buf.filled()[start + kept..], &mut this.pending);
                buf.set_filled(start + kept);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RequestTargetSanitizer<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Where the client's byte stream is, in HTTP/1.1 request framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A request line, or empty lines before it.
    RequestLine,
    Headers,
    /// Bytes left of a Content-Length body.
    Body(u64),
    ChunkSize,
    /// Bytes left of a chunk's data.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    /// Everything passes unchanged to the end of the connection.
    Passthrough,
}

/// The request-framing state machine behind [`RequestTargetSanitizer`].
#[derive(Debug)]
struct Framing {
    state: State,
    /// The line being collected in the line states.
    line: Vec<u8>,
    content_length: Option<u64>,
    chunked: bool,
}

impl Default for Framing {
    fn default() -> Self {
        Self {
            state: State::RequestLine,
            line: Vec::new(),
            content_length: None,
            chunked: false,
        }
    }
}

impl Framing {
    /// How many of the next `available` bytes pass unchanged right away
    /// (body or passthrough bytes); the state advances past them.
    fn pass(&mut self, available: usize) -> usize {
        match self.state {
            State::Passthrough => available,
            State::Body(left) | State::ChunkData(left) => {
                let n = usize::try_from(left).map_or(available, |l| l.min(available));
                let left = left - n as u64;
                self.state = match (self.state, left) {
                    (State::Body(_), 0) => State::RequestLine,
                    (State::Body(_), _) => State::Body(left),
                    (_, 0) => State::ChunkEnd,
                    _ => State::ChunkData(left),
                };
                n
            }
            _ => 0,
        }
    }

    /// Consumes all of `input`, appending what it can already emit to `out`
    /// and holding back a partial line.
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            let n = self.pass(input.len());
            if n > 0 {
                out.extend_from_slice(&input[..n]);
                input = &input[n..];
                continue;
            }
            let limit = if self.state == State::RequestLine {
                MAX_REQUEST_LINE
            } else {
                MAX_LINE
            };
            let (part, complete) = match input.iter().position(|&b| b == b'\n') {
                Some(i) => (&input[..=i], true),
                None => (input, false),
            };
            if self.line.len() + part.len() > limit {
                self.passthrough(out);
                continue;
            }
            self.line.extend_from_slice(part);
            input = &input[part.len()..];
            if complete {
                self.end_line(out);
            }
        }
    }

    /// At the end of the input: emits a held-back partial line as it is.
    fn finish(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.line);
        self.line.clear();
    }

    /// Gives up following the framing: emits the held-back bytes unchanged
    /// and passes the rest of the connection through.
    fn passthrough(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.line);
        self.line = Vec::new();
        self.state = State::Passthrough;
    }

    /// Handles the complete line in `self.line`.
    fn end_line(&mut self, out: &mut Vec<u8>) {
        let line = std::mem::take(&mut self.line);
        let text = line_content(&line);
        let next = match self.state {
            State::RequestLine if text.is_empty() => {
                // hyper skips empty lines before a request too.
                out.extend_from_slice(&line);
                Some(State::RequestLine)
            }
            State::RequestLine => {
                if encode_request_line(&line, out) {
                    self.content_length = None;
                    self.chunked = false;
                    Some(State::Headers)
                } else {
                    None
                }
            }
            State::Headers => {
                out.extend_from_slice(&line);
                self.header_line(text)
            }
            State::ChunkSize => {
                out.extend_from_slice(&line);
                match chunk_size(text) {
                    Some(0) => Some(State::Trailers),
                    Some(n) => Some(State::ChunkData(n)),
                    None => None,
                }
            }
            State::ChunkEnd => {
                out.extend_from_slice(&line);
                text.is_empty().then_some(State::ChunkSize)
            }
            State::Trailers => {
                out.extend_from_slice(&line);
                Some(if text.is_empty() {
                    State::RequestLine
                } else {
                    State::Trailers
                })
            }
            State::Body(_) | State::ChunkData(_) | State::Passthrough => None,
        };
        match next {
            Some(state) => {
                self.state = state;
                self.line = line;
                self.line.clear();
            }
            None => {
                // The line itself was already emitted, or is emitted here unchanged.
                if self.state == State::RequestLine {
                    out.extend_from_slice(&line);
                }
                self.state = State::Passthrough;
            }
        }
    }

    /// Records the framing a header line sets; `None` when it is anything
    /// this adapter does not follow exactly.
    fn header_line(&mut self, text: &[u8]) -> Option<State> {
        if text.is_empty() {
            return Some(if self.chunked {
                State::ChunkSize
            } else {
                match self.content_length {
                    Some(n) if n > 0 => State::Body(n),
                    _ => State::RequestLine,
                }
            });
        }
        // Obsolete line folding, whitespace before the colon and the like
        // fall out here: hyper rejects them, and passthrough is safe.
        let colon = text.iter().position(|&b| b == b':')?;
        let name = &text[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return None;
        }
        let value = trim_ows(&text[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            if self.content_length.is_some() || self.chunked {
                return None;
            }
            self.content_length = Some(decimal(value)?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if self.content_length.is_some()
                || self.chunked
                || !value.eq_ignore_ascii_case(b"chunked")
            {
                return None;
            }
            self.chunked = true;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            return None;
        }
        Some(State::Headers)
    }
}

/// A line without its LF or CRLF.
fn line_content(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Writes `line` with its request target percent-encoded; false (writing
/// nothing) when it is not a plain HTTP/1.x request line or a CONNECT.
fn encode_request_line(line: &[u8], out: &mut Vec<u8>) -> bool {
    let text = line_content(line);
    let (Some(first), Some(last)) = (
        text.iter().position(|&b| b == b' '),
        text.iter().rposition(|&b| b == b' '),
    ) else {
        return false;
    };
    let method = &text[..first];
    let version = &text[last + 1..];
    if last <= first
        || method.is_empty()
        || !method.iter().all(|&b| is_tchar(b))
        || method == b"CONNECT"
        || !(version == b"HTTP/1.1" || version == b"HTTP/1.0")
    {
        return false;
    }
    out.extend_from_slice(&text[..=first]);
    encode_target(&text[first + 1..last], out);
    out.extend_from_slice(&line[last..]);
    true
}

/// Bytes percent-encoded in a request target: those RFC 3986 never allows
/// raw (space, controls, `"`, `<`, `>`, `\`, `^`, backtick, `{`, `|`, `}`,
/// non-ASCII) and `#`, which has no place in a request target and would
/// otherwise cut the query short. `%` is left alone: existing escapes stay.
fn needs_encoding(b: u8) -> bool {
    b <= b' '
        || b >= 0x7f
        || matches!(
            b,
            b'"' | b'#' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}'
        )
}

fn encode_target(mut target: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    while let Some(i) = target.iter().position(|&b| needs_encoding(b)) {
        out.extend_from_slice(&target[..i]);
        let b = target[i];
        out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        target = &target[i + 1..];
    }
    out.extend_from_slice(target);
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// A Content-Length value: digits only.
fn decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        let d = char::from(b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// The size of a chunk-size line: hex digits, optional whitespace, optional extensions.
fn chunk_size(text: &[u8]) -> Option<u64> {
    let digits = text.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return None;
    }
    let size = text[..digits].iter().try_fold(0u64, |n, &b| {
        let d = char::from(b).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(d))
    })?;
    match trim_ows(&text[digits..]) {
        [] | [b';', ..] => Some(size),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The adapter's output for `input` fed in one piece.
    fn sanitize(input: &[u8]) -> Vec<u8> {
        let mut framing = Framing::default();
        let mut out = Vec::new();
        framing.feed(input, &mut out);
        framing.finish(&mut out);
        out
    }

    fn s(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// Yields its data in pseudo-random small pieces, sometimes pending first.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        seed: u64,
        max_piece: usize,
    }

    impl Trickle {
        fn next(&mut self) -> u64 {
            // xorshift64: enough randomness for piece sizes.
            self.seed ^= self.seed << 13;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            self.seed
        }
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.next().is_multiple_of(4) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let piece = 1 + (this.next() as usize) % this.max_piece;
            let n = piece.min(buf.remaining()).min(this.data.len() - this.pos);
            buf.put_slice(&this.data[this.pos..this.pos + n]);
            this.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    /// The output through the AsyncRead adapter, with small random reads on
    /// both sides.
    async fn through_adapter(input: &[u8], seed: u64, max_piece: usize) -> Vec<u8> {
        let mut reader = RequestTargetSanitizer::new(Trickle {
            data: input.to_vec(),
            pos: 0,
            seed,
            max_piece,
        });
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        let mut size = 1;
        loop {
            size = (size + 7) % buf.len() + 1;
            let n = reader.read(&mut buf[..size]).await.expect("read");
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    const PIPELINED: &[u8] =
        b"\r\nPOST /a?x=\"1\" HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n\
        {\"q\":\"<b>\"}\
        PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;ext=\"<x>\"\r\n\"<a>\"\r\n4 \r\n GET\r\n0\r\nX-T: \"<\"\r\n\r\n\
        GET /d?q=name==\"x\" HTTP/1.1\r\nHost: h\r\n\r\n";

    const PIPELINED_OUT: &[u8] =
        b"\r\nPOST /a?x=%221%22 HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n\
        {\"q\":\"<b>\"}\
        PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;ext=\"<x>\"\r\n\"<a>\"\r\n4 \r\n GET\r\n0\r\nX-T: \"<\"\r\n\r\n\
        GET /d?q=name==%22x%22 HTTP/1.1\r\nHost: h\r\n\r\n";

    #[test]
    fn encodes_the_request_target() {
        let out = sanitize(
            b"GET /ngsi-ld/v1/entities?q=name==\"a b\"<>\\^`{|}#%22%zz&\xc3\xa9 HTTP/1.1\r\n\r\n",
        );
        assert_eq!(
            s(&out),
            "GET /ngsi-ld/v1/entities?q=name==%22a%20b%22%3C%3E%5C%5E%60%7B%7C%7D%23%22%zz&%C3%A9 HTTP/1.1\r\n\r\n"
        );
        // Valid targets pass as they are, with bare LF line ends too.
        let valid = b"GET /a/b?c=d&e=%20f~!$'()*+,;=:@ HTTP/1.0\n\n";
        assert_eq!(sanitize(valid), valid);
        assert_eq!(
            sanitize(b"OPTIONS * HTTP/1.1\r\n\r\n"),
            b"OPTIONS * HTTP/1.1\r\n\r\n"
        );
    }

    #[test]
    fn every_byte_left_alone_is_accepted_by_http_uri() {
        for b in 0..=255u8 {
            if needs_encoding(b) || b == b'?' {
                continue;
            }
            let target = [b"/p".as_slice(), &[b], b"?q=", &[b]].concat();
            let parsed = axum::http::Uri::try_from(target.as_slice());
            assert!(parsed.is_ok(), "byte {b:#04x} is left alone but rejected");
        }
        // Why the adapter exists: these raw bytes get hyper's empty 400.
        for raw in ["/p?q=\"x\"", "/p?q=<x>", "/p<x>", "/p`x`", "/p?q=\u{0}"] {
            assert!(axum::http::Uri::try_from(raw).is_err(), "{raw} is accepted");
        }
    }

    #[test]
    fn bodies_pass_untouched_and_pipelined_requests_are_encoded() {
        assert_eq!(s(&sanitize(PIPELINED)), s(PIPELINED_OUT));
    }

    #[test]
    fn every_split_gives_the_same_output() {
        for i in 0..=PIPELINED.len() {
            let mut framing = Framing::default();
            let mut out = Vec::new();
            framing.feed(&PIPELINED[..i], &mut out);
            framing.feed(&PIPELINED[i..], &mut out);
            framing.finish(&mut out);
            assert_eq!(s(&out), s(PIPELINED_OUT), "split at {i}");
        }
    }

    #[tokio::test]
    async fn the_adapter_gives_the_same_output_for_any_read_sizes() {
        for seed in 1..40u64 {
            for max_piece in [1, 3, 17, 200] {
                let out = through_adapter(PIPELINED, seed * 7919, max_piece).await;
                assert_eq!(s(&out), s(PIPELINED_OUT), "seed {seed}, pieces {max_piece}");
            }
        }
    }

    #[tokio::test]
    async fn the_write_side_passes_through() {
        let (client, server) = tokio::io::duplex(64);
        let mut server = RequestTargetSanitizer::new(server);
        let mut client = client;
        server
            .write_all(b"HTTP/1.1 200 OK\r\n")
            .await
            .expect("write");
        server.flush().await.expect("flush");
        let mut buf = [0u8; 17];
        client.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"HTTP/1.1 200 OK\r\n");
        client
            .write_all(b"GET /\"x\" HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        drop(client);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(s(&got), "GET /%22x%22 HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn odd_messages_switch_to_passthrough() {
        let after = b"GET /\"x\" HTTP/1.1\r\n\r\n";
        let odd: [&[u8]; 10] = [
            b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: +2\r\n\r\n",
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"GET /a HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"CONNECT h:443 HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            b"GET /a HTTP/1.1\r\nX : a\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\n",
            b"GET /\"a\"\r\n\r\n",
        ];
        for head in odd {
            let input = [head, after].concat();
            assert_eq!(s(&sanitize(&input)), s(&input), "{}", s(head));
        }
        // A request line over the limit passes as is, and so does the rest.
        let long = [
            b"GET /".as_slice(),
            &vec![b'"'; MAX_REQUEST_LINE],
            b" HTTP/1.1\r\n\r\n",
            after,
        ]
        .concat();
        assert_eq!(sanitize(&long), long);
        // So does a header line over its limit.
        let long = [
            b"GET / HTTP/1.1\r\nX: ".as_slice(),
            &vec![b'a'; MAX_LINE],
            b"\r\n\r\n",
            after,
        ]
        .concat();
        assert_eq!(sanitize(&long), long);
        // And a chunk whose data is not followed by CRLF.
        let bad_chunk = [
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n"
                .as_slice(),
            after,
        ]
        .concat();
        assert_eq!(sanitize(&bad_chunk), bad_chunk);
    }

    #[test]
    fn large_bodies_pass_without_buffering() {
        let body = vec![b'"'; 100_000];
        let head = format!(
            "PUT /\"b\" HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let mut framing = Framing::default();
        let mut out = Vec::new();
        framing.feed(head.as_bytes(), &mut out);
        assert_eq!(s(&out), head.replace("/\"b\"", "/%22b%22"));
        // The AsyncRead adapter hands body bytes over in place.
        assert_eq!(framing.pass(body.len() - 1), body.len() - 1);
        assert_eq!(framing.state, State::Body(1));
        assert_eq!(framing.pass(10), 1);
        assert_eq!(framing.state, State::RequestLine);
        assert!(framing.line.capacity() <= MAX_LINE);
    }

    /// The next response on `stream`: status and body. `data` carries bytes
    /// read past it (pipelined responses) to the next call.
    async fn read_response(stream: &mut TcpStream, data: &mut Vec<u8>) -> (u16, String) {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = s(&data[..end]);
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if data.len() >= end + 4 + length {
                    let status = head[9..12].parse().expect("status");
                    let body = s(&data[end + 4..end + 4 + length]);
                    data.drain(..end + 4 + length);
                    return (status, body);
                }
            }
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed mid-response: {}", s(data));
            data.extend_from_slice(&buf[..n]);
        }
    }

    /// Waits for the server to close `stream`; how long it took.
    async fn closed_after(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "still open: {read:?}"
        );
        started.elapsed()
    }

    #[tokio::test]
    async fn serves_caps_times_out_and_shuts_down() {
        use axum::extract::Query;
        use axum::routing::{get, post};

        let hold = Arc::new(tokio::sync::Notify::new());
        let app = Router::new()
            .route(
                "/echo",
                get(
                    |ConnectInfo(peer): ConnectInfo<SocketAddr>,
                     Query(q): Query<HashMap<String, String>>| async move {
                        format!("{}|{}", q.get("q").cloned().unwrap_or_default(), peer.ip())
                    },
                ),
            )
            .route("/body", post(|body: String| async move { body }))
            .route(
                "/hold",
                get({
                    let hold = hold.clone();
                    move || {
                        let hold = hold.clone();
                        async move { hold.notified().await }
                    }
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = ServerLimits {
            max_connections: 10,
            max_connections_per_ip: 1,
            header_read_timeout: Duration::from_millis(300),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, limits, async {
            let _ = stopped.await;
        }));

        // The one connection this address may have, held by a request in flight.
        let mut held = TcpStream::connect(addr).await.expect("connect");
        held.write_all(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;

        // Another one gets the 503 problem and is closed.
        let mut over = TcpStream::connect(addr).await.expect("connect");
        over.write_all(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        over.read_to_end(&mut answer).await.expect("read");
        let answer = s(&answer);
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");
        let body: serde_json::Value =
            serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or("")).expect("json");
        assert_eq!(body["type"], "urn:borough:problem:TooManyConnections");
        assert_eq!(body["status"], 503);
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("client address"))
        );

        // The held request completes; the now idle connection is closed
        // after the header read timeout.
        hold.notify_one();
        let (status, _) = read_response(&mut held, &mut Vec::new()).await;
        assert_eq!(status, 200);
        let idle = closed_after(&mut held).await;
        assert!(idle >= Duration::from_millis(200), "closed after {idle:?}");

        // Raw quotes and pipelining reach the handlers, bodies untouched.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(
                b"POST /body HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n\"<a b>\"\r\n\
                  GET /echo?q=name==\"x<y>\" HTTP/1.1\r\nHost: t\r\n\r\n",
            )
            .await
            .expect("write");
        let mut data = Vec::new();
        let (status, body) = read_response(&mut client, &mut data).await;
        assert_eq!((status, body.as_str()), (200, "\"<a b>\"\r\n"));
        let (status, body) = read_response(&mut client, &mut data).await;
        assert_eq!((status, body.as_str()), (200, "name==\"x<y>\"|127.0.0.1"));
        closed_after(&mut client).await;

        // A client that never finishes its request head is closed too.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /echo HTTP/1.1\r\nHo")
            .await
            .expect("write");
        let slow_for = closed_after(&mut slow).await;
        assert!(
            slow_for < Duration::from_secs(3),
            "closed after {slow_for:?}"
        );

        // Shutdown closes idle connections and returns.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = stop.send(());
        let result = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns")
            .expect("task");
        assert!(result.is_ok());
        closed_after(&mut idle).await;
    }
}
