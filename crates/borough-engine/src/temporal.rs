//! Temporal selection shared by every backend: the time key of a stored
//! instance, the empty answer, and the accumulation of instances into an
//! aggregation's buckets.

use borough_core::temporal::{
    Accumulator, AggrMethod, BucketResult, Buckets, HistoryBody, HistoryRequest, Instance,
    InstanceId, TimeProperty, TimeRange,
};
use borough_core::{AttrKind, Attribute};
use std::collections::BTreeMap;

/// A stored instance: (time key, sequence number, the instance). The time key
/// is `observedAt`, else the write time.
pub type Row = (i64, u64, Attribute);

/// The part of a series a read was cut to, when it had more than it may answer.
pub type Cut = Option<(i64, i64)>;

/// An imported point as history keeps it: a Property observed at `at`,
/// written `now`.
pub fn imported_instance(at: i64, value: serde_json::Value, now: i64) -> Attribute {
    Attribute {
        kind: AttrKind::Property,
        value,
        dataset_id: None,
        observed_at: Some(at),
        unit_code: None,
        object_type: None,
        sub: Default::default(),
        created_at: now,
        modified_at: now,
    }
}

/// Widens the span an answer reports as cut (`truncated`) to hold `cut`.
pub fn widen_cut(truncated: &mut Option<(i64, i64)>, cut: Cut) {
    if let Some((a, b)) = cut {
        *truncated = Some(match *truncated {
            Some((x, y)) => (x.min(a), y.max(b)),
            None => (a, b),
        });
    }
}

/// The time key of an instance.
pub fn time_key(a: &Attribute) -> i64 {
    a.observed_at.unwrap_or(a.modified_at)
}

/// The time a request selects and orders by: the row's time key for
/// `observedAt`, else the write time.
pub fn key_of(prop: TimeProperty, at: i64, attr: &Attribute) -> i64 {
    match prop {
        TimeProperty::ObservedAt => at,
        _ => attr.modified_at,
    }
}

/// The answer for a series with nothing selected.
pub fn empty_body(req: &HistoryRequest) -> HistoryBody {
    match req.aggregation {
        Some(_) => HistoryBody::Aggregated {
            kind: AttrKind::Property,
            buckets: Vec::new(),
        },
        None => HistoryBody::Instances(Vec::new()),
    }
}

/// The accumulators of an aggregation's buckets, keeping at most `max` (the
/// earliest); a later bucket is cut and reported, so memory stays bounded.
pub struct BucketMap<'m> {
    buckets: BTreeMap<i64, (i64, Accumulator)>,
    methods: &'m [AggrMethod],
    max: usize,
    cut: bool,
}

impl<'m> BucketMap<'m> {
    pub fn new(methods: &'m [AggrMethod], max: usize) -> Self {
        Self {
            buckets: BTreeMap::new(),
            methods,
            max: max.max(1),
            cut: false,
        }
    }

    /// The accumulator of one bucket, or `None` when it is past the cut.
    pub fn get(&mut self, (start, end): (i64, i64)) -> Option<&mut Accumulator> {
        if !self.buckets.contains_key(&start) && self.buckets.len() >= self.max {
            self.cut = true;
            if self
                .buckets
                .last_key_value()
                .is_some_and(|(k, _)| *k < start)
            {
                return None;
            }
            self.buckets.pop_last();
        }
        let methods = self.methods;
        Some(
            &mut self
                .buckets
                .entry(start)
                .or_insert_with(|| (end, Accumulator::new(methods)))
                .1,
        )
    }

    /// Adds rows of any kind (JSON values) in `range`.
    pub fn add_rows(
        &mut self,
        rows: &[Row],
        prop: TimeProperty,
        range: TimeRange,
        mut buckets: Buckets,
        kind: &mut Option<AttrKind>,
    ) {
        let mut keyed: Vec<(i64, &Attribute)> = rows
            .iter()
            .map(|r| (key_of(prop, r.0, &r.2), &r.2))
            .filter(|(k, _)| range.contains(*k))
            .collect();
        keyed.sort_by_key(|(k, _)| *k);
        for (k, attr) in keyed {
            kind.get_or_insert(attr.kind);
            if !buckets.advance_to(k) {
                break;
            }
            if let Some(a) = self.get(buckets.current()) {
                a.add_value(&attr.value);
            }
        }
    }

