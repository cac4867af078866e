//! JSON-LD `@context` processing for NGSI-LD payloads.
//!
//! NGSI-LD documents have a fixed shape, so a full JSON-LD processor is not
//! needed on the hot path: each `@context` is processed once into a term map
//! (term → IRI) and its reverse (IRI → term), and names are expanded and
//! compacted with hash lookups. The core context is always applied first and
//! its terms are protected, as the specification requires.

use crate::error::{NgsiError, NgsiResult};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

/// The core context Borough uses when a request names none.
pub const CORE_CONTEXT_URL: &str =
    "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld";

/// Every core context version built into the binary, by the URLs clients use for them.
pub const BUILTIN_CONTEXTS: &[(&str, &str)] = &[
    (
        "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.6.jsonld",
        include_str!("../contexts/ngsi-ld-core-context-v1.6.jsonld"),
    ),
    (
        "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.7.jsonld",
        include_str!("../contexts/ngsi-ld-core-context-v1.7.jsonld"),
    ),
    (
        CORE_CONTEXT_URL,
        include_str!("../contexts/ngsi-ld-core-context-v1.8.jsonld"),
    ),
    (
        "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.9.jsonld",
        include_str!("../contexts/ngsi-ld-core-context-v1.9.jsonld"),
    ),
    (
        "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld",
        include_str!("../contexts/ngsi-ld-core-context-v1.8.jsonld"),
    ),
];

/// The document of a built-in context, if `url` names one.
pub fn builtin_context(url: &str) -> Option<&'static str> {
    BUILTIN_CONTEXTS
        .iter()
        .find(|(u, _)| *u == url)
        .map(|(_, doc)| *doc)
}

/// The default vocabulary of NGSI-LD: names that no context defines expand under it.
pub const DEFAULT_VOCAB: &str = "https://uri.etsi.org/ngsi-ld/default-context/";
/// The NGSI-LD core namespace.
pub const NGSI_LD_NS: &str = "https://uri.etsi.org/ngsi-ld/";

/// How many context documents (including nested references) one request may pull in.
pub const MAX_CONTEXT_DOCUMENTS: usize = 32;

#[derive(Debug, Clone)]
struct TermDef {
    iri: String,
}

/// A processed `@context`: the active term definitions for one request.
#[derive(Debug, Clone)]
pub struct Context {
    terms: HashMap<String, TermDef>,
    reverse: HashMap<String, String>,
    vocab: String,
    /// Terms usable as CURIE prefixes (their IRI ends with '/' or '#'), as
    /// (IRI, term); compaction falls back to them when no term or the
    /// vocabulary covers an IRI.
    prefixes: Vec<(String, String)>,
    /// Terms of the core context, which a user context cannot redefine.
    protected: usize,
}

static CORE: LazyLock<Arc<Context>> = LazyLock::new(|| {
    let doc: Value =
        serde_json::from_str(builtin_context(CORE_CONTEXT_URL).expect("core context is built in"))
            .expect("core context is valid JSON");
    let mut ctx = Context {
        terms: HashMap::new(),
        reverse: HashMap::new(),
        vocab: DEFAULT_VOCAB.to_string(),
        prefixes: Vec::new(),
        protected: 0,
    };
    if let Some(Value::Object(map)) = doc.get("@context") {
        ctx.apply_object(map, false)
            .expect("core context is well formed");
    }
    ctx.protected = ctx.terms.len();
    Arc::new(ctx)
});

impl Context {
    /// The core context alone, shared.
    pub fn core() -> Arc<Context> {
        CORE.clone()
    }

    /// Builds the active context from the core context plus the given context
    /// objects, in order. Remote references must already be resolved to their
    /// `@context` objects by the caller (that needs I/O, which the core does not do).
    pub fn with_user_contexts(objects: &[Map<String, Value>]) -> NgsiResult<Context> {
        let mut ctx: Context = Context::clone(&CORE);
        for obj in objects {
            ctx.apply_object(obj, true)?;
        }
        Ok(ctx)
    }

