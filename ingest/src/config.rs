use std::net::SocketAddr;

/// Settings of the ingest service.
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
    /// Largest event, serialized, in bytes; larger ones are refused with 413.
    #[arg(long = "max-event-bytes", env = "EVENTBUS_MAX_EVENT_BYTES", default_value_t = 64 * 1024)]
    pub max_event_bytes: usize,
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
}

impl Config {
    /// Defaults pointing at the given store and auth, for tests and the all-in-one mode.
    pub fn new(store_url: String, auth_url: String) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream: eventbus_runtime::upstream::Args::new(store_url, auth_url),
            max_event_bytes: 64 * 1024,
            max_batch_events: 1000,
            max_body_bytes: 4 * 1024 * 1024,
            dev: false,
            cors: Default::default(),
            http: Default::default(),
            tls: Default::default(),
            publish_rate: Default::default(),
        }
    }
}
