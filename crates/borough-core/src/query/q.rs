//! The NGSI-LD query language (clause 4.9): parsing `q` into an expression of
//! terms and evaluating a term against an entity.

use super::expr::{BoolExpr, Cursor, parse};
use crate::context::Context;
use crate::entity::{AttrKind, Attribute, Entity};
use crate::error::{NgsiError, NgsiResult};
use crate::validate::parse_datetime;
use regex::Regex;
use serde_json::Value;
use std::cmp::Ordering;

/// Longest `q` accepted.
pub const MAX_Q_LEN: usize = 4096;
/// Largest compiled regular expression, in bytes (the engine is linear-time;
/// this bounds its memory).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

pub type QExpr = BoolExpr<QTerm>;

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Match,
    NotMatch,
}

/// A literal in a query.
#[derive(Clone, Debug, PartialEq)]
pub enum Lit {
    Num(f64),
    Bool(bool),
    /// A date-time, in microseconds since the epoch.
    DateTime(i64),
    /// A string (quoted), or an unquoted token such as a URI. `expanded` is the
    /// term expanded with the context, for comparisons with VocabProperty values.
    Str {
        raw: String,
        expanded: String,
    },
}

/// The right-hand side of a comparison.
#[derive(Clone, Debug)]
pub enum QValue {
    One(Lit),
    List(Vec<Lit>),
    Range(Lit, Lit),
    Pattern(Regex),
}

impl PartialEq for QValue {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::One(a), Self::One(b)) => a == b,
            (Self::List(a), Self::List(b)) => a == b,
            (Self::Range(a, b), Self::Range(c, d)) => a == c && b == d,
            (Self::Pattern(a), Self::Pattern(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

/// Members of an attribute that a path may name after the attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Member {
    ObservedAt,
    UnitCode,
    DatasetId,
    CreatedAt,
    ModifiedAt,
}

/// What a term looks at: an attribute, sub-attributes below it, optionally a
/// member (`observedAt`, ...), and optionally a path into a compound value (`a[b.c]`).
#[derive(Clone, Debug, PartialEq)]
pub struct AttrPath {
    /// Expanded names: the attribute, then sub-attributes.
    pub attrs: Vec<String>,
    pub member: Option<Member>,
    /// Keys into a JSON object value, as written.
    pub compound: Vec<String>,
}

/// One term of `q`: existence (`attr`, `!attr`) or a comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct QTerm {
    pub path: AttrPath,
    pub negated: bool,
    pub cmp: Option<(Op, QValue)>,
}

/// Parses `q` with the request's context.
pub fn parse_q(src: &str, ctx: &Context) -> NgsiResult<QExpr> {
    if src.len() > MAX_Q_LEN {
        return Err(NgsiError::bad_data(format!(
            "q is longer than {MAX_Q_LEN} characters"
        )));
    }
    if src.trim().is_empty() {
        return Err(NgsiError::bad_data("q is empty"));
    }
    parse(src, "q", &['|'], &mut |c| term(c, ctx))
}

const NAME_STOP: &[char] = &[
    '.', '[', ']', '(', ')', ';', '|', '=', '!', '<', '>', '~', ',', '"', '\'',
];

fn name(c: &mut Cursor) -> NgsiResult<String> {
    let start = c.pos;
    while let Some(ch) = c.peek() {
        if NAME_STOP.contains(&ch) || ch.is_whitespace() || ch.is_control() {
            break;
        }
        c.bump();
    }
    if c.pos == start {
        return Err(c.error("an attribute name"));
    }
    Ok(c.src[start..c.pos].to_string())
}

fn member(name: &str) -> Option<Member> {
    match name {
        "observedAt" => Some(Member::ObservedAt),
        "unitCode" => Some(Member::UnitCode),
        "datasetId" => Some(Member::DatasetId),
        "createdAt" => Some(Member::CreatedAt),
        "modifiedAt" => Some(Member::ModifiedAt),
        _ => None,
    }
}

