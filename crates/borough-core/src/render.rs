//! Rendering entities in the representations of clause 4.5 (normalized,
//! concise, keyValues, GeoJSON), compacted against the request's context.
//!
//! The renderer is a set of `Serialize` views over stored entities, so a
//! response is written straight into its bytes without building an
//! intermediate JSON tree; `render_entity` and friends build `Value`s from the
//! same views for the few places that need a tree.

use crate::context::Context;
use crate::entity::{AttrKind, Attribute, Entity};
use crate::validate::format_datetime;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Value};

/// The representations of clause 4.5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Normalized,
    Concise,
    KeyValues,
}

/// What to render and how.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    pub format: Format,
    pub sys_attrs: bool,
    /// Only these attributes (expanded names), when given (`attrs`, `pick`).
    pub attrs: Option<Vec<String>>,
    /// Attributes left out (expanded names; `omit`).
    pub omit: Vec<String>,
    /// Leave out `id` / `type` / `scope` (`pick` without them, `omit` with them).
    pub hide_id: bool,
    pub hide_type: bool,
    pub hide_scope: bool,
    /// Language preference for LanguageProperties (`lang`), best first.
    pub lang: Option<Vec<String>>,
    /// Only instances with these datasetIds (`None` is the default instance).
    pub dataset_ids: Option<Vec<Option<String>>>,
    /// Sub-attribute projection per attribute (expanded names): `pick` or
    /// `omit` with braces, `temperature{accuracy}`.
    pub sub_attrs: Vec<(String, SubSelect)>,
}

/// Which sub-attributes of an attribute are shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubSelect {
    Only(Vec<String>),
    Drop(Vec<String>),
}

impl SubSelect {
    fn shows(&self, name: &str) -> bool {
        match self {
            Self::Only(names) => names.iter().any(|n| n == name),
            Self::Drop(names) => !names.iter().any(|n| n == name),
        }
    }
}

impl RenderOptions {
    /// Whether the attribute `name` (expanded) is shown.
    pub fn wants(&self, name: &str) -> bool {
        self.attrs
            .as_ref()
            .is_none_or(|w| w.iter().any(|x| x == name))
            && !self.omit.iter().any(|x| x == name)
    }

    /// The sub-attribute projection of attribute `name`, if any.
    pub fn sub_select(&self, name: &str) -> Option<&SubSelect> {
        self.sub_attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    /// Whether the instance is shown (datasetId selection).
    pub fn wants_instance(&self, a: &Attribute) -> bool {
        self.dataset_ids
            .as_ref()
            .is_none_or(|ids| ids.contains(&a.dataset_id))
    }
}

/// The text of a language map in the preferred language: the first listed
/// language present, else `@none`, else the first entry. Returns the tag too.
pub fn pick_language<'a>(
    map: &'a Map<String, Value>,
    prefs: &[String],
) -> Option<(&'a str, &'a Value)> {
    prefs
        .iter()
        .find_map(|p| map.get_key_value(p.as_str()))
        .or_else(|| map.get_key_value("@none"))
        .or_else(|| map.iter().next())
        .map(|(k, v)| (k.as_str(), v))
}

/// An entity as a response shows it. `context` puts an `@context` member first.
pub struct EntityView<'a> {
    pub entity: &'a Entity,
    pub ctx: &'a Context,
    pub opts: &'a RenderOptions,
    pub context: Option<&'a Value>,
}

/// A list of entities sharing one context and options.
pub struct EntityListView<'a, E: AsRef<Entity>> {
    pub entities: &'a [E],
    pub ctx: &'a Context,
    pub opts: &'a RenderOptions,
    pub context: Option<&'a Value>,
}

impl<E: AsRef<Entity>> Serialize for EntityListView<'_, E> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.entities.len()))?;
        for e in self.entities {
            seq.serialize_element(&EntityView {
                entity: e.as_ref(),
                ctx: self.ctx,
                opts: self.opts,
                context: self.context,
            })?;
        }
        seq.end()
    }
}

/// Compacted type names: a string for one, an array for several.
struct Names<'a> {
    iris: &'a [String],
    ctx: &'a Context,
}

impl Serialize for Names<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if let [one] = self.iris {
            return s.serialize_str(&self.ctx.compact(one));
        }
        let mut seq = s.serialize_seq(Some(self.iris.len()))?;
        for t in self.iris {
            seq.serialize_element(&*self.ctx.compact(t))?;
        }
        seq.end()
    }
}

/// A string, or an array for several (scopes).
struct OneOrMany<'a>(&'a [String]);

