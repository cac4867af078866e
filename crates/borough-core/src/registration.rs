//! Context source registrations (clauses 4.3.6, 5.2.9 and 5.9): validation of
//! registration bodies, their compiled form, and which registrations an
//! operation concerns. Pure: the API layer stores them and forwards to them.

use crate::context::Context;
use crate::entity::Entity;
use crate::error::{NgsiError, NgsiResult};
use crate::query::{TypeExpr, compile_id_pattern};
use crate::validate::{check_name, check_uri, parse_datetime};
use indexmap::IndexMap;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Most members of `information`, of its `entities` and of its name lists.
const MAX_LIST: usize = 100;

/// The distributed operations a registration can name (clause 4.3.6.3).
pub const OPERATIONS: [&str; 38] = [
    "createEntity",
    "updateEntity",
    "appendAttrs",
    "updateAttrs",
    "deleteAttrs",
    "deleteEntity",
    "createBatch",
    "upsertBatch",
    "updateBatch",
    "deleteBatch",
    "upsertTemporal",
    "appendAttrsTemporal",
    "deleteAttrsTemporal",
    "updateAttrInstanceTemporal",
    "deleteAttrInstanceTemporal",
    "deleteTemporal",
    "mergeEntity",
    "replaceEntity",
    "replaceAttrs",
    "mergeBatch",
    "purgeEntity",
    "retrieveEntity",
    "queryEntity",
    "queryBatch",
    "retrieveTemporal",
    "queryTemporal",
    "retrieveEntityTypes",
    "retrieveEntityTypeDetails",
    "retrieveEntityTypeInfo",
    "retrieveAttrTypes",
    "retrieveAttrTypeDetails",
    "retrieveAttrTypeInfo",
    "createSubscription",
    "updateSubscription",
    "retrieveSubscription",
    "querySubscription",
    "deleteSubscription",
    "retrieveContextSourceIdentity",
];

/// `federationOps` of GS CIM 009 V1.9.1 (temporal operations are no longer
/// part of it); `associationOps` is the same here, as Borough has no entity maps.
const FEDERATION_OPS: &[&str] = &[
    "retrieveEntity",
    "queryEntity",
    "queryBatch",
    "retrieveEntityTypes",
    "retrieveEntityTypeDetails",
    "retrieveEntityTypeInfo",
    "retrieveAttrTypes",
    "retrieveAttrTypeDetails",
    "retrieveAttrTypeInfo",
    "createSubscription",
    "updateSubscription",
    "retrieveSubscription",
    "querySubscription",
    "deleteSubscription",
    "retrieveContextSourceIdentity",
];
const UPDATE_OPS: &[&str] = &[
    "updateEntity",
    "updateAttrs",
    "replaceEntity",
    "replaceAttrs",
];
const RETRIEVE_OPS: &[&str] = &["retrieveEntity", "queryEntity"];
const REDIRECTION_OPS: &[&str] = &[
    "createEntity",
    "updateEntity",
    "appendAttrs",
    "updateAttrs",
    "deleteAttrs",
    "deleteEntity",
    "mergeEntity",
    "replaceEntity",
    "replaceAttrs",
    "retrieveEntity",
    "queryEntity",
    "purgeEntity",
    "retrieveEntityTypes",
    "retrieveEntityTypeDetails",
    "retrieveEntityTypeInfo",
    "retrieveAttrTypes",
    "retrieveAttrTypeDetails",
    "retrieveAttrTypeInfo",
    "createSubscription",
    "updateSubscription",
    "retrieveSubscription",
    "querySubscription",
    "deleteSubscription",
];

/// The operations of an operation group (clause 4.3.6.4), or `None`.
pub fn operation_group(name: &str) -> Option<&'static [&'static str]> {
    match name {
        "federationOps" | "associationOps" => Some(FEDERATION_OPS),
        "updateOps" => Some(UPDATE_OPS),
        "retrieveOps" => Some(RETRIEVE_OPS),
        "redirectionOps" => Some(REDIRECTION_OPS),
        _ => None,
    }
}

/// Operations that change data: an auxiliary registration may not name them.
fn is_write(op: &str) -> bool {
    !(op.starts_with("retrieve") || op.starts_with("query"))
}

/// How a registered source relates to the local data (clause 4.3.6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The source holds data besides the local broker's: both are asked.
    Inclusive,
    /// The source alone holds the registered attributes of the registered entities.
    Exclusive,
    /// The source holds the data instead: requests go there, nothing is kept locally.
    Redirect,
    /// The source fills in what no other source has, for reads only.
    Auxiliary,
}

