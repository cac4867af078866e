//! The temporal model of NGSI-LD (clauses 4.5.7–4.5.9, 4.11, 5.6.11–5.6.18,
//! 5.7.3–5.7.4): time windows (`timerel`), ISO 8601 durations, aggregation
//! methods and their accumulators, and the history a store returns. No I/O:
//! every storage backend feeds the same accumulators, so an aggregate means the
//! same thing whichever engine computed it.

use crate::entity::Attribute;
use crate::error::{NgsiError, NgsiResult};
use crate::validate::parse_datetime;
use chrono::{DateTime, Months, Utc};
use serde_json::Value;
use std::collections::HashSet;

/// Which timestamp of an instance a temporal query filters on (`timeproperty`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimeProperty {
    /// `observedAt`, or the write time when the instance has none.
    #[default]
    ObservedAt,
    CreatedAt,
    ModifiedAt,
    /// `deletedAt`: instances that record a deletion. History keeps only
    /// instances that exist, so none has one.
    DeletedAt,
}

impl TimeProperty {
    pub fn parse(s: &str) -> NgsiResult<Self> {
        match s {
            "observedAt" => Ok(Self::ObservedAt),
            "createdAt" => Ok(Self::CreatedAt),
            "modifiedAt" => Ok(Self::ModifiedAt),
            "deletedAt" => Ok(Self::DeletedAt),
            _ => Err(NgsiError::bad_data(format!(
                "timeproperty '{}' is not one of observedAt, createdAt, modifiedAt, deletedAt",
                crate::validate::truncate(s)
            ))),
        }
    }

    /// The instance's time under this property (microseconds); `None` when
    /// the instance has no such time.
    pub fn of(self, a: &Attribute) -> Option<i64> {
        match self {
            Self::ObservedAt => Some(a.observed_at.unwrap_or(a.modified_at)),
            // A history instance is created when it is written (an attribute's
            // createdAt is that of its first instance).
            Self::CreatedAt | Self::ModifiedAt => Some(a.modified_at),
            Self::DeletedAt => None,
        }
    }
}

