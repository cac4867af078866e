use super::*;
use crate::entity::parse_entity;
use serde_json::json;

fn spot(id: u32) -> Entity {
    let v = json!({
        "id": format!("urn:ngsi-ld:ParkingSpot:{id}"),
        "type": "ParkingSpot",
        "scope": ["/city/north/zone1"],
        "status": {"type": "Property", "value": if id.is_multiple_of(2) { "free" } else { "occupied" },
                   "observedAt": format!("2024-01-0{}T10:00:00Z", 1 + id % 9),
                   "reliability": {"type": "Property", "value": 0.5 + f64::from(id % 5) / 10.0}},
        "occupancy": {"type": "Property", "value": id * 10, "unitCode": "P1"},
        "address": {"type": "Property", "value": {"street": format!("Street {}", id % 3), "zip": {"code": id % 4}}},
        "refParkingSite": {"type": "Relationship", "object": format!("urn:ngsi-ld:ParkingSite:{}", id % 2)},
        "tags": {"type": "Property", "value": ["a", format!("t{id}")]},
        "category": {"type": "VocabProperty", "vocab": if id < 3 { "onStreet" } else { "offStreet" }},
        "name": {"type": "LanguageProperty", "languageMap": {"en": format!("Spot {id}"), "fr": format!("Place {id}")}},
        "enabled": id != 4,
        "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2.0, 48.0]}}
    });
    parse_entity(&v, &Context::core(), 0).unwrap()
}

fn ids_matching(q: &str) -> Vec<u32> {
    let q = parse_q(q, &Context::core()).unwrap_or_else(|e| panic!("{q}: {e}"));
    (0..8).filter(|i| q::eval_q(&spot(*i), &q)).collect()
}

#[test]
fn comparisons() {
    assert_eq!(ids_matching("occupancy==30"), [3]);
    assert_eq!(ids_matching("occupancy!=30"), [0, 1, 2, 4, 5, 6, 7]);
    assert_eq!(ids_matching("occupancy>50"), [6, 7]);
    assert_eq!(ids_matching("occupancy>=50"), [5, 6, 7]);
    assert_eq!(ids_matching("occupancy<20"), [0, 1]);
    assert_eq!(ids_matching("occupancy<=20"), [0, 1, 2]);
    assert_eq!(ids_matching("status==\"free\""), [0, 2, 4, 6]);
    assert_eq!(
        ids_matching("status==free"),
        [0, 2, 4, 6],
        "unquoted strings are accepted"
    );
    assert_eq!(ids_matching("enabled==false"), [4]);
    assert_eq!(ids_matching("enabled==true"), [0, 1, 2, 3, 5, 6, 7]);
}

#[test]
fn ranges_and_value_lists() {
    assert_eq!(ids_matching("occupancy==20..40"), [2, 3, 4]);
    assert_eq!(ids_matching("occupancy!=20..40"), [0, 1, 5, 6, 7]);
    assert_eq!(ids_matching("occupancy==10,30,70"), [1, 3, 7]);
    assert_eq!(ids_matching("status==\"free\",\"nope\""), [0, 2, 4, 6]);
    assert_eq!(
        ids_matching("status.observedAt==2024-01-02T00:00:00Z..2024-01-03T23:00:00Z"),
        [1, 2]
    );
}

#[test]
fn patterns() {
    assert_eq!(ids_matching("status~=^fr"), [0, 2, 4, 6]);
    assert_eq!(ids_matching("status!~=^fr"), [1, 3, 5, 7]);
    assert_eq!(ids_matching("status~=\"(?i)OCC\""), [1, 3, 5, 7]);
    assert_eq!(
        ids_matching("name~=Place 3"),
        [3],
        "language maps match any language"
    );
}

#[test]
fn existence_and_negation() {
    assert_eq!(ids_matching("occupancy").len(), 8);
    assert_eq!(ids_matching("ghost"), Vec::<u32>::new());
    assert_eq!(ids_matching("!ghost").len(), 8);
    assert_eq!(
        ids_matching("location").len(),
        8,
        "a GeoProperty exists though it is not comparable"
    );
    assert_eq!(ids_matching("occupancy.unitCode==\"P1\"").len(), 8);
}

#[test]
fn logical_operators_and_parentheses() {
    assert_eq!(ids_matching("status==free;occupancy>30"), [4, 6]);
    assert_eq!(ids_matching("occupancy==0|occupancy==70"), [0, 7]);
    assert_eq!(
        ids_matching("(occupancy==0|occupancy==70);status==free"),
        [0]
    );
    assert_eq!(
        ids_matching("occupancy==0|occupancy==70;status==free"),
        [0],
        "AND binds tighter"
    );
    assert_eq!(
        ids_matching("occupancy==10|(status==free;occupancy<30)"),
        [0, 1, 2]
    );
}