/// A registration as stored: the body as the client wrote it (compact
/// terms) and the context objects to read it with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegistrationRecord {
    pub id: String,
    pub body: Map<String, Value>,
    /// The `@context` as given, echoed back.
    pub context: Value,
    /// The user context objects, resolved at creation, so that the
    /// registration reads the same after a restart.
    pub context_objects: Vec<Map<String, Value>>,
    pub created_at: i64,
    pub modified_at: i64,
}

/// One member of `information[].entities` (clause 5.2.8), names expanded.
#[derive(Clone, Debug)]
pub struct EntityInfo {
    pub id: Option<String>,
    pub id_pattern: Option<Regex>,
    pub types: Vec<String>,
}

impl EntityInfo {
    /// Whether an entity with this id, and these types when known, is covered.
    pub fn covers(&self, id: &str, types: Option<&[String]>) -> bool {
        self.id.as_deref().is_none_or(|i| i == id)
            && self.id_pattern.as_ref().is_none_or(|r| r.is_match(id))
            && types.is_none_or(|ts| ts.iter().any(|t| self.types.contains(t)))
    }

    /// Whether an entity this member covers can match a type expression.
    fn meets(&self, types: &TypeExpr) -> bool {
        self.types
            .iter()
            .any(|t| types.eval(&mut |name: &String| name == t))
    }
}

/// One member of `information` (clause 5.2.10), names expanded.
#[derive(Clone, Debug, Default)]
pub struct RegistrationInfo {
    /// Empty: any entity.
    pub entities: Vec<EntityInfo>,
    pub property_names: Vec<String>,
    pub relationship_names: Vec<String>,
}

impl RegistrationInfo {
    /// True when no attribute is named: every attribute is registered.
    pub fn all_attributes(&self) -> bool {
        self.property_names.is_empty() && self.relationship_names.is_empty()
    }

    pub fn covers_attribute(&self, name: &str) -> bool {
        self.all_attributes()
            || self.property_names.iter().any(|n| n == name)
            || self.relationship_names.iter().any(|n| n == name)
    }

    fn names(&self) -> impl Iterator<Item = &String> {
        self.property_names.iter().chain(&self.relationship_names)
    }
}

/// Which attributes of an entity a registration supplies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Supplied {
    All,
    Only(Vec<String>),
}

impl Supplied {
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// A registration ready to decide what it covers.
#[derive(Debug)]
pub struct CompiledRegistration {
    pub record: RegistrationRecord,
    pub ctx: Context,
    pub information: Vec<RegistrationInfo>,
    pub endpoint: String,
    pub mode: Mode,
    /// Operation names, groups expanded.
    pub operations: Vec<&'static str>,
    /// The tenant to address at the source.
    pub tenant: Option<String>,
    pub expires_at: Option<i64>,
    /// `management.timeout` and `management.cooldown`, milliseconds.
    pub timeout_ms: Option<u64>,
    pub cooldown_ms: Option<u64>,
    /// `management.localOnly`: the source answers with its own data only.
    pub local_only: bool,
    pub context_source_info: Vec<(String, String)>,
}

impl CompiledRegistration {
    /// The context the source reads names in (`contextSourceInfo`
    /// `jsonldContext`, clause 4.3.6.6), if the registration names one.
    pub fn jsonld_context(&self) -> Option<&str> {
        self.context_source_info
            .iter()
            .find(|(k, _)| k == "jsonldContext")
            .map(|(_, v)| v.as_str())
    }
}

/// Members a client may write; the system sets the rest.
const WRITABLE: [&str; 20] = [
    "id",
    "type",
    "registrationName",
    "description",
    "information",
    "tenant",
    "observationInterval",
    "managementInterval",
    "location",
    "observationSpace",
    "operationSpace",
    "expiresAt",
    "endpoint",
    "contextSourceInfo",
    "scope",
    "mode",
    "operations",
    "refreshRate",
    "management",
    "@context",
];

/// Members only the broker writes: ignored in a body (clause 5.2.9, table 5.2.9-2).
const SYSTEM_MEMBERS: [&str; 8] = [
    "createdAt",
    "modifiedAt",
    "status",
    "timesSent",
    "timesFailed",
    "lastSuccess",
    "lastFailure",
    "lastFailureReason",
];

/// Drops the members only the broker writes from a client's body: they are
/// ignored (clause 5.2.9, table 5.2.9-2), never stored or echoed.
pub fn drop_system_members(body: &mut Map<String, Value>) {
    body.retain(|k, _| !SYSTEM_MEMBERS.contains(&k.as_str()));
}

fn bad(detail: impl Into<String>) -> NgsiError {
    NgsiError::bad_data(detail.into())
}

fn list<'a>(v: &'a Value, what: &str) -> NgsiResult<&'a Vec<Value>> {
    let a = v
        .as_array()
        .ok_or_else(|| bad(format!("{what} must be an array")))?;
    if a.len() > MAX_LIST {
        return Err(bad(format!("{what} holds more than {MAX_LIST} items")));
    }
    Ok(a)
}

