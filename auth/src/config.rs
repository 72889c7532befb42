use std::net::SocketAddr;
use std::path::PathBuf;

/// One service's API key: `name:secret`. The name is the identity of the service tokens it gets.
#[derive(Clone)]
pub struct ApiKey {
    pub name: String,
    pub secret: String,
}

impl std::fmt::Debug for ApiKey {
    // Secrets never reach a log line, even through `{:?}` of the whole configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey {{ name: {:?}, secret: <redacted> }}", self.name)
    }
}

impl std::str::FromStr for ApiKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, secret) = text
            .trim()
            .split_once(':')
            .ok_or("an API key is written name:secret")?;
        eventbus_model::validate_identity(name)
            .map_err(|err| format!("API key name {name:?} {err}"))?;
        if secret.len() < 16 {
            return Err(format!(
                "the secret of API key {name:?} must be at least 16 characters"
            ));
        }
        Ok(ApiKey {
            name: name.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

/// `keys` and those in `file` (one `name:secret` per line or comma separated; `#` comments).
pub fn api_keys(keys: &[ApiKey], file: Option<&std::path::Path>) -> Result<Vec<ApiKey>, String> {
    let mut all = keys.to_vec();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read the API keys file {}: {err}", path.display()))?;
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') {
                continue;
            }
            for key in line.split(',').map(str::trim).filter(|k| !k.is_empty()) {
                // The error names the key's name at most, never its secret.
                all.push(
                    key.parse()
                        .map_err(|why| format!("{}: {why}", path.display()))?,
                );
            }
        }
    }
    Ok(all)
}

/// Token lifetimes: auth's settings beyond its addresses and directories,
/// which the all-in-one `serve` takes as well.
#[derive(clap::Args, Debug, Clone)]
#[group(id = "auth_settings")]
pub struct Settings {
    /// Lifetime of a token when the request names none, in seconds.
    #[arg(
        long = "default-ttl-s",
        env = "EVENTBUS_TOKEN_DEFAULT_TTL_S",
        default_value_t = 3600
    )]
    pub default_ttl_s: u64,
    /// Longest lifetime a token may be given, in seconds.
    #[arg(
        long = "max-ttl-s",
        env = "EVENTBUS_TOKEN_MAX_TTL_S",
        default_value_t = 86_400
    )]
    pub max_ttl_s: u64,
}

impl Default for Settings {
    fn default() -> Self {
        eventbus_runtime::config::defaults()
    }
}

/// The auth service: where it listens and keeps its keys, and its [`Settings`].
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Address for HTTP (`/v1/tokens`, `/v1/jwks`), gRPC and the health endpoints.
    #[arg(
        long = "listen",
        env = "EVENTBUS_AUTH_LISTEN",
        default_value = "127.0.0.1:7002"
    )]
    pub listen: SocketAddr,
    /// Directory of the Ed25519 signing keys (created with a first key when empty).
    #[arg(
        long = "keys-dir",
        env = "EVENTBUS_AUTH_KEYS_DIR",
        default_value = "./data/auth"
    )]
    pub keys_dir: PathBuf,
    /// Service API keys, comma separated, each `name:secret` (secret of 16 characters or more).
    #[arg(long = "api-keys", env = "EVENTBUS_API_KEYS", value_delimiter = ',')]
    pub api_keys: Vec<ApiKey>,
    /// A file of service API keys (`name:secret`, one per line or comma separated), added to
    /// --api-keys: a mounted Secret keeps them out of the environment.
    #[arg(long = "api-keys-file", env = "EVENTBUS_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Development mode: `POST /v1/tokens` answers without an API key. Never in production.
    #[arg(long = "dev", env = "EVENTBUS_DEV")]
    pub dev: bool,
    /// Channels (patterns, comma separated) whose joins and leaves become events on
    /// `presence.<channel>`; needs the store (`--store-url`).
    #[arg(
        long = "presence-events",
        env = "EVENTBUS_PRESENCE_EVENTS",
        value_delimiter = ','
    )]
    pub presence_events: Vec<String>,
    /// gRPC address of the store, where presence events are written.
    #[arg(long = "store-url", env = "EVENTBUS_STORE_URL")]
    pub store_url: Option<String>,
    /// This replica's name in the lease of the one that writes presence events (default: the
    /// host name and process id; on Kubernetes the pod's name and pid 1).
    #[arg(long = "id", env = "EVENTBUS_AUTH_ID")]
    pub id: Option<String>,
    /// Token lifetimes.
    #[command(flatten)]
    pub settings: Settings,
    #[command(flatten)]
    pub cors: eventbus_runtime::cors::Args,
    #[command(flatten)]
    pub http: eventbus_runtime::http::Limits,
    #[command(flatten)]
    pub internal: eventbus_runtime::internal::Args,
    #[command(flatten)]
    pub tls: eventbus_runtime::tls::Args,
    #[command(flatten)]
    pub trust: eventbus_runtime::tls::Trust,
}

impl Config {
    /// Defaults with keys in `keys_dir`, for tests and the all-in-one mode.
    pub fn with_keys_dir(keys_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            keys_dir,
            ..eventbus_runtime::config::defaults()
        }
    }
}
