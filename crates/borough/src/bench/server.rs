//! The server under test: a `borough serve` child process on loopback with a
//! temporary data directory. Dropping a [`Server`] kills the child and removes
//! the directory, so every error path cleans up. [`Server::restart`] stops
//! the child and starts a new one on the same directory (startup timing).
//! It runs without access control unless started with access flags
//! ([`Server::spawn_with`], `bench --auth`).

use super::load::Endpoint;
use hyper::header::HeaderMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const READY_PREFIX: &str = "listening on http://";
/// What the first start with access control prints before its address.
const OPERATOR_KEY_PREFIX: &str = "operator key (shown once; keep it safe): ";
/// How often [`Server::restart`] checks whether the stopped child has exited.
const STOP_POLL: Duration = Duration::from_millis(10);

pub struct Server {
    child: Child,
    addr: SocketAddr,
    last_stderr: Arc<Mutex<String>>,
    /// `--bench-static-bytes` of the child, kept for [`Server::restart`].
    static_bytes: Option<usize>,
    /// Access-control flags of the child (empty: `--auth off`), kept for
    /// [`Server::restart`].
    access: Vec<String>,
    /// The operator key the first start printed (access control on).
    operator_key: Option<String>,
    /// Headers the load generator sends with every request (see [`Server::endpoint`]).
    headers: HeaderMap,
    // Declared last: removed after `Drop::drop` has killed the child.
    data: tempfile::TempDir,
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
        Server::spawn_with(static_bytes, &[], ready_timeout)
    }

    /// [`Server::spawn`] with access-control flags (`--auth on`, ...) in
    /// place of `--auth off`.
    pub fn spawn_with(
        static_bytes: Option<usize>,
        access: &[String],
        ready_timeout: Duration,
    ) -> Result<Server, String> {
        let data = tempfile::Builder::new()
            .prefix("borough-bench-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary data directory: {e}"))?;
        let started = start_child(data.path(), static_bytes, access)?;
        // From here on, `server` owns the child: early returns kill it.
        let mut server = Server {
            child: started.child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            last_stderr: started.last_stderr,
            static_bytes,
            access: access.to_vec(),
            operator_key: None,
            headers: HeaderMap::new(),
            data,
        };
        server.wait_ready(&started.ready, ready_timeout)?;
        Ok(server)
    }

    /// Stops the server (`SIGTERM`, then `SIGKILL` if it has not exited
    /// within `grace`) and starts it again on the same data directory,
    /// waiting for its `listening on` line. The new child has a new address.
    pub fn restart(&mut self, grace: Duration, ready_timeout: Duration) -> Result<Restart, String> {
        let stop_started = Instant::now();
        let graceful = self.stop(grace)?;
        let stop = stop_started.elapsed();

        let spawned_at = Instant::now();
        let started = start_child(self.data.path(), self.static_bytes, &self.access)?;
        // Own the new child before waiting, so that every error path kills it.
        self.child = started.child;
        self.last_stderr = started.last_stderr;
        self.wait_ready(&started.ready, ready_timeout)?;
        Ok(Restart {
            stop,
            graceful,
            ready: spawned_at.elapsed(),
        })
    }

    /// Sends `SIGTERM` and waits up to `grace` for the child to exit; kills
    /// it otherwise. `true` when it exited by itself, with success.
    fn stop(&mut self, grace: Duration) -> Result<bool, String> {
        if let Some(status) = self
            .child
            .try_wait()
            .map_err(|e| format!("cannot check the server process: {e}"))?
        {
            return Err(format!(
                "the server exited before it was asked to stop ({status}){}",
                self.last_words()
            ));
        }
        let pid = self.child.id().to_string();
        // No signal API in std: `kill -TERM`. If that cannot run, SIGKILL below.
        let termed = Command::new("kill")
            .args(["-TERM", &pid])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if termed {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                match self.child.try_wait() {
                    Ok(Some(status)) => return Ok(status.success()),
                    Ok(None) => std::thread::sleep(STOP_POLL),
                    Err(e) => return Err(format!("cannot wait for the server to stop: {e}")),
                }
            }
        }
        self.child
            .kill()
            .map_err(|e| format!("cannot kill the server: {e}"))?;
        self.child
            .wait()
            .map_err(|e| format!("cannot wait for the killed server: {e}"))?;
        Ok(false)
    }

    /// Waits for the address of the `listening on` line of the current child.
    fn wait_ready(
        &mut self,
        ready: &mpsc::Receiver<Ready>,
        ready_timeout: Duration,
    ) -> Result<(), String> {
        match ready.recv_timeout(ready_timeout) {
            Ok(ready) => {
                self.addr = ready.addr;
                // A restart prints no key: the first one still holds.
                if ready.operator_key.is_some() {
                    self.operator_key = ready.operator_key;
                }
                Ok(())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "the server did not print its 'listening on' line within {} s",
                ready_timeout.as_secs()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Stdout closed without the line: the server is gone. Give the
                // stderr thread a moment to catch its last words.
                std::thread::sleep(Duration::from_millis(100));
                let status = match self.child.try_wait() {
                    Ok(Some(s)) => s.to_string(),
                    _ => "no 'listening on' line".to_string(),
                };
                Err(format!(
                    "the server stopped before listening ({status}){}",
                    self.last_words()
                ))
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id of the child (its CPU time is in `/proc/<pid>/stat`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's address with the headers set by [`Server::set_headers`]:
    /// where the phases send their requests.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            addr: self.addr,
            headers: self.headers.clone(),
        }
    }

    /// Headers for every request of the phases to come (tenant, credential).
    pub fn set_headers(&mut self, headers: HeaderMap) {
        self.headers = headers;
    }

    /// The operator key printed by the first start with access control on.
    pub fn operator_key(&self) -> Option<&str> {
        self.operator_key.as_deref()
    }

    /// The server's data directory (its `--data`).
    pub fn data_dir(&self) -> &Path {
        self.data.path()
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

/// What [`Server::restart`] measured.
#[derive(Clone, Copy, Debug)]
pub struct Restart {
    /// From `SIGTERM` to the exit of the old child.
    pub stop: Duration,
    /// Whether the old child exited by itself, with success, within the grace period.
    pub graceful: bool,
    /// From spawning the new child to its `listening on` line: opening the
    /// store, loading the entities and rebuilding the indexes.
    pub ready: Duration,
}

/// What a child printed by the time it listens.
struct Ready {
    addr: SocketAddr,
    operator_key: Option<String>,
}

/// A child just spawned, with the receiver of its `listening on` line.
struct Started {
    child: Child,
    last_stderr: Arc<Mutex<String>>,
    ready: mpsc::Receiver<Ready>,
}

/// Spawns `borough serve` on `data` with threads that watch its output.
/// `access` replaces `--auth off` when not empty.
fn start_child(
    data: &Path,
    static_bytes: Option<usize>,
    access: &[String],
) -> Result<Started, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the borough executable: {e}"))?;
    let mut command = Command::new(&exe);
    command
        .arg("serve")
        .args([
            "--http",
            "127.0.0.1:0",
            "--log-level",
            "warn",
            "--mqtt",
            "off",
            // The notification receiver runs on loopback.
            "--allow-outbound",
            "loopback",
        ])
        .arg("--data")
        .arg(data);
    if access.is_empty() {
        // The baselines run without access control; `bench entities
        // --auth` and `bench query --auth` measure it.
        command.args(["--auth", "off"]);
    } else {
        command.args(access);
    }
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
        .env_remove("BOROUGH_AUTH")
        .env_remove("BOROUGH_OPERATOR_KEY")
        .env_remove("BOROUGH_OPERATOR_KEY_FILE")
        .env_remove("BOROUGH_KEY_RATE_LIMIT")
        .env_remove("BOROUGH_OIDC_ISSUER")
        .env_remove("BOROUGH_OIDC_AUDIENCE")
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
    let (tx, ready) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || watch_stdout(stdout, &tx));
    }
    Ok(Started {
        child,
        last_stderr,
        ready,
    })
}

impl Drop for Server {
    fn drop(&mut self) {
        // Errors mean it is already gone; either way, reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends the address of the `listening on` line (with the operator key
/// printed before it, if any), then drains stdout until the child closes it.
fn watch_stdout(stdout: std::process::ChildStdout, tx: &mpsc::Sender<Ready>) {
    let mut announced = false;
    let mut operator_key = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if announced {
            continue;
        }
        let line = line.trim();
        if let Some(rest) = line.strip_prefix(OPERATOR_KEY_PREFIX) {
            operator_key = rest.split_whitespace().next().map(str::to_string);
        } else if let Some(addr) = line.strip_prefix(READY_PREFIX).and_then(|a| a.parse().ok()) {
            announced = true;
            let _ = tx.send(Ready {
                addr,
                operator_key: operator_key.take(),
            });
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
