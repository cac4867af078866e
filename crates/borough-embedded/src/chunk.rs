//! Sealed history chunks: a run of one series' instances, compressed.
//!
//! A chunk whose instances are all plain numeric Properties (no sub-attributes,
//! one unit code, observedAt on all or none) is stored as four pco-compressed
//! columns: time keys, sequence numbers, write times and values. Regular
//! timestamps and counters compress to almost nothing and values are coded by
//! pco's numeric codec. Any other run is stored as lz4-compressed JSON.
//! Each chunk has a fixed-size index entry ([`ChunkMeta`]) with its time bounds
//! and a numeric summary, so that reads skip chunks outside their window and
//! aggregations skip decoding chunks that fall inside one bucket.

use borough_core::temporal::Summary;
use borough_core::{AttrKind, Attribute};
use serde_json::Value;

const NUMERIC: u8 = 1;
const GENERIC: u8 = 2;
const HAS_OBSERVED: u8 = 1;
const ALL_INTEGERS: u8 = 2;
/// Values are stored as integers scaled by a power of ten (a byte after the unit says which).
const DECIMAL: u8 = 4;
/// Most decimal places tried.
const MAX_DECIMALS: i32 = 6;

/// The fewest decimal places (0..=6) with which every value is exactly
/// `n / 10^k` for an integer n, if any: such values compress far better as
/// integers (sensors report fixed decimals) and decode to the same f64.
fn decimal_places(values: &[f64]) -> Option<i32> {
    (0..=MAX_DECIMALS).find(|&k| {
        let scale = 10f64.powi(k);
        values.iter().all(|&v| {
            let n = (v * scale).round();
            n.abs() < 9e15 && n / scale == v
        })
    })
}

fn scaled(values: &[f64], k: i32) -> Vec<i64> {
    let scale = 10f64.powi(k);
    values.iter().map(|&v| (v * scale).round() as i64).collect()
}

/// Reads the value column: f64, or integers scaled by `10^decimals`.
fn read_values(section: &[u8], decimals: Option<i32>) -> Option<Vec<f64>> {
    match decimals {
        None => decompress::<f64>(section),
        Some(k) => {
            let scale = 10f64.powi(k);
            Some(
                decompress::<i64>(section)?
                    .into_iter()
                    .map(|n| n as f64 / scale)
                    .collect(),
            )
        }
    }
}

/// One instance as a chunk holds it: (time key, sequence number, the attribute).
pub type Row = (i64, u64, Attribute);

/// The index entry of a chunk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChunkMeta {
    pub min_at: i64,
    pub max_at: i64,
    pub min_written: i64,
    pub max_written: i64,
    pub summary: Summary,
}

impl ChunkMeta {
    const FIELDS: usize = 10;

    pub fn encode(&self) -> Vec<u8> {
        let s = &self.summary;
        let fields: [u64; Self::FIELDS] = [
            self.min_at as u64,
            self.max_at as u64,
            self.min_written as u64,
            self.max_written as u64,
            s.count,
            s.numbers,
            s.sum.to_bits(),
            s.sumsq.to_bits(),
            s.min.to_bits(),
            s.max.to_bits(),
        ];
        fields.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < Self::FIELDS * 8 {
            return None;
        }
        let f = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        Some(Self {
            min_at: f(0) as i64,
            max_at: f(1) as i64,
            min_written: f(2) as i64,
            max_written: f(3) as i64,
            summary: Summary {
                count: f(4),
                numbers: f(5),
                sum: f64::from_bits(f(6)),
                sumsq: f64::from_bits(f(7)),
                min: f64::from_bits(f(8)),
                max: f64::from_bits(f(9)),
            },
        })
    }
}

/// The numeric columns of a chunk, for aggregation without building attributes.
pub struct Columns {
    pub at: Vec<i64>,
    pub written: Vec<i64>,
    pub values: Vec<f64>,
}

