//! Geo-queries (clause 4.10): `georel`, `geometry`, `coordinates`,
//! `geoproperty`. Distances are geodesic on the WGS84 ellipsoid (Karney's
//! algorithm); for lines and polygons the closest point is found on the sphere
//! and the distance to it measured on the ellipsoid.

use crate::context::Context;
use crate::entity::{AttrKind, Entity};
use crate::error::{NgsiError, NgsiResult};
use crate::geojson::validate_geometry;
use geo::{
    BoundingRect, Closest, Contains, Coord, Distance, Geodesic, Geometry, GeometryCollection,
    HaversineClosestPoint, LineString, MultiLineString, MultiPoint, MultiPolygon, Polygon, Rect,
    Relate,
};
use serde_json::Value;

/// A position (longitude, latitude), as geo-queries use it.
pub use geo::Point;

/// The default GeoProperty of geo-queries.
pub const DEFAULT_GEOPROPERTY: &str = "https://uri.etsi.org/ngsi-ld/location";
/// Longest `coordinates` text accepted.
const MAX_COORDINATES_LEN: usize = 64 * 1024;

/// A geo relation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GeoRel {
    /// Within `max` metres and/or at least `min` metres of the query point.
    Near {
        max: Option<f64>,
        min: Option<f64>,
    },
    Within,
    Contains,
    Intersects,
    Overlaps,
    Disjoint,
    Equals,
}

/// A parsed geo-query.
#[derive(Clone, Debug)]
pub struct GeoQuery {
    pub rel: GeoRel,
    pub geometry: Geometry<f64>,
    /// The GeoProperty compared (expanded).
    pub geoproperty: String,
}

/// A geometry as an index keeps it: its bounding box.
pub type Envelope = Rect<f64>;

fn bad(detail: impl Into<String>) -> NgsiError {
    NgsiError::bad_data(detail.into())
}

/// Parses the query-string form (`georel`, `geometry`, `coordinates`, `geoproperty`).
pub fn parse_geo_query(
    georel: Option<&str>,
    geometry: Option<&str>,
    coordinates: Option<&str>,
    geoproperty: Option<&str>,
    ctx: &Context,
) -> NgsiResult<GeoQuery> {
    let georel = georel.ok_or_else(|| bad("a geo-query needs georel"))?;
    let geometry = geometry.ok_or_else(|| bad("a geo-query needs geometry"))?;
    let coordinates = coordinates.ok_or_else(|| bad("a geo-query needs coordinates"))?;
    if coordinates.len() > MAX_COORDINATES_LEN {
        return Err(bad(format!(
            "coordinates are longer than {MAX_COORDINATES_LEN} characters"
        )));
    }
    let coords: Value = serde_json::from_str(coordinates)
        .map_err(|e| bad(format!("coordinates are not a JSON array of numbers: {e}")))?;
    build(georel, geometry, coords, geoproperty, ctx)
}

/// Parses the `geoQ` member of a query body or subscription.
pub fn parse_geo_q(v: &Value, ctx: &Context) -> NgsiResult<GeoQuery> {
    let o = v.as_object().ok_or_else(|| bad("geoQ must be an object"))?;
    let text = |k: &str| -> NgsiResult<Option<&str>> {
        match o.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(bad(format!("geoQ.{k} must be a string"))),
        }
    };
    let georel = text("georel")?.ok_or_else(|| bad("geoQ needs georel"))?;
    let geometry = text("geometry")?.ok_or_else(|| bad("geoQ needs geometry"))?;
    let coords = match o.get("coordinates") {
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| bad(format!("geoQ.coordinates are not a JSON array: {e}")))?,
        Some(v @ Value::Array(_)) => v.clone(),
        _ => return Err(bad("geoQ needs coordinates (an array)")),
    };
    build(georel, geometry, coords, text("geoproperty")?, ctx)
}

fn build(
    georel: &str,
    geometry: &str,
    coords: Value,
    geoproperty: Option<&str>,
    ctx: &Context,
) -> NgsiResult<GeoQuery> {
    let rel = parse_georel(georel)?;
    let gj = serde_json::json!({"type": geometry, "coordinates": coords});
    if geometry == "GeometryCollection" || !crate::geojson::GEOMETRY_TYPES.contains(&geometry) {
        return Err(bad(format!(
            "unknown geometry '{geometry}'; use Point, MultiPoint, LineString, MultiLineString, Polygon or MultiPolygon"
        )));
    }
    validate_geometry(&gj)?;
    let geometry =
        to_geometry(&gj).ok_or_else(|| bad("coordinates do not form the given geometry"))?;
    if matches!(rel, GeoRel::Near { .. }) && !matches!(geometry, Geometry::Point(_)) {
        return Err(bad("georel near needs a Point geometry"));
    }
    let geoproperty = match geoproperty {
        Some(g) => {
            crate::validate::check_name("geoproperty", g)?;
            ctx.expand(g).into_owned()
        }
        None => DEFAULT_GEOPROPERTY.to_string(),
    };
    Ok(GeoQuery {
        rel,
        geometry,
        geoproperty,
    })
}

