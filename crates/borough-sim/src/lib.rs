//! A simulated city for demos, tests and benchmarks.
//!
//! The city is a grid of districts crossed by streets. Its devices are FIWARE
//! Smart Data Models entity types with their usual attributes and units; their
//! readings follow daily patterns (rush hours, night lighting, load shapes)
//! with noise, occasional faults and outliers. Everything is a pure function
//! of the seed and the time, so two runs with one seed are identical.

use chrono::{DateTime, SecondsFormat, Timelike, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use std::f64::consts::PI;

/// The kinds of device the city has, as Smart Data Models entity types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    ParkingSpot,
    OffStreetParking,
    Streetlight,
    AirQualityObserved,
    WeatherObserved,
    ElectricityMeter,
    WaterMeter,
    WasteContainer,
    TrafficFlowObserved,
    EVChargingStation,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::ParkingSpot,
        Kind::OffStreetParking,
        Kind::Streetlight,
        Kind::AirQualityObserved,
        Kind::WeatherObserved,
        Kind::ElectricityMeter,
        Kind::WaterMeter,
        Kind::WasteContainer,
        Kind::TrafficFlowObserved,
        Kind::EVChargingStation,
    ];

    pub fn type_name(self) -> &'static str {
        match self {
            Kind::ParkingSpot => "ParkingSpot",
            Kind::OffStreetParking => "OffStreetParking",
            Kind::Streetlight => "Streetlight",
            Kind::AirQualityObserved => "AirQualityObserved",
            Kind::WeatherObserved => "WeatherObserved",
            Kind::ElectricityMeter => "ElectricityMeter",
            Kind::WaterMeter => "WaterMeter",
            Kind::WasteContainer => "WasteContainer",
            Kind::TrafficFlowObserved => "TrafficFlowObserved",
            Kind::EVChargingStation => "EVChargingStation",
        }
    }

    /// Share of the city's devices, in thousandths.
    fn share(self) -> u32 {
        match self {
            Kind::ParkingSpot => 300,
            Kind::Streetlight => 250,
            Kind::WasteContainer => 120,
            Kind::ElectricityMeter => 120,
            Kind::WaterMeter => 80,
            Kind::TrafficFlowObserved => 40,
            Kind::AirQualityObserved => 30,
            Kind::EVChargingStation => 30,
            Kind::OffStreetParking => 20,
            Kind::WeatherObserved => 10,
        }
    }

    /// Whether the device takes commands (an actuator).
    pub fn is_actuator(self) -> bool {
        matches!(self, Kind::Streetlight | Kind::EVChargingStation)
    }
}

/// The city's shape: where it is and how it is divided.
#[derive(Clone, Debug)]
pub struct CityPlan {
    /// South-west corner (longitude, latitude).
    pub origin: (f64, f64),
    /// Districts per side; each district is about 1 km square.
    pub districts_per_side: u32,
}

impl Default for CityPlan {
    fn default() -> Self {
        Self {
            origin: (2.28, 48.82),
            districts_per_side: 6,
        }
    }
}

/// Degrees of longitude and latitude of about 1 km at the city's latitude.
const KM_LON: f64 = 0.0136;
const KM_LAT: f64 = 0.009;
/// Streets run every 100 m.
const STREETS_PER_KM: u32 = 10;

/// One simulated device and the entity it feeds.
#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    pub id: String,
    pub kind: Kind,
    pub district: u32,
    pub location: (f64, f64),
    /// Per-device character (capacity, base level, phase), drawn from the seed.
    pub traits: [f64; 3],
    /// A faulty device reports a fault status and bad readings part of the time.
    pub faulty: bool,
}

/// A generated city.
#[derive(Clone, Debug)]
pub struct City {
    pub seed: u64,
    pub plan: CityPlan,
    pub devices: Vec<Device>,
}