fn numeric_shape(rows: &[Row]) -> Option<(bool, bool, Option<&str>)> {
    let first = &rows.first()?.2;
    let has_observed = first.observed_at.is_some();
    let unit = first.unit_code.as_deref();
    let mut all_integers = true;
    for (at, _, a) in rows {
        let plain = a.kind == AttrKind::Property
            && a.sub.is_empty()
            && a.object_type.is_none()
            && a.unit_code.as_deref() == unit
            && a.observed_at.is_some() == has_observed
            && (!has_observed || a.observed_at == Some(*at))
            && (has_observed || a.modified_at == *at);
        if !plain {
            return None;
        }
        match &a.value {
            Value::Number(n) => {
                if n.as_i64().is_none_or(|i| i.unsigned_abs() > (1 << 53)) {
                    all_integers = false;
                    n.as_f64()?;
                }
            }
            _ => return None,
        }
    }
    Some((has_observed, all_integers, unit))
}

fn put_section(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn take_section<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    if b.len() < 4 {
        return None;
    }
    let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let rest = &b[4..];
    if rest.len() < len {
        return None;
    }
    let (section, tail) = rest.split_at(len);
    *b = tail;
    Some(section)
}

fn compress<T: pco::data_types::Number>(nums: &[T]) -> Result<Vec<u8>, String> {
    pco::standalone::simple_compress(nums, &pco::ChunkConfig::default()).map_err(|e| e.to_string())
}

fn decompress<T: pco::data_types::Number>(b: &[u8]) -> Option<Vec<T>> {
    pco::standalone::simple_decompress(b).ok()
}

/// Encodes rows (sorted by time key then sequence) into a chunk and its index entry.
pub fn encode(rows: &[Row]) -> Result<(Vec<u8>, ChunkMeta), String> {
    let mut meta = ChunkMeta {
        min_at: i64::MAX,
        max_at: i64::MIN,
        min_written: i64::MAX,
        max_written: i64::MIN,
        summary: Summary::default(),
    };
    for (at, _, a) in rows {
        meta.min_at = meta.min_at.min(*at);
        meta.max_at = meta.max_at.max(*at);
        meta.min_written = meta.min_written.min(a.modified_at);
        meta.max_written = meta.max_written.max(a.modified_at);
        match &a.value {
            Value::Number(n) if a.kind == AttrKind::Property => {
                meta.summary.add_number(n.as_f64().unwrap_or(0.0))
            }
            Value::Bool(b) if a.kind == AttrKind::Property => {
                meta.summary.add_number(if *b { 1.0 } else { 0.0 })
            }
            _ => meta.summary.count += 1,
        }
    }
    let mut out = Vec::new();
    if let Some((has_observed, all_integers, unit)) = numeric_shape(rows) {
        let columns = NumericColumns {
            has_observed,
            all_integers,
            unit,
            at: &rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            seq: &rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            written: &rows.iter().map(|r| r.2.modified_at).collect::<Vec<_>>(),
            values: &rows
                .iter()
                .map(|r| r.2.value.as_f64().unwrap_or(0.0))
                .collect::<Vec<_>>(),
        };
        out = columns.encode()?;
    } else {
        out.push(GENERIC);
        let json = serde_json::to_vec(rows).map_err(|e| e.to_string())?;
        out.extend_from_slice(&lz4_flex::compress_prepend_size(&json));
    }
    Ok((out, meta))
}

/// Encodes a sorted run of numeric points with observedAt (the bulk path):
/// sequence numbers `seq0..`, all written at `written`.
pub fn encode_numeric(
    at: &[i64],
    seq0: u64,
    written: i64,
    values: &[f64],
    all_integers: bool,
) -> Result<(Vec<u8>, ChunkMeta), String> {
    let mut summary = Summary::default();
    for v in values {
        summary.add_number(*v);
    }
    let meta = ChunkMeta {
        min_at: at.iter().copied().min().unwrap_or(0),
        max_at: at.iter().copied().max().unwrap_or(0),
        min_written: written,
        max_written: written,
        summary,
    };
    let seq: Vec<u64> = (seq0..seq0 + at.len() as u64).collect();
    let written = vec![written; at.len()];
    let columns = NumericColumns {
        has_observed: true,
        all_integers,
        unit: None,
        at,
        seq: &seq,
        written: &written,
        values,
    };
    Ok((columns.encode()?, meta))
}