fn parse_georel(s: &str) -> NgsiResult<GeoRel> {
    let mut parts = s.split(';');
    let name = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let simple = |rel| {
        if rest.is_empty() {
            Ok(rel)
        } else {
            Err(bad(format!("georel {name} takes no modifiers")))
        }
    };
    match name {
        "near" => {
            let (mut max, mut min) = (None, None);
            for m in rest {
                let (k, v) = m.split_once("==").ok_or_else(|| {
                    bad(format!(
                        "georel modifier '{m}' must look like maxDistance==500"
                    ))
                })?;
                let d: f64 = v
                    .parse()
                    .ok()
                    .filter(|d: &f64| d.is_finite() && *d >= 0.0)
                    .ok_or_else(|| {
                        bad(format!(
                            "{k} must be a non-negative number of metres, not '{v}'"
                        ))
                    })?;
                match k {
                    "maxDistance" => max = Some(d),
                    "minDistance" => min = Some(d),
                    _ => {
                        return Err(bad(format!(
                            "unknown georel modifier '{k}'; use maxDistance or minDistance"
                        )));
                    }
                }
            }
            if max.is_none() && min.is_none() {
                return Err(bad("georel near needs maxDistance or minDistance"));
            }
            Ok(GeoRel::Near { max, min })
        }
        "within" => simple(GeoRel::Within),
        "contains" => simple(GeoRel::Contains),
        "intersects" => simple(GeoRel::Intersects),
        "overlaps" => simple(GeoRel::Overlaps),
        "disjoint" => simple(GeoRel::Disjoint),
        "equals" => simple(GeoRel::Equals),
        other => Err(bad(format!(
            "unknown georel '{other}'; use near, within, contains, intersects, overlaps, disjoint or equals"
        ))),
    }
}

fn coord(v: &Value) -> Option<Coord<f64>> {
    let a = v.as_array()?;
    Some(Coord {
        x: a.first()?.as_f64()?,
        y: a.get(1)?.as_f64()?,
    })
}

fn line(v: &Value) -> Option<LineString<f64>> {
    Some(LineString::new(
        v.as_array()?.iter().map(coord).collect::<Option<_>>()?,
    ))
}

fn polygon(v: &Value) -> Option<Polygon<f64>> {
    let rings = v.as_array()?;
    let exterior = line(rings.first()?)?;
    let interiors = rings[1..].iter().map(line).collect::<Option<_>>()?;
    Some(Polygon::new(exterior, interiors))
}

/// A GeoJSON geometry (already validated) as a `geo` geometry.
pub fn to_geometry(v: &Value) -> Option<Geometry<f64>> {
    let c = v.get("coordinates");
    Some(match v.get("type")?.as_str()? {
        "Point" => Geometry::Point(Point(coord(c?)?)),
        "MultiPoint" => Geometry::MultiPoint(MultiPoint::new(
            c?.as_array()?
                .iter()
                .map(|p| coord(p).map(Point))
                .collect::<Option<_>>()?,
        )),
        "LineString" => Geometry::LineString(line(c?)?),
        "MultiLineString" => Geometry::MultiLineString(MultiLineString::new(
            c?.as_array()?.iter().map(line).collect::<Option<_>>()?,
        )),
        "Polygon" => Geometry::Polygon(polygon(c?)?),
        "MultiPolygon" => Geometry::MultiPolygon(MultiPolygon::new(
            c?.as_array()?.iter().map(polygon).collect::<Option<_>>()?,
        )),
        "GeometryCollection" => Geometry::GeometryCollection(GeometryCollection::new_from(
            v.get("geometries")?
                .as_array()?
                .iter()
                .map(to_geometry)
                .collect::<Option<_>>()?,
        )),
        _ => return None,
    })
}

/// The geometries of an entity's GeoProperty, one per instance.
pub fn entity_geometries(e: &Entity, geoproperty: &str) -> Vec<Geometry<f64>> {
    e.attrs
        .get(geoproperty)
        .map(|inst| {
            inst.iter()
                .filter(|a| a.kind == AttrKind::GeoProperty)
                .filter_map(|a| to_geometry(&a.value))
                .collect()
        })
        .unwrap_or_default()
}

