//! Property test: whatever plan the indexes choose, a query returns exactly
//! what a plain scan filtered with `EntityQuery::matches` returns, in the same
//! order and with the same count — also after updates and deletes have moved
//! entities between index entries, and after a restart (indexes built at load).

use borough_core::entity::parse_entity;
use borough_core::query::geo::parse_geo_query;
use borough_core::query::{EntityQuery, compile_id_pattern, parse_q, parse_type_expr};
use borough_core::{Context, EntityOp};
use borough_embedded::EmbeddedStore;
use borough_store::EntityStore;
use borough_store::testsuite::assert_query_matches_scan;
use proptest::prelude::*;
use serde_json::{Value, json};
use std::sync::OnceLock;

const TENANT: &str = "planner";

fn entity(i: u64) -> Value {
    // A small deterministic generator, so the data set is the same every run.
    let r = |k: u64| (i.wrapping_mul(2_654_435_761).wrapping_add(k * 40_503)) % 97;
    let types = ["A", "B", "C"];
    let mut e = json!({
        "id": format!("urn:ngsi-ld:E:{i:04}"),
        "type": types[(r(1) % 3) as usize],
    });
    if r(2) % 5 != 0 {
        e["n"] = json!({"type": "Property", "value": r(3) % 20, "observedAt": format!("2024-01-{:02}T00:00:00Z", 1 + r(9) % 28)});
    }
    if r(4) % 4 != 0 {
        e["s"] = json!(format!("s{}", r(5) % 6));
    }
    e["f"] = json!(f64::from((r(6) % 40) as u32) / 4.0 - 2.0);
    e["b"] = json!(r(7) % 2 == 0);
    // A reading no other entity shares, as sensors' readings mostly are.
    e["u"] = json!(i as f64 * 0.5);
    e["tags"] = json!([format!("t{}", r(8) % 4), format!("t{}", r(10) % 4)]);
    e["rel"] = json!({"type": "Relationship", "object": format!("urn:ngsi-ld:R:{}", r(11) % 5)});
    e["category"] = json!({"type": "VocabProperty", "vocab": format!("v{}", r(12) % 3)});
    // Most entities are located: points on a grid, some lines and polygons, some without a location.
    let (x, y) = (
        2.0 + (r(16) % 20) as f64 * 0.001,
        48.0 + (r(17) % 20) as f64 * 0.001,
    );
    match r(18) % 6 {
        0 => {}
        1 => {
            e["location"] = json!({"type": "GeoProperty", "value": {"type": "LineString", "coordinates": [[x, y], [x + 0.003, y + 0.002]]}})
        }
        2 => {
            e["location"] = json!({"type": "GeoProperty", "value": {"type": "Polygon", "coordinates": [[[x, y], [x + 0.002, y], [x + 0.002, y + 0.002], [x, y + 0.002], [x, y]]]}})
        }
        _ => {
            e["location"] =
                json!({"type": "GeoProperty", "value": {"type": "Point", "coordinates": [x, y]}})
        }
    }
    if r(13) % 3 == 0 {
        e["n"] = json!([{"type": "Property", "value": r(14) % 20}, {"type": "Property", "value": r(15) % 20, "datasetId": "urn:ds:1"}]);
    }
    e
}

/// Two stores holding the same data, filled once with creations, then
/// updates and deletes: one as the writes left it (indexes kept up to date
/// change by change), one closed and opened again (indexes built at load).
struct Stores {
    written: EmbeddedStore,
    reopened: EmbeddedStore,
    _rt: tokio::runtime::Runtime,
}

fn stores() -> &'static Stores {
    static STORES: OnceLock<Stores> = OnceLock::new();
    STORES.get_or_init(|| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let written_dir = tempfile::tempdir().unwrap().keep();
        let written = borough_embedded::open(&written_dir).unwrap();
        fill(&written, &rt);
        let reopened_dir = tempfile::tempdir().unwrap().keep();
        let first = borough_embedded::open(&reopened_dir).unwrap();
        fill(&first, &rt);
        rt.block_on(first.close()).unwrap();
        drop(first);
        let reopened = borough_embedded::open(&reopened_dir).unwrap();
        Stores {
            written,
            reopened,
            _rt: rt,
        }
    })
}

