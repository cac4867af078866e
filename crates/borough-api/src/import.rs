//! Bulk import of history: `POST /api/v1/history/import` with a `text/csv`
//! body streamed in, one point per line:
//!
//! ```text
//! entityId,entityType,attribute,observedAt,value
//! urn:ngsi-ld:Sensor:1,AirQualityObserved,no2,2025-01-01T00:15:00Z,41.5
//! ```
//!
//! `entityType` and `attribute` are terms of the request's context (the core
//! context unless a `Link` header names another) or IRIs; `observedAt` is RFC
//! 3339 or epoch milliseconds; `value` is a JSON value (a bare number, `true`,
//! `"text"`, ...) and may contain commas. Points are grouped by series and
//! written straight into compressed chunks, a batch per durable transaction,
//! while the next batch is parsed. A bad line stops the import with a 400 that
//! names it and says how many points were stored before it.

use crate::problem::ApiResult;
use crate::request::{link_context, tenant};
use crate::{SharedState, entities::with_tenant, typed_json_response};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use borough_core::temporal::ImportSeries;
use borough_core::validate::{check_uri, parse_datetime};
use borough_core::{Context, NgsiError, NgsiResult, ProblemKind};
use borough_store::{ImportCounts, StoreError};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};

/// Points parsed before a batch is handed to the store.
const BATCH_POINTS: usize = 1_000_000;
/// Longest line accepted.
const MAX_LINE: usize = 64 * 1024;
/// Most distinct series in one batch (bounds the batch's maps).
const MAX_BATCH_SERIES: usize = 100_000;

/// The points parsed so far, grouped by series.
#[derive(Default)]
struct Batch {
    index: HashMap<String, usize>,
    series: Vec<ImportSeries>,
    points: usize,
}

/// Parses lines into batches, remembering expansions and the entities seen.
struct Parser {
    ctx: std::sync::Arc<Context>,
    expanded: HashMap<String, String>,
    entities: HashSet<String>,
    series: HashSet<String>,
    line: u64,
    batch: Batch,
}

fn bad_line(line: u64, why: impl std::fmt::Display) -> NgsiError {
    NgsiError::bad_data(format!("line {line}: {why}"))
}

impl Parser {
    fn expand(&mut self, term: &str) -> String {
        if let Some(e) = self.expanded.get(term) {
            return e.clone();
        }
        let e = self.ctx.expand(term).into_owned();
        if self.expanded.len() < 10_000 {
            self.expanded.insert(term.to_string(), e.clone());
        }
        e
    }

    fn line(&mut self, raw: &[u8]) -> NgsiResult<()> {
        self.line += 1;
        let n = self.line;
        let text = std::str::from_utf8(raw).map_err(|_| bad_line(n, "not UTF-8"))?;
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return Ok(());
        }
        let mut commas = text.match_indices(',').map(|(i, _)| i);
        let (Some(c1), Some(c2), Some(c3), Some(c4)) =
            (commas.next(), commas.next(), commas.next(), commas.next())
        else {
            return Err(bad_line(
                n,
                "expected entityId,entityType,attribute,observedAt,value",
            ));
        };
        let at_text = &text[c3 + 1..c4];
        let at = parse_time(at_text).ok_or_else(|| {
            bad_line(
                n,
                format!("observedAt '{at_text}' is neither RFC 3339 nor epoch milliseconds"),
            )
        })?;
        let value = parse_value(&text[c4 + 1..])
            .ok_or_else(|| bad_line(n, "the value is not a JSON value"))?;
        let prefix = &text[..c3];
        let slot = match self.batch.index.get(prefix) {
            Some(i) => *i,
            None => {
                let entity = &text[..c1];
                let ty = &text[c1 + 1..c2];
                let attr = &text[c2 + 1..c3];
                check_uri("entity id", entity).map_err(|e| bad_line(n, e.detail))?;
                for (what, s) in [("entity type", ty), ("attribute", attr)] {
                    borough_core::validate::check_name(what, s)
                        .map_err(|e| bad_line(n, e.detail))?;
                }
                if self.batch.series.len() >= MAX_BATCH_SERIES {
                    return Err(bad_line(
                        n,
                        format!(
                            "more than {MAX_BATCH_SERIES} series in one batch of {BATCH_POINTS} points"
                        ),
                    ));
                }
                // Counted for the answer; bounded like everything kept per request.
                if self.series.len() < 10_000_000 {
                    if !self.entities.contains(entity) {
                        self.entities.insert(entity.to_string());
                    }
                    self.series.insert(prefix.to_string());
                }
                let series = ImportSeries {
                    entity: entity.to_string(),
                    entity_type: self.expand(ty),
                    name: self.expand(attr),
                    points: Vec::new(),
                };
                self.batch.series.push(series);
                self.batch
                    .index
                    .insert(prefix.to_string(), self.batch.series.len() - 1);
                self.batch.series.len() - 1
            }
        };
        self.batch.series[slot].points.push((at, value));
        self.batch.points += 1;
        Ok(())
    }
}