fn names(v: Option<&Value>, what: &str, ctx: &Context) -> NgsiResult<Vec<String>> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let a = list(v, what)?;
    if a.is_empty() {
        return Err(bad(format!("{what} must not be empty when given")));
    }
    a.iter()
        .map(|x| {
            let n = x
                .as_str()
                .ok_or_else(|| bad(format!("{what} must be an array of attribute names")))?;
            check_name(what, n)?;
            Ok(ctx.expand(n).into_owned())
        })
        .collect()
}

fn entity_info(v: &Value, at: &str, ctx: &Context) -> NgsiResult<EntityInfo> {
    let o = v
        .as_object()
        .ok_or_else(|| bad(format!("{at} must be an object")))?;
    for key in o.keys() {
        if !matches!(key.as_str(), "id" | "idPattern" | "type") {
            return Err(bad(format!("{at}: unknown member '{key}'")));
        }
    }
    let text = |k: &str| -> NgsiResult<Option<&str>> {
        match o.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(bad(format!("{at}.{k} must be a string"))),
        }
    };
    let id = text("id")?;
    if let Some(id) = id {
        check_uri(&format!("{at}.id"), id)?;
    }
    let id_pattern = text("idPattern")?.map(compile_id_pattern).transpose()?;
    if id.is_some() && id_pattern.is_some() {
        return Err(bad(format!("{at}: give id or idPattern, not both")));
    }
    let types = match o.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) if !ts.is_empty() && ts.len() <= MAX_LIST => ts
            .iter()
            .map(|t| {
                t.as_str()
                    .ok_or_else(|| bad(format!("{at}.type must be a string or strings")))
            })
            .collect::<NgsiResult<_>>()?,
        None => return Err(bad(format!("{at} needs a type"))),
        Some(_) => return Err(bad(format!("{at}.type must be a string or strings"))),
    };
    let types = types
        .into_iter()
        .map(|t| {
            check_name(&format!("{at}.type"), t)?;
            Ok(ctx.expand(t).into_owned())
        })
        .collect::<NgsiResult<_>>()?;
    Ok(EntityInfo {
        id: id.map(str::to_string),
        id_pattern,
        types,
    })
}