/// Formats an instant of a temporal answer (microseconds since the epoch, UTC)
/// with no more digits than it has: whole seconds without a fraction, else
/// the fewest fraction digits that keep every microsecond, so a time sent as
/// `10:00:00Z` or `10:00:00.5Z` comes back as it was written.
pub fn format_instant(micros: i64) -> String {
    let t = DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or_default();
    let mut out = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let frac = micros.rem_euclid(1_000_000);
    if frac != 0 {
        let digits = format!("{frac:06}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// A half-open window `[from, to)` of microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeRange {
    pub from: i64,
    pub to: i64,
}

impl TimeRange {
    pub const ALL: TimeRange = TimeRange {
        from: i64::MIN,
        to: i64::MAX,
    };

    pub fn contains(&self, t: i64) -> bool {
        self.from <= t && t < self.to
    }

    /// Whether `[min, max]` (inclusive) overlaps the window.
    pub fn overlaps(&self, min: i64, max: i64) -> bool {
        min < self.to && max >= self.from
    }

    /// Parses `timerel`, `timeAt` and `endTimeAt` (clause 4.11): `before` is
    /// `t < timeAt`, `after` is `t >= timeAt`, `between` is `timeAt <= t < endTimeAt`.
    /// Without `timerel` the window is unbounded.
    pub fn parse(
        timerel: Option<&str>,
        time_at: Option<&str>,
        end_time_at: Option<&str>,
    ) -> NgsiResult<Self> {
        let at = |name: &str, v: Option<&str>| -> NgsiResult<i64> {
            let v = v.ok_or_else(|| {
                NgsiError::bad_data(format!(
                    "timerel '{}' needs {name}",
                    timerel.unwrap_or_default()
                ))
            })?;
            parse_datetime(v).ok_or_else(|| {
                NgsiError::bad_data(format!(
                    "{name} '{}' is not an ISO 8601 date-time",
                    crate::validate::truncate(v)
                ))
            })
        };
        let Some(rel) = timerel else {
            if time_at.is_some() || end_time_at.is_some() {
                return Err(NgsiError::bad_data(
                    "timeAt and endTimeAt need timerel (before, after or between)",
                ));
            }
            return Ok(Self::ALL);
        };
        match rel {
            "before" => Ok(Self {
                from: i64::MIN,
                to: at("timeAt", time_at)?,
            }),
            "after" => Ok(Self {
                from: at("timeAt", time_at)?,
                to: i64::MAX,
            }),
            "between" => {
                let from = at("timeAt", time_at)?;
                let to = at("endTimeAt", end_time_at)?;
                if to <= from {
                    return Err(NgsiError::bad_data("endTimeAt must be later than timeAt"));
                }
                Ok(Self { from, to })
            }
            other => Err(NgsiError::bad_data(format!(
                "timerel '{}' is not one of before, after, between",
                crate::validate::truncate(other)
            ))),
        }
    }
}

/// An ISO 8601 duration (`P1D`, `PT15M`, `P1M`, `P1Y2M10DT2H30M`, `P2W`).
/// Years and months are calendar steps; the rest is a fixed length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub months: u32,
    pub micros: i64,
}

impl Period {
    pub fn parse(s: &str) -> NgsiResult<Self> {
        let bad = |why: &str| {
            NgsiError::bad_data(format!(
                "'{}' is not an ISO 8601 duration ({why}); e.g. PT1H, P1D, P1M",
                crate::validate::truncate(s)
            ))
        };
        let rest = s
            .strip_prefix('P')
            .ok_or_else(|| bad("it must start with P"))?;
        let (date, time) = match rest.split_once('T') {
            Some((d, t)) => {
                if t.is_empty() {
                    return Err(bad("nothing after T"));
                }
                (d, Some(t))
            }
            None => (rest, None),
        };
        let mut months: u64 = 0;
        let mut micros: i128 = 0;
        let mut any = false;
        let mut parse_part = |part: &str, units: &[(char, i128, u64)]| -> NgsiResult<()> {
            let mut number = String::new();
            let mut last_unit = 0;
            for c in part.chars() {
                if c.is_ascii_digit() || c == '.' {
                    number.push(c);
                    continue;
                }
                let pos = units
                    .iter()
                    .position(|(u, _, _)| *u == c)
                    .ok_or_else(|| bad("unknown unit"))?;
                if pos < last_unit || number.is_empty() {
                    return Err(bad("units out of order or without a number"));
                }
                last_unit = pos + 1;
                let (_, unit_micros, unit_months) = units[pos];
                if unit_months > 0 {
                    let n: u64 = number
                        .parse()
                        .map_err(|_| bad("years and months must be whole numbers"))?;
                    months = months
                        .checked_add(n.checked_mul(unit_months).ok_or_else(|| bad("too long"))?)
                        .ok_or_else(|| bad("too long"))?;
                } else {
                    let n: f64 = number.parse().map_err(|_| bad("bad number"))?;
                    if !n.is_finite() || n > 1e12 {
                        return Err(bad("too long"));
                    }
                    micros += (n * unit_micros as f64).round() as i128;
                }
                any = true;
                number.clear();
            }
            if number.is_empty() {
                Ok(())
            } else {
                Err(bad("a number without a unit"))
            }
        };
        const DAY: i128 = 86_400_000_000;
        parse_part(
            date,
            &[('Y', 0, 12), ('M', 0, 1), ('W', 7 * DAY, 0), ('D', DAY, 0)],
        )?;
        if let Some(t) = time {
            parse_part(
                t,
                &[
                    ('H', 3_600_000_000, 0),
                    ('M', 60_000_000, 0),
                    ('S', 1_000_000, 0),
                ],
            )?;
        }
        if !any {
            return Err(bad("no length"));
        }
        // Bounded so that stepping through a window can never overflow.
        if months > 12 * 10_000 || micros > 10_000 * 366 * DAY {
            return Err(bad("longer than 10,000 years"));
        }
        if months == 0 && micros < 1000 {
            return Err(bad("shorter than a millisecond"));
        }
        Ok(Self {
            months: months as u32,
            micros: micros as i64,
        })
    }

    /// `t` plus this period (calendar months first, then the fixed part).
    pub fn add_to(&self, t: i64) -> i64 {
        let mut t = t;
        if self.months > 0 {
            t = DateTime::<Utc>::from_timestamp_micros(t)
                .and_then(|d| d.checked_add_months(Months::new(self.months)))
                .map_or(i64::MAX, |d| d.timestamp_micros());
        }
        t.saturating_add(self.micros)
    }
}

/// The aggregation methods of clause 4.5.19.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AggrMethod {
    TotalCount,
    DistinctCount,
    Sum,
    Avg,
    Min,
    Max,
    Stddev,
    Sumsq,
}

