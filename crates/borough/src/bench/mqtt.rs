//! Scenario `mqtt`: device measurements over MQTT, end to end.
//!
//! N simulated devices (10,000; 200 in quick runs) are registered through
//! `POST /api/v1/devices/import`, each connects to the embedded broker with
//! its own id and token, and publishes readings of three attributes as fast
//! as the machine allows for a fixed time: first at QoS 0, then at QoS 1
//! (a window of [`QOS1_WINDOW`] unacknowledged publishes per device).
//!
//! Counted, not assumed: the rate is the growth of the server's
//! `borough_device_readings_total` (readings committed to entity state)
//! from the start of a phase until the server has drained what was sent,
//! divided by that time. Afterwards a sample of entities is read back and
//! must show the last value its device sent. Latency is publish → visible:
//! probe devices (not part of the load) publish a marker value at QoS 0 and
//! poll `GET /entities/{id}` until it shows.
//!
//! Baseline, same run: the same publisher load to the local Mosquitto
//! (anonymous, BOROUGH_BENCH_MQTT, default 127.0.0.1:1883) with one
//! subscriber that only counts the messages: the raw broker ceiling.

use super::common::{Options, RunInfo, load_runtime};
use super::load::{Summary, micros, ms};
use super::report::{Target, publish, ratio, round_to, targets_json, thousands};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const QOS1_WINDOW: usize = 10;
const PROBES: usize = 8;
const SAMPLE: usize = 200;
/// Connections opened at once while connecting the devices.
const CONNECT_PARALLEL: usize = 256;

struct Child_ {
    child: Child,
    http: SocketAddr,
    mqtt: SocketAddr,
    _data: tempfile::TempDir,
}

impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Result<Child_, String> {
    let data = tempfile::Builder::new()
        .prefix("borough-bench-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["serve", "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
        .args([
            "--log-level",
            "warn",
            "--device-rate-limit",
            "1000000",
            "--auth",
            "off",
        ])
        .arg("--data")
        .arg(data.path())
        .env_remove("BOROUGH_MQTT_BROKER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start borough serve: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut next_addr = |prefix: &str| -> Result<SocketAddr, String> {
        // Notices (access control is off) come before the addresses.
        let line = loop {
            let line = lines
                .next()
                .ok_or("the server stopped before listening")?
                .map_err(|e| e.to_string())?;
            if !line.starts_with("access control is OFF") {
                break line;
            }
        };
        line.trim()
            .strip_prefix(prefix)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("unexpected line from the server: {line}"))
    };
    let http = next_addr("listening on http://");
    let mqtt = next_addr("mqtt listening on ");
    let (http, mqtt) = match (http, mqtt) {
        (Ok(h), Ok(m)) => (h, m),
        (Err(e), _) | (_, Err(e)) => {
            let _ = child.kill();
            return Err(e);
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(Child_ {
        child,
        http,
        mqtt,
        _data: data,
    })
}

async fn connect(
    addr: SocketAddr,
    client_id: String,
    login: Option<(String, String)>,
) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    let mut c = v4::Connect::new(client_id);
    c.keep_alive = 0;
    if let Some((u, p)) = login {
        c.set_login(u, p);
    }
    let mut buf = BytesMut::new();
    v4::Packet::Connect(c)
        .write(&mut buf, 1 << 16)
        .map_err(|e| e.to_string())?;
    s.write_all(&buf).await.map_err(|e| e.to_string())?;
    buf.clear();
    loop {
        match v4::Packet::read(&mut buf, 1 << 16) {
            Ok(v4::Packet::ConnAck(a)) if a.code == v4::ConnectReturnCode::Success => return Ok(s),
            Ok(p) => return Err(format!("connection refused: {p:?}")),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        if s.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed before CONNACK".into());
        }
    }
}

/// One device's publishing loop until `stop`; returns readings sent (and acknowledged at QoS 1).
async fn publish_loop(
    mut s: TcpStream,
    topic: String,
    qos1: bool,
    pace: Option<Duration>,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
) -> Result<u64, String> {
    let mut next = Instant::now();
    if let Some(p) = pace {
        // Spread the devices over one interval.
        let h = topic
            .bytes()
            .fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
        next += p.mul_f64((h % 1000) as f64 / 1000.0);
    }
    let mut seq = last.load(Ordering::Relaxed);
    let mut out = BytesMut::with_capacity(2048);
    let mut inb = BytesMut::with_capacity(1024);
    let qos = if qos1 {
        rumqttc::QoS::AtLeastOnce
    } else {
        rumqttc::QoS::AtMostOnce
    };
    let mut sent = 0u64;
    if pace.is_some() {
        tokio::time::sleep_until(next).await;
    }
    while !stop.load(Ordering::Relaxed) {
        out.clear();
        let burst = if qos1 { QOS1_WINDOW } else { 1 };
        for i in 0..burst {
            seq += 1;
            let payload = format!("{{\"a\":{seq},\"b\":{},\"c\":21.5}}", seq as f64 * 0.5);
            let mut p = v4::Publish::new(topic.as_str(), qos, payload);
            p.pkid = if qos1 { (i + 1) as u16 } else { 0 };
            v4::Packet::Publish(p)
                .write(&mut out, 1 << 16)
                .map_err(|e| e.to_string())?;
        }
        s.write_all(&out).await.map_err(|e| e.to_string())?;
        if qos1 {
            let mut acked = 0;
            while acked < burst {
                match v4::Packet::read(&mut inb, 1 << 16) {
                    Ok(v4::Packet::PubAck(_)) => acked += 1,
                    Ok(_) => {}
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                        if s.read_buf(&mut inb).await.map_err(|e| e.to_string())? == 0 {
                            return Err("closed".into());
                        }
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        } else if pace.is_none() {
            tokio::task::yield_now().await;
        }
        if let Some(p) = pace {
            next += p;
            tokio::time::sleep_until(next).await;
        }
        sent += burst as u64;
        last.store(seq, Ordering::Relaxed);
    }
    Ok(sent)
}

/// Connects every device (a few hundred at a time).
async fn connect_all(
    addr: SocketAddr,
    devices: &[(String, Option<String>)],
) -> Result<Vec<TcpStream>, String> {
    let mut out = Vec::with_capacity(devices.len());
    for chunk in devices.chunks(CONNECT_PARALLEL) {
        let mut tasks = Vec::new();
        for (id, token) in chunk {
            let login = token.clone().map(|t| (id.clone(), t));
            tasks.push(tokio::spawn(connect(addr, format!("bench-{id}"), login)));
        }
        for t in tasks {
            out.push(t.await.map_err(|e| e.to_string())??);
        }
    }
    Ok(out)
}

/// Runs the publishers for `duration` (each device every `pace`, or flat
/// out); returns the readings sent.
async fn run_load(
    conns: Vec<TcpStream>,
    topics: Vec<String>,
    qos1: bool,
    pace: Option<Duration>,
    duration: Duration,
    last: &[Arc<AtomicU64>],
) -> Result<u64, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for ((s, t), l) in conns.into_iter().zip(topics).zip(last) {
        tasks.push(tokio::spawn(publish_loop(
            s,
            t,
            qos1,
            pace,
            stop.clone(),
            l.clone(),
        )));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for t in tasks {
        sent += t.await.map_err(|e| e.to_string())??;
    }
    Ok(sent)
}

async fn readings_total(client: &reqwest::Client, base: &str) -> Result<u64, String> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("borough_device_readings_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Waits until the counter stops growing (the server has drained); returns its value.
async fn drained(client: &reqwest::Client, base: &str, target: u64) -> Result<u64, String> {
    let mut last = readings_total(client, base).await?;
    let mut still = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = readings_total(client, base).await?;
        if now >= target {
            return Ok(now);
        }
        still = if now == last { still + 1 } else { 0 };
        if still >= 20 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// Probe devices: publish a marker, poll the entity until it shows; latencies in µs.
async fn probe(
    mqtt: SocketAddr,
    base: String,
    probes: Vec<(String, String)>,
    stop: Arc<AtomicBool>,
) -> Result<Vec<u64>, String> {
    let client = reqwest::Client::new();
    let mut conns = Vec::new();
    for (id, token) in &probes {
        conns.push(
            connect(
                mqtt,
                format!("probe-{id}"),
                Some((id.clone(), token.clone())),
            )
            .await?,
        );
    }
    let mut lat = Vec::new();
    let mut marker = 1_000_000_000u64;
    'outer: while !stop.load(Ordering::Relaxed) {
        for ((id, _), s) in probes.iter().zip(conns.iter_mut()) {
            marker += 1;
            let mut out = BytesMut::new();
            let p = v4::Publish::new(
                format!("default/devices/{id}/attrs"),
                rumqttc::QoS::AtMostOnce,
                format!("{{\"a\":{marker},\"b\":0,\"c\":0}}"),
            );
            v4::Packet::Publish(p)
                .write(&mut out, 1 << 16)
                .map_err(|e| e.to_string())?;
            let t0 = Instant::now();
            s.write_all(&out).await.map_err(|e| e.to_string())?;
            let url = format!(
                "{base}/ngsi-ld/v1/entities/urn:ngsi-ld:Meter:{id}?options=keyValues&attrs=a"
            );
            loop {
                let v: Value = match client.get(&url).send().await {
                    Ok(r) => r.json().await.unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                if v["a"] == json!(marker) {
                    lat.push(micros(t0.elapsed()));
                    break;
                }
                // A probe under way finishes even after the load stops: under a
                // saturating load its latency is the backlog's.
                if t0.elapsed() > Duration::from_secs(10) {
                    continue 'outer;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(lat)
}

struct PhaseResult {
    name: &'static str,
    sent: u64,
    counted: u64,
    elapsed: Duration,
    latency: Summary,
}

impl PhaseResult {
    fn rate(&self) -> f64 {
        ratio(self.counted as f64, self.elapsed.as_secs_f64())
    }
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "published": self.sent,
            "counted": self.counted,
            "elapsed_s": round_to(self.elapsed.as_secs_f64(), 1000.0),
            "per_second": round_to(self.rate(), 1.0),
            "latency": self.latency.to_json(),
        })
    }
}

async fn borough_phase(
    server: &Child_,
    devices: &[(String, Option<String>)],
    probes: &[(String, String)],
    qos1: bool,
    pace: Option<Duration>,
    duration: Duration,
    last: &[Arc<AtomicU64>],
) -> Result<PhaseResult, String> {
    let base = format!("http://{}", server.http);
    let client = reqwest::Client::new();
    let conns = connect_all(server.mqtt, devices).await?;
    let topics = devices
        .iter()
        .map(|(id, _)| format!("default/devices/{id}/attrs"))
        .collect();
    let before = readings_total(&client, &base).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let prober = tokio::spawn(probe(
        server.mqtt,
        base.clone(),
        probes.to_vec(),
        stop.clone(),
    ));
    let start = Instant::now();
    let sent = run_load(conns, topics, qos1, pace, duration, last).await?;
    stop.store(true, Ordering::Relaxed);
    let mut lat = prober.await.map_err(|e| e.to_string())??;
    let probe_readings = lat.len() as u64 + PROBES as u64;
    let after = drained(&client, &base, before + sent).await?;
    let elapsed = start.elapsed();
    let counted = after.saturating_sub(before).min(sent + probe_readings);
    let counted = counted.saturating_sub(probe_readings.min(counted.saturating_sub(sent)));
    Ok(PhaseResult {
        name: match (qos1, pace.is_some()) {
            (true, _) => "borough QoS 1",
            (false, false) => "borough QoS 0",
            (false, true) => "borough QoS 0, half rate",
        },
        sent,
        counted,
        elapsed,
        latency: Summary::of(&mut lat),
    })
}

/// The same publishers against Mosquitto, one subscriber counting.
async fn mosquitto_phase(
    addr: SocketAddr,
    n: usize,
    qos1: bool,
    duration: Duration,
) -> Result<PhaseResult, String> {
    let prefix = format!("bench{}", std::process::id());
    let mut sub = connect(addr, format!("{prefix}-counter"), None).await?;
    let mut buf = BytesMut::new();
    let mut subscribe = v4::Subscribe::new(
        format!("{prefix}/devices/+/attrs"),
        rumqttc::QoS::AtMostOnce,
    );
    subscribe.pkid = 1;
    v4::Packet::Subscribe(subscribe)
        .write(&mut buf, 1 << 16)
        .map_err(|e| e.to_string())?;
    sub.write_all(&buf).await.map_err(|e| e.to_string())?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let reader = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(1 << 20);
        loop {
            match v4::Packet::read(&mut buf, 1 << 20) {
                Ok(v4::Packet::Publish(_)) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    match sub.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
                Err(_) => return,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let devices: Vec<(String, Option<String>)> =
        (0..n).map(|i| (format!("{prefix}-d{i}"), None)).collect();
    let conns = connect_all(addr, &devices).await?;
    let topics = (0..n)
        .map(|i| format!("{prefix}/devices/d{i}/attrs"))
        .collect();
    let last: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let start = Instant::now();
    let sent = run_load(conns, topics, qos1, None, duration, &last).await?;
    // Drain: until the count stops growing.
    let mut prev = received.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = received.load(Ordering::Relaxed);
        if now == prev || now >= sent {
            break;
        }
        prev = now;
    }
    let elapsed = start.elapsed();
    reader.abort();
    Ok(PhaseResult {
        name: if qos1 {
            "mosquitto QoS 1"
        } else {
            "mosquitto QoS 0"
        },
        sent,
        counted: received.load(Ordering::Relaxed),
        elapsed,
        latency: Summary::default(),
    })
}

/// Reads back a sample of entities: each must show its device's last reading.
async fn verify(
    base: &str,
    devices: &[(String, Option<String>)],
    last: &[Arc<AtomicU64>],
) -> (usize, usize) {
    let client = reqwest::Client::new();
    let step = (devices.len() / SAMPLE).max(1);
    let (mut ok, mut checked) = (0, 0);
    for i in (0..devices.len()).step_by(step) {
        let url = format!(
            "{base}/ngsi-ld/v1/entities/urn:ngsi-ld:Meter:{}?options=keyValues&attrs=a",
            devices[i].0
        );
        let v: Value = match client.get(&url).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        checked += 1;
        if v["a"] == json!(last[i].load(Ordering::Relaxed)) {
            ok += 1;
        }
    }
    (ok, checked)
}

pub fn run(opts: &Options) -> Result<(), String> {
    let info = RunInfo::new("mqtt", opts.quick);
    let (n, duration) = if opts.quick {
        (200, Duration::from_secs(2))
    } else {
        (10_000, Duration::from_secs(10))
    };
    let mosquitto: SocketAddr = std::env::var("BOROUGH_BENCH_MQTT")
        .unwrap_or_else(|_| "127.0.0.1:1883".into())
        .parse()
        .map_err(|_| "BOROUGH_BENCH_MQTT must be HOST:PORT (an IP address)".to_string())?;
    let rt = load_runtime()?;
    let server = start_server()?;
    eprintln!(
        "server listening on http://{} and mqtt {}",
        server.http, server.mqtt
    );
    rt.block_on(async {
        let base = format!("http://{}", server.http);
        // Register the devices and the probes.
        let client = reqwest::Client::new();
        let mut tokens: Vec<(String, String)> = Vec::new();
        let ids: Vec<String> = (0..n)
            .map(|i| format!("m{i}"))
            .chain((0..PROBES).map(|i| format!("probe{i}")))
            .collect();
        for chunk in ids.chunks(5000) {
            let body: Vec<Value> = chunk
                .iter()
                .map(|id| json!({"id": id, "entityType": "Meter",
                    "attributes": [{"key": "a"}, {"key": "b"}, {"key": "c", "attribute": "temperature", "unitCode": "CEL"}]}))
                .collect();
            let r: Value = client
                .post(format!("{base}/api/v1/devices/import"))
                .json(&body)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            for d in r["created"].as_array().ok_or("the import failed")? {
                tokens.push((
                    d["id"].as_str().unwrap_or_default().to_string(),
                    d["token"].as_str().unwrap_or_default().to_string(),
                ));
            }
        }
        if tokens.len() != ids.len() {
            return Err(format!("only {} of {} devices were registered", tokens.len(), ids.len()));
        }
        let probes: Vec<(String, String)> = tokens.split_off(n);
        let devices: Vec<(String, Option<String>)> =
            tokens.into_iter().map(|(i, t)| (i, Some(t))).collect();
        let last: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let mut phases = Vec::new();
        for qos1 in [false, true] {
            eprintln!("borough, QoS {}: {n} devices for {duration:?}...", u8::from(qos1));
            phases.push(
                borough_phase(&server, &devices, &probes, qos1, None, duration, &last).await?,
            );
            // Sockets of the phase close when their tasks end; let the server see it.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Latency below saturation: the QoS 0 load paced at half the rate just measured.
        let half = phases[0].rate() / 2.0;
        let pace = Duration::from_secs_f64(n as f64 / half.max(1.0));
        eprintln!("borough, QoS 0 paced at {} readings/s...", thousands(half));
        phases.push(
            borough_phase(&server, &devices, &probes, false, Some(pace), duration, &last).await?,
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ok, checked) = verify(&base, &devices, &last).await;
        for qos1 in [false, true] {
            eprintln!("mosquitto at {mosquitto}, QoS {}...", u8::from(qos1));
            phases.push(
                mosquitto_phase(mosquitto, n, qos1, duration)
                    .await
                    .map_err(|e| format!("the Mosquitto baseline failed ({mosquitto}): {e}"))?,
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let q0 = phases[0].rate();
        let base_q0 = phases[3].rate();
        let targets = vec![
            Target::rate_at_least("QoS 0 end to end", q0, 100_000.0, "measurements/s"),
            Target::ratio_at_least("QoS 0 vs Mosquitto pub→sub", ratio(q0, base_q0), 1.0),
        ];
        let mut table = format!(
            "{}{n} devices, 3 attributes a reading, {}s a phase\n",
            info.title(),
            duration.as_secs()
        );
        table.push_str("| phase | published | counted | counted/s | p50 | p99 | vs Mosquitto (same QoS) |\n|---|---|---|---|---|---|---|\n");
        for (i, p) in phases.iter().enumerate() {
            let vs = match i {
                0 | 1 => format!("{:.2}x", ratio(p.rate(), phases[i + 3].rate())),
                2 => "(latency phase)".into(),
                _ => "baseline".into(),
            };
            let (p50, p99) = if p.latency.count > 0 {
                (
                    format!("{} ms", ms(p.latency.p50_us as f64)),
                    format!("{} ms", ms(p.latency.p99_us as f64)),
                )
            } else {
                ("-".into(), "-".into())
            };
            table.push_str(&format!(
                "| {} | {} | {} | {} | {p50} | {p99} | {vs} |\n",
                p.name,
                thousands(p.sent as f64),
                thousands(p.counted as f64),
                thousands(p.rate()),
            ));
        }
        table.push_str(&format!(
            "verified: {ok} of {checked} sampled entities show their device's last reading\n"
        ));
        table.push_str(&info.targets_section(
            &targets,
            "(counted = readings the server committed to entity state, from its own counter; Mosquitto counted = messages its one subscriber received)\n",
        ));
        let json = info.json(json!({
            "devices": n,
            "phase_seconds": duration.as_secs(),
            "phases": phases.iter().map(PhaseResult::to_json).collect::<Vec<_>>(),
            "verified": {"ok": ok, "checked": checked},
            "targets": targets_json(&targets),
        }));
        if ok != checked {
            publish(&table, &json, &opts.out)?;
            return Err(format!("{} sampled entities do not show their last reading", checked - ok));
        }
        publish(&table, &json, &opts.out)
    })
}
