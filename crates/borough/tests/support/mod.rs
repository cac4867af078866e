//! The real `borough serve`, started for the tests that drive it over the network.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

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