impl AggrMethod {
    pub const ALL: [AggrMethod; 8] = [
        Self::TotalCount,
        Self::DistinctCount,
        Self::Sum,
        Self::Avg,
        Self::Min,
        Self::Max,
        Self::Stddev,
        Self::Sumsq,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::TotalCount => "totalCount",
            Self::DistinctCount => "distinctCount",
            Self::Sum => "sum",
            Self::Avg => "avg",
            Self::Min => "min",
            Self::Max => "max",
            Self::Stddev => "stddev",
            Self::Sumsq => "sumsq",
        }
    }

    /// Parses a comma-separated list (`aggrMethods=avg,max`), without repeats.
    pub fn parse_list(s: &str) -> NgsiResult<Vec<Self>> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let m = Self::ALL
                .into_iter()
                .find(|m| m.name() == name)
                .ok_or_else(|| {
                    NgsiError::bad_data(format!(
                        "aggrMethods: '{}' is not one of totalCount, distinctCount, sum, avg, min, max, stddev, sumsq",
                        crate::validate::truncate(name)
                    ))
                })?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        if out.is_empty() {
            return Err(NgsiError::bad_data(
                "aggregatedValues needs aggrMethods (e.g. aggrMethods=avg,max)",
            ));
        }
        Ok(out)
    }

    /// Whether the method can be computed from a chunk's count, sum, sum of
    /// squares, minimum and maximum alone, without its values.
    pub fn from_summary(self) -> bool {
        !matches!(self, Self::DistinctCount)
    }
}

/// Most distinct values remembered per bucket for `distinctCount`; beyond it
/// the count is a lower bound (bounded memory for any request).
pub const MAX_DISTINCT: usize = 100_000;

