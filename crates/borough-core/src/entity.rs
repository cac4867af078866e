//! The NGSI-LD entity model as Borough stores it (names and types expanded to
//! IRIs, times in microseconds), the parser from request bodies and the
//! renderer to the normalized, concise, keyValues and GeoJSON representations.

use crate::context::{Context, NGSI_LD_NS};
use crate::error::{NgsiError, NgsiResult};
use crate::geojson::{looks_like_geometry, validate_geometry};
use crate::validate::{check_name, check_uri, parse_datetime};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The attribute types of NGSI-LD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AttrKind {
    Property,
    Relationship,
    GeoProperty,
    LanguageProperty,
    VocabProperty,
    JsonProperty,
    ListProperty,
    ListRelationship,
}

impl AttrKind {
    pub const ALL: [AttrKind; 8] = [
        Self::Property,
        Self::Relationship,
        Self::GeoProperty,
        Self::LanguageProperty,
        Self::VocabProperty,
        Self::JsonProperty,
        Self::ListProperty,
        Self::ListRelationship,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Property => "Property",
            Self::Relationship => "Relationship",
            Self::GeoProperty => "GeoProperty",
            Self::LanguageProperty => "LanguageProperty",
            Self::VocabProperty => "VocabProperty",
            Self::JsonProperty => "JsonProperty",
            Self::ListProperty => "ListProperty",
            Self::ListRelationship => "ListRelationship",
        }
    }

    /// The member that carries the attribute's value in the normalized form.
    pub fn value_key(self) -> &'static str {
        match self {
            Self::Property | Self::GeoProperty => "value",
            Self::Relationship => "object",
            Self::LanguageProperty => "languageMap",
            Self::VocabProperty => "vocab",
            Self::JsonProperty => "json",
            Self::ListProperty => "valueList",
            Self::ListRelationship => "objectList",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// The NGSI-LD Null (clause 4.5.0): in an update, merge or partial update it
/// deletes the attribute (or the instance with the given datasetId).
pub const NGSI_LD_NULL: &str = "urn:ngsi-ld:null";

/// Whether a value member is NGSI-LD Null, in the plain form or the typed
/// forms of v1.8 (`{"@none": null-IRI}` for languageMap, `[null-IRI]` for
/// lists, `{"object": null-IRI}` items for objectList).
pub fn is_ngsi_null(member: &str, raw: &Value) -> bool {
    let is_null_iri = |v: &Value| v.as_str() == Some(NGSI_LD_NULL);
    match member {
        "languageMap" => {
            is_null_iri(raw)
                || raw
                    .as_object()
                    .is_some_and(|m| m.len() == 1 && m.get("@none").is_some_and(is_null_iri))
        }
        "valueList" | "objectList" => {
            is_null_iri(raw)
                || raw.as_array().is_some_and(|a| {
                    a.len() == 1
                        && (is_null_iri(&a[0])
                            || a[0]
                                .as_object()
                                .is_some_and(|o| o.get("object").is_some_and(is_null_iri)))
                })
        }
        "json" => {
            is_null_iri(raw)
                || raw.as_object().is_some_and(|o| {
                    o.get("@type").and_then(Value::as_str) == Some("@json")
                        && o.get("@value").is_some_and(is_null_iri)
                })
        }
        _ => is_null_iri(raw),
    }
}

/// Members of an attribute object that are not sub-attributes.
pub const VALUE_KEYS: [&str; 7] = [
    "value",
    "object",
    "languageMap",
    "vocab",
    "json",
    "valueList",
    "objectList",
];
/// Output-only members that a client may echo back; they are ignored on input.
const SYSTEM_KEYS: [&str; 8] = [
    "createdAt",
    "modifiedAt",
    "deletedAt",
    "instanceId",
    "previousValue",
    "previousObject",
    "previousLanguageMap",
    "lang",
];

/// Sub-attributes by expanded name, in insertion order. Most attributes have
/// none: the map is allocated only when one is added, so an attribute without
/// them holds one pointer instead of an empty map (72 bytes, for every one of
/// a city's millions of attribute instances).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SubAttrs(Option<Box<IndexMap<String, Attribute>>>);

/// The sub-attributes of an attribute, in order.
pub struct SubIter<'a>(Option<indexmap::map::Iter<'a, String, Attribute>>);

impl<'a> Iterator for SubIter<'a> {
    type Item = (&'a String, &'a Attribute);
    fn next(&mut self) -> Option<Self::Item> {
        self.0.as_mut()?.next()
    }
}

