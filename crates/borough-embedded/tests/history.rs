//! Property test of history: whatever mix of hot rows, sealed chunks (from
//! writes and from the bulk path) and out-of-order times holds a series, every
//! aggregation equals a naive computation over the plain list of values, and
//! instance reads (`lastN`, windows, the per-attribute bound) return exactly
//! the expected slice.

use borough_core::entity::{ParseMode, parse_fragment};
use borough_core::temporal::{
    AggrMethod, Aggregation, HistoryBody, HistoryRequest, ImportSeries, Period, TimeProperty,
    TimeRange,
};
use borough_core::{Context, EntityOp};
use borough_embedded::EmbeddedStore;
use borough_store::EntityStore;
use proptest::prelude::*;
use serde_json::{Value, json};
use std::sync::OnceLock;

const TENANT: &str = "history";
const ID: &str = "urn:ngsi-ld:Sensor:1";
const NUM: &str = "https://uri.etsi.org/ngsi-ld/default-context/level";
const TEXT: &str = "https://uri.etsi.org/ngsi-ld/default-context/state";
/// 2024-01-01T00:00:00Z in microseconds.
const BASE: i64 = 1_704_067_200_000_000;
const STEP: i64 = 900_000_000;
const N: i64 = 4_001;

/// The i-th point: a time that jumps around the year (a bijection of 0..N,
/// so every time is distinct) and a value, integer or one decimal.
fn point(i: i64) -> (i64, Value, Value) {
    let slot = (i * 1_999) % N;
    let t = BASE + slot * STEP;
    let num = if i % 3 == 0 {
        json!(i % 17)
    } else {
        json!(((i * 37) % 500) as f64 / 10.0 - 10.0)
    };
    (
        t,
        num,
        json!(["open", "closed", "jammed"][(i % 3) as usize]),
    )
}

struct Fixture {
    store: EmbeddedStore,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    /// (time, value) of each attribute, in write order.
    numbers: Vec<(i64, Value)>,
    texts: Vec<(i64, Value)>,
}

fn update(t: i64, num: &Value, text: &Value) -> EntityOp {
    let when = borough_core::validate::format_datetime(t);
    let body = json!({
        "level": {"type": "Property", "value": num, "observedAt": when},
        "state": {"type": "Property", "value": text, "observedAt": when},
    });
    let frag = parse_fragment(&body, &Context::core(), ParseMode::Full).unwrap();
    EntityOp::Append {
        id: ID.into(),
        frag,
        no_overwrite: false,
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = borough_embedded::open(dir.path()).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (mut numbers, mut texts) = (Vec::new(), Vec::new());
        let create = parse_fragment(
            &json!({"id": ID, "type": "Sensor"}),
            &Context::core(),
            ParseMode::Full,
        )
        .unwrap();
        let entity = borough_core::entity::fragment_into_entity(create, 0).unwrap();
        rt.block_on(store.write(TENANT, vec![EntityOp::Create(entity)]))
            .unwrap();
        // 1. Writes, several per transaction: full series are sealed on the way.
        let mut i = 0;
        while i < 1_500 {
            let ops: Vec<EntityOp> = (i..i + 300)
                .map(|k| {
                    let (t, num, text) = point(k);
                    numbers.push((t, num.clone()));
                    texts.push((t, text.clone()));
                    update(t, &num, &text)
                })
                .collect();
            for r in rt.block_on(store.write(TENANT, ops)).unwrap() {
                r.unwrap();
            }
            i += 300;
        }
        // 2. Maintenance seals what is left hot (the times are long past).
        rt.block_on(store.maintain_history()).unwrap();
        // 3. The bulk path, numbers only, interleaving in time with the writes.
        let imported: Vec<(i64, Value)> = (1_500..3_800)
            .map(|k| {
                let (t, num, _) = point(k);
                (t, num)
            })
            .collect();
        numbers.extend(imported.iter().cloned());
        let counts = rt
            .block_on(store.import_history(
                TENANT,
                vec![ImportSeries {
                    entity: ID.into(),
                    entity_type: "https://uri.etsi.org/ngsi-ld/default-context/Sensor".into(),
                    name: NUM.into(),
                    points: imported,
                }],
            ))
            .unwrap();
        assert_eq!(counts.points, 2_300);
        // 4. A few more writes that stay hot.
        let ops: Vec<EntityOp> = (3_800..N)
            .map(|k| {
                let (t, num, text) = point(k);
                numbers.push((t, num.clone()));
                texts.push((t, text.clone()));
                update(t, &num, &text)
            })
            .collect();
        rt.block_on(store.write(TENANT, ops)).unwrap();
        Fixture {
            store,
            _rt: rt,
            _dir: dir,
            numbers,
            texts,
        }
    })
}

/// The bucket of `t`, stepping from `origin` one period at a time.
fn naive_bucket(t: i64, origin: i64, period: Option<Period>, limit: i64) -> (i64, i64) {
    let Some(p) = period else {
        return (origin, limit);
    };
    let mut start = origin;
    loop {
        let end = p.add_to(start).min(limit);
        if t < end {
            return (start, end);
        }
        start = end;
    }
}

