//! `borough serve`: open the store, serve HTTP, shut down cleanly on Ctrl-C / SIGTERM.

use borough_api::ApiConfig;
use borough_store::{EntityStore, RecordStore};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address of the HTTP API (port 0 picks a free port).
    #[arg(long, env = "BOROUGH_HTTP", default_value = "0.0.0.0:1026")]
    pub http: SocketAddr,
    /// Directory of the embedded store.
    #[arg(long, env = "BOROUGH_DATA", default_value = "./borough-data")]
    pub data: PathBuf,
    /// Keep the data in PostgreSQL instead of the embedded store, e.g.
    /// postgres://borough@db.example/city (a libpq URL or key=value string).
    #[arg(long, env = "BOROUGH_STORE", value_parser = postgres_url)]
    pub store: Option<String>,
    /// The PostgreSQL schema that holds Borough's tables (created if missing).
    #[arg(
        long,
        env = "BOROUGH_PG_SCHEMA",
        default_value = "borough",
        requires = "store"
    )]
    pub pg_schema: String,
    /// Log filter: error, warn, info, debug, trace, or a tracing filter expression.
    #[arg(long, env = "BOROUGH_LOG", default_value = "info")]
    pub log_level: String,
    /// Largest body of a single-entity request, in bytes.
    #[arg(long, env = "BOROUGH_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Largest body of a batch operation, in bytes.
    #[arg(long, env = "BOROUGH_MAX_BATCH_BODY_BYTES", default_value_t = 16 << 20)]
    pub max_batch_body_bytes: usize,
    /// Seconds to wait for a remote @context before answering LdContextNotAvailable.
    #[arg(long, env = "BOROUGH_CONTEXT_TIMEOUT_SECS", default_value_t = 3)]
    pub context_timeout_secs: u64,
    /// Milliseconds a context source may take to answer a forwarded request
    /// when its registration sets no management.timeout.
    #[arg(long, env = "BOROUGH_SOURCE_TIMEOUT_MS", default_value_t = 3000)]
    pub source_timeout_ms: u64,
    /// Seconds a context source that failed is skipped when its
    /// registration sets no management.cooldown.
    #[arg(long, env = "BOROUGH_SOURCE_COOLDOWN_SECS", default_value_t = 10)]
    pub source_cooldown_secs: u64,
    /// Notifications a subscription may have pending (undelivered); further
    /// ones are dropped and counted, so a dead receiver cannot fill the disk.
    #[arg(long, env = "BOROUGH_MAX_PENDING_NOTICES", default_value_t = 100_000,
          value_parser = at_least_one_u64)]
    pub max_pending_notices: u64,
    /// Delivery attempts per notification before it goes to the dead letters.
    #[arg(long, env = "BOROUGH_NOTIFY_ATTEMPTS", default_value_t = 6)]
    pub notify_attempts: u32,
    /// Milliseconds before a failed notification is retried (doubled at each retry).
    #[arg(long, env = "BOROUGH_NOTIFY_RETRY_MS", default_value_t = 500)]
    pub notify_retry_ms: u64,
    /// PEM file of CA certificates trusted for mqtts:// notification endpoints
    /// and an mqtts:// --mqtt-broker, besides the usual public roots.
    #[arg(long, env = "BOROUGH_MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,
    /// Raster tile URL template of the dashboard's map for online use, e.g.
    /// https://tile.openstreetmap.org/{z}/{x}/{y}.png (default: an offline base layer).
    #[arg(long, env = "BOROUGH_MAP_TILES")]
    pub map_tiles: Option<String>,
    /// Attribution shown with those tiles.
    #[arg(long, env = "BOROUGH_MAP_ATTRIBUTION")]
    pub map_attribution: Option<String>,
    /// Address of the embedded MQTT broker for devices, or `off`.
    #[arg(long, env = "BOROUGH_MQTT", default_value = "0.0.0.0:1883")]
    pub mqtt: String,
    /// Use this external MQTT broker for devices instead of the embedded one:
    /// mqtt[s]://[user:password@]host[:port] (Borough's own credentials there).
    #[arg(long, env = "BOROUGH_MQTT_BROKER", hide_env_values = true)]
    pub mqtt_broker: Option<String>,
    /// Topic levels put in front of every device topic on the external broker
    /// (e.g. city1/), so that deployments can share one broker.
    #[arg(long, env = "BOROUGH_MQTT_TOPIC_PREFIX", default_value = "",
          value_parser = topic_prefix)]
    pub mqtt_topic_prefix: String,
    /// Messages per second each device may send (a burst of twice as many is allowed).
    #[arg(long, env = "BOROUGH_DEVICE_RATE_LIMIT", default_value_t = 50.0)]
    pub device_rate_limit: f64,
    /// Largest device measurement payload, in bytes.
    #[arg(long, env = "BOROUGH_DEVICE_MAX_PAYLOAD_BYTES", default_value_t = 64 << 10)]
    pub device_max_payload_bytes: usize,
    /// Seconds to wait for a device to acknowledge a command before sending it again.
    #[arg(long, env = "BOROUGH_COMMAND_ACK_TIMEOUT_SECS", default_value_t = 30)]
    pub command_ack_timeout_secs: u64,
    /// Deliveries of a command before it fails.
    #[arg(long, env = "BOROUGH_COMMAND_ATTEMPTS", default_value_t = 3)]
    pub command_attempts: u32,
    /// Open (queued or sent) commands a device may have; more are refused with 429.
    #[arg(long, env = "BOROUGH_MAX_DEVICE_COMMANDS", default_value_t = 100,
          value_parser = at_least_one)]
    pub max_device_commands: usize,
    /// Most instances (or aggregation buckets) of one attribute in a temporal
    /// answer; a longer answer is cut (206 with Content-Range).
    #[arg(long, env = "BOROUGH_TEMPORAL_PAGE_INSTANCES", default_value_t = borough_api::temporal::MAX_INSTANCES,
          value_parser = page_instances)]
    pub temporal_page_instances: usize,
    /// Most open HTTP connections; more are answered 503 and closed.
    #[arg(long, env = "BOROUGH_MAX_CONNECTIONS", default_value_t = 8192, value_parser = at_least_one)]
    pub max_connections: usize,
    /// Most open HTTP connections from one client address.
    #[arg(long, env = "BOROUGH_MAX_CONNECTIONS_PER_IP", default_value_t = 512,
          value_parser = at_least_one)]
    pub max_connections_per_ip: usize,
    /// Seconds a client has to send a request head; also how long an idle
    /// keep-alive connection is kept open.
    #[arg(long, env = "BOROUGH_HEADER_READ_TIMEOUT_SECS", default_value_t = 30,
          value_parser = at_least_one_sec)]
    pub header_read_timeout_secs: u64,
    /// Internal addresses that remote @context URLs and notification
    /// endpoints may name, comma-separated: CIDRs (10.1.0.0/16, ::1/128),
    /// host names (broker.city.example), `loopback` or `private` (RFC 1918,
    /// fc00::/7). By default only public addresses are reached.
    #[arg(long, env = "BOROUGH_ALLOW_OUTBOUND", value_name = "LIST", default_value = "",
          hide_default_value = true, value_parser = outbound_allowlist)]
    pub allow_outbound: borough_access::outbound::OutboundPolicy,
    /// The only hosts context sources may be registered at, comma-separated
    /// (host names or addresses, optionally with `:port`); empty: any host
    /// --allow-outbound lets Borough reach.
    #[arg(
        long,
        env = "BOROUGH_SOURCE_HOSTS",
        value_name = "LIST",
        default_value = "",
        hide_default_value = true,
        value_delimiter = ','
    )]
    pub source_hosts: Vec<String>,
    /// Serve /bench/static with a fixed body of this size (benchmark baseline only).
    #[arg(long, hide = true)]
    pub bench_static_bytes: Option<usize>,
    #[command(flatten)]
    pub access: crate::access::AccessArgs,
}