fn path(c: &mut Cursor, ctx: &Context) -> NgsiResult<AttrPath> {
    let mut attrs = vec![ctx.expand(&name(c)?).into_owned()];
    let mut member_name = None;
    while c.eat(".") {
        let n = name(c)?;
        if let Some(m) = member(&n) {
            member_name = Some(m);
            break;
        }
        attrs.push(ctx.expand(&n).into_owned());
    }
    let mut compound = Vec::new();
    if c.eat("[") {
        compound.push(name(c)?);
        while c.eat(".") {
            compound.push(name(c)?);
        }
        if !c.eat("]") {
            return Err(c.error("']'"));
        }
    }
    Ok(AttrPath {
        attrs,
        member: member_name,
        compound,
    })
}

fn operator(c: &mut Cursor) -> Option<Op> {
    // Longest operators first.
    for (s, op) in [
        ("!~=", Op::NotMatch),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        (">=", Op::Ge),
        ("<=", Op::Le),
        ("~=", Op::Match),
        (">", Op::Gt),
        ("<", Op::Lt),
    ] {
        if c.eat(s) {
            return Some(op);
        }
    }
    None
}

fn term(c: &mut Cursor, ctx: &Context) -> NgsiResult<QTerm> {
    let negated = c.eat("!");
    let path = path(c, ctx)?;
    let at_boundary = c.at_end() || matches!(c.peek(), Some(';' | '|' | ')'));
    if at_boundary {
        return Ok(QTerm {
            path,
            negated,
            cmp: None,
        });
    }
    if negated {
        return Err(c.error("';', '|' or ')' after a negated attribute"));
    }
    let op = operator(c).ok_or_else(|| c.error("an operator (==, !=, >, >=, <, <=, ~=, !~=)"))?;
    let value = match op {
        Op::Match | Op::NotMatch => QValue::Pattern(pattern(c)?),
        _ => value(c, ctx, op)?,
    };
    Ok(QTerm {
        path,
        negated: false,
        cmp: Some((op, value)),
    })
}

fn quoted(c: &mut Cursor) -> NgsiResult<String> {
    // The opening quote is consumed by the caller.
    let mut out = String::new();
    loop {
        match c.bump() {
            None => return Err(c.error("a closing '\"'")),
            Some('"') => return Ok(out),
            Some('\\') => match c.bump() {
                Some(ch) => out.push(ch),
                None => return Err(c.error("a character after '\\'")),
            },
            Some(ch) => out.push(ch),
        }
    }
}

fn pattern(c: &mut Cursor) -> NgsiResult<Regex> {
    let start = c.pos;
    let src = if c.eat("\"") {
        quoted(c)?
    } else {
        // Unquoted: up to the end of the term.
        while c.peek().is_some_and(|ch| !matches!(ch, ';' | '|' | ')')) {
            c.bump();
        }
        c.src[start..c.pos].to_string()
    };
    if src.is_empty() {
        return Err(c.error("a regular expression"));
    }
    regex::RegexBuilder::new(&src)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| NgsiError::bad_data(format!("invalid regular expression '{src}' in q: {e}")))
}

fn literal(c: &mut Cursor, ctx: &Context) -> NgsiResult<Lit> {
    if c.eat("\"") {
        let s = quoted(c)?;
        // A quoted date-time still compares as a date-time.
        if let Some(t) = parse_datetime(&s) {
            return Ok(Lit::DateTime(t));
        }
        let expanded = ctx.expand(&s).into_owned();
        return Ok(Lit::Str { raw: s, expanded });
    }
    let start = c.pos;
    while let Some(ch) = c.peek() {
        if matches!(ch, ';' | '|' | ')' | ',') || c.rest().starts_with("..") {
            break;
        }
        // An unquoted value is a number, a date-time, true/false, a URI or a
        // term: none of these holds a quote, a bracket, a comparison
        // character or a space. Anything else is a syntax error here, not a
        // value that silently matches nothing.
        if !unquoted_value_char(ch) {
            return Err(c.error(
                "a value: a number, true, false, a date-time, a URI or a \"quoted string\"",
            ));
        }
        c.bump();
    }
    let raw = &c.src[start..c.pos];
    if raw.is_empty() {
        return Err(c.error("a value"));
    }
    Ok(match raw {
        "true" => Lit::Bool(true),
        "false" => Lit::Bool(false),
        _ => {
            if let Ok(n) = raw.parse::<f64>()
                && n.is_finite()
            {
                Lit::Num(n)
            } else if let Some(t) = parse_datetime(raw) {
                Lit::DateTime(t)
            } else {
                Lit::Str {
                    raw: raw.to_string(),
                    expanded: ctx.expand(raw).into_owned(),
                }
            }
        }
    })
}

