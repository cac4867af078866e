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
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `borough serve` on a free port with its data in `data`, plus `extra`
/// flags. The device broker stays off unless `extra` names `--mqtt` or
/// `--mqtt-broker`: port 1883 is another broker's on this machine.
pub fn start(data: &Path, extra: &[&str]) -> Server {
    let names_mqtt = extra
        .iter()
        .any(|a| *a == "--mqtt" || a.starts_with("--mqtt-broker"));
    let mut args = vec!["serve", "--http", "127.0.0.1:0", "--log-level", "error"];
    if !names_mqtt {
        args.extend(["--mqtt", "off"]);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_borough"))
        .args(&args)
        .arg("--data")
        .arg(data)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start borough");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("the listening line");
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from borough: {line:?}"))
        .to_string();
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
    }
}
