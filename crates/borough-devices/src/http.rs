//! `/api/v1/devices`: Borough's own device API (JSON, tenant from the
//! `NGSILD-Tenant` header, errors as `application/problem+json` like the
//! NGSI-LD API).
//!
//! - `POST /devices` registers one device (201, with its token, shown once);
//!   `POST /devices/import` registers many from a JSON array or CSV.
//! - `GET /devices`, `GET|PATCH|DELETE /devices/{id}`, `POST /devices/{id}/token`.
//! - `POST /devices/{id}/measures` (device token): a measurement payload.
//! - `POST|GET /devices/{id}/commands`, `GET /devices/{id}/commands/{cmdId}`.
//! - With the device token: `GET /devices/{id}/commands/pending` (pick-up)
//!   and `POST /devices/{id}/commands/{cmdId}/ack`.

use crate::commands::CommandInput;
use crate::model::{AttrMapping, DeviceInput, ValueType};
use crate::{DeviceError, Devices, Entry, IngestError};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use borough_api::problem::ApiError;
use borough_core::{NgsiError, ProblemKind};
use serde_json::{Value, json};
use std::sync::Arc;

/// Most devices in one import.
pub const MAX_IMPORT: usize = 10_000;

type S = State<Arc<Devices>>;

/// An error response: NGSI-LD problems, plus 401 and 429 which NGSI-LD lacks.
enum Problem {
    Ngsi(NgsiError),
    Status(StatusCode, &'static str, String),
}

impl From<NgsiError> for Problem {
    fn from(e: NgsiError) -> Self {
        Self::Ngsi(e)
    }
}

impl From<DeviceError> for Problem {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::Ngsi(e) => Self::Ngsi(e),
            DeviceError::Store(e) => Self::Ngsi(ApiError::from(e).0),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        match self {
            Self::Ngsi(e) => ApiError(e).into_response(),
            Self::Status(status, kind, detail) => {
                let body = json!({
                    "type": format!("https://borough.dev/problems/{kind}"),
                    "title": kind,
                    "status": status.as_u16(),
                    "detail": detail,
                });
                let mut r = (status, body.to_string()).into_response();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/problem+json"),
                );
                r
            }
        }
    }
}

type Res = Result<Response, Problem>;

fn unauthorized() -> Problem {
    Problem::Status(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "unknown device or wrong token: send 'Authorization: Bearer <device token>'".into(),
    )
}

fn json_resp(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, v.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn tenant(h: &HeaderMap) -> Result<String, Problem> {
    Ok(borough_api::request::tenant(h)?)
}

/// Management writes take JSON only: a form or `text/plain` body from another
/// site's page (CSRF) is refused before anything is read.
fn require_json(h: &HeaderMap) -> Result<(), Problem> {
    borough_api::request::body_type(h, true)?;
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body)
        .map_err(|e| NgsiError::bad_data(format!("the body is not valid: {e}")).into())
}

/// The device named in the path, authenticated by its token.
fn device_auth(d: &Devices, h: &HeaderMap, tenant: &str, id: &str) -> Result<Arc<Entry>, Problem> {
    let token = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let found = token.and_then(|t| d.authenticate_in(tenant, id, t));
    found.ok_or_else(|| {
        d.metrics
            .reject("http", "auth", tenant, id, "unknown device or wrong token");
        unauthorized()
    })
}

fn missing(id: &str) -> Problem {
    NgsiError::not_found(format!("device '{id}' does not exist")).into()
}

pub fn router(devices: Arc<Devices>) -> Router {
    Router::new()
        .route("/api/v1/devices", post(create).get(list))
        .route(
            "/api/v1/devices/import",
            post(import).layer(DefaultBodyLimit::max(16 << 20)),
        )
        .route(
            "/api/v1/devices/{id}",
            get(retrieve).patch(update).delete(delete),
        )
        .route("/api/v1/devices/{id}/token", post(rotate))
        .route(
            "/api/v1/devices/{id}/measures",
            // The handler enforces the payload limit itself, to count refusals.
            post(measures).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/api/v1/devices/{id}/commands",
            post(send_command).get(list_commands),
        )
        .route("/api/v1/devices/{id}/commands/pending", get(pick_up))
        .route("/api/v1/devices/{id}/commands/{cmd}", get(command))
        .route("/api/v1/devices/{id}/commands/{cmd}/ack", post(ack))
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(devices)
}

