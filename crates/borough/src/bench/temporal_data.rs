//! The readings of `borough bench temporal`: sensors reporting a temperature
//! every 15 minutes, each value a pure function of (seed, sensor, reading
//! index), so that every system is loaded with the same points, streamed in
//! bounded chunks (nothing holds the whole data set), and the checks can
//! recompute any value.
//!
//! A reading is a smooth pattern (a yearly season, a daily cycle peaking in
//! the afternoon, multi-day weather swings, a per-sensor offset) plus a little
//! noise, rounded to 0.1 °C as real sensors report: the compressors see
//! realistic data, neither constant nor random.

use bytes::Bytes;
use std::f64::consts::TAU;

/// 2025-01-01T00:00:00Z, in epoch milliseconds: the first reading.
pub const START_MS: i64 = 1_735_689_600_000;
/// 15 minutes between readings.
pub const STEP_MS: i64 = 15 * 60 * 1000;
pub const DAY_MS: i64 = 24 * 60 * 60 * 1000;
/// Readings per sensor per day.
pub const PER_DAY: usize = 96;
pub const ATTR: &str = "temperature";
pub const ENTITY_TYPE: &str = "Sensor";
/// Bytes of one chunk of a stream's body.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// The data set: `sensors` sensors, `per_sensor` readings each from
/// [`START_MS`], [`STEP_MS`] apart.
#[derive(Clone, Copy, Debug)]
pub struct Readings {
    pub seed: u64,
    pub sensors: usize,
    pub per_sensor: usize,
}

/// How one system wants its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Borough's bulk import: `entityId,entityType,attribute,observedAt,value`
    /// with `observedAt` in RFC 3339.
    BoroughCsv,
    /// PostgreSQL `COPY … FROM STDIN` text format: `entity\tattr\tts\tvalue`.
    PgCopy,
    /// InfluxDB line protocol (VictoriaMetrics `/write`), nanosecond timestamps.
    InfluxLine,
}

impl Readings {
    pub fn points(&self) -> usize {
        self.sensors * self.per_sensor
    }

    /// The id of sensor `s`: `urn:ngsi-ld:Sensor:0001` (numbered from 1).
    pub fn entity_id(s: usize) -> String {
        format!("urn:ngsi-ld:{ENTITY_TYPE}:{:04}", s + 1)
    }

    /// Time of reading `i`, epoch milliseconds.
    pub fn time_ms(i: usize) -> i64 {
        START_MS + i as i64 * STEP_MS
    }

    /// End of the data (exclusive), epoch milliseconds.
    pub fn end_ms(&self) -> i64 {
        Readings::time_ms(self.per_sensor)
    }