/// Metres from `p` to the nearest point of `g` (0 inside a polygon).
pub fn distance_m(g: &Geometry<f64>, p: &Point<f64>) -> f64 {
    if let Geometry::Point(q) = g {
        return Geodesic.distance(*q, *p);
    }
    if g.contains(p) {
        return 0.0;
    }
    match g.haversine_closest_point(p) {
        Closest::Intersection(_) => 0.0,
        Closest::SinglePoint(q) => Geodesic.distance(q, *p),
        Closest::Indeterminate => f64::INFINITY,
    }
}

impl GeoQuery {
    /// Whether one geometry of an entity satisfies the relation.
    pub fn matches_geometry(&self, g: &Geometry<f64>) -> bool {
        match self.rel {
            GeoRel::Near { max, min } => {
                let Geometry::Point(p) = &self.geometry else {
                    return false;
                };
                let d = distance_m(g, p);
                max.is_none_or(|m| d <= m) && min.is_none_or(|m| d >= m)
            }
            GeoRel::Within => g.relate(&self.geometry).is_within(),
            GeoRel::Contains => g.relate(&self.geometry).is_contains(),
            GeoRel::Intersects => g.relate(&self.geometry).is_intersects(),
            GeoRel::Overlaps => g.relate(&self.geometry).is_overlaps(),
            GeoRel::Disjoint => g.relate(&self.geometry).is_disjoint(),
            GeoRel::Equals => g.relate(&self.geometry).is_equal_topo(),
        }
    }

    /// Whether the entity satisfies the geo-query (any instance of its GeoProperty).
    ///
    /// For `near` the entity's distance is that of its closest instance.
    pub fn matches(&self, e: &Entity) -> bool {
        if self.near_point().is_some() {
            return self.distance(e).is_some_and(|d| self.within_bounds(d));
        }
        entity_geometries(e, &self.geoproperty)
            .iter()
            .any(|g| self.matches_geometry(g))
    }

    /// For `near`, the entity's distance to the query point (its closest instance).
    pub fn distance(&self, e: &Entity) -> Option<f64> {
        let p = self.near_point()?;
        e.attrs
            .get(&self.geoproperty)?
            .iter()
            .filter(|a| a.kind == AttrKind::GeoProperty)
            .filter_map(|a| match point_of(&a.value) {
                // Points, the common case, need no geometry built.
                Some(q) => Some(Geodesic.distance(q, p)),
                None => to_geometry(&a.value).map(|g| distance_m(&g, &p)),
            })
            .min_by(f64::total_cmp)
    }

    /// The query point of a `near` query.
    pub fn near_point(&self) -> Option<Point<f64>> {
        match (self.rel, &self.geometry) {
            (GeoRel::Near { .. }, Geometry::Point(p)) => Some(*p),
            _ => None,
        }
    }

    /// Whether a distance satisfies `near`'s bounds.
    pub fn within_bounds(&self, d: f64) -> bool {
        match self.rel {
            GeoRel::Near { max, min } => max.is_none_or(|m| d <= m) && min.is_none_or(|m| d >= m),
            _ => false,
        }
    }

    /// The largest distance `near` accepts, if bounded.
    pub fn max_distance(&self) -> Option<f64> {
        match self.rel {
            GeoRel::Near { max, .. } => max,
            _ => None,
        }
    }

    /// A box that holds every geometry that can match, or `None` when the
    /// relation can match geometries anywhere (disjoint, near with only a minimum).
    pub fn search_box(&self) -> Option<Envelope> {
        match self.rel {
            GeoRel::Disjoint | GeoRel::Near { max: None, .. } => None,
            GeoRel::Near { max: Some(max), .. } => {
                let Geometry::Point(p) = &self.geometry else {
                    return None;
                };
                Some(around(p, max))
            }
            _ => self.geometry.bounding_rect(),
        }
    }
}

/// A box certain to hold every point within `metres` of `p` on the ellipsoid.
pub fn around(p: &Point<f64>, metres: f64) -> Envelope {
    // A degree of latitude is at least 110,574 m; a degree of longitude at
    // least that times cos(latitude). Widen by 1% for safety.
    let dlat = metres / 110_574.0 * 1.01 + 1e-9;
    let lat_lo = (p.y() - dlat).max(-90.0);
    let lat_hi = (p.y() + dlat).min(90.0);
    let widest = lat_lo.abs().max(lat_hi.abs());
    let cos = widest.to_radians().cos();
    let dlon = if cos < 1e-6 { 360.0 } else { dlat / cos };
    let (lon_lo, lon_hi) = if dlon >= 180.0 {
        (-180.0, 180.0)
    } else {
        ((p.x() - dlon).max(-180.0), (p.x() + dlon).min(180.0))
    };
    Rect::new(
        Coord {
            x: lon_lo,
            y: lat_lo,
        },
        Coord {
            x: lon_hi,
            y: lat_hi,
        },
    )
}

