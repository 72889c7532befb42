use std::net::SocketAddr;

/// Connections, subscriptions and timers of a gateway, which the all-in-one `serve` takes as well.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "gateway_settings")]
pub struct Settings {
    /// Live events queued per connection; a connection whose queue is full is closed (4008).
    #[arg(
        long = "queue-len",
        env = "EVENTBUS_GATEWAY_QUEUE_LEN",
        default_value_t = 2048
    )]
    pub queue_len: usize,
    /// Subscriptions one connection may hold (its own inbox aside); past it a subscribe is
    /// refused with `too_many_subscriptions` and the connection stays.
    #[arg(
        long = "max-subscriptions",
        env = "EVENTBUS_GATEWAY_MAX_SUBSCRIPTIONS",
        default_value_t = 1000
    )]
    pub max_subscriptions: usize,
    /// Connections one identity may hold to this gateway (0: no limit); past it a new one is
    /// closed with 4029 after an error frame `too_many_connections`.
    #[arg(
        long = "max-connections-per-identity",
        env = "EVENTBUS_GATEWAY_MAX_CONNECTIONS_PER_IDENTITY",
        default_value_t = 0
    )]
    pub max_connections_per_identity: usize,
    /// Largest frame a client may send, in bytes; a larger one closes the connection (4009).
    #[arg(long = "max-frame-bytes", env = "EVENTBUS_WS_MAX_FRAME_BYTES", default_value_t = 128 * 1024)]
    pub max_frame_bytes: usize,
    /// Seconds a new connection has to authenticate.
    #[arg(
        long = "hello-timeout-s",
        env = "EVENTBUS_HELLO_TIMEOUT_S",
        default_value_t = 10
    )]
    pub hello_timeout_s: u64,
    /// Seconds between server pings; a peer silent for two intervals is dropped.
    #[arg(
        long = "ping-interval-s",
        env = "EVENTBUS_WS_PING_INTERVAL_S",
        default_value_t = 25
    )]
    pub ping_interval_s: u64,
    /// Seconds between comparisons of each carried channel's head with what arrived; an event whose
    /// backbone message was lost is delivered from the store at the latest this long after.
    #[arg(
        long = "tail-check-s",
        env = "EVENTBUS_GATEWAY_TAIL_CHECK_S",
        default_value_t = 5
    )]
    pub tail_check_s: u64,
    /// Presence entries of this gateway expire this many seconds after its last report (it
    /// reports everything every third of that), so a gateway that dies leaves no ghosts for long.
    #[arg(
        long = "presence-ttl-s",
        env = "EVENTBUS_PRESENCE_TTL_S",
        default_value_t = 30
    )]
    pub presence_ttl_s: u64,
    /// Seconds given to connections to close at shutdown.
    #[arg(
        long = "grace-s",
        env = "EVENTBUS_SHUTDOWN_GRACE_S",
        default_value_t = 10
    )]
    pub grace_s: u64,
}

impl Default for Settings {
    fn default() -> Self {
        eventbus_runtime::config::defaults()
    }
}

/// The gateway: where it listens, whom it calls, and its [`Settings`].
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Address of the WebSocket endpoint (`/v1/ws`) and the health endpoints.
    #[arg(
        long = "listen",
        env = "EVENTBUS_GATEWAY_LISTEN",
        default_value = "127.0.0.1:7004"
    )]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub upstream: eventbus_runtime::upstream::Args,
    /// The store serving in this process (the all-in-one bus), called directly instead of
    /// over `upstream`'s store URL.
    #[arg(skip)]
    pub store_in_process: Option<eventbus_store_client::InProcess>,
    /// Name of this gateway in connection ids (random when unset).
    #[arg(long = "id", env = "EVENTBUS_GATEWAY_ID")]
    pub id: Option<String>,
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