async fn create(State(d): S, h: HeaderMap, body: Bytes) -> Res {
    let t = tenant(&h)?;
    require_json(&h)?;
    let input: DeviceInput = parse_json(&body)?;
    let (device, token) = d.create(&t, input).await?;
    d.audit(
        &t,
        "device.create",
        &device.id,
        json!({"entityId": device.entity_id}),
    )
    .await;
    let mut v = device.to_json();
    v["token"] = json!(token);
    let mut r = json_resp(StatusCode::CREATED, &v);
    if let Ok(loc) = HeaderValue::from_str(&format!("/api/v1/devices/{}", device.id)) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

async fn list(State(d): S, h: HeaderMap) -> Res {
    let t = tenant(&h)?;
    let all: Vec<Value> = d.list(&t).iter().map(|e| e.device.to_json()).collect();
    Ok(json_resp(StatusCode::OK, &Value::Array(all)))
}

async fn retrieve(State(d): S, h: HeaderMap, Path(id): Path<String>) -> Res {
    let t = tenant(&h)?;
    let e = d.get(&t, &id).ok_or_else(|| missing(&id))?;
    Ok(json_resp(StatusCode::OK, &e.device.to_json()))
}

async fn update(State(d): S, h: HeaderMap, Path(id): Path<String>, body: Bytes) -> Res {
    let t = tenant(&h)?;
    require_json(&h)?;
    let input: DeviceInput = parse_json(&body)?;
    let device = d.update(&t, &id, input).await?;
    d.audit(&t, "device.update", &id, Value::Null).await;
    Ok(json_resp(StatusCode::OK, &device.to_json()))
}

async fn delete(State(d): S, h: HeaderMap, Path(id): Path<String>) -> Res {
    let t = tenant(&h)?;
    if d.delete(&t, &id).await? {
        d.audit(&t, "device.delete", &id, Value::Null).await;
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(missing(&id))
    }
}

async fn rotate(State(d): S, h: HeaderMap, Path(id): Path<String>) -> Res {
    let t = tenant(&h)?;
    let token = d.rotate_token(&t, &id).await?;
    d.audit(&t, "device.token-rotate", &id, Value::Null).await;
    Ok(json_resp(
        StatusCode::OK,
        &json!({"id": id, "token": token}),
    ))
}

/// Splits one CSV line into fields (`"…"` quoting with `""` for a quote).
fn csv_fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// CSV with a header of `id,entityType,entityId,attributes,commands`;
/// attributes are `key:attribute:unitCode:type` entries separated by spaces
/// (empty parts take their defaults), commands are names separated by spaces.
pub fn parse_csv(text: &str) -> Result<Vec<DeviceInput>, NgsiError> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = csv_fields(lines.next().unwrap_or_default())
        .into_iter()
        .map(|h| h.trim().to_string())
        .collect();
    let col = |name: &str| header.iter().position(|h| h == name);
    let id_col =
        col("id").ok_or_else(|| NgsiError::bad_data("the CSV header needs an 'id' column"))?;
    let (type_col, entity_col, attrs_col, cmds_col) = (
        col("entityType"),
        col("entityId"),
        col("attributes"),
        col("commands"),
    );
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        let f = csv_fields(line);
        let get = |c: Option<usize>| {
            c.and_then(|i| f.get(i))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let mut attributes = Vec::new();
        for spec in get(attrs_col).unwrap_or_default().split_whitespace() {
            let mut parts = spec.split(':');
            let key = parts.next().unwrap_or_default().to_string();
            let nonempty = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_string);
            let attribute = nonempty(parts.next());
            let unit_code = nonempty(parts.next());
            let value_type = match nonempty(parts.next()) {
                None => ValueType::Number,
                Some(t) => serde_json::from_value(json!(t)).map_err(|_| {
                    NgsiError::bad_data(format!("line {}: unknown value type '{t}'", n + 2))
                })?,
            };
            attributes.push(AttrMapping {
                key,
                attribute,
                unit_code,
                value_type,
            });
        }
        out.push(DeviceInput {
            id: get(Some(id_col)),
            entity_type: get(type_col),
            entity_id: get(entity_col),
            attributes: Some(attributes),
            commands: Some(
                get(cmds_col)
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_string)
                    .collect(),
            ),
        });
    }
    Ok(out)
}

async fn import(State(d): S, h: HeaderMap, body: Bytes) -> Res {
    let t = tenant(&h)?;
    let is_csv = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/csv"));
    if !is_csv {
        require_json(&h)?;
    }
    let inputs: Vec<DeviceInput> = if is_csv {
        let text =
            std::str::from_utf8(&body).map_err(|_| NgsiError::bad_data("the CSV is not UTF-8"))?;
        parse_csv(text)?
    } else {
        parse_json(&body)?
    };
    if inputs.len() > MAX_IMPORT {
        return Err(
            NgsiError::bad_data(format!("an import holds at most {MAX_IMPORT} devices")).into(),
        );
    }
    let results = d.create_many(&t, inputs).await?;
    let created = results.iter().filter(|r| r.is_ok()).count();
    d.audit(
        &t,
        "device.import",
        "devices",
        json!({"created": created, "refused": results.len() - created}),
    )
    .await;
    let mut created = Vec::new();
    let mut errors = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok((device, token)) => {
                let mut v = device.to_json();
                v["token"] = json!(token);
                created.push(v);
            }
            Err(e) => errors.push(json!({"index": i, "error": e.to_problem()})),
        }
    }
    let status = if errors.is_empty() {
        StatusCode::CREATED
    } else {
        StatusCode::MULTI_STATUS
    };
    Ok(json_resp(
        status,
        &json!({"created": created, "errors": errors}),
    ))
}