impl SubAttrs {
    pub fn get(&self, name: &str) -> Option<&Attribute> {
        self.0.as_ref()?.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Attribute> {
        self.0.as_mut()?.get_mut(name)
    }

    pub fn insert(&mut self, name: String, attr: Attribute) -> Option<Attribute> {
        self.0
            .get_or_insert_with(Default::default)
            .insert(name, attr)
    }

    /// Removes a sub-attribute, keeping the order of the others.
    pub fn shift_remove(&mut self, name: &str) -> Option<Attribute> {
        let map = self.0.as_mut()?;
        let removed = map.shift_remove(name);
        if map.is_empty() {
            self.0 = None;
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> SubIter<'_> {
        SubIter(self.0.as_ref().map(|m| m.iter()))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Attribute> {
        self.0.iter_mut().flat_map(|m| m.values_mut())
    }

    fn shrink_to_fit(&mut self) {
        if let Some(m) = &mut self.0 {
            m.shrink_to_fit();
        }
    }
}

impl<'a> IntoIterator for &'a SubAttrs {
    type Item = (&'a String, &'a Attribute);
    type IntoIter = SubIter<'a>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl std::ops::Index<&str> for SubAttrs {
    type Output = Attribute;
    fn index(&self, name: &str) -> &Attribute {
        match self.get(name) {
            Some(a) => a,
            None => panic!("no sub-attribute '{name}'"),
        }
    }
}

impl FromIterator<(String, Attribute)> for SubAttrs {
    fn from_iter<I: IntoIterator<Item = (String, Attribute)>>(iter: I) -> Self {
        let map: IndexMap<String, Attribute> = iter.into_iter().collect();
        Self((!map.is_empty()).then(|| Box::new(map)))
    }
}

impl Serialize for SubAttrs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for SubAttrs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = IndexMap::<String, Attribute>::deserialize(d)?;
        Ok(Self((!map.is_empty()).then(|| Box::new(map))))
    }
}

/// One attribute instance, stored expanded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attribute {
    #[serde(rename = "k")]
    pub kind: AttrKind,
    /// The value member (`value`, `object`, `languageMap`, ... by kind);
    /// vocab values are stored expanded.
    #[serde(rename = "v")]
    pub value: Value,
    #[serde(rename = "d", default, skip_serializing_if = "Option::is_none")]
    pub dataset_id: Option<String>,
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<i64>,
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub unit_code: Option<String>,
    /// Boxed: few attributes have one, and an inline `Value` is 72 bytes.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub object_type: Option<Box<Value>>,
    /// Sub-attributes by expanded name.
    #[serde(rename = "s", default, skip_serializing_if = "SubAttrs::is_empty")]
    pub sub: SubAttrs,
    #[serde(rename = "c")]
    pub created_at: i64,
    #[serde(rename = "m")]
    pub modified_at: i64,
}

/// An entity, stored expanded. Attributes keep their insertion order; each
/// name holds one or more instances told apart by `datasetId`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    pub id: String,
    pub types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    pub attrs: IndexMap<String, Vec<Attribute>>,
    pub created_at: i64,
    pub modified_at: i64,
}

impl AsRef<Entity> for Entity {
    fn as_ref(&self) -> &Entity {
        self
    }
}

impl Entity {
    /// Releases spare capacity: vectors and maps grown while parsing or
    /// deserializing keep room for more elements (a one-element `Vec` of
    /// attributes reserves four), which for an in-memory store of millions of
    /// entities is most of its memory.
    pub fn shrink_to_fit(&mut self) {
        self.types.shrink_to_fit();
        self.scopes.shrink_to_fit();
        self.attrs.shrink_to_fit();
        for list in self.attrs.values_mut() {
            list.shrink_to_fit();
            for a in list {
                a.shrink_to_fit();
            }
        }
    }
}

impl Attribute {
    fn shrink_to_fit(&mut self) {
        shrink_value(&mut self.value);
        self.sub.shrink_to_fit();
        for s in self.sub.values_mut() {
            s.shrink_to_fit();
        }
    }
}

fn shrink_value(v: &mut Value) {
    match v {
        Value::Array(a) => {
            a.shrink_to_fit();
            a.iter_mut().for_each(shrink_value);
        }
        Value::Object(m) => {
            m.values_mut().for_each(shrink_value);
        }
        _ => {}
    }
}

/// An attribute as a request gives it: for a create every part is present; for
/// a merge or partial update only the parts that change. `Some(None)` means
/// "remove this member" (a JSON `null`).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct AttrPatch {
    pub kind: Option<AttrKind>,
    /// `Some(Value::Null)` removes the instance in a merge.
    pub value: Option<Value>,
    pub dataset_id: Option<String>,
    pub observed_at: Option<Option<i64>>,
    pub unit_code: Option<Option<String>>,
    pub object_type: Option<Option<Value>>,
    /// `None` removes the sub-attribute in a merge.
    pub sub: IndexMap<String, Option<AttrPatch>>,
}

