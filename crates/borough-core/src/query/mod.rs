//! Entity queries (clause 5.7.2): which entities a request asks for. Parsing
//! and the reference evaluation (`EntityQuery::matches`) live here; a storage
//! engine may plan with indexes but must return exactly what a plain scan with
//! `matches` would.

pub mod expr;
pub mod geo;
pub mod projection;
pub mod q;

use crate::context::Context;
use crate::entity::Entity;
use crate::error::{NgsiError, NgsiResult};
use expr::{BoolExpr, Cursor, parse};
pub use q::{QExpr, parse_q};
use regex::Regex;

/// Longest `idPattern` accepted.
const MAX_PATTERN_LEN: usize = 1024;
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A type expression: expanded type names combined with `;` and `|`/`,`.
pub type TypeExpr = BoolExpr<String>;
/// A scope query: scope patterns combined with `;` and `|`/`,`.
pub type ScopeExpr = BoolExpr<ScopePattern>;

/// A scope pattern: `/a/b`, `/a/+/c` (one level), `/a/#` (the scope and below).
#[derive(Clone, Debug, PartialEq)]
pub struct ScopePattern {
    segments: Vec<String>,
    descendants: bool,
}

impl ScopePattern {
    pub fn matches(&self, scope: &str) -> bool {
        let parts: Vec<&str> = scope.trim_start_matches('/').split('/').collect();
        if parts.len() < self.segments.len()
            || (!self.descendants && parts.len() != self.segments.len())
        {
            return false;
        }
        self.segments
            .iter()
            .zip(&parts)
            .all(|(p, s)| p == "+" || p == s)
    }
}

/// One member of the `entities` of a query body: its parts must all hold.
#[derive(Clone, Debug, Default)]
pub struct EntitySelector {
    pub id: Option<String>,
    pub id_pattern: Option<Regex>,
    pub types: Option<TypeExpr>,
}

impl EntitySelector {
    pub fn matches(&self, e: &Entity) -> bool {
        self.id.as_ref().is_none_or(|i| *i == e.id)
            && self.id_pattern.as_ref().is_none_or(|r| r.is_match(&e.id))
            && self.types.as_ref().is_none_or(|t| has_types(e, t))
    }
}

fn has_types(e: &Entity, t: &TypeExpr) -> bool {
    t.eval(&mut |name| e.types.iter().any(|et| et == name))
}

/// Everything that selects entities (projection and paging are separate).
#[derive(Clone, Debug, Default)]
pub struct EntityQuery {
    /// Any of these ids (empty: any id).
    pub ids: Vec<String>,
    pub id_pattern: Option<Regex>,
    pub types: Option<TypeExpr>,
    /// Expanded attribute names: the entity must have at least one (empty: no condition).
    pub attrs: Vec<String>,
    pub q: Option<QExpr>,
    pub scope_q: Option<ScopeExpr>,
    /// Any of these selectors must match (empty: no condition).
    pub selectors: Vec<EntitySelector>,
    pub geo: Option<geo::GeoQuery>,
}

impl EntityQuery {
    /// True when nothing narrows the query down.
    pub fn is_unrestricted(&self) -> bool {
        self.ids.is_empty()
            && self.id_pattern.is_none()
            && self.types.is_none()
            && self.attrs.is_empty()
            && self.q.is_none()
            && self.scope_q.is_none()
            && self.selectors.is_empty()
            && self.geo.is_none()
    }

    /// For `near` queries, the distance that orders results (nearest first);
    /// other queries are ordered by entity id.
    pub fn distance(&self, e: &Entity) -> Option<f64> {
        self.geo.as_ref().and_then(|g| g.distance(e))
    }

    /// Whether results are ordered by distance rather than by id.
    pub fn orders_by_distance(&self) -> bool {
        self.geo
            .as_ref()
            .is_some_and(|g| matches!(g.rel, geo::GeoRel::Near { .. }))
    }

