//! A small in-process harness: the real router over a real embedded store in a
//! temporary directory, driven request by request.

#![allow(dead_code)]

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use borough_api::{ApiConfig, Wiring, router_with, with_normalized_paths};
use borough_embedded::EmbeddedStore;
use borough_store::EntityStore;
use http_body_util::BodyExt;
use serde_json::Value;
use std::sync::Arc;
use tower::ServiceExt;

pub struct TestApp {
    pub router: Router,
    store: Arc<EmbeddedStore>,
    config: ApiConfig,
    dir: tempfile::TempDir,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The problem type's last segment, e.g. "BadRequestData".
    pub fn problem(&self) -> &str {
        // Problem details come as application/json unless the client asks
        // for application/problem+json (see errors.rs).
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "expected a problem body, got {:?}",
            self.body
        );
        assert!(self.status.is_client_error() || self.status.is_server_error());
        assert!(
            self.body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "a problem must say what was wrong: {}",
            self.body
        );
        self.body["type"]
            .as_str()
            .and_then(|t| t.rsplit('/').next())
            .unwrap_or_default()
    }
}

/// The default configuration, but allowing loopback: the tests' context
/// servers and receivers run there (the default refuses internal addresses).
pub fn test_config() -> ApiConfig {
    ApiConfig {
        outbound: borough_access::outbound::OutboundPolicy::loopback(),
        ..ApiConfig::default()
    }
}

/// The API over `store`, registrations kept in it as `borough serve` keeps them.
fn build(store: &Arc<EmbeddedStore>, config: &ApiConfig) -> Router {
    let wiring = Wiring {
        records: Some(store.clone()),
        ..Wiring::default()
    };
    router_with(store.clone(), config.clone(), wiring).expect("router")
}

impl TestApp {
    pub fn new() -> Self {
        Self::with_config(test_config())
    }

    pub fn with_config(config: ApiConfig) -> Self {
        Self::with_store_options(config, borough_embedded::StoreOptions::default())
    }

    /// With store options: injected faults, for one.
    pub fn with_store_options(config: ApiConfig, options: borough_embedded::StoreOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(borough_embedded::open_with(dir.path(), options).expect("store"));
        Self {
            router: with_normalized_paths(build(&store, &config)),
            store,
            config,
            dir,
        }
    }

    /// Closes the store and opens it again from disk, as a restart would.
    pub async fn restart(self) -> Self {
        self.store.close().await.expect("close");
        drop(self.router);
        drop(self.store);
        let store = Arc::new(borough_embedded::open(self.dir.path()).expect("store"));
        Self {
            router: with_normalized_paths(build(&store, &self.config)),
            store,
            config: self.config,
            dir: self.dir,
        }
    }

    pub async fn send(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(body.map(Body::from).unwrap_or_else(Body::empty))
            .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, uri: &str) -> Resp {
        self.send(Method::GET, uri, &[], None).await
    }

    pub async fn get_with(&self, uri: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(Method::GET, uri, headers, None).await
    }

    /// Sends a JSON body with `Content-Type: application/json`.
    pub async fn json(&self, method: Method, uri: &str, body: &Value) -> Resp {
        self.send(
            method,
            uri,
            &[("content-type", "application/json")],
            Some(body.to_string()),
        )
        .await
    }

    pub async fn json_with(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> Resp {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        self.send(method, uri, &h, Some(body.to_string())).await
    }

    pub async fn delete(&self, uri: &str) -> Resp {
        self.send(Method::DELETE, uri, &[], None).await
    }
}

pub const ENTITIES: &str = "/ngsi-ld/v1/entities";