    fn apply_object(&mut self, obj: &Map<String, Value>, user: bool) -> NgsiResult<()> {
        if let Some(v) = obj.get("@vocab") {
            match v {
                Value::String(s) => {
                    let iri = self.expand_raw(s, obj, 0).into_owned();
                    self.vocab = iri;
                }
                Value::Null => self.vocab = DEFAULT_VOCAB.to_string(),
                _ => return Err(NgsiError::bad_data("@vocab in @context must be a string")),
            }
        }
        for (term, def) in obj {
            if term.starts_with('@') {
                continue;
            }
            if user && self.is_protected(term) {
                // The core context is protected: a user context cannot redefine its terms.
                continue;
            }
            let iri = match def {
                Value::String(s) => self.expand_raw(s, obj, 0).into_owned(),
                Value::Object(d) => match d.get("@id") {
                    Some(Value::String(s)) => self.expand_raw(s, obj, 0).into_owned(),
                    Some(Value::Null) => continue,
                    Some(_) => {
                        return Err(NgsiError::bad_data(format!(
                            "@id of term '{term}' in @context must be a string"
                        )));
                    }
                    None => format!("{}{}", self.vocab, term),
                },
                Value::Null => {
                    if let Some(old) = self.terms.remove(term) {
                        self.reverse.remove(&old.iri);
                        self.prefixes.retain(|(_, t)| t != term);
                    }
                    continue;
                }
                _ => {
                    return Err(NgsiError::bad_data(format!(
                        "definition of term '{term}' in @context must be a string or an object"
                    )));
                }
            };
            if iri.starts_with('@') {
                // Keyword aliases such as "id": "@id" name no attribute, type or
                // vocabulary value, so they take no part in expansion.
                continue;
            }
            // Prefer the shortest term when several map to one IRI, so that
            // compaction is deterministic whatever the map order is.
            let keep_existing = self.reverse.get(&iri).is_some_and(|old| {
                old.len() < term.len() || (old.len() == term.len() && old < term)
            });
            if !keep_existing {
                self.reverse.insert(iri.clone(), term.clone());
            }
            self.prefixes.retain(|(_, t)| t != term);
            if (iri.ends_with('/') || iri.ends_with('#')) && !term.contains(':') {
                self.prefixes.push((iri.clone(), term.clone()));
                // Longest IRI first, then the shortest term: the most specific CURIE.
                self.prefixes.sort_by(|a, b| {
                    b.0.len()
                        .cmp(&a.0.len())
                        .then(a.1.len().cmp(&b.1.len()))
                        .then(a.1.cmp(&b.1))
                });
            }
            self.terms.insert(term.clone(), TermDef { iri });
        }
        Ok(())
    }

    fn is_protected(&self, term: &str) -> bool {
        self.protected > 0 && CORE.terms.contains_key(term)
    }