impl City {
    /// Generates a city of `devices` devices from `seed`.
    pub fn generate(seed: u64, devices: usize) -> City {
        let plan = CityPlan::default();
        let mut rng = StdRng::seed_from_u64(seed);
        let side = plan.districts_per_side;
        let mut out = Vec::with_capacity(devices);
        let total_share: u32 = Kind::ALL.iter().map(|k| k.share()).sum();
        let mut counters = [0usize; 10];
        for n in 0..devices {
            // Spread kinds by share, deterministically and evenly.
            let slot = ((n as u64 * 7919) % u64::from(total_share)) as u32;
            let mut acc = 0;
            let mut kind_index = 0;
            for (i, k) in Kind::ALL.iter().enumerate() {
                acc += k.share();
                if slot < acc {
                    kind_index = i;
                    break;
                }
            }
            let kind = Kind::ALL[kind_index];
            counters[kind_index] += 1;
            let district = rng.random_range(0..side * side);
            let (dx, dy) = (district % side, district / side);
            // Devices stand along streets: one coordinate on a street line.
            let along: f64 = rng.random();
            let street = f64::from(rng.random_range(0..STREETS_PER_KM)) / f64::from(STREETS_PER_KM);
            let (fx, fy) = if rng.random::<bool>() {
                (along, street)
            } else {
                (street, along)
            };
            let lon = plan.origin.0 + (f64::from(dx) + fx) * KM_LON;
            let lat = plan.origin.1 + (f64::from(dy) + fy) * KM_LAT;
            let location = ((lon * 1e6).round() / 1e6, (lat * 1e6).round() / 1e6);
            out.push(Device {
                id: format!(
                    "urn:ngsi-ld:{}:boro-{:06}",
                    kind.type_name(),
                    counters[kind_index]
                ),
                kind,
                district,
                location,
                traits: [rng.random(), rng.random(), rng.random()],
                faulty: rng.random_range(0..100) < 3,
            });
        }
        City {
            seed,
            plan,
            devices: out,
        }
    }