/// `--temporal-page-instances`: at least one.
fn page_instances(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive whole number")),
    }
}

/// `--allow-outbound`: the allowlist, each entry checked.
fn outbound_allowlist(s: &str) -> Result<borough_access::outbound::OutboundPolicy, String> {
    s.parse::<borough_access::outbound::OutboundPolicy>()
        .map_err(|e| e.to_string())
}

/// A count that must be at least one.
fn at_least_one(s: &str) -> Result<usize, String> {
    page_instances(s)
}

/// A count that must be at least one.
fn at_least_one_u64(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive whole number")),
    }
}

/// `--mqtt-topic-prefix`: topic levels without wildcards, stored with a final `/`.
fn topic_prefix(s: &str) -> Result<String, String> {
    borough_devices::external::parse_prefix(s)
}

/// A number of seconds, at least one.
fn at_least_one_sec(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive whole number")),
    }
}

pub fn run(args: ServeArgs) -> Result<(), String> {
    init_logging(&args.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(serve(args))
}

pub fn init_logging(level: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("invalid log level '{level}': {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))
}

/// `--store`: a PostgreSQL address; the embedded store needs none.
fn postgres_url(s: &str) -> Result<String, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") || s.contains("host=") {
        Ok(s.to_string())
    } else {
        Err(
            "expected a PostgreSQL address (postgres://user@host/db, or host=… dbname=…); \
             without --store the data is kept in --data"
                .into(),
        )
    }
}