/// Characters of an unquoted value: those of URIs (RFC 3986) and date-times,
/// less the ones the q grammar gives a meaning (`(`, `)`, `=`, `!`, `<`, `>`,
/// `~`, quotes) and `[`/`]`.
fn unquoted_value_char(ch: char) -> bool {
    ch.is_alphanumeric()
        || matches!(
            ch,
            '-' | '.' | '_' | ':' | '/' | '?' | '#' | '@' | '$' | '&' | '*' | '+' | '%'
        )
}

fn value(c: &mut Cursor, ctx: &Context, op: Op) -> NgsiResult<QValue> {
    let first = literal(c, ctx)?;
    if c.rest().starts_with("..") {
        if !matches!(op, Op::Eq | Op::Ne) {
            return Err(c.error("a single value: ranges go with == and != only"));
        }
        c.eat("..");
        let second = literal(c, ctx)?;
        return Ok(QValue::Range(first, second));
    }
    if c.peek() == Some(',') {
        if !matches!(op, Op::Eq | Op::Ne) {
            return Err(c.error("a single value: value lists go with == and != only"));
        }
        let mut items = vec![first];
        while c.eat(",") {
            items.push(literal(c, ctx)?);
        }
        return Ok(QValue::List(items));
    }
    Ok(QValue::One(first))
}

// ---------------------------------------------------------------------------
// Evaluation

/// The values a path reaches in an entity, with whether they are vocab IRIs.
fn targets<'a>(e: &'a Entity, path: &AttrPath, out: &mut Vec<Target<'a>>) {
    let Some(instances) = e.attrs.get(&path.attrs[0]) else {
        return;
    };
    for inst in instances {
        let mut attr = Some(inst);
        for sub in &path.attrs[1..] {
            attr = attr.and_then(|a| a.sub.get(sub));
        }
        if let Some(a) = attr {
            attribute_targets(a, path, out);
        }
    }
}

/// One value to compare against.
pub enum Target<'a> {
    /// A JSON value; `true` when it is a vocab IRI (compared with the expanded literal).
    Json(&'a Value, bool),
    /// A plain string member (`unitCode`, `datasetId`).
    Str(&'a str),
    /// A system or observation time.
    Time(i64),
}

fn attribute_targets<'a>(a: &'a Attribute, path: &AttrPath, out: &mut Vec<Target<'a>>) {
    if let Some(m) = path.member {
        match m {
            Member::ObservedAt => out.extend(a.observed_at.map(Target::Time)),
            Member::CreatedAt => out.push(Target::Time(a.created_at)),
            Member::ModifiedAt => out.push(Target::Time(a.modified_at)),
            Member::UnitCode => out.extend(a.unit_code.as_deref().map(Target::Str)),
            Member::DatasetId => out.extend(a.dataset_id.as_deref().map(Target::Str)),
        }
        return;
    }
    let vocab = a.kind == AttrKind::VocabProperty;
    let mut v = &a.value;
    for key in &path.compound {
        match v.get(key) {
            Some(inner) => v = inner,
            None => return,
        }
    }
    match a.kind {
        AttrKind::GeoProperty if path.compound.is_empty() => {}
        AttrKind::LanguageProperty if path.compound.is_empty() => {
            if let Value::Object(m) = v {
                for text in m.values() {
                    push_flat(text, false, out);
                }
            }
        }
        AttrKind::ListRelationship if path.compound.is_empty() => {
            if let Value::Array(items) = v {
                for item in items {
                    match item {
                        Value::Object(o) => {
                            if let Some(obj) = o.get("object") {
                                out.push(Target::Json(obj, false));
                            }
                        }
                        other => out.push(Target::Json(other, false)),
                    }
                }
            }
        }
        _ => push_flat(v, vocab, out),
    }
}