/// The parts of a numeric chunk before compression.
struct NumericColumns<'a> {
    has_observed: bool,
    all_integers: bool,
    unit: Option<&'a str>,
    at: &'a [i64],
    seq: &'a [u64],
    written: &'a [i64],
    values: &'a [f64],
}

impl NumericColumns<'_> {
    fn encode(&self) -> Result<Vec<u8>, String> {
        let decimals = decimal_places(self.values);
        let flags = if self.has_observed { HAS_OBSERVED } else { 0 }
            | if self.all_integers { ALL_INTEGERS } else { 0 }
            | if decimals.is_some() { DECIMAL } else { 0 };
        let mut out = vec![NUMERIC, flags];
        put_section(&mut out, self.unit.unwrap_or("").as_bytes());
        out.push(u8::from(self.unit.is_some()));
        if let Some(k) = decimals {
            out.push(k as u8);
        }
        put_section(&mut out, &compress(self.at)?);
        put_section(&mut out, &compress(self.seq)?);
        put_section(&mut out, &compress(self.written)?);
        match decimals {
            Some(k) => put_section(&mut out, &compress(&scaled(self.values, k))?),
            None => put_section(&mut out, &compress(self.values)?),
        }
        Ok(out)
    }
}

struct NumericHeader<'a> {
    has_observed: bool,
    all_integers: bool,
    decimals: Option<i32>,
    unit: Option<&'a str>,
    rest: &'a [u8],
}

fn numeric_header(b: &[u8]) -> Option<NumericHeader<'_>> {
    let (&format, rest) = b.split_first()?;
    if format != NUMERIC {
        return None;
    }
    let (&flags, mut rest) = rest.split_first()?;
    let unit = take_section(&mut rest)?;
    let (&has_unit, mut rest) = rest.split_first()?;
    let mut decimals = None;
    if flags & DECIMAL != 0 {
        let (&k, tail) = rest.split_first()?;
        if i32::from(k) > MAX_DECIMALS {
            return None;
        }
        decimals = Some(i32::from(k));
        rest = tail;
    }
    Some(NumericHeader {
        has_observed: flags & HAS_OBSERVED != 0,
        all_integers: flags & ALL_INTEGERS != 0,
        decimals,
        unit: (has_unit == 1)
            .then(|| std::str::from_utf8(unit).ok())
            .flatten(),
        rest,
    })
}

/// The numeric columns of a numeric chunk; `None` for other chunks.
pub fn columns(b: &[u8]) -> Option<Columns> {
    let h = numeric_header(b)?;
    let mut rest = h.rest;
    let at = decompress::<i64>(take_section(&mut rest)?)?;
    let _seq = take_section(&mut rest)?;
    let written = decompress::<i64>(take_section(&mut rest)?)?;
    let values = read_values(take_section(&mut rest)?, h.decimals)?;
    (at.len() == written.len() && at.len() == values.len()).then_some(Columns {
        at,
        written,
        values,
    })
}

