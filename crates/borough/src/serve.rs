//! `borough serve`: open the store, serve HTTP, shut down cleanly on Ctrl-C / SIGTERM.

use borough_api::ApiConfig;
use borough_embedded::EmbeddedStore;
use borough_store::EntityStore;
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
    /// Delivery attempts per notification before it goes to the dead letters.
    #[arg(long, env = "BOROUGH_NOTIFY_ATTEMPTS", default_value_t = 6)]
    pub notify_attempts: u32,
    /// Milliseconds before a failed notification is retried (doubled at each retry).
    #[arg(long, env = "BOROUGH_NOTIFY_RETRY_MS", default_value_t = 500)]
    pub notify_retry_ms: u64,
    /// PEM file of CA certificates trusted for mqtts:// notification endpoints,
    /// besides the usual public roots.
    #[arg(long, env = "BOROUGH_MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,
    /// Raster tile URL template of the dashboard's map for online use, e.g.
    /// https://tile.openstreetmap.org/{z}/{x}/{y}.png (default: an offline base layer).
    #[arg(long, env = "BOROUGH_MAP_TILES")]
    pub map_tiles: Option<String>,
    /// Attribution shown with those tiles.
    #[arg(long, env = "BOROUGH_MAP_ATTRIBUTION")]
    pub map_attribution: Option<String>,
    /// Serve /bench/static with a fixed body of this size (benchmark baseline only).
    #[arg(long, hide = true)]
    pub bench_static_bytes: Option<usize>,
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

/// A running server: the store, the bound address and the task serving HTTP.
pub struct Running {
    pub addr: SocketAddr,
    store: Arc<EmbeddedStore>,
    stop: tokio::sync::oneshot::Sender<()>,
    /// Ends the dashboard's live streams, which would otherwise hold up shutdown.
    stop_live: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    stop_notifier: tokio::sync::oneshot::Sender<()>,
    notifier: tokio::task::JoinHandle<()>,
}

/// Opens the store and starts serving on `listener`.
pub async fn start(args: &ServeArgs, listener: tokio::net::TcpListener) -> Result<Running, String> {
    let store = Arc::new(
        EmbeddedStore::open(&args.data)
            .map_err(|e| format!("cannot open the store in {}: {e}", args.data.display()))?,
    );
    let config = ApiConfig {
        max_body_bytes: args.max_body_bytes,
        max_batch_body_bytes: args.max_batch_body_bytes,
        context_fetch_timeout: Duration::from_secs(args.context_timeout_secs),
        bench_static_bytes: args.bench_static_bytes,
        ..ApiConfig::default()
    };
    let (stop_live, live_stopped) = tokio::sync::watch::channel(false);
    let web = borough_web::WebConfig {
        tile_url: args.map_tiles.clone(),
        tile_attribution: args.map_attribution.clone(),
        stop: Some(live_stopped),
    };
    let app =
        borough_api::router(store.clone(), config)?.merge(borough_web::router(store.clone(), web));
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    // Notifications are delivered from the store's outbox, off the request path.
    let (stop_notifier, notifier_stopped) = tokio::sync::oneshot::channel::<()>();
    let mqtt_ca_pem = match &args.mqtt_ca_file {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?),
        None => None,
    };
    let notifier = borough_notify::start(
        store.clone(),
        borough_notify::NotifierConfig {
            max_attempts: args.notify_attempts.max(1),
            first_retry: Duration::from_millis(args.notify_retry_ms),
            mqtt_ca_pem,
            ..borough_notify::NotifierConfig::default()
        },
        async {
            let _ = notifier_stopped.await;
        },
    )?;
    tracing::info!(%addr, data = %args.data.display(), "borough is serving");
    Ok(Running {
        addr,
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
        let _ = self.stop.send(());
        let _ = self.stop_live.send(true);
        self.task
            .await
            .map_err(|e| format!("server task failed: {e}"))?
            .map_err(|e| format!("server error: {e}"))?;
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
    let running = start(&args, listener).await?;
    // One line on stdout that scripts and tests can wait for.
    {
        use std::io::Write as _;
        // A closed stdout must not stop the server.
        let _ = writeln!(std::io::stdout(), "listening on http://{}", running.addr);
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
