//! The device registry's model: what a device is, how its payload keys map
//! onto entity attributes, and the checks a registration must pass. Plain
//! code, no I/O.

use borough_core::validate::{check_name, check_uri};
use borough_core::{NgsiError, NgsiResult};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest device id; ids appear in MQTT topics and URLs.
pub const MAX_DEVICE_ID_LEN: usize = 128;
/// Most mapped attributes of one device.
pub const MAX_ATTRIBUTES: usize = 256;
/// Most commands of one device.
pub const MAX_COMMANDS: usize = 64;
/// The payload key that carries a reading's time.
pub const TIMESTAMP_KEY: &str = "observedAt";

/// The JSON type a payload value must have, and the NGSI-LD attribute it becomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    /// Any JSON number → Property.
    #[default]
    Number,
    /// A whole number → Property.
    Integer,
    Boolean,
    /// A string (at most 4096 bytes) → Property.
    Text,
    /// Any JSON value → JsonProperty.
    Json,
    /// `[longitude, latitude]` → GeoProperty (a GeoJSON Point).
    Point,
}

impl ValueType {
    pub fn name(self) -> &'static str {
        match self {
            Self::Number => "number",
            Self::Integer => "integer",
            Self::Boolean => "boolean",
            Self::Text => "text",
            Self::Json => "json",
            Self::Point => "point",
        }
    }
}

/// One payload key and the attribute it feeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttrMapping {
    /// The key in the device's payload.
    pub key: String,
    /// The NGSI-LD attribute name (a term of the core context, or an IRI);
    /// the key when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribute: Option<String>,
    /// UN/CEFACT unit code of the value (e.g. `CEL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_code: Option<String>,
    #[serde(default, rename = "type")]
    pub value_type: ValueType,
}

impl AttrMapping {
    pub fn attribute(&self) -> &str {
        self.attribute.as_deref().unwrap_or(&self.key)
    }
}

/// A registered device, as stored. The token itself is never stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub id: String,
    /// The entity the device feeds, and only that one.
    pub entity_id: String,
    pub entity_type: String,
    pub attributes: Vec<AttrMapping>,
    pub commands: Vec<String>,
    /// SHA-256 of the device's token, hex.
    pub token_hash: String,
    /// Microseconds since the epoch.
    pub created_at: i64,
    pub modified_at: i64,
}

impl Device {
    /// The mapping of a payload key.
    pub fn mapping(&self, key: &str) -> Option<&AttrMapping> {
        self.attributes.iter().find(|m| m.key == key)
    }

    pub fn has_command(&self, name: &str) -> bool {
        self.commands.iter().any(|c| c == name)
    }

    /// The public view: everything but the token's hash.
    pub fn to_json(&self) -> Value {
        use borough_core::validate::format_datetime;
        serde_json::json!({
            "id": self.id,
            "entityId": self.entity_id,
            "entityType": self.entity_type,
            "attributes": self.attributes,
            "commands": self.commands,
            "createdAt": format_datetime(self.created_at),
            "modifiedAt": format_datetime(self.modified_at),
        })
    }
}

/// A registration (create) or a change (update) as a client sends it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceInput {
    pub id: Option<String>,
    pub entity_id: Option<String>,
    pub entity_type: Option<String>,
    pub attributes: Option<Vec<AttrMapping>>,
    pub commands: Option<Vec<String>>,
}

/// Checks a device id: it appears in topics and paths, so only letters,
/// digits and `_ - . :` are allowed.
pub fn check_device_id(id: &str) -> NgsiResult<()> {
    let valid = !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if valid {
        Ok(())
    } else {
        Err(NgsiError::bad_data(format!(
            "device id '{}' is not valid: use 1 to {MAX_DEVICE_ID_LEN} letters, digits, '_', '-', '.' or ':'",
            id.chars().take(MAX_DEVICE_ID_LEN).collect::<String>()
        )))
    }
}

const RESERVED: [&str; 6] = ["id", "type", "@context", "scope", "createdAt", "modifiedAt"];

fn check_attr_name(what: &str, name: &str) -> NgsiResult<()> {
    check_name(what, name)?;
    if RESERVED.contains(&name) {
        return Err(NgsiError::bad_data(format!("{what} '{name}' is reserved")));
    }
    Ok(())
}

impl DeviceInput {
    /// A new device from a registration, with `token_hash` and times set.
    pub fn into_device(self, token_hash: String, now: i64) -> NgsiResult<Device> {
        let id = self
            .id
            .ok_or_else(|| NgsiError::bad_data("a device needs an 'id'"))?;
        check_device_id(&id)?;
        let entity_type = self
            .entity_type
            .ok_or_else(|| NgsiError::bad_data("a device needs an 'entityType'"))?;
        let entity_id = self
            .entity_id
            .unwrap_or_else(|| format!("urn:ngsi-ld:{entity_type}:{id}"));
        let device = Device {
            id,
            entity_id,
            entity_type,
            attributes: self.attributes.unwrap_or_default(),
            commands: self.commands.unwrap_or_default(),
            token_hash,
            created_at: now,
            modified_at: now,
        };
        validate(&device)?;
        Ok(device)
    }

