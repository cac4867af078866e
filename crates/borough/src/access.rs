//! Access control of `borough serve`: its flags, and setting it up at start
//! (the tenants already holding data, the operator key, the OpenID provider).

use borough_access::oidc::{OidcConfig, OidcVerifier};
use borough_access::{Access, AccessConfig};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Every request needs an API key, a token or a dashboard session.
    On,
    /// No access control at all: for a demo on one's own machine.
    Off,
}

#[derive(Args, Debug, Clone)]
pub struct AccessArgs {
    /// Access control. `off` lets anyone who reaches the port do anything.
    #[arg(long, env = "BOROUGH_AUTH", value_enum, default_value = "on")]
    pub auth: AuthMode,
    /// A file holding the operator key. If it does not exist, the first start
    /// writes a new key there (readable by its owner only). The key may also
    /// come from the BOROUGH_OPERATOR_KEY environment variable.
    #[arg(long, env = "BOROUGH_OPERATOR_KEY_FILE")]
    pub operator_key_file: Option<PathBuf>,
    /// Let a write to an unregistered tenant register it.
    #[arg(long, env = "BOROUGH_AUTO_CREATE_TENANTS")]
    pub auto_create_tenants: bool,
    /// Requests per second per API key or token subject (bursts of twice as many).
    #[arg(long, env = "BOROUGH_KEY_RATE_LIMIT", default_value_t = 1000.0)]
    pub key_rate_limit: f64,
    /// OpenID Provider whose bearer tokens are accepted (its issuer URL;
    /// discovery at /.well-known/openid-configuration).
    #[arg(long, env = "BOROUGH_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// The `aud` tokens must carry.
    #[arg(long, env = "BOROUGH_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// The claim naming a token's tenant(s) (a dotted path for nested claims).
    #[arg(long, env = "BOROUGH_OIDC_TENANT_CLAIM", default_value = "tenant")]
    pub oidc_tenant_claim: String,
    /// The claim naming a token's Borough roles (e.g. realm_access.roles).
    #[arg(long, env = "BOROUGH_OIDC_ROLES_CLAIM", default_value = "roles")]
    pub oidc_roles_claim: String,
    /// A token signed by a key Borough has not seen makes it fetch the
    /// provider's keys again, at most this often (seconds).
    #[arg(long, env = "BOROUGH_OIDC_JWKS_REFRESH_SECS", default_value_t = 30)]
    pub oidc_jwks_refresh_secs: u64,
    /// Origins (scheme://host[:port], comma-separated) whose web pages may
    /// call the API from a browser. None by default.
    #[arg(long, env = "BOROUGH_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
}

impl Default for AccessArgs {
    fn default() -> Self {
        Self {
            auth: AuthMode::On,
            operator_key_file: None,
            auto_create_tenants: false,
            key_rate_limit: 1000.0,
            oidc_issuer: None,
            oidc_audience: None,
            oidc_tenant_claim: "tenant".into(),
            oidc_roles_claim: "roles".into(),
            oidc_jwks_refresh_secs: 30,
            cors_origins: Vec::new(),
        }
    }
}

/// What start-up made of access control.
pub struct Prepared {
    pub access: Arc<Access>,
    /// A new operator key to show once (no key was given and none existed).
    pub new_operator_key: Option<String>,
}

