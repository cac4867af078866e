//! Counters of the devices layer, exposed in Prometheus text format and
//! appended to `GET /metrics` by the binary.

use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use std::collections::HashMap;
use std::sync::Mutex;

pub struct Metrics {
    registry: Registry,
    /// Readings written to entities, by tenant.
    pub readings: IntCounterVec,
    /// Attribute values written, by tenant.
    pub values: IntCounterVec,
    /// Messages or values refused or dropped, by transport and reason.
    pub rejected: IntCounterVec,
    /// Command state changes, by state.
    pub commands: IntCounterVec,
    /// Devices connected to the embedded broker.
    pub connections: IntGauge,
    /// Last time (second) each reason was logged, and how many were not.
    log_gate: Mutex<HashMap<&'static str, (i64, u64)>>,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // Names and labels are constants: creation cannot fail.
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("counter {name}: {e}"));
    let _ = r.register(Box::new(c.clone()));
    c
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let readings = counter(
            &registry,
            "borough_device_readings_total",
            "Device readings written to their entity",
            &["tenant"],
        );
        let values = counter(
            &registry,
            "borough_device_values_total",
            "Attribute values written from device readings",
            &["tenant"],
        );
        let rejected = counter(
            &registry,
            "borough_device_rejected_total",
            "Device messages refused or values dropped, by reason",
            &["transport", "reason"],
        );
        let commands = counter(
            &registry,
            "borough_device_commands_total",
            "Device command state changes, by state reached",
            &["status"],
        );
        let connections = IntGauge::new(
            "borough_mqtt_connections",
            "Devices connected to the embedded MQTT broker",
        )
        .unwrap_or_else(|e| panic!("gauge: {e}"));
        let _ = registry.register(Box::new(connections.clone()));
        Self {
            registry,
            readings,
            values,
            rejected,
            commands,
            connections,
            log_gate: Mutex::new(HashMap::new()),
        }
    }
}

impl Metrics {
    /// Counts a refusal and logs it, at most once a second per reason (with
    /// the number left unlogged since), so a flood cannot flood the log.
    pub fn reject(
        &self,
        transport: &str,
        reason: &'static str,
        tenant: &str,
        device: &str,
        detail: &str,
    ) {
        self.rejected.with_label_values(&[transport, reason]).inc();
        let now = borough_core::validate::now_micros() / 1_000_000;
        let suppressed = {
            let mut gate = self.log_gate.lock().unwrap_or_else(|e| e.into_inner());
            let slot = gate.entry(reason).or_insert((i64::MIN, 0));
            if slot.0 == now {
                slot.1 += 1;
                return;
            }
            let s = slot.1;
            *slot = (now, 0);
            s
        };
        tracing::warn!(
            transport,
            reason,
            tenant,
            device,
            suppressed,
            "device message refused: {detail}"
        );
    }

    /// The counters in Prometheus text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
