//! Checks on identifiers, names, nesting and times that every write goes through.

use crate::error::{NgsiError, NgsiResult};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

/// Deepest JSON nesting accepted in a request body.
pub const MAX_JSON_DEPTH: usize = 32;
/// Longest entity id, attribute name or type name accepted.
pub const MAX_NAME_LEN: usize = 512;
const MAX_URI_LEN: usize = 2048;

/// Characters the specification forbids in names (clause 4.6.2), besides
/// whitespace and control characters.
const FORBIDDEN_NAME_CHARS: &[char] = &['<', '>', '"', '\'', '=', ';', '(', ')'];

/// A URI as NGSI-LD needs for entity ids, relationship objects and dataset ids:
/// a scheme, a colon and a non-empty rest, with no whitespace or characters
/// that are never valid in a URI.
pub fn check_uri(what: &str, s: &str) -> NgsiResult<()> {
    if s.len() > MAX_URI_LEN {
        return Err(NgsiError::bad_data(format!(
            "{what} is longer than {MAX_URI_LEN} characters"
        )));
    }
    let valid = match s.split_once(':') {
        Some((scheme, rest)) => {
            let mut chars = scheme.chars();
            chars.next().is_some_and(|c| c.is_ascii_alphabetic())
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                && !rest.is_empty()
                && !s.chars().any(|c| {
                    c.is_whitespace()
                        || c.is_control()
                        || matches!(c, '<' | '>' | '"' | '{' | '}' | '|' | '\\' | '^' | '`')
                })
        }
        None => false,
    };
    if valid {
        Ok(())
    } else {
        Err(NgsiError::bad_data(format!(
            "{what} '{}' is not a valid URI",
            truncate(s)
        )))
    }
}

/// An attribute name or type name as given by the client (before expansion).
pub fn check_name(what: &str, s: &str) -> NgsiResult<()> {
    if s.is_empty() {
        return Err(NgsiError::bad_data(format!("{what} must not be empty")));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NgsiError::bad_data(format!(
            "{what} is longer than {MAX_NAME_LEN} characters"
        )));
    }
    if s.starts_with('@') {
        return Err(NgsiError::bad_data(format!(
            "{what} '{}' starts with '@': names beginning with '@' are reserved for JSON-LD keywords",
            truncate(s)
        )));
    }
    if let Some(c) = s
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || FORBIDDEN_NAME_CHARS.contains(c))
    {
        return Err(NgsiError::bad_data(format!(
            "{what} '{}' contains the forbidden character {c:?}",
            truncate(s)
        )));
    }
    Ok(())
}

/// Rejects documents nested deeper than [`MAX_JSON_DEPTH`].
pub fn check_depth(v: &Value) -> NgsiResult<()> {
    fn depth_exceeds(v: &Value, remaining: usize) -> bool {
        match v {
            Value::Array(a) => remaining == 0 || a.iter().any(|x| depth_exceeds(x, remaining - 1)),
            Value::Object(o) => {
                remaining == 0 || o.values().any(|x| depth_exceeds(x, remaining - 1))
            }
            _ => false,
        }
    }
    if depth_exceeds(v, MAX_JSON_DEPTH) {
        Err(NgsiError::bad_data(format!(
            "the document is nested deeper than {MAX_JSON_DEPTH} levels"
        )))
    } else {
        Ok(())
    }
}

/// Parses an ISO 8601 / RFC 3339 date-time into microseconds since the epoch.
pub fn parse_datetime(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc).timestamp_micros())
}

/// Formats microseconds since the epoch as UTC, with milliseconds (or
/// microseconds, when the value has them).
pub fn format_datetime(micros: i64) -> String {
    let t = DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or_default();
    let precision = if micros % 1000 == 0 {
        SecondsFormat::Millis
    } else {
        SecondsFormat::Micros
    };
    t.to_rfc3339_opts(precision, true)
}

/// Current time in microseconds since the epoch.
pub fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

pub(crate) fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert!(check_uri("id", "urn:ngsi-ld:Vehicle:A4567").is_ok());
        assert!(check_uri("id", "https://example.org/a?b=c#d").is_ok());
        assert!(check_uri("id", "no-scheme").is_err());
        assert!(check_uri("id", "urn:").is_err());
        assert!(check_uri("id", "1urn:x").is_err());
        assert!(check_uri("id", "urn:with space").is_err());
        assert!(check_uri("id", "urn:a<b").is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("attribute name", "speed").is_ok());
        assert!(check_name("attribute name", "schema:name").is_ok());
        for bad in ["", "a b", "a=b", "a;b", "a(b", "a\"b", "a<b", "a\u{0}b"] {
            assert!(check_name("attribute name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn depth() {
        let mut v = Value::from(1);
        for _ in 0..MAX_JSON_DEPTH {
            v = Value::Array(vec![v]);
        }
        assert!(check_depth(&v).is_ok());
        v = Value::Array(vec![v]);
        assert!(check_depth(&v).is_err());
    }

    #[test]
    fn datetimes_round_trip() {
        let t = parse_datetime("2024-03-01T10:20:30.123Z").unwrap();
        assert_eq!(format_datetime(t), "2024-03-01T10:20:30.123Z");
        let t = parse_datetime("2024-03-01T12:20:30.000001+02:00").unwrap();
        assert_eq!(format_datetime(t), "2024-03-01T10:20:30.000001Z");
        assert!(parse_datetime("yesterday").is_none());
    }
}