fn information(v: Option<&Value>, ctx: &Context) -> NgsiResult<Vec<RegistrationInfo>> {
    let v = v.ok_or_else(|| bad("a registration needs information"))?;
    let items = list(v, "information")?;
    if items.is_empty() {
        return Err(bad("information must not be empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("information[{i}]");
            let o = item
                .as_object()
                .ok_or_else(|| bad(format!("{at} must be an object")))?;
            for key in o.keys() {
                if !matches!(
                    key.as_str(),
                    "entities" | "propertyNames" | "relationshipNames"
                ) {
                    return Err(bad(format!("{at}: unknown member '{key}'")));
                }
            }
            let entities = match o.get("entities") {
                None => Vec::new(),
                Some(es) => {
                    let es = list(es, &format!("{at}.entities"))?;
                    if es.is_empty() {
                        return Err(bad(format!("{at}.entities must not be empty when given")));
                    }
                    es.iter()
                        .enumerate()
                        .map(|(j, e)| entity_info(e, &format!("{at}.entities[{j}]"), ctx))
                        .collect::<NgsiResult<_>>()?
                }
            };
            let info = RegistrationInfo {
                entities,
                property_names: names(o.get("propertyNames"), &format!("{at}.propertyNames"), ctx)?,
                relationship_names: names(
                    o.get("relationshipNames"),
                    &format!("{at}.relationshipNames"),
                    ctx,
                )?,
            };
            if info.entities.is_empty() && info.all_attributes() {
                return Err(bad(format!(
                    "{at} needs at least one of entities, propertyNames or relationshipNames"
                )));
            }
            Ok(info)
        })
        .collect()
}

fn operations(v: Option<&Value>) -> NgsiResult<Vec<&'static str>> {
    let Some(v) = v else {
        return Ok(FEDERATION_OPS.to_vec());
    };
    // Some FIWARE IoT Agents send one group as a bare string.
    let single;
    let items = match v {
        Value::String(_) => {
            single = vec![v.clone()];
            &single
        }
        _ => list(v, "operations")?,
    };
    if items.is_empty() {
        return Err(bad("operations must not be empty when given"));
    }
    let mut ops: Vec<&'static str> = Vec::new();
    for item in items {
        let name = item
            .as_str()
            .ok_or_else(|| bad("operations must be an array of operation names"))?;
        let expanded: &[&'static str] = match operation_group(name) {
            Some(group) => group,
            // The name of NGSI-LD 1.7 for updateAttrInstanceTemporal.
            None if name == "updateAttrsTemporal" => &["updateAttrInstanceTemporal"],
            None => match OPERATIONS.iter().find(|o| **o == name) {
                Some(op) => std::slice::from_ref(op),
                None => {
                    return Err(bad(format!(
                        "operations: '{}' is neither an operation nor an operation group (federationOps, updateOps, retrieveOps, redirectionOps)",
                        crate::validate::truncate(name)
                    )));
                }
            },
        };
        for op in expanded {
            if !ops.contains(op) {
                ops.push(op);
            }
        }
    }
    Ok(ops)
}

fn milliseconds(v: Option<&Value>, what: &str) -> NgsiResult<Option<u64>> {
    match v {
        None => Ok(None),
        Some(x) => match x.as_f64() {
            Some(n) if n > 0.0 && n <= 86_400_000.0 => Ok(Some(n.ceil() as u64)),
            _ => Err(bad(format!(
                "{what} must be a positive number of milliseconds (at most a day)"
            ))),
        },
    }
}

fn time_interval(v: Option<&Value>, what: &str) -> NgsiResult<()> {
    let Some(v) = v else { return Ok(()) };
    let o = v
        .as_object()
        .ok_or_else(|| bad(format!("{what} must be an object with startAt and endAt")))?;
    let at = |k: &str| -> NgsiResult<Option<i64>> {
        match o.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => parse_datetime(s)
                .map(Some)
                .ok_or_else(|| bad(format!("{what}.{k} must be a date-time"))),
            Some(_) => Err(bad(format!("{what}.{k} must be a date-time"))),
        }
    };
    let start = at("startAt")?.ok_or_else(|| bad(format!("{what} needs startAt")))?;
    if let Some(end) = at("endAt")?
        && end < start
    {
        return Err(bad(format!("{what}.endAt is before its startAt")));
    }
    Ok(())
}