/// A parsed request body: a whole entity, or the fragment of one that a merge,
/// append or update carries.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Fragment {
    pub id: Option<String>,
    pub types: Vec<String>,
    pub scopes: Option<Vec<String>>,
    /// Expanded name → instances; `None` (a JSON `null`) removes the attribute.
    pub attrs: IndexMap<String, Option<Vec<AttrPatch>>>,
}

/// How strictly a body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseMode {
    /// A whole entity or whole attributes: every attribute needs its value; no nulls.
    Full,
    /// A merge-patch or partial update: values may be missing, `null` removes.
    Patch,
}

impl AttrPatch {
    /// Whether this patch deletes its attribute instance (NGSI-LD Null, or a
    /// JSON `null` value in a merge).
    pub fn deletes(&self) -> bool {
        self.value.as_ref().is_some_and(Value::is_null)
    }

    /// Builds a full attribute from a patch that carries every part.
    pub fn into_attribute(self, name: &str, now: i64) -> NgsiResult<Attribute> {
        if self.deletes() {
            return Err(NgsiError::bad_data(format!(
                "attribute '{}' is NGSI-LD Null ({NGSI_LD_NULL}), which only deletes in an update or merge",
                short_name(name)
            )));
        }
        let kind = self.kind.ok_or_else(|| {
            NgsiError::bad_data(format!("attribute '{}' has no value", short_name(name)))
        })?;
        let value = match self.value {
            Some(v) if !v.is_null() => v,
            _ => {
                return Err(NgsiError::bad_data(format!(
                    "attribute '{}' has no '{}'",
                    short_name(name),
                    kind.value_key()
                )));
            }
        };
        let mut sub = SubAttrs::default();
        for (sub_name, patch) in self.sub {
            if let Some(p) = patch {
                let attr = p.into_attribute(&sub_name, now)?;
                sub.insert(sub_name, attr);
            }
        }
        Ok(Attribute {
            kind,
            value,
            dataset_id: self.dataset_id,
            observed_at: self.observed_at.flatten(),
            unit_code: self.unit_code.flatten(),
            object_type: self.object_type.flatten().map(Box::new),
            sub,
            created_at: now,
            modified_at: now,
        })
    }

    /// Applies this patch onto an existing attribute (merge semantics: given
    /// members replace, `null` members are removed, the rest is kept).
    pub fn merge_into(self, attr: &mut Attribute, name: &str, now: i64) -> NgsiResult<()> {
        if let Some(kind) = self.kind
            && kind != attr.kind
        {
            // A change of attribute type replaces the attribute's value member too.
            if self.value.is_none() {
                return Err(NgsiError::bad_data(format!(
                    "attribute '{}' changes type to {} without a '{}'",
                    short_name(name),
                    kind.name(),
                    kind.value_key()
                )));
            }
            attr.kind = kind;
        }
        if let Some(v) = self.value
            && !v.is_null()
        {
            attr.value = v;
        }
        if let Some(o) = self.observed_at {
            attr.observed_at = o;
        }
        if let Some(u) = self.unit_code {
            attr.unit_code = u;
        }
        if let Some(t) = self.object_type {
            attr.object_type = t.map(Box::new);
        }
        for (sub_name, patch) in self.sub {
            match patch {
                None => {
                    attr.sub.shift_remove(&sub_name);
                }
                Some(p) if p.deletes() => {
                    attr.sub.shift_remove(&sub_name);
                }
                Some(p) => match attr.sub.get_mut(&sub_name) {
                    Some(existing) => p.merge_into(existing, &sub_name, now)?,
                    None => {
                        let a = p.into_attribute(&sub_name, now)?;
                        attr.sub.insert(sub_name, a);
                    }
                },
            }
        }
        attr.modified_at = now;
        Ok(())
    }
}

/// The name as users wrote it when it lies in the default vocabulary, for messages.
pub fn short_name(iri: &str) -> &str {
    iri.strip_prefix(crate::context::DEFAULT_VOCAB)
        .unwrap_or(iri)
}

