//! Subscriptions (clause 5.8 and 5.2.12): validation of subscription bodies,
//! their compiled form, and the decision whether a change notifies.
//! Pure: the storage engine calls `CompiledSubscription::matches` inside its
//! write, so a notification is recorded in the same durable write as its change.

use crate::context::Context;
use crate::entity::Entity;
use crate::error::{NgsiError, NgsiResult};
use crate::query::geo::parse_geo_q;
use crate::query::{EntityQuery, EntitySelector, compile_id_pattern, parse_q, parse_type_expr};
use crate::render::{Format, RenderOptions};
use crate::validate::{check_name, check_uri, format_datetime, parse_datetime};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Events that can trigger a notification (`notificationTrigger`).
pub const TRIGGERS: [&str; 6] = [
    "entityCreated",
    "entityUpdated",
    "entityDeleted",
    "attributeCreated",
    "attributeUpdated",
    "attributeDeleted",
];
/// The default triggers (clause 5.2.12).
const DEFAULT_TRIGGERS: [&str; 2] = ["attributeCreated", "attributeUpdated"];
/// Most subscriptions' `entities` members and watched attributes.
const MAX_LIST: usize = 100;

/// `q` as ngsildclient and others send it in a subscription body,
/// percent-encoded (`name%3D%3D%22Eiffel%20Tower%22`), decoded; a `q` with
/// no valid `%XX` sequence is returned as it is.
pub fn percent_decoded(q: &str) -> std::borrow::Cow<'_, str> {
    let bytes = q.as_bytes();
    let encoded = bytes
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit());
    if !encoded {
        return std::borrow::Cow::Borrowed(q);
    }
    match percent_encoding::percent_decode_str(q).decode_utf8() {
        Ok(d) => std::borrow::Cow::Owned(d.into_owned()),
        Err(_) => std::borrow::Cow::Borrowed(q),
    }
}

/// Normalizes a subscription body as given by a client before it is stored:
/// a percent-encoded `q` is kept decoded, so that it reads back as a query.
pub fn normalize_body(body: &mut Map<String, Value>) {
    if let Some(Value::String(q)) = body.get_mut("q")
        && let std::borrow::Cow::Owned(d) = percent_decoded(q)
    {
        *q = d;
    }
}

/// Delivery statistics kept with a subscription (clause 5.2.12).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub times_sent: u64,
    pub times_failed: u64,
    pub last_notification: Option<i64>,
    pub last_success: Option<i64>,
    pub last_failure: Option<i64>,
    /// The last delivery error, for the operator.
    pub last_error: Option<String>,
    /// Notifications written but not yet delivered.
    pub pending: u64,
    /// Notifications not written because the subscription already had its
    /// bound of pending ones (a dead receiver must not fill the disk).
    #[serde(default)]
    pub dropped: u64,
}

/// A subscription as stored: the body as the client wrote it (compact terms),
/// the resolved context objects to read it with, and its statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    pub id: String,
    pub body: Map<String, Value>,
    /// The `@context` as given (a URL, an object or an array), echoed back.
    pub context: Value,
    /// The user context objects, resolved at creation, so the subscription
    /// reads the same after a restart even if remote contexts are gone.
    pub context_objects: Vec<Map<String, Value>>,
    /// The context objects of `jsonldContext`, resolved at creation: the
    /// context notifications are compacted with instead of the body's.
    #[serde(default)]
    pub notification_context_objects: Option<Vec<Map<String, Value>>>,
    pub created_at: i64,
    pub modified_at: i64,
    #[serde(default)]
    pub stats: Stats,
}

/// What kind of change an entity went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

/// One entity's change, summarised once and matched against every
/// subscription that can concern it.
#[derive(Debug)]
pub struct Change<'a> {
    pub kind: ChangeKind,
    /// The entity after the change (before it, for a deletion).
    pub subject: &'a Entity,
    /// Expanded names of the attributes created, updated and deleted.
    pub created: Vec<&'a str>,
    pub updated: Vec<&'a str>,
    pub deleted: Vec<&'a str>,
    pub types_changed: bool,
}