    /// The device after this change; the id cannot change.
    pub fn apply_to(self, current: &Device, now: i64) -> NgsiResult<Device> {
        if let Some(id) = &self.id
            && id != &current.id
        {
            return Err(NgsiError::bad_data("a device's 'id' cannot change"));
        }
        let mut next = current.clone();
        if let Some(v) = self.entity_id {
            next.entity_id = v;
        }
        if let Some(v) = self.entity_type {
            next.entity_type = v;
        }
        if let Some(v) = self.attributes {
            next.attributes = v;
        }
        if let Some(v) = self.commands {
            next.commands = v;
        }
        next.modified_at = now;
        validate(&next)?;
        Ok(next)
    }
}

/// Every rule a stored device satisfies.
pub fn validate(d: &Device) -> NgsiResult<()> {
    check_device_id(&d.id)?;
    check_uri("entityId", &d.entity_id)?;
    check_name("entityType", &d.entity_type)?;
    if d.attributes.len() > MAX_ATTRIBUTES {
        return Err(NgsiError::bad_data(format!(
            "a device maps at most {MAX_ATTRIBUTES} attributes"
        )));
    }
    if d.commands.len() > MAX_COMMANDS {
        return Err(NgsiError::bad_data(format!(
            "a device has at most {MAX_COMMANDS} commands"
        )));
    }
    let mut keys = std::collections::HashSet::new();
    let mut attrs = std::collections::HashSet::new();
    for m in &d.attributes {
        check_name("a payload key", &m.key)?;
        if m.key == TIMESTAMP_KEY {
            return Err(NgsiError::bad_data(format!(
                "the payload key '{TIMESTAMP_KEY}' carries the reading's time and cannot be mapped"
            )));
        }
        if !keys.insert(m.key.as_str()) {
            return Err(NgsiError::bad_data(format!(
                "the payload key '{}' is mapped twice",
                m.key
            )));
        }
        check_attr_name("attribute", m.attribute())?;
        if !attrs.insert(m.attribute()) {
            return Err(NgsiError::bad_data(format!(
                "the attribute '{}' is fed by two keys",
                m.attribute()
            )));
        }
        if let Some(u) = &m.unit_code {
            check_name("unitCode", u)?;
        }
    }
    let mut cmds = std::collections::HashSet::new();
    for c in &d.commands {
        check_attr_name("command", c)?;
        if attrs.contains(c.as_str()) {
            return Err(NgsiError::bad_data(format!(
                "the command '{c}' has the name of a measured attribute"
            )));
        }
        if attrs.contains(format!("{c}_status").as_str())
            || attrs.contains(format!("{c}_info").as_str())
        {
            return Err(NgsiError::bad_data(format!(
                "the attributes '{c}_status' and '{c}_info' are kept for the command '{c}'"
            )));
        }
        if !cmds.insert(c.as_str()) {
            return Err(NgsiError::bad_data(format!(
                "the command '{c}' is listed twice"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(v: Value) -> DeviceInput {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_registration_gets_a_default_entity_id() {
        let d = input(json!({"id": "t-1", "entityType": "WeatherObserved",
            "attributes": [{"key": "t", "attribute": "temperature", "unitCode": "CEL"}]}))
        .into_device("h".into(), 1)
        .unwrap();
        assert_eq!(d.entity_id, "urn:ngsi-ld:WeatherObserved:t-1");
        assert_eq!(d.attributes[0].value_type, ValueType::Number);
        assert_eq!(d.mapping("t").unwrap().attribute(), "temperature");
    }

    #[test]
    fn bad_registrations_are_refused() {
        for bad in [
            json!({"id": "a/b", "entityType": "T"}),
            json!({"id": "a+", "entityType": "T"}),
            json!({"id": "a"}),
            json!({"id": "a", "entityType": "T", "entityId": "not a uri"}),
            json!({"id": "a", "entityType": "T", "attributes": [{"key": "x"}, {"key": "x"}]}),
            json!({"id": "a", "entityType": "T", "attributes": [{"key": "observedAt"}]}),
            json!({"id": "a", "entityType": "T", "attributes": [{"key": "x", "attribute": "id"}]}),
            json!({"id": "a", "entityType": "T", "attributes": [{"key": "x"}], "commands": ["x"]}),
            json!({"id": "a", "entityType": "T", "commands": ["on", "on"]}),
        ] {
            assert!(
                input(bad.clone()).into_device("h".into(), 0).is_err(),
                "{bad} was accepted"
            );
        }
        assert!(serde_json::from_value::<DeviceInput>(json!({"id": "a", "bogus": 1})).is_err());
    }
}