impl CompiledRegistration {
    /// Validates a stored record and compiles it. With `check_expiry`, an
    /// `expiresAt` in the past (before `now`) is refused.
    pub fn compile(record: RegistrationRecord, now: i64, check_expiry: bool) -> NgsiResult<Self> {
        let ctx = Context::with_user_contexts(&record.context_objects)?;
        let b = &record.body;
        for key in b.keys() {
            if !WRITABLE.contains(&key.as_str()) {
                // Other members are the registration's own properties
                // (clause 5.2.9: "CSourcePropertyName"), kept as given.
                check_name("registration property", key)?;
            }
        }
        if b.get("type").and_then(Value::as_str) != Some("ContextSourceRegistration") {
            return Err(bad(
                "a registration needs \"type\": \"ContextSourceRegistration\"",
            ));
        }
        for key in ["registrationName", "description", "tenant", "refreshRate"] {
            if b.get(key).is_some_and(|v| !v.is_string()) {
                return Err(bad(format!("{key} must be a string")));
            }
        }
        if let Some(rate) = b.get("refreshRate").and_then(Value::as_str) {
            crate::temporal::Period::parse(rate)
                .map_err(|e| bad(format!("refreshRate: {}", e.detail)))?;
        }
        let tenant = b.get("tenant").and_then(Value::as_str).map(str::to_string);
        let endpoint = match b.get("endpoint") {
            Some(Value::String(e)) => e.clone(),
            Some(_) => return Err(bad("endpoint must be a URI string")),
            None => return Err(bad("a registration needs an endpoint")),
        };
        check_uri("endpoint", &endpoint)?;
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(bad(format!(
                "endpoint '{}' must be an http or https URL",
                crate::validate::truncate(&endpoint)
            )));
        }
        let information = information(b.get("information"), &ctx)?;
        let mode = match b.get("mode") {
            None => Mode::Inclusive,
            Some(Value::String(m)) => match m.as_str() {
                "inclusive" => Mode::Inclusive,
                "exclusive" => Mode::Exclusive,
                "redirect" => Mode::Redirect,
                "auxiliary" => Mode::Auxiliary,
                other => {
                    return Err(bad(format!(
                        "mode '{}' is not one of inclusive, exclusive, redirect, auxiliary",
                        crate::validate::truncate(other)
                    )));
                }
            },
            Some(_) => return Err(bad("mode must be a string")),
        };
        let operations = operations(b.get("operations"))?;
        if mode == Mode::Auxiliary
            && let Some(op) = operations.iter().find(|op| is_write(op))
        {
            return Err(bad(format!(
                "an auxiliary registration serves reads only; operation '{op}' changes data"
            )));
        }
        if mode == Mode::Exclusive {
            for (i, info) in information.iter().enumerate() {
                if info.all_attributes() {
                    return Err(bad(format!(
                        "information[{i}]: an exclusive registration must name its propertyNames or relationshipNames"
                    )));
                }
                if info.entities.is_empty() || info.entities.iter().any(|e| e.id.is_none()) {
                    return Err(bad(format!(
                        "information[{i}]: an exclusive registration must name each entity by id"
                    )));
                }
            }
        }
        let expires_at = match b.get("expiresAt") {
            None => None,
            Some(Value::String(s)) => {
                Some(parse_datetime(s).ok_or_else(|| bad("expiresAt must be a date-time"))?)
            }
            Some(_) => return Err(bad("expiresAt must be a date-time")),
        };
        if check_expiry && expires_at.is_some_and(|t| t <= now) {
            return Err(bad("expiresAt is in the past"));
        }
        let (mut timeout_ms, mut cooldown_ms, mut local_only) = (None, None, false);
        if let Some(m) = b.get("management") {
            let m = m
                .as_object()
                .ok_or_else(|| bad("management must be an object"))?;
            for (key, value) in m {
                match key.as_str() {
                    "timeout" => timeout_ms = milliseconds(Some(value), "management.timeout")?,
                    "cooldown" => cooldown_ms = milliseconds(Some(value), "management.cooldown")?,
                    "localOnly" => {
                        local_only = value
                            .as_bool()
                            .ok_or_else(|| bad("management.localOnly must be true or false"))?;
                    }
                    "cacheDuration" => {
                        let d = value
                            .as_str()
                            .ok_or_else(|| bad("management.cacheDuration must be a duration"))?;
                        crate::temporal::Period::parse(d)
                            .map_err(|e| bad(format!("management.cacheDuration: {}", e.detail)))?;
                    }
                    other => {
                        return Err(bad(format!("management: unknown member '{other}'")));
                    }
                }
            }
        }
        time_interval(b.get("observationInterval"), "observationInterval")?;
        time_interval(b.get("managementInterval"), "managementInterval")?;
        for key in ["location", "observationSpace", "operationSpace"] {
            if let Some(g) = b.get(key) {
                crate::geojson::validate_geometry(g)
                    .map_err(|e| bad(format!("{key}: {}", e.detail)))?;
            }
        }
        if let Some(scope) = b.get("scope") {
            let ok = match scope {
                Value::String(s) => s.starts_with('/'),
                Value::Array(a) => a
                    .iter()
                    .all(|s| s.as_str().is_some_and(|s| s.starts_with('/'))),
                _ => false,
            };
            if !ok {
                return Err(bad("scope must be a scope (/a/b) or an array of them"));
            }
        }
        // Some FIWARE IoT Agents send one pair as a bare object.
        let info = match b.get("contextSourceInfo") {
            Some(Value::Object(pair)) => Some(Value::Array(vec![Value::Object(pair.clone())])),
            other => other.cloned(),
        };
        let context_source_info =
            crate::subscription::key_values(info.as_ref(), "contextSourceInfo")?;
        for (k, v) in &context_source_info {
            match k.as_str() {
                "jsonldContext" => check_uri("contextSourceInfo jsonldContext", v)?,
                "accept" | "contentType"
                    if !matches!(v.as_str(), "application/json" | "application/ld+json") =>
                {
                    return Err(bad(format!(
                        "contextSourceInfo {k} must be application/json or application/ld+json"
                    )));
                }
                _ => {}
            }
        }
        Ok(Self {
            ctx,
            information,
            endpoint,
            mode,
            operations,
            tenant,
            expires_at,
            timeout_ms,
            cooldown_ms,
            local_only,
            context_source_info,
            record,
        })
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    pub fn allows(&self, operation: &str) -> bool {
        self.operations.contains(&operation)
    }