/// The position of a GeoJSON Point, read without building a geometry.
fn point_of(v: &Value) -> Option<Point<f64>> {
    if v.get("type")?.as_str()? != "Point" {
        return None;
    }
    let c = v.get("coordinates")?.as_array()?;
    Some(Point::new(c.first()?.as_f64()?, c.get(1)?.as_f64()?))
}

/// A lower bound, in metres, of the distance from a point at latitude `lat`
/// to anything `degrees` away from it in plain longitude/latitude terms: a
/// degree is at least 110,574 m of latitude, and of longitude at least that
/// times the cosine of the highest latitude within reach. 0.5% is kept in hand.
pub fn metres_at_least(lat: f64, degrees: f64) -> f64 {
    let highest = (lat.abs() + degrees).min(90.0);
    110_574.0 * highest.to_radians().cos() * degrees * 0.995
}

/// The bounding box of a stored GeoJSON value, for the spatial index.
pub fn envelope(v: &Value) -> Option<Envelope> {
    to_geometry(v)?.bounding_rect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::parse_entity;
    use serde_json::json;

    fn q(georel: &str, geometry: &str, coords: &str) -> GeoQuery {
        parse_geo_query(
            Some(georel),
            Some(geometry),
            Some(coords),
            None,
            &Context::core(),
        )
        .unwrap()
    }

    fn located(geometry: Value) -> Entity {
        parse_entity(
            &json!({"id": "urn:a:1", "type": "T", "location": {"type": "GeoProperty", "value": geometry}}),
            &Context::core(),
            0,
        )
        .unwrap()
    }

    #[test]
    fn geodesic_distance_matches_a_known_value() {
        // Paris (Notre-Dame) to London (Trafalgar Square): about 343.5 km on WGS84.
        let d = distance_m(
            &Geometry::Point(Point::new(2.3499, 48.8530)),
            &Point::new(-0.1281, 51.5080),
        );
        assert!((d - 343_500.0).abs() < 1_000.0, "{d}");
        // One degree of latitude at the equator: 110,574 m on WGS84.
        let d = distance_m(
            &Geometry::Point(Point::new(0.0, 0.0)),
            &Point::new(0.0, 1.0),
        );
        assert!((d - 110_574.0).abs() < 5.0, "{d}");
    }

    #[test]
    fn near_max_and_min_distance() {
        // 0.001 degrees of latitude is about 110.6 m.
        let e = located(json!({"type": "Point", "coordinates": [2.0, 48.001]}));
        assert!(q("near;maxDistance==120", "Point", "[2.0,48.0]").matches(&e));
        assert!(!q("near;maxDistance==100", "Point", "[2.0,48.0]").matches(&e));
        assert!(q("near;minDistance==100", "Point", "[2.0,48.0]").matches(&e));
        assert!(!q("near;minDistance==120", "Point", "[2.0,48.0]").matches(&e));
        assert!(
            q(
                "near;minDistance==100;maxDistance==120",
                "Point",
                "[2.0,48.0]"
            )
            .matches(&e)
        );
        let d = q("near;maxDistance==1000", "Point", "[2.0,48.0]")
            .distance(&e)
            .unwrap();
        assert!((d - 111.2).abs() < 0.5, "{d}");
    }

    #[test]
    fn near_a_polygon_measures_to_its_edge() {
        let square = located(
            json!({"type": "Polygon", "coordinates": [[[2.0, 48.0], [2.01, 48.0], [2.01, 48.01], [2.0, 48.01], [2.0, 48.0]]]}),
        );
        let inside = q("near;maxDistance==1", "Point", "[2.005,48.005]");
        assert_eq!(inside.distance(&square), Some(0.0));
        // 0.001 degrees south of the southern edge: about 111 m.
        let south = q("near;maxDistance==200", "Point", "[2.005,47.999]");
        let d = south.distance(&square).unwrap();
        assert!((d - 111.2).abs() < 1.0, "{d}");
    }

    #[test]
    fn within_contains_intersects_overlaps_disjoint_equals() {
        let district = "[[[2.0,48.0],[2.1,48.0],[2.1,48.1],[2.0,48.1],[2.0,48.0]]]";
        let point_in = located(json!({"type": "Point", "coordinates": [2.05, 48.05]}));
        let point_out = located(json!({"type": "Point", "coordinates": [2.15, 48.05]}));
        let on_edge = located(json!({"type": "Point", "coordinates": [2.0, 48.05]}));
        let within = q("within", "Polygon", district);
        assert!(within.matches(&point_in));
        assert!(!within.matches(&point_out));
        assert!(
            !within.matches(&on_edge),
            "a point on the boundary is not within"
        );
        assert!(q("intersects", "Polygon", district).matches(&on_edge));
        assert!(q("disjoint", "Polygon", district).matches(&point_out));
        assert!(!q("disjoint", "Polygon", district).matches(&on_edge));

        // A polygon with a hole: points in the hole are not within.
        let holed = "[[[2.0,48.0],[2.1,48.0],[2.1,48.1],[2.0,48.1],[2.0,48.0]],[[2.04,48.04],[2.06,48.04],[2.06,48.06],[2.04,48.06],[2.04,48.04]]]";
        assert!(!q("within", "Polygon", holed).matches(&point_in));

        let park = located(
            json!({"type": "Polygon", "coordinates": [[[2.0, 48.0], [2.1, 48.0], [2.1, 48.1], [2.0, 48.1], [2.0, 48.0]]]}),
        );
        assert!(q("contains", "Point", "[2.05,48.05]").matches(&park));
        assert!(!q("contains", "Point", "[2.5,48.05]").matches(&park));
        assert!(q("equals", "Polygon", district).matches(&park));
        let shifted = "[[[2.05,48.05],[2.15,48.05],[2.15,48.15],[2.05,48.15],[2.05,48.05]]]";
        assert!(q("overlaps", "Polygon", shifted).matches(&park));
        assert!(
            !q("overlaps", "Polygon", district).matches(&park),
            "equal polygons do not overlap"
        );

        let street =
            located(json!({"type": "LineString", "coordinates": [[1.9, 48.05], [2.2, 48.05]]}));
        assert!(q("intersects", "Polygon", district).matches(&street));
        assert!(q("intersects", "LineString", "[[2.05,47.9],[2.05,48.2]]").matches(&street));
        assert!(!q("within", "Polygon", district).matches(&street));
    }

    #[test]
    fn search_boxes_hold_every_match() {
        let near = q("near;maxDistance==500", "Point", "[2.35,48.85]");
        let b = near.search_box().unwrap();
        for (dx, dy) in [
            (0.0068, 0.0),
            (0.0, 0.00449),
            (-0.0068, 0.0),
            (0.0, -0.00449),
        ] {
            // Points just under 500 m away in each direction lie in the box.
            let p = Point::new(2.35 + dx, 48.85 + dy);
            let d = Geodesic.distance(p, Point::new(2.35, 48.85));
            assert!(d < 500.0, "{d}");
            assert!(
                b.min().x <= p.x()
                    && p.x() <= b.max().x
                    && b.min().y <= p.y()
                    && p.y() <= b.max().y
            );
        }
        assert!(q("disjoint", "Point", "[0,0]").search_box().is_none());
    }

    #[test]
    fn bad_geo_queries_say_what_is_wrong() {
        let ctx = Context::core();
        let cases = [
            (
                Some("nearby"),
                Some("Point"),
                Some("[0,0]"),
                "unknown georel",
            ),
            (Some("near"), Some("Point"), Some("[0,0]"), "maxDistance"),
            (
                Some("near;maxDistance==-1"),
                Some("Point"),
                Some("[0,0]"),
                "non-negative",
            ),
            (
                Some("near;maxDistance==5"),
                Some("Polygon"),
                Some("[[[0,0],[1,0],[1,1],[0,0]]]"),
                "Point",
            ),
            (
                Some("within"),
                Some("Polygon"),
                Some("[[[0,0],[1,0],[1,1],[0,1]]]"),
                "closed",
            ),
            (Some("within"), Some("Point"), Some("[0,95]"), "latitude"),
            (
                Some("within"),
                Some("Circle"),
                Some("[0,0]"),
                "unknown geometry",
            ),
            (Some("within"), Some("Point"), Some("[0,"), "JSON"),
            (None, Some("Point"), Some("[0,0]"), "georel"),
            (Some("within"), None, Some("[0,0]"), "geometry"),
            (Some("within"), Some("Point"), None, "coordinates"),
        ];
        for (r, g, c, word) in cases {
            let e = parse_geo_query(r, g, c, None, &ctx).unwrap_err();
            assert!(e.detail.contains(word), "{r:?} {g:?} {c:?}: {}", e.detail);
        }
    }
}