/// Parses an entity (or entity fragment) body. `@context` must already have been
/// taken out of the body by the caller and turned into `ctx`.
pub fn parse_fragment(body: &Value, ctx: &Context, mode: ParseMode) -> NgsiResult<Fragment> {
    let obj = body
        .as_object()
        .ok_or_else(|| NgsiError::bad_data("an entity must be a JSON object"))?;
    let mut frag = Fragment::default();
    for (key, v) in obj {
        match key.as_str() {
            "id" | "@id" => {
                let id = v
                    .as_str()
                    .ok_or_else(|| NgsiError::bad_data("entity 'id' must be a string"))?;
                check_uri("entity id", id)?;
                frag.id = Some(id.to_string());
            }
            "type" | "@type" => frag.types = parse_types(v, ctx)?,
            // NGSI-LD Null (or a JSON null in a merge-patch) removes the scopes.
            "scope" if v.as_str() == Some(NGSI_LD_NULL) => frag.scopes = Some(Vec::new()),
            "scope" if v.is_null() && mode == ParseMode::Patch => frag.scopes = Some(Vec::new()),
            "scope" => frag.scopes = Some(parse_scopes(v)?),
            "@context" | "createdAt" | "modifiedAt" | "deletedAt" => {}
            name => {
                check_name("attribute name", name)?;
                let iri = ctx.expand(name).into_owned();
                let instances = parse_attribute_instances(name, v, ctx, mode)?;
                if frag.attrs.insert(iri, instances).is_some() {
                    return Err(NgsiError::bad_data(format!(
                        "attribute '{name}' is given twice (under two names for one IRI)"
                    )));
                }
            }
        }
    }
    Ok(frag)
}

/// Parses a whole entity for creation: `id` and `type` are required.
pub fn parse_entity(body: &Value, ctx: &Context, now: i64) -> NgsiResult<Entity> {
    let frag = parse_fragment(body, ctx, ParseMode::Full)?;
    fragment_into_entity(frag, now)
}

/// Turns a full fragment into an entity, stamping creation times.
pub fn fragment_into_entity(frag: Fragment, now: i64) -> NgsiResult<Entity> {
    let id = frag
        .id
        .ok_or_else(|| NgsiError::bad_data("an entity needs an 'id'"))?;
    if frag.types.is_empty() {
        return Err(NgsiError::bad_data("an entity needs a 'type'"));
    }
    let mut attrs = IndexMap::with_capacity(frag.attrs.len());
    for (name, instances) in frag.attrs {
        let Some(instances) = instances else {
            return Err(NgsiError::bad_data(format!(
                "attribute '{}' is null",
                short_name(&name)
            )));
        };
        let list = instances
            .into_iter()
            .map(|p| p.into_attribute(&name, now))
            .collect::<NgsiResult<Vec<_>>>()?;
        attrs.insert(name, list);
    }
    Ok(Entity {
        id,
        types: frag.types,
        scopes: frag.scopes.unwrap_or_default(),
        attrs,
        created_at: now,
        modified_at: now,
    })
}

fn parse_types(v: &Value, ctx: &Context) -> NgsiResult<Vec<String>> {
    let names: Vec<&str> = match v {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) if !a.is_empty() => a
            .iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| NgsiError::bad_data("entity 'type' must hold strings"))
            })
            .collect::<NgsiResult<_>>()?,
        _ => {
            return Err(NgsiError::bad_data(
                "entity 'type' must be a string or a non-empty array of strings",
            ));
        }
    };
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        check_name("entity type", n)?;
        if matches!(n, "id" | "type") {
            return Err(NgsiError::bad_data(format!(
                "entity type '{n}' is a keyword alias of the core context (@{n}), not a type name"
            )));
        }
        let iri = ctx.expand(n).into_owned();
        if !out.contains(&iri) {
            out.push(iri);
        }
    }
    Ok(out)
}

fn parse_scopes(v: &Value) -> NgsiResult<Vec<String>> {
    let list: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    list.into_iter()
        .map(|s| {
            let s = s.as_str().ok_or_else(|| {
                NgsiError::bad_data("'scope' must be a string or an array of strings")
            })?;
            let valid = s.starts_with('/')
                && s[1..].split('/').all(|seg| {
                    !seg.is_empty()
                        && seg
                            .chars()
                            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
                });
            if valid {
                Ok(s.to_string())
            } else {
                Err(NgsiError::bad_data(format!(
                    "scope '{}' must look like /a/b/c",
                    crate::validate::truncate(s)
                )))
            }
        })
        .collect()
}