impl Serialize for OneOrMany<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl Serialize for EntityView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (e, ctx, opts) = (self.entity, self.ctx, self.opts);
        let mut m = s.serialize_map(None)?;
        if let Some(c) = self.context {
            m.serialize_entry("@context", c)?;
        }
        if !opts.hide_id {
            m.serialize_entry("id", &e.id)?;
        }
        if !opts.hide_type {
            m.serialize_entry(
                "type",
                &Names {
                    iris: &e.types,
                    ctx,
                },
            )?;
        }
        if !e.scopes.is_empty() && !opts.hide_scope {
            m.serialize_entry("scope", &OneOrMany(&e.scopes))?;
        }
        for (name, instances) in &e.attrs {
            if !opts.wants(name) {
                continue;
            }
            let view = InstancesView {
                instances,
                ctx,
                opts,
                subs: opts.sub_select(name),
            };
            if view.is_empty() {
                continue;
            }
            m.serialize_entry(&*ctx.compact(name), &view)?;
        }
        // keyValues has no room for attribute system members, but the
        // entity's own are plain members and are shown with sysAttrs.
        if opts.sys_attrs {
            m.serialize_entry("createdAt", &format_datetime(e.created_at))?;
            m.serialize_entry("modifiedAt", &format_datetime(e.modified_at))?;
        }
        m.end()
    }
}

/// The instances of one attribute that the options select.
struct InstancesView<'a> {
    instances: &'a [Attribute],
    ctx: &'a Context,
    opts: &'a RenderOptions,
    subs: Option<&'a SubSelect>,
}

impl InstancesView<'_> {
    fn selected(&self) -> impl Iterator<Item = &Attribute> {
        self.instances
            .iter()
            .filter(|a| self.opts.wants_instance(a))
    }

    fn is_empty(&self) -> bool {
        self.selected().next().is_none()
    }
}

impl Serialize for InstancesView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (ctx, opts, subs) = (self.ctx, self.opts, self.subs);
        if opts.format == Format::KeyValues {
            // keyValues has no room for instances: the default instance (or the first) stands for the attribute.
            let chosen = self
                .selected()
                .find(|a| a.dataset_id.is_none())
                .or_else(|| self.selected().next());
            return match chosen {
                Some(a) => SimplifiedView { attr: a, ctx, opts }.serialize(s),
                None => s.serialize_none(),
            };
        }
        let mut selected = self.selected();
        match (selected.next(), selected.next()) {
            (Some(one), None) => AttributeView {
                attr: one,
                ctx,
                opts,
                subs,
            }
            .serialize(s),
            _ => {
                let mut seq = s.serialize_seq(None)?;
                for a in self.selected() {
                    seq.serialize_element(&AttributeView {
                        attr: a,
                        ctx,
                        opts,
                        subs,
                    })?;
                }
                seq.end()
            }
        }
    }
}

/// A vocab value (an IRI or IRIs), compacted.
struct VocabView<'a> {
    value: &'a Value,
    ctx: &'a Context,
}

impl Serialize for VocabView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.value {
            Value::String(iri) => s.serialize_str(&self.ctx.compact(iri)),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items {
                    seq.serialize_element(&VocabView {
                        value: v,
                        ctx: self.ctx,
                    })?;
                }
                seq.end()
            }
            other => other.serialize(s),
        }
    }
}

/// The value member as stored, with vocab IRIs compacted.
struct StoredValue<'a> {
    attr: &'a Attribute,
    ctx: &'a Context,
}

impl Serialize for StoredValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.attr.kind == AttrKind::VocabProperty {
            VocabView {
                value: &self.attr.value,
                ctx: self.ctx,
            }
            .serialize(s)
        } else {
            self.attr.value.serialize(s)
        }
    }
}

/// The value alone, as keyValues shows it (the preferred language's text for
/// a LanguageProperty when `lang` is given).
struct SimplifiedView<'a> {
    attr: &'a Attribute,
    ctx: &'a Context,
    opts: &'a RenderOptions,
}

impl Serialize for SimplifiedView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.attr.kind == AttrKind::LanguageProperty
            && let (Some(prefs), Value::Object(map)) = (&self.opts.lang, &self.attr.value)
            && let Some((_, text)) = pick_language(map, prefs)
        {
            return text.serialize(s);
        }
        StoredValue {
            attr: self.attr,
            ctx: self.ctx,
        }
        .serialize(s)
    }
}

