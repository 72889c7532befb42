use std::net::SocketAddr;
use std::path::PathBuf;

/// Where webhooks may deliver: one definition for the hooks service and the all-in-one.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "destinations")]
pub struct Destinations {
    /// Internal networks webhooks may be delivered to anyway (CIDRs, comma separated): outside
    /// development mode, loopback, private, link-local and metadata addresses are refused.
    #[arg(
        long = "webhook-allow-networks",
        env = "EVENTBUS_WEBHOOK_ALLOW_NETWORKS",
        value_delimiter = ','
    )]
    pub allow_networks: Vec<ipnet::IpNet>,
}

/// How webhooks are delivered: the hooks service's settings beyond its address and directory,
/// which the all-in-one `serve` takes as well.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "hooks_settings")]
pub struct Settings {
    /// Failed attempts in a row after which a webhook is marked dead.
    #[arg(
        long = "webhook-max-attempts",
        env = "EVENTBUS_WEBHOOK_MAX_ATTEMPTS",
        default_value_t = 10
    )]
    pub webhook_max_attempts: u32,
    /// How often a webhook looks for new events, in milliseconds.
    #[arg(
        long = "webhook-poll-ms",
        env = "EVENTBUS_WEBHOOK_POLL_MS",
        default_value_t = 250
    )]
    pub webhook_poll_ms: u64,
    #[command(flatten)]
    pub destinations: Destinations,
    /// Longest WebSub lease, in seconds, and the lease of a subscription that names none.
    #[arg(
        long = "websub-max-lease-s",
        env = "EVENTBUS_WEBSUB_MAX_LEASE_S",
        default_value_t = 864_000
    )]
    pub websub_max_lease_s: u64,
    /// Most WebSub subscriptions the hub keeps; past it a subscribe is answered 503.
    #[arg(
        long = "websub-max-subscriptions",
        env = "EVENTBUS_WEBSUB_MAX_SUBSCRIPTIONS",
        default_value_t = 10_000
    )]
    pub websub_max_subscriptions: usize,
}

impl Default for Settings {
    fn default() -> Self {
        eventbus_runtime::config::defaults()
    }
}

/// The hooks service: where it listens and keeps its registrations, whom it calls, and its
/// [`Settings`].
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Address of the webhook API (`/v1/webhooks`) and the health endpoints.
    #[arg(
        long = "listen",
        env = "EVENTBUS_HOOKS_LISTEN",
        default_value = "127.0.0.1:7006"
    )]
    pub listen: SocketAddr,
    /// Where a version before 0.2 kept webhook registrations: a `webhooks.json` found there is
    /// moved into the store at start (registrations and positions are kept in the store).
    #[arg(
        long = "webhooks-dir",
        env = "EVENTBUS_WEBHOOKS_DIR",
        default_value = "./data/webhooks"
    )]
    pub webhooks_dir: PathBuf,
    /// This replica's name in the delivery lease; a replica that restarts under the same name
    /// delivers again at once (default: the host name and process id; on Kubernetes the pod's
    /// name and pid 1, the same after a restart).
    #[arg(long = "id", env = "EVENTBUS_HOOKS_ID")]
    pub id: Option<String>,
    #[command(flatten)]
    pub upstream: eventbus_runtime::upstream::Args,
    /// The store serving in this process (the all-in-one bus), called directly instead of
    /// over `upstream`'s store URL.
    #[arg(skip)]
    pub store_in_process: Option<eventbus_store_client::InProcess>,
    #[command(flatten)]
    pub settings: Settings,
    /// Development mode: any destination and any browser origin are allowed.
    #[arg(long = "dev", env = "EVENTBUS_DEV")]
    pub dev: bool,
    #[command(flatten)]
    pub cors: eventbus_runtime::cors::Args,
    #[command(flatten)]
    pub http: eventbus_runtime::http::Limits,
    #[command(flatten)]
    pub tls: eventbus_runtime::tls::Args,
    #[command(flatten)]
    pub websub: eventbus_runtime::websub::Args,
}

impl Config {
    /// Defaults pointing at the given store and auth, with registrations in `webhooks_dir`, for
    /// tests and the all-in-one mode.
    pub fn new(store_url: String, auth_url: String, webhooks_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            webhooks_dir,
            upstream: eventbus_runtime::upstream::Args::new(store_url, auth_url),
            ..eventbus_runtime::config::defaults()
        }
    }
}