fn parse_attribute_instances(
    name: &str,
    v: &Value,
    ctx: &Context,
    mode: ParseMode,
) -> NgsiResult<Option<Vec<AttrPatch>>> {
    if v.is_null() {
        return match mode {
            ParseMode::Patch => Ok(None),
            ParseMode::Full => Err(NgsiError::bad_data(format!("attribute '{name}' is null"))),
        };
    }
    if let Value::Array(items) = v
        && !items.is_empty()
        && items.iter().all(is_attribute_object)
    {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let p = parse_attribute(name, item, ctx, mode, 0)?;
            if out.iter().any(|o: &AttrPatch| o.dataset_id == p.dataset_id) {
                return Err(NgsiError::bad_data(format!(
                    "attribute '{name}' has two instances with the same datasetId"
                )));
            }
            out.push(p);
        }
        return Ok(Some(out));
    }
    Ok(Some(vec![parse_attribute(name, v, ctx, mode, 0)?]))
}

/// An object that reads as an attribute (normalized or concise), as opposed to
/// a plain JSON value.
fn is_attribute_object(v: &Value) -> bool {
    v.as_object().is_some_and(|o| {
        o.contains_key("type") && !looks_like_geometry(v)
            || VALUE_KEYS.iter().any(|k| o.contains_key(*k))
    })
}

const MAX_SUB_ATTRIBUTE_DEPTH: usize = 8;

/// Parses one attribute instance, normalized or concise.
pub fn parse_attribute(
    name: &str,
    v: &Value,
    ctx: &Context,
    mode: ParseMode,
    depth: usize,
) -> NgsiResult<AttrPatch> {
    if depth > MAX_SUB_ATTRIBUTE_DEPTH {
        return Err(NgsiError::bad_data(format!(
            "sub-attributes are nested deeper than {MAX_SUB_ATTRIBUTE_DEPTH} levels"
        )));
    }
    let obj = match v {
        Value::Object(o)
            if is_attribute_object(v) || mode == ParseMode::Patch && !looks_like_geometry(v) =>
        {
            o
        }
        Value::Object(_) if looks_like_geometry(v) => {
            // Concise GeoProperty: the geometry itself.
            validate_geometry(v)?;
            return Ok(AttrPatch {
                kind: Some(AttrKind::GeoProperty),
                value: Some(v.clone()),
                ..Default::default()
            });
        }
        Value::Object(_) => {
            return Err(NgsiError::bad_data(format!(
                "attribute '{name}' has no type and no value member (value, object, languageMap, vocab, json, valueList or objectList)"
            )));
        }
        Value::Null => {
            return Err(NgsiError::bad_data(format!("attribute '{name}' is null")));
        }
        // Concise NGSI-LD Null: delete the attribute in an update.
        Value::String(s) if s == NGSI_LD_NULL => {
            return Ok(AttrPatch {
                value: Some(Value::Null),
                ..Default::default()
            });
        }
        // Concise Property: the value itself.
        other => {
            return Ok(AttrPatch {
                kind: Some(AttrKind::Property),
                value: Some(other.clone()),
                ..Default::default()
            });
        }
    };

    let explicit = match obj.get("type") {
        None => None,
        Some(Value::String(t)) => {
            let iri = ctx.expand(t);
            let kind = iri
                .strip_prefix(NGSI_LD_NS)
                .and_then(AttrKind::from_name)
                .ok_or_else(|| {
                    NgsiError::bad_data(format!(
                        "attribute '{name}' has unknown type '{}'",
                        crate::validate::truncate(t)
                    ))
                })?;
            Some(kind)
        }
        Some(_) => {
            return Err(NgsiError::bad_data(format!(
                "the type of attribute '{name}' must be a string"
            )));
        }
    };
    let present: Vec<&str> = VALUE_KEYS
        .iter()
        .copied()
        .filter(|k| obj.contains_key(*k))
        .collect();
    if present.len() > 1 {
        return Err(NgsiError::bad_data(format!(
            "attribute '{name}' has more than one value member: {}",
            present.join(", ")
        )));
    }
    let kind = match (explicit, present.first()) {
        (Some(k), Some(member)) => {
            if k.value_key() != *member {
                return Err(NgsiError::bad_data(format!(
                    "attribute '{name}' is a {} and needs '{}', not '{member}'",
                    k.name(),
                    k.value_key()
                )));
            }
            Some(k)
        }
        (Some(k), None) => Some(k),
        (None, Some(member)) => Some(infer_kind(member, &obj[*member])),
        (None, None) => None,
    };

    let mut patch = AttrPatch {
        kind,
        ..Default::default()
    };
    if let (Some(kind), Some(member)) = (kind, present.first()) {
        let raw = &obj[*member];
        if is_ngsi_null(member, raw) {
            patch.value = Some(Value::Null);
        } else if raw.is_null() {
            if mode == ParseMode::Full {
                return Err(NgsiError::bad_data(format!(
                    "attribute '{name}' has a null '{member}'"
                )));
            }
            patch.value = Some(Value::Null);
        } else {
            patch.value = Some(normalize_value(name, kind, raw, ctx)?);
        }
    }
    if mode == ParseMode::Full && patch.value.is_none() && !patch.deletes() {
        return Err(NgsiError::bad_data(format!(
            "attribute '{name}' has no value member ({})",
            kind.map(AttrKind::value_key)
                .unwrap_or("value, object, ...")
        )));
    }

    for (key, member) in obj {
        match key.as_str() {
            "type" | "@context" => {}
            k if VALUE_KEYS.contains(&k) || SYSTEM_KEYS.contains(&k) => {}
            "datasetId" => {
                let id = member.as_str().ok_or_else(|| {
                    NgsiError::bad_data(format!("datasetId of '{name}' must be a string"))
                })?;
                check_uri("datasetId", id)?;
                patch.dataset_id = Some(id.to_string());
            }
            "observedAt" => {
                patch.observed_at = Some(match member {
                    Value::Null if mode == ParseMode::Patch => None,
                    Value::String(s) => Some(parse_datetime(s).ok_or_else(|| {
                        NgsiError::bad_data(format!(
                            "observedAt of '{name}' is not an ISO 8601 date-time: '{}'",
                            crate::validate::truncate(s)
                        ))
                    })?),
                    _ => {
                        return Err(NgsiError::bad_data(format!(
                            "observedAt of '{name}' must be a date-time string"
                        )));
                    }
                });
            }
            "unitCode" => {
                patch.unit_code = Some(match member {
                    Value::Null if mode == ParseMode::Patch => None,
                    Value::String(s) if !s.is_empty() => Some(s.clone()),
                    _ => {
                        return Err(NgsiError::bad_data(format!(
                            "unitCode of '{name}' must be a non-empty string"
                        )));
                    }
                });
            }
            "objectType" => {
                patch.object_type = Some(match member {
                    Value::Null if mode == ParseMode::Patch => None,
                    other => Some(expand_vocab(name, "objectType", other, ctx)?),
                });
            }
            sub_name => {
                check_name("sub-attribute name", sub_name)?;
                let iri = ctx.expand(sub_name).into_owned();
                let sub = if member.is_null() && mode == ParseMode::Patch {
                    None
                } else {
                    Some(parse_attribute(sub_name, member, ctx, mode, depth + 1)?)
                };
                patch.sub.insert(iri, sub);
            }
        }
    }
    Ok(patch)
}