#[test]
fn sub_attributes_members_and_compound_values() {
    assert_eq!(ids_matching("status.reliability>=0.8"), [3, 4]);
    assert_eq!(ids_matching("address[street]==\"Street 1\""), [1, 4, 7]);
    assert_eq!(ids_matching("address[zip.code]==3"), [3, 7]);
    assert_eq!(
        ids_matching("status.observedAt>2024-01-07T00:00:00Z"),
        [6, 7]
    );
}

#[test]
fn relationships_arrays_and_vocab() {
    assert_eq!(
        ids_matching("refParkingSite==urn:ngsi-ld:ParkingSite:1"),
        [1, 3, 5, 7]
    );
    assert_eq!(
        ids_matching("tags==\"t3\""),
        [3],
        "any array element matches"
    );
    assert_eq!(ids_matching("tags==\"a\"").len(), 8);
    assert_eq!(
        ids_matching("category==onStreet"),
        [0, 1, 2],
        "vocab compares expanded"
    );
}

#[test]
fn type_mismatches_do_not_match() {
    assert_eq!(ids_matching("status>3"), Vec::<u32>::new());
    assert_eq!(ids_matching("occupancy==\"30\""), Vec::<u32>::new());
}

#[test]
fn parse_errors_name_position_and_expectation() {
    let ctx = Context::core();
    for (q, pos, word) in [
        ("occupancy=>3", 10, "operator"),
        ("occupancy==", 12, "value"),
        ("(occupancy==1", 14, "')'"),
        ("occupancy==1;", 14, "attribute name"),
        ("a[b", 4, "']'"),
        ("status==\"free", 14, "closing"),
        ("a>1..3", 4, "single value"),
        ("a>1,3", 4, "single value"),
        // Garbage after an operator is a syntax error, not a string value.
        ("temperature>>>(", 13, "value"),
        ("temperature>>1", 13, "value"),
        ("a==1 2", 5, "value"),
        ("a==(1)", 4, "value"),
        ("a==<b>", 4, "value"),
        ("a===1", 4, "value"),
    ] {
        let e = parse_q(q, &ctx).unwrap_err();
        assert!(
            e.detail.contains(&format!("position {pos}")),
            "{q}: {}",
            e.detail
        );
        assert!(e.detail.contains(word), "{q}: {}", e.detail);
    }
    assert!(
        parse_q("status~=\"(unclosed\"", &ctx)
            .unwrap_err()
            .detail
            .contains("regular expression")
    );
    assert!(
        parse_q(&"a==1;".repeat(1000), &ctx).is_err(),
        "length bound"
    );
    assert!(parse_q("", &ctx).is_err());
}

#[test]
fn type_expressions() {
    let ctx = Context::core();
    let e = spot(1);
    let t = |s: &str| {
        let x = parse_type_expr(s, &ctx).unwrap();
        x.eval(&mut |n| e.types.contains(n))
    };
    assert!(t("ParkingSpot"));
    assert!(t("Bus,ParkingSpot"));
    assert!(t("Bus|ParkingSpot"));
    assert!(!t("Bus;ParkingSpot"));
    assert!(t("(Bus|ParkingSpot);ParkingSpot"));
    assert!(!t("Bus"));
    assert!(parse_type_expr("A;;B", &ctx).is_err());
}

#[test]
fn scope_queries() {
    let e = spot(1);
    let s = |src: &str| {
        let x = parse_scope_q(src).unwrap();
        x.eval(&mut |p| e.scopes.iter().any(|sc| p.matches(sc)))
    };
    assert!(s("/city/north/zone1"));
    assert!(!s("/city/north"));
    assert!(s("/city/north/#"));
    assert!(s("/city/+/zone1"));
    assert!(!s("/city/+"));
    assert!(s("/#"));
    assert!(s("/town,/city/#"));
    assert!(!s("/town;/city/#"));
    assert!(parse_scope_q("city").is_err());
}

#[test]
fn entity_query_combines_filters() {
    let ctx = Context::core();
    let q = EntityQuery {
        types: Some(parse_type_expr("ParkingSpot", &ctx).unwrap()),
        id_pattern: Some(compile_id_pattern(".*:[0-3]$").unwrap()),
        q: Some(parse_q("status==free", &ctx).unwrap()),
        ..Default::default()
    };
    let hits: Vec<u32> = (0..8).filter(|i| q.matches(&spot(*i))).collect();
    assert_eq!(hits, [0, 2]);
    let by_attr = EntityQuery {
        attrs: vec![
            ctx.expand("ghost").into_owned(),
            ctx.expand("occupancy").into_owned(),
        ],
        ..Default::default()
    };
    assert!(by_attr.matches(&spot(0)));
    let by_id = EntityQuery {
        ids: vec!["urn:ngsi-ld:ParkingSpot:5".into()],
        ..Default::default()
    };
    assert!(by_id.matches(&spot(5)) && !by_id.matches(&spot(4)));
}
