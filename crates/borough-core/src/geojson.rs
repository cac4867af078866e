//! Validation of GeoJSON geometries (RFC 7946) carried by GeoProperties.

use crate::error::{NgsiError, NgsiResult};
use serde_json::{Map, Value};

pub const GEOMETRY_TYPES: &[&str] = &[
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
];

/// True if `v` has the shape of a GeoJSON geometry (a known `type` and `coordinates`
/// or `geometries`). Used to recognise GeoProperties written without a `type`.
pub fn looks_like_geometry(v: &Value) -> bool {
    v.as_object().is_some_and(|o| {
        o.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| GEOMETRY_TYPES.contains(&t))
            && (o.contains_key("coordinates") || o.contains_key("geometries"))
    })
}

/// Checks a geometry: known type, coordinates of the right nesting, longitudes in
/// [-180, 180], latitudes in [-90, 90], line strings of two or more positions and
/// closed linear rings of four or more.
pub fn validate_geometry(v: &Value) -> NgsiResult<()> {
    validate(v, 0)
}

fn err(detail: impl Into<String>) -> NgsiError {
    NgsiError::bad_data(format!("invalid GeoJSON geometry: {}", detail.into()))
}

fn validate(v: &Value, depth: usize) -> NgsiResult<()> {
    let obj = v
        .as_object()
        .ok_or_else(|| err("a geometry must be an object"))?;
    let kind = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| err("'type' is missing"))?;
    if kind == "GeometryCollection" {
        if depth > 0 {
            return Err(err("nested GeometryCollections are not allowed"));
        }
        let geoms = obj
            .get("geometries")
            .and_then(Value::as_array)
            .ok_or_else(|| err("GeometryCollection needs a 'geometries' array"))?;
        return geoms.iter().try_for_each(|g| validate(g, depth + 1));
    }
    let coords = coordinates(obj, kind)?;
    match kind {
        "Point" => position(coords),
        "MultiPoint" => array(coords, "MultiPoint")?.iter().try_for_each(position),
        "LineString" => line(coords),
        "MultiLineString" => array(coords, "MultiLineString")?.iter().try_for_each(line),
        "Polygon" => polygon(coords),
        "MultiPolygon" => array(coords, "MultiPolygon")?.iter().try_for_each(polygon),
        other => Err(err(format!("unknown geometry type '{other}'"))),
    }
}

fn coordinates<'a>(obj: &'a Map<String, Value>, kind: &str) -> NgsiResult<&'a Value> {
    if !GEOMETRY_TYPES.contains(&kind) {
        return Err(err(format!("unknown geometry type '{kind}'")));
    }
    obj.get("coordinates")
        .ok_or_else(|| err(format!("{kind} needs 'coordinates'")))
}

fn array<'a>(v: &'a Value, what: &str) -> NgsiResult<&'a Vec<Value>> {
    v.as_array()
        .ok_or_else(|| err(format!("coordinates of {what} must be an array")))
}

fn position(v: &Value) -> NgsiResult<()> {
    let p = v
        .as_array()
        .ok_or_else(|| err("a position must be an array of numbers"))?;
    if !(2..=3).contains(&p.len()) {
        return Err(err("a position has two or three numbers"));
    }
    let nums: Vec<f64> = p
        .iter()
        .map(|x| {
            x.as_f64()
                .ok_or_else(|| err("a position must hold numbers only"))
        })
        .collect::<NgsiResult<_>>()?;
    if !(-180.0..=180.0).contains(&nums[0]) {
        return Err(err(format!(
            "longitude {} is out of range [-180, 180]",
            nums[0]
        )));
    }
    if !(-90.0..=90.0).contains(&nums[1]) {
        return Err(err(format!(
            "latitude {} is out of range [-90, 90]",
            nums[1]
        )));
    }
    Ok(())
}

fn line(v: &Value) -> NgsiResult<()> {
    let pts = array(v, "LineString")?;
    if pts.len() < 2 {
        return Err(err("a LineString needs at least two positions"));
    }
    pts.iter().try_for_each(position)
}

fn polygon(v: &Value) -> NgsiResult<()> {
    let rings = array(v, "Polygon")?;
    if rings.is_empty() {
        return Err(err("a Polygon needs at least one linear ring"));
    }
    for ring in rings {
        let pts = array(ring, "a linear ring")?;
        if pts.len() < 4 {
            return Err(err("a linear ring needs at least four positions"));
        }
        pts.iter().try_for_each(position)?;
        if pts.first() != pts.last() {
            return Err(err(
                "a linear ring must be closed (first and last positions equal)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn valid_geometries() {
        for g in [
            json!({"type": "Point", "coordinates": [2.35, 48.85]}),
            json!({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}),
            json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}),
            json!({"type": "MultiPoint", "coordinates": [[0, 0], [1, 1]]}),
            json!({"type": "GeometryCollection", "geometries": [{"type": "Point", "coordinates": [0, 0]}]}),
        ] {
            assert!(validate_geometry(&g).is_ok(), "{g}");
        }
    }

    #[test]
    fn invalid_geometries_say_why() {
        let cases = [
            (
                json!({"type": "Point", "coordinates": [2.35, 91]}),
                "latitude",
            ),
            (
                json!({"type": "Point", "coordinates": [181, 0]}),
                "longitude",
            ),
            (json!({"type": "Point"}), "coordinates"),
            (json!({"type": "Circle", "coordinates": [0, 0]}), "unknown"),
            (
                json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}),
                "closed",
            ),
            (
                json!({"type": "LineString", "coordinates": [[0, 0]]}),
                "two",
            ),
            (json!({"type": "Point", "coordinates": ["a", 0]}), "numbers"),
        ];
        for (g, word) in cases {
            let e = validate_geometry(&g).unwrap_err();
            assert!(e.detail.contains(word), "{g}: {}", e.detail);
        }
    }
}
