use std::net::SocketAddr;

/// Request limits of the publishing API, which the all-in-one `serve` takes as well.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "ingest_settings")]
pub struct Settings {
    /// Most events in one request.
    #[arg(
        long = "max-batch-events",
        env = "EVENTBUS_MAX_BATCH_EVENTS",
        default_value_t = 1000
    )]
    pub max_batch_events: usize,
    /// Largest request body, in bytes.
    #[arg(long = "max-body-bytes", env = "EVENTBUS_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        eventbus_runtime::config::defaults()
    }
}

/// The ingest service: where it listens, whom it calls, and its [`Settings`].
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Address of the public HTTP API (`/v1/events`, `/v1/channels/...`) and the health endpoints.
    #[arg(
        long = "listen",
        env = "EVENTBUS_INGEST_LISTEN",
        default_value = "127.0.0.1:7003"
    )]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub upstream: eventbus_runtime::upstream::Args,
    /// The store serving in this process (the all-in-one bus), called directly instead of
    /// over `upstream`'s store URL.
    #[arg(skip)]
    pub store_in_process: Option<eventbus_store_client::InProcess>,
    #[command(flatten)]
    pub settings: Settings,
    #[command(flatten)]
    pub events: eventbus_runtime::limits::EventLimits,
    /// Development mode: any browser origin is allowed.
    #[arg(long = "dev", env = "EVENTBUS_DEV")]
    pub dev: bool,
    #[command(flatten)]
    pub cors: eventbus_runtime::cors::Args,
    #[command(flatten)]
    pub http: eventbus_runtime::http::Limits,
    #[command(flatten)]
    pub tls: eventbus_runtime::tls::Args,
    #[command(flatten)]
    pub publish_rate: eventbus_runtime::rate::Args,
    #[command(flatten)]
    pub app_hooks: eventbus_auth_client::app_hooks::Args,
    #[command(flatten)]
    pub websub: eventbus_runtime::websub::Args,
}

impl Config {
    /// Defaults pointing at the given store and auth, for tests and the all-in-one mode.
    pub fn new(store_url: String, auth_url: String) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream: eventbus_runtime::upstream::Args::new(store_url, auth_url),
            ..eventbus_runtime::config::defaults()
        }
    }
}