fn infer_kind(member: &str, value: &Value) -> AttrKind {
    match member {
        "object" => AttrKind::Relationship,
        "languageMap" => AttrKind::LanguageProperty,
        "vocab" => AttrKind::VocabProperty,
        "json" => AttrKind::JsonProperty,
        "valueList" => AttrKind::ListProperty,
        "objectList" => AttrKind::ListRelationship,
        _ if looks_like_geometry(value) => AttrKind::GeoProperty,
        _ => AttrKind::Property,
    }
}

/// Validates a value member for its kind and returns it as stored.
fn normalize_value(name: &str, kind: AttrKind, raw: &Value, ctx: &Context) -> NgsiResult<Value> {
    match kind {
        AttrKind::Property => Ok(raw.clone()),
        AttrKind::GeoProperty => {
            validate_geometry(raw)?;
            Ok(raw.clone())
        }
        AttrKind::Relationship => {
            match raw {
                Value::String(s) => check_uri("relationship object", s)?,
                Value::Array(a) if !a.is_empty() => {
                    for o in a {
                        let s = o.as_str().ok_or_else(|| {
                            NgsiError::bad_data(format!(
                                "objects of relationship '{name}' must be URIs"
                            ))
                        })?;
                        check_uri("relationship object", s)?;
                    }
                }
                _ => {
                    return Err(NgsiError::bad_data(format!(
                        "object of relationship '{name}' must be a URI or a non-empty array of URIs"
                    )));
                }
            }
            Ok(raw.clone())
        }
        AttrKind::LanguageProperty => {
            let map = raw.as_object().ok_or_else(|| {
                NgsiError::bad_data(format!("languageMap of '{name}' must be an object"))
            })?;
            for (lang, text) in map {
                let tag_ok = lang == "@none"
                    || (!lang.is_empty()
                        && lang.len() <= 35
                        && lang.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
                let text_ok = text.is_string()
                    || text
                        .as_array()
                        .is_some_and(|a| a.iter().all(Value::is_string));
                if !tag_ok || !text_ok {
                    return Err(NgsiError::bad_data(format!(
                        "languageMap of '{name}' must map language tags to strings"
                    )));
                }
            }
            Ok(raw.clone())
        }
        AttrKind::VocabProperty => expand_vocab(name, "vocab", raw, ctx),
        AttrKind::JsonProperty => Ok(raw.clone()),
        AttrKind::ListProperty => {
            if raw.is_array() {
                Ok(raw.clone())
            } else {
                Err(NgsiError::bad_data(format!(
                    "valueList of '{name}' must be an array"
                )))
            }
        }
        AttrKind::ListRelationship => {
            let items = raw.as_array().ok_or_else(|| {
                NgsiError::bad_data(format!("objectList of '{name}' must be an array"))
            })?;
            for item in items {
                let uri = match item {
                    Value::String(s) => Some(s.as_str()),
                    Value::Object(o) => o.get("object").and_then(Value::as_str),
                    _ => None,
                };
                let uri = uri.ok_or_else(|| {
                    NgsiError::bad_data(format!(
                        "objectList of '{name}' must hold URIs or {{\"object\": URI}} items"
                    ))
                })?;
                check_uri("relationship object", uri)?;
            }
            Ok(raw.clone())
        }
    }
}

fn expand_vocab(name: &str, member: &str, raw: &Value, ctx: &Context) -> NgsiResult<Value> {
    let one = |v: &Value| -> NgsiResult<Value> {
        let s = v.as_str().ok_or_else(|| {
            NgsiError::bad_data(format!("{member} of '{name}' must hold strings"))
        })?;
        check_name(member, s)?;
        Ok(Value::String(ctx.expand(s).into_owned()))
    };
    match raw {
        Value::Array(a) if !a.is_empty() => {
            Ok(Value::Array(a.iter().map(one).collect::<NgsiResult<_>>()?))
        }
        Value::String(_) => one(raw),
        _ => Err(NgsiError::bad_data(format!(
            "{member} of '{name}' must be a string or a non-empty array of strings"
        ))),
    }
}

pub use crate::render::{
    Format, RenderOptions, pick_language, render_attribute, render_entity, render_feature,
};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> std::sync::Arc<Context> {
        Context::core()
    }

    #[test]
    fn stored_form_keeps_sub_attributes_and_omits_what_is_absent() {
        let e = parse_entity(&sample(), &ctx(), 7).unwrap();
        let stored = serde_json::to_value(&e).unwrap();
        let speed = &stored["attrs"]["https://uri.etsi.org/ngsi-ld/default-context/speed"][0];
        let accuracy = &speed["s"]["https://uri.etsi.org/ngsi-ld/default-context/accuracy"];
        assert_eq!(accuracy["v"], json!(0.9));
        let owner = &stored["attrs"]["https://uri.etsi.org/ngsi-ld/default-context/owner"][0];
        assert!(
            owner.get("s").is_none() && owner.get("t").is_none(),
            "{owner}"
        );
        let back: Entity = serde_json::from_value(stored).unwrap();
        assert_eq!(back, e);
        let owner = &back.attrs["https://uri.etsi.org/ngsi-ld/default-context/owner"][0];
        assert!(owner.sub.is_empty());
        assert_eq!(owner.sub.iter().count(), 0);
    }

    fn sample() -> Value {
        json!({
            "id": "urn:ngsi-ld:Vehicle:A1",
            "type": "Vehicle",
            "speed": {"type": "Property", "value": 80, "unitCode": "KMH",
                      "observedAt": "2024-01-01T10:00:00.000Z",
                      "accuracy": {"type": "Property", "value": 0.9}},
            "owner": {"type": "Relationship", "object": "urn:ngsi-ld:Person:P1"},
            "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [2.1, 41.4]}},
            "name": {"type": "LanguageProperty", "languageMap": {"en": "Car", "es": "Coche"}},
            "category": {"type": "VocabProperty", "vocab": "sedan"},
            "config": {"type": "JsonProperty", "json": {"a": [1, 2]}},
            "readings": {"type": "ListProperty", "valueList": [1, 2, 3]},
            "drivers": {"type": "ListRelationship", "objectList": [{"object": "urn:ngsi-ld:Person:P2"}]},
            "temperature": [
                {"type": "Property", "value": 20},
                {"type": "Property", "value": 21, "datasetId": "urn:ngsi-ld:dataset:b"}
            ]
        })
    }

    #[test]
    fn normalized_round_trip_keeps_every_kind() {
        let e = parse_entity(&sample(), &ctx(), 1_000).unwrap();
        assert_eq!(
            e.types,
            vec!["https://uri.etsi.org/ngsi-ld/default-context/Vehicle"]
        );
        assert_eq!(e.attrs.len(), 9);
        let out = Value::Object(render_entity(&e, &ctx(), &RenderOptions::default()));
        assert_eq!(out, sample());
    }

    #[test]
    fn vocab_values_are_expanded_in_storage() {
        let e = parse_entity(&sample(), &ctx(), 0).unwrap();
        let cat = &e.attrs["https://uri.etsi.org/ngsi-ld/default-context/category"][0];
        assert_eq!(
            cat.value,
            json!("https://uri.etsi.org/ngsi-ld/default-context/sedan")
        );
    }

    #[test]
    fn concise_input_is_understood_and_concise_output_round_trips() {
        let concise = json!({
            "id": "urn:ngsi-ld:Vehicle:A1",
            "type": "Vehicle",
            "speed": 80,
            "owner": {"object": "urn:ngsi-ld:Person:P1"},
            "location": {"type": "Point", "coordinates": [2.1, 41.4]},
            "brand": {"value": "Mercedes", "observedAt": "2024-01-01T10:00:00.000Z"},
            "name": {"languageMap": {"en": "Car"}},
        });
        let e = parse_entity(&concise, &ctx(), 0).unwrap();
        let kinds: Vec<AttrKind> = e.attrs.values().map(|i| i[0].kind).collect();
        assert_eq!(
            kinds,
            [
                AttrKind::Property,
                AttrKind::Relationship,
                AttrKind::GeoProperty,
                AttrKind::Property,
                AttrKind::LanguageProperty
            ]
        );
        let opts = RenderOptions {
            format: Format::Concise,
            ..Default::default()
        };
        assert_eq!(Value::Object(render_entity(&e, &ctx(), &opts)), concise);
    }

    #[test]
    fn key_values() {
        let e = parse_entity(&sample(), &ctx(), 0).unwrap();
        let opts = RenderOptions {
            format: Format::KeyValues,
            ..Default::default()
        };
        let out = render_entity(&e, &ctx(), &opts);
        assert_eq!(out["speed"], json!(80));
        assert_eq!(out["owner"], json!("urn:ngsi-ld:Person:P1"));
        assert_eq!(out["category"], json!("sedan"));
        assert_eq!(out["temperature"], json!(20));
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                json!({"id": "urn:a", "type": "T", "p": {"type": "Property"}}),
                "no value",
            ),
            (json!({"id": "nope", "type": "T"}), "not a valid URI"),
            (json!({"id": "urn:a"}), "needs a 'type'"),
            (
                json!({"id": "urn:a", "type": "T", "r": {"type": "Relationship", "object": "x"}}),
                "not a valid URI",
            ),
            (
                json!({"id": "urn:a", "type": "T", "r": {"type": "Relationship", "value": 1}}),
                "needs 'object'",
            ),
            (
                json!({"id": "urn:a", "type": "T", "p": {"type": "Weird", "value": 1}}),
                "unknown type",
            ),
            (
                json!({"id": "urn:a", "type": "T", "p=": 1}),
                "forbidden character",
            ),
            (
                json!({"id": "urn:a", "type": "T", "p": {"value": 1, "observedAt": "now"}}),
                "observedAt",
            ),
            (json!({"id": "urn:a", "type": "T", "p": null}), "null"),
            (
                json!({"id": "urn:a", "type": "T", "location": {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [0, 100]}}}),
                "latitude",
            ),
            (
                json!({"id": "urn:a", "type": "T", "p": [{"value": 1}, {"value": 2}]}),
                "same datasetId",
            ),
            (json!([1]), "JSON object"),
        ];
        for (body, word) in cases {
            let e = parse_entity(&body, &ctx(), 0).unwrap_err();
            assert!(e.detail.contains(word), "{body}: {}", e.detail);
        }
    }

    #[test]
    fn sys_attrs_render_times() {
        let e = parse_entity(&sample(), &ctx(), 1_700_000_000_000_000).unwrap();
        let opts = RenderOptions {
            sys_attrs: true,
            ..Default::default()
        };
        let out = render_entity(&e, &ctx(), &opts);
        assert_eq!(out["createdAt"], json!("2023-11-14T22:13:20.000Z"));
        assert_eq!(
            out["speed"]["modifiedAt"],
            json!("2023-11-14T22:13:20.000Z")
        );
    }

    #[test]
    fn geojson_feature() {
        let e = parse_entity(&sample(), &ctx(), 0).unwrap();
        let f = render_feature(
            &e,
            &ctx(),
            &RenderOptions::default(),
            "https://uri.etsi.org/ngsi-ld/location",
        );
        assert_eq!(f["type"], "Feature");
        assert_eq!(f["geometry"]["coordinates"], json!([2.1, 41.4]));
        assert_eq!(f["properties"]["type"], "Vehicle");
        assert!(f["properties"].get("id").is_none());
    }
}