impl<'a> Change<'a> {
    /// Summarises `before` → `after`; `None` when neither exists.
    pub fn of(before: Option<&'a Entity>, after: Option<&'a Entity>) -> Option<Self> {
        let names = |e: &'a Entity| e.attrs.keys().map(String::as_str).collect::<Vec<_>>();
        Some(match (before, after) {
            (None, Some(a)) => Self {
                kind: ChangeKind::Created,
                subject: a,
                created: names(a),
                updated: Vec::new(),
                deleted: Vec::new(),
                types_changed: false,
            },
            (Some(b), None) => Self {
                kind: ChangeKind::Deleted,
                subject: b,
                created: Vec::new(),
                updated: Vec::new(),
                deleted: names(b),
                types_changed: false,
            },
            (Some(b), Some(a)) => Self {
                kind: ChangeKind::Updated,
                subject: a,
                created: a
                    .attrs
                    .keys()
                    .filter(|n| !b.attrs.contains_key(*n))
                    .map(String::as_str)
                    .collect(),
                updated: a
                    .attrs
                    .iter()
                    .filter(|(n, inst)| b.attrs.get(*n).is_some_and(|old| old != *inst))
                    .map(|(n, _)| n.as_str())
                    .collect(),
                deleted: b
                    .attrs
                    .keys()
                    .filter(|n| !a.attrs.contains_key(*n))
                    .map(String::as_str)
                    .collect(),
                types_changed: a.types != b.types,
            },
            (None, None) => return None,
        })
    }
}

/// Where notifications go.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub uri: String,
    pub accept: String,
    pub receiver_info: Vec<(String, String)>,
    pub notifier_info: Vec<(String, String)>,
}

/// A subscription ready to match changes and render notifications.
#[derive(Debug)]
pub struct CompiledSubscription {
    pub record: SubscriptionRecord,
    pub ctx: Context,
    /// The context notifications are compacted with: `jsonldContext` when
    /// given, else the subscription's own.
    pub notify_ctx: Context,
    pub query: EntityQuery,
    /// Expanded names; empty: every attribute.
    pub watched: Vec<String>,
    pub triggers: Vec<String>,
    pub render: RenderOptions,
    pub endpoint: Endpoint,
    pub throttling: Option<u64>,
    pub time_interval: Option<u64>,
    pub expires_at: Option<i64>,
    pub is_active: bool,
    pub show_changes: bool,
}

fn bad(detail: impl Into<String>) -> NgsiError {
    NgsiError::bad_data(detail.into())
}

fn strings(v: &Value, what: &str) -> NgsiResult<Vec<String>> {
    let a = v
        .as_array()
        .ok_or_else(|| bad(format!("{what} must be an array of strings")))?;
    if a.len() > MAX_LIST {
        return Err(bad(format!("{what} holds more than {MAX_LIST} items")));
    }
    a.iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("{what} must be an array of strings")))
        })
        .collect()
}