/// A numeric summary of a run of values: what a sealed chunk stores so that
/// aggregations can skip decoding it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Number of values (numeric or not).
    pub count: u64,
    /// Number of numeric values.
    pub numbers: u64,
    pub sum: f64,
    pub sumsq: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for Summary {
    fn default() -> Self {
        Self {
            count: 0,
            numbers: 0,
            sum: 0.0,
            sumsq: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Summary {
    pub fn add_number(&mut self, x: f64) {
        self.count += 1;
        self.numbers += 1;
        self.sum += x;
        self.sumsq += x * x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    pub fn merge(&mut self, o: &Summary) {
        self.count += o.count;
        self.numbers += o.numbers;
        self.sum += o.sum;
        self.sumsq += o.sumsq;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }
}

/// Accumulates the values of one aggregation bucket.
#[derive(Clone, Debug, Default)]
pub struct Accumulator {
    pub summary: Summary,
    distinct: Option<HashSet<String>>,
}

impl Accumulator {
    pub fn new(methods: &[AggrMethod]) -> Self {
        Self {
            summary: Summary::default(),
            distinct: methods
                .contains(&AggrMethod::DistinctCount)
                .then(HashSet::new),
        }
    }

    pub fn add_number(&mut self, x: f64) {
        self.summary.add_number(x);
        if let Some(d) = &mut self.distinct
            && d.len() < MAX_DISTINCT
        {
            d.insert(number_key(x));
        }
    }

    /// Adds any value: numbers count for every method, booleans as 1/0 (as
    /// the spec allows), other values only for the counts.
    pub fn add_value(&mut self, v: &Value) {
        match v {
            Value::Number(n) => {
                if let Some(x) = n.as_f64() {
                    self.add_number(x);
                }
            }
            Value::Bool(b) => {
                self.summary.add_number(if *b { 1.0 } else { 0.0 });
                if let Some(d) = &mut self.distinct
                    && d.len() < MAX_DISTINCT
                {
                    d.insert(b.to_string());
                }
            }
            other => {
                self.summary.count += 1;
                if let Some(d) = &mut self.distinct
                    && d.len() < MAX_DISTINCT
                {
                    d.insert(other.to_string());
                }
            }
        }
    }

    /// The result of `method` over what was added; `null` where it is undefined
    /// (no numeric values for sum/avg/min/max, fewer than two for stddev).
    pub fn result(&self, method: AggrMethod) -> Value {
        let s = &self.summary;
        let num = |x: f64| {
            serde_json::Number::from_f64(x)
                .map(Value::Number)
                .unwrap_or(Value::Null)
        };
        match method {
            AggrMethod::TotalCount => Value::from(s.count),
            AggrMethod::DistinctCount => {
                Value::from(self.distinct.as_ref().map_or(0, |d| d.len() as u64))
            }
            _ if s.numbers == 0 => Value::Null,
            AggrMethod::Sum => num(s.sum),
            AggrMethod::Sumsq => num(s.sumsq),
            AggrMethod::Avg => num(s.sum / s.numbers as f64),
            AggrMethod::Min => num(s.min),
            AggrMethod::Max => num(s.max),
            AggrMethod::Stddev => {
                if s.numbers < 2 {
                    return Value::Null;
                }
                // Sample standard deviation, as SQL's stddev.
                let n = s.numbers as f64;
                let variance = ((s.sumsq - s.sum * s.sum / n) / (n - 1.0)).max(0.0);
                num(variance.sqrt())
            }
        }
    }
}

fn number_key(x: f64) -> String {
    if x == 0.0 { "0".into() } else { x.to_string() }
}

/// What to aggregate: the methods and the bucket length (`None`: one bucket
/// over the whole window).
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregation {
    pub methods: Vec<AggrMethod>,
    pub period: Option<Period>,
}

/// The buckets of an aggregation, from `origin` forward in steps of `period`.
#[derive(Clone, Debug)]
pub struct Buckets {
    period: Option<Period>,
    start: i64,
    end: i64,
    limit: i64,
}

impl Buckets {
    /// Buckets starting at `origin`, none beyond `limit` (the window's end).
    pub fn new(period: Option<Period>, origin: i64, limit: i64) -> Self {
        let end = period.map_or(limit, |p| p.add_to(origin).min(limit));
        Self {
            period,
            start: origin,
            end,
            limit,
        }
    }

    /// The current bucket `[start, end)`.
    pub fn current(&self) -> (i64, i64) {
        (self.start, self.end)
    }

    /// Moves forward to the bucket holding `t` (t ≥ the current start).
    /// Returns false when `t` is beyond the window.
    pub fn advance_to(&mut self, t: i64) -> bool {
        if t >= self.limit {
            return false;
        }
        let Some(p) = self.period else {
            return true;
        };
        if t < self.end {
            return true;
        }
        if p.months == 0 && p.micros > 0 {
            // Fixed length: jump straight there.
            let steps = (t - self.start) / p.micros;
            self.start += steps * p.micros;
            self.end = (self.start + p.micros).min(self.limit);
            if t >= self.end {
                self.start = self.end;
                self.end = (self.start + p.micros).min(self.limit);
            }
            return true;
        }
        while t >= self.end {
            self.start = self.end;
            self.end = p.add_to(self.start).min(self.limit);
            if self.end <= self.start {
                return false;
            }
        }
        true
    }
}

/// One bucket's results, in the order of the requested methods.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketResult {
    pub start: i64,
    pub end: i64,
    pub values: Vec<Value>,
}

/// The history of one attribute (one datasetId) of one entity.
#[derive(Clone, Debug, PartialEq)]
pub struct AttrHistory {
    /// Expanded attribute name.
    pub name: String,
    pub dataset_id: Option<String>,
    pub body: HistoryBody,
}

#[derive(Clone, Debug, PartialEq)]
pub enum HistoryBody {
    /// Instances in time order (newest first for `lastN`... see `HistoryRequest`).
    Instances(Vec<Instance>),
    Aggregated {
        kind: crate::entity::AttrKind,
        buckets: Vec<BucketResult>,
    },
}

/// One stored attribute instance with its instance id.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    pub id: InstanceId,
    pub attr: Attribute,
}

/// Locates an instance in a store: its series, time key and sequence number.
/// Rendered as a URI (`instanceId`) and parsed back for PATCH/DELETE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId {
    pub series: u64,
    pub at: i64,
    pub seq: u64,
}

const INSTANCE_PREFIX: &str = "urn:ngsi-ld:instance:";

impl InstanceId {
    pub fn to_uri(&self) -> String {
        format!(
            "{INSTANCE_PREFIX}{:x}-{:x}-{:x}",
            self.series, self.at as u64, self.seq
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix(INSTANCE_PREFIX)?;
        let mut parts = rest.split('-');
        let series = u64::from_str_radix(parts.next()?, 16).ok()?;
        let at = u64::from_str_radix(parts.next()?, 16).ok()? as i64;
        let seq = u64::from_str_radix(parts.next()?, 16).ok()?;
        parts.next().is_none().then_some(Self { series, at, seq })
    }
}

/// What a temporal read asks of one entity.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryRequest {
    /// Only these attributes (expanded names), when given.
    pub attrs: Option<Vec<String>>,
    pub time_property: TimeProperty,
    pub range: TimeRange,
    /// Only the newest N instances of each attribute (returned oldest first).
    pub last_n: Option<usize>,
    /// Most instances returned per attribute; more are cut and reported.
    pub max_instances: usize,
    pub aggregation: Option<Aggregation>,
}

/// The history of one entity.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityHistory {
    pub id: String,
    pub types: Vec<String>,
    pub attrs: Vec<AttrHistory>,
    /// When instances were cut at `max_instances`: the time range returned
    /// (for `Content-Range`), from the first to the last instance returned.
    pub truncated: Option<(i64, i64)>,
}

