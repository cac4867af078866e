//! The projection parameters `pick` and `omit` (clause 4.21): a
//! comma-separated list of entity members (`id`, `type`, `scope` or attribute
//! names), where an attribute may carry a nested list in braces naming its
//! sub-attributes: `pick=id,temperature{accuracy},location`.

use super::expr::Cursor;
use crate::error::{NgsiError, NgsiResult};

/// Longest `pick`/`omit` value accepted.
const MAX_LEN: usize = 4096;
/// Deepest nesting of braces.
const MAX_DEPTH: usize = 4;

/// One member of a projection, with the members of its own it projects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Projected {
    pub name: String,
    pub nested: Vec<Projected>,
}

/// Parses a `pick` or `omit` value; `what` names the parameter in errors,
/// which give the position of the first character that does not fit.
pub fn parse_projection(src: &str, what: &'static str) -> NgsiResult<Vec<Projected>> {
    if src.len() > MAX_LEN {
        return Err(NgsiError::bad_data(format!(
            "{what} is longer than {MAX_LEN} characters"
        )));
    }
    let mut c = Cursor::new(src, what);
    let list = members(&mut c, 0)?;
    if !c.at_end() {
        return Err(c.error("',' or the end"));
    }
    Ok(list)
}

fn members(c: &mut Cursor, depth: usize) -> NgsiResult<Vec<Projected>> {
    let mut out = vec![member(c, depth)?];
    while c.eat(",") {
        out.push(member(c, depth)?);
    }
    Ok(out)
}

fn member(c: &mut Cursor, depth: usize) -> NgsiResult<Projected> {
    let start = c.pos;
    while c
        .peek()
        .is_some_and(|ch| !matches!(ch, ',' | '{' | '}') && name_char(ch))
    {
        c.bump();
    }
    if c.pos == start {
        return Err(c.error("a member name"));
    }
    let name = c.src[start..c.pos].to_string();
    crate::validate::check_name(c.what(), &name)?;
    let mut nested = Vec::new();
    if c.eat("{") {
        if depth + 1 >= MAX_DEPTH {
            return Err(NgsiError::bad_data(format!(
                "{} nests braces deeper than {MAX_DEPTH}",
                c.what()
            )));
        }
        nested = members(c, depth + 1)?;
        if !c.eat("}") {
            return Err(c.error("'}'"));
        }
    }
    Ok(Projected { name, nested })
}

/// Characters of a member name: those of attribute names and CURIEs.
fn name_char(ch: char) -> bool {
    ch.is_alphanumeric() || matches!(ch, '_' | '-' | '.' | ':' | '/' | '#' | '@' | '~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[Projected]) -> Vec<&str> {
        list.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn lists_and_nested_members() {
        let p = parse_projection("id,temperature{accuracy,source},location", "pick").unwrap();
        assert_eq!(names(&p), ["id", "temperature", "location"]);
        assert_eq!(names(&p[1].nested), ["accuracy", "source"]);
        assert!(p[0].nested.is_empty());
        let p = parse_projection("schema:name", "pick").unwrap();
        assert_eq!(names(&p), ["schema:name"]);
    }

    #[test]
    fn syntax_errors_name_the_position() {
        for (src, pos, expected) in [
            ("id;name", 3, "',' or the end"),
            ("a{b", 4, "'}'"),
            ("a{}", 3, "a member name"),
            ("a,,b", 3, "a member name"),
            ("", 1, "a member name"),
            ("a}", 2, "',' or the end"),
            ("a{b}}", 5, "',' or the end"),
            ("a b", 2, "',' or the end"),
        ] {
            let e = parse_projection(src, "pick").unwrap_err();
            assert!(
                e.detail.contains(&format!("position {pos}")) && e.detail.contains(expected),
                "{src}: {}",
                e.detail
            );
        }
        assert!(parse_projection("a{b{c{d{e}}}}", "pick").is_err());
    }
}