fn fill(store: &EmbeddedStore, rt: &tokio::runtime::Runtime) {
    let ctx = Context::core();
    let ops: Vec<EntityOp> = (0..400)
        .map(|i| EntityOp::Create(parse_entity(&entity(i), &ctx, 0).unwrap()))
        .collect();
    rt.block_on(store.write(TENANT, ops)).unwrap();
    // Move index entries: rewrite some entities with other values, delete others.
    let updates: Vec<EntityOp> = (0..400)
        .step_by(7)
        .map(|i| EntityOp::Upsert {
            entity: parse_entity(
                &entity(i + 1000).as_object().unwrap().iter().fold(
                    json!({"id": format!("urn:ngsi-ld:E:{i:04}")}),
                    |mut acc, (k, v)| {
                        if k != "id" {
                            acc[k] = v.clone();
                        }
                        acc
                    },
                ),
                &ctx,
                0,
            )
            .unwrap(),
            replace: true,
        })
        .chain((0..400).step_by(11).map(|i| EntityOp::Delete {
            id: format!("urn:ngsi-ld:E:{i:04}"),
        }))
        .collect();
    rt.block_on(store.write(TENANT, updates)).unwrap();
    // Partial updates: one attribute changes, the location and the rest stay.
    let readings: Vec<EntityOp> = (0..400)
        .step_by(5)
        .map(|i| EntityOp::Upsert {
            entity: parse_entity(
                &json!({"id": format!("urn:ngsi-ld:E:{i:04}"), "type": "A",
                    "f": (i % 9) as f64 - 4.0, "u": (i % 3) as f64}),
                &ctx,
                0,
            )
            .unwrap(),
            replace: false,
        })
        .collect();
    rt.block_on(store.write(TENANT, readings)).unwrap();
}

fn value_for(attr: &str) -> BoxedStrategy<String> {
    match attr {
        "u" => prop_oneof![
            (0i32..210).prop_map(|v| format!("{}", f64::from(v) / 2.0)),
            (0i32..210, 0i32..210).prop_map(|(a, b)| format!("{a}..{b}")),
            Just("1".to_string()),
        ]
        .boxed(),
        "n" | "f" => prop_oneof![
            (-3i32..22).prop_map(|v| v.to_string()),
            (-3i32..22, -3i32..22).prop_map(|(a, b)| format!("{a}..{b}")),
            prop::collection::vec(-3i32..22, 2..4).prop_map(|v| v
                .iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(",")),
            Just("1.5".to_string()),
            Just("\"5\"".to_string()),
        ]
        .boxed(),
        "s" | "tags" => prop_oneof![
            (0u8..7).prop_map(|v| format!("\"s{v}\"")),
            (0u8..5).prop_map(|v| format!("t{v}")),
            ((0u8..7), (0u8..7)).prop_map(|(a, b)| format!("\"s{a}\"..\"s{b}\"")),
            Just("\"s1\",\"t2\"".to_string()),
        ]
        .boxed(),
        "b" => prop_oneof![
            Just("true".to_string()),
            Just("false".to_string()),
            Just("1".to_string())
        ]
        .boxed(),
        "rel" => (0u8..6).prop_map(|v| format!("urn:ngsi-ld:R:{v}")).boxed(),
        "category" => (0u8..4).prop_map(|v| format!("v{v}")).boxed(),
        _ => prop_oneof![
            Just("2024-01-10T00:00:00Z".to_string()),
            Just("2024-01-05T00:00:00Z..2024-01-20T00:00:00Z".to_string())
        ]
        .boxed(),
    }
}

fn term() -> impl Strategy<Value = String> {
    let attr = prop::sample::select(vec![
        "n",
        "s",
        "f",
        "u",
        "b",
        "tags",
        "rel",
        "category",
        "missing",
        "n.observedAt",
    ]);
    (
        attr,
        prop::sample::select(vec!["==", "!=", ">", ">=", "<", "<=", "~=", "!~=", "", "!"]),
    )
        .prop_flat_map(|(a, op)| {
            let a = a.to_string();
            match op {
                "" => Just(a).boxed(),
                "!" => Just(format!("!{a}")).boxed(),
                "~=" | "!~=" => {
                    prop::sample::select(vec!["s[0-2]", "^t", "1", "\"(?i)S\"", "\"s(1|3)\""])
                        .prop_map(move |r| format!("{a}{op}{r}"))
                        .boxed()
                }
                _ => value_for(&a)
                    .prop_map(move |v| {
                        // Ranges and lists go with == and != only: keep their first value otherwise.
                        let v = if matches!(op, "==" | "!=") {
                            v
                        } else {
                            v.split("..")
                                .next()
                                .and_then(|x| x.split(',').next())
                                .unwrap_or("0")
                                .to_string()
                        };
                        format!("{a}{op}{v}")
                    })
                    .boxed(),
            }
        })
}

fn q_expr() -> impl Strategy<Value = String> {
    term().prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a};{b}")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a}|{b}")),
            (inner.clone(), inner).prop_map(|(a, b)| format!("({a}|{b})")),
        ]
    })
}