pub(crate) fn key_values(v: Option<&Value>, what: &str) -> NgsiResult<Vec<(String, String)>> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let a = v
        .as_array()
        .ok_or_else(|| bad(format!("{what} must be an array of {{key, value}} objects")))?;
    a.iter()
        .map(|kv| {
            match (
                kv.get("key").and_then(Value::as_str),
                kv.get("value").and_then(Value::as_str),
            ) {
                (Some(k), Some(v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(bad(format!(
                    "{what} must be an array of {{key, value}} objects with string members"
                ))),
            }
        })
        .collect()
}

fn positive_seconds(v: Option<&Value>, what: &str) -> NgsiResult<Option<u64>> {
    match v {
        None => Ok(None),
        Some(x) => match x.as_f64() {
            Some(n) if n > 0.0 && n <= 31_536_000.0 => Ok(Some(n.ceil() as u64)),
            _ => Err(bad(format!("{what} must be a positive number of seconds"))),
        },
    }
}

impl CompiledSubscription {
    /// Validates a stored record and compiles it. `now` decides whether
    /// `expiresAt` is in the past when `check_expiry` is set (on create and update).
    pub fn compile(record: SubscriptionRecord, now: i64, check_expiry: bool) -> NgsiResult<Self> {
        let ctx = Context::with_user_contexts(&record.context_objects)?;
        let b = &record.body;
        for key in b.keys() {
            const KNOWN: [&str; 21] = [
                "id",
                "type",
                "subscriptionName",
                // NGSI-LD 1.3's name of subscriptionName, still sent by clients.
                "name",
                "datasetId",
                "description",
                "entities",
                "watchedAttributes",
                "notificationTrigger",
                "q",
                "geoQ",
                "scopeQ",
                "lang",
                "notification",
                "expiresAt",
                "throttling",
                "timeInterval",
                "isActive",
                "status",
                "jsonldContext",
                "csf",
            ];
            if !KNOWN.contains(&key.as_str()) {
                return Err(bad(format!("unknown subscription member '{key}'")));
            }
        }
        if b.get("type").and_then(Value::as_str) != Some("Subscription") {
            return Err(bad("a subscription needs \"type\": \"Subscription\""));
        }
        if b.contains_key("name") && b.contains_key("subscriptionName") {
            return Err(bad(
                "name (NGSI-LD 1.3) and subscriptionName are the same member: give one",
            ));
        }
        for key in ["name", "subscriptionName", "description"] {
            if b.get(key).is_some_and(|v| !v.is_string()) {
                return Err(bad(format!("{key} must be a string")));
            }
        }
        let notify_ctx = match (
            &b.get("jsonldContext"),
            &record.notification_context_objects,
        ) {
            (None, _) => ctx.clone(),
            (Some(Value::String(u)), Some(objects)) => {
                check_uri("jsonldContext", u)?;
                Context::with_user_contexts(objects)?
            }
            (Some(Value::String(u)), None) => {
                check_uri("jsonldContext", u)?;
                return Err(bad("jsonldContext was not resolved"));
            }
            (Some(_), _) => return Err(bad("jsonldContext must be the URI of a context")),
        };
        let mut query = EntityQuery::default();
        if let Some(entities) = b.get("entities") {
            let list = entities
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| bad("entities must be a non-empty array"))?;
            if list.len() > MAX_LIST {
                return Err(bad(format!("entities holds more than {MAX_LIST} items")));
            }
            for e in list {
                let text = |k: &str| -> NgsiResult<Option<&str>> {
                    match e.get(k) {
                        None => Ok(None),
                        Some(Value::String(s)) => Ok(Some(s.as_str())),
                        Some(_) => Err(bad(format!("entities: {k} must be a string"))),
                    }
                };
                if let Some(id) = text("id")? {
                    check_uri("entity id", id)?;
                }
                query.selectors.push(EntitySelector {
                    id: text("id")?.map(str::to_string),
                    id_pattern: text("idPattern")?.map(compile_id_pattern).transpose()?,
                    types: text("type")?
                        .map(|t| parse_type_expr(t, &ctx))
                        .transpose()?,
                });
            }
        }
        let watched = match b.get("watchedAttributes") {
            None => Vec::new(),
            Some(v) => {
                let names = strings(v, "watchedAttributes")?;
                if names.is_empty() {
                    return Err(bad("watchedAttributes must not be empty"));
                }
                names
                    .iter()
                    .map(|n| {
                        check_name("watched attribute", n)?;
                        Ok(ctx.expand(n).into_owned())
                    })
                    .collect::<NgsiResult<_>>()?
            }
        };
        if query.selectors.is_empty() && watched.is_empty() {
            return Err(bad("a subscription needs entities or watchedAttributes"));
        }
        let triggers = match b.get("notificationTrigger") {
            None => DEFAULT_TRIGGERS.iter().map(|s| s.to_string()).collect(),
            Some(v) => {
                let t = strings(v, "notificationTrigger")?;
                if let Some(bad_t) = t.iter().find(|t| !TRIGGERS.contains(&t.as_str())) {
                    return Err(bad(format!(
                        "unknown notificationTrigger '{bad_t}'; use {}",
                        TRIGGERS.join(", ")
                    )));
                }
                t
            }
        };
        if let Some(q) = b.get("q") {
            let q = q.as_str().ok_or_else(|| bad("q must be a string"))?;
            query.q = Some(parse_q(&percent_decoded(q), &ctx)?);
        }
        if let Some(g) = b.get("geoQ") {
            query.geo = Some(parse_geo_q(g, &ctx)?);
        }
        if let Some(s) = b.get("scopeQ") {
            let s = s.as_str().ok_or_else(|| bad("scopeQ must be a string"))?;
            query.scope_q = Some(crate::query::parse_scope_q(s)?);
        }
        let n = b
            .get("notification")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("a subscription needs a notification object"))?;
        let ep = n
            .get("endpoint")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("notification needs an endpoint object"))?;
        let uri = ep
            .get("uri")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("notification.endpoint needs a uri"))?;
        check_uri("notification endpoint uri", uri)?;
        let scheme = uri
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !["http", "https", "mqtt", "mqtts"].contains(&scheme.as_str()) {
            return Err(bad(format!(
                "endpoint scheme '{scheme}' is not supported; use http, https, mqtt or mqtts"
            )));
        }
        let accept = match ep.get("accept") {
            None => "application/json".to_string(),
            Some(Value::String(a))
                if [
                    "application/json",
                    "application/ld+json",
                    "application/geo+json",
                ]
                .contains(&a.as_str()) =>
            {
                a.clone()
            }
            Some(other) => {
                return Err(bad(format!(
                    "endpoint accept {other} is not supported; use application/json, application/ld+json or application/geo+json"
                )));
            }
        };
        let format = match n.get("format").and_then(Value::as_str) {
            None | Some("normalized") => Format::Normalized,
            Some("concise") => Format::Concise,
            Some("keyValues" | "simplified") => Format::KeyValues,
            Some(other) => {
                return Err(bad(format!(
                    "unknown notification format '{other}'; use normalized, concise, keyValues or simplified"
                )));
            }
        };
        let attributes = match n.get("attributes") {
            None => None,
            Some(v) => Some(
                strings(v, "notification.attributes")?
                    .iter()
                    .map(|a| ctx.expand(a).into_owned())
                    .collect(),
            ),
        };
        let flag = |k: &str| -> NgsiResult<bool> {
            match n.get(k) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(bad(format!("notification.{k} must be true or false"))),
            }
        };
        let lang = match b.get("lang") {
            None => None,
            Some(Value::String(l)) => Some(vec![l.clone()]),
            Some(_) => return Err(bad("lang must be a string")),
        };
        let dataset_ids = match b.get("datasetId") {
            None => None,
            Some(v) => Some(
                strings(v, "datasetId")?
                    .into_iter()
                    .map(|d| {
                        if d == "@none" {
                            Ok(None)
                        } else {
                            check_uri("datasetId", &d).map(|()| Some(d))
                        }
                    })
                    .collect::<NgsiResult<Vec<_>>>()?,
            ),
        };
        let render = RenderOptions {
            format,
            sys_attrs: flag("sysAttrs")?,
            attrs: attributes,
            lang,
            dataset_ids,
            ..RenderOptions::default()
        };
        let throttling = positive_seconds(b.get("throttling"), "throttling")?;
        let time_interval = positive_seconds(b.get("timeInterval"), "timeInterval")?;
        if throttling.is_some() && time_interval.is_some() {
            return Err(bad("throttling and timeInterval exclude each other"));
        }
        if time_interval.is_some() && !watched.is_empty() {
            return Err(bad("timeInterval and watchedAttributes exclude each other"));
        }
        let expires_at = match b.get("expiresAt") {
            None => None,
            Some(Value::String(s)) => Some(
                parse_datetime(s)
                    .ok_or_else(|| bad(format!("expiresAt '{s}' is not a date-time")))?,
            ),
            Some(_) => return Err(bad("expiresAt must be a date-time string")),
        };
        if check_expiry && expires_at.is_some_and(|t| t <= now) {
            return Err(bad("expiresAt is in the past"));
        }
        let is_active = match b.get("isActive") {
            None => true,
            Some(Value::Bool(a)) => *a,
            Some(_) => return Err(bad("isActive must be true or false")),
        };
        let endpoint = Endpoint {
            uri: uri.to_string(),
            accept,
            receiver_info: key_values(ep.get("receiverInfo"), "receiverInfo")?,
            notifier_info: key_values(ep.get("notifierInfo"), "notifierInfo")?,
        };
        Ok(Self {
            show_changes: flag("showChanges")?,
            record,
            ctx,
            notify_ctx,
            query,
            watched,
            triggers,
            render,
            endpoint,
            throttling,
            time_interval,
            expires_at,
            is_active,
        })
    }

    /// `active`, `paused` or `expired` at time `now`.
    pub fn status(&self, now: i64) -> &'static str {
        if self.expires_at.is_some_and(|t| t <= now) {
            "expired"
        } else if !self.is_active {
            "paused"
        } else {
            "active"
        }
    }

    /// Whether a change of one entity (`before` → `after`) notifies, and which
    /// trigger it is. Periodic (`timeInterval`) subscriptions never notify on change.
    pub fn matches(
        &self,
        before: Option<&Entity>,
        after: Option<&Entity>,
        now: i64,
    ) -> Option<&'static str> {
        self.matches_change(&Change::of(before, after)?, now)
    }

    /// `matches` for a change already summarised (once for all subscriptions).
    pub fn matches_change(&self, change: &Change<'_>, now: i64) -> Option<&'static str> {
        if self.status(now) != "active" || self.time_interval.is_some() {
            return None;
        }
        let subject = change.subject;
        if !self.query.selectors.is_empty()
            && !self.query.selectors.iter().any(|s| s.matches(subject))
        {
            return None;
        }
        let trigger = self.trigger(change)?;
        // Conditions apply to the entity as it now is (to the last state for deletions).
        self.query.content_matches(subject).then_some(trigger)
    }

    fn wanted(&self, name: &str) -> bool {
        self.watched.is_empty() || self.watched.iter().any(|w| w == name)
    }

    fn trigger(&self, c: &Change<'_>) -> Option<&'static str> {
        let on = |t: &str| self.triggers.iter().any(|x| x == t);
        let any = |names: &[&str]| names.iter().any(|n| self.wanted(n));
        match c.kind {
            ChangeKind::Created => {
                if on("entityCreated") {
                    return Some("entityCreated");
                }
                (on("attributeCreated") && any(&c.created)).then_some("attributeCreated")
            }
            ChangeKind::Deleted => {
                if on("entityDeleted") {
                    return Some("entityDeleted");
                }
                (on("attributeDeleted") && any(&c.deleted)).then_some("attributeDeleted")
            }
            ChangeKind::Updated => {
                let (created, updated, deleted) =
                    (any(&c.created), any(&c.updated), any(&c.deleted));
                if created && on("attributeCreated") {
                    Some("attributeCreated")
                } else if updated && on("attributeUpdated") {
                    Some("attributeUpdated")
                } else if deleted && on("attributeDeleted") {
                    Some("attributeDeleted")
                } else if (created || updated || deleted || c.types_changed) && on("entityUpdated")
                {
                    Some("entityUpdated")
                } else {
                    None
                }
            }
        }
    }

    /// The subscription as `GET /subscriptions/{id}` shows it, with `s` as its statistics.
    pub fn to_json(&self, now: i64, with_context: bool, s: &Stats) -> Value {
        let mut body = self.record.body.clone();
        body.insert("id".into(), json!(self.record.id));
        body.insert("status".into(), json!(self.status(now)));
        if let Some(Value::Object(n)) = body.get_mut("notification") {
            n.insert("timesSent".into(), json!(s.times_sent));
            n.insert("timesFailed".into(), json!(s.times_failed));
            let t = |v: Option<i64>| v.map(format_datetime);
            if let Some(x) = t(s.last_notification) {
                n.insert("lastNotification".into(), json!(x));
            }
            if let Some(x) = t(s.last_success) {
                n.insert("lastSuccess".into(), json!(x));
            }
            if let Some(x) = t(s.last_failure) {
                n.insert("lastFailure".into(), json!(x));
            }
            if let Some(e) = &s.last_error {
                n.insert("lastFailureReason".into(), json!(e));
            }
            n.insert("pending".into(), json!(s.pending));
            n.insert("dropped".into(), json!(s.dropped));
            n.insert(
                "status".into(),
                json!(if s.last_failure > s.last_success {
                    "failed"
                } else {
                    "ok"
                }),
            );
        }
        if with_context {
            let mut out = Map::new();
            out.insert("@context".into(), self.record.context.clone());
            out.extend(body);
            return Value::Object(out);
        }
        Value::Object(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::parse_entity;

    fn record(body: Value) -> SubscriptionRecord {
        SubscriptionRecord {
            id: "urn:ngsi-ld:Subscription:1".into(),
            body: body.as_object().cloned().unwrap(),
            context: Value::Null,
            context_objects: Vec::new(),
            notification_context_objects: None,
            created_at: 0,
            modified_at: 0,
            stats: Stats::default(),
        }
    }

    fn compile(body: Value) -> NgsiResult<CompiledSubscription> {
        CompiledSubscription::compile(record(body), 1_000, true)
    }

    fn base() -> Value {
        json!({"type": "Subscription", "entities": [{"type": "ParkingSpot"}],
               "notification": {"endpoint": {"uri": "http://127.0.0.1:9/notify"}}})
    }

    fn spot(status: &str, extra: Option<(&str, i64)>) -> Entity {
        let mut v = json!({"id": "urn:ngsi-ld:ParkingSpot:1", "type": "ParkingSpot", "status": status, "level": 1});
        if let Some((k, n)) = extra {
            v[k] = json!(n);
        }
        parse_entity(&v, &Context::core(), 0).unwrap()
    }

    #[test]
    fn invalid_subscriptions_say_why() {
        let mut cases: Vec<(Value, &str)> = Vec::new();
        let mut v = base();
        v["notification"]["format"] = json!("fancy");
        cases.push((v, "format"));
        let mut v = base();
        v["q"] = json!("status=>1");
        cases.push((v, "position"));
        let mut v = base();
        v["throttling"] = json!(5);
        v["timeInterval"] = json!(10);
        cases.push((v, "exclude"));
        let mut v = base();
        v["expiresAt"] = json!("1970-01-01T00:00:00Z");
        cases.push((v, "past"));
        let mut v = base();
        v["notification"]["endpoint"]["uri"] = json!("ftp://example.org/x");
        cases.push((v, "scheme"));
        let mut v = base();
        v["geoQ"] = json!({"georel": "near", "geometry": "Point", "coordinates": [0, 0]});
        cases.push((v, "maxDistance"));
        let mut v = base();
        v.as_object_mut().unwrap().remove("entities");
        cases.push((v, "entities or watchedAttributes"));
        let mut v = base();
        v["notificationTrigger"] = json!(["sometimes"]);
        cases.push((v, "notificationTrigger"));
        cases.push((
            json!({"type": "Subscription", "entities": [{"type": "A"}]}),
            "notification",
        ));
        for (body, word) in cases {
            let e = compile(body.clone()).unwrap_err();
            assert!(e.detail.contains(word), "{body}: {}", e.detail);
        }
    }

    #[test]
    fn default_triggers_are_attribute_created_and_updated() {
        let s = compile(base()).unwrap();
        let a = spot("free", None);
        let b = spot("occupied", None);
        assert_eq!(s.matches(None, Some(&a), 2_000), Some("attributeCreated"));
        assert_eq!(
            s.matches(Some(&a), Some(&b), 2_000),
            Some("attributeUpdated")
        );
        assert_eq!(
            s.matches(Some(&a), Some(&a), 2_000),
            None,
            "no change, no notification"
        );
        assert_eq!(
            s.matches(Some(&a), None, 2_000),
            None,
            "deletions are not a default trigger"
        );
    }

    #[test]
    fn watched_attributes_q_and_status() {
        let mut v = base();
        v["watchedAttributes"] = json!(["status"]);
        v["q"] = json!("status==\"free\"");
        v["notificationTrigger"] = json!(["attributeUpdated", "entityDeleted"]);
        let s = compile(v).unwrap();
        let free = spot("free", None);
        let occupied = spot("occupied", None);
        let free_level2 = spot("free", Some(("level", 2)));
        assert_eq!(
            s.matches(Some(&occupied), Some(&free), 2_000),
            Some("attributeUpdated")
        );
        assert_eq!(
            s.matches(Some(&free), Some(&occupied), 2_000),
            None,
            "q fails on the new state"
        );
        assert_eq!(
            s.matches(Some(&free), Some(&free_level2), 2_000),
            None,
            "level is not watched"
        );
        assert_eq!(s.matches(Some(&free), None, 2_000), Some("entityDeleted"));
        let mut v = base();
        v["isActive"] = json!(false);
        let paused = compile(v).unwrap();
        assert_eq!(paused.status(2_000), "paused");
        assert_eq!(paused.matches(Some(&occupied), Some(&free), 2_000), None);
        let mut v = base();
        v["expiresAt"] = json!(format_datetime(5_000));
        let expiring = compile(v).unwrap();
        assert_eq!(expiring.status(6_000), "expired");
        assert_eq!(expiring.matches(Some(&occupied), Some(&free), 6_000), None);
    }

    #[test]
    fn other_types_do_not_match() {
        let s = compile(base()).unwrap();
        let lamp = parse_entity(
            &json!({"id": "urn:ngsi-ld:Streetlight:1", "type": "Streetlight", "p": 1}),
            &Context::core(),
            0,
        )
        .unwrap();
        assert_eq!(s.matches(None, Some(&lamp), 2_000), None);
    }
}