    /// A registration with an observation or management interval serves
    /// temporal operations only (clause 5.12): the latest state of its
    /// entities is registered separately.
    pub fn is_temporal_only(&self) -> bool {
        self.record.body.contains_key("observationInterval")
            || self.record.body.contains_key("managementInterval")
    }

    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// The attributes this registration supplies of one entity (types when
    /// known), among `wanted` (`None`: all); `None` when it covers none.
    pub fn supplies(
        &self,
        id: &str,
        types: Option<&[String]>,
        wanted: Option<&[String]>,
    ) -> Option<Supplied> {
        self.supplied_where(wanted, |info| {
            info.entities.is_empty() || info.entities.iter().any(|e| e.covers(id, types))
        })
    }

    /// The attributes this registration may supply to a query for `types`
    /// (`None`: any type) and `ids` (empty: any), among `wanted`.
    pub fn supplies_query(
        &self,
        types: Option<&TypeExpr>,
        ids: &[String],
        wanted: Option<&[String]>,
    ) -> Option<Supplied> {
        self.supplied_where(wanted, |info| {
            info.entities.is_empty()
                || info.entities.iter().any(|e| {
                    types.is_none_or(|t| e.meets(t))
                        && (ids.is_empty()
                            || ids.iter().any(|id| {
                                e.id.as_deref().is_none_or(|i| i == id)
                                    && e.id_pattern.as_ref().is_none_or(|r| r.is_match(id))
                            }))
                })
        })
    }

    /// The attributes of the members of `information` that `covers` accepts.
    fn supplied_where(
        &self,
        wanted: Option<&[String]>,
        covers: impl Fn(&RegistrationInfo) -> bool,
    ) -> Option<Supplied> {
        let mut names: Vec<String> = Vec::new();
        let mut all = false;
        for info in self.information.iter().filter(|i| covers(i)) {
            if info.all_attributes() {
                all = true;
            } else {
                names.extend(info.names().cloned());
            }
        }
        supplied(all, names, wanted)
    }

    /// Whether any member of `information` names one of `types` (expanded)
    /// or `attrs`, for the registration list filters; empty lists match all.
    pub fn concerns(
        &self,
        ids: &[String],
        types: Option<&TypeExpr>,
        id_pattern: Option<&Regex>,
        attrs: &[String],
    ) -> bool {
        self.information.iter().any(|info| {
            let entity_ok = (ids.is_empty() && types.is_none() && id_pattern.is_none())
                || info.entities.iter().any(|e| {
                    types.is_none_or(|t| e.meets(t))
                        && (ids.is_empty()
                            || ids.iter().any(|id| {
                                e.id.as_deref() == Some(id.as_str())
                                    || e.id_pattern.as_ref().is_some_and(|r| r.is_match(id))
                            }))
                        && id_pattern.is_none_or(|p| {
                            e.id.as_deref().is_some_and(|i| p.is_match(i))
                                || e.id_pattern
                                    .as_ref()
                                    .is_some_and(|r| r.as_str() == p.as_str())
                        })
                });
            let attrs_ok = attrs.is_empty()
                || info.all_attributes()
                || attrs.iter().any(|a| info.covers_attribute(a));
            entity_ok && attrs_ok
        })
    }