    /// Reading `i` of sensor `s`, in tenths of a degree.
    pub fn tenths(&self, s: usize, i: usize) -> i32 {
        let sensor = mix(self.seed ^ (s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let u = |k: u32| unit(mix(sensor.wrapping_add(u64::from(k))));
        let hours = i as f64 / 4.0;
        let days = hours / 24.0;
        let mean = 8.0 + 8.0 * u(1);
        let season = -7.0 * (TAU * (days - 15.0) / 365.0).cos();
        let daily_amplitude = 2.5 + 3.0 * u(2);
        let daily = daily_amplitude * (TAU * (hours - 15.0) / 24.0).cos();
        let weather = 2.5 * (TAU * days / (4.5 + 2.0 * u(3)) + TAU * u(4)).sin()
            + 1.2 * (TAU * days / (1.7 + 0.6 * u(5)) + TAU * u(6)).sin();
        let noise_bits = mix(sensor ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        // The sum of two uniforms: a triangular noise of ±0.3 °C.
        let noise = 0.3 * (unit(noise_bits) + unit(noise_bits.rotate_left(32)) - 1.0);
        ((mean + season + daily + weather + noise) * 10.0).round() as i32
    }

    /// Reading `i` of sensor `s` as the number every system is given: the
    /// decimal text "21.3" parsed to the nearest double.
    pub fn value(&self, s: usize, i: usize) -> f64 {
        let mut text = Vec::new();
        push_tenths(&mut text, self.tenths(s, i));
        std::str::from_utf8(&text)
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// The sensors of stream `k` of `streams`: a contiguous block.
    pub fn stream_sensors(&self, k: usize, streams: usize) -> std::ops::Range<usize> {
        let streams = streams.max(1);
        (k * self.sensors / streams)..((k + 1) * self.sensors / streams)
    }

    /// Writes the rows of `sensors` in `format`, in time order (at each time,
    /// every sensor of the block, as a data logger exports them), calling
    /// `emit` with chunks of about [`CHUNK_BYTES`]. Stops at the first error
    /// of `emit` (the receiver is gone) and returns it.
    pub fn generate<E>(
        &self,
        sensors: std::ops::Range<usize>,
        format: Format,
        mut emit: impl FnMut(Bytes) -> Result<(), E>,
    ) -> Result<(), E> {
        let ids: Vec<String> = sensors.clone().map(Readings::entity_id).collect();
        let mut buf = Vec::with_capacity(CHUNK_BYTES + 256);
        let mut stamp = Vec::with_capacity(32);
        for i in 0..self.per_sensor {
            let ms = Readings::time_ms(i);
            stamp.clear();
            match format {
                Format::BoroughCsv | Format::PgCopy => push_rfc3339(&mut stamp, ms),
                Format::InfluxLine => push_int(&mut stamp, ms * 1_000_000),
            }
            for (id, s) in ids.iter().zip(sensors.clone()) {
                let tenths = self.tenths(s, i);
                match format {
                    Format::BoroughCsv => {
                        buf.extend_from_slice(id.as_bytes());
                        buf.push(b',');
                        buf.extend_from_slice(ENTITY_TYPE.as_bytes());
                        buf.push(b',');
                        buf.extend_from_slice(ATTR.as_bytes());
                        buf.push(b',');
                        buf.extend_from_slice(&stamp);
                        buf.push(b',');
                        push_tenths(&mut buf, tenths);
                    }
                    Format::PgCopy => {
                        buf.extend_from_slice(id.as_bytes());
                        buf.push(b'\t');
                        buf.extend_from_slice(ATTR.as_bytes());
                        buf.push(b'\t');
                        buf.extend_from_slice(&stamp);
                        buf.push(b'\t');
                        push_tenths(&mut buf, tenths);
                    }
                    Format::InfluxLine => {
                        buf.extend_from_slice(ATTR.as_bytes());
                        buf.extend_from_slice(b",entity=");
                        buf.extend_from_slice(id.as_bytes());
                        buf.extend_from_slice(b" value=");
                        push_tenths(&mut buf, tenths);
                        buf.push(b' ');
                        buf.extend_from_slice(&stamp);
                    }
                }
                buf.push(b'\n');
                if buf.len() >= CHUNK_BYTES {
                    let chunk = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK_BYTES + 256));
                    emit(Bytes::from(chunk))?;
                }
            }
        }
        if !buf.is_empty() {
            emit(Bytes::from(buf))?;
        }
        Ok(())
    }
}

/// splitmix64's finalizer: a well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The top 53 bits as a number in [0, 1).
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// `213` → `21.3`, `-5` → `-0.5`, `0` → `0.0`.
pub fn push_tenths(buf: &mut Vec<u8>, tenths: i32) {
    if tenths < 0 {
        buf.push(b'-');
    }
    let t = tenths.unsigned_abs();
    push_int(buf, i64::from(t / 10));
    buf.push(b'.');
    buf.push(b'0' + (t % 10) as u8);
}

/// A non-negative integer in decimal.
fn push_int(buf: &mut Vec<u8>, mut n: i64) {
    let mut digits = [0u8; 20];
    let mut k = digits.len();
    loop {
        k -= 1;
        digits[k] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[k..]);
}

fn push_two(buf: &mut Vec<u8>, n: u32) {
    buf.push(b'0' + (n / 10) as u8);
    buf.push(b'0' + (n % 10) as u8);
}

/// Epoch milliseconds (whole seconds, after 1970) as `2025-01-01T00:15:00Z`.
pub fn push_rfc3339(buf: &mut Vec<u8>, ms: i64) {
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
    let (y, m, d) = civil_from_days(days);
    push_int(buf, y);
    buf.push(b'-');
    push_two(buf, m);
    buf.push(b'-');
    push_two(buf, d);
    buf.push(b'T');
    push_two(buf, rest / 3600);
    buf.push(b':');
    push_two(buf, rest / 60 % 60);
    buf.push(b':');
    push_two(buf, rest % 60);
    buf.push(b'Z');
}

/// `2025-01-01T00:15:00Z` of epoch milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let mut buf = Vec::with_capacity(20);
    push_rfc3339(&mut buf, ms);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Epoch milliseconds of the first instant of `month` (1–12) of `year`.
pub fn month_start_ms(year: i64, month: u32) -> i64 {
    // Days from civil (the inverse of `civil_from_days`).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let doy = (153 * i64::from(m) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * DAY_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(rfc3339(START_MS), "2025-01-01T00:00:00Z");
        assert_eq!(rfc3339(START_MS + STEP_MS), "2025-01-01T00:15:00Z");
        assert_eq!(rfc3339(Readings::time_ms(35_039)), "2025-12-31T23:45:00Z");
        assert_eq!(rfc3339(1_709_164_800_000), "2024-02-29T00:00:00Z");
        assert_eq!(month_start_ms(2025, 1), START_MS);
        assert_eq!(rfc3339(month_start_ms(2025, 3)), "2025-03-01T00:00:00Z");
        assert_eq!(rfc3339(month_start_ms(2026, 1)), "2026-01-01T00:00:00Z");
    }

    #[test]
    fn tenths_print_as_decimals() {
        for (t, text) in [
            (213, "21.3"),
            (-5, "-0.5"),
            (0, "0.0"),
            (-123, "-12.3"),
            (7, "0.7"),
        ] {
            let mut buf = Vec::new();
            push_tenths(&mut buf, t);
            assert_eq!(String::from_utf8(buf).unwrap(), text);
        }
    }

    #[test]
    fn readings_are_deterministic_smooth_and_plausible() {
        let r = Readings {
            seed: 7,
            sensors: 3,
            per_sensor: 35_040,
        };
        assert_eq!(r.tenths(1, 1000), r.tenths(1, 1000));
        assert_ne!(
            (0..96).map(|i| r.tenths(0, i)).collect::<Vec<_>>(),
            (0..96).map(|i| r.tenths(1, i)).collect::<Vec<_>>()
        );
        for s in 0..3 {
            for i in 0..r.per_sensor {
                let t = r.tenths(s, i);
                assert!((-250..=450).contains(&t), "implausible {t}");
                if i > 0 {
                    // 15 minutes apart: at most about a degree.
                    assert!((t - r.tenths(s, i - 1)).abs() <= 12);
                }
            }
        }
        assert_eq!(r.value(0, 0), f64::from(r.tenths(0, 0)) / 10.0);
    }

    #[test]
    fn every_format_has_one_line_per_point() {
        let r = Readings {
            seed: 1,
            sensors: 5,
            per_sensor: 200,
        };
        for format in [Format::BoroughCsv, Format::PgCopy, Format::InfluxLine] {
            let mut lines = 0;
            let mut first = None;
            for k in 0..2 {
                r.generate(r.stream_sensors(k, 2), format, |chunk| {
                    lines += chunk.iter().filter(|&&b| b == b'\n').count();
                    if first.is_none() {
                        let text = String::from_utf8_lossy(&chunk).into_owned();
                        first = text.lines().next().map(str::to_string);
                    }
                    Ok::<_, ()>(())
                })
                .unwrap();
            }
            assert_eq!(lines, r.points());
            let first = first.unwrap();
            let v = r.value(0, 0);
            let expected = match format {
                Format::BoroughCsv => {
                    format!("urn:ngsi-ld:Sensor:0001,Sensor,temperature,2025-01-01T00:00:00Z,{v:?}")
                }
                Format::PgCopy => {
                    format!("urn:ngsi-ld:Sensor:0001\ttemperature\t2025-01-01T00:00:00Z\t{v:?}")
                }
                Format::InfluxLine => format!(
                    "temperature,entity=urn:ngsi-ld:Sensor:0001 value={v:?} 1735689600000000000"
                ),
            };
            assert_eq!(first, expected);
        }
    }
}