    /// The reference definition of which entities a query selects.
    pub fn matches(&self, e: &Entity) -> bool {
        self.matches_except_geo(e) && self.geo.as_ref().is_none_or(|g| g.matches(e))
    }

    /// The conditions on an entity's content only: q, scopeQ and the geo-query
    /// (not ids, types or attributes), as subscriptions apply them.
    pub fn content_matches(&self, e: &Entity) -> bool {
        self.scope_q
            .as_ref()
            .is_none_or(|s| s.eval(&mut |p| e.scopes.iter().any(|sc| p.matches(sc))))
            && self.q.as_ref().is_none_or(|q| q::eval_q(e, q))
            && self.geo.as_ref().is_none_or(|g| g.matches(e))
    }

    /// Every condition but the geo-query (for plans that evaluate it themselves).
    pub fn matches_except_geo(&self, e: &Entity) -> bool {
        (self.ids.is_empty() || self.ids.contains(&e.id))
            && self.id_pattern.as_ref().is_none_or(|r| r.is_match(&e.id))
            && self.types.as_ref().is_none_or(|t| has_types(e, t))
            && (self.selectors.is_empty() || self.selectors.iter().any(|s| s.matches(e)))
            && (self.attrs.is_empty() || self.attrs.iter().any(|a| e.attrs.contains_key(a)))
            && self
                .scope_q
                .as_ref()
                .is_none_or(|s| s.eval(&mut |p| e.scopes.iter().any(|sc| p.matches(sc))))
            && self.q.as_ref().is_none_or(|q| q::eval_q(e, q))
    }
}

/// Parses a type expression (`A`, `A,B`, `A;B`, `(A|B);C`), expanding names.
pub fn parse_type_expr(src: &str, ctx: &Context) -> NgsiResult<TypeExpr> {
    parse(
        src,
        "type expression",
        &['|', ','],
        &mut |c: &mut Cursor| {
            let start = c.pos;
            while c
                .peek()
                .is_some_and(|ch| !matches!(ch, ';' | '|' | ',' | '(' | ')') && !ch.is_whitespace())
            {
                c.bump();
            }
            let name = &c.src[start..c.pos];
            if name.is_empty() {
                return Err(c.error("an entity type"));
            }
            crate::validate::check_name("entity type", name)?;
            Ok(ctx.expand(name).into_owned())
        },
    )
}

/// Parses a scope query (`/a/b`, `/a/#`, `/+/b`, combined with `;` and `|`/`,`).
pub fn parse_scope_q(src: &str) -> NgsiResult<ScopeExpr> {
    parse(src, "scopeQ", &['|', ','], &mut |c: &mut Cursor| {
        if !c.eat("/") {
            return Err(c.error("a scope starting with '/'"));
        }
        let start = c.pos;
        while c
            .peek()
            .is_some_and(|ch| !matches!(ch, ';' | '|' | ',' | '(' | ')'))
        {
            c.bump();
        }
        let body = &c.src[start..c.pos];
        let mut segments: Vec<String> = body.split('/').map(str::to_string).collect();
        let descendants = segments.last().is_some_and(|s| s == "#");
        if descendants {
            segments.pop();
        }
        if segments.len() == 1 && segments[0].is_empty() && descendants {
            segments.clear();
        }
        if segments.iter().any(|s| s.is_empty() || s.contains('#')) {
            return Err(c.error("a scope like /a/b, /a/+/c or /a/#"));
        }
        Ok(ScopePattern {
            segments,
            descendants,
        })
    })
}

/// Compiles an `idPattern` with the linear-time engine, bounded in size.
pub fn compile_id_pattern(src: &str) -> NgsiResult<Regex> {
    if src.len() > MAX_PATTERN_LEN {
        return Err(NgsiError::bad_data(format!(
            "idPattern is longer than {MAX_PATTERN_LEN} characters"
        )));
    }
    regex::RegexBuilder::new(src)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| NgsiError::bad_data(format!("invalid idPattern '{src}': {e}")))
}

#[cfg(test)]
mod tests;