    /// Expands a value that appears in a context definition, where prefixes may
    /// be defined by the same (not yet applied) context object.
    fn expand_raw<'a>(&self, s: &'a str, local: &Map<String, Value>, depth: u8) -> Cow<'a, str> {
        if s.starts_with('@') {
            return Cow::Borrowed(s);
        }
        if let Some((prefix, suffix)) = s.split_once(':') {
            if suffix.starts_with("//") {
                return Cow::Borrowed(s);
            }
            if depth < 4 {
                if let Some(Value::String(p)) = local.get(prefix) {
                    let base = self.expand_raw(p, local, depth + 1);
                    return Cow::Owned(format!("{base}{suffix}"));
                }
                if let Some(Value::Object(p)) = local.get(prefix)
                    && let Some(Value::String(id)) = p.get("@id")
                {
                    let base = self.expand_raw(id, local, depth + 1);
                    return Cow::Owned(format!("{base}{suffix}"));
                }
            }
            if let Some(def) = self.terms.get(prefix) {
                return Cow::Owned(format!("{}{}", def.iri, suffix));
            }
            return Cow::Borrowed(s);
        }
        if let Some(def) = self.terms.get(s) {
            return Cow::Owned(def.iri.clone());
        }
        Cow::Owned(format!("{}{}", self.vocab, s))
    }

    /// Expands a term (an attribute name, a type name) to its IRI.
    pub fn expand<'a>(&'a self, term: &'a str) -> Cow<'a, str> {
        if let Some(def) = self.terms.get(term) {
            return Cow::Borrowed(def.iri.as_str());
        }
        if let Some((prefix, suffix)) = term.split_once(':') {
            if suffix.starts_with("//") {
                return Cow::Borrowed(term);
            }
            if let Some(def) = self.terms.get(prefix) {
                return Cow::Owned(format!("{}{}", def.iri, suffix));
            }
            // An absolute IRI of another scheme, such as `urn:`.
            return Cow::Borrowed(term);
        }
        Cow::Owned(format!("{}{}", self.vocab, term))
    }

    /// Compacts an IRI back to the shortest form this context gives it: a
    /// term, else a name relative to the vocabulary, else a CURIE through a
    /// prefix (`ngsi-ld:default-context/speed` when a user `@vocab` or term
    /// hides the default vocabulary), else the IRI itself.
    pub fn compact<'a>(&'a self, iri: &'a str) -> Cow<'a, str> {
        if let Some(term) = self.reverse.get(iri) {
            return Cow::Borrowed(term.as_str());
        }
        if let Some(rest) = iri.strip_prefix(self.vocab.as_str())
            && !rest.is_empty()
            && !self.terms.contains_key(rest)
        {
            return Cow::Borrowed(rest);
        }
        for (prefix_iri, term) in &self.prefixes {
            if let Some(rest) = iri.strip_prefix(prefix_iri.as_str())
                && !rest.is_empty()
            {
                let curie = format!("{term}:{rest}");
                if !self.terms.contains_key(&curie) {
                    return Cow::Owned(curie);
                }
            }
        }
        Cow::Borrowed(iri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(v: Value) -> Context {
        let Value::Object(m) = v else {
            panic!("object")
        };
        Context::with_user_contexts(&[m]).unwrap()
    }

    #[test]
    fn core_terms_expand_to_ngsi_ld_iris() {
        let c = Context::core();
        assert_eq!(
            c.expand("location"),
            "https://uri.etsi.org/ngsi-ld/location"
        );
        assert_eq!(
            c.expand("observedAt"),
            "https://uri.etsi.org/ngsi-ld/observedAt"
        );
        assert_eq!(
            c.compact("https://uri.etsi.org/ngsi-ld/location"),
            "location"
        );
    }

    #[test]
    fn unknown_terms_use_the_default_vocabulary_and_round_trip() {
        let c = Context::core();
        let iri = c.expand("speed").into_owned();
        assert_eq!(iri, "https://uri.etsi.org/ngsi-ld/default-context/speed");
        assert_eq!(c.compact(&iri), "speed");
    }

    #[test]
    fn user_terms_prefixes_and_vocab() {
        let c = user(json!({
            "schema": "https://schema.org/",
            "name": "schema:name",
            "Vehicle": {"@id": "https://example.org/Vehicle"},
        }));
        assert_eq!(c.expand("name"), "https://schema.org/name");
        assert_eq!(c.expand("schema:address"), "https://schema.org/address");
        assert_eq!(c.compact("https://schema.org/name"), "name");
        assert_eq!(c.expand("Vehicle"), "https://example.org/Vehicle");
        // An IRI no term covers stays absolute.
        assert_eq!(c.compact("https://other.org/x"), "https://other.org/x");
        assert_eq!(c.expand("urn:ngsi-ld:thing"), "urn:ngsi-ld:thing");
        let v = user(json!({"@vocab": "https://example.org/terms/"}));
        assert_eq!(v.expand("speed"), "https://example.org/terms/speed");
        assert_eq!(v.compact("https://example.org/terms/speed"), "speed");
    }

    #[test]
    fn iris_outside_terms_and_vocabulary_compact_to_curies() {
        // A user vocabulary hides the default one: its names come back through
        // the core context's `ngsi-ld` prefix.
        let c = user(json!({"@vocab": "https://example.org/terms/"}));
        assert_eq!(
            c.compact("https://uri.etsi.org/ngsi-ld/default-context/speed"),
            "ngsi-ld:default-context/speed"
        );
        // So does a user term of the same name.
        let c = user(json!({"speed": "https://example.org/speed"}));
        assert_eq!(
            c.compact("https://uri.etsi.org/ngsi-ld/default-context/speed"),
            "ngsi-ld:default-context/speed"
        );
        assert_eq!(
            c.expand("ngsi-ld:default-context/speed"),
            "https://uri.etsi.org/ngsi-ld/default-context/speed"
        );
        let c = user(json!({"ex": "https://example.org/ns#"}));
        assert_eq!(c.compact("https://example.org/ns#thing"), "ex:thing");
        assert_eq!(
            c.compact("https://example.org/other"),
            "https://example.org/other"
        );
    }

    #[test]
    fn core_terms_are_protected() {
        let c = user(json!({"location": "https://example.org/location"}));
        assert_eq!(
            c.expand("location"),
            "https://uri.etsi.org/ngsi-ld/location"
        );
    }

    #[test]
    fn every_builtin_context_is_valid_json_with_a_context_object() {
        for (url, doc) in BUILTIN_CONTEXTS {
            let v: Value = serde_json::from_str(doc).unwrap();
            assert!(v["@context"].is_object(), "{url}");
        }
    }
}
