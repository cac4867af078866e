//! Result records and their rendering: the phase table, the target table,
//! number formatting and the JSON file.

use super::load::{Summary, ms};
use super::server::Memory;
use serde_json::{Value, json};
use std::time::Duration;

/// The measurements of one phase.
pub struct Phase {
    pub name: &'static str,
    /// "entities/s" or "req/s".
    pub unit: &'static str,
    /// Entities written or requests completed.
    pub count: usize,
    pub elapsed: Duration,
    /// What one latency sample is: a batch, a transaction or a request.
    pub latency_of: &'static str,
    pub latency: Summary,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Server memory right after the phase (`None` for the PostgreSQL baseline).
    pub memory: Option<Memory>,
    /// Per-operation breakdown of the mixed phase: (name, count, latency).
    pub ops: Vec<(&'static str, usize, Summary)>,
}

impl Phase {
    pub fn throughput(&self) -> f64 {
        per_second(self.count, self.elapsed)
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "throughput": round_to(self.throughput(), 10.0),
            "unit": self.unit,
            "count": self.count,
            "elapsed_s": round_to(self.elapsed.as_secs_f64(), 1e3),
            "latency_of": self.latency_of,
            "latency": self.latency.to_json(),
            "errors": self.errors,
            "first_error": self.first_error,
            "server_memory": self.memory.map(|m| json!({"rss_kb": m.rss_kb, "hwm_kb": m.hwm_kb})),
        });
        if !self.ops.is_empty() {
            let ops: serde_json::Map<String, Value> = self
                .ops
                .iter()
                .map(|(name, count, summary)| {
                    let op = json!({
                        "count": count,
                        "throughput": round_to(per_second(*count, self.elapsed), 10.0),
                        "latency": summary.to_json(),
                    });
                    (name.to_string(), op)
                })
                .collect();
            v["ops"] = Value::Object(ops);
        }
        v
    }
}

pub fn per_second(count: usize, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// One target of the issue, compared with its measurement.
pub struct Target {
    pub name: String,
    pub actual: f64,
    pub actual_text: String,
    /// `true`: actual ≥ bound; `false`: actual < bound.
    pub at_least: bool,
    pub bound: f64,
    pub bound_text: String,
}

impl Target {
    pub fn met(&self) -> bool {
        if self.at_least {
            self.actual >= self.bound
        } else {
            self.actual < self.bound
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "actual": round_to(self.actual, 1e3),
            "comparison": if self.at_least { ">=" } else { "<" },
            "target": self.bound,
            "met": self.met(),
        })
    }
}

/// One line per phase (and per operation of a phase).
pub fn phase_table<'a>(phases: impl IntoIterator<Item = &'a Phase>) -> String {
    let mut out = format!(
        "{:<16} {:>20}   {:<12} {:>8} {:>8} {:>8} {:>7}  {}\n",
        "phase",
        "throughput",
        "latency of",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "server RSS / peak"
    );
    for p in phases {
        out.push_str(&row(
            p.name,
            p.throughput(),
            p.unit,
            p.latency_of,
            &p.latency,
            &p.errors.to_string(),
            &memory_text(p.memory),
        ));
        for (name, count, summary) in &p.ops {
            out.push_str(&row(
                &format!("  {name}"),
                per_second(*count, p.elapsed),
                p.unit,
                p.latency_of,
                summary,
                "",
                "",
            ));
        }
    }
    out
}

/// One line per target: actual, bound, met or not.
pub fn target_table(title: &str, targets: &[Target]) -> String {
    let mut out = format!("{title:<26} {:>22}   {:<22} status\n", "actual", "target");
    for t in targets {
        out.push_str(&format!(
            "  {:<24} {:>22}   {:<22} {}\n",
            t.name,
            t.actual_text,
            t.bound_text,
            if t.met() { "met" } else { "NOT MET" }
        ));
    }
    out
}

fn row(
    name: &str,
    rate: f64,
    unit: &str,
    latency_of: &str,
    l: &Summary,
    errors: &str,
    memory: &str,
) -> String {
    format!(
        "{:<16} {:>20}   {:<12} {:>8.2} {:>8.2} {:>8.2} {:>7}  {}\n",
        name,
        format!("{} {unit}", thousands(rate)),
        latency_of,
        ms(l.p50_us as f64),
        ms(l.p95_us as f64),
        ms(l.p99_us as f64),
        errors,
        memory,
    )
}

pub fn memory_text(m: Option<Memory>) -> String {
    match m {
        Some(m) => format!(
            "{:.1} / {:.1} MiB",
            m.rss_kb as f64 / 1024.0,
            m.hwm_kb as f64 / 1024.0
        ),
        None => "-".to_string(),
    }
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// `1234567.8` → `"1,234,568"`.
pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn write_json(path: &std::path::Path, value: &Value) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| format!("cannot serialize the results: {e}"))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub fn round_to(x: f64, scale: f64) -> f64 {
    (x * scale).round() / scale
}
