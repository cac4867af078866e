//! Who may do what: roles, the permissions they grant, tenants with their
//! quotas, API keys, and the principal a request is made by.

use serde::{Deserialize, Serialize};

/// A role given to an API key or carried by a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The platform's administrator: every tenant, the tenants themselves, metrics.
    OperatorAdmin,
    /// A tenant's administrator: its data, devices, keys, retention and audit log.
    TenantAdmin,
    /// Reads and writes a tenant's data (entities, subscriptions, contexts, history).
    Editor,
    /// Reads a tenant's data.
    Viewer,
    /// Registers a tenant's devices and commands them; reads its data.
    DeviceManager,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Self::OperatorAdmin,
        Self::TenantAdmin,
        Self::Editor,
        Self::Viewer,
        Self::DeviceManager,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::OperatorAdmin => "operator-admin",
            Self::TenantAdmin => "tenant-admin",
            Self::Editor => "editor",
            Self::Viewer => "viewer",
            Self::DeviceManager => "device-manager",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }

    /// Whether this role grants `p` (within the tenants the holder may use).
    pub fn grants(self, p: Permission) -> bool {
        use Permission::*;
        match self {
            Self::OperatorAdmin => true,
            Self::TenantAdmin => matches!(p, Read | Write | Admin | Devices),
            Self::Editor => matches!(p, Read | Write),
            Self::Viewer => matches!(p, Read),
            Self::DeviceManager => matches!(p, Read | Devices),
        }
    }
}

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Permission {
    /// Read a tenant's data.
    Read,
    /// Change a tenant's data.
    Write,
    /// Administer a tenant: keys, retention, its audit log.
    Admin,
    /// Manage a tenant's devices and command them.
    Devices,
    /// The platform itself: tenants, metrics, the whole audit log.
    Operator,
}

/// Limits of a tenant; `None` is no limit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quotas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entities: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_devices: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_subscriptions: Option<u64>,
    /// API requests per second (bursts of twice as many).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Device messages per second, all the tenant's devices together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_second: Option<f64>,
    /// Largest request body, below the server's own limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    Active,
    Suspended,
}

/// A tenant of the operator: a service provider of a city.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tenant {
    /// The name clients give in `NGSILD-Tenant`; `default` is the default tenant.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contacts: Vec<Contact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(default)]
    pub quotas: Quotas,
    pub status: TenantStatus,
    /// While suspended, whether reads are still answered (writes never are).
    #[serde(default)]
    pub reads_while_suspended: bool,
    pub created_at: i64,
    pub modified_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// An API key as stored: its secret only as a SHA-256.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    pub id: String,
    /// The tenant the key works in; `None` for operator keys.
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub roles: Vec<Role>,
    /// When set, the key sees and changes only entities of these types (expanded IRIs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_types: Option<Vec<String>>,
    pub secret_hash: String,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

impl ApiKey {
    /// Whether the key may be used at `now` (microseconds).
    pub fn usable(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// The tenants a principal may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantScope {
    /// Every tenant (the operator, or no access control at all).
    All,
    /// These tenants (internal names: the default tenant is "").
    Only(Vec<String>),
}

/// How a principal proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Access control is off (`borough demo`, `--auth off`).
    Open,
    ApiKey {
        id: String,
    },
    Token {
        issuer: String,
    },
    Session {
        key_id: String,
    },
}

/// The caller of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// A name for logs and the audit log: the key id or the token's subject.
    pub subject: String,
    pub credential: Credential,
    pub tenants: TenantScope,
    pub roles: Vec<Role>,
    /// Entity types (expanded) the principal is limited to, if any.
    pub entity_types: Option<Vec<String>>,
}

/// Why a principal may not do something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// The principal may not use this tenant at all.
    Tenant,
    /// Its roles do not grant the permission.
    Role,
}

impl Principal {
    /// Everything, for a server without access control.
    pub fn open() -> Self {
        Self {
            subject: "anonymous".into(),
            credential: Credential::Open,
            tenants: TenantScope::All,
            roles: vec![Role::OperatorAdmin],
            entity_types: None,
        }
    }

    pub fn is_operator(&self) -> bool {
        self.roles.contains(&Role::OperatorAdmin)
    }

    pub fn may_use_tenant(&self, tenant: &str) -> bool {
        match &self.tenants {
            TenantScope::All => true,
            TenantScope::Only(list) => list.iter().any(|t| t == tenant),
        }
    }

    /// Whether the principal may do what needs `p` in `tenant`.
    pub fn check(&self, p: Permission, tenant: &str) -> Result<(), Denial> {
        if self.is_operator() {
            return Ok(());
        }
        if p == Permission::Operator {
            return Err(Denial::Role);
        }
        if !self.may_use_tenant(tenant) {
            return Err(Denial::Tenant);
        }
        if self.roles.iter().any(|r| r.grants(p)) {
            Ok(())
        } else {
            Err(Denial::Role)
        }
    }

    /// Whether the principal may see or change an entity of these types.
    pub fn may_touch_types(&self, types: &[String]) -> bool {
        match &self.entity_types {
            None => true,
            Some(allowed) => types.iter().any(|t| allowed.contains(t)),
        }
    }
}

/// Whether `name` can name a tenant: 1 to 64 ASCII letters, digits, `_` or `-`.
pub fn is_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The internal name of a tenant given by a client: `default` (or no name)
/// is the default tenant, stored under "".
pub fn internal_tenant(name: &str) -> &str {
    if name == "default" { "" } else { name }
}

/// The name of a tenant as clients see it.
pub fn public_tenant(internal: &str) -> &str {
    if internal.is_empty() {
        "default"
    } else {
        internal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_principal(tenant: &str, roles: &[Role]) -> Principal {
        Principal {
            subject: "k".into(),
            credential: Credential::ApiKey { id: "k".into() },
            tenants: TenantScope::Only(vec![tenant.into()]),
            roles: roles.to_vec(),
            entity_types: None,
        }
    }

    #[test]
    fn roles_grant_what_their_names_say() {
        use Permission::*;
        let table = [
            (Role::TenantAdmin, [true, true, true, true, false]),
            (Role::Editor, [true, true, false, false, false]),
            (Role::Viewer, [true, false, false, false, false]),
            (Role::DeviceManager, [true, false, false, true, false]),
            (Role::OperatorAdmin, [true, true, true, true, true]),
        ];
        for (role, expected) in table {
            let got: Vec<bool> = [Read, Write, Admin, Devices, Operator]
                .into_iter()
                .map(|p| role.grants(p))
                .collect();
            assert_eq!(got, expected, "{role:?}");
        }
    }

    #[test]
    fn a_principal_is_held_to_its_tenants() {
        let p = key_principal("city", &[Role::Editor]);
        assert_eq!(p.check(Permission::Write, "city"), Ok(()));
        assert_eq!(p.check(Permission::Write, "other"), Err(Denial::Tenant));
        assert_eq!(p.check(Permission::Admin, "city"), Err(Denial::Role));
        assert_eq!(p.check(Permission::Operator, "city"), Err(Denial::Role));
        let op = key_principal("city", &[Role::OperatorAdmin]);
        assert_eq!(op.check(Permission::Operator, "anything"), Ok(()));
        assert_eq!(Role::parse("device-manager"), Some(Role::DeviceManager));
        assert_eq!(Role::parse("root"), None);
        assert_eq!(internal_tenant("default"), "");
        assert_eq!(public_tenant(""), "default");
    }
}