/// Arrays match when any element does.
fn push_flat<'a>(v: &'a Value, vocab: bool, out: &mut Vec<Target<'a>>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| out.push(Target::Json(i, vocab))),
        other => out.push(Target::Json(other, vocab)),
    }
}

fn compare(t: &Target, lit: &Lit) -> Option<Ordering> {
    match (t, lit) {
        (Target::Time(a), Lit::DateTime(b)) => Some(a.cmp(b)),
        (Target::Time(a), Lit::Str { raw, .. }) => parse_datetime(raw).map(|b| a.cmp(&b)),
        (Target::Time(_), _) => None,
        (Target::Str(s), Lit::Str { raw, .. }) => Some((*s).cmp(raw.as_str())),
        (Target::Str(_), _) => None,
        (Target::Json(Value::Number(n), _), Lit::Num(b)) => {
            n.as_f64().and_then(|a| a.partial_cmp(b))
        }
        (Target::Json(Value::Bool(a), _), Lit::Bool(b)) => (a == b).then_some(Ordering::Equal),
        (Target::Json(Value::String(s), _), Lit::DateTime(b)) => {
            parse_datetime(s).map(|a| a.cmp(b))
        }
        (Target::Json(Value::String(s), vocab), Lit::Str { raw, expanded }) => {
            Some(s.as_str().cmp(if *vocab { expanded } else { raw }))
        }
        _ => None,
    }
}

fn equals(t: &Target, lit: &Lit) -> bool {
    compare(t, lit) == Some(Ordering::Equal)
}

fn satisfies(t: &Target, op: Op, value: &QValue) -> bool {
    match (op, value) {
        (Op::Eq, QValue::One(l)) => equals(t, l),
        (Op::Eq, QValue::List(ls)) => ls.iter().any(|l| equals(t, l)),
        (Op::Eq, QValue::Range(lo, hi)) => in_range(t, lo, hi),
        (Op::Gt, QValue::One(l)) => compare(t, l) == Some(Ordering::Greater),
        (Op::Ge, QValue::One(l)) => {
            matches!(compare(t, l), Some(Ordering::Greater | Ordering::Equal))
        }
        (Op::Lt, QValue::One(l)) => compare(t, l) == Some(Ordering::Less),
        (Op::Le, QValue::One(l)) => matches!(compare(t, l), Some(Ordering::Less | Ordering::Equal)),
        (Op::Match, QValue::Pattern(r)) => match t {
            Target::Json(Value::String(s), _) => r.is_match(s),
            Target::Str(s) => r.is_match(s),
            _ => false,
        },
        _ => false,
    }
}

fn in_range(t: &Target, lo: &Lit, hi: &Lit) -> bool {
    matches!(compare(t, lo), Some(Ordering::Greater | Ordering::Equal))
        && matches!(compare(t, hi), Some(Ordering::Less | Ordering::Equal))
}

/// Whether `e` satisfies one term.
pub fn eval_term(e: &Entity, term: &QTerm) -> bool {
    let mut found = Vec::new();
    targets(e, &term.path, &mut found);
    let exists = !found.is_empty() || (term.cmp.is_none() && path_exists(e, &term.path));
    match &term.cmp {
        None => exists != term.negated,
        // "!=" and "!~=": the attribute exists and no value matches.
        Some((Op::Ne, v)) => exists && !found.iter().any(|t| satisfies(t, Op::Eq, v)),
        Some((Op::NotMatch, v)) => {
            exists
                && found
                    .iter()
                    .any(|t| matches!(t, Target::Json(Value::String(_), _) | Target::Str(_)))
                && !found.iter().any(|t| satisfies(t, Op::Match, v))
        }
        Some((op, v)) => found.iter().any(|t| satisfies(t, *op, v)),
    }
}

