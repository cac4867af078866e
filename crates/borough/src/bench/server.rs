//! The server under test: a `borough serve` child process on loopback with a
//! temporary data directory. Dropping a [`Server`] kills the child and removes
//! the directory, so every error path cleans up.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const READY_PREFIX: &str = "listening on http://";

pub struct Server {
    child: Child,
    addr: SocketAddr,
    last_stderr: Arc<Mutex<String>>,
    // Declared last: removed after `Drop::drop` has killed the child.
    _data: tempfile::TempDir,
}

/// Resident memory of the server, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// `VmRSS`: resident set size now, in kB.
    pub rss_kb: u64,
    /// `VmHWM`: peak resident set size so far, in kB.
    pub hwm_kb: u64,
}

impl Server {
    /// Starts `borough serve` (this same executable) and waits for its
    /// `listening on` line. `static_bytes` sizes the body of `GET
    /// /bench/static` (the HTTP-ceiling baseline); `None` leaves it off.
    pub fn spawn(static_bytes: Option<usize>, ready_timeout: Duration) -> Result<Server, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find the borough executable: {e}"))?;
        let data = tempfile::Builder::new()
            .prefix("borough-bench-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary data directory: {e}"))?;
        let mut command = Command::new(&exe);
        command
            .arg("serve")
            .args(["--http", "127.0.0.1:0", "--log-level", "warn"])
            .arg("--data")
            .arg(data.path());
        if let Some(bytes) = static_bytes {
            command.arg("--bench-static-bytes").arg(bytes.to_string());
        }
        let mut child = command
            // The server under test runs with its defaults, whatever this
            // shell's environment configures.
            .env_remove("BOROUGH_HTTP")
            .env_remove("BOROUGH_DATA")
            .env_remove("BOROUGH_LOG")
            .env_remove("BOROUGH_MAX_BODY_BYTES")
            .env_remove("BOROUGH_MAX_BATCH_BODY_BYTES")
            .env_remove("BOROUGH_CONTEXT_TIMEOUT_SECS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {} serve: {e}", exe.display()))?;

        let last_stderr = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let last = last_stderr.clone();
            std::thread::spawn(move || forward_stderr(stderr, &last));
        }
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || watch_stdout(stdout, &tx));
        }

        // From here on, `server` owns the child: early returns kill it.
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            last_stderr,
            _data: data,
        };
        match rx.recv_timeout(ready_timeout) {
            Ok(addr) => {
                server.addr = addr;
                Ok(server)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "the server did not print its 'listening on' line within {} s",
                ready_timeout.as_secs()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Stdout closed without the line: the server is gone. Give the
                // stderr thread a moment to catch its last words.
                std::thread::sleep(Duration::from_millis(100));
                let status = match server.child.try_wait() {
                    Ok(Some(s)) => s.to_string(),
                    _ => "no 'listening on' line".to_string(),
                };
                Err(format!(
                    "the server stopped before listening ({status}){}",
                    server.last_words()
                ))
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Fails if the child has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "the server exited unexpectedly ({status}){}",
                self.last_words()
            )),
            Err(e) => Err(format!("cannot check the server process: {e}")),
        }
    }

    /// `VmRSS` and `VmHWM` of the child, or `None` where `/proc` cannot tell.
    pub fn memory(&self) -> Option<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        };
        Some(Memory {
            rss_kb: field("VmRSS:")?,
            hwm_kb: field("VmHWM:")?,
        })
    }

    fn last_words(&self) -> String {
        let last = match self.last_stderr.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if last.is_empty() {
            String::new()
        } else {
            format!(": {last}")
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Errors mean it is already gone; either way, reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends the address of the `listening on` line, then drains stdout until the
/// child closes it.
fn watch_stdout(stdout: std::process::ChildStdout, tx: &mpsc::Sender<SocketAddr>) {
    let mut announced = false;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if announced {
            continue;
        }
        if let Some(addr) = line
            .trim()
            .strip_prefix(READY_PREFIX)
            .and_then(|a| a.parse().ok())
        {
            announced = true;
            let _ = tx.send(addr);
        }
    }
}

/// Forwards the server's log lines to our stderr and remembers the last one.
fn forward_stderr(stderr: std::process::ChildStderr, last: &Mutex<String>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let _ = writeln!(std::io::stderr(), "[server] {line}");
        let line = strip_ansi(&line);
        // Keep the last line that reads like an error, else the last line.
        let is_error = line.to_ascii_lowercase().contains("error");
        if !line.trim().is_empty() {
            let mut l = match last.lock() {
                Ok(l) => l,
                Err(p) => p.into_inner(),
            };
            if is_error || !l.to_ascii_lowercase().contains("error") {
                *l = line.trim().to_string();
            }
        }
    }
}

/// Drops ANSI escape sequences (log colours) so error messages stay plain.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC '[' parameters... final byte in '@'..='~'.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