/// Opens the registry over the store, adopts tenants that hold data,
/// makes sure an operator key exists and connects to the OpenID provider.
pub async fn prepare(
    args: &AccessArgs,
    records: Arc<dyn borough_store::RecordStore>,
    existing_tenants: Vec<String>,
) -> Result<Prepared, String> {
    let oidc = match &args.oidc_issuer {
        None => None,
        Some(issuer) => {
            let mut config = OidcConfig::new(issuer.clone());
            config.audience = args.oidc_audience.clone();
            config.tenant_claim = args.oidc_tenant_claim.clone();
            config.roles_claim = args.oidc_roles_claim.clone();
            config.jwks_min_refresh = Duration::from_secs(args.oidc_jwks_refresh_secs.max(1));
            // The provider is the operator's choice, so it may well be on an
            // internal address: this client is not held to --allow-outbound.
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| format!("cannot set up the OpenID client: {e}"))?;
            let verifier = OidcVerifier::discover(config, http)
                .await
                .map_err(|e| format!("the OpenID provider {issuer} cannot be used: {e}"))?;
            Some(Arc::new(verifier))
        }
    };
    let config = AccessConfig {
        enabled: args.auth == AuthMode::On,
        auto_create_tenants: args.auto_create_tenants,
        key_rate: args.key_rate_limit,
        oidc,
        ..AccessConfig::default()
    };
    let access = tokio::task::spawn_blocking(move || Access::open(records, config))
        .await
        .map_err(|e| e.to_string())??;
    let access = Arc::new(access);
    if args.auth == AuthMode::Off {
        return Ok(Prepared {
            access,
            new_operator_key: None,
        });
    }
    access
        .adopt_tenants(&existing_tenants)
        .await
        .map_err(|e| e.detail)?;
    let given = match (
        &args.operator_key_file,
        std::env::var("BOROUGH_OPERATOR_KEY"),
    ) {
        (_, Ok(k)) if !k.trim().is_empty() => Some(k.trim().to_string()),
        (Some(path), _) if path.exists() => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the operator key {}: {e}", path.display()))?
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    let new_operator_key = access
        .bootstrap_operator(given.as_deref())
        .await
        .map_err(|e| format!("cannot set up the operator key: {}", e.detail))?;
    if let (Some(key), Some(path)) = (&new_operator_key, &args.operator_key_file) {
        write_secret(path, key)?;
    }
    Ok(Prepared {
        access,
        new_operator_key,
    })
}

/// Writes a secret to a new file that only its owner can read.
fn write_secret(path: &std::path::Path, secret: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .map_err(|e| format!("cannot write the operator key to {}: {e}", path.display()))?;
    writeln!(f, "{secret}")
        .map_err(|e| format!("cannot write the operator key to {}: {e}", path.display()))
}

/// Lets another layer's data of a tenant go with it.
pub struct DeviceData(pub Arc<borough_devices::Devices>);

impl borough_api::admin::TenantData for DeviceData {
    fn purge(
        &self,
        tenant: &str,
    ) -> futures_util::future::BoxFuture<'static, Result<serde_json::Value, String>> {
        let devices = self.0.clone();
        let tenant = tenant.to_string();
        Box::pin(async move {
            let n = devices
                .purge_tenant(&tenant)
                .await
                .map_err(|e| format!("{e:?}"))?;
            Ok(serde_json::json!({ "devices": n }))
        })
    }
}

/// Lets the listed origins' pages call the API from a browser (CORS). With
/// none, no CORS headers are sent and browsers keep other sites' pages out.
pub fn with_cors(app: axum::Router, origins: &[String]) -> Result<axum::Router, String> {
    let origins: Vec<&String> = origins.iter().filter(|o| !o.trim().is_empty()).collect();
    if origins.is_empty() {
        return Ok(app);
    }
    let mut allowed = Vec::with_capacity(origins.len());
    for o in origins {
        let o = o.trim();
        if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
            return Err(format!(
                "--cors-origins: '{o}' is not an origin (scheme://host[:port], no path)"
            ));
        }
        allowed.push(
            axum::http::HeaderValue::from_str(o)
                .map_err(|_| format!("--cors-origins: '{o}' is not a valid origin"))?,
        );
    }
    use axum::http::{Method, header};
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(allowed)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::LINK,
            axum::http::HeaderName::from_static("ngsild-tenant"),
        ])
        .expose_headers([
            header::LOCATION,
            header::LINK,
            axum::http::HeaderName::from_static("ngsild-results-count"),
        ])
        .max_age(Duration::from_secs(600));
    Ok(app.layer(cors))
}