/// A change to history alone (the temporal API's writes, clause 5.6.11–5.6.16).
#[derive(Clone, Debug, PartialEq)]
pub enum HistoryOp {
    /// Adds instances (`name`, instance) to an entity's history, creating it
    /// when new (with `types`). An instance with an `observedAt` that the
    /// history already holds, with the same content, is not added again.
    Append {
        id: String,
        types: Vec<String>,
        instances: Vec<(String, Attribute)>,
    },
    /// Removes an entity's whole history.
    DeleteEntity { id: String },
    /// Removes an attribute's history: one datasetId (`None` = the default
    /// instance), or every one with `all`.
    DeleteAttr {
        id: String,
        name: String,
        dataset_id: Option<String>,
        all: bool,
    },
    /// Removes one instance.
    DeleteInstance {
        id: String,
        name: String,
        instance: InstanceId,
    },
    /// Replaces the content of one instance (its time key stays).
    ModifyInstance {
        id: String,
        name: String,
        instance: InstanceId,
        attr: Box<Attribute>,
    },
}

/// What a history write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryOutcome {
    Created,
    Changed,
    NotFound,
}

/// The points of one series in a bulk import: (observedAt, value).
#[derive(Clone, Debug, PartialEq)]
pub struct ImportSeries {
    pub entity: String,
    /// Expanded type.
    pub entity_type: String,
    /// Expanded attribute name.
    pub name: String,
    pub points: Vec<(i64, Value)>,
}

/// How long a tenant keeps history, by entity type (expanded), with a default.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Retention {
    /// Microseconds; `None` keeps history forever.
    #[serde(default)]
    pub default: Option<i64>,
    #[serde(default)]
    pub types: Vec<(String, i64)>,
}

