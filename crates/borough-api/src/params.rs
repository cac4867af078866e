//! The URL parameters each NGSI-LD operation takes. A parameter that the
//! operation does not define is an `InvalidRequest` (clause 6.3.3), named in
//! the answer, rather than silently ignored: a misspelt `tpye=` or `qq=` must
//! not widen a query or a purge.

use crate::problem::ApiError;
use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use borough_core::NgsiError;

/// Parameters of every operation: `local=true` asks for local data only,
/// which is all a broker without context sources has.
const EVERYWHERE: &[&str] = &["local"];

const GEO: &[&str] = &["georel", "geometry", "coordinates", "geoproperty"];
const SELECT: &[&str] = &["id", "type", "idPattern", "q", "scopeQ", "csf"];
const PROJECT: &[&str] = &[
    "attrs",
    "pick",
    "omit",
    "lang",
    "options",
    "format",
    "geometryProperty",
    "datasetId",
    "join",
    "joinLevel",
];
const PAGE: &[&str] = &["limit", "offset", "count"];
const TEMPORAL: &[&str] = &[
    "timerel",
    "timeAt",
    "endTimeAt",
    "timeproperty",
    "lastN",
    "aggrMethods",
    "aggrPeriodDuration",
];

/// The parameters `method` takes on `route` (a route template under
/// `/ngsi-ld/v1`), as groups; `None` for routes this table does not cover.
pub fn allowed(method: &Method, route: &str) -> Option<Vec<&'static [&'static str]>> {
    let m = method.as_str();
    let groups: Vec<&'static [&'static str]> = match (m, route) {
        ("GET", "/entities") => vec![SELECT, GEO, PROJECT, PAGE],
        ("POST", "/entities") => vec![],
        ("DELETE", "/entities") => vec![SELECT, GEO],
        ("GET", "/entities/{id}") => vec![&["type"], PROJECT],
        ("PUT" | "PATCH" | "DELETE", "/entities/{id}") => vec![&["type"]],
        ("POST", "/entities/{id}/attrs") => vec![&["type", "options"]],
        ("PATCH", "/entities/{id}/attrs") => vec![&["type"]],
        ("PATCH" | "PUT", "/entities/{id}/attrs/{attr}") => vec![&["type"]],
        ("DELETE", "/entities/{id}/attrs/{attr}") => {
            vec![&["type", "datasetId", "deleteAll", "lang"]]
        }
        ("POST", "/entityOperations/query") => vec![PAGE, PROJECT],
        ("POST", r) if r.starts_with("/entityOperations/") => vec![&["options"]],
        // ngsijs sends its paging defaults (limit=20&offset=0) with every
        // listTypes call; the lists are short and answered whole.
        ("GET", "/types" | "/attributes") => vec![&["details"], PAGE],
        ("GET", "/types/{type}" | "/attributes/{attr}") => vec![],
        ("GET", "/subscriptions") => vec![PAGE],
        (_, "/subscriptions" | "/subscriptions/{id}" | "/subscriptions/{id}/deadLetters") => {
            vec![]
        }
        ("GET", "/temporal/entities") => vec![SELECT, GEO, PROJECT, PAGE, TEMPORAL],
        ("POST", "/temporal/entityOperations/query") => vec![PAGE, PROJECT, TEMPORAL],
        ("GET", "/temporal/entities/{id}") => vec![&["type"], PROJECT, TEMPORAL],
        ("POST", "/temporal/entities") => vec![],
        ("DELETE", "/temporal/entities/{id}") => vec![&["type"]],
        ("POST", "/temporal/entities/{id}/attrs") => vec![],
        ("DELETE", "/temporal/entities/{id}/attrs/{attr}") => {
            vec![&["datasetId", "deleteAll"]]
        }
        (_, "/temporal/entities/{id}/attrs/{attr}/{instance}") => vec![],
        ("GET", "/csourceRegistrations") => vec![
            &[
                "id",
                "type",
                "idPattern",
                "attrs",
                "q",
                "csf",
                "options",
                "lang",
                "scopeQ",
            ],
            GEO,
            PAGE,
            &["timerel", "timeAt", "endTimeAt", "timeproperty"],
        ],
        ("GET", "/csourceRegistrations/{id}") => vec![&["options"]],
        ("GET", "/csourceSubscriptions") => vec![PAGE, &["options"]],
        ("GET", "/csourceSubscriptions/{id}") => vec![&["options"]],
        (_, "/csourceRegistrations" | "/csourceRegistrations/{id}") => vec![],
        (_, "/csourceSubscriptions" | "/csourceSubscriptions/{id}") => vec![],
        ("GET", "/info/sourceIdentity") => vec![],
        ("GET", "/jsonldContexts") => vec![&["details", "kind"]],
        ("POST", "/jsonldContexts") => vec![],
        ("GET", "/jsonldContexts/{id}") => vec![&["details"]],
        ("DELETE", "/jsonldContexts/{id}") => vec![&["reload"]],
        _ => return None,
    };
    Some(groups)
}

/// Rejects a request whose URL names a parameter its operation does not take.
pub async fn reject_unknown(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().trim_start_matches("/ngsi-ld/v1").to_string());
    if let (Some(route), Some(query)) = (route, request.uri().query())
        && let Some(groups) = allowed(request.method(), &route)
        && let Some(unknown) = first_unknown(query, &groups)
    {
        let mut known: Vec<&str> = groups.iter().flat_map(|g| g.iter().copied()).collect();
        known.extend(EVERYWHERE);
        return ApiError(NgsiError::invalid(format!(
            "unknown query parameter '{unknown}' for {} {route}; it takes: {}",
            request.method(),
            known.join(", ")
        )))
        .into_response();
    }
    next.run(request).await
}

/// The first parameter name of `query` in none of `groups`.
fn first_unknown(query: &str, groups: &[&[&str]]) -> Option<String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map_or(p, |(k, _)| k))
        .map(|k| {
            percent_encoding::percent_decode_str(k)
                .decode_utf8_lossy()
                .into_owned()
        })
        .find(|k| {
            !EVERYWHERE.contains(&k.as_str()) && !groups.iter().any(|g| g.contains(&k.as_str()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_parameters_are_found_by_name() {
        let g = allowed(&Method::GET, "/entities").unwrap();
        assert_eq!(first_unknown("type=A&q=x%3D%3D1&limit=5", &g), None);
        assert_eq!(first_unknown("type=A&local=true", &g), None);
        assert_eq!(first_unknown("tpye=A", &g).as_deref(), Some("tpye"));
        assert_eq!(first_unknown("type=A&%71%71=1", &g).as_deref(), Some("qq"));
        let g = allowed(&Method::POST, "/entities").unwrap();
        assert_eq!(first_unknown("type=A", &g).as_deref(), Some("type"));
        let g = allowed(&Method::GET, "/types").unwrap();
        assert_eq!(first_unknown("details=true&limit=20&offset=0", &g), None);
        assert_eq!(first_unknown("q=a", &g).as_deref(), Some("q"));
    }
}