    /// The registration as an entity of its own members, for `q`, `csf` and
    /// geo-queries over registrations: each member is a Property (the
    /// spatial ones GeoProperties). Members that are not valid values are left out.
    pub fn as_entity(&self) -> Entity {
        let mut body = Map::new();
        body.insert("id".into(), Value::String(self.record.id.clone()));
        body.insert(
            "type".into(),
            Value::String("ContextSourceRegistration".into()),
        );
        for (key, value) in &self.record.body {
            if matches!(key.as_str(), "id" | "type" | "@context" | "information") || value.is_null()
            {
                continue;
            }
            let kind = if matches!(
                key.as_str(),
                "location" | "observationSpace" | "operationSpace"
            ) {
                "GeoProperty"
            } else {
                "Property"
            };
            body.insert(
                key.clone(),
                serde_json::json!({"type": kind, "value": value}),
            );
        }
        let parsed = crate::entity::parse_entity(&Value::Object(body.clone()), &self.ctx, 0)
            .or_else(|_| {
                // One member the entity model refuses must not hide the others.
                body.retain(|k, v| {
                    k == "id"
                        || k == "type"
                        || crate::entity::parse_entity(
                            &serde_json::json!({"id": self.record.id, "type": "ContextSourceRegistration", k.clone(): v}),
                            &self.ctx,
                            0,
                        )
                        .is_ok()
                });
                crate::entity::parse_entity(&Value::Object(body), &self.ctx, 0)
            });
        let mut entity = parsed.unwrap_or_else(|_| Entity {
            id: self.record.id.clone(),
            types: vec!["ContextSourceRegistration".into()],
            scopes: Vec::new(),
            attrs: IndexMap::new(),
            created_at: 0,
            modified_at: 0,
        });
        entity.created_at = self.record.created_at;
        entity.modified_at = self.record.modified_at;
        entity
    }

    /// Whether another exclusive registration of the same tenant claims an
    /// attribute of an entity this one claims exclusively.
    pub fn conflicts_with(&self, other: &CompiledRegistration) -> Option<(String, String)> {
        if self.mode != Mode::Exclusive || other.mode != Mode::Exclusive {
            return None;
        }
        for a in &self.information {
            for b in &other.information {
                for ea in &a.entities {
                    let Some(id) = &ea.id else { continue };
                    if !b.entities.iter().any(|eb| eb.covers(id, Some(&ea.types))) {
                        continue;
                    }
                    if let Some(name) = a.names().find(|n| b.covers_attribute(n)) {
                        return Some((id.clone(), name.clone()));
                    }
                }
            }
        }
        None
    }
}