/// A store as the server uses it: entities and records, whatever the backend.
pub trait Storage: EntityStore + RecordStore {}
impl<S: EntityStore + RecordStore> Storage for S {}

/// Opens the store the arguments name: PostgreSQL with `--store`, else the
/// embedded store in `--data`.
fn open_store(args: &ServeArgs) -> Result<Arc<dyn Storage>, String> {
    let engine = borough_engine::EngineOptions {
        max_pending_notices: args.max_pending_notices,
        ..Default::default()
    };
    match &args.store {
        Some(url) => {
            let options = borough_postgres::PgOptions {
                url: url.clone(),
                schema: args.pg_schema.clone(),
            };
            let store = borough_postgres::open(options, engine)
                .map_err(|e| format!("cannot open the store in PostgreSQL: {e}"))?;
            Ok(Arc::new(store))
        }
        None => {
            let store = borough_embedded::open_with(
                &args.data,
                borough_embedded::StoreOptions {
                    max_pending_notices: engine.max_pending_notices,
                    ..Default::default()
                },
            )
            .map_err(|e| format!("cannot open the store in {}: {e}", args.data.display()))?;
            Ok(Arc::new(store))
        }
    }
}

/// A running server: the store, the bound address and the task serving HTTP.
pub struct Running {
    pub addr: SocketAddr,
    /// An operator key made at this start, to show once.
    pub new_operator_key: Option<String>,
    pub auth: crate::access::AuthMode,
    access: Arc<borough_access::Access>,
    /// The embedded MQTT broker's address, when it runs.
    pub mqtt_addr: Option<SocketAddr>,
    stop_mqtt: tokio::sync::watch::Sender<bool>,
    store: Arc<dyn Storage>,
    stop: tokio::sync::oneshot::Sender<()>,
    /// Ends the dashboard's live streams, which would otherwise hold up shutdown.
    stop_live: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    stop_notifier: tokio::sync::oneshot::Sender<()>,
    notifier: tokio::task::JoinHandle<()>,
}

/// Where the embedded MQTT broker should listen, if it runs at all.
pub fn mqtt_addr(args: &ServeArgs) -> Result<Option<SocketAddr>, String> {
    if args.mqtt_broker.is_some() || args.mqtt.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    args.mqtt
        .parse()
        .map(Some)
        .map_err(|_| format!("--mqtt '{}' is not an address (or 'off')", args.mqtt))
}

/// Binds the embedded MQTT broker's address, with a one-line error if taken.
pub async fn bind_mqtt(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "cannot listen for MQTT on {addr}: the port is taken (another MQTT broker?); \
                 use --mqtt ADDR, --mqtt off, or --mqtt-broker mqtt://HOST:PORT"
            )
        } else {
            format!("cannot listen for MQTT on {addr}: {e}")
        }
    })
}

