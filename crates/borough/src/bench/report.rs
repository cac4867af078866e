//! Result records and their rendering: the phase table, the target table,
//! the per-shape table of the query scenarios, number formatting and the
//! JSON file.

use super::load::{Failures, Summary, ms};
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
    pub failures: Failures,
    /// Server memory right after the phase (`None` for the PostgreSQL baseline).
    pub memory: Option<Memory>,
    /// Per-operation breakdown of the mixed phase: (name, count, latency).
    pub ops: Vec<(&'static str, usize, Summary)>,
}

impl Phase {
    /// Requests (or queries) for a time: one latency sample per completed one.
    pub fn timed(
        name: &'static str,
        unit: &'static str,
        latency_of: &'static str,
        elapsed: Duration,
        mut latencies_us: Vec<u64>,
    ) -> Phase {
        Phase {
            name,
            unit,
            count: latencies_us.len(),
            elapsed,
            latency_of,
            latency: Summary::of(&mut latencies_us),
            failures: Failures::default(),
            memory: None,
            ops: Vec::new(),
        }
    }

    /// `count` entities written in batches (or transactions), one latency
    /// sample each. A failed batch fails the run, so there are no failures.
    pub fn entities_written(
        name: &'static str,
        count: usize,
        latency_of: &'static str,
        elapsed: Duration,
        latencies_us: Vec<u64>,
    ) -> Phase {
        Phase {
            count,
            ..Phase::timed(name, "entities/s", latency_of, elapsed, latencies_us)
        }
    }

    pub fn with_failures(self, failures: Failures) -> Phase {
        Phase { failures, ..self }
    }

    pub fn with_memory(self, memory: Option<Memory>) -> Phase {
        Phase { memory, ..self }
    }

    pub fn with_ops(self, ops: Vec<(&'static str, usize, Summary)>) -> Phase {
        Phase { ops, ..self }
    }

    /// Fails when some of the phase's `what` (requests, updates) failed: its
    /// figures would not mean what they say. `label` names the phase.
    pub fn check_failures(&self, label: &str, what: &str) -> Result<(), String> {
        if self.failures.count == 0 {
            return Ok(());
        }
        Err(format!(
            "{label}: {} {what} failed; first: {}",
            self.failures.count,
            self.failures.first.as_deref().unwrap_or("(no detail)")
        ))
    }

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
            "errors": self.failures.count,
            "first_error": self.failures.first,
            "server_memory": memory_json(self.memory),
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

/// What a target asks of its measurement.
#[derive(Clone, Copy)]
pub enum Bound {
    AtLeast(f64),
    Below(f64),
    AtMost(f64),
}

/// One target of the issue, compared with its measurement.
pub struct Target {
    pub name: String,
    pub actual: f64,
    pub actual_text: String,
    pub bound: Bound,
    pub bound_text: String,
}

impl Target {
    pub fn new(
        name: impl Into<String>,
        actual: f64,
        actual_text: String,
        bound: Bound,
        bound_text: String,
    ) -> Target {
        Target {
            name: name.into(),
            actual,
            actual_text,
            bound,
            bound_text,
        }
    }

    /// A latency in milliseconds, met below `bound_ms`.
    pub fn latency_below(name: impl Into<String>, actual_ms: f64, bound_ms: f64) -> Target {
        let actual_text = format!("{actual_ms:.2} ms");
        let bound_text = format!("< {bound_ms} ms");
        Target::new(
            name,
            actual_ms,
            actual_text,
            Bound::Below(bound_ms),
            bound_text,
        )
    }

    /// A throughput in `unit`, met at `bound` or more.
    pub fn rate_at_least(name: impl Into<String>, actual: f64, bound: f64, unit: &str) -> Target {
        let actual_text = format!("{} {unit}", thousands(actual));
        let bound_text = format!("≥ {} {unit}", thousands(bound));
        Target::new(name, actual, actual_text, Bound::AtLeast(bound), bound_text)
    }

    /// A ratio, met at `bound` or more.
    pub fn ratio_at_least(name: impl Into<String>, actual: f64, bound: f64) -> Target {
        let actual_text = format!("{actual:.2}x");
        let bound_text = format!("≥ {bound}x");
        Target::new(name, actual, actual_text, Bound::AtLeast(bound), bound_text)
    }

    pub fn met(&self) -> bool {
        match self.bound {
            Bound::AtLeast(bound) => self.actual >= bound,
            Bound::Below(bound) => self.actual < bound,
            Bound::AtMost(bound) => self.actual <= bound,
        }
    }

    pub fn to_json(&self) -> Value {
        let (comparison, bound) = match self.bound {
            Bound::AtLeast(bound) => (">=", bound),
            Bound::Below(bound) => ("<", bound),
            Bound::AtMost(bound) => ("<=", bound),
        };
        json!({
            "name": self.name,
            "actual": round_to(self.actual, 1e3),
            "comparison": comparison,
            "target": bound,
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
            &p.failures.count.to_string(),
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

/// The targets as JSON, in order.
pub fn targets_json(targets: &[Target]) -> Vec<Value> {
    targets.iter().map(Target::to_json).collect()
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

/// Borough and its baseline on one query shape, measured alike.
pub struct ShapeRun {
    pub borough: Phase,
    pub baseline: Phase,
}

impl ShapeRun {
    /// Borough's requests per second ÷ the baseline's.
    pub fn rps_vs_baseline(&self) -> f64 {
        ratio(self.borough.throughput(), self.baseline.throughput())
    }

    /// The baseline's p95 latency ÷ Borough's.
    pub fn baseline_p95_vs_p95(&self) -> f64 {
        ratio(
            self.baseline.latency.p95_us as f64,
            self.borough.latency.p95_us as f64,
        )
    }

    /// Fails when requests of either system failed.
    pub fn check_failures(&self, shape: &str) -> Result<(), String> {
        for phase in [&self.borough, &self.baseline] {
            phase.check_failures(&format!("{shape} ({})", phase.name), "requests")?;
        }
        Ok(())
    }
}

/// The per-shape table: a heading, then two lines per shape, Borough's
/// (named after the shape, with its `ratios` columns) and the baseline's.
/// `system_width` fits the longest phase name.
pub fn shape_table<'a>(
    system_width: usize,
    ratio_headings: &str,
    shapes: impl IntoIterator<Item = (&'a str, &'a ShapeRun, String)>,
) -> String {
    let mut out = format!(
        "{:<12} {:<system_width$} {:>10} {:>8} {:>8} {:>8} {:>7}  {ratio_headings}\n",
        "shape", "system", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors",
    );
    for (shape, run, ratios) in shapes {
        for (name, p, ratios) in [
            (shape, &run.borough, ratios),
            ("", &run.baseline, String::new()),
        ] {
            let line = format!(
                "{:<12} {:<system_width$} {:>10} {:>8.2} {:>8.2} {:>8.2} {:>7}  {}",
                name,
                p.name,
                thousands(p.throughput()),
                ms(p.latency.p50_us as f64),
                ms(p.latency.p95_us as f64),
                ms(p.latency.p99_us as f64),
                p.failures.count,
                ratios
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
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

pub fn memory_json(m: Option<Memory>) -> Value {
    json!(m.map(|m| json!({"rss_kb": m.rss_kb, "hwm_kb": m.hwm_kb})))
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

/// Prints the table, then writes the JSON to `out`.
pub fn publish(table: &str, json: &Value, out: &std::path::Path) -> Result<(), String> {
    println!("{table}");
    write_json(out, json)?;
    println!("results written to {}", out.display());
    Ok(())
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
