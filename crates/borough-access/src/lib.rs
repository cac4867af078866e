//! Identity, tenancy and access control. Plain logic over the store's
//! records: the HTTP layer asks it who a caller is (`Access::authenticate`),
//! whether they may do what they ask (`policy`, `Principal::check`) and
//! within which limits (`Access::admit_request`, quotas), and reports what
//! they did (`audit`). Nothing here knows the routes' handlers.

pub mod audit;
pub mod limits;
pub mod model;
pub mod oidc;
pub mod outbound;
pub mod policy;
pub mod registry;
pub mod secret;

pub use model::{Permission, Principal, Role, Tenant, TenantScope, internal_tenant, public_tenant};
pub use registry::{Access, AccessConfig};