/// Existence of an attribute whose value yields no comparable target (a GeoProperty).
fn path_exists(e: &Entity, path: &AttrPath) -> bool {
    e.attrs.get(&path.attrs[0]).is_some_and(|inst| {
        inst.iter().any(|a| {
            let mut cur = Some(a);
            for sub in &path.attrs[1..] {
                cur = cur.and_then(|x| x.sub.get(sub));
            }
            cur.is_some() && path.compound.is_empty()
        })
    })
}

// ---------------------------------------------------------------------------
// Equality keys: for indexes that must find which terms an entity can satisfy.

fn num_key(n: f64) -> String {
    // 0.0 and -0.0 compare equal in queries: one key for both.
    let n = if n == 0.0 { 0.0 } else { n };
    format!("n:{}", n.to_bits())
}

fn target_key(t: &Target) -> Option<String> {
    match t {
        Target::Json(Value::Number(n), _) => n.as_f64().map(num_key),
        Target::Json(Value::String(s), _) => Some(format!("s:{s}")),
        Target::Str(s) => Some(format!("s:{s}")),
        Target::Json(Value::Bool(b), _) => Some(format!("b:{b}")),
        _ => None,
    }
}

/// The equality keys of an attribute's values, as `eval_term` would compare
/// them for a term naming the attribute alone (no sub-attribute, member or path).
pub fn value_keys(instances: &[Attribute], out: &mut Vec<String>) {
    let path = AttrPath {
        attrs: Vec::new(),
        member: None,
        compound: Vec::new(),
    };
    let mut targets = Vec::new();
    for a in instances {
        attribute_targets(a, &path, &mut targets);
    }
    out.extend(targets.iter().filter_map(target_key));
}

/// If `q` can only hold for entities whose attribute `name` equals one of some
/// scalar literals (a term `name==v` or `name==v1,v2` at its top level, alone or
/// in a conjunction), that attribute and the literals' equality keys.
pub fn equality_anchor(q: &QExpr) -> Option<(String, Vec<String>)> {
    let terms: Vec<&QTerm> = match q {
        BoolExpr::Leaf(t) => vec![t],
        BoolExpr::And(xs) => xs
            .iter()
            .filter_map(|x| match x {
                BoolExpr::Leaf(t) => Some(t),
                _ => None,
            })
            .collect(),
        BoolExpr::Or(_) => return None,
    };
    'terms: for t in terms {
        if t.negated
            || t.path.attrs.len() != 1
            || t.path.member.is_some()
            || !t.path.compound.is_empty()
        {
            continue;
        }
        let lits: Vec<&Lit> = match &t.cmp {
            Some((Op::Eq, QValue::One(l))) => vec![l],
            Some((Op::Eq, QValue::List(ls))) => ls.iter().collect(),
            _ => continue,
        };
        let mut keys = Vec::new();
        for l in lits {
            match l {
                Lit::Num(n) => keys.push(num_key(*n)),
                Lit::Bool(b) => keys.push(format!("b:{b}")),
                Lit::Str { raw, expanded } => {
                    keys.push(format!("s:{raw}"));
                    if expanded != raw {
                        keys.push(format!("s:{expanded}"));
                    }
                }
                // Date-times compare across formats: no single key.
                Lit::DateTime(_) => continue 'terms,
            }
        }
        return Some((t.path.attrs[0].clone(), keys));
    }
    None
}

/// Whether `e` satisfies `q`.
pub fn eval_q(e: &Entity, q: &QExpr) -> bool {
    q.eval(&mut |t| eval_term(e, t))
}
