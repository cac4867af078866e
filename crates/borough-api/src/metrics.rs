//! `GET /metrics`: Prometheus text exposition of what an operator watches:
//! entities per tenant, and per subscription its delivery statistics and
//! lag (notifications written but not yet delivered).

use crate::SharedState;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

fn gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, prometheus::Error> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn collect(state: &crate::AppState) -> Result<Vec<u8>, prometheus::Error> {
    // Built afresh at each scrape from the store's own figures, so nothing
    // on the request path has to update counters.
    let registry = Registry::new();
    let entities = gauge(
        &registry,
        "borough_entities",
        "Entities per tenant",
        &["tenant"],
    )?;
    let pending = gauge(
        &registry,
        "borough_subscription_pending_notifications",
        "Notifications written to the outbox and not yet delivered (the subscription's lag)",
        &["tenant", "subscription"],
    )?;
    let sent = gauge(
        &registry,
        "borough_subscription_notifications_sent",
        "Notifications delivered since start-up",
        &["tenant", "subscription"],
    )?;
    let failed = gauge(
        &registry,
        "borough_subscription_notifications_failed",
        "Failed delivery attempts since start-up",
        &["tenant", "subscription"],
    )?;
    let dropped = IntCounterVec::new(
        Opts::new(
            "borough_subscription_notifications_dropped_total",
            "Notifications not queued since start-up because the subscription had its bound of pending ones",
        ),
        &["tenant", "subscription"],
    )?;
    registry.register(Box::new(dropped.clone()))?;
    for tenant in state.store.tenants() {
        entities
            .with_label_values(&[tenant.as_str()])
            .set(i64::try_from(state.store.entity_count(&tenant)).unwrap_or(i64::MAX));
        for sub in state.store.subscriptions(&tenant) {
            let s = state.store.stats(&tenant, &sub.record.id);
            let labels = [tenant.as_str(), sub.record.id.as_str()];
            pending
                .with_label_values(&labels)
                .set(i64::try_from(s.pending).unwrap_or(i64::MAX));
            sent.with_label_values(&labels)
                .set(i64::try_from(s.times_sent).unwrap_or(i64::MAX));
            failed
                .with_label_values(&labels)
                .set(i64::try_from(s.times_failed).unwrap_or(i64::MAX));
            dropped.with_label_values(&labels).inc_by(s.dropped);
        }
    }
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    if let Some(access) = &state.access {
        out.extend(access.render_metrics().into_bytes());
    }
    Ok(out)
}

/// `GET /metrics`
pub async fn metrics(State(state): State<SharedState>) -> Response {
    match collect(&state) {
        Ok(body) => {
            let mut r = (StatusCode::OK, body).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics unavailable: {e}"),
        )
            .into_response(),
    }
}
