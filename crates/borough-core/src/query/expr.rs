//! Boolean expressions with `;` (AND), `|` or `,` (OR) and parentheses, shared by
//! the query language (`q`), type expressions (`type`) and scope queries (`scopeQ`).

use crate::error::{NgsiError, NgsiResult};

/// Deepest nesting of parentheses accepted in any expression.
pub const MAX_DEPTH: usize = 16;
/// Most leaves (terms) accepted in one expression.
pub const MAX_TERMS: usize = 256;

/// AND binds tighter than OR, as usual.
#[derive(Clone, Debug, PartialEq)]
pub enum BoolExpr<T> {
    And(Vec<BoolExpr<T>>),
    Or(Vec<BoolExpr<T>>),
    Leaf(T),
}

impl<T> BoolExpr<T> {
    /// Evaluates with `leaf` deciding each term, short-circuiting.
    pub fn eval(&self, leaf: &mut impl FnMut(&T) -> bool) -> bool {
        match self {
            Self::And(xs) => xs.iter().all(|x| x.eval(leaf)),
            Self::Or(xs) => xs.iter().any(|x| x.eval(leaf)),
            Self::Leaf(t) => leaf(t),
        }
    }

    /// Every leaf, in order.
    pub fn leaves(&self) -> Vec<&T> {
        let mut out = Vec::new();
        self.collect_leaves(&mut out);
        out
    }

    fn collect_leaves<'a>(&'a self, out: &mut Vec<&'a T>) {
        match self {
            Self::And(xs) | Self::Or(xs) => xs.iter().for_each(|x| x.collect_leaves(out)),
            Self::Leaf(t) => out.push(t),
        }
    }
}

/// A cursor over an expression's text that reports positions in errors.
pub struct Cursor<'a> {
    pub src: &'a str,
    pub pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub fn new(src: &'a str, what: &'static str) -> Self {
        Self { src, pos: 0, what }
    }

    /// What is being parsed (`q`, `pick`, …), for messages.
    pub fn what(&self) -> &'static str {
        self.what
    }

    pub fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    pub fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    pub fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }

    pub fn eat(&mut self, s: &str) -> bool {
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    pub fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// An error naming the position (1-based, in characters) and what was expected.
    pub fn error(&self, expected: &str) -> NgsiError {
        let position = self.src[..self.pos.min(self.src.len())].chars().count() + 1;
        let found = match self.peek() {
            Some(c) => format!("'{c}'"),
            None => "the end".to_string(),
        };
        NgsiError::bad_data(format!(
            "invalid {} at position {position}: expected {expected}, found {found}",
            self.what
        ))
    }
}

/// Parses `src` as a boolean expression whose leaves `leaf` reads. `or` lists
/// the characters that mean OR (`|`, and `,` where the grammar allows it).
pub fn parse<T>(
    src: &str,
    what: &'static str,
    or: &[char],
    leaf: &mut impl FnMut(&mut Cursor) -> NgsiResult<T>,
) -> NgsiResult<BoolExpr<T>> {
    let mut c = Cursor::new(src, what);
    let mut terms = 0;
    let e = parse_or(&mut c, or, leaf, 0, &mut terms)?;
    if !c.at_end() {
        return Err(c.error("';', '|' or the end"));
    }
    Ok(e)
}

fn parse_or<T>(
    c: &mut Cursor,
    or: &[char],
    leaf: &mut impl FnMut(&mut Cursor) -> NgsiResult<T>,
    depth: usize,
    terms: &mut usize,
) -> NgsiResult<BoolExpr<T>> {
    let mut items = vec![parse_and(c, or, leaf, depth, terms)?];
    while c.peek().is_some_and(|ch| or.contains(&ch)) {
        c.bump();
        items.push(parse_and(c, or, leaf, depth, terms)?);
    }
    Ok(if items.len() == 1 {
        items.pop().unwrap_or(BoolExpr::Or(Vec::new()))
    } else {
        BoolExpr::Or(items)
    })
}

fn parse_and<T>(
    c: &mut Cursor,
    or: &[char],
    leaf: &mut impl FnMut(&mut Cursor) -> NgsiResult<T>,
    depth: usize,
    terms: &mut usize,
) -> NgsiResult<BoolExpr<T>> {
    let mut items = vec![parse_primary(c, or, leaf, depth, terms)?];
    while c.eat(";") {
        items.push(parse_primary(c, or, leaf, depth, terms)?);
    }
    Ok(if items.len() == 1 {
        items.pop().unwrap_or(BoolExpr::And(Vec::new()))
    } else {
        BoolExpr::And(items)
    })
}

fn parse_primary<T>(
    c: &mut Cursor,
    or: &[char],
    leaf: &mut impl FnMut(&mut Cursor) -> NgsiResult<T>,
    depth: usize,
    terms: &mut usize,
) -> NgsiResult<BoolExpr<T>> {
    if c.eat("(") {
        if depth + 1 > MAX_DEPTH {
            return Err(NgsiError::bad_data(format!(
                "the {} nests parentheses deeper than {MAX_DEPTH} levels",
                c.what
            )));
        }
        let inner = parse_or(c, or, leaf, depth + 1, terms)?;
        if !c.eat(")") {
            return Err(c.error("')'"));
        }
        return Ok(inner);
    }
    *terms += 1;
    if *terms > MAX_TERMS {
        return Err(NgsiError::bad_data(format!(
            "the {} has more than {MAX_TERMS} terms",
            c.what
        )));
    }
    Ok(BoolExpr::Leaf(leaf(c)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(c: &mut Cursor) -> NgsiResult<String> {
        let start = c.pos;
        while c.peek().is_some_and(|ch| ch.is_ascii_alphanumeric()) {
            c.bump();
        }
        if c.pos == start {
            return Err(c.error("a name"));
        }
        Ok(c.src[start..c.pos].to_string())
    }

    #[test]
    fn precedence_and_parentheses() {
        let e = parse("a;b|c", "test", &['|'], &mut word).unwrap();
        let l = |s: &str| BoolExpr::Leaf(s.to_string());
        assert_eq!(
            e,
            BoolExpr::Or(vec![BoolExpr::And(vec![l("a"), l("b")]), l("c")])
        );
        let e = parse("a;(b|c)", "test", &['|'], &mut word).unwrap();
        assert_eq!(
            e,
            BoolExpr::And(vec![l("a"), BoolExpr::Or(vec![l("b"), l("c")])])
        );
        let e = parse("a,b", "test", &['|', ','], &mut word).unwrap();
        assert_eq!(e, BoolExpr::Or(vec![l("a"), l("b")]));
    }

    #[test]
    fn errors_name_position_and_expectation() {
        let e = parse("a;(b", "test", &['|'], &mut word).unwrap_err();
        assert!(e.detail.contains("position 5"), "{}", e.detail);
        assert!(e.detail.contains("')'"), "{}", e.detail);
        let e = parse("a;;b", "test", &['|'], &mut word).unwrap_err();
        assert!(e.detail.contains("position 3"), "{}", e.detail);
        let deep = format!("{}a{}", "(".repeat(20), ")".repeat(20));
        assert!(
            parse(&deep, "test", &['|'], &mut word)
                .unwrap_err()
                .detail
                .contains("deeper")
        );
    }
}