fn parse_time(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().ok()?.checked_mul(1000);
    }
    parse_datetime(s)
}

fn parse_value(s: &str) -> Option<Value> {
    let s = s.trim();
    if let Ok(i) = s.parse::<i64>() {
        return Some(Value::from(i));
    }
    if let Ok(f) = s.parse::<f64>() {
        return serde_json::Number::from_f64(f).map(Value::Number);
    }
    serde_json::from_str(s).ok()
}

/// `POST /api/v1/history/import`
pub async fn import(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let tenant = tenant(&headers)?;
    let csv = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim() == "text/csv");
    if !csv {
        return Err(NgsiError::new(
            ProblemKind::UnsupportedMediaType,
            "a history import is text/csv: entityId,entityType,attribute,observedAt,value per line",
        )
        .into());
    }
    let ctx = state
        .contexts
        .for_link(link_context(&headers)?.as_deref())
        .await?
        .ctx;
    let mut parser = Parser {
        ctx,
        expanded: HashMap::new(),
        entities: HashSet::new(),
        series: HashSet::new(),
        line: 0,
        batch: Batch::default(),
    };
    let mut stored = ImportCounts::default();
    let mut writing: Option<BoxFuture<'static, Result<ImportCounts, StoreError>>> = None;
    let mut carry: Vec<u8> = Vec::new();
    let mut stream = body.into_data_stream();
    let outcome: NgsiResult<()> = async {
        loop {
            let frame = stream.next().await;
            let last = frame.is_none();
            match frame {
                Some(Ok(bytes)) => carry.extend_from_slice(&bytes),
                Some(Err(e)) => {
                    return Err(NgsiError::bad_data(format!(
                        "the body could not be read: {e}"
                    )));
                }
                None => {}
            }
            let mut start = 0;
            while let Some(pos) = carry[start..].iter().position(|b| *b == b'\n') {
                parser.line(&carry[start..start + pos])?;
                start += pos + 1;
            }
            carry.drain(..start);
            if last && !carry.is_empty() {
                let rest = std::mem::take(&mut carry);
                parser.line(&rest)?;
            }
            if carry.len() > MAX_LINE {
                return Err(bad_line(
                    parser.line + 1,
                    format!("longer than {MAX_LINE} bytes"),
                ));
            }
            if parser.batch.points >= BATCH_POINTS || (last && parser.batch.points > 0) {
                // Write this batch while the next one is parsed.
                if let Some(w) = writing.take() {
                    add(&mut stored, w.await);
                }
                let batch = std::mem::take(&mut parser.batch);
                writing = Some(state.store.import_history(&tenant, batch.series));
            }
            if last {
                return Ok(());
            }
        }
    }
    .await;
    let final_write = match writing.take() {
        Some(w) => w.await,
        None => Ok(ImportCounts::default()),
    };
    let failed = final_write.is_err();
    add(&mut stored, final_write);
    if failed {
        return Err(NgsiError::internal(format!(
            "storage failed after {} points were stored",
            stored.points
        ))
        .into());
    }
    if let Err(e) = outcome {
        return Err(NgsiError::bad_data(format!(
            "{}; {} points before it were stored",
            e.detail, stored.points
        ))
        .into());
    }
    let body = json!({
        "points": stored.points,
        "series": parser.series.len(),
        "entities": parser.entities.len(),
    });
    Ok(with_tenant(
        typed_json_response(StatusCode::OK, &body, "application/json"),
        &tenant,
    ))
}

fn add(total: &mut ImportCounts, r: Result<ImportCounts, StoreError>) {
    match r {
        Ok(c) => {
            total.points += c.points;
            total.series += c.series;
        }
        Err(e) => tracing::error!(error = %e, "history import batch failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_times() {
        assert_eq!(parse_value("21.5"), Some(json!(21.5)));
        assert_eq!(parse_value("7"), Some(json!(7)));
        assert_eq!(parse_value("\"a,b\""), Some(json!("a,b")));
        assert_eq!(parse_value("true"), Some(json!(true)));
        assert_eq!(parse_value("nope"), None);
        assert_eq!(parse_time("1735689600000"), Some(1_735_689_600_000_000));
        assert_eq!(
            parse_time("2025-01-01T00:00:00Z"),
            Some(1_735_689_600_000_000)
        );
        assert_eq!(parse_time("yesterday"), None);
    }
}
