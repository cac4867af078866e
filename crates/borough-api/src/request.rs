//! Reading what a request carries: tenant, media types, `Link` context and body.

use axum::body::Body;
use axum::http::{HeaderMap, header};
use borough_core::validate::check_depth;
use borough_core::{NgsiError, NgsiResult, ProblemKind};
use serde_json::Value;

pub const TENANT_HEADER: &str = "ngsild-tenant";
pub const JSONLD_CONTEXT_REL: &str = "http://www.w3.org/ns/json-ld#context";
const MAX_TENANT_LEN: usize = 64;

/// The tenant the request addresses; the default tenant is the empty name.
pub fn tenant(headers: &HeaderMap) -> NgsiResult<String> {
    let Some(v) = headers.get(TENANT_HEADER) else {
        return Ok(String::new());
    };
    let t = v
        .to_str()
        .map_err(|_| NgsiError::bad_data("the NGSILD-Tenant header must be ASCII"))?;
    if borough_access::model::is_tenant_name(t) {
        // `default` names the default tenant, as MQTT topics write it.
        Ok(if t == "default" {
            String::new()
        } else {
            t.to_string()
        })
    } else {
        Err(NgsiError::bad_data(format!(
            "tenant '{t}' is not valid: use 1 to {MAX_TENANT_LEN} letters, digits, '_' or '-'"
        )))
    }
}

/// The media type of a request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyType {
    Json,
    LdJson,
}

fn media_type(v: &str) -> String {
    v.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Checks `Content-Type`: JSON or JSON-LD (and merge-patch for merges).
pub fn body_type(headers: &HeaderMap, allow_merge_patch: bool) -> NgsiResult<BodyType> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(media_type)
        .ok_or_else(|| {
            NgsiError::new(
                ProblemKind::UnsupportedMediaType,
                "a Content-Type of application/json or application/ld+json is required",
            )
        })?;
    match ct.as_str() {
        "application/json" => Ok(BodyType::Json),
        "application/ld+json" => Ok(BodyType::LdJson),
        "application/merge-patch+json" if allow_merge_patch => Ok(BodyType::Json),
        other => Err(NgsiError::new(
            ProblemKind::UnsupportedMediaType,
            format!(
                "Content-Type '{other}' is not supported here; use application/json or application/ld+json"
            ),
        )),
    }
}

/// Reads and parses a JSON body of at most `limit` bytes.
pub async fn read_json(body: Body, limit: usize) -> NgsiResult<Value> {
    use http_body_util::BodyExt;
    let too_large = || {
        NgsiError::new(
            ProblemKind::PayloadTooLarge,
            format!("the body is larger than the limit of {limit} bytes"),
        )
    };
    // A client that sends its head and then trickles (or stalls) its body
    // would otherwise hold the handler, and its connection, forever.
    const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
    let collecting = http_body_util::Limited::new(body, limit).collect();
    let Ok(collected) = tokio::time::timeout(BODY_TIMEOUT, collecting).await else {
        return Err(NgsiError::invalid("the body was not received within 30 s"));
    };
    let bytes = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(e) => {
            return Err(NgsiError::invalid(format!(
                "the body could not be read: {e}"
            )));
        }
    };
    if bytes.is_empty() {
        return Err(NgsiError::invalid(
            "the body is empty; a JSON document is required",
        ));
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| NgsiError::invalid(format!("the body is not valid JSON: {e}")))?;
    check_depth(&v)?;
    Ok(v)
}

/// The context URL of a `Link` header with the JSON-LD context relation.
pub fn link_context(headers: &HeaderMap) -> NgsiResult<Option<String>> {
    for v in headers.get_all(header::LINK) {
        let s = v
            .to_str()
            .map_err(|_| NgsiError::bad_data("the Link header must be ASCII"))?;
        for link in s.split(',') {
            let link = link.trim();
            let Some(rest) = link.strip_prefix('<') else {
                return Err(NgsiError::bad_data(format!(
                    "the Link header '{link}' is malformed"
                )));
            };
            let Some((url, params)) = rest.split_once('>') else {
                return Err(NgsiError::bad_data(format!(
                    "the Link header '{link}' is malformed"
                )));
            };
            let is_context = params.split(';').any(|p| {
                let p = p.trim();
                p.strip_prefix("rel=")
                    .map(|r| r.trim_matches('"'))
                    .is_some_and(|r| r.split_whitespace().any(|x| x == JSONLD_CONTEXT_REL))
            });
            if is_context {
                return Ok(Some(url.trim().to_string()));
            }
        }
    }
    Ok(None)
}

/// The representation a response is produced in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseType {
    Json,
    LdJson,
    GeoJson,
}

/// Picks the response media type from `Accept` (q-values honoured).
pub fn negotiate(headers: &HeaderMap, allow_geo: bool) -> NgsiResult<ResponseType> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(ResponseType::Json);
    };
    let mut best: Option<(f32, ResponseType)> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let mt = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        let rt = match mt.as_str() {
            "application/json" | "application/*" | "*/*" => Some(ResponseType::Json),
            "application/ld+json" => Some(ResponseType::LdJson),
            "application/geo+json" if allow_geo => Some(ResponseType::GeoJson),
            _ => None,
        };
        if let Some(rt) = rt
            && q > 0.0
            && best.is_none_or(|(bq, _)| q > bq)
        {
            best = Some((q, rt));
        }
    }
    best.map(|(_, rt)| rt).ok_or_else(|| {
        NgsiError::new(
            ProblemKind::NotAcceptable,
            format!(
                "none of the media types in Accept ('{accept}') can be produced; use application/json, application/ld+json{}",
                if allow_geo { " or application/geo+json" } else { "" }
            ),
        )
    })
}

/// Comma-separated values of a query parameter.
pub fn list_param(v: Option<&str>) -> Vec<&str> {
    v.map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

/// Percent-encodes an entity id for use as one path segment.
pub fn encode_path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:@!$&'()*+,;=".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn accept_negotiation() {
        let mut h = HeaderMap::new();
        assert_eq!(negotiate(&h, true).unwrap(), ResponseType::Json);
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/ld+json"),
        );
        assert_eq!(negotiate(&h, true).unwrap(), ResponseType::LdJson);
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json;q=0.5, application/geo+json"),
        );
        assert_eq!(negotiate(&h, true).unwrap(), ResponseType::GeoJson);
        assert_eq!(negotiate(&h, false).unwrap(), ResponseType::Json);
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        assert_eq!(
            negotiate(&h, true).unwrap_err().kind,
            ProblemKind::NotAcceptable
        );
    }

    #[test]
    fn link_header() {
        let mut h = HeaderMap::new();
        h.insert(
            header::LINK,
            HeaderValue::from_static(
                "<https://example.org/ctx.jsonld>; rel=\"http://www.w3.org/ns/json-ld#context\"; type=\"application/ld+json\"",
            ),
        );
        assert_eq!(
            link_context(&h).unwrap().as_deref(),
            Some("https://example.org/ctx.jsonld")
        );
        h.insert(
            header::LINK,
            HeaderValue::from_static("<https://x>; rel=\"next\""),
        );
        assert_eq!(link_context(&h).unwrap(), None);
        h.insert(header::LINK, HeaderValue::from_static("garbage"));
        assert!(link_context(&h).is_err());
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode_path_segment("urn:ngsi-ld:A:1"), "urn:ngsi-ld:A:1");
        assert_eq!(
            encode_path_segment("https://x.org/a b"),
            "https:%2F%2Fx.org%2Fa%20b"
        );
    }
}
