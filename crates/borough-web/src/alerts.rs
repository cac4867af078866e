//! The alert rule: which entities are in a fault or threshold state. It is
//! defined here and only here; the cluster endpoint, the alerts endpoint and
//! the live feed all ask [`alert_of`]. The rules engine will replace it.
//!
//! Faults are the status values a device reports when it is broken (the
//! simulator's faulty devices report them one hour in four); thresholds are
//! readings beyond a limit.

use borough_core::{Context, Entity};
use serde::Serialize;
use serde_json::Value;
use std::sync::LazyLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    Fault,
    Threshold,
}

/// Why an entity is alerting.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    pub severity: Severity,
    pub kind: AlertKind,
    /// The attribute that raised it (compact name).
    pub attribute: &'static str,
    /// What an operator reads, e.g. "status is defectiveLamp".
    pub reason: String,
}

/// `status` values that mean the device is broken, with the severity.
const FAULT_STATUSES: &[(&str, Severity)] = &[
    ("defectiveLamp", Severity::Critical),
    ("outOfService", Severity::Critical),
    ("lidOpen", Severity::Warning),
    ("unknown", Severity::Warning),
    ("faulty", Severity::Critical),
    ("broken", Severity::Critical),
];

/// `(type, attribute, limit, severity, what it means)`: a numeric reading above the limit.
const THRESHOLDS: &[(&str, &str, f64, Severity, &str)] = &[
    (
        "WasteContainer",
        "temperature",
        50.0,
        Severity::Critical,
        "fire risk",
    ),
    (
        "WasteContainer",
        "fillingLevel",
        0.9,
        Severity::Warning,
        "nearly full",
    ),
    (
        "AirQualityObserved",
        "NO2",
        200.0,
        Severity::Critical,
        "NO2 alert level",
    ),
    (
        "AirQualityObserved",
        "NO2",
        100.0,
        Severity::Warning,
        "NO2 high",
    ),
];

/// The expanded names the rule reads, computed once with the core context.
struct Names {
    status: String,
    thresholds: Vec<(String, String, &'static str, f64, Severity, &'static str)>,
}

static NAMES: LazyLock<Names> = LazyLock::new(|| {
    let ctx = Context::core();
    Names {
        status: ctx.expand("status").into_owned(),
        thresholds: THRESHOLDS
            .iter()
            .map(|(t, a, limit, sev, what)| {
                (
                    ctx.expand(t).into_owned(),
                    ctx.expand(a).into_owned(),
                    *a,
                    *limit,
                    *sev,
                    *what,
                )
            })
            .collect(),
    }
});

fn first_value<'a>(e: &'a Entity, attr: &str) -> Option<&'a Value> {
    e.attrs.get(attr).and_then(|i| i.first()).map(|a| &a.value)
}

/// What raised an alert, borrowed from the entity (no allocation on the cluster path).
enum Cause<'a> {
    Status(&'a str),
    Above {
        value: f64,
        limit: f64,
        what: &'static str,
    },
}

/// The rule itself: the most severe fault or threshold of the entity.
fn check(e: &Entity) -> Option<(Severity, AlertKind, &'static str, Cause<'_>)> {
    let names = &*NAMES;
    if let Some(Value::String(s)) = first_value(e, &names.status)
        && let Some((_, severity)) = FAULT_STATUSES.iter().find(|(f, _)| f == s)
    {
        return Some((*severity, AlertKind::Fault, "status", Cause::Status(s)));
    }
    let mut found = None;
    for (t, attr, short, limit, severity, what) in &names.thresholds {
        if !e.types.iter().any(|et| et == t) {
            continue;
        }
        let Some(value) = first_value(e, attr).and_then(Value::as_f64) else {
            continue;
        };
        if value > *limit
            && found
                .as_ref()
                .is_none_or(|(s, ..): &(Severity, _, _, _)| severity < s)
        {
            let cause = Cause::Above {
                value,
                limit: *limit,
                what,
            };
            found = Some((*severity, AlertKind::Threshold, *short, cause));
        }
    }
    found
}

/// The severity of the entity's alert, if it has one.
pub fn severity_of(e: &Entity) -> Option<Severity> {
    check(e).map(|(s, ..)| s)
}

/// The entity's alert, if it is in a fault or threshold state (the most severe one).
pub fn alert_of(e: &Entity) -> Option<Alert> {
    let (severity, kind, attribute, cause) = check(e)?;
    let reason = match cause {
        Cause::Status(s) => format!("status is {s}"),
        Cause::Above { value, limit, what } => format!("{attribute} {value} > {limit}: {what}"),
    };
    Some(Alert {
        severity,
        kind,
        attribute,
        reason,
    })
}

/// A short state of the entity for colouring its marker: its `status`, else
/// its `powerState`, else nothing.
pub fn state_of(e: &Entity) -> Option<&str> {
    static POWER: LazyLock<String> =
        LazyLock::new(|| Context::core().expand("powerState").into_owned());
    match first_value(e, &NAMES.status) {
        Some(Value::String(s)) => Some(s),
        _ => match first_value(e, &POWER) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use borough_core::entity::parse_entity;
    use serde_json::json;

    fn e(v: Value) -> Entity {
        parse_entity(&v, &Context::core(), 0).expect("valid entity")
    }

    #[test]
    fn faults_and_thresholds() {
        let lamp = e(json!({"id": "urn:l", "type": "Streetlight",
            "status": {"type": "Property", "value": "defectiveLamp"}}));
        let a = alert_of(&lamp).expect("an alert");
        assert_eq!((a.severity, a.kind), (Severity::Critical, AlertKind::Fault));
        let ok = e(json!({"id": "urn:l", "type": "Streetlight",
            "status": {"type": "Property", "value": "ok"}}));
        assert_eq!(alert_of(&ok), None);
        let hot = e(json!({"id": "urn:w", "type": "WasteContainer",
            "fillingLevel": {"type": "Property", "value": 0.95},
            "temperature": {"type": "Property", "value": 71.5}}));
        let a = alert_of(&hot).expect("an alert");
        assert_eq!(
            (a.severity, a.attribute),
            (Severity::Critical, "temperature")
        );
        // A threshold applies to its own type only.
        let warm = e(json!({"id": "urn:x", "type": "WeatherObserved",
            "temperature": {"type": "Property", "value": 71.5}}));
        assert_eq!(alert_of(&warm), None);
        let air = e(json!({"id": "urn:a", "type": "AirQualityObserved",
            "NO2": {"type": "Property", "value": 150.0}}));
        assert_eq!(alert_of(&air).map(|a| a.severity), Some(Severity::Warning));
    }
}
