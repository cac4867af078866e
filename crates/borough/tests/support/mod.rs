//! The real `borough serve`, started for the tests that drive it over the
//! network, and what those tests share: a blocking API client, free ports
//! and Mosquitto brokers of their own.

#![allow(dead_code)]

pub mod receiver;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server; killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    /// The embedded MQTT broker's port, when `extra` asked for it.
    pub mqtt_port: u16,
    /// The operator key the server printed (access control on, first start).
    pub operator_key: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `borough serve` on a free port with its data in `data`, plus `extra`
/// flags. The device broker stays off unless `extra` names `--mqtt` or
/// `--mqtt-broker`: port 1883 is another broker's on this machine. The
/// server may connect to loopback (`--allow-outbound loopback`), where the
/// tests' receivers and brokers are, unless `extra` names `--allow-outbound`.
pub fn start(data: &Path, extra: &[&str]) -> Server {
    let names_outbound = extra.iter().any(|a| a.starts_with("--allow-outbound"));
    if names_outbound {
        return launch(data, extra);
    }
    let mut with_loopback = vec!["--allow-outbound", "loopback"];
    with_loopback.extend(extra);
    launch(data, &with_loopback)
}

/// Starts `borough serve` as [`start`] does, but without `--allow-outbound`:
/// it may connect to public addresses only.
pub fn start_public_only(data: &Path, extra: &[&str]) -> Server {
    launch(data, extra)
}

fn launch(data: &Path, extra: &[&str]) -> Server {
    let names_mqtt = extra
        .iter()
        .any(|a| *a == "--mqtt" || a.starts_with("--mqtt-broker"));
    let mut args = vec!["serve", "--http", "127.0.0.1:0", "--log-level", "error"];
    if !names_mqtt {
        args.extend(["--mqtt", "off"]);
    }
    // The tests of other features run without access control, unless they
    // ask for it (`--auth on`): access has tests of its own.
    if !extra.iter().any(|a| a.starts_with("--auth")) {
        args.extend(["--auth", "off"]);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_borough"))
        .args(&args)
        .arg("--data")
        .arg(data)
        .args(extra)
        .env_remove("BOROUGH_ALLOW_OUTBOUND")
        .env_remove("BOROUGH_AUTH")
        .env_remove("BOROUGH_OPERATOR_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start borough");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let mut operator_key = None;
    // Notices (access control off, a new operator key) come before the address.
    let base = loop {
        line.clear();
        let n = out.read_line(&mut line).expect("the listening line");
        assert!(n > 0, "borough stopped before listening");
        if let Some(rest) = line
            .trim()
            .strip_prefix("operator key (shown once; keep it safe): ")
        {
            operator_key = rest.split_whitespace().next().map(str::to_string);
            continue;
        }
        if line.starts_with("access control is OFF") {
            continue;
        }
        break line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected line from borough: {line:?}"))
            .to_string();
    };
    let embedded_broker = names_mqtt
        && !extra.iter().any(|a| a.starts_with("--mqtt-broker"))
        && !extra.windows(2).any(|w| w == ["--mqtt", "off"]);
    let mut mqtt_port = 0;
    if embedded_broker {
        line.clear();
        out.read_line(&mut line).expect("the mqtt line");
        mqtt_port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("mqtt listening on ADDR");
    }
    Server {
        child,
        base,
        mqtt_port,
        operator_key,
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A blocking client of a server's API.
pub struct Client {
    pub http: reqwest::blocking::Client,
    pub base: String,
}

/// A response: the status, the headers, and the body as JSON (a string
/// when it is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Client {
    pub fn new(base: &str) -> Self {
        Self {
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            base: base.to_string(),
        }
    }

    /// `method path` with `key` (an API key or a token) as the bearer
    /// credential, `tenant` as `NGSILD-Tenant`, and `body` as JSON.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        tenant: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut req = self.http.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", self.base),
        );
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(t) = tenant {
            req = req.header("NGSILD-Tenant", t);
        }
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let r = req.send().expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        // A live stream (the dashboard's events) never ends: its status is the answer.
        let streaming = headers
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let text = if streaming {
            String::new()
        } else {
            r.text().unwrap_or_default()
        };
        Answer {
            status,
            headers,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }

    pub fn get(&self, path: &str, key: &str, tenant: Option<&str>) -> Answer {
        self.call("GET", path, Some(key), tenant, None)
    }

    pub fn post(&self, path: &str, key: &str, tenant: Option<&str>, body: Value) -> Answer {
        self.call("POST", path, Some(key), tenant, Some(body))
    }
}

/// A Mosquitto of a test's own (Debian's mosquitto package); killed when
/// dropped, its folder removed after.
pub struct Mosquitto {
    child: Child,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto with `conf`, written to `mosquitto.conf` in `dir`
    /// beside the files it names, once `port` (one of its listeners)
    /// accepts connections.
    pub fn start(dir: tempfile::TempDir, conf: &str, port: u16) -> Mosquitto {
        let d = dir.path();
        std::fs::write(d.join("mosquitto.conf"), conf).unwrap();
        // Started as root, Mosquitto drops to its own user, which must read these.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for entry in std::fs::read_dir(d).unwrap() {
            let path = entry.unwrap().path();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(d.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian's package) must be installed");
        let broker = Mosquitto { child, dir };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        broker
    }

    /// The folder of its configuration.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
