//! Where a service finds the store and auth over gRPC (ingest and gateway both need them).

#[derive(clap::Args, Debug, Clone)]
#[group(id = "upstream")]
pub struct Args {
    /// gRPC address of the store.
    #[arg(
        long = "store-url",
        env = "EVENTBUS_STORE_URL",
        default_value = "http://127.0.0.1:7001"
    )]
    pub store_url: String,
    /// gRPC address of the auth service (for its signing keys).
    #[arg(
        long = "auth-url",
        env = "EVENTBUS_AUTH_URL",
        default_value = "http://127.0.0.1:7002"
    )]
    pub auth_url: String,
    /// Milliseconds to wait for the store's answer to one call. An append that times out has an
    /// unknown outcome: the publisher is told so, and retries with the same id.
    #[arg(
        long = "store-timeout-ms",
        env = "EVENTBUS_STORE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub store_timeout_ms: u64,
    /// The credential every call to the store and to auth carries.
    #[command(flatten)]
    pub internal: crate::internal::Args,
    /// Whom `https://` store and auth URLs are trusted as.
    #[command(flatten)]
    pub trust: crate::tls::Trust,
}

impl Args {
    pub fn new(store_url: String, auth_url: String) -> Self {
        Args {
            store_url,
            auth_url,
            ..crate::config::defaults()
        }
    }

    /// The internal credential the upstream services demand.
    pub fn credential(&self) -> Result<crate::internal::Credential, String> {
        self.internal.credential()
    }

    pub fn store_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.store_timeout_ms.max(1))
    }
}
