//! HTTP for `borough bench temporal`: request bodies streamed from a
//! generator thread (chunked, bounded memory), and GETs that keep the
//! headers (`Link` pages, `Content-Range`) and carry a tenant.

use super::chain;
use super::load::quote;
use super::temporal_data::{Format, Readings};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Chunks in flight between a generator thread and its request.
const CHANNEL_CHUNKS: usize = 16;
/// Longest wait for one streamed upload (GBs of body) and its answer.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest wait for one query.
const GET_TIMEOUT: Duration = Duration::from_secs(300);

/// A request body fed by a channel: one data frame per chunk, the end when
/// the sender is dropped.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// Opens an HTTP/1.1 connection to `addr` for bodies of type `B`.
pub async fn open<B>(addr: SocketAddr) -> Result<SendRequest<B>, String>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
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
        let _ = connection.await;
    });
    Ok(sender)
}

/// One streamed upload: the rows of `sensors` in `format`, generated on
/// their own thread, POSTed to `uri` with `headers`.
pub struct Upload {
    pub addr: SocketAddr,
    pub uri: Uri,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub readings: Readings,
    pub sensors: std::ops::Range<usize>,
    pub format: Format,
}

impl Upload {
    /// Sends the upload on a connection opened beforehand (so the caller's
    /// clock measures the transfer only) and returns the answer.
    pub async fn send(
        self,
        mut sender: SendRequest<ChannelBody>,
    ) -> Result<(StatusCode, Bytes), String> {
        let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
        let (readings, sensors, format) = (self.readings, self.sensors.clone(), self.format);
        let generator = std::thread::Builder::new()
            .name("bench-gen".to_string())
            .spawn(move || readings.generate(sensors, format, |chunk| tx.blocking_send(chunk)))
            .map_err(|e| format!("cannot start a generator thread: {e}"))?;
        let mut req = Request::new(ChannelBody { rx });
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        let host = HeaderValue::from_str(&self.addr.to_string())
            .map_err(|e| format!("invalid Host header: {e}"))?;
        req.headers_mut().insert(HOST, host);
        for (name, value) in self.headers {
            req.headers_mut().insert(name, value);
        }
        let what = format!("POST {}", self.uri);
        let exchange = async {
            sender
                .ready()
                .await
                .map_err(|e| format!("connection lost: {}", chain(&e)))?;
            let response = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request failed: {}", chain(&e)))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("cannot read the answer: {}", chain(&e)))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let answer = tokio::time::timeout(UPLOAD_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("{what}: no answer within {} s", UPLOAD_TIMEOUT.as_secs()))?
            .map_err(|e| format!("{what}: {e}"));
        // The generator ends once its body is sent, or when the request is
        // dropped (its channel closes): never left running.
        let _ = tokio::task::spawn_blocking(move || generator.join()).await;
        answer
    }
}

/// A keep-alive connection for GETs with headers.
pub struct GetConn {
    sender: SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    host: HeaderValue,
}

/// One answer of [`GetConn::get`].
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON, or an error quoting it.
    pub fn json(&self, what: &str) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("{what}: invalid JSON ({e}): {}", quote(&self.body)))
    }

    /// Fails unless the status is one of `ok`.
    pub fn expect(&self, what: &str, ok: &[StatusCode]) -> Result<(), String> {
        if ok.contains(&self.status) {
            return Ok(());
        }
        Err(format!(
            "{what}: answered {}: {}",
            self.status,
            quote(&self.body)
        ))
    }

    /// The target of the `Link` header with `rel="next"`, as a path and query.
    pub fn next_link(&self) -> Option<String> {
        for value in self.headers.get_all(hyper::header::LINK) {
            let Ok(text) = value.to_str() else { continue };
            for link in split_links(text) {
                let Some((target, params)) = link.split_once('>') else {
                    continue;
                };
                let is_next = params.split(';').any(|p| {
                    let p = p.trim();
                    p == "rel=\"next\"" || p == "rel=next"
                });
                if is_next {
                    let target = target.trim().trim_start_matches('<');
                    return Some(path_of(target));
                }
            }
        }
        None
    }
}

/// The links of one `Link` header value (commas inside `<…>` kept).
fn split_links(text: &str) -> Vec<&str> {
    let mut links = Vec::new();
    let (mut start, mut inside) = (0, false);
    for (k, c) in text.char_indices() {
        match c {
            '<' => inside = true,
            '>' => inside = false,
            ',' if !inside => {
                links.push(text[start..k].trim());
                start = k + 1;
            }
            _ => {}
        }
    }
    links.push(text[start..].trim());
    links
}

/// `http://host:port/path?q` → `/path?q`; a path stays as it is.
fn path_of(target: &str) -> String {
    match target.split_once("://") {
        Some((_, rest)) => match rest.find('/') {
            Some(k) => rest[k..].to_string(),
            None => "/".to_string(),
        },
        None => target.to_string(),
    }
}

impl GetConn {
    pub async fn open(addr: SocketAddr) -> Result<GetConn, String> {
        let host = HeaderValue::from_str(&addr.to_string())
            .map_err(|e| format!("invalid Host header: {e}"))?;
        Ok(GetConn {
            sender: open(addr).await?,
            addr,
            host,
        })
    }

    /// GETs `path` with `headers`, reading the whole body. A failed
    /// connection is replaced for the next request.
    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Answer, String> {
        let uri: Uri = path
            .parse()
            .map_err(|e| format!("invalid request URI {path}: {e}"))?;
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.uri_mut() = uri;
        req.headers_mut().insert(HOST, self.host.clone());
        for (name, value) in headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        let exchange = async {
            self.sender
                .ready()
                .await
                .map_err(|e| format!("connection lost: {}", chain(&e)))?;
            let response = self
                .sender
                .send_request(req)
                .await
                .map_err(|e| format!("request failed: {}", chain(&e)))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("cannot read the body: {}", chain(&e)))?
                .to_bytes();
            Ok::<_, String>(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let result = match tokio::time::timeout(GET_TIMEOUT, exchange).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} s", GET_TIMEOUT.as_secs())),
        };
        if result.is_err() {
            // The connection may be mid-response: start afresh.
            if let Ok(sender) = open(self.addr).await {
                self.sender = sender;
            }
        }
        result.map_err(|e| format!("GET {path}: {e}"))
    }
}

/// `Content-Type: text/csv`.
pub fn content_type(value: &'static str) -> (HeaderName, HeaderValue) {
    (CONTENT_TYPE, HeaderValue::from_static(value))
}

/// `NGSILD-Tenant: <tenant>`.
pub fn tenant(tenant: &'static str) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static("ngsild-tenant"),
        HeaderValue::from_static(tenant),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(
            hyper::header::LINK,
            HeaderValue::from_static(
                "<https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld>; rel=\"http://www.w3.org/ns/json-ld#context\"; type=\"application/ld+json\"",
            ),
        );
        headers.append(
            hyper::header::LINK,
            HeaderValue::from_static(
                "</ngsi-ld/v1/temporal/entities?type=Sensor&limit=100&offset=0>; rel=\"prev\", <http://127.0.0.1:9/ngsi-ld/v1/temporal/entities?type=Sensor&limit=100&offset=200>; rel=\"next\"",
            ),
        );
        let answer = Answer {
            status: StatusCode::OK,
            headers,
            body: Bytes::new(),
        };
        assert_eq!(
            answer.next_link().as_deref(),
            Some("/ngsi-ld/v1/temporal/entities?type=Sensor&limit=100&offset=200")
        );
    }
}
