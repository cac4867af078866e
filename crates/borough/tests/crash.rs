//! Durability of the real binary: writes acknowledged with a 2xx survive
//! `kill -9` at random moments, and SIGTERM shuts the server down cleanly.

mod support;

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::start;

#[derive(Default)]
struct Acked {
    /// Entity ids whose creation was acknowledged.
    ids: Vec<String>,
    /// Per writer, the last acknowledged value of its counter entity.
    counters: Vec<i64>,
    /// Per writer, every acknowledged value: each must be in the counter's history.
    history: Vec<Vec<i64>>,
}

async fn writer(
    client: reqwest::Client,
    base: String,
    round: usize,
    task: usize,
    acked: Arc<Mutex<Acked>>,
) {
    for seq in 0.. {
        let ids: Vec<String> = (0..20)
            .map(|k| format!("urn:ngsi-ld:Crash:{round}-{task}-{seq}-{k}"))
            .collect();
        let mut batch: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "type": "Probe", "n": {"type": "Property", "value": seq}}))
            .collect();
        let counter_value = (round * 1_000_000 + seq) as i64;
        batch.push(
            json!({"id": format!("urn:ngsi-ld:Counter:{task}"), "type": "Counter",
                          "value": {"type": "Property", "value": counter_value}}),
        );
        let resp = client
            .post(format!("{base}/ngsi-ld/v1/entityOperations/upsert"))
            .json(&batch)
            .send()
            .await;
        match resp {
            Ok(r) if r.status().as_u16() == 201 || r.status().as_u16() == 204 => {
                let mut a = acked.lock().unwrap();
                a.ids.extend(ids);
                a.counters[task] = counter_value;
                a.history[task].push(counter_value);
            }
            // The server was killed mid-request: this batch was never acknowledged.
            _ => return,
        }
    }
}

async fn verify(client: &reqwest::Client, base: &str, acked: &Acked) {
    for id in &acked.ids {
        let r = client
            .get(format!("{base}/ngsi-ld/v1/entities/{id}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "acknowledged entity {id} was lost");
    }
    for (task, &value) in acked.counters.iter().enumerate() {
        if value < 0 {
            continue;
        }
        let e: Value = client
            .get(format!(
                "{base}/ngsi-ld/v1/entities/urn:ngsi-ld:Counter:{task}"
            ))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("json");
        let stored = e["value"]["value"].as_i64().expect("counter value");
        assert!(
            stored >= value,
            "counter {task}: acknowledged update {value} was lost (store has {stored})"
        );
        // History is written in the same durable write: every acknowledged value is there.
        let h: Value = client
            .get(format!(
                "{base}/ngsi-ld/v1/temporal/entities/urn:ngsi-ld:Counter:{task}?attrs=value&options=temporalValues"
            ))
            .send()
            .await
            .expect("GET temporal")
            .json()
            .await
            .expect("json");
        let kept: std::collections::HashSet<i64> = h["value"]["values"]
            .as_array()
            .expect("temporal values")
            .iter()
            .filter_map(|v| v[0].as_i64())
            .collect();
        for v in &acked.history[task] {
            assert!(
                kept.contains(v),
                "counter {task}: acknowledged update {v} is missing from its history"
            );
        }
    }
}

/// Ten rounds of writers cut short by `kill -9`, each round first checking
/// that everything acknowledged before is still there; `extra` chooses the store.
fn writes_survive_kill_9(dir: &std::path::Path, extra: &[&str]) {
    const WRITERS: usize = 4;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let acked = Arc::new(Mutex::new(Acked {
        ids: Vec::new(),
        counters: vec![-1; WRITERS],
        history: vec![Vec::new(); WRITERS],
    }));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..10 {
        let mut server = start(dir, extra);
        rt.block_on(verify(&client, &server.base, &acked.lock().unwrap()));
        let tasks: Vec<_> = (0..WRITERS)
            .map(|task| {
                rt.spawn(writer(
                    client.clone(),
                    server.base.clone(),
                    round,
                    task,
                    acked.clone(),
                ))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(100..700)));
        server.child.kill().expect("SIGKILL");
        server.child.wait().expect("reap");
        for t in tasks {
            rt.block_on(t).expect("writer task");
        }
    }
    let server = start(dir, extra);
    let a = acked.lock().unwrap();
    assert!(
        a.ids.len() > 200,
        "the test must actually write: only {} acknowledged",
        a.ids.len()
    );
    rt.block_on(verify(&client, &server.base, &a));
    drop(server);
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    writes_survive_kill_9(dir.path(), &[]);
}

/// The same with the data in the machine's PostgreSQL (`BOROUGH_TEST_PG`, or
/// 127.0.0.1:5432), in a schema of the test's own.
#[test]
fn acknowledged_writes_survive_kill_9_on_postgresql() {
    let url = std::env::var("BOROUGH_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into());
    let schema = format!("borough_test_crash_{}", std::process::id());
    let sql = |sql: String| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect to PostgreSQL");
            tokio::spawn(conn);
            client.batch_execute(&sql).await.expect("sql");
        });
    };
    sql(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
    let dir = tempfile::tempdir().unwrap();
    writes_survive_kill_9(dir.path(), &["--store", &url, "--pg-schema", &schema]);
    sql(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
}

#[test]
fn sigterm_shuts_down_cleanly_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let mut server = start(dir.path(), &[]);
    let r = rt
        .block_on(
            client
                .post(format!("{}/ngsi-ld/v1/entities", server.base))
                .json(&json!({"id": "urn:ngsi-ld:T:1", "type": "T", "p": 1}))
                .send(),
        )
        .unwrap();
    assert_eq!(r.status(), 201);
    let health: Value = rt
        .block_on(async {
            client
                .get(format!("{}/health", server.base))
                .send()
                .await?
                .json()
                .await
        })
        .unwrap();
    assert_eq!(health["status"], "ok");
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "borough exits 0 on SIGTERM, got {exit}");

    let server = start(dir.path(), &[]);
    let r = rt
        .block_on(
            client
                .get(format!(
                    "{}/ngsi-ld/v1/entities/urn:ngsi-ld:T:1",
                    server.base
                ))
                .send(),
        )
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(server);
}
