//! Device payloads and their mapping onto entity operations.
//!
//! Two forms are accepted, over MQTT and HTTP alike:
//! - one reading: a JSON object of payload keys and values, with an optional
//!   `observedAt` (RFC 3339 string, or milliseconds since the epoch);
//! - a batch: a JSON array of such objects, each with its own `observedAt`.
//!
//! Each reading becomes one upsert of the device's entity with the mapped
//! attributes only, so its state, history and subscriptions follow exactly
//! as for an NGSI-LD batch upsert (`options=update`).

use crate::model::{Device, TIMESTAMP_KEY, ValueType};
use borough_core::entity::{AttrKind, Attribute, Entity};
use borough_core::validate::parse_datetime;
use borough_core::{Context, EntityOp};
use indexmap::IndexMap;
use serde_json::{Map, Value};

/// Longest text value.
pub const MAX_TEXT_LEN: usize = 4096;

/// Why a whole message was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejected {
    NotJson(String),
    /// Neither an object nor an array of objects.
    BadShape,
    BadTimestamp,
    TooManyReadings(usize),
    /// Every value was dropped: nothing to write.
    NothingValid(Vec<Dropped>),
}

impl Rejected {
    /// A short label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "not_json",
            Self::BadShape => "bad_shape",
            Self::BadTimestamp => "bad_timestamp",
            Self::TooManyReadings(_) => "too_many_readings",
            Self::NothingValid(d) => d.first().map_or("empty", |d| d.reason.label()),
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Self::NotJson(e) => format!("the payload is not JSON: {e}"),
            Self::BadShape => {
                "the payload must be a JSON object of values or an array of such objects".into()
            }
            Self::BadTimestamp => format!(
                "'{TIMESTAMP_KEY}' must be an RFC 3339 date-time or milliseconds since the epoch"
            ),
            Self::TooManyReadings(n) => format!("a batch holds at most {n} readings"),
            Self::NothingValid(d) if d.is_empty() => "the payload holds no values".into(),
            Self::NothingValid(d) => {
                let parts: Vec<String> = d.iter().map(Dropped::to_string).collect();
                format!("no value could be used: {}", parts.join("; "))
            }
        }
    }
}

/// Why one value was dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropReason {
    Unmapped,
    WrongType(ValueType),
}

impl DropReason {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unmapped => "unmapped_key",
            Self::WrongType(_) => "wrong_type",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub key: String,
    pub reason: DropReason,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            DropReason::Unmapped => write!(f, "'{}' is not a mapped key", self.key),
            DropReason::WrongType(t) => write!(f, "'{}' must be a {}", self.key, t.name()),
        }
    }
}

/// The operations a message asks for, and the values left out.
#[derive(Debug, Default)]
pub struct Mapped {
    pub ops: Vec<EntityOp>,
    /// The number of attribute values written.
    pub values: usize,
    pub dropped: Vec<Dropped>,
}

/// Parses a payload and maps it onto upserts of the device's entity.
pub fn map_payload(
    device: &Device,
    ctx: &Context,
    bytes: &[u8],
    max_readings: usize,
) -> Result<Mapped, Rejected> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| Rejected::NotJson(e.to_string()))?;
    let mut out = Mapped::default();
    match v {
        Value::Object(o) => reading(device, ctx, o, &mut out)?,
        Value::Array(items) => {
            if items.len() > max_readings {
                return Err(Rejected::TooManyReadings(max_readings));
            }
            for item in items {
                let Value::Object(o) = item else {
                    return Err(Rejected::BadShape);
                };
                reading(device, ctx, o, &mut out)?;
            }
        }
        _ => return Err(Rejected::BadShape),
    }
    if out.ops.is_empty() {
        return Err(Rejected::NothingValid(out.dropped));
    }
    Ok(out)
}

fn timestamp(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => parse_datetime(s),
        Value::Number(n) => n.as_i64().and_then(|ms| ms.checked_mul(1000)),
        _ => None,
    }
}

fn reading(
    device: &Device,
    ctx: &Context,
    mut o: Map<String, Value>,
    out: &mut Mapped,
) -> Result<(), Rejected> {
    let observed_at = match o.remove(TIMESTAMP_KEY) {
        Some(v) => Some(timestamp(&v).ok_or(Rejected::BadTimestamp)?),
        None => None,
    };
    let mut attrs = IndexMap::default();
    for (key, value) in o {
        let Some(m) = device.mapping(&key) else {
            out.dropped.push(Dropped {
                key,
                reason: DropReason::Unmapped,
            });
            continue;
        };
        let Some((kind, value)) = convert(m.value_type, value) else {
            out.dropped.push(Dropped {
                key,
                reason: DropReason::WrongType(m.value_type),
            });
            continue;
        };
        let attr = Attribute {
            kind,
            value,
            dataset_id: None,
            observed_at,
            unit_code: m.unit_code.clone(),
            object_type: None,
            sub: Default::default(),
            created_at: 0,
            modified_at: 0,
        };
        attrs.insert(ctx.expand(m.attribute()).into_owned(), vec![attr]);
    }
    if attrs.is_empty() {
        return Ok(());
    }
    out.values += attrs.len();
    out.ops.push(EntityOp::Upsert {
        entity: Entity {
            id: device.entity_id.clone(),
            types: vec![ctx.expand(&device.entity_type).into_owned()],
            scopes: Vec::new(),
            attrs,
            created_at: 0,
            modified_at: 0,
        },
        replace: false,
    });
    Ok(())
}