/// One attribute instance, normalized or concise.
pub struct AttributeView<'a> {
    pub attr: &'a Attribute,
    pub ctx: &'a Context,
    pub opts: &'a RenderOptions,
    /// Which sub-attributes are shown (all when `None`).
    pub subs: Option<&'a SubSelect>,
}

impl Serialize for AttributeView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (a, ctx, opts) = (self.attr, self.ctx, self.opts);
        let concise = opts.format == Format::Concise;
        let shown = |name: &str| self.subs.is_none_or(|s| s.shows(name));
        let bare = concise
            && !a.sub.keys().any(|n| shown(n))
            && a.observed_at.is_none()
            && a.unit_code.is_none()
            && a.dataset_id.is_none()
            && a.object_type.is_none()
            && !opts.sys_attrs;
        if bare {
            match a.kind {
                AttrKind::Property if !a.value.is_object() && !a.value.is_array() => {
                    return a.value.serialize(s);
                }
                AttrKind::GeoProperty => return a.value.serialize(s),
                _ => {}
            }
        }
        let mut m = s.serialize_map(None)?;
        let language = match (&opts.lang, &a.value) {
            (Some(prefs), Value::Object(map)) if a.kind == AttrKind::LanguageProperty => {
                pick_language(map, prefs)
            }
            _ => None,
        };
        if let Some((tag, text)) = language {
            // With `lang`, a LanguageProperty is shown as a Property in that language (clause 4.15).
            if !concise {
                m.serialize_entry("type", "Property")?;
            }
            m.serialize_entry("value", text)?;
            m.serialize_entry("lang", tag)?;
        } else {
            if !concise {
                m.serialize_entry("type", a.kind.name())?;
            }
            m.serialize_entry(a.kind.value_key(), &StoredValue { attr: a, ctx })?;
        }
        if let Some(t) = &a.object_type {
            m.serialize_entry("objectType", &VocabView { value: t, ctx })?;
        }
        if let Some(d) = &a.dataset_id {
            m.serialize_entry("datasetId", d)?;
        }
        if let Some(o) = a.observed_at {
            m.serialize_entry("observedAt", &format_datetime(o))?;
        }
        if let Some(u) = &a.unit_code {
            m.serialize_entry("unitCode", u)?;
        }
        for (name, sub) in &a.sub {
            if !shown(name) {
                continue;
            }
            m.serialize_entry(
                &*ctx.compact(name),
                &AttributeView {
                    attr: sub,
                    ctx,
                    opts,
                    subs: None,
                },
            )?;
        }
        if opts.sys_attrs {
            m.serialize_entry("createdAt", &format_datetime(a.created_at))?;
            m.serialize_entry("modifiedAt", &format_datetime(a.modified_at))?;
        }
        m.end()
    }
}

fn to_value(v: impl Serialize) -> Value {
    // Views serialize maps with string keys and JSON values only: this cannot fail.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Renders an entity as a JSON object.
pub fn render_entity(e: &Entity, ctx: &Context, opts: &RenderOptions) -> Map<String, Value> {
    match to_value(EntityView {
        entity: e,
        ctx,
        opts,
        context: None,
    }) {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The value member of an attribute instance as it is shown (vocab IRIs compacted).
pub fn render_value(a: &Attribute, ctx: &Context) -> Value {
    to_value(StoredValue { attr: a, ctx })
}

/// Renders one attribute instance as JSON.
pub fn render_attribute(a: &Attribute, ctx: &Context, opts: &RenderOptions) -> Value {
    to_value(AttributeView {
        attr: a,
        ctx,
        opts,
        subs: None,
    })
}

/// Renders an entity as a GeoJSON Feature (clause 4.5.16): the geometry comes
/// from `geometry_property` (expanded name), everything else goes under `properties`.
pub fn render_feature(
    e: &Entity,
    ctx: &Context,
    opts: &RenderOptions,
    geometry_property: &str,
) -> Value {
    let mut props = render_entity(e, ctx, opts);
    props.remove("id");
    let geometry = e
        .attrs
        .get(geometry_property)
        .and_then(|inst| {
            inst.iter()
                .find(|a| a.dataset_id.is_none())
                .or_else(|| inst.first())
        })
        .filter(|a| a.kind == AttrKind::GeoProperty)
        .map(|a| a.value.clone())
        .unwrap_or(Value::Null);
    let mut f = Map::new();
    f.insert("id".into(), Value::String(e.id.clone()));
    f.insert("type".into(), Value::String("Feature".into()));
    f.insert("geometry".into(), geometry);
    f.insert("properties".into(), Value::Object(props));
    Value::Object(f)
}
