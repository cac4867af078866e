//! A notification receiver on loopback, and a plain HTTP call, for the
//! tests that check what Borough sends.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a receiver got: every notification body, in arrival order.
#[derive(Clone, Default)]
pub struct Inbox {
    pub bodies: Arc<Mutex<Vec<Value>>>,
}

impl Inbox {
    pub fn entities(&self) -> Vec<Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b["data"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let got = self.entities();
            if done(&got) {
                return got;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}; got {got:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A receiver on loopback: answers `status` after `delay`.
pub fn receiver(
    rt: &tokio::runtime::Runtime,
    status: StatusCode,
    delay: Duration,
) -> (String, Inbox) {
    receiver_at(rt, 0, status, delay)
}

/// A receiver on a given loopback port (0: any free one).
pub fn receiver_at(
    rt: &tokio::runtime::Runtime,
    port: u16,
    status: StatusCode,
    delay: Duration,
) -> (String, Inbox) {
    let inbox = Inbox::default();
    let state = (inbox.clone(), status, delay);
    let app = Router::new()
        .route(
            "/notify",
            post(
                |State((inbox, status, delay)): State<(Inbox, StatusCode, Duration)>,
                 body: Bytes| async move {
                    tokio::time::sleep(delay).await;
                    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                        inbox.bodies.lock().unwrap().push(v);
                    }
                    status
                },
            ),
        )
        .with_state(state);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .unwrap();
    let url = format!("http://{}/notify", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await });
    (url, inbox)
}

pub fn call(
    rt: &tokio::runtime::Runtime,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (u16, Value) {
    rt.block_on(async {
        let mut req = reqwest::Client::new().request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(r) => {
                let s = r.status().as_u16();
                (s, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    })
}
