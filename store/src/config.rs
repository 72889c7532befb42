use std::net::SocketAddr;
use std::path::PathBuf;

/// What the log keeps and for how long: the store's settings beyond its address and directory,
/// which the all-in-one `serve` takes as well.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "store_settings")]
pub struct Settings {
    /// Size at which a log segment is sealed and a new one begun.
    #[arg(long = "segment-bytes", env = "EVENTBUS_STORE_SEGMENT_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub segment_bytes: u64,
    /// Seconds an event `id` is remembered per channel, so that a retry is answered with the first
    /// result instead of stored again.
    #[arg(
        long = "dedupe-window-s",
        env = "EVENTBUS_STORE_DEDUPE_WINDOW_S",
        default_value_t = 86_400
    )]
    pub dedupe_window_s: u64,
    /// Most ids remembered at once (about 100 bytes each); the oldest are forgotten first.
    #[arg(
        long = "dedupe-max-ids",
        env = "EVENTBUS_STORE_DEDUPE_MAX_IDS",
        default_value_t = 2_000_000
    )]
    pub dedupe_max_ids: usize,
    /// Retention rules, separated by `;`, each `pattern[:max_age_s=N][:max_events=N][:max_bytes=N]`;
    /// the first matching rule applies, channels no rule matches keep everything.
    /// Example: `chat.*:max_age_s=604800;metrics.>:max_events=100000`.
    #[arg(
        long = "retention",
        env = "EVENTBUS_STORE_RETENTION",
        value_delimiter = ';'
    )]
    pub retention: Vec<crate::log::Rule>,
    /// The index is checkpointed after this many bytes of log (and at every clean stop), which
    /// bounds what a restart after a crash has to scan.
    #[arg(long = "checkpoint-bytes", env = "EVENTBUS_STORE_CHECKPOINT_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub checkpoint_bytes: u64,
    /// Appends are refused (503, resumed by themselves) while the disk holding the log has less
    /// free than this many bytes; 0 turns the watermark off.
    #[arg(
        long = "min-free-bytes",
        env = "EVENTBUS_STORE_MIN_FREE_BYTES",
        default_value_t = 64 * 1024 * 1024
    )]
    pub min_free_bytes: u64,
    /// Channels one publisher may create (0: no limit); past it, appends that would create one
    /// are refused (HTTP 429).
    #[arg(
        long = "max-channels-per-source",
        env = "EVENTBUS_STORE_MAX_CHANNELS_PER_SOURCE",
        default_value_t = 0
    )]
    pub max_channels_per_source: u64,
    /// Keep the log in PostgreSQL at this URL instead of the embedded log under `--data`
    /// (libpq form; several hosts with `target_session_attrs=read-write` follow a failover).
    /// Several stores may share one database. See docs/operations.md, "Choosing an engine".
    #[arg(long = "postgres", env = "EVENTBUS_STORE_POSTGRES")]
    pub postgres: Option<DatabaseUrl>,
    /// Seconds between retention passes.
    #[arg(
        long = "retention-interval-s",
        env = "EVENTBUS_STORE_RETENTION_INTERVAL_S",
        default_value_t = 10
    )]
    pub retention_interval_s: u64,
}

/// A database URL, which may hold a password: shown without it.
#[derive(Clone)]
pub struct DatabaseUrl(pub String);

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        crate::postgres::parse_url(text).map_err(|err| err.to_string())?;
        Ok(DatabaseUrl(text.to_owned()))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match crate::postgres::parse_url(&self.0) {
            Ok((config, _)) => write!(
                f,
                "postgres (hosts {:?}, database {:?}, user {:?}, TLS {:?})",
                config.get_hosts(),
                config.get_dbname(),
                config.get_user(),
                config.get_ssl_mode()
            ),
            Err(_) => f.write_str("postgres (unparsable URL)"),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        eventbus_runtime::config::defaults()
    }
}

/// The store service: where it listens and keeps its log, and its [`Settings`].
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Address for gRPC and the health endpoints.
    #[arg(
        long = "listen",
        env = "EVENTBUS_STORE_LISTEN",
        default_value = "127.0.0.1:7001"
    )]
    pub listen: SocketAddr,
    /// Directory of the log.
    #[arg(
        long = "data",
        env = "EVENTBUS_STORE_DATA",
        default_value = "./data/store"
    )]
    pub data: PathBuf,
    /// The URL other store replicas reach this one's gRPC at (several replicas on PostgreSQL
    /// pass durable-group calls to the one serving groups); default `http://<listen>`, or with
    /// an unspecified listen address `http://<host name>:<port>`. In Kubernetes: the pod's IP.
    #[arg(long = "advertise", env = "EVENTBUS_STORE_ADVERTISE")]
    pub advertise: Option<String>,
    /// How the log is kept: segments, idempotency, retention, limits.
    #[command(flatten)]
    pub settings: Settings,
    #[command(flatten)]
    pub http: eventbus_runtime::http::Limits,
    #[command(flatten)]
    pub internal: eventbus_runtime::internal::Args,
    #[command(flatten)]
    pub tls: eventbus_runtime::tls::Args,
    /// Whom a `tls://` NATS URL is trusted as.
    #[command(flatten)]
    pub trust: eventbus_runtime::tls::Trust,
    /// Serve the gRPC API in this process as well, to clients made with
    /// `StoreClient::in_process` (the all-in-one bus).
    #[arg(skip)]
    pub in_process: Option<eventbus_store_client::InProcess>,
}

impl Config {
    pub fn log_options(&self) -> crate::log::Options {
        let settings = &self.settings;
        crate::log::Options {
            dir: self.data.clone(),
            segment_bytes: settings.segment_bytes,
            dedupe_window_ms: settings.dedupe_window_s.saturating_mul(1000),
            dedupe_max_ids: settings.dedupe_max_ids,
            retention: settings.retention.clone(),
            checkpoint_bytes: settings.checkpoint_bytes,
            clock: crate::log::Clock::system(),
            backbone_queue: 4096,
            min_free_bytes: settings.min_free_bytes,
            max_channels_per_source: settings.max_channels_per_source,
        }
    }

    /// The PostgreSQL engine's options, when `--postgres` is given.
    pub fn postgres_options(&self) -> Option<crate::postgres::Options> {
        let settings = &self.settings;
        let url = settings.postgres.as_ref()?;
        Some(crate::postgres::Options {
            dedupe_window_ms: settings.dedupe_window_s.saturating_mul(1000),
            retention: settings.retention.clone(),
            max_channels_per_source: settings.max_channels_per_source,
            trust: self.trust.clone(),
            ..crate::postgres::Options::new(url.0.clone())
        })
    }

    /// Where the other replicas reach this one, listening at `bound`.
    pub fn advertised(&self, bound: SocketAddr) -> String {
        if let Some(url) = &self.advertise {
            return url.clone();
        }
        let scheme = self.tls.scheme();
        if bound.ip().is_unspecified() {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into());
            format!("{scheme}://{host}:{}", bound.port())
        } else {
            format!("{scheme}://{bound}")
        }
    }

    /// A configuration for tests and the all-in-one mode: data in `data`, on a free loopback
    /// port, everything else default.
    pub fn with_data(data: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data,
            ..eventbus_runtime::config::defaults()
        }
    }
}