/// Every method over `values`, computed directly.
fn naive(values: &[&Value], m: AggrMethod) -> Value {
    let nums: Vec<f64> = values.iter().filter_map(|v| v.as_f64()).collect();
    let n = nums.len() as f64;
    let sum: f64 = nums.iter().sum();
    match m {
        AggrMethod::TotalCount => json!(values.len()),
        AggrMethod::DistinctCount => {
            let mut seen: Vec<String> = values
                .iter()
                .map(|v| match v.as_f64() {
                    Some(x) => format!("{x}"),
                    None => v.to_string(),
                })
                .collect();
            seen.sort();
            seen.dedup();
            json!(seen.len())
        }
        _ if nums.is_empty() => Value::Null,
        AggrMethod::Sum => json!(sum),
        AggrMethod::Avg => json!(sum / n),
        AggrMethod::Min => json!(nums.iter().copied().fold(f64::INFINITY, f64::min)),
        AggrMethod::Max => json!(nums.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
        AggrMethod::Sumsq => json!(nums.iter().map(|x| x * x).sum::<f64>()),
        AggrMethod::Stddev => {
            if nums.len() < 2 {
                return Value::Null;
            }
            let mean = sum / n;
            let var = nums.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
            json!(var.sqrt())
        }
    }
}

fn close(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    }
}

fn range_strategy() -> impl Strategy<Value = TimeRange> {
    let t = (0..N + 10).prop_map(|s| BASE + s * STEP - 5 * STEP);
    prop_oneof![
        Just(TimeRange::ALL),
        t.clone().prop_map(|to| TimeRange { from: i64::MIN, to }),
        t.clone().prop_map(|from| TimeRange { from, to: i64::MAX }),
        (t.clone(), 1..N).prop_map(|(from, len)| TimeRange {
            from,
            to: from + len * STEP
        }),
    ]
}

fn period_strategy() -> impl Strategy<Value = Option<Period>> {
    prop_oneof![
        Just(None),
        Just(Some("PT1H")),
        Just(Some("PT6H")),
        Just(Some("P1D")),
        Just(Some("P1W")),
        Just(Some("P1M")),
        Just(Some("PT45M")),
    ]
    .prop_map(|p| p.map(|s| Period::parse(s).unwrap()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn aggregations_equal_a_naive_computation(
        range in range_strategy(),
        period in period_strategy(),
        numeric in any::<bool>(),
    ) {
        let f = fixture();
        let (name, truth) = if numeric { (NUM, &f.numbers) } else { (TEXT, &f.texts) };
        let req = HistoryRequest {
            attrs: Some(vec![name.to_string()]),
            time_property: TimeProperty::ObservedAt,
            range,
            last_n: None,
            max_instances: 1_000_000,
            aggregation: Some(Aggregation { methods: AggrMethod::ALL.to_vec(), period }),
        };
        let h = f.store.history(TENANT, ID, &req).unwrap().unwrap();
        prop_assert_eq!(h.attrs.len(), 1);
        let HistoryBody::Aggregated { buckets, .. } = &h.attrs[0].body else {
            panic!("aggregated body expected");
        };
        let inside: Vec<&(i64, Value)> = truth.iter().filter(|(t, _)| range.contains(*t)).collect();
        let mut expected: std::collections::BTreeMap<(i64, i64), Vec<&Value>> = Default::default();
        if let (Some(first), Some(last)) = (inside.iter().map(|p| p.0).min(), inside.iter().map(|p| p.0).max()) {
            let origin = if range.from == i64::MIN { first } else { range.from };
            let limit = if range.to != i64::MAX || period.is_some() { range.to } else { last + 1 };
            for (t, v) in &inside {
                expected.entry(naive_bucket(*t, origin, period, limit)).or_default().push(v);
            }
        }
        prop_assert_eq!(buckets.len(), expected.len());
        for (b, ((start, end), values)) in buckets.iter().zip(&expected) {
            prop_assert_eq!((b.start, b.end), (*start, *end));
            for (m, got) in AggrMethod::ALL.iter().zip(&b.values) {
                let want = naive(values, *m);
                prop_assert!(close(got, &want), "{:?} of bucket {}: got {} want {}", m, start, got, want);
            }
        }
    }

    #[test]
    fn instance_reads_return_the_expected_slice(
        range in range_strategy(),
        last_n in proptest::option::of(1usize..60),
        max_instances in 1usize..3_000,
    ) {
        let f = fixture();
        let req = HistoryRequest {
            attrs: Some(vec![NUM.to_string()]),
            time_property: TimeProperty::ObservedAt,
            range,
            last_n,
            max_instances,
            aggregation: None,
        };
        let h = f.store.history(TENANT, ID, &req).unwrap().unwrap();
        let HistoryBody::Instances(list) = &h.attrs[0].body else {
            panic!("instances expected");
        };
        let mut inside: Vec<&(i64, Value)> = f.numbers.iter().filter(|(t, _)| range.contains(*t)).collect();
        inside.sort_by_key(|p| p.0);
        let expected: Vec<&(i64, Value)> = match last_n {
            Some(n) => inside[inside.len().saturating_sub(n)..].to_vec(),
            None => inside.iter().take(max_instances).copied().collect(),
        };
        let got: Vec<(i64, f64)> = list.iter().map(|i| (i.attr.observed_at.unwrap(), i.attr.value.as_f64().unwrap())).collect();
        let want: Vec<(i64, f64)> = expected.iter().map(|(t, v)| (*t, v.as_f64().unwrap())).collect();
        prop_assert_eq!(got, want);
        let cut = last_n.is_none() && inside.len() > max_instances;
        prop_assert_eq!(h.truncated.is_some(), cut);
    }
}
