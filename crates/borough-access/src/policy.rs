//! What each route needs, in one table. The HTTP layer looks a request up by
//! its method and route template; a route missing from the table is refused
//! to everyone (fail closed), so a new route cannot be reached before it has
//! a policy, and the access matrix test walks this table.

use crate::model::Permission;

/// What a route needs from its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Anyone: health, the dashboard's page and its login.
    Public,
    /// A device's own token, checked by the route itself.
    DeviceToken,
    /// Any authenticated principal.
    Authenticated,
    /// A permission in the request's tenant.
    Permission(Permission),
}

/// Where a route's tenant comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantFrom {
    /// The `NGSILD-Tenant` header (absent: the default tenant).
    Header,
    /// A URL query parameter (the dashboard's `tenant=`).
    Query(&'static str),
    /// The route concerns no single tenant (the operator's routes).
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutePolicy {
    pub method: &'static str,
    pub route: &'static str,
    pub need: Need,
    pub tenant: TenantFrom,
}

const fn p(
    method: &'static str,
    route: &'static str,
    need: Need,
    tenant: TenantFrom,
) -> RoutePolicy {
    RoutePolicy {
        method,
        route,
        need,
        tenant,
    }
}

use Need::{Authenticated, DeviceToken, Public};
use Permission::{Admin, Devices, Operator, Read, Write};
use TenantFrom::{Header, None as NoTenant, Query};

const READ: Need = Need::Permission(Read);
const WRITE: Need = Need::Permission(Write);
const ADMIN: Need = Need::Permission(Admin);
const DEVICES: Need = Need::Permission(Devices);
const OPERATOR: Need = Need::Permission(Operator);

const NGSI: &str = "/ngsi-ld/v1";

/// Every route of the binary and what it needs.
pub const POLICIES: &[RoutePolicy] = &[
    // Open to anyone.
    p("GET", "/health", Public, NoTenant),
    p("GET", "/", Public, NoTenant),
    p("GET", "/dashboard/{*path}", Public, NoTenant),
    p("GET", "/dashboard/api/config", Public, NoTenant),
    p("POST", "/dashboard/api/login", Public, NoTenant),
    p("POST", "/dashboard/api/logout", Public, NoTenant),
    p("GET", "/bench/static", Public, NoTenant),
    // The operator's.
    p("GET", "/metrics", OPERATOR, NoTenant),
    p("GET", "/api/v1/tenants", OPERATOR, NoTenant),
    p("POST", "/api/v1/tenants", OPERATOR, NoTenant),
    p("GET", "/api/v1/tenants/{name}", OPERATOR, NoTenant),
    p("PATCH", "/api/v1/tenants/{name}", OPERATOR, NoTenant),
    p("DELETE", "/api/v1/tenants/{name}", OPERATOR, NoTenant),
    p("GET", "/api/v1/audit/verify", OPERATOR, NoTenant),
    // Whoever is signed in.
    p("GET", "/api/v1/me", Authenticated, NoTenant),
    p("GET", "/dashboard/api/tenants", Authenticated, NoTenant),
    // A tenant's administration.
    p("GET", "/api/v1/keys", ADMIN, Header),
    p("POST", "/api/v1/keys", ADMIN, Header),
    p("GET", "/api/v1/keys/{id}", ADMIN, Header),
    p("DELETE", "/api/v1/keys/{id}", ADMIN, Header),
    p("POST", "/api/v1/keys/{id}/rotate", ADMIN, Header),
    p("GET", "/api/v1/audit", ADMIN, Header),
    p("GET", "/api/v1/history/retention", READ, Header),
    p("PUT", "/api/v1/history/retention", ADMIN, Header),
    p("POST", "/api/v1/history/import", WRITE, Header),
    // Devices.
    p("GET", "/api/v1/devices", READ, Header),
    p("POST", "/api/v1/devices", DEVICES, Header),
    p("POST", "/api/v1/devices/import", DEVICES, Header),
    p("GET", "/api/v1/devices/{id}", READ, Header),
    p("PATCH", "/api/v1/devices/{id}", DEVICES, Header),
    p("DELETE", "/api/v1/devices/{id}", DEVICES, Header),
    p("POST", "/api/v1/devices/{id}/token", DEVICES, Header),
    p("POST", "/api/v1/devices/{id}/commands", DEVICES, Header),
    p("GET", "/api/v1/devices/{id}/commands", READ, Header),
    p("GET", "/api/v1/devices/{id}/commands/{cmd}", READ, Header),
    p("POST", "/api/v1/devices/{id}/measures", DeviceToken, Header),
    p(
        "GET",
        "/api/v1/devices/{id}/commands/pending",
        DeviceToken,
        Header,
    ),
    p(
        "POST",
        "/api/v1/devices/{id}/commands/{cmd}/ack",
        DeviceToken,
        Header,
    ),
    // The dashboard's data.
    p("GET", "/dashboard/api/summary", READ, Query("tenant")),
    p("GET", "/dashboard/api/clusters", READ, Query("tenant")),
    p("GET", "/dashboard/api/alerts", READ, Query("tenant")),
    p("GET", "/dashboard/api/events", READ, Query("tenant")),
    // NGSI-LD.
    p("GET", "/ngsi-ld/v1/entities", READ, Header),
    p("POST", "/ngsi-ld/v1/entities", WRITE, Header),
    p("DELETE", "/ngsi-ld/v1/entities", WRITE, Header),
    p("GET", "/ngsi-ld/v1/entities/{id}", READ, Header),
    p("PUT", "/ngsi-ld/v1/entities/{id}", WRITE, Header),
    p("PATCH", "/ngsi-ld/v1/entities/{id}", WRITE, Header),
    p("DELETE", "/ngsi-ld/v1/entities/{id}", WRITE, Header),
    p("POST", "/ngsi-ld/v1/entities/{id}/attrs", WRITE, Header),
    p("PATCH", "/ngsi-ld/v1/entities/{id}/attrs", WRITE, Header),
    p(
        "PATCH",
        "/ngsi-ld/v1/entities/{id}/attrs/{attr}",
        WRITE,
        Header,
    ),
    p(
        "PUT",
        "/ngsi-ld/v1/entities/{id}/attrs/{attr}",
        WRITE,
        Header,
    ),
    p(
        "DELETE",
        "/ngsi-ld/v1/entities/{id}/attrs/{attr}",
        WRITE,
        Header,
    ),
    p("POST", "/ngsi-ld/v1/entityOperations/create", WRITE, Header),
    p("POST", "/ngsi-ld/v1/entityOperations/upsert", WRITE, Header),
    p("POST", "/ngsi-ld/v1/entityOperations/update", WRITE, Header),
    p("POST", "/ngsi-ld/v1/entityOperations/delete", WRITE, Header),
    p("POST", "/ngsi-ld/v1/entityOperations/merge", WRITE, Header),
    p("POST", "/ngsi-ld/v1/entityOperations/query", READ, Header),
    p("GET", "/ngsi-ld/v1/types", READ, Header),
    p("GET", "/ngsi-ld/v1/types/{type}", READ, Header),
    p("GET", "/ngsi-ld/v1/attributes", READ, Header),
    p("GET", "/ngsi-ld/v1/attributes/{attr}", READ, Header),
    p("GET", "/ngsi-ld/v1/subscriptions", READ, Header),
    p("POST", "/ngsi-ld/v1/subscriptions", WRITE, Header),
    p("GET", "/ngsi-ld/v1/subscriptions/{id}", READ, Header),
    p("PATCH", "/ngsi-ld/v1/subscriptions/{id}", WRITE, Header),
    p("DELETE", "/ngsi-ld/v1/subscriptions/{id}", WRITE, Header),
    p(
        "GET",
        "/ngsi-ld/v1/subscriptions/{id}/deadLetters",
        READ,
        Header,
    ),
    // Context sources: a registration makes the broker call out, but only to
    // the hosts the operator allows (--allow-outbound).
    p("GET", "/ngsi-ld/v1/info/sourceIdentity", READ, Header),
    p("GET", "/ngsi-ld/v1/csourceRegistrations", READ, Header),
    p("POST", "/ngsi-ld/v1/csourceRegistrations", WRITE, Header),
    p("GET", "/ngsi-ld/v1/csourceRegistrations/{id}", READ, Header),
    p(
        "PATCH",
        "/ngsi-ld/v1/csourceRegistrations/{id}",
        WRITE,
        Header,
    ),
    p(
        "DELETE",
        "/ngsi-ld/v1/csourceRegistrations/{id}",
        WRITE,
        Header,
    ),
    p("GET", "/ngsi-ld/v1/csourceSubscriptions", READ, Header),
    p("POST", "/ngsi-ld/v1/csourceSubscriptions", WRITE, Header),
    p("GET", "/ngsi-ld/v1/csourceSubscriptions/{id}", READ, Header),
    p(
        "PATCH",
        "/ngsi-ld/v1/csourceSubscriptions/{id}",
        WRITE,
        Header,
    ),
    p(
        "DELETE",
        "/ngsi-ld/v1/csourceSubscriptions/{id}",
        WRITE,
        Header,
    ),
    p("GET", "/ngsi-ld/v1/temporal/entities", READ, Header),
    p("POST", "/ngsi-ld/v1/temporal/entities", WRITE, Header),
    p("GET", "/ngsi-ld/v1/temporal/entities/{id}", READ, Header),
    p(
        "DELETE",
        "/ngsi-ld/v1/temporal/entities/{id}",
        WRITE,
        Header,
    ),
    p(
        "POST",
        "/ngsi-ld/v1/temporal/entities/{id}/attrs",
        WRITE,
        Header,
    ),
    p(
        "DELETE",
        "/ngsi-ld/v1/temporal/entities/{id}/attrs/{attr}",
        WRITE,
        Header,
    ),
    p(
        "PATCH",
        "/ngsi-ld/v1/temporal/entities/{id}/attrs/{attr}/{instance}",
        WRITE,
        Header,
    ),
    p(
        "DELETE",
        "/ngsi-ld/v1/temporal/entities/{id}/attrs/{attr}/{instance}",
        WRITE,
        Header,
    ),
    p(
        "POST",
        "/ngsi-ld/v1/temporal/entityOperations/query",
        READ,
        Header,
    ),
    p("GET", "/ngsi-ld/v1/jsonldContexts", READ, Header),
    p("POST", "/ngsi-ld/v1/jsonldContexts", WRITE, Header),
    p("GET", "/ngsi-ld/v1/jsonldContexts/{id}", READ, Header),
    p("DELETE", "/ngsi-ld/v1/jsonldContexts/{id}", WRITE, Header),
];

/// The policy of a route, by method and route template (`HEAD` is `GET`'s).
pub fn lookup(method: &str, route: &str) -> Option<&'static RoutePolicy> {
    let method = if method == "HEAD" { "GET" } else { method };
    POLICIES
        .iter()
        .find(|p| p.method == method && p.route == route)
}

/// Whether a route template is one of NGSI-LD's (problem details and tenant
/// errors follow the NGSI-LD conventions there).
pub fn is_ngsi_ld(route: &str) -> bool {
    route.starts_with(NGSI)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_listed_once() {
        for (i, a) in POLICIES.iter().enumerate() {
            for b in &POLICIES[i + 1..] {
                assert!(
                    !(a.method == b.method && a.route == b.route),
                    "{} {} is listed twice",
                    a.method,
                    a.route
                );
            }
        }
        assert_eq!(lookup("HEAD", "/health").map(|p| p.need), Some(Public));
        assert_eq!(lookup("GET", "/nowhere"), None);
    }
}