    /// The buckets' results, and the span kept when later buckets were cut.
    pub fn finish(self) -> (Vec<BucketResult>, Cut) {
        let cut = if self.cut {
            match (
                self.buckets.first_key_value(),
                self.buckets.last_key_value(),
            ) {
                (Some((first, _)), Some((_, (end, _)))) => Some((*first, *end)),
                _ => None,
            }
        } else {
            None
        };
        let methods = self.methods;
        let buckets = self
            .buckets
            .into_iter()
            .map(|(start, (end, a))| BucketResult {
                start,
                end,
                values: methods.iter().map(|m| a.result(*m)).collect(),
            })
            .collect();
        (buckets, cut)
    }
}

/// Where an aggregation's buckets start and end: at `timeAt`, else at the
/// first instance; periods run on as long as there is data, and one bucket
/// without a period ends after the last instance.
pub fn bucket_span(req: &HistoryRequest, first: i64, last: i64, periodic: bool) -> (i64, i64) {
    let origin = if req.range.from == i64::MIN {
        first
    } else {
        req.range.from
    };
    let limit = if req.range.to != i64::MAX || periodic {
        req.range.to
    } else {
        last.saturating_add(1)
    };
    (origin, limit)
}

/// Whether two instances of one series say the same, write times aside.
pub fn same_instance(a: &Attribute, b: &Attribute) -> bool {
    let mut a = a.clone();
    a.created_at = b.created_at;
    a.modified_at = b.modified_at;
    a.dataset_id.clone_from(&b.dataset_id);
    a == *b
}

/// What a request selects from one series' rows (all its rows in the
/// request's range, in any order): instances, or an aggregation's buckets.
pub fn select(
    rows: &[Row],
    series: u64,
    req: &HistoryRequest,
    dataset: Option<&str>,
) -> (HistoryBody, Cut) {
    let prop = req.time_property;
    match &req.aggregation {
        // History keeps the instances that exist: none has a deletedAt.
        _ if prop == TimeProperty::DeletedAt => (empty_body(req), None),
        Some(aggr) => {
            let keys = rows.iter().map(|r| key_of(prop, r.0, &r.2));
            let (Some(first), Some(last)) = (keys.clone().min(), keys.max()) else {
                return (empty_body(req), None);
            };
            let (origin, limit) = bucket_span(req, first, last, aggr.period.is_some());
            let mut acc = BucketMap::new(&aggr.methods, req.max_instances);
            let mut kind = None;
            acc.add_rows(
                rows,
                prop,
                req.range,
                Buckets::new(aggr.period, origin, limit),
                &mut kind,
            );
            let (buckets, cut) = acc.finish();
            let kind = kind.unwrap_or(AttrKind::Property);
            (HistoryBody::Aggregated { kind, buckets }, cut)
        }
        None => select_instances(rows, series, req, dataset),
    }
}

/// The instances of one series a request selects: in its range, the last n
/// or the first `max_instances` (then cut), ordered by the request's time.
pub fn select_instances(
    rows: &[Row],
    series: u64,
    req: &HistoryRequest,
    dataset: Option<&str>,
) -> (HistoryBody, Cut) {
    let prop = req.time_property;
    let key = |r: &Row| (key_of(prop, r.0, &r.2), r.1);
    let mut selected: Vec<&Row> = rows
        .iter()
        .filter(|r| req.range.contains(key_of(prop, r.0, &r.2)))
        .collect();
    selected.sort_by_key(|r| key(r));
    let mut cut = None;
    if let Some(n) = req.last_n.map(|n| n.max(1)) {
        let skip = selected.len().saturating_sub(n);
        selected.drain(..skip);
    } else {
        let max = req.max_instances.max(1);
        if selected.len() > max {
            selected.truncate(max);
            if let (Some(first), Some(last)) = (selected.first(), selected.last()) {
                cut = Some((key(first).0, key(last).0));
            }
        }
    }
    let list = selected
        .into_iter()
        .map(|(at, seq, attr)| {
            let mut attr = attr.clone();
            attr.dataset_id = dataset.map(str::to_string);
            Instance {
                id: InstanceId {
                    series,
                    at: *at,
                    seq: *seq,
                },
                attr,
            }
        })
        .collect();
    (HistoryBody::Instances(list), cut)
}
