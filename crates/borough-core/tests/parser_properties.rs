//! Property tests of the entity parser: no input makes it panic, and every
//! entity it accepts survives a render → parse round trip in each representation.

use borough_core::entity::{
    ParseMode, parse_attribute, parse_entity, parse_fragment, render_entity,
};
use borough_core::{Context, Format, RenderOptions};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const KEYS: &[&str] = &[
    "id",
    "type",
    "value",
    "object",
    "languageMap",
    "vocab",
    "json",
    "valueList",
    "objectList",
    "datasetId",
    "observedAt",
    "unitCode",
    "objectType",
    "coordinates",
    "geometries",
    "@context",
    "scope",
    "createdAt",
    "p",
    "q",
    "Property",
    "location",
];

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-zA-Z0-9:/ <>\"=;()._-]{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("Property"),
            Just("Relationship"),
            Just("GeoProperty"),
            Just("LanguageProperty"),
            Just("VocabProperty"),
            Just("JsonProperty"),
            Just("ListProperty"),
            Just("ListRelationship"),
            Just("Point"),
            Just("Polygon"),
            Just("urn:ngsi-ld:x:1"),
            Just("2024-01-01T00:00:00Z"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(KEYS).prop_map(String::from),
                        "[a-z]{1,4}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-zA-Z0-9]{0,8}".prop_filter("not a reserved member", |n| {
        ![
            "id", "type", "scope", "value", "object", "json", "vocab", "location",
        ]
        .contains(&n.as_str())
    })
}

fn plain_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(Value::from),
        "[a-z ]{0,10}".prop_map(Value::String),
        prop::collection::vec(any::<i16>().prop_map(Value::from), 0..4).prop_map(Value::Array),
        ("[a-z]{1,5}", any::<i16>()).prop_map(|(k, v)| json!({ format!("k{k}"): v })),
    ]
}

/// A concise Property written as its bare value (objects need a `value` member).
fn bare_value() -> impl Strategy<Value = Value> {
    plain_value().prop_filter("a bare object is not an attribute", |v| !v.is_object())
}

fn attribute() -> impl Strategy<Value = Value> {
    prop_oneof![
        bare_value(),
        (plain_value(), prop::option::of("[A-Z]{3}"), prop::option::of(0i64..2_000_000_000)).prop_map(|(v, u, t)| {
            let mut m = json!({"type": "Property", "value": v});
            if let Some(u) = u {
                m["unitCode"] = json!(u);
            }
            if let Some(t) = t {
                m["observedAt"] = json!(borough_core::validate::format_datetime(t * 1_000_000));
            }
            m
        }),
        "[a-z0-9]{1,6}".prop_map(|o| json!({"type": "Relationship", "object": format!("urn:ngsi-ld:T:{o}")})),
        (-180.0f64..180.0, -90.0f64..90.0)
            .prop_map(|(x, y)| json!({"type": "GeoProperty", "value": {"type": "Point", "coordinates": [x, y]}})),
        "[a-z ]{1,8}".prop_map(|s| json!({"type": "LanguageProperty", "languageMap": {"en": s}})),
        "[a-z]{1,8}".prop_map(|s| json!({"type": "VocabProperty", "vocab": s})),
        plain_value().prop_map(|v| json!({"type": "JsonProperty", "json": v})),
        prop::collection::vec(any::<i16>(), 0..4).prop_map(|v| json!({"type": "ListProperty", "valueList": v})),
        (plain_value(), plain_value()).prop_map(|(a, b)| json!({"type": "Property", "value": a, "sub": {"type": "Property", "value": b}})),
    ]
}

fn entity() -> impl Strategy<Value = Value> {
    (
        "[a-z0-9]{1,8}",
        "[A-Z][a-z]{0,6}",
        prop::collection::btree_map(name(), attribute(), 0..6),
    )
        .prop_map(|(id, t, attrs)| {
            let mut m = Map::new();
            m.insert("id".into(), json!(format!("urn:ngsi-ld:{t}:{id}")));
            m.insert("type".into(), json!(t));
            m.extend(attrs);
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn no_input_panics_the_parser(v in any_json()) {
        let ctx = Context::core();
        let _ = parse_entity(&v, &ctx, 0);
        let _ = parse_fragment(&v, &ctx, ParseMode::Patch);
        let _ = parse_attribute("p", &v, &ctx, ParseMode::Full, 0);
        let _ = parse_attribute("p", &v, &ctx, ParseMode::Patch, 0);
    }

    #[test]
    fn accepted_entities_round_trip(v in entity()) {
        let ctx = Context::core();
        let e = parse_entity(&v, &ctx, 42).map_err(|e| TestCaseError::fail(format!("{v}: {e}")))?;
        for format in [Format::Normalized, Format::Concise] {
            let opts = RenderOptions { format, ..Default::default() };
            let rendered = Value::Object(render_entity(&e, &ctx, &opts));
            let again = parse_entity(&rendered, &ctx, 42)
                .map_err(|err| TestCaseError::fail(format!("{format:?} {rendered}: {err}")))?;
            prop_assert_eq!(&again, &e, "{:?} rendering: {}", format, rendered);
        }
    }
}

/// Text made of the query language's own characters, so the fuzzer reaches deep
/// into the grammar rather than failing on the first character.
fn query_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            prop::sample::select(vec![
                "a",
                "b.c",
                "x[y.z]",
                "==",
                "!=",
                ">",
                ">=",
                "<",
                "<=",
                "~=",
                "!~=",
                ";",
                "|",
                "(",
                ")",
                ",",
                "..",
                "\"",
                "\\",
                "!",
                "1",
                "-2.5e3",
                "true",
                "2024-01-01T00:00:00Z",
                "urn:x:1",
                "/",
                "#",
                "+",
                "[",
                "]",
                ".*",
                "(?i)",
                "observedAt",
                " ",
            ])
            .prop_map(String::from),
            "[\\PC]{0,3}",
        ],
        0..40,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn no_query_text_panics_the_query_parsers(src in query_text()) {
        let ctx = Context::core();
        if let Ok(q) = borough_core::query::parse_q(&src, &ctx) {
            // Whatever parses must evaluate without panicking.
            let e = parse_entity(&json!({"id": "urn:a:1", "type": "T", "a": 1, "b": {"value": 2, "c": 3}}), &ctx, 0).unwrap();
            let _ = borough_core::query::q::eval_q(&e, &q);
        }
        let _ = borough_core::query::parse_type_expr(&src, &ctx);
        let _ = borough_core::query::parse_scope_q(&src);
        let _ = borough_core::query::compile_id_pattern(&src);
    }
}