fn geo_query() -> impl Strategy<Value = (String, String, String)> {
    let point = (0u32..22, 0u32..22).prop_map(|(a, b)| {
        format!(
            "[{},{}]",
            2.0 + f64::from(a) * 0.001,
            48.0 + f64::from(b) * 0.001
        )
    });
    let square = (0u32..20, 0u32..20, 1u32..10).prop_map(|(a, b, w)| {
        let (x, y, d) = (
            2.0 + f64::from(a) * 0.001,
            48.0 + f64::from(b) * 0.001,
            f64::from(w) * 0.001,
        );
        format!(
            "[[[{x},{y}],[{},{y}],[{},{}],[{x},{}],[{x},{y}]]]",
            x + d,
            x + d,
            y + d,
            y + d
        )
    });
    prop_oneof![
        (point.clone(), 0u32..800).prop_map(|(p, d)| (
            format!("near;maxDistance=={d}"),
            "Point".to_string(),
            p
        )),
        (point.clone(), 0u32..800).prop_map(|(p, d)| (
            format!("near;minDistance=={d}"),
            "Point".to_string(),
            p
        )),
        (
            square.clone(),
            prop::sample::select(vec![
                "within",
                "intersects",
                "contains",
                "overlaps",
                "disjoint",
                "equals"
            ])
        )
            .prop_map(|(c, rel)| (rel.to_string(), "Polygon".to_string(), c)),
        (
            point,
            prop::sample::select(vec!["intersects", "equals", "disjoint"])
        )
            .prop_map(|(p, rel)| (rel.to_string(), "Point".to_string(), p)),
    ]
}

#[derive(Debug, Clone)]
struct Spec {
    types: Option<&'static str>,
    q: Option<String>,
    attrs: Vec<&'static str>,
    ids: Vec<u64>,
    id_pattern: Option<&'static str>,
    geo: Option<(String, String, String)>,
    offset: usize,
    limit: usize,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::option::of(prop::sample::select(vec![
            "A", "B", "A,B", "A;B", "(A|C)", "D",
        ])),
        prop::option::of(q_expr()),
        prop::sample::subsequence(vec!["n", "s", "missing", "rel"], 0..3),
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(0u64..420, 1..6)],
        prop::option::of(prop::sample::select(vec![
            ".*:00[0-4].$",
            "E:01",
            "^urn:ngsi-ld:E:0[0-9]{2}7$",
            "^urn:ngsi-ld:E:01",
            "^urn:ngsi-ld:E:00?3",
        ])),
        prop::option::of(geo_query()),
        0usize..40,
        1usize..60,
    )
        .prop_map(
            |(types, q, attrs, ids, id_pattern, geo, offset, limit)| Spec {
                types,
                q,
                attrs,
                ids,
                id_pattern,
                geo,
                offset,
                limit,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn indexed_plans_agree_with_a_plain_scan(s in spec()) {
        let ctx = Context::core();
        let stores = stores();
        let q = EntityQuery {
            ids: s.ids.iter().map(|i| format!("urn:ngsi-ld:E:{i:04}")).collect(),
            id_pattern: s.id_pattern.map(|p| compile_id_pattern(p).unwrap()),
            types: s.types.map(|t| parse_type_expr(t, &ctx).unwrap()),
            attrs: s.attrs.iter().map(|a| ctx.expand(a).into_owned()).collect(),
            q: match &s.q {
                Some(src) => {
                    Some(parse_q(src, &ctx).map_err(|e| TestCaseError::fail(format!("{src}: {e}")))?)
                }
                None => None,
            },
            geo: s.geo.as_ref().map(|(rel, g, c)| parse_geo_query(Some(rel), Some(g), Some(c), None, &ctx).unwrap()),
            ..Default::default()
        };
        assert_query_matches_scan(&stores.written, TENANT, &q, s.offset, s.limit);
        assert_query_matches_scan(&stores.reopened, TENANT, &q, s.offset, s.limit);
    }
}

#[test]
fn the_data_set_exercises_the_planner() {
    // Guard against a vacuous property: typical queries must match some entities and not all.
    let ctx = Context::core();
    let store = &stores().written;
    let q = EntityQuery {
        q: Some(parse_q("n>=10", &ctx).unwrap()),
        ..Default::default()
    };
    let n = store.query(TENANT, &q, 0, 1000, true).total.unwrap();
    let all = store.entity_count(TENANT);
    assert!(n > 20 && n < all, "{n} of {all}");
    let geo = parse_geo_query(
        Some("within"),
        Some("Polygon"),
        Some("[[[2.0,48.0],[2.01,48.0],[2.01,48.01],[2.0,48.01],[2.0,48.0]]]"),
        None,
        &ctx,
    )
    .unwrap();
    let q = EntityQuery {
        geo: Some(geo),
        ..Default::default()
    };
    let n = store.query(TENANT, &q, 0, 1000, true).total.unwrap();
    assert!(n > 20 && n < all, "geo: {n} of {all}");
}