fn convert(t: ValueType, v: Value) -> Option<(AttrKind, Value)> {
    let ok = match t {
        ValueType::Number => v.is_number(),
        ValueType::Integer => v.is_i64() || v.is_u64(),
        ValueType::Boolean => v.is_boolean(),
        ValueType::Text => v.as_str().is_some_and(|s| s.len() <= MAX_TEXT_LEN),
        ValueType::Json => !v.is_null() && borough_core::validate::check_depth(&v).is_ok(),
        ValueType::Point => {
            let ok = v.as_array().is_some_and(|a| {
                a.len() == 2
                    && a[0].as_f64().is_some_and(|x| (-180.0..=180.0).contains(&x))
                    && a[1].as_f64().is_some_and(|y| (-90.0..=90.0).contains(&y))
            });
            if !ok {
                return None;
            }
            return Some((
                AttrKind::GeoProperty,
                serde_json::json!({"type": "Point", "coordinates": v}),
            ));
        }
    };
    if !ok {
        return None;
    }
    let kind = if t == ValueType::Json {
        AttrKind::JsonProperty
    } else {
        AttrKind::Property
    };
    Some((kind, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DeviceInput;
    use serde_json::json;

    fn device() -> Device {
        serde_json::from_value::<DeviceInput>(json!({
            "id": "ws-1", "entityType": "WeatherObserved",
            "attributes": [
                {"key": "t", "attribute": "temperature", "unitCode": "CEL"},
                {"key": "n", "attribute": "count", "type": "integer"},
                {"key": "on", "type": "boolean"},
                {"key": "loc", "attribute": "location", "type": "point"}
            ]
        }))
        .unwrap()
        .into_device("h".into(), 0)
        .unwrap()
    }

    fn map(p: Value) -> Result<Mapped, Rejected> {
        map_payload(&device(), &Context::core(), p.to_string().as_bytes(), 100)
    }

    const T: &str = "https://uri.etsi.org/ngsi-ld/default-context/temperature";

    #[test]
    fn a_single_reading_becomes_one_upsert() {
        let m = map(json!({"t": 21.5, "n": 3, "observedAt": "2026-01-01T00:00:00Z"})).unwrap();
        assert_eq!(m.ops.len(), 1);
        assert_eq!(m.values, 2);
        let EntityOp::Upsert { entity, replace } = &m.ops[0] else {
            panic!("not an upsert")
        };
        assert!(!replace);
        assert_eq!(entity.id, "urn:ngsi-ld:WeatherObserved:ws-1");
        let t = &entity.attrs[T][0];
        assert_eq!(t.value, json!(21.5));
        assert_eq!(t.unit_code.as_deref(), Some("CEL"));
        assert_eq!(t.observed_at, Some(1_767_225_600_000_000));
    }

    #[test]
    fn a_batch_becomes_one_upsert_per_reading() {
        let m = map(json!([
            {"t": 1, "observedAt": 1_767_225_600_000i64},
            {"t": 2, "loc": [2.35, 48.85]}
        ]))
        .unwrap();
        assert_eq!(m.ops.len(), 2);
        let EntityOp::Upsert { entity, .. } = &m.ops[0] else {
            panic!()
        };
        assert_eq!(entity.attrs[T][0].observed_at, Some(1_767_225_600_000_000));
        let EntityOp::Upsert { entity, .. } = &m.ops[1] else {
            panic!()
        };
        assert_eq!(entity.attrs[T][0].observed_at, None);
        let loc = &entity.attrs["https://uri.etsi.org/ngsi-ld/location"][0];
        assert_eq!(loc.kind, AttrKind::GeoProperty);
    }

    #[test]
    fn bad_values_are_dropped_and_bad_messages_refused() {
        let m = map(json!({"t": "hot", "n": 2.5, "x": 1, "on": true})).unwrap();
        assert_eq!(m.values, 1);
        assert_eq!(m.dropped.len(), 3);
        assert!(matches!(
            map_payload(&device(), &Context::core(), b"{not json", 10),
            Err(Rejected::NotJson(_))
        ));
        assert_eq!(map(json!(5)).unwrap_err(), Rejected::BadShape);
        assert_eq!(map(json!([1])).unwrap_err(), Rejected::BadShape);
        assert_eq!(
            map(json!({"t": 1, "observedAt": "yesterday"})).unwrap_err(),
            Rejected::BadTimestamp
        );
        assert_eq!(map(json!({"x": 1})).unwrap_err().reason(), "unmapped_key");
        assert_eq!(map(json!({"t": "a"})).unwrap_err().reason(), "wrong_type");
        assert_eq!(map(json!({})).unwrap_err().reason(), "empty");
        let many: Vec<Value> = (0..101).map(|i| json!({"t": i})).collect();
        assert_eq!(
            map(Value::Array(many)).unwrap_err(),
            Rejected::TooManyReadings(100)
        );
    }
}