/// Every row of a chunk. `None` if the chunk cannot be read.
pub fn decode(b: &[u8]) -> Option<Vec<Row>> {
    match *b.first()? {
        GENERIC => {
            let json = lz4_flex::decompress_size_prepended(&b[1..]).ok()?;
            serde_json::from_slice(&json).ok()
        }
        NUMERIC => {
            let h = numeric_header(b)?;
            let mut rest = h.rest;
            let at = decompress::<i64>(take_section(&mut rest)?)?;
            let seq = decompress::<u64>(take_section(&mut rest)?)?;
            let written = decompress::<i64>(take_section(&mut rest)?)?;
            let values = read_values(take_section(&mut rest)?, h.decimals)?;
            if seq.len() != at.len() || written.len() != at.len() || values.len() != at.len() {
                return None;
            }
            let unit = h.unit.map(str::to_string);
            Some(
                (0..at.len())
                    .map(|i| {
                        let value = if h.all_integers {
                            Value::from(values[i] as i64)
                        } else {
                            serde_json::Number::from_f64(values[i])
                                .map_or(Value::Null, Value::Number)
                        };
                        let attr = Attribute {
                            kind: AttrKind::Property,
                            value,
                            dataset_id: None,
                            observed_at: h.has_observed.then_some(at[i]),
                            unit_code: unit.clone(),
                            object_type: None,
                            sub: Default::default(),
                            created_at: written[i],
                            modified_at: written[i],
                        };
                        (at[i], seq[i], attr)
                    })
                    .collect(),
            )
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(at: i64, seq: u64, v: Value, observed: bool) -> Row {
        (
            at,
            seq,
            Attribute {
                kind: AttrKind::Property,
                value: v,
                dataset_id: None,
                observed_at: observed.then_some(at),
                unit_code: Some("CEL".into()),
                object_type: None,
                sub: Default::default(),
                created_at: 5,
                modified_at: if observed { 5 } else { at },
            },
        )
    }

    #[test]
    fn numeric_chunks_round_trip_and_compress() {
        let rows: Vec<Row> = (0..4096)
            .map(|i| {
                let v = ((20.0 + (i as f64 / 50.0).sin() * 5.0) * 10.0).round() / 10.0;
                num(i * 900_000_000, i as u64, Value::from(v), true)
            })
            .collect();
        let (bytes, meta) = encode(&rows).unwrap();
        assert_eq!(bytes[0], NUMERIC);
        assert!(
            bytes.len() < rows.len() * 2,
            "{} bytes for {} rows",
            bytes.len(),
            rows.len()
        );
        assert_eq!(meta.summary.count, 4096);
        assert_eq!(meta.min_at, 0);
        let back = decode(&bytes).unwrap();
        let mut expected = rows.clone();
        for r in &mut expected {
            r.2.created_at = r.2.modified_at;
        }
        assert_eq!(back, expected);
        let cols = columns(&bytes).unwrap();
        assert_eq!(cols.values.len(), 4096);
        assert_eq!(ChunkMeta::decode(&meta.encode()), Some(meta));
    }

    #[test]
    fn fixed_decimals_are_stored_as_scaled_integers_and_read_back_exactly() {
        let values = [21.3, -0.1, 0.3, 1e-6, 7.0];
        assert_eq!(decimal_places(&values), Some(6));
        assert_eq!(decimal_places(&[21.3, 19.95]), Some(2));
        assert_eq!(
            decimal_places(&[0.1 + 0.2]),
            None,
            "0.30000000000000004 has no short form"
        );
        let rows: Vec<Row> = [21.3, 21.4, 0.1 + 0.2, 19.9]
            .iter()
            .enumerate()
            .map(|(i, v)| num(i as i64, i as u64, Value::from(*v), true))
            .collect();
        for part in [&rows[..2], &rows[..]] {
            let (bytes, _) = encode(part).unwrap();
            let back: Vec<Value> = decode(&bytes)
                .unwrap()
                .into_iter()
                .map(|r| r.2.value)
                .collect();
            let sent: Vec<Value> = part.iter().map(|r| r.2.value.clone()).collect();
            assert_eq!(back, sent);
        }
    }

    #[test]
    fn integers_stay_integers_and_mixed_rows_use_json() {
        let rows = vec![
            num(1, 0, Value::from(3), false),
            num(2, 1, Value::from(-4), false),
        ];
        let (bytes, _) = encode(&rows).unwrap();
        assert_eq!(decode(&bytes).unwrap()[1].2.value, Value::from(-4));
        let mixed = vec![
            num(1, 0, Value::from(3), false),
            num(2, 1, Value::from("open"), false),
        ];
        let (bytes, meta) = encode(&mixed).unwrap();
        assert_eq!(bytes[0], GENERIC);
        assert_eq!(meta.summary.count, 2);
        assert_eq!(meta.summary.numbers, 1);
        assert_eq!(decode(&bytes).unwrap(), mixed);
    }
}