impl Retention {
    /// How long history of an entity with these types is kept (the shortest
    /// rule among its types, else the default).
    pub fn keep_for(&self, types: &[String]) -> Option<i64> {
        self.types
            .iter()
            .filter(|(t, _)| types.contains(t))
            .map(|(_, d)| *d)
            .min()
            .or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> i64 {
        parse_datetime(s).unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(Period::parse("PT1H").unwrap().micros, 3_600_000_000);
        assert_eq!(Period::parse("P1D").unwrap().micros, 86_400_000_000);
        assert_eq!(Period::parse("PT15M").unwrap().micros, 900_000_000);
        assert_eq!(Period::parse("PT0.5S").unwrap().micros, 500_000);
        assert_eq!(Period::parse("P2W").unwrap().micros, 14 * 86_400_000_000);
        let p = Period::parse("P1Y2M3DT4H").unwrap();
        assert_eq!(p.months, 14);
        assert_eq!(p.micros, 3 * 86_400_000_000 + 4 * 3_600_000_000);
        for bad in [
            "",
            "P",
            "1D",
            "PT",
            "P1H",
            "PT1D",
            "P1X",
            "PD",
            "P1.5M",
            "PT1M1H",
            "P-1D",
            "PT0S",
            "P99999999Y",
        ] {
            assert!(Period::parse(bad).is_err(), "{bad} should be refused");
        }
        let month = Period::parse("P1M").unwrap();
        assert_eq!(
            month.add_to(t("2025-01-31T00:00:00Z")),
            t("2025-02-28T00:00:00Z")
        );
    }

    #[test]
    fn time_ranges() {
        let r = TimeRange::parse(
            Some("between"),
            Some("2025-01-01T00:00:00Z"),
            Some("2025-01-02T00:00:00Z"),
        )
        .unwrap();
        assert!(r.contains(t("2025-01-01T00:00:00Z")));
        assert!(!r.contains(t("2025-01-02T00:00:00Z")));
        assert!(TimeRange::parse(Some("before"), None, None).is_err());
        assert!(TimeRange::parse(None, Some("2025-01-01T00:00:00Z"), None).is_err());
        assert!(
            TimeRange::parse(
                Some("between"),
                Some("2025-01-02T00:00:00Z"),
                Some("2025-01-01T00:00:00Z")
            )
            .is_err()
        );
        assert!(TimeRange::parse(Some("during"), Some("2025-01-01T00:00:00Z"), None).is_err());
        assert!(TimeRange::parse(Some("after"), Some("yesterday"), None).is_err());
    }

    #[test]
    fn accumulator_matches_definitions() {
        let mut a = Accumulator::new(&AggrMethod::ALL);
        for x in [1.0, 2.0, 2.0, 5.0] {
            a.add_number(x);
        }
        a.add_value(&Value::String("x".into()));
        assert_eq!(a.result(AggrMethod::TotalCount), Value::from(5u64));
        assert_eq!(a.result(AggrMethod::DistinctCount), Value::from(4u64));
        assert_eq!(a.result(AggrMethod::Sum), Value::from(10.0));
        assert_eq!(a.result(AggrMethod::Avg), Value::from(2.5));
        assert_eq!(a.result(AggrMethod::Min), Value::from(1.0));
        assert_eq!(a.result(AggrMethod::Max), Value::from(5.0));
        assert_eq!(a.result(AggrMethod::Sumsq), Value::from(34.0));
        let sd = a.result(AggrMethod::Stddev).as_f64().unwrap();
        assert!((sd - 3.0f64.sqrt()).abs() < 1e-12);
        assert!(AggrMethod::parse_list("avg,median").is_err());
        assert!(AggrMethod::parse_list("").is_err());
    }

    #[test]
    fn buckets_step_by_calendar_and_fixed_periods() {
        let day = Period::parse("P1D").unwrap();
        let mut b = Buckets::new(
            Some(day),
            t("2025-01-01T00:00:00Z"),
            t("2025-01-10T00:00:00Z"),
        );
        assert!(b.advance_to(t("2025-01-03T05:00:00Z")));
        assert_eq!(
            b.current(),
            (t("2025-01-03T00:00:00Z"), t("2025-01-04T00:00:00Z"))
        );
        assert!(!b.advance_to(t("2025-01-10T00:00:00Z")));
        let month = Period::parse("P1M").unwrap();
        let mut b = Buckets::new(
            Some(month),
            t("2025-01-01T00:00:00Z"),
            t("2026-01-01T00:00:00Z"),
        );
        assert!(b.advance_to(t("2025-03-15T00:00:00Z")));
        assert_eq!(
            b.current(),
            (t("2025-03-01T00:00:00Z"), t("2025-04-01T00:00:00Z"))
        );
    }

    #[test]
    fn instants_keep_the_digits_they_have() {
        for (given, shown) in [
            ("2026-01-01T10:00:00Z", "2026-01-01T10:00:00Z"),
            ("2026-01-01T10:00:00.000Z", "2026-01-01T10:00:00Z"),
            ("2026-01-01T10:00:00.5Z", "2026-01-01T10:00:00.5Z"),
            ("2026-01-01T10:00:00.120Z", "2026-01-01T10:00:00.12Z"),
            ("2026-01-01T10:00:00.123456Z", "2026-01-01T10:00:00.123456Z"),
            ("2026-01-01T11:00:00.25+01:00", "2026-01-01T10:00:00.25Z"),
            ("1969-12-31T23:59:59.5Z", "1969-12-31T23:59:59.5Z"),
        ] {
            assert_eq!(format_instant(t(given)), shown, "{given}");
        }
    }

    #[test]
    fn time_properties() {
        assert_eq!(
            TimeProperty::parse("deletedAt").unwrap(),
            TimeProperty::DeletedAt
        );
        assert!(TimeProperty::parse("observedat").is_err());
        let a = Attribute {
            kind: crate::AttrKind::Property,
            value: Value::from(1),
            dataset_id: None,
            observed_at: None,
            unit_code: None,
            object_type: None,
            sub: Default::default(),
            created_at: 1,
            modified_at: 2,
        };
        assert_eq!(TimeProperty::ObservedAt.of(&a), Some(2));
        assert_eq!(TimeProperty::CreatedAt.of(&a), Some(2));
        assert_eq!(TimeProperty::DeletedAt.of(&a), None);
    }

    #[test]
    fn instance_ids_round_trip() {
        let id = InstanceId {
            series: 42,
            at: t("2025-01-01T00:00:00Z"),
            seq: 7,
        };
        assert_eq!(InstanceId::parse(&id.to_uri()), Some(id));
        assert_eq!(InstanceId::parse("urn:ngsi-ld:instance:zz-1-1"), None);
        assert_eq!(InstanceId::parse("urn:x"), None);
    }
}
