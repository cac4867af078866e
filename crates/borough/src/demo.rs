//! `borough demo`: a server with embedded storage, a simulated city of a few
//! thousand devices provisioned into it, and live measurements, in one command.

use crate::serve::{self, ServeArgs};
use crate::simulate::{self, SimulateArgs};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Prints a line to stdout; a closed stdout (a pipe whose reader left) must
/// not stop the demo.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Address of the HTTP API; if its port is taken, a free one is used.
    #[arg(long, default_value = "127.0.0.1:1026")]
    pub http: SocketAddr,
    /// Address of the embedded MQTT broker; if its port is taken, a free one is used.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt: SocketAddr,
    /// Keep the data in this directory (default: a temporary directory, removed on exit).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Devices in the simulated city.
    #[arg(long, default_value_t = 5000)]
    pub devices: usize,
    /// Measurements per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seed of the simulated city.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Past history loaded for a new city (15-minute readings), e.g. 1d, 7d; 0 for none.
    #[arg(long, default_value = "1d", value_parser = simulate::parse_duration)]
    pub history: Duration,
    /// Log filter.
    #[arg(long, env = "BOROUGH_LOG", default_value = "warn")]
    pub log_level: String,
}

pub fn run(args: DemoArgs) -> Result<(), String> {
    serve::init_logging(&args.log_level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(demo(args))
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let any = SocketAddr::new(addr.ip(), 0);
            let l = tokio::net::TcpListener::bind(any)
                .await
                .map_err(|e| format!("cannot listen on {any}: {e}"))?;
            let port = l.local_addr().map(|a| a.port()).unwrap_or_default();
            eprintln!("port {} is taken; using port {port} instead", addr.port());
            Ok(l)
        }
        Err(e) => Err(format!("cannot listen on {addr}: {e}")),
    }
}

async fn demo(args: DemoArgs) -> Result<(), String> {
    let temp;
    let data = match &args.data {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("borough-demo-")
                .tempdir()
                .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
            temp.path().to_path_buf()
        }
    };
    let serve_args = ServeArgs {
        http: args.http,
        data: data.clone(),
        store: None,
        pg_schema: "borough".into(),
        log_level: args.log_level.clone(),
        max_body_bytes: 1 << 20,
        max_batch_body_bytes: 16 << 20,
        context_timeout_secs: 3,
        source_timeout_ms: 3000,
        source_cooldown_secs: 10,
        source_hosts: Vec::new(),
        bench_static_bytes: None,
        temporal_page_instances: borough_api::temporal::MAX_INSTANCES,
        max_pending_notices: 100_000,
        notify_attempts: 6,
        notify_retry_ms: 500,
        mqtt_ca_file: None,
        map_tiles: None,
        map_attribution: None,
        mqtt: args.mqtt.to_string(),
        mqtt_broker: None,
        mqtt_topic_prefix: String::new(),
        device_rate_limit: 50.0,
        device_max_payload_bytes: 64 << 10,
        command_ack_timeout_secs: 30,
        command_attempts: 3,
        max_device_commands: 100,
        max_connections: 8192,
        max_connections_per_ip: 512,
        header_read_timeout_secs: 30,
        // Everything runs on this one machine.
        allow_outbound: borough_access::outbound::OutboundPolicy::loopback(),
        // A demo on one's own machine is open; `borough serve` is not.
        access: crate::access::AccessArgs {
            auth: crate::access::AuthMode::Off,
            ..crate::access::AccessArgs::default()
        },
    };
    let listener = bind(args.http).await?;
    let mqtt = bind(args.mqtt).await?;
    let running = serve::start(&serve_args, listener, Some(mqtt)).await?;
    let base = format!("http://{}", running.addr);
    say!("listening on {base}");
    if let Some(a) = running.mqtt_addr {
        say!("mqtt listening on {a} (devices: {base}/api/v1/devices)");
    }
    say!("Borough demo: data in {}", data.display());
    say!(
        "access control is OFF in the demo: anyone who reaches {base} can read and change everything (borough serve requires API keys)"
    );
    say!(
        "provisioning a simulated city of {} devices...",
        args.devices
    );
    let sim = SimulateArgs {
        target: base.clone(),
        tenant: None,
        devices: args.devices,
        rate: args.rate,
        duration: Duration::from_secs(365 * 86_400),
        seed: args.seed,
        history: args.history,
        quiet: true,
        api_key: None,
    };
    let rate = args.rate;
    let streaming = simulate::simulate(&sim, std::future::pending(), |s| {
        say!(
            "ready: {} devices ({} new), streaming {rate} measurements/s",
            s.created + s.existing,
            s.created
        );
        say!("  dashboard:  {base}/");
        say!("  API:        {base}/ngsi-ld/v1/entities?type=ParkingSpot&limit=5");
        say!(
            "  free spots: {base}/ngsi-ld/v1/entities?type=ParkingSpot&q=status==%22free%22&count=true&limit=1"
        );
        say!(
            "  near here:  {base}/ngsi-ld/v1/entities?type=Streetlight&georel=near%3BmaxDistance%3D%3D300&geometry=Point&coordinates=%5B2.33,48.85%5D"
        );
        say!("  types:      {base}/ngsi-ld/v1/types");
        if s.history > 0 {
            say!(
                "  history:    {base}/ngsi-ld/v1/temporal/entities?type=AirQualityObserved&attrs=NO2&options=aggregatedValues&aggrMethods=avg,max&aggrPeriodDuration=PT1H&limit=3  ({} points loaded)",
                s.history
            );
        }
        say!("  health:     {base}/health");
        say!("Ctrl-C stops the demo.");
    });
    let result = tokio::select! {
        r = streaming => r.map(|_| ()),
        _ = serve::shutdown_signal() => Ok(()),
    };
    say!("stopping...");
    running.shutdown().await?;
    result
}