    /// The district polygons, for maps and geo-queries.
    pub fn district_polygon(&self, district: u32) -> Value {
        let side = self.plan.districts_per_side;
        let (dx, dy) = (f64::from(district % side), f64::from(district / side));
        let (x0, y0) = (
            self.plan.origin.0 + dx * KM_LON,
            self.plan.origin.1 + dy * KM_LAT,
        );
        let (x1, y1) = (x0 + KM_LON, y0 + KM_LAT);
        json!({"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]})
    }
}

fn prop(value: Value) -> Value {
    json!({"type": "Property", "value": value})
}

fn measured(value: Value, unit: &str, at: &str) -> Value {
    json!({"type": "Property", "value": value, "unitCode": unit, "observedAt": at})
}

fn observed(value: Value, at: &str) -> Value {
    json!({"type": "Property", "value": value, "observedAt": at})
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Hours since local midnight (the city keeps UTC+1), as a fraction.
fn local_hour(t: DateTime<Utc>) -> f64 {
    let h = f64::from(t.hour()) + f64::from(t.minute()) / 60.0 + f64::from(t.second()) / 3600.0;
    (h + 1.0) % 24.0
}

/// A bump centred on `peak` hours, `width` hours wide.
fn bump(hour: f64, peak: f64, width: f64) -> f64 {
    let d = ((hour - peak + 12.0).rem_euclid(24.0)) - 12.0;
    (-(d * d) / (2.0 * width * width)).exp()
}

/// Residential electricity: a morning and a larger evening peak over a base load.
pub fn load_shape(hour: f64) -> f64 {
    0.25 + 0.45 * bump(hour, 7.5, 1.5) + 0.8 * bump(hour, 19.5, 2.0) + 0.15 * bump(hour, 13.0, 2.0)
}

/// Traffic: two rush hours.
pub fn traffic_shape(hour: f64) -> f64 {
    0.1 + 0.9 * bump(hour, 8.0, 1.2) + 0.8 * bump(hour, 17.5, 1.5) + 0.3 * bump(hour, 13.0, 3.0)
}

/// Street lighting is on from dusk to dawn.
pub fn is_dark(hour: f64) -> bool {
    !(7.0..18.5).contains(&hour)
}

impl Device {
    /// The entity this device feeds, as NGSI-LD normalized JSON, at time `t`.
    pub fn entity(&self, t: DateTime<Utc>) -> Value {
        let mut e = Map::new();
        e.insert("id".into(), json!(self.id));
        e.insert("type".into(), json!(self.kind.type_name()));
        e.insert(
            "location".into(),
            json!({"type": "GeoProperty", "value": {"type": "Point", "coordinates": [self.location.0, self.location.1]}}),
        );
        e.insert(
            "areaServed".into(),
            prop(json!(format!("District {}", self.district + 1))),
        );
        e.insert(
            "refDevice".into(),
            json!({"type": "Relationship", "object": format!("urn:ngsi-ld:Device:{}-{}", self.kind.type_name(), self.id.rsplit('-').next().unwrap_or_default())}),
        );
        let capacity = self.capacity();
        match self.kind {
            Kind::ParkingSpot => {
                e.insert(
                    "category".into(),
                    prop(json!([
                        "onStreet",
                        if self.traits[0] < 0.1 {
                            "forDisabled"
                        } else {
                            "free"
                        }
                    ])),
                );
            }
            Kind::OffStreetParking => {
                e.insert("totalSpotNumber".into(), prop(json!(capacity)));
                e.insert(
                    "name".into(),
                    prop(json!(format!(
                        "Car park {}",
                        self.id.rsplit('-').next().unwrap_or_default()
                    ))),
                );
            }
            Kind::Streetlight => {
                e.insert("lanternHeight".into(), json!({"type": "Property", "value": round(6.0 + self.traits[0] * 6.0, 1), "unitCode": "MTR"}));
            }
            Kind::WasteContainer => {
                e.insert(
                    "wasteType".into(),
                    prop(json!(
                        ["organic", "paper", "glass", "plastic", "general"]
                            [(self.traits[0] * 5.0) as usize % 5]
                    )),
                );
                e.insert(
                    "storedWasteCapacity".into(),
                    json!({"type": "Property", "value": capacity, "unitCode": "LTR"}),
                );
            }
            Kind::EVChargingStation => {
                e.insert("capacity".into(), prop(json!(capacity)));
                e.insert("socketType".into(), prop(json!(["Type2", "CCS"])));
            }
            Kind::ElectricityMeter | Kind::WaterMeter => {
                e.insert(
                    "name".into(),
                    prop(json!(format!(
                        "Meter {}",
                        self.id.rsplit('-').next().unwrap_or_default()
                    ))),
                );
            }
            Kind::TrafficFlowObserved => {
                e.insert(
                    "laneId".into(),
                    prop(json!(1 + (self.traits[0] * 3.0) as u32)),
                );
            }
            Kind::AirQualityObserved | Kind::WeatherObserved => {}
        }
        let mut rng = self.rng_at(t);
        for (k, v) in self.readings(t, &mut rng) {
            e.insert(k, v);
        }
        Value::Object(e)
    }

    fn capacity(&self) -> u32 {
        match self.kind {
            Kind::OffStreetParking => 100 + (self.traits[1] * 400.0) as u32,
            Kind::WasteContainer => [120, 240, 660, 1100][(self.traits[1] * 4.0) as usize % 4],
            Kind::EVChargingStation => 2 + (self.traits[1] * 6.0) as u32,
            _ => 1,
        }
    }

    /// The randomness of one reading: a pure function of seed-derived traits, device and time.
    fn rng_at(&self, t: DateTime<Utc>) -> StdRng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.id.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h ^= (self.traits[2] * 1e9) as u64;
        StdRng::seed_from_u64(h ^ (t.timestamp() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// A measurement at time `t`: the attributes that change, with `observedAt`.
    pub fn measurement(&self, t: DateTime<Utc>) -> Map<String, Value> {
        let mut rng = self.rng_at(t);
        self.readings(t, &mut rng)
    }

    fn readings(&self, t: DateTime<Utc>, rng: &mut StdRng) -> Map<String, Value> {
        let at = t.to_rfc3339_opts(SecondsFormat::Millis, true);
        let hour = local_hour(t);
        let mut noise = |scale: f64| (rng.random::<f64>() - 0.5) * 2.0 * scale;
        let fault = self.faulty && (t.timestamp() / 3600) % 4 == 0;
        let outlier = (t.timestamp() as u64 ^ (self.traits[2] * 1e6) as u64).is_multiple_of(997);
        let mut m = Map::new();
        match self.kind {
            Kind::ParkingSpot => {
                let busy = 0.25 + 0.6 * bump(hour, 11.0, 3.5) + 0.3 * bump(hour, 20.0, 2.0);
                let occupied = self.traits[0] * 0.4 + noise(0.35) + 0.3 < busy;
                let status = if fault {
                    "unknown"
                } else if occupied {
                    "occupied"
                } else {
                    "free"
                };
                m.insert("status".into(), observed(json!(status), &at));
            }
            Kind::OffStreetParking => {
                let total = f64::from(self.capacity());
                let used =
                    (total * (0.15 + 0.75 * bump(hour, 12.0, 4.0) + noise(0.05))).clamp(0.0, total);
                m.insert(
                    "availableSpotNumber".into(),
                    observed(json!((total - used).round() as u32), &at),
                );
                m.insert(
                    "occupancy".into(),
                    measured(json!(round(used / total, 3)), "C62", &at),
                );
            }
            Kind::Streetlight => {
                let on = is_dark(hour);
                let status = if fault { "defectiveLamp" } else { "ok" };
                let power = if on && !fault { "on" } else { "off" };
                m.insert("powerState".into(), observed(json!(power), &at));
                m.insert("status".into(), observed(json!(status), &at));
                let lux = if power == "on" { 0.8 + noise(0.1) } else { 0.0 };
                m.insert(
                    "illuminanceLevel".into(),
                    measured(json!(round(lux, 2)), "C62", &at),
                );
            }
            Kind::AirQualityObserved => {
                let rush = traffic_shape(hour);
                let mut no2 = 15.0 + 45.0 * rush * (0.7 + self.traits[0] * 0.6) + noise(4.0);
                if outlier {
                    no2 *= 6.0;
                }
                m.insert(
                    "NO2".into(),
                    measured(json!(round(no2.max(0.0), 1)), "GQ", &at),
                );
                m.insert(
                    "PM10".into(),
                    measured(
                        json!(round((12.0 + 18.0 * rush + noise(3.0)).max(0.0), 1)),
                        "GQ",
                        &at,
                    ),
                );
                m.insert(
                    "PM2_5".into(),
                    measured(
                        json!(round((7.0 + 10.0 * rush + noise(2.0)).max(0.0), 1)),
                        "GQ",
                        &at,
                    ),
                );
                m.insert(
                    "O3".into(),
                    measured(
                        json!(round(
                            (40.0 + 40.0 * bump(hour, 15.0, 3.0) + noise(5.0)).max(0.0),
                            1
                        )),
                        "GQ",
                        &at,
                    ),
                );
                let aqi = if no2 > 200.0 {
                    "poor"
                } else if no2 > 100.0 {
                    "moderate"
                } else {
                    "good"
                };
                m.insert("airQualityLevel".into(), observed(json!(aqi), &at));
            }
            Kind::WeatherObserved => {
                let temp = 11.0 + 6.0 * ((hour - 9.0) / 24.0 * 2.0 * PI).sin() + noise(0.6);
                m.insert(
                    "temperature".into(),
                    measured(json!(round(temp, 1)), "CEL", &at),
                );
                m.insert(
                    "relativeHumidity".into(),
                    measured(
                        json!(round(
                            (0.75 - 0.2 * bump(hour, 15.0, 4.0) + noise(0.03)).clamp(0.0, 1.0),
                            2
                        )),
                        "C62",
                        &at,
                    ),
                );
                m.insert(
                    "windSpeed".into(),
                    measured(json!(round((3.0 + noise(2.0)).max(0.0), 1)), "MTS", &at),
                );
                m.insert(
                    "precipitation".into(),
                    measured(
                        json!(if noise(1.0) > 0.8 {
                            round(noise(2.0).abs(), 1)
                        } else {
                            0.0
                        }),
                        "MMT",
                        &at,
                    ),
                );
            }
            Kind::ElectricityMeter => {
                // 15-minute interval readings: energy of the interval and the cumulative index.
                let kw = (1.5 + self.traits[0] * 3.0) * load_shape(hour) * (1.0 + noise(0.08));
                let interval_kwh = round(kw.max(0.0) * 0.25, 3);
                let days = t.timestamp() as f64 / 86_400.0;
                let index = round(
                    1000.0 * self.traits[1] + days * 24.0 * (1.5 + self.traits[0] * 3.0) * 0.45,
                    3,
                );
                m.insert(
                    "activePower".into(),
                    measured(json!(round(kw.max(0.0), 3)), "KWT", &at),
                );
                m.insert(
                    "intervalEnergyImport".into(),
                    measured(json!(interval_kwh), "KWH", &at),
                );
                m.insert(
                    "totalActiveEnergyImport".into(),
                    measured(json!(index), "KWH", &at),
                );
            }
            Kind::WaterMeter => {
                let flow = (0.05 + 0.4 * bump(hour, 7.0, 1.0) + 0.3 * bump(hour, 20.0, 1.5))
                    * (0.5 + self.traits[0])
                    + noise(0.02);
                let leak = if fault { 0.08 } else { 0.0 };
                m.insert(
                    "flow".into(),
                    measured(json!(round((flow + leak).max(0.0), 3)), "MQH", &at),
                );
                let days = t.timestamp() as f64 / 86_400.0;
                m.insert(
                    "cumulativeVolume".into(),
                    measured(
                        json!(round(100.0 * self.traits[1] + days * 0.3, 3)),
                        "MTQ",
                        &at,
                    ),
                );
            }
            Kind::WasteContainer => {
                // Fills over the day, emptied at 6 am.
                let since_pickup = (hour - 6.0).rem_euclid(24.0) / 24.0;
                let level =
                    (since_pickup * (0.6 + 0.6 * self.traits[0]) + noise(0.03)).clamp(0.0, 1.0);
                let status = if fault {
                    "lidOpen"
                } else if level > 0.9 {
                    "full"
                } else {
                    "ok"
                };
                m.insert(
                    "fillingLevel".into(),
                    measured(json!(round(level, 2)), "C62", &at),
                );
                m.insert("status".into(), observed(json!(status), &at));
                m.insert(
                    "temperature".into(),
                    measured(
                        json!(round(
                            12.0 + noise(3.0) + if outlier { 60.0 } else { 0.0 },
                            1
                        )),
                        "CEL",
                        &at,
                    ),
                );
            }
            Kind::TrafficFlowObserved => {
                let shape = traffic_shape(hour);
                let intensity = (600.0 * shape * (0.6 + self.traits[0]) + noise(40.0)).max(0.0);
                let speed = (50.0 - 30.0 * shape + noise(4.0)).max(3.0);
                m.insert(
                    "intensity".into(),
                    measured(json!(intensity.round() as u32), "E50", &at),
                );
                m.insert(
                    "averageVehicleSpeed".into(),
                    measured(json!(round(speed, 1)), "KMH", &at),
                );
                m.insert(
                    "occupancy".into(),
                    measured(
                        json!(round((shape * 0.8 + noise(0.05)).clamp(0.0, 1.0), 2)),
                        "C62",
                        &at,
                    ),
                );
                m.insert("congested".into(), observed(json!(speed < 20.0), &at));
            }
            Kind::EVChargingStation => {
                let cap = f64::from(self.capacity());
                let used = (cap * (0.2 + 0.6 * bump(hour, 19.0, 3.0) + noise(0.15)))
                    .clamp(0.0, cap)
                    .round();
                let status = if fault {
                    "outOfService"
                } else if used >= cap {
                    "full"
                } else {
                    "available"
                };
                m.insert(
                    "availableCapacity".into(),
                    observed(json!((cap - used) as u32), &at),
                );
                m.insert("status".into(), observed(json!(status), &at));
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use borough_core::Context;
    use borough_core::entity::{ParseMode, parse_entity, parse_fragment};

    fn t(h: u32) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-06-01T{h:02}:00:00Z"))
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn same_seed_same_city_and_readings() {
        let a = City::generate(42, 500);
        let b = City::generate(42, 500);
        assert_eq!(a.devices, b.devices);
        for (x, y) in a.devices.iter().zip(&b.devices) {
            assert_eq!(x.entity(t(8)), y.entity(t(8)));
            assert_eq!(x.measurement(t(9)), y.measurement(t(9)));
        }
        let c = City::generate(43, 500);
        assert_ne!(a.devices, c.devices);
    }

    #[test]
    fn every_kind_is_present_and_every_entity_is_valid_ngsi_ld() {
        let city = City::generate(7, 2000);
        let ctx = Context::core();
        for k in Kind::ALL {
            assert!(city.devices.iter().any(|d| d.kind == k), "{k:?}");
        }
        let mut ids = std::collections::HashSet::new();
        for d in &city.devices {
            assert!(ids.insert(d.id.clone()), "duplicate id {}", d.id);
            let e = d.entity(t(12));
            parse_entity(&e, &ctx, 0).unwrap_or_else(|err| panic!("{e}: {err}"));
            let m = Value::Object(d.measurement(t(13)));
            parse_fragment(&m, &ctx, ParseMode::Full).unwrap_or_else(|err| panic!("{m}: {err}"));
        }
    }

    #[test]
    fn daily_patterns() {
        // Street lights are on at night and off at noon (unless faulty).
        let city = City::generate(1, 400);
        let lights: Vec<&Device> = city
            .devices
            .iter()
            .filter(|d| d.kind == Kind::Streetlight && !d.faulty)
            .collect();
        assert!(!lights.is_empty());
        for l in &lights {
            assert_eq!(l.measurement(t(1))["powerState"]["value"], "on");
            assert_eq!(l.measurement(t(11))["powerState"]["value"], "off");
        }
        // Electricity use peaks in the evening, bottoms out at night.
        assert!(load_shape(19.5) > 2.0 * load_shape(3.0));
        // Traffic is heavier at rush hour than at night, across the city.
        let flows: Vec<&Device> = city
            .devices
            .iter()
            .filter(|d| d.kind == Kind::TrafficFlowObserved)
            .collect();
        let total = |h: u32| -> f64 {
            flows
                .iter()
                .map(|d| d.measurement(t(h))["intensity"]["value"].as_f64().unwrap())
                .sum()
        };
        assert!(total(7) > 3.0 * total(2), "{} vs {}", total(7), total(2));
    }

    #[test]
    fn devices_lie_inside_their_district() {
        let city = City::generate(3, 300);
        for d in &city.devices {
            let poly = city.district_polygon(d.district);
            let ring = poly["coordinates"][0].as_array().unwrap();
            let (x0, y0) = (ring[0][0].as_f64().unwrap(), ring[0][1].as_f64().unwrap());
            let (x1, y1) = (ring[2][0].as_f64().unwrap(), ring[2][1].as_f64().unwrap());
            assert!(
                d.location.0 >= x0 - 1e-6 && d.location.0 <= x1 + 1e-6,
                "{d:?}"
            );
            assert!(
                d.location.1 >= y0 - 1e-6 && d.location.1 <= y1 + 1e-6,
                "{d:?}"
            );
        }
    }
}