/// Opens the store and starts serving on `listener` (and MQTT on `mqtt`).
pub async fn start(
    args: &ServeArgs,
    listener: tokio::net::TcpListener,
    mqtt: Option<tokio::net::TcpListener>,
) -> Result<Running, String> {
    let store = open_store(args)?;
    let records: Arc<dyn RecordStore> = store.clone();
    let entities: Arc<dyn EntityStore> = store.clone();
    let config = ApiConfig {
        max_body_bytes: args.max_body_bytes,
        max_batch_body_bytes: args.max_batch_body_bytes,
        context_fetch_timeout: Duration::from_secs(args.context_timeout_secs),
        source_timeout: Duration::from_millis(args.source_timeout_ms.max(1)),
        source_hosts: args
            .source_hosts
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect(),
        source_cooldown: Duration::from_secs(args.source_cooldown_secs),
        bench_static_bytes: args.bench_static_bytes,
        temporal_page_instances: args.temporal_page_instances,
        outbound: args.allow_outbound.clone(),
        ..ApiConfig::default()
    };
    // Over a store that other nodes share, keys, tenants and devices made on
    // one node are followed by the others: subscribed before they are
    // loaded, so that nothing committed in between is missed.
    let access_changes = records.followed_records();
    let device_changes = records.followed_records();
    let prepared = crate::access::prepare(&args.access, records.clone(), store.tenants()).await?;
    let access = prepared.access.clone();
    let (stop_live, live_stopped) = tokio::sync::watch::channel(false);
    let web = borough_web::WebConfig {
        tile_url: args.map_tiles.clone(),
        tile_attribution: args.map_attribution.clone(),
        stop: Some(live_stopped),
        access: Some(access.clone()),
    };
    let devices = borough_devices::Devices::start(
        entities.clone(),
        records.clone(),
        borough_devices::DevicesConfig {
            rate_limit: args.device_rate_limit,
            rate_burst: (args.device_rate_limit * 2.0).max(1.0),
            max_payload_bytes: args.device_max_payload_bytes,
            ack_timeout: Duration::from_secs(args.command_ack_timeout_secs),
            max_attempts: args.command_attempts.max(1),
            max_open_per_device: args.max_device_commands,
            ..borough_devices::DevicesConfig::default()
        },
    )?;
    devices.set_access(access.clone());
    if let Some(changes) = access_changes {
        access.follow(changes);
    }
    if let Some(changes) = device_changes {
        devices.follow(changes);
    }
    // The API writes through the command hook: a PATCH of a command attribute sends it.
    let api_store: Arc<dyn EntityStore> = Arc::new(borough_devices::store::CommandingStore::new(
        devices.clone(),
    ));
    let wiring = borough_api::Wiring {
        access: Some(access.clone()),
        tenant_data: vec![Arc::new(crate::access::DeviceData(devices.clone()))],
        records: Some(records.clone()),
    };
    let app = borough_api::with_normalized_paths(
        borough_api::router_with(api_store, config, wiring)?
            .merge(borough_devices::http::router(devices.clone()))
            .merge(borough_web::router(entities.clone(), web))
            .layer(axum::middleware::from_fn_with_state(
                devices.clone(),
                append_device_metrics,
            ))
            // Outermost of the routes: every one of them is guarded.
            .layer(axum::middleware::from_fn_with_state(
                access.clone(),
                borough_api::auth::guard,
            )),
    );
    let app = crate::access::with_cors(app, &args.access.cors_origins)?;
    // Keys' last use is written now and then rather than on every request.
    let flush = access.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = flush.flush_last_used().await {
                tracing::warn!(error = %e.detail, "cannot record API keys' last use");
            }
        }
    });
    let (stop_mqtt, mqtt_stopped) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut mqtt_addr = None;
    if let Some(l) = mqtt {
        mqtt_addr = Some(l.local_addr().map_err(|e| e.to_string())?);
        let broker = borough_devices::broker::Broker::new(
            devices.clone(),
            borough_devices::broker::BrokerConfig::default(),
        );
        tokio::spawn(broker.serve(l, stopped(mqtt_stopped.clone())));
    }
    let mqtt_ca_pem = match &args.mqtt_ca_file {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?),
        None => None,
    };
    if let Some(url) = &args.mqtt_broker {
        let url = borough_devices::external::parse_url(url)?;
        let tls = if url.tls {
            Some(borough_notify::mqtt_tls_config(mqtt_ca_pem.as_deref())?)
        } else {
            None
        };
        let config = borough_devices::external::ExternalConfig {
            url,
            topic_prefix: args.mqtt_topic_prefix.clone(),
            tls,
        };
        let (devices, stop) = (devices.clone(), stopped(mqtt_stopped));
        tokio::spawn(async move {
            if let Err(e) = borough_devices::external::run(devices, config, stop).await {
                tracing::error!(error = %e, "the external MQTT broker connection stopped");
            }
        });
    }
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = borough_api::server::ServerLimits {
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        header_read_timeout: Duration::from_secs(args.header_read_timeout_secs),
    };
    let task = tokio::spawn(borough_api::server::serve(listener, app, limits, async {
        let _ = stopped.await;
    }));
    // Notifications are delivered from the store's outbox, off the request path.
    let (stop_notifier, notifier_stopped) = tokio::sync::oneshot::channel::<()>();
    let notifier = borough_notify::start(
        entities.clone(),
        borough_notify::NotifierConfig {
            max_attempts: args.notify_attempts.max(1),
            first_retry: Duration::from_millis(args.notify_retry_ms),
            mqtt_ca_pem,
            outbound: args.allow_outbound.clone(),
            ..borough_notify::NotifierConfig::default()
        },
        async {
            let _ = notifier_stopped.await;
        },
    )?;
    match &args.store {
        Some(_) => {
            tracing::info!(%addr, schema = %args.pg_schema, "borough is serving (data in PostgreSQL)")
        }
        None => tracing::info!(%addr, data = %args.data.display(), "borough is serving"),
    }
    Ok(Running {
        addr,
        new_operator_key: prepared.new_operator_key,
        auth: args.access.auth,
        access,
        mqtt_addr,
        stop_mqtt,
        store,
        stop,
        stop_live,
        task,
        stop_notifier,
        notifier,
    })
}