fn supplied(all: bool, mut names: Vec<String>, wanted: Option<&[String]>) -> Option<Supplied> {
    names.sort();
    names.dedup();
    let out = match (all, wanted) {
        (true, None) => Supplied::All,
        (true, Some(w)) => Supplied::Only(w.to_vec()),
        (false, None) => Supplied::Only(names),
        (false, Some(w)) => Supplied::Only(names.into_iter().filter(|n| w.contains(n)).collect()),
    };
    match &out {
        Supplied::Only(n) if n.is_empty() => None,
        _ => Some(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(body: Value) -> RegistrationRecord {
        let Value::Object(body) = body else {
            panic!("an object")
        };
        RegistrationRecord {
            id: "urn:ngsi-ld:ContextSourceRegistration:1".into(),
            body,
            context: Value::Null,
            context_objects: Vec::new(),
            created_at: 0,
            modified_at: 0,
        }
    }

    fn compile(body: Value) -> NgsiResult<CompiledRegistration> {
        CompiledRegistration::compile(record(body), crate::validate::now_micros(), true)
    }

    const NS: &str = "https://uri.etsi.org/ngsi-ld/default-context/";

    #[test]
    fn a_minimal_registration_defaults_to_inclusive_federation() {
        let r = compile(json!({
            "type": "ContextSourceRegistration",
            "information": [{"entities": [{"type": "Streetlight"}]}],
            "endpoint": "http://agent:4041"
        }))
        .unwrap();
        assert_eq!(r.mode, Mode::Inclusive);
        assert!(r.allows("retrieveEntity") && r.allows("queryEntity"));
        assert!(!r.allows("updateAttrs"));
        let t = vec![format!("{NS}Streetlight")];
        assert_eq!(r.supplies("urn:a", Some(&t), None), Some(Supplied::All));
        assert_eq!(r.supplies("urn:a", Some(&["Other".into()]), None), None);
    }

    #[test]
    fn invalid_registrations_name_the_member() {
        let cases = [
            (
                json!({"type": "X", "information": [], "endpoint": "http://a"}),
                "ContextSourceRegistration",
            ),
            (
                json!({"type": "ContextSourceRegistration", "endpoint": "http://a"}),
                "information",
            ),
            (
                json!({"type": "ContextSourceRegistration", "information": [{}], "endpoint": "http://a"}),
                "information[0]",
            ),
            (
                json!({"type": "ContextSourceRegistration", "information": [{"entities": [{"id": "urn:a"}]}], "endpoint": "http://a"}),
                "needs a type",
            ),
            (
                json!({"type": "ContextSourceRegistration", "information": [{"propertyNames": ["a"]}]}),
                "endpoint",
            ),
            (
                json!({"type": "ContextSourceRegistration", "information": [{"propertyNames": ["a"]}], "endpoint": "ftp://x"}),
                "http",
            ),
            (
                json!({"type": "ContextSourceRegistration", "information": [{"propertyNames": ["a"]}], "endpoint": "http://a", "mode": "sometimes"}),
                "mode",
            ),
            (
                json!({"type": "ContextSourceRegistration", "information": [{"propertyNames": ["a"]}], "endpoint": "http://a", "operations": ["fly"]}),
                "operations",
            ),
            (
                json!({"type": "ContextSourceRegistration", "information": [{"propertyNames": ["a"]}], "endpoint": "http://a", "mode": "auxiliary", "operations": ["updateOps"]}),
                "auxiliary",
            ),
            (
                json!({"type": "ContextSourceRegistration", "information": [{"entities": [{"type": "T"}], "propertyNames": ["a"]}], "endpoint": "http://a", "mode": "exclusive"}),
                "by id",
            ),
            (
                json!({"type": "ContextSourceRegistration", "information": [{"propertyNames": ["a"]}], "endpoint": "http://a", "expiresAt": "2000-01-01T00:00:00Z"}),
                "past",
            ),
            (
                json!({"type": "ContextSourceRegistration", "information": [{"propertyNames": ["a"]}], "endpoint": "http://a", "management": {"timeout": -1}}),
                "management.timeout",
            ),
        ];
        for (body, word) in cases {
            let e = compile(body.clone())
                .err()
                .unwrap_or_else(|| panic!("accepted: {body}"));
            assert_eq!(e.status(), 400, "{body}");
            assert!(e.detail.contains(word), "{body}: {}", e.detail);
        }
    }

    #[test]
    fn exclusive_registrations_cover_their_attributes_only() {
        let r = compile(json!({
            "type": "ContextSourceRegistration",
            "information": [{"entities": [{"id": "urn:light:1", "type": "Streetlight"}], "propertyNames": ["switch"]}],
            "endpoint": "http://agent:4041",
            "mode": "exclusive",
            "operations": ["updateOps", "retrieveOps"]
        }))
        .unwrap();
        let switch = format!("{NS}switch");
        assert_eq!(
            r.supplies("urn:light:1", None, None),
            Some(Supplied::Only(vec![switch.clone()]))
        );
        assert_eq!(r.supplies("urn:light:2", None, None), None);
        assert_eq!(
            r.supplies("urn:light:1", None, Some(&[format!("{NS}power")])),
            None
        );
        assert!(r.allows("updateAttrs") && r.allows("retrieveEntity"));
        let other = compile(json!({
            "type": "ContextSourceRegistration",
            "information": [{"entities": [{"id": "urn:light:1", "type": "Streetlight"}], "propertyNames": ["switch", "dim"]}],
            "endpoint": "http://other:4041",
            "mode": "exclusive"
        }))
        .unwrap();
        assert_eq!(
            r.conflicts_with(&other),
            Some(("urn:light:1".to_string(), switch))
        );
    }

    #[test]
    fn query_matching_follows_types_ids_and_attributes() {
        let r = compile(json!({
            "type": "ContextSourceRegistration",
            "information": [{"entities": [{"type": "Vehicle"}, {"idPattern": "urn:bus:.*", "type": "Bus"}], "propertyNames": ["speed"]}],
            "endpoint": "http://transport"
        }))
        .unwrap();
        let ctx = Context::core();
        let vehicle = crate::query::parse_type_expr("Vehicle", &ctx).unwrap();
        let tram = crate::query::parse_type_expr("Tram", &ctx).unwrap();
        assert!(r.supplies_query(Some(&vehicle), &[], None).is_some());
        assert!(r.supplies_query(Some(&tram), &[], None).is_none());
        assert!(
            r.supplies_query(None, &["urn:bus:7".into()], None)
                .is_some()
        );
        assert!(r.concerns(&[], Some(&vehicle), None, &[format!("{NS}speed")]));
        assert!(!r.concerns(&[], Some(&vehicle), None, &[format!("{NS}colour")]));
        assert!(r.concerns(&["urn:bus:7".into()], None, None, &[]));
    }
}
