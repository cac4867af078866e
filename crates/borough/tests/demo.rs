//! The demo and the simulator, driven as a user would: real processes, real HTTP.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `borough ARGS`, returning the process and its stdout lines up to one containing `until`.
fn start(args: &[&str], until: &str) -> (Proc, Vec<String>) {
    // Owned by the guard at once, so the process is reaped on every path.
    let mut proc = Proc(
        Command::new(env!("CARGO_BIN_EXE_borough"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start borough"),
    );
    let out = proc.0.stdout.take().expect("stdout");
    let mut lines = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line.expect("read stdout");
        let done = line.contains(until);
        lines.push(line);
        if done {
            return (proc, lines);
        }
    }
    panic!("borough exited before printing '{until}': {lines:?}");
}

fn base(lines: &[String]) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("listening on "))
        .expect("a listening line")
        .trim()
        .to_string()
}

fn get(url: &str) -> (u16, reqwest::header::HeaderMap, Value) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = reqwest::get(url).await.expect("GET");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    })
}

#[test]
fn demo_comes_up_with_a_city_and_stops_cleanly() {
    let (mut demo, lines) = start(
        &[
            "demo",
            "--http",
            "127.0.0.1:0",
            "--devices",
            "300",
            "--rate",
            "50",
        ],
        "ready:",
    );
    let base = base(&lines);
    let (status, _, health) = get(&format!("{base}/health"));
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    let (_, _, types) = get(&format!("{base}/ngsi-ld/v1/types"));
    let types: Vec<&str> = types["typeList"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for t in [
        "ParkingSpot",
        "Streetlight",
        "AirQualityObserved",
        "ElectricityMeter",
        "WasteContainer",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    let (_, headers, spots) = get(&format!(
        "{base}/ngsi-ld/v1/entities?type=ParkingSpot&count=true&limit=5"
    ));
    assert_eq!(spots.as_array().unwrap().len(), 5);
    let count: usize = headers["ngsild-results-count"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(count > 50, "{count} parking spots");
    let (_, _, meters) = get(&format!(
        "{base}/ngsi-ld/v1/entities?type=ElectricityMeter&limit=1"
    ));
    assert_eq!(meters[0]["activePower"]["unitCode"], "KWT");
    // A new city comes with a day of history, loaded through the bulk import.
    let (status, _, history) = get(&format!(
        "{base}/ngsi-ld/v1/temporal/entities/{}?attrs=activePower&options=temporalValues",
        meters[0]["id"].as_str().unwrap()
    ));
    assert_eq!(status, 200, "{history}");
    let readings = history["activePower"]["values"].as_array().unwrap().len();
    assert!(
        (95..=110).contains(&readings),
        "{readings} readings in a day of 15-minute history"
    );

    // Live measurements arrive: some entity's observation time moves on.
    let first = meters[0]["activePower"]["observedAt"].clone();
    let id = meters[0]["id"].as_str().unwrap().to_string();
    let mut moved = false;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(250));
        let (_, _, e) = get(&format!("{base}/ngsi-ld/v1/entities/{id}"));
        if e["activePower"]["observedAt"] != first {
            moved = true;
            break;
        }
    }
    assert!(moved, "no live measurement reached {id} in 10 s");

    let status = Command::new("kill")
        .args(["-INT", &demo.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = demo.0.wait().unwrap();
    assert!(exit.success(), "demo exits 0 on Ctrl-C, got {exit}");
}

#[test]
fn simulate_provisions_and_streams_against_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, lines) = start(
        &[
            "serve",
            "--auth",
            "off",
            "--mqtt",
            "off",
            "--http",
            "127.0.0.1:0",
            "--log-level",
            "warn",
            "--data",
            dir.path().to_str().unwrap(),
        ],
        "listening on",
    );
    let base = base(&lines);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "simulate",
            "--target",
            &base,
            "--devices",
            "120",
            "--quiet",
            "--tenant",
            "simcity",
        ];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_borough"))
            .args(&args)
            .output()
            .unwrap()
    };
    let out = run(&["--duration", "2s", "--rate", "40", "--history", "2h"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("120 created"), "{text}");
    assert!(text.contains("0 failed"), "{text}");
    assert!(
        text.contains("loaded") && text.contains("historic points"),
        "{text}"
    );
    // Run again with the same seed: the city is already there.
    let out = run(&["--duration", "0s"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 created, 120 already there"), "{text}");
    assert!(
        !text.contains("historic points"),
        "history is loaded for a new city only: {text}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let count = rt.block_on(async {
        let r = reqwest::Client::new()
            .get(format!(
                "{base}/ngsi-ld/v1/entities?type=Streetlight,ParkingSpot&count=true&limit=1"
            ))
            .header("NGSILD-Tenant", "simcity")
            .send()
            .await
            .unwrap();
        r.headers()["ngsild-results-count"]
            .to_str()
            .unwrap()
            .parse::<usize>()
            .unwrap()
    });
    assert!(count > 30, "{count}");
}

#[test]
fn bad_flags_and_unreachable_targets_give_one_line_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_borough"))
        .args([
            "simulate",
            "--target",
            "http://127.0.0.1:1",
            "--devices",
            "5",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_borough"))
        .args(["simulate", "--duration", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a duration"));
}