impl Running {
    /// Stops accepting requests, lets those in flight finish, then closes the store.
    pub async fn shutdown(self) -> Result<(), String> {
        let _ = self.stop_mqtt.send(true);
        let _ = self.stop.send(());
        let _ = self.stop_live.send(true);
        self.task
            .await
            .map_err(|e| format!("server task failed: {e}"))?
            .map_err(|e| format!("server error: {e}"))?;
        if let Err(e) = self.access.flush_last_used().await {
            tracing::warn!(error = %e.detail, "cannot record API keys' last use");
        }
        // Undelivered notices stay in the outbox for the next start.
        let _ = self.stop_notifier.send(());
        self.notifier.abort();
        tracing::info!("shutting down: finishing writes and closing the store");
        self.store
            .close()
            .await
            .map_err(|e| format!("cannot close the store: {e}"))
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.http))?;
    let mqtt = match mqtt_addr(&args)? {
        Some(a) => Some(bind_mqtt(a).await?),
        None => None,
    };
    let running = start(&args, listener, mqtt).await?;
    // Lines on stdout that scripts and tests can wait for.
    {
        use std::io::Write as _;
        // A closed stdout must not stop the server.
        let mut out = std::io::stdout();
        if running.auth == crate::access::AuthMode::Off {
            let _ = writeln!(
                out,
                "access control is OFF (--auth off): anyone who reaches this port can do anything"
            );
        }
        if let Some(key) = &running.new_operator_key {
            let _ = writeln!(
                out,
                "operator key (shown once; keep it safe): {key}{}",
                match &args.access.operator_key_file {
                    Some(p) => format!(" (also written to {})", p.display()),
                    None => String::new(),
                }
            );
        }
        let _ = writeln!(out, "listening on http://{}", running.addr);
        if let Some(a) = running.mqtt_addr {
            let _ = writeln!(std::io::stdout(), "mqtt listening on {a}");
        }
    }
    shutdown_signal().await;
    running.shutdown().await
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Appends the devices layer's counters to `GET /metrics`.
async fn append_device_metrics(
    axum::extract::State(devices): axum::extract::State<Arc<borough_devices::Devices>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let is_metrics = request.uri().path() == "/metrics";
    let response = next.run(request).await;
    if !is_metrics || !response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(mut bytes) = axum::body::to_bytes(body, 64 << 20).await.map(Vec::from) else {
        return axum::response::Response::from_parts(parts, axum::body::Body::empty());
    };
    bytes.extend(devices.metrics.render());
    axum::response::Response::from_parts(parts, axum::body::Body::from(bytes))
}