async fn measures(
    State(d): S,
    h: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Res {
    let t = tenant(&h)?;
    let entry = device_auth(&d, &h, &t, &id)?;
    // Read at most one byte over the limit: a larger body is refused (and
    // counted) without being read whole.
    let limit = d.config.max_payload_bytes;
    let body = match axum::body::to_bytes(body, limit + 1).await {
        Ok(b) => b,
        Err(_) => {
            let e = IngestError::TooLarge(limit);
            d.metrics.reject(
                "http",
                e.reason(),
                &entry.tenant,
                &entry.device.id,
                &e.detail(),
            );
            return Err(NgsiError::new(ProblemKind::PayloadTooLarge, e.detail()).into());
        }
    };
    match d.ingest("http", &entry, &body).await {
        Ok(a) => {
            let dropped: Vec<String> = a.dropped.iter().map(ToString::to_string).collect();
            Ok(json_resp(
                StatusCode::OK,
                &json!({"readings": a.readings, "values": a.values, "dropped": dropped}),
            ))
        }
        Err(IngestError::RateLimited) => Err(Problem::Status(
            StatusCode::TOO_MANY_REQUESTS,
            "RateLimited",
            IngestError::RateLimited.detail(),
        )),
        Err(e @ IngestError::TooLarge(_)) => {
            Err(NgsiError::new(ProblemKind::PayloadTooLarge, e.detail()).into())
        }
        Err(e @ IngestError::Store(_)) => Err(NgsiError::internal(e.detail()).into()),
        Err(e @ IngestError::Tenant(_)) => {
            Err(NgsiError::new(ProblemKind::Forbidden, e.detail()).into())
        }
        Err(e) => Err(NgsiError::bad_data(e.detail()).into()),
    }
}

async fn send_command(State(d): S, h: HeaderMap, Path(id): Path<String>, body: Bytes) -> Res {
    let t = tenant(&h)?;
    require_json(&h)?;
    let mut input: CommandInput = parse_json(&body)?;
    if input.idempotency_key.is_none() {
        input.idempotency_key = h
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
    let (c, created) = d.send_command(&t, &id, input).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut r = json_resp(status, &c.to_json());
    if let Ok(loc) = HeaderValue::from_str(&format!("/api/v1/devices/{id}/commands/{}", c.id)) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

async fn list_commands(State(d): S, h: HeaderMap, Path(id): Path<String>) -> Res {
    let t = tenant(&h)?;
    d.get(&t, &id).ok_or_else(|| missing(&id))?;
    let all: Vec<Value> = d
        .commands
        .list(&t, &id)
        .iter()
        .map(|c| c.to_json())
        .collect();
    Ok(json_resp(StatusCode::OK, &Value::Array(all)))
}

async fn command(State(d): S, h: HeaderMap, Path((id, cmd)): Path<(String, String)>) -> Res {
    let t = tenant(&h)?;
    let c = d
        .commands
        .get(&t, &id, &cmd)
        .ok_or_else(|| NgsiError::not_found(format!("device '{id}' has no command '{cmd}'")))?;
    Ok(json_resp(StatusCode::OK, &c.to_json()))
}

async fn pick_up(State(d): S, h: HeaderMap, Path(id): Path<String>) -> Res {
    let t = tenant(&h)?;
    let entry = device_auth(&d, &h, &t, &id)?;
    let sent = d.pick_up(&entry.tenant, &entry.device.id).await?;
    let v: Vec<Value> = sent.iter().map(|c| c.message()).collect();
    Ok(json_resp(StatusCode::OK, &Value::Array(v)))
}

async fn ack(
    State(d): S,
    h: HeaderMap,
    Path((id, cmd)): Path<(String, String)>,
    body: Bytes,
) -> Res {
    let t = tenant(&h)?;
    let entry = device_auth(&d, &h, &t, &id)?;
    let v: Value = if body.is_empty() {
        json!({})
    } else {
        parse_json(&body)?
    };
    let ok = !matches!(
        v.get("status").and_then(Value::as_str),
        Some("error" | "failed" | "fail")
    );
    if d.acknowledge(&entry.tenant, &id, &cmd, ok, v.get("info").cloned())
        .await?
    {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(NgsiError::not_found(format!("device '{id}' has no open command '{cmd}'")).into())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn csv_rows_become_registrations() {
        let rows = super::parse_csv(
            "id,entityType,attributes,commands\n\
             ws-1,WeatherObserved,\"t:temperature:CEL h:relativeHumidity::number\",reset\n\
             \n\
             ws-2,WeatherObserved,,\n",
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        let a = rows[0].attributes.as_ref().unwrap();
        assert_eq!(a[0].attribute.as_deref(), Some("temperature"));
        assert_eq!(a[0].unit_code.as_deref(), Some("CEL"));
        assert_eq!(a[1].unit_code, None);
        assert_eq!(rows[0].commands.as_ref().unwrap(), &["reset".to_string()]);
        assert!(rows[1].attributes.as_ref().unwrap().is_empty());
        assert!(super::parse_csv("name\nx\n").is_err());
    }
}
